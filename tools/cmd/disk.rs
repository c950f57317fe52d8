//! `disk add` and `disk resize`: a protected VM's disks change; older points keep theirs.

use super::{open_vault, vault, who};
use crate::{output, progress};
use standby_engine::vault::{DiskChange, DiskSource};
use standby_engine::Error;

pub(crate) fn add(vm: &str, (name, src): (String, DiskSource), json: bool) -> Result<(), Error> {
    use standby_engine::runtime::control::{Reply, Request};
    // The running agent (if any) does it beside the VM's writes: it needs absolute paths.
    let abs = |p: &std::path::Path| std::path::absolute(p).map_err(|e| Error::io(p, e));
    let src = match src {
        DiskSource::Existing(p) => DiskSource::Existing(abs(&p)?),
        DiskSource::New(p, size) => DiskSource::New(abs(&p)?, size),
        other => other,
    };
    let req = Request::DiskAdd {
        name: name.clone(),
        source: src.clone(),
    };
    let mut bar = progress::Bar::quiet_if(json);
    let mut live = false;
    let r = crate::owner::run(
        &vault()?,
        &who("disk add"),
        vm,
        &req,
        super::wait(),
        |v| v.disk_add(vm, &name, &src, &mut bar),
        |reply, _| match reply {
            Reply::DiskAdded { report } => {
                live = true;
                Ok(report)
            }
            other => Err(crate::owner::unexpected(&other)),
        },
    )?;
    if json {
        let mut doc = serde_json::to_value(&r).unwrap_or_default();
        doc["point"] = output::point_json(&r.point, None);
        output::print_json(&doc);
        return Ok(());
    }
    println!(
        "{vm}: disk '{name}' added ({}, {} shipped of {} allocated){}",
        output::bytes(r.size_bytes),
        output::bytes(r.shipped_bytes),
        output::bytes(r.scanned_bytes),
        if r.created {
            format!("; created {}", r.source.display())
        } else {
            String::new()
        }
    );
    println!(
        "  point {} ({}, seq {}) is the first with it; older points have the disks they had",
        r.point.id,
        r.point.name.as_deref().unwrap_or(""),
        r.from_seq
    );
    if live {
        println!(
            "the running agent replicated it beside the VM's writes; it serves '{name}' once restarted (stop it, then `standby agent {vm}`)"
        );
    } else {
        println!("next: standby agent {vm}   (it serves '{name}' too)");
    }
    Ok(())
}

pub(crate) fn resize(vm: &str, name: &str, size: u64, json: bool) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("disk resize"))?;
    let r = v.disk_resize(vm, name, size)?;
    if json {
        let mut doc = serde_json::to_value(&r).unwrap_or_default();
        doc["point"] = serde_json::json!(r.point.as_ref().map(|p| output::point_json(p, None)));
        output::print_json(&doc);
        return Ok(());
    }
    if r.unchanged {
        println!(
            "{vm}: disk '{name}' is {} already; nothing changed",
            output::bytes(size)
        );
        return Ok(());
    }
    println!(
        "{vm}: disk '{name}' grown from {} to {} from seq {}{}{}; older points keep {}",
        output::bytes(r.old_size_bytes),
        output::bytes(r.size_bytes),
        r.from_seq,
        match &r.point {
            Some(p) => format!(" (point {}, disk-resize)", p.id),
            None => String::new(),
        },
        if r.source_grown {
            " (the source image grown too)"
        } else {
            ""
        },
        output::bytes(r.old_size_bytes)
    );
    println!("next: standby agent {vm}   (it serves the new size)");
    Ok(())
}

/// Lines saying which points lack a disk or have it at an older size (for `points`).
pub(crate) fn changes_text(changes: &[DiskChange]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c.old_size_bytes {
            None => format!(
                "disk '{}' was added at seq {}: points before it do not have it",
                c.disk, c.seq
            ),
            Some(old) => format!(
                "disk '{}' grew from {} to {} at seq {}: points before it have it at {}",
                c.disk,
                output::bytes(old),
                output::bytes(c.size_bytes),
                c.seq,
                output::bytes(old)
            ),
        })
        .collect()
}

/// After a failover of an older point: the VM's disks that point does not have.
pub(crate) fn print_missing(vm: &str, r: &standby_engine::vault::FailoverReport) {
    let Ok(v) = vault().and_then(|root| open_vault(&root, &who("failover"))) else {
        return;
    };
    let Ok(rec) = v.catalog().vm(vm) else {
        return;
    };
    for d in rec.disks.iter().skip(r.disks.len()) {
        println!(
            "  disk '{}' is not in this point (it was added later: points from its disk-add on have it)",
            d.name
        );
    }
}
