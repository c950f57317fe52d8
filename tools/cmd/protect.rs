//! `protect` (enable replication of a VM) and `process` (apply its changes, cut points).

use super::{open_vault, vault, who};
use crate::cli::ProtectArgs;
use crate::output::{self, bytes};
use crate::{agent, progress};
use standby_engine::vault::{PlacementOverrides, ProtectRequest, Vault};
use standby_engine::Error;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub(crate) fn protect(mut a: ProtectArgs) -> Result<(), Error> {
    let domain = match a.libvirt_domain.clone() {
        Some(file) => Some(libvirt_disks(&mut a, &file)?),
        None => None,
    };
    protect_disks(a)?;
    if let Some((disks, host, port)) = domain {
        println!("replace these disks of the domain (virsh edit) once the agent serves them:");
        for line in crate::libvirt::nbd_disks_xml(&disks, &host, port).lines() {
            println!("{line}");
        }
    }
    Ok(())
}

/// The disks of `--libvirt-domain FILE` as the protect request's, and where the agent
/// will serve them.
fn libvirt_disks(
    a: &mut ProtectArgs,
    file: &Path,
) -> Result<(Vec<crate::libvirt::DomainDisk>, String, u16), Error> {
    let addr: std::net::SocketAddr = a.agent_listen.parse().map_err(|_| {
        Error::Invalid(format!(
            "--agent-listen '{}' is not HOST:PORT with an IP address",
            a.agent_listen
        ))
    })?;
    let disks = crate::libvirt::read_domain_disks(file)?;
    a.disks = disks
        .iter()
        .map(|d| {
            (
                d.dev.clone(),
                standby_engine::vault::DiskSource::Existing(d.file.clone()),
            )
        })
        .collect();
    Ok((disks, addr.ip().to_string(), addr.port()))
}

fn protect_disks(a: ProtectArgs) -> Result<(), Error> {
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
        if std::io::stderr().is_terminal() {
            watch_initial_replication(&super::vault()?, &a.vm);
        }
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

/// On a terminal, after `protect --cache`: if a follower already pulls from that cache
/// service, show the initial replication as it lands in the vault (bytes replicated,
/// bytes still behind the cache) until the first point is cut; Ctrl-C leaves it running.
/// With no follower there is nothing to watch yet, and the `next:` line says what to run.
fn watch_initial_replication(root: &Path, vm: &str) {
    let mut spinner: Option<progress::Spinner> = None;
    // A running follower takes up a newly protected VM on its next pass.
    let give_up = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let st = match standby_engine::vault::Vault::open(
            root,
            &who("protect"),
            standby_engine::vault::LockWait::Fail,
        )
        .and_then(|v| v.status(vm))
        {
            Ok(st) => st,
            Err(_) => return,
        };
        let Some(r) = &st.remote else { return };
        if r.link == "not followed" && spinner.is_none() {
            if std::time::Instant::now() > give_up {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let replicated: u64 = st.disks.iter().map(|d| d.replicated_bytes).sum();
        if st.points > 0 && r.behind_records == 0 && !r.resync_required {
            drop(spinner);
            eprintln!(
                "standby: initial replication of {vm} done: {} replicated, point {}",
                bytes(replicated),
                st.last_point.as_ref().map_or(0, |p| p.id)
            );
            return;
        }
        let msg = format!(
            "initial replication of {vm}: {} replicated, {} behind the cache (Ctrl-C stops watching, not replicating)",
            bytes(replicated),
            bytes(r.behind_bytes + r.resync_bytes)
        );
        match &mut spinner {
            Some(s) => s.set_message(&msg),
            None => spinner = Some(progress::Spinner::start(&msg)),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A fault that can pass (the vault's store did not answer, an I/O error), unlike bad
/// input: `process --follow` retries it with backoff even on its first pass.
fn unreachable(e: &Error) -> bool {
    match e {
        Error::Io { .. } => true,
        other => other.to_string().contains("the store is unreachable"),
    }
}

pub(crate) fn process(
    path: &Path,
    vm: Option<String>,
    follow: bool,
    every: Duration,
    cache: Option<String>,
    metrics: Option<String>,
) -> Result<ExitCode, Error> {
    use std::sync::atomic::Ordering;
    // Bound first: a bad address stops the command before anything is processed.
    let _exporter = match crate::metrics::bind_opt(metrics.as_deref())? {
        Some(l) => {
            crate::metrics::announce(&l);
            let (root, only) = (path.to_path_buf(), vm.clone());
            Some(l.start(move || crate::metrics::render_vault(&root, only.as_deref()))?)
        }
        None => None,
    };
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
    let mut blocked: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut pins: std::collections::HashMap<String, standby_engine::objstore::lease::Lease> =
        std::collections::HashMap::new();
    let mut passes = 0u64;
    let mut away: Option<(String, Duration)> = None;
    loop {
        // A pass; with --follow, one that fails after a good one (the store unreachable, say)
        // is said once and retried with backoff rather than ending the command.
        let pass = (|| -> Result<(), Error> {
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
                // With --follow on an object vault, keep the VM's lease between passes (so a
                // processor on another machine waits for this one to stop or die), and let go
                // of it when a command here waits for the VM (a failover, say).
                let wanted_here = follow && Vault::lock_wanted(&vault.vm_dir_of(&n));
                if (wanted_here || pins.get(&n).is_some_and(|p| p.lost()))
                    && pins.remove(&n).is_some()
                {
                    eprintln!("standby: {n}: letting go of the VM's lease between passes");
                }
                if vm.is_none() || follow {
                    match vault.try_lock_vm(&n) {
                        Err(Error::Locked(holder)) => {
                            if !follow {
                                println!("{n}: processed by {holder}");
                            } else if blocked.insert(n.clone()) {
                                // Once, until it gets the VM: another processor (or a
                                // failover) has it; this one takes over when it lets go.
                                eprintln!("standby: {n}: waiting for the lock, held by {holder}");
                            }
                            continue;
                        }
                        Ok(l) => {
                            if blocked.remove(&n) {
                                eprintln!("standby: {n}: got the lock");
                            }
                            if follow && !wanted_here && !pins.contains_key(&n) {
                                if let Ok(Some(p)) = vault.pin_lease(&n) {
                                    eprintln!(
                                        "standby: {n}: holding the VM's lease between passes"
                                    );
                                    pins.insert(n.clone(), p);
                                }
                            }
                            drop(l);
                        }
                        Err(_) => {}
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
            Ok(())
        })();
        let mut wait = every;
        match pass {
            Ok(()) => {
                passes += 1;
                if away.take().is_some() {
                    eprintln!("standby: the vault answers again; processing resumed");
                }
            }
            Err(e) if follow && (passes > 0 || away.is_some() || unreachable(&e)) => {
                let line = output::one_line(&e);
                let next = away
                    .as_ref()
                    .map(|(_, d): &(String, Duration)| (*d * 2).min(Duration::from_secs(10)))
                    .unwrap_or(Duration::from_millis(500));
                if away.as_ref().map(|(l, _)| l) != Some(&line) {
                    eprintln!("standby: {line}; retrying with backoff");
                }
                away = Some((line, next));
                wait = next;
            }
            Err(e) => return Err(e),
        }
        if !follow {
            return Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        let until = std::time::Instant::now() + wait;
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
