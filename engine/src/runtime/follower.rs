//! The target's follower of a remote VM (`standby process --follow`): pulls the VM's
//! records from its cache service into the vault's staging log and processes them,
//! reconnecting with backoff. While connected it owns the VM: it holds the VM's lock and
//! answers control requests (points, status, verify, test failover, mount, crash points)
//! from its live processor, so those never make it drop the link. It lets go of the VM
//! only for a command that needs it exclusively (failover), then resumes.

use super::control::ControlServer;
use super::owner::VmOwner;
use super::{Event, Events};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::link;
use crate::link::pull::{self, PullStatus};
use crate::link::wire::{DiskInfo, PeerRole};
use crate::process::{PassReport, Processor};
use crate::util::lock;
use crate::vault::remote::{write_status_file, Log};
use crate::vault::{Vault, VmState};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pull and process one remote VM until `stop` is set. Returns early only if the VM stops
/// being replicated (failed over, committed, unprotected). Beside it, if the VM is the
/// first member of a consistency group with a policy, cut the group's policy points (the
/// embedded agent does this for a local first member).
pub fn follow(
    root: &Path,
    who: &str,
    vm: &str,
    every: Duration,
    stop: &AtomicBool,
    events: Events,
) -> Result<()> {
    let quit = AtomicBool::new(false);
    std::thread::scope(|s| {
        let group = std::thread::Builder::new()
            .name("standby-group".into())
            .spawn_scoped(s, || {
                super::group::policy_loop(root, who, vm, &quit, stop, &events)
            })
            .map_err(|e| Error::io("group thread", e))?;
        let followed = follow_vm(root, who, vm, every, stop, events.clone());
        quit.store(true, Ordering::SeqCst);
        let grouped = group
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the group thread panicked".into())));
        followed.and(grouped)
    })
}

fn follow_vm(
    root: &Path,
    who: &str,
    vm: &str,
    every: Duration,
    stop: &AtomicBool,
    events: Events,
) -> Result<()> {
    let log: Log = {
        let events = events.clone();
        Arc::new(move |line: &str| events(Event::Notice(line.to_string())))
    };
    let status = Arc::new(Mutex::new(PullStatus::default()));
    let mut backoff = Duration::from_millis(200);
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        let vault = Vault::open(root, who, lock::LockWait::Block)?;
        let rec = match vault.catalog().vm(vm) {
            Ok(r) => r.clone(),
            Err(_) => return Ok(()),
        };
        let Some(remote) = rec.remote.clone() else {
            return Err(Error::Invalid(format!("VM '{vm}' is not a remote VM")));
        };
        if rec.committed || rec.state == VmState::FailedOver {
            // The split-brain guard: the source site's cache service must refuse the old
            // source's writes from now on. Told until it has it (or we are stopped).
            let reason = crate::vault::split_brain_reason(vm, &rec);
            let told = (|| -> Result<()> {
                let security = vault.link_security(remote.insecure_loopback)?;
                let l = link::connect(&remote.cache, &security, PeerRole::Processor, vm)?;
                crate::link::pull::fence(l.reader, l.writer, &reason)
            })();
            match told.and_then(|()| Vault::open(root, who, lock::LockWait::Block)?.set_fenced(vm))
            {
                Ok(()) => {
                    log(&format!(
                        "{vm}: failed over; the cache service at {} now refuses the old source's writes; no longer pulled",
                        remote.cache
                    ));
                    return Ok(());
                }
                Err(e) => {
                    let msg = format!("{vm}: failed over; telling the cache service: {e}");
                    if last_error.as_deref() != Some(&msg) {
                        log(&msg);
                        last_error = Some(msg);
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        if rec.unprotected.is_some() {
            log(&format!("{vm}: unprotected; no longer pulled"));
            return Ok(());
        }
        if rec.failback.is_some() {
            log(&format!(
                "{vm}: a failback is under way (`standby failback {vm}` finishes it); no longer pulled"
            ));
            return Ok(());
        }
        let expected: Vec<DiskInfo> = rec
            .disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        let attempt = (|| -> Result<bool> {
            let security = vault.link_security(remote.insecure_loopback)?;
            let l = link::connect(&remote.cache, &security, PeerRole::Processor, vm)?;
            // Connected: now own the VM (waiting for whoever has it).
            let vm_dir = vault.vm_dir(vm);
            let _lock = vault.acquire_dir(&vm_dir, lock::LockWait::Block)?;
            // The VM may have failed over while we waited for it (a failover holds its
            // lock): look again before pulling anything more into it.
            let now = Vault::open(root, who, lock::LockWait::Block)?;
            let ended = now.catalog().vm(vm).map_or(true, |r| {
                r.committed
                    || r.state == VmState::FailedOver
                    || r.unprotected.is_some()
                    || r.failback.is_some()
            });
            if ended {
                return Ok(false);
            }
            let staging = vault.open_cache(vm)?;
            let processor = Processor::new(
                staging.clone(),
                vault.open_replica(vm)?,
                vault.vm_policy(vm)?,
            )?
            .counting_into(crate::util::latency::replicated_bytes(vm));
            let processor = Arc::new(Mutex::new(processor));
            // While connected, this process owns the VM: commands go through it.
            let control = ControlServer::start(
                &vault.agent_socket(vm),
                vm,
                Arc::new(VmOwner {
                    root: root.to_path_buf(),
                    who: who.to_string(),
                    vm: vm.to_string(),
                    processor: processor.clone(),
                    agent: None,
                    events: events.clone(),
                    processing_failure: Default::default(),
                }),
            )?;
            let result = run_connected(
                &vault, vm, &vm_dir, &staging, &processor, l, &expected, &status, stop, every, &log,
            );
            drop(control);
            staging.close()?;
            result
        })();
        match attempt {
            Ok(yielded) => {
                backoff = Duration::from_millis(200);
                if yielded {
                    // Someone waits for the VM: give them time to take the lock.
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    log(&format!("{vm}: {msg}"));
                    last_error = Some(msg.clone());
                }
                {
                    let mut st = status.lock();
                    st.connected = false;
                    st.last_error = Some(msg);
                }
                let _ = write_status_file(&vault, vm, None, &status.lock());
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    Ok(())
}

/// Run a connected session: pull on one thread, process here every `every`, publish the
/// status every second. Returns `Ok(true)` if it let go because another command wants the
/// VM, `Ok(false)` if `stop` was set.
#[allow(clippy::too_many_arguments)]
fn run_connected(
    vault: &Vault,
    vm: &str,
    vm_dir: &Path,
    staging: &Arc<Cache>,
    processor: &Mutex<Processor>,
    l: link::Link,
    expected: &[DiskInfo],
    status: &Arc<Mutex<PullStatus>>,
    stop: &AtomicBool,
    every: Duration,
    log: &Log,
) -> Result<bool> {
    let session_stop = Arc::new(AtomicBool::new(false));
    let puller = {
        let (staging, status, session_stop, expected) = (
            staging.clone(),
            status.clone(),
            session_stop.clone(),
            expected.to_vec(),
        );
        let (r, w) = (l.reader, l.writer);
        std::thread::spawn(move || pull::session(&staging, r, w, &expected, &status, &session_stop))
    };
    log(&format!("{vm}: pulling from the cache service"));
    let mut last_pass = Instant::now() - every;
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut yielded = false;
    let mut failure = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if Vault::lock_wanted(vm_dir) {
            yielded = true;
            break;
        }
        if puller.is_finished() {
            break;
        }
        if last_pass.elapsed() >= every {
            last_pass = Instant::now();
            let pass = processor.lock().run_pass();
            match pass {
                Ok(r) => report_pass(vm, &r, log),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            let st = vault.status_of(vm, staging, processor.lock().replica());
            let _ = write_status_file(vault, vm, st.ok(), &status.lock());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    session_stop.store(true, Ordering::SeqCst);
    let pulled = puller.join().unwrap_or_else(|_| {
        Err(Error::Link(crate::error::LinkError::Local(
            "the puller panicked".into(),
        )))
    });
    // Whatever arrived is processed before the VM changes hands.
    let mut p = processor.lock();
    let pass = p.run_pass();
    if let Ok(r) = &pass {
        report_pass(vm, r, log);
    }
    let st = vault.status_of(vm, staging, p.replica());
    drop(p);
    let _ = write_status_file(vault, vm, st.ok(), &status.lock());
    if let Some(e) = failure {
        return Err(e);
    }
    pass?;
    if stop.load(Ordering::SeqCst) || yielded {
        return Ok(yielded);
    }
    pulled.map(|()| false)
}

fn report_pass(vm: &str, r: &PassReport, log: &Log) {
    if !r.points.is_empty() || !r.prune.pruned_points.is_empty() {
        log(&format!(
            "{vm}: applied {} records, {} new point(s), {} pruned, durable to seq {}",
            r.applied,
            r.points.len(),
            r.prune.pruned_points.len(),
            r.durable_seq
        ));
    }
}
