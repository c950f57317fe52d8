//! The way back and the end of protection: `diff`, `reprotect`, `failback`, `unprotect`,
//! `policy assign`.

use super::{open_vault, vault, who};
use crate::{output, progress};
use standby_engine::vault::PointSpec;
use standby_engine::Error;

pub(crate) fn diff(vm: &str, a: PointSpec, b: PointSpec, json: bool) -> Result<(), Error> {
    use standby_engine::runtime::control::{Reply, Request};
    // Through the VM's owner while its agent (or follower) runs: it has the live views.
    let req = Request::Diff {
        a: a.clone(),
        b: b.clone(),
    };
    let r = crate::owner::run(
        &vault()?,
        &who("diff"),
        vm,
        &req,
        super::wait(),
        |v| v.diff(vm, a.clone(), b.clone()),
        |reply, _| match reply {
            Reply::Diff { report } => Ok(report),
            other => Err(crate::owner::unexpected(&other)),
        },
    )?;
    if json {
        output::print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(());
    }
    let side = |s: &standby_engine::vault::DiffSide| match &s.point {
        Some(p) => format!("point {} (seq {})", p.id, s.seq),
        None => format!("seq {}", s.seq),
    };
    println!("{vm}: {} -> {}", side(&r.from), side(&r.to));
    for d in &r.disks {
        println!(
            "  {}: {} changed in {} range(s)",
            d.name,
            output::bytes(d.changed_bytes),
            d.changed.len()
        );
        for c in &d.changed {
            println!("    {}+{}", c.offset, c.len);
        }
    }
    println!(
        "total: {} changed ({} compared by hash; the rest equal by the replica's extent maps)",
        output::bytes(r.changed_bytes),
        output::bytes(r.compared_bytes)
    );
    Ok(())
}

pub(crate) fn unprotect(vm: &str, delete_points: bool) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("unprotect"))?;
    let r = v.unprotect(vm, delete_points)?;
    match (&r.points_kept_as, r.points_deleted) {
        (Some(kept), _) => println!(
            "{vm} is unprotected and its name is free; its points stay readable as '{kept}' \
             (standby points {kept}; `standby unprotect {kept} --delete-points` deletes them)"
        ),
        (None, true) => println!("{vm} is unprotected; its points are deleted"),
        (None, false) => println!("{vm} is unprotected; it had no points left"),
    }
    Ok(())
}

pub(crate) fn policy_assign(vm: &str, policy: &str) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("policy assign"))?;
    v.assign_policy(vm, policy)?;
    println!("{vm} follows policy '{policy}' from now on");
    Ok(())
}

fn synced(disks: &[standby_engine::vault::SyncedDisk], verb: &str) {
    for d in disks {
        println!(
            "  {}: {} {verb} ({} compared) {}",
            d.name,
            output::bytes(d.shipped_bytes),
            output::bytes(d.compared_bytes),
            d.image.display()
        );
    }
}

pub(crate) fn reprotect(vm: &str, json: bool) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("reprotect"))?;
    let mut bar = progress::Bar::new();
    let r = v.reprotect(vm, &mut bar)?;
    if json {
        output::print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{vm} is protected in the {} direction: point {} cut; {} shipped of {} compared",
        r.direction.as_str(),
        r.point.id,
        output::bytes(r.shipped_bytes),
        output::bytes(r.compared_bytes)
    );
    synced(&r.disks, "shipped");
    if r.seeded_bytes > 0 {
        println!(
            "  the replica was seeded from the original images ({})",
            output::bytes(r.seeded_bytes)
        );
    }
    if let Some(n) = r.reverted_bytes.filter(|n| *n > 0) {
        println!(
            "  {} the old source wrote after the failover point reverted",
            output::bytes(n)
        );
    }
    println!("next: standby agent {vm}");
    Ok(())
}

pub(crate) fn reprotect_remote(
    vm: &str,
    cache: String,
    seed: Vec<(String, String)>,
    policy: Option<String>,
    insecure_loopback: bool,
    json: bool,
) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("reprotect"))?;
    let mut bar = progress::Bar::new();
    let req = standby_engine::vault::RemoteReprotectRequest {
        vm: vm.to_string(),
        cache: cache.clone(),
        insecure_loopback,
        seed: seed
            .into_iter()
            .map(|(n, p)| (n, std::path::PathBuf::from(p)))
            .collect(),
        policy,
    };
    let r = v.reprotect_remote(&req, &mut bar)?;
    if json {
        output::print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{vm} is protected in the {} direction from the cache service at {cache}: its log continues at record {}; {} of block hashes left there ({} hashed)",
        r.direction.as_str(),
        r.next_seq,
        output::bytes(r.hash_bytes),
        output::bytes(r.compared_bytes)
    );
    if r.seeded_bytes > 0 {
        println!(
            "  the replica was seeded from the images here ({})",
            output::bytes(r.seeded_bytes)
        );
    }
    println!(
        "next, where {vm} runs: standby agent {vm} --cache {cache} --seeded --journal NEW-DIR --disk NAME=PATH …   (ships only the blocks that differ)"
    );
    println!("next, here: standby process --follow   (pulls and processes)");
    Ok(())
}

pub(crate) fn failback(vm: &str, point: PointSpec, json: bool) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("failback"))?;
    let mut bar = progress::Bar::new();
    let r = v.failback(vm, point, &mut bar)?;
    if json {
        output::print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{vm} failed back to point {} (seq {}){}: {} written of {} compared",
        r.point.id,
        r.point.seq,
        if r.resumed {
            ", finishing the earlier failback"
        } else {
            ""
        },
        output::bytes(r.shipped_bytes),
        output::bytes(r.compared_bytes)
    );
    synced(&r.disks, "written");
    println!(
        "next: standby reprotect {vm}   (two sites: at the vault of the site {vm} failed back from, with --cache ADDR of the cache service here)"
    );
    Ok(())
}
