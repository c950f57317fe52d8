//! `protect` (enable replication of a VM) and `process` (apply its changes, cut points).

use super::{open_vault, vault, who};
use crate::cli::ProtectArgs;
use crate::output::{self, bytes};
use crate::{agent, progress};
use standby_engine::vault::{PlacementOverrides, ProtectRequest};
use standby_engine::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub(crate) fn protect(a: ProtectArgs) -> Result<(), Error> {
    let mut vault = open_vault(&vault()?, &who("protect"))?;
    let cache = a.cache.clone();
    let insecure = a.insecure_loopback;
    let req = ProtectRequest {
        vm: a.vm.clone(),
        disks: a.disks.into_iter().map(|(n, s)| (n, Some(s))).collect(),
        policy: a.policy,
        source: PlacementOverrides {
            resource_group: a.resource_group,
            network: a.network,
            subnet: a.subnet,
            availability_set: a.availability_set,
        },
        target: PlacementOverrides {
            resource_group: a.target_resource_group,
            network: a.target_network,
            subnet: a.target_subnet,
            availability_set: a.target_availability_set,
        },
        network_mapping: a.network_mapping,
        cache_capacity_bytes: a.cache_capacity,
    };
    if let Some(addr) = cache {
        let disks = vault.protect_remote(&req, &addr, insecure)?;
        let list: Vec<String> = disks
            .iter()
            .map(|d| format!("{} ({})", d.name, bytes(d.size_bytes)))
            .collect();
        println!(
            "protected {} from the cache service at {addr}: {}",
            a.vm,
            list.join(", ")
        );
        println!("next: standby process --cache {addr} --follow   (pulls and processes; the agent's first run is the initial replication)");
        return Ok(());
    }
    let mut bar = progress::Bar::new();
    let r = vault.protect(&req, &mut bar)?;
    let rec = vault.catalog().vm(&a.vm)?;
    println!(
        "protected {}: {} disk(s), shipped {} of {} allocated (holes and zero runs skipped); initial point {} at seq {}",
        a.vm,
        rec.disks.len(),
        bytes(r.shipped_bytes),
        bytes(r.scanned_bytes),
        r.initial_point.id,
        r.initial_point.seq
    );
    for (name, path) in &r.created {
        println!(
            "created disk {name}: {} (an empty sparse image; attach it to the VM)",
            path.display()
        );
    }
    println!(
        "target: resource group {}, network {}, subnet {}{}",
        rec.target.resource_group,
        rec.target.network,
        rec.target.subnet,
        rec.target
            .availability_set
            .as_ref()
            .map(|s| format!(", availability set {s}"))
            .unwrap_or_default()
    );
    Ok(())
}

pub(crate) fn process(
    path: &Path,
    vm: Option<String>,
    follow: bool,
    every: Duration,
    cache: Option<String>,
) -> Result<ExitCode, Error> {
    use std::sync::atomic::Ordering;
    let stop = if follow {
        agent::stop_flag()?
    } else {
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
    };
    // Remote VMs, followed each on its own thread (started as they get protected).
    let mut followers: std::collections::HashMap<String, std::thread::JoinHandle<()>> =
        std::collections::HashMap::new();
    let wanted = |rec: &standby_engine::vault::VmRecord| {
        vm.as_ref().is_none_or(|n| n == &rec.name)
            && match (&cache, &rec.remote) {
                (Some(c), Some(r)) => &r.cache == c,
                (Some(_), None) => false,
                _ => true,
            }
    };
    let mut failed = false;
    let mut errors: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    loop {
        {
            let mut vault = open_vault(
                path,
                &who(if follow {
                    "process --follow"
                } else {
                    "process"
                }),
            )?;
            if let Some(n) = &vm {
                vault.catalog().vm(n)?;
            }
            if follow {
                for n in vault.remote_vms() {
                    let rec = vault.catalog().vm(&n)?.clone();
                    if !wanted(&rec) || followers.get(&n).is_some_and(|t| !t.is_finished()) {
                        continue;
                    }
                    let (root, stop, name) = (path.to_path_buf(), stop.clone(), n.clone());
                    let who = who("process --follow");
                    println!(
                        "{n}: following the cache service at {}",
                        rec.remote.as_ref().map(|r| r.cache.as_str()).unwrap_or("")
                    );
                    followers.insert(
                        n,
                        std::thread::spawn(move || {
                            if let Err(e) = standby_engine::runtime::follow(
                                &root,
                                &who,
                                &name,
                                every,
                                &stop,
                                agent::events(),
                            ) {
                                eprintln!("standby: {name}: {}", output::one_line(&e));
                            }
                        }),
                    );
                }
            }
            let names: Vec<String> = match &vm {
                Some(n) => vec![n.clone()],
                None => vault.processable_vms(),
            };
            for n in names {
                let rec = vault.catalog().vm(&n)?.clone();
                if !wanted(&rec) || (follow && rec.remote.is_some()) {
                    continue;
                }
                if vm.is_none() || follow {
                    if let Err(Error::Locked(holder)) = vault.try_lock_vm(&n).map(drop) {
                        if !follow {
                            println!("{n}: processed by {holder}");
                        }
                        continue;
                    }
                }
                let r = match vault.process(&n) {
                    Ok(r) => r,
                    Err(e) if vm.is_none() => {
                        // One VM's failure (a damaged replica, say) leaves the others be;
                        // --follow says it again only when it changes.
                        let line = output::one_line(&e);
                        if errors.get(&n) != Some(&line) {
                            eprintln!("standby: {n}: {line}");
                        }
                        errors.insert(n.clone(), line);
                        failed = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                errors.remove(&n);
                if !follow
                    || r.applied > 0
                    || !r.points.is_empty()
                    || !r.prune.pruned_points.is_empty()
                {
                    println!(
                        "{n}: applied {} records ({}), {} new point(s), {} pruned, durable to seq {}",
                        r.applied,
                        bytes(r.applied_bytes),
                        r.points.len(),
                        r.prune.pruned_points.len(),
                        r.durable_seq
                    );
                }
            }
        }
        if !follow {
            return Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        let until = std::time::Instant::now() + every;
        while std::time::Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::SeqCst) {
            for (_, t) in followers {
                let _ = t.join();
            }
            eprintln!("standby: stopped");
            return Ok(ExitCode::SUCCESS);
        }
    }
}
