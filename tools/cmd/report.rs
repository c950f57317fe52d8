//! The commands that read and change nothing: `points`, `status`, `verify`. Each goes
//! through the VM's running owner (its agent or follower) if there is one.

use super::{open_vault, vault, wait, who};
use crate::{output, owner};
use standby_engine::runtime::control::{Reply, Request};
use standby_engine::vault::{Health, PointSpec, Vault, VmStatus};
use standby_engine::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub(crate) fn points(vm: &str, json: bool) -> Result<(), Error> {
    let root = vault()?;
    let (points, damage) = points_report(&root, vm, wait())?;
    // Disks added or grown after protect: older points have the disks they had.
    let v = open_vault(&root, &who("points"))?;
    let changes = v.disk_changes(vm)?;
    if changes.is_empty() {
        output::points(vm, &points, &damage, json);
        return Ok(());
    }
    let names: Vec<(String, u64)> = v
        .catalog()
        .vm(vm)?
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.size_bytes))
        .collect();
    if json {
        let mut docs = output::points_json(&points, &damage);
        for (doc, (p, _)) in docs.iter_mut().zip(&points) {
            doc["disks"] = serde_json::json!(disks_at(&names, &changes, p.seq)
                .into_iter()
                .map(|(name, size)| serde_json::json!({ "name": name, "size_bytes": size }))
                .collect::<Vec<_>>());
        }
        output::print_json(&serde_json::json!({
            "vm": vm,
            "points": docs,
            "disk_changes": changes,
        }));
        return Ok(());
    }
    output::points(vm, &points, &damage, false);
    for line in super::disk::changes_text(&changes) {
        println!("{line}");
    }
    Ok(())
}

/// The disks (name, size) of the state at `seq`, from the VM's disks (name, size now) and
/// their changes; a disk added later is left out.
fn disks_at(
    disks: &[(String, u64)],
    changes: &[standby_engine::vault::DiskChange],
    seq: u64,
) -> Vec<(String, u64)> {
    disks
        .iter()
        .filter_map(|(n, now)| {
            let mine: Vec<_> = changes.iter().filter(|c| &c.disk == n).collect();
            if mine
                .iter()
                .any(|c| c.old_size_bytes.is_none() && c.seq > seq)
            {
                return None; // added after this state
            }
            let size = match mine.iter().rev().find(|c| c.seq <= seq) {
                Some(c) => c.size_bytes,
                // Before its first growth: the size it had then (never changed: as now).
                None => mine.first().and_then(|c| c.old_size_bytes).unwrap_or(*now),
            };
            Some((n.clone(), size))
        })
        .collect()
}

/// A VM's points and the damage that spoils some (what `points` prints): through its
/// owner if one runs.
pub(crate) fn points_report(
    root: &Path,
    vm: &str,
    wait: Duration,
) -> Result<standby_engine::vault::PointsReport, Error> {
    owner::run(
        root,
        &who("points"),
        vm,
        &Request::Points,
        wait,
        |v| v.points_report(vm),
        |reply, _| match reply {
            Reply::Points { points, damage } => Ok((points, damage)),
            other => Err(owner::unexpected(&other)),
        },
    )
}

/// One VM's status as `status` reports it: from its running owner (agent or follower) if
/// one runs, else computed here; with the owner's pid and the bytes its tap has to resync.
pub(crate) struct Reported {
    pub status: VmStatus,
    pub owner_pid: Option<u32>,
    pub resync_bytes: Option<u64>,
}

impl Reported {
    /// The document `status --json` prints for it.
    pub(crate) fn json(&self) -> serde_json::Value {
        let mut v = output::status_json(&self.status);
        if let Some(pid) = self.owner_pid {
            v["agent_pid"] = serde_json::json!(pid);
            v["resync_bytes"] = serde_json::json!(self.resync_bytes);
        }
        v
    }
}

/// The status of `vm` (see [`Reported`]), waiting at most `wait` for a short-lived holder.
pub(crate) fn vm_status(
    root: &Path,
    vault: &Vault,
    vm: &str,
    wait: Duration,
) -> Result<Reported, Error> {
    if vault.catalog().vm(vm)?.remote.is_some() {
        // A remote VM's status reads what its follower publishes: no waiting.
        return Ok(Reported {
            status: vault.status(vm)?,
            owner_pid: None,
            resync_bytes: None,
        });
    }
    owner::run(
        root,
        &who("status"),
        vm,
        &Request::Status,
        wait,
        |v| {
            v.status(vm).map(|status| Reported {
                status,
                owner_pid: None,
                resync_bytes: None,
            })
        },
        |reply, _| match reply {
            Reply::Status {
                status,
                owner_pid,
                resync_bytes,
            } => {
                let status: VmStatus = serde_json::from_value(status).map_err(|e| {
                    Error::Conflict(format!("malformed status from the agent: {e}"))
                })?;
                Ok(Reported {
                    status,
                    owner_pid: Some(owner_pid),
                    resync_bytes,
                })
            }
            other => Err(owner::unexpected(&other)),
        },
    )
}

/// `status`; with `check`, the exit status says the worst health (0 healthy, 1 warning,
/// 2 critical), for scripts and monitoring checks.
pub(crate) fn status(vm: Option<String>, json: bool, check: bool) -> Result<ExitCode, Error> {
    let root = vault()?;
    let (docs, worst, vault) = status_reports(&root, vm, wait())?;
    // Groups: their members, last group point, and health (the worst member's), from the
    // vault the reports were made with (the group catalog is read afresh from it).
    let groups = super::group::status_json(&vault, &docs)?;
    if json && !groups.is_empty() {
        output::print_json(&serde_json::json!({ "vms": docs, "groups": groups }));
    } else {
        output::status_docs(&docs, json);
        super::group::print_status(&groups);
    }
    Ok(match (check, worst) {
        (false, _) | (true, Health::Healthy) => ExitCode::SUCCESS,
        (true, Health::Warning) => ExitCode::from(1),
        (true, Health::Critical) => ExitCode::from(2),
    })
}

/// The status document of every VM (or one), as `status --json` lists them: through each
/// VM's owner if one runs.
pub(crate) fn status_docs(
    root: &Path,
    vm: Option<String>,
    wait: Duration,
) -> Result<Vec<serde_json::Value>, Error> {
    Ok(status_reports(root, vm, wait)?.0)
}

/// The status documents, the worst health among them, and the vault they were read with.
fn status_reports(
    root: &Path,
    vm: Option<String>,
    wait: Duration,
) -> Result<(Vec<serde_json::Value>, Health, Vault), Error> {
    let vault = open_vault(root, &who("status"))?;
    let names: Vec<String> = match vm {
        Some(n) => {
            vault.catalog().vm(&n)?;
            vec![n]
        }
        None => vault.catalog().vms.keys().cloned().collect(),
    };
    let mut docs = Vec::new();
    let mut worst = Health::Healthy;
    for n in &names {
        let r = vm_status(root, &vault, n, wait)?;
        worst = worst.max(r.status.health);
        docs.push(r.json());
    }
    Ok((docs, worst, vault))
}

/// Exit 1 (after the report) if anything is damaged.
pub(crate) fn verify(vm: &str, point: Option<PointSpec>, json: bool) -> Result<ExitCode, Error> {
    let (report, p) = owner::run(
        &vault()?,
        &who("verify"),
        vm,
        &Request::Verify {
            point: point.clone(),
        },
        wait(),
        |v| v.verify(vm, point.clone()),
        |reply, _| match reply {
            Reply::Verify { report, point } => Ok((report, point)),
            other => Err(owner::unexpected(&other)),
        },
    )?;
    let clean = report.is_clean();
    output::verify(vm, &report, p.as_ref(), json);
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
