//! The commands that read and change nothing: `points`, `status`, `verify`. Each goes
//! through the VM's running owner (its agent or follower) if there is one.

use super::{open_vault, vault, wait, who};
use crate::{output, owner};
use standby_engine::runtime::control::{Reply, Request};
use standby_engine::vault::PointSpec;
use standby_engine::Error;
use std::process::ExitCode;

pub(crate) fn points(vm: &str, json: bool) -> Result<(), Error> {
    let (points, damage) = owner::run(
        &vault()?,
        &who("points"),
        vm,
        &Request::Points,
        wait(),
        |v| v.points_report(vm),
        |reply, _| match reply {
            Reply::Points { points, damage } => Ok((points, damage)),
            other => Err(owner::unexpected(&other)),
        },
    )?;
    output::points(vm, &points, &damage, json);
    Ok(())
}

pub(crate) fn status(vm: Option<String>, json: bool) -> Result<(), Error> {
    let root = vault()?;
    let vault = open_vault(&root, &who("status"))?;
    let names: Vec<String> = match vm {
        Some(n) => {
            vault.catalog().vm(&n)?;
            vec![n]
        }
        None => vault.catalog().vms.keys().cloned().collect(),
    };
    let mut docs = Vec::new();
    for n in &names {
        if vault.catalog().vm(n)?.remote.is_some() {
            // A remote VM's status reads what its follower publishes: no waiting.
            docs.push(output::status_json(&vault.status(n)?));
            continue;
        }
        let doc = owner::run(
            &root,
            &who("status"),
            n,
            &Request::Status,
            wait(),
            |v| v.status(n).map(|st| output::status_json(&st)),
            |reply, _| match reply {
                Reply::Status {
                    status,
                    owner_pid,
                    resync_bytes,
                } => {
                    let st: standby_engine::vault::VmStatus = serde_json::from_value(status)
                        .map_err(|e| {
                            Error::Conflict(format!("malformed status from the agent: {e}"))
                        })?;
                    let mut v = output::status_json(&st);
                    v["agent_pid"] = serde_json::json!(owner_pid);
                    v["resync_bytes"] = serde_json::json!(resync_bytes);
                    Ok(v)
                }
                other => Err(owner::unexpected(&other)),
            },
        )?;
        docs.push(doc);
    }
    output::status_docs(&docs, json);
    Ok(())
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
