//! The way back over the link (two sites). After a failover the VM runs at the recovery
//! site; `reprotect --cache ADDR` is run by the vault at the site that becomes the target
//! (the one that will pull), naming the cache service at the site that becomes the
//! source, where the VM's agent then runs with `--seeded`:
//!
//! - The first reprotect, at the original site, registers the VM in that site's vault,
//!   its replica seeded locally from the images the VM ran on there (`--seed
//!   NAME=PATH`, nothing crosses the link), which become the disks a failback writes.
//! - A later reprotect, by a vault the VM failed over to (it then ran at this vault's site
//!   and, after a failback, runs at the other site again), keeps its replica and points,
//!   its direction, and continues its staging log's numbering.
//!
//! Either way the vault hashes its replica's latest state (64 KiB blocks) and leaves the
//! hashes at the cache service with the sequence number the VM's log continues at
//! ([`crate::link::seed`]); the agent's first run compares its images with them and ships
//! only the blocks that differ, through its journal, in order with the VM's writes.
//!
//! `failback` of such a VM (see `roundtrip.rs`) first refuses while the agent is connected
//! to the cache service, then fences the cache service (the source site takes no more
//! writes of the VM) and pulls everything it holds; then it writes into the original images
//! as in the embedded deployment.

use super::{catalog, placements, Progress, ProtectRequest, RemoteSource};
use super::{Vault, VmRecord, VmState};
use crate::delta::{self, ViewDisk};
use crate::error::{Error, LinkError, Result};
use crate::link::seed::{self, Seed};
use crate::link::wire::{self, DiskInfo, Msg, PeerRole};
use crate::link::{self, auth, pull};
use crate::process::Processor;
use crate::replica::{Replica, ReplicaConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a failback waits for the cache service to hand over what it holds.
const PULL_DEADLINE: Duration = Duration::from_secs(120);

/// What a two-site reprotect needs.
#[derive(Debug, Clone, Default)]
pub struct RemoteReprotectRequest {
    pub vm: String,
    /// The cache service at the site that becomes the VM's source.
    pub cache: String,
    pub insecure_loopback: bool,
    /// For a VM this vault does not know: the images it ran on at this site (seed the
    /// replica, and what a failback writes into).
    pub seed: Vec<(String, PathBuf)>,
    /// For a VM this vault does not know: its policy (default `default`).
    pub policy: Option<String>,
}

/// One disk of a two-site reprotect.
#[derive(Debug, Clone, Serialize)]
pub struct HashedDisk {
    pub name: String,
    pub size_bytes: u64,
    /// Bytes of the replica that were read to hash its blocks (holes cost nothing).
    pub compared_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RemoteReprotectReport {
    pub vm: String,
    pub cache: String,
    pub direction: super::roundtrip::Direction,
    /// The first sequence number of the VM's log in the new direction.
    pub next_seq: u64,
    pub disks: Vec<HashedDisk>,
    pub compared_bytes: u64,
    /// Bytes the new replica was seeded with from local images (first reprotect only).
    pub seeded_bytes: u64,
    /// Bytes of block hashes left at the cache service (what crossed the link).
    pub hash_bytes: u64,
}

impl Vault {
    /// Reverse a failed-over VM's direction across two sites (see the module's doc).
    pub fn reprotect_remote(
        &mut self,
        req: &RemoteReprotectRequest,
        progress: &mut dyn Progress,
    ) -> Result<RemoteReprotectReport> {
        let vm = req.vm.as_str();
        let security = self.link_security(req.insecure_loopback)?;
        link::resolve(&req.cache, &security)?;
        let known = self.catalog.vms.get(vm).cloned();
        let (rec, _lock, seeded_bytes) = match known {
            None => self.register_seeded(req, progress)?,
            Some(rec) => {
                if !req.seed.is_empty() {
                    return Err(Error::Invalid(format!(
                        "VM '{vm}' is known to this vault, which reprotects it from its replica: drop --seed"
                    )));
                }
                (self.reversible(vm, &rec)?, self.lock_vm(vm)?, 0)
            }
        };
        // Everything pulled is applied first: the seed is the replica's newest state.
        let vm_dir = self.root.join("vms").join(rec.dir_name());
        let staging = self.open_cache_at(&vm_dir, &rec)?;
        let replica = Replica::open(
            self.vfs.clone(),
            vm_dir.join("replica"),
            ReplicaConfig::default(),
        )?
        .0;
        let mut p = Processor::new(staging.clone(), replica, self.catalog.policy(&rec.policy)?)?;
        p.run_pass()?;
        let next_seq = staging.next_seq();
        let latest = p.replica().view_latest()?;
        let mut disks = Vec::new();
        let mut hashes = Vec::new();
        for (i, d) in rec.disks.iter().enumerate() {
            progress.begin(&format!("hashing {}", d.name), 0);
            let (h, read) = delta::block_hashes(&ViewDisk {
                view: &latest,
                disk: i as u16,
            })?;
            progress.end();
            hashes.push(h);
            disks.push(HashedDisk {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                compared_bytes: read,
            });
        }
        drop(latest);
        drop(p);
        staging.close()?;
        let infos: Vec<DiskInfo> = rec
            .disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        let hash_bytes = hashes.iter().map(|h| h.len() as u64 * 16).sum();
        let seed = Seed {
            next_seq,
            disks: infos,
            hashes,
        };
        seed::push(&req.cache, &security, vm, &seed)?;
        // Recorded only once the cache service holds the seed: a rerun seeds it again.
        let (addr, insecure) = (req.cache.clone(), req.insecure_loopback);
        let reversed = self.update(|c| {
            let r = match c.vms.get_mut(vm) {
                Some(r) => r,
                None => {
                    c.vms.insert(vm.to_string(), rec.clone());
                    return Ok(true);
                }
            };
            // The VM failed over here from the site it is now protected from again: the
            // direction it had before the failover (placements unchanged). The images it
            // ran on here are what a later failback at this vault writes into.
            if let Some(f) = &r.failover {
                r.other_site_disks = Some(f.disk_paths(r));
            }
            for d in r.disks.iter_mut() {
                d.source = format!("remote:{addr}");
            }
            r.remote = Some(RemoteSource {
                cache: addr.clone(),
                insecure_loopback: insecure,
            });
            r.state = VmState::Protected;
            r.failover = None;
            r.committed = false;
            r.resync_reason = None;
            Ok(r.reversed)
        })?;
        Ok(RemoteReprotectReport {
            vm: vm.to_string(),
            cache: req.cache.clone(),
            direction: super::roundtrip::Direction::of(reversed),
            next_seq,
            compared_bytes: disks.iter().map(|d| d.compared_bytes).sum(),
            disks,
            seeded_bytes,
            hash_bytes,
        })
    }

    /// A known VM a two-site reprotect can reverse: replicated over the link, failed
    /// over here (or failed back), its replica still here.
    fn reversible(&self, vm: &str, rec: &VmRecord) -> Result<VmRecord> {
        if rec.unprotected.is_some() {
            self.refuse_retired(vm, rec)?;
        }
        if rec.remote.is_none() {
            return Err(Error::Invalid(format!(
                "VM '{vm}' is protected in the embedded deployment: `standby reprotect {vm}` without --cache"
            )));
        }
        if rec.state != VmState::FailedOver || rec.failover.is_none() {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is not failed over: reprotect reverses a failover (`standby failover {vm} --point …` first)"
            )));
        }
        if rec.committed {
            return Err(Error::Conflict(format!(
                "the failover of VM '{vm}' was committed and its replica deleted: `standby unprotect {vm}`, then reprotect it with --seed NAME=PATH from its images here"
            )));
        }
        if rec.failback.is_some() {
            return Err(Error::Conflict(format!(
                "a failback of VM '{vm}' is unfinished: run `standby failback {vm}` to finish it first"
            )));
        }
        let failed_back = rec
            .failover
            .as_ref()
            .and_then(|f| f.disks.as_ref())
            .is_some()
            && rec.failover.as_ref().and_then(|f| f.disks.as_ref())
                == rec.other_site_disks.as_ref();
        if failed_back {
            return Err(Error::Conflict(format!(
                "VM '{vm}' failed back to this site and runs here: reprotect it at the vault of the site it failed back from (`standby reprotect {vm} --cache ADDR` there, naming the cache service here)"
            )));
        }
        Ok(rec.clone())
    }

    /// Register a VM this vault does not know, its replica seeded from `req.seed`.
    fn register_seeded(
        &mut self,
        req: &RemoteReprotectRequest,
        progress: &mut dyn Progress,
    ) -> Result<(VmRecord, crate::util::lock::VaultLock, u64)> {
        let vm = req.vm.as_str();
        if req.seed.is_empty() {
            return Err(Error::NotFound(format!(
                "VM '{vm}' is not in this vault: give the images it ran on at this site (--seed NAME=PATH for each disk)"
            )));
        }
        let preq = ProtectRequest {
            vm: vm.to_string(),
            policy: req.policy.clone(),
            ..Default::default()
        };
        let policy = self.check_new_vm(&preq)?;
        let mut disks = Vec::new();
        for (name, path) in &req.seed {
            crate::util::names::check_name("disk", name)?;
            if disks.iter().any(|d: &catalog::DiskRecord| &d.name == name) {
                return Err(Error::Invalid(format!("disk '{name}' is named twice")));
            }
            let len = std::fs::metadata(path)
                .map_err(|e| {
                    Error::NotFound(format!(
                        "the seed image of disk '{name}' ({}) cannot be read: {e}",
                        path.display()
                    ))
                })?
                .len();
            if len == 0 || len % 512 != 0 {
                return Err(Error::Invalid(format!(
                    "{} is not a raw image whose size is a non-zero multiple of 512 bytes",
                    path.display()
                )));
            }
            let abs = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
            disks.push(catalog::DiskRecord {
                name: name.clone(),
                source: abs.to_string_lossy().into_owned(),
                size_bytes: len,
            });
        }
        let (source, target, network_mapping) = placements(&preq)?;
        let mut rec = VmRecord {
            name: vm.to_string(),
            disks,
            policy,
            // Protected from the other site: this one is the target now.
            source: target,
            target: source,
            network_mapping,
            state: VmState::Protected,
            created_us: crate::now_us(),
            failover: None,
            committed: false,
            test_failover: None,
            resync_reason: None,
            cache_capacity_bytes: None,
            remote: Some(RemoteSource {
                cache: req.cache.clone(),
                insecure_loopback: req.insecure_loopback,
            }),
            dir: self.new_vm_dir_name(vm),
            unprotected: None,
            other_site_disks: None,
            failback: None,
            reversed: true,
        };
        let vm_dir = self.root.join("vms").join(rec.dir_name());
        let lock = self.fresh_vm_dir(&vm_dir)?;
        let seeded = self.seed(&vm_dir, &rec, progress, false)?;
        rec.other_site_disks = Some(rec.disks.iter().map(|d| d.source.clone()).collect());
        for d in rec.disks.iter_mut() {
            d.source = format!("remote:{}", req.cache);
        }
        Ok((rec, lock, seeded))
    }

    /// Before a failback of a VM replicated over the link: refuse while its agent is
    /// connected, fence the cache service (it refuses the agent from now on), and pull
    /// everything it holds into the staging log. The caller holds the VM's lock.
    pub(super) fn remote_failback_prepare(
        &self,
        vm: &str,
        rec: &VmRecord,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let Some(remote) = rec.remote.clone() else {
            return Ok(());
        };
        let security = self.link_security(remote.insecure_loopback)?;
        let staging = self.open_cache(vm)?;
        let expected: Vec<DiskInfo> = rec
            .disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        if source_state(&remote.cache, &security, vm, staging.next_seq())?.agent_connected {
            staging.close()?;
            return Err(Error::Conflict(format!(
                "the agent of VM '{vm}' is connected to the cache service at {}: stop it first (a failback refuses while the agent runs)",
                remote.cache
            )));
        }
        let reason = format!(
            "VM '{vm}' is failing back to its original site (standby failback at the vault that pulls it)"
        );
        let l = link::connect(&remote.cache, &security, PeerRole::Processor, vm)?;
        fence(l, &reason)?;
        crate::util::testhook::pause(crate::util::testhook::FAILBACK_PULL);
        progress.begin("pulling what the source site holds", 0);
        let deadline = Instant::now() + PULL_DEADLINE;
        // Until every record the cache service holds is durable here; a restarted service
        // (its fence is durable) is fenced again and tells its log's end anew.
        loop {
            let attempt = link::connect(&remote.cache, &security, PeerRole::Processor, vm)
                .and_then(|l| fence(l, &reason))
                .and_then(|end| match staging.next_seq() >= end {
                    true => Ok(true),
                    false => pull_until(&remote.cache, &security, vm, &staging, &expected, end)
                        .map(|()| false),
                });
            match attempt {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    if Instant::now() > deadline {
                        staging.close()?;
                        return Err(Error::Link(LinkError::Local(format!(
                            "the cache service at {} did not hand over what it holds of '{vm}' in {}s: {e}",
                            remote.cache,
                            PULL_DEADLINE.as_secs(),
                        ))));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        staging.sync()?;
        progress.end();
        staging.close()?;
        Ok(())
    }
}

/// Fence the VM at the cache service; returns the sequence number after its log's end
/// (every record before it is what the source site acknowledged).
fn fence(l: link::Link, reason: &str) -> Result<u64> {
    let (mut r, mut w) = (l.reader, l.writer);
    wire::write_msg(
        &mut w,
        &Msg::Fence {
            reason: reason.to_string(),
        },
    )?;
    let mut buf = Vec::new();
    match auth::expect(&mut r, &mut buf, "the cache service's answer to the fence")? {
        Msg::Ready { next_seq, .. } => Ok(next_seq),
        m => Err(auth::refuse(
            &mut w,
            LinkError::Unexpected {
                wanted: "ready",
                got: m.name(),
            },
        )),
    }
}

/// The source state the cache service reports at the start of a processor session.
fn source_state(
    addr: &str,
    security: &link::Security,
    vm: &str,
    from_seq: u64,
) -> Result<wire::SourceState> {
    let l = link::connect(addr, security, PeerRole::Processor, vm)?;
    let (mut r, mut w) = (l.reader, l.writer);
    wire::write_msg(&mut w, &Msg::OpenProcessor { from_seq })?;
    let mut buf = Vec::new();
    loop {
        match auth::expect(&mut r, &mut buf, "the source's state")? {
            Msg::SourceState(s) => {
                w.shutdown();
                return Ok(s);
            }
            Msg::Ready { .. } | Msg::Records(_) => {} // records are pulled properly later
            m => {
                return Err(auth::refuse(
                    &mut w,
                    LinkError::Unexpected {
                        wanted: "source-state",
                        got: m.name(),
                    },
                ))
            }
        }
    }
}

/// One pull session that ends once the staging log holds every record before `end`.
fn pull_until(
    addr: &str,
    security: &link::Security,
    vm: &str,
    staging: &Arc<crate::cache::Cache>,
    expected: &[DiskInfo],
    end: u64,
) -> Result<()> {
    let l = link::connect(addr, security, PeerRole::Processor, vm)?;
    let status = Arc::new(parking_lot::Mutex::new(pull::PullStatus::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let session = {
        let (staging, expected, status, stop) = (
            staging.clone(),
            expected.to_vec(),
            status.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            pull::session(&staging, l.reader, l.writer, &expected, &status, &stop)
        })
    };
    while staging.next_seq() < end && !session.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let out = session
        .join()
        .unwrap_or_else(|_| Err(Error::Link(LinkError::Local("the puller panicked".into()))));
    if staging.next_seq() >= end {
        return Ok(());
    }
    out.and(Err(Error::Link(LinkError::Closed {
        peer: "the cache service",
    })))
}
