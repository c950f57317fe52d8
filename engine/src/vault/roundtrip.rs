//! The way back (embedded deployment): `reprotect` reverses a failover's direction, and
//! `failback` is the planned return into the original site's images.
//!
//! - `reprotect`: the failed-over images become the VM's source disks; the replica (the
//!   original site's copy) stays the target. Everything the log holds is applied first;
//!   then the delta engine compares the new source images with the replica's latest state
//!   and only the blocks that differ go through the log (a resync window, in order, as the
//!   agent ships them), and a `reprotect` point is cut. Writes the old source took after
//!   the failover point are in the replica but not in the failed-over images: they are
//!   reverted by that sync and counted. When a committed failover deleted the replica, it
//!   is seeded first from the original site's images (local there, not shipped).
//! - `failback`: refused while the agent runs; everything pending is processed, the point
//!   (default `latest`) is pinned in the catalog, only the blocks of the original images
//!   that differ from it are written, in place, and made durable; then the VM is failed
//!   over in the reverse direction, and `reprotect` returns it to the original one.
//!
//! Crash safety: reprotect writes the catalog last (a rerun redoes the comparison against
//! a replica that already holds part of the sync: idempotent). Failback records the
//! pinned point before the first byte reaches the original images and clears it only
//! after the last one is durable: a stopped failback is finished by the next `failback`
//! (the agent and processing refuse the VM meanwhile), so the original images are never
//! left half-written without the vault knowing.

use super::{
    drain_into, initial_replication, DiskRecord, FailbackRecord, FailoverRecord, PointSpec,
    Progress, Vault, VmRecord, VmState,
};
use crate::agent::{Agent, SourceDisk};
use crate::cache::{Cache, CacheConfig};
use crate::delta::{self, FileImage, ViewDisk};
use crate::error::{Error, IoContext, Result};
use crate::now_us;
use crate::process::Processor;
use crate::replica::{DiskSpec, PointInfo, PointKind, Replica, ReplicaConfig, View};
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most blocks' bytes one resync step ships before the log is processed again.
const SYNC_STEP_BYTES: u64 = 32 << 20;
/// Rounds without progress after which a sync gives up (the log cannot take a block).
const MAX_STALLED_ROUNDS: u32 = 1000;

/// A changed block range to sync: `(disk, offset, len)`.
type Mark = (u16, u64, u64);

/// How one disk was synced.
#[derive(Debug, Clone, Serialize)]
pub struct SyncedDisk {
    pub name: String,
    /// The image that was compared (and, for failback, written).
    pub image: PathBuf,
    /// Bytes of the blocks that differed and were shipped (whole 64 KiB blocks).
    pub shipped_bytes: u64,
    /// Bytes hashed on either side (holes on both sides cost nothing).
    pub compared_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReprotectReport {
    pub vm: String,
    pub disks: Vec<SyncedDisk>,
    pub shipped_bytes: u64,
    pub compared_bytes: u64,
    /// Bytes (whole blocks) of writes the old source took after the failover point, which
    /// the replica held and this reprotect reverted; `None` when the replica had been
    /// deleted (committed failover) and was seeded anew.
    pub reverted_bytes: Option<u64>,
    /// Bytes the new replica was seeded with from the original site's images (only after
    /// a committed failover).
    pub seeded_bytes: u64,
    /// The point cut once the replica holds the new source disks.
    pub point: PointInfo,
    /// Which way the VM is protected now.
    pub direction: Direction,
}

/// Which way a VM is protected: from the site it was first protected at, or from the
/// site it failed over to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Original,
    Reverse,
}

impl Direction {
    pub(crate) fn of(reversed: bool) -> Direction {
        if reversed {
            Direction::Reverse
        } else {
            Direction::Original
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Original => "original",
            Direction::Reverse => "reverse",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FailbackReport {
    pub vm: String,
    /// The point written into the original images.
    pub point: PointInfo,
    pub disks: Vec<SyncedDisk>,
    pub shipped_bytes: u64,
    pub compared_bytes: u64,
    /// Whether this run finished a failback an earlier run had begun.
    pub resumed: bool,
}

impl Vault {
    /// Reverse the direction of a failed-over VM (see the module's doc).
    pub fn reprotect(&mut self, vm: &str, progress: &mut dyn Progress) -> Result<ReprotectReport> {
        let rec = self.catalog.vm(vm)?.clone();
        if rec.remote.is_some() {
            return Err(Error::Invalid(format!(
                "VM '{vm}' is replicated over the link: name the cache service at the site it failed over to (`standby reprotect {vm} --cache ADDR`)"
            )));
        }
        if rec.unprotected.is_some() {
            self.refuse_retired(vm, &rec)?;
        }
        let f = match (&rec.failover, rec.state) {
            (Some(f), VmState::FailedOver) => f.clone(),
            _ => {
                return Err(Error::Conflict(format!(
                    "VM '{vm}' is not failed over: reprotect reverses a failover (`standby failover {vm} --point …` first)"
                )))
            }
        };
        let new_sources = f.disk_paths(&rec);
        for (d, p) in rec.disks.iter().zip(&new_sources) {
            check_image(&d.name, Path::new(p), d.size_bytes, "failed-over")?;
        }
        let old_sources: Vec<String> = rec.disks.iter().map(|d| d.source.clone()).collect();
        let vm_dir = self.vm_dir(vm);
        let seed = rec.committed || !self.vfs.exists(&vm_dir.join("replica"));
        let (_lock, seeded_bytes) = if seed {
            // The replica is gone: seed a new one from the original images, at their site.
            for d in &rec.disks {
                check_image(&d.name, Path::new(&d.source), d.size_bytes, "original")?;
            }
            let lock = self.fresh_vm_dir(&vm_dir)?;
            let seeded = self.seed(&vm_dir, &rec, progress, true)?;
            (lock, seeded)
        } else {
            (self.lock_vm(vm)?, 0)
        };
        let cache = self.open_cache_at(&vm_dir, &rec)?;
        let replica = Replica::open(
            self.vfs.clone(),
            vm_dir.join("replica"),
            ReplicaConfig::default(),
        )?
        .0;
        let mut p = Processor::new(cache.clone(), replica, self.catalog.policy(&rec.policy)?)?;
        p.run_pass()?;
        let latest = p.replica().view_latest()?;
        let reverted_bytes = if seed {
            None
        } else {
            // What the replica holds beyond the failover point: the old source's writes
            // after it (from the extent maps; hashed only where they cannot tell).
            let at = match f.point_id {
                Some(id) => p.replica().view_point(id),
                None => p.replica().view_seq(f.seq),
            };
            match at {
                Ok(v) => Some(changed_between(&v, &latest, rec.disks.len())?),
                Err(_) => None, // the failover point was pruned meanwhile
            }
        };
        let images: Vec<FileImage> = rec
            .disks
            .iter()
            .zip(&new_sources)
            .map(|(d, s)| FileImage::open(Path::new(s), d.size_bytes))
            .collect::<Result<_>>()?;
        let (disks, marks) = compare_disks(&rec.disks, &images, &latest, progress, false)?;
        drop(latest);
        let sources = rec
            .disks
            .iter()
            .zip(&new_sources)
            .map(|(d, s)| SourceDisk {
                name: d.name.clone(),
                path: PathBuf::from(s),
                size_bytes: d.size_bytes,
            })
            .collect();
        // The new source images hold none of the log's records: nothing is replayed over
        // them, and the source hold starts at the log's end.
        let agent = Agent::open_with(cache.clone(), sources, false)?;
        ship(&agent, &mut p, &marks, progress)?;
        p.run_pass()?;
        // The point that shows the new source disks: cut now, unless the newest point
        // already does (nothing differed, nothing was pending).
        let point = match p.replica().latest_point() {
            Some(pt) if !p.replica().changed_since_last_point() => pt,
            _ => p.cut_point(PointKind::CrashConsistent, Some("reprotect"))?,
        };
        drop(p);
        agent.close()?;
        cache.close()?;
        self.update(|c| {
            let r = c.vm_mut(vm)?;
            for (d, s) in r.disks.iter_mut().zip(&new_sources) {
                d.source = s.clone();
            }
            r.other_site_disks = Some(old_sources.clone());
            std::mem::swap(&mut r.source, &mut r.target);
            r.network_mapping = r
                .network_mapping
                .iter()
                .map(|(a, b)| (b.clone(), a.clone()))
                .collect();
            r.state = VmState::Protected;
            r.failover = None;
            r.committed = false;
            r.resync_reason = None;
            r.reversed = !r.reversed;
            Ok(())
        })?;
        Ok(ReprotectReport {
            vm: vm.to_string(),
            direction: Direction::of(!rec.reversed),
            shipped_bytes: disks.iter().map(|d| d.shipped_bytes).sum(),
            compared_bytes: disks.iter().map(|d| d.compared_bytes).sum(),
            disks,
            reverted_bytes,
            seeded_bytes,
            point,
        })
    }

    /// The planned return: write `spec`'s point into the original site's images (see the
    /// module's doc). A failback that was stopped is finished, whatever `spec` says.
    pub fn failback(
        &mut self,
        vm: &str,
        spec: PointSpec,
        progress: &mut dyn Progress,
    ) -> Result<FailbackReport> {
        let rec = self.live_vm(vm)?.clone();
        if rec.unprotected.is_some() {
            self.refuse_retired(vm, &rec)?;
        }
        let Some(others) = rec.other_site_disks.clone() else {
            return Err(Error::Conflict(format!(
                "VM '{vm}' has no original disks to fail back to: a failback follows a failover and a reprotect (`standby reprotect {vm}`)"
            )));
        };
        if rec.state == VmState::FailedOver && rec.failback.is_none() {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is failed over already; `standby reprotect {vm}` protects it in the other direction"
            )));
        }
        if rec.test_failover.is_some() && rec.failback.is_none() {
            return Err(Error::Conflict(format!(
                "a test failover of VM '{vm}' is up; run `standby test-failover-cleanup {vm}` first"
            )));
        }
        for (d, p) in rec.disks.iter().zip(&others) {
            check_image(&d.name, Path::new(p), d.size_bytes, "original")?;
        }
        // Never while the VM runs: its writes would race the return. (Over the link the
        // lock is the follower's, which lets go; the agent is at the other site, see
        // `remote_failback_prepare`.)
        let _lock = match rec.remote.is_some() {
            true => Ok(self.lock_vm(vm)?),
            false => super::lock::acquire(&self.vm_dir(vm), &self.who, super::LockWait::Fail),
        };
        let _lock = match _lock {
            Err(Error::Locked(holder)) => {
                return Err(Error::Conflict(format!(
                    "VM '{vm}' is in use by {holder}: stop its agent first (a failback refuses while the agent runs)"
                )))
            }
            other => other?,
        };
        let resumed = rec.failback.is_some();
        let (view, point) = match &rec.failback {
            Some(fb) => {
                let replica = self.open_replica(vm)?;
                let view = replica.view_point(fb.point_id).map_err(|e| {
                    Error::Conflict(format!(
                        "the failback of VM '{vm}' to point {} cannot be finished: {e}",
                        fb.point_id
                    ))
                })?;
                let point = view.point().cloned().ok_or_else(|| {
                    Error::NotFound(format!("recovery point {} does not exist", fb.point_id))
                })?;
                (view, point)
            }
            None => {
                if rec.remote.is_some() {
                    // The source site stops taking the VM's writes, and all it took is
                    // pulled here.
                    self.remote_failback_prepare(vm, &rec, progress)?;
                }
                // Everything pending first (`latest` then cuts a point at its end).
                {
                    let cache = self.open_cache(vm)?;
                    let mut p =
                        Processor::new(cache.clone(), self.open_replica(vm)?, self.vm_policy(vm)?)?;
                    p.run_pass()?;
                    drop(p);
                    cache.close()?;
                }
                let (view, point) = self.resolve_point(vm, &rec, spec)?;
                let point = point.ok_or_else(|| {
                    Error::Invalid(format!(
                        "a failback writes a recovery point; seq {} is not one (pick a point id, a name or latest)",
                        view.seq()
                    ))
                })?;
                // Pinned before the first byte reaches the original images.
                let fb = FailbackRecord {
                    point_id: point.id,
                    seq: point.seq,
                    time_us: now_us(),
                };
                self.update(|c| {
                    c.vm_mut(vm)?.failback = Some(fb);
                    Ok(())
                })?;
                (view, point)
            }
        };
        let images: Vec<FileImage> = rec
            .disks
            .iter()
            .zip(&others)
            .map(|(d, s)| FileImage::open(Path::new(s), d.size_bytes))
            .collect::<Result<_>>()?;
        let (disks, marks) = compare_disks(&rec.disks, &images, &view, progress, true)?;
        // Write the differing blocks of the point into the original images, in place.
        let mut buf = Vec::new();
        for (i, path) in others.iter().enumerate() {
            let path = Path::new(path);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .at(path)?;
            for &(_, off, len) in marks.iter().filter(|m| m.0 as usize == i) {
                buf.resize(len as usize, 0);
                view.read(i as u16, off, &mut buf)?;
                f.write_all_at(&buf, off).at(path)?;
                progress.advance(len);
                crate::util::testhook::pause(crate::util::testhook::FAILBACK_WRITE);
            }
            f.sync_data().at(path)?;
        }
        progress.end();
        let dir = Path::new(&others[0])
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let frec = FailoverRecord {
            point_id: Some(point.id),
            seq: point.seq,
            dir,
            network: rec.target.network.clone(),
            time_us: now_us(),
            disks: Some(others.clone()),
            // Over the link the source site was fenced before the first byte was written.
            fenced_us: rec.remote.as_ref().map(|_| now_us()),
        };
        self.update(|c| {
            let r = c.vm_mut(vm)?;
            r.failback = None;
            r.failover = Some(frec);
            r.state = VmState::FailedOver;
            Ok(())
        })?;
        Ok(FailbackReport {
            vm: vm.to_string(),
            point,
            shipped_bytes: disks.iter().map(|d| d.shipped_bytes).sum(),
            compared_bytes: disks.iter().map(|d| d.compared_bytes).sum(),
            disks,
            resumed,
        })
    }

    /// A VM's log under `vm_dir` (whatever the record's state).
    pub(super) fn open_cache_at(&self, vm_dir: &Path, rec: &VmRecord) -> Result<Arc<Cache>> {
        let config = CacheConfig::write_path(rec.cache_capacity_bytes);
        let (cache, _) = Cache::open_with(self.vfs.clone(), vm_dir.join("cache"), config)?;
        Ok(Arc::new(cache))
    }

    /// A new replica and log in `vm_dir` (empty, locked), holding the images of
    /// `rec.disks` as they are: protect's initial copy, without a point. Returns the bytes
    /// copied.
    /// `source_hold`: the log is the write-ahead log of source images here (embedded),
    /// so it keeps what they may need; a staging log pulled over the link has no hold.
    pub(super) fn seed(
        &self,
        vm_dir: &Path,
        rec: &VmRecord,
        progress: &mut dyn Progress,
        source_hold: bool,
    ) -> Result<u64> {
        let specs: Vec<DiskSpec> = rec
            .disks
            .iter()
            .map(|d| DiskSpec {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        let mut replica = Replica::create(
            self.vfs.clone(),
            vm_dir.join("replica"),
            &specs,
            ReplicaConfig::default(),
        )?;
        let cache = self.open_cache_at(vm_dir, rec)?;
        let (shipped, _) = initial_replication(&cache, &mut replica, &rec.disks, progress)?;
        let durable = cache.sync()?;
        if source_hold {
            cache.set_source_seq(durable)?;
        }
        drain_into(&cache, &mut replica)?;
        let applied = replica.flush()?;
        cache.set_checkpoint(applied.min(cache.durable_seq()))?;
        drop(replica);
        cache.close()?;
        Ok(shipped)
    }
}

/// An image the way back needs: there, and of the disk's size.
pub(super) fn check_image(disk: &str, path: &Path, size: u64, what: &str) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| {
            Error::NotFound(format!(
                "the {what} image of disk '{disk}' ({}) cannot be read: {e}",
                path.display()
            ))
        })?
        .len();
    if len != size {
        return Err(Error::Invalid(format!(
            "the {what} image of disk '{disk}' ({}) is {len} bytes, the vault expects {size}",
            path.display()
        )));
    }
    Ok(())
}

/// Compare every disk of `view` with its image: per-disk figures and the changed blocks
/// `(disk, offset, len)`. `view_first`: the view is the side that is read from.
pub(super) fn compare_disks(
    disks: &[DiskRecord],
    images: &[FileImage],
    view: &View,
    progress: &mut dyn Progress,
    view_first: bool,
) -> Result<(Vec<SyncedDisk>, Vec<Mark>)> {
    let mut out = Vec::new();
    let mut marks = Vec::new();
    for (i, (d, image)) in disks.iter().zip(images).enumerate() {
        progress.begin(&format!("comparing {}", d.name), 0);
        let side = ViewDisk {
            view,
            disk: i as u16,
        };
        let delta = if view_first {
            delta::compare(&side, image)?
        } else {
            delta::compare(image, &side)?
        };
        progress.end();
        marks.extend(delta.changed.iter().map(|&(o, l)| (i as u16, o, l)));
        out.push(SyncedDisk {
            name: d.name.clone(),
            image: image.path().to_path_buf(),
            shipped_bytes: delta.changed_bytes(),
            compared_bytes: delta.compared_bytes,
        });
    }
    Ok((out, marks))
}

/// Bytes of the blocks where two views of one replica differ, over all disks.
fn changed_between(a: &View, b: &View, disks: usize) -> Result<u64> {
    let mut total = 0;
    for i in 0..disks as u16 {
        let maybe = a.maybe_different(b, i)?;
        total += delta::compare_within(
            &ViewDisk { view: a, disk: i },
            &ViewDisk { view: b, disk: i },
            Some(&maybe),
        )?
        .changed_bytes();
    }
    Ok(total)
}

/// Ship the `marks` blocks of the agent's source images through the log (a resync
/// window), processing the log as it fills, until all are applied.
fn ship(
    agent: &Agent,
    p: &mut Processor,
    marks: &[Mark],
    progress: &mut dyn Progress,
) -> Result<()> {
    agent.require_resync_of(marks)?;
    progress.begin("shipping", marks.iter().map(|m| m.2).sum());
    let mut stalled = 0u32;
    let mut last = agent.resync_pending();
    let mut shipped = agent.resync_shipped_bytes();
    loop {
        let done = agent.resync_step(SYNC_STEP_BYTES)?;
        agent.drain(true)?;
        p.run_pass()?;
        let now_shipped = agent.resync_shipped_bytes();
        progress.advance(now_shipped - shipped);
        shipped = now_shipped;
        if done {
            progress.end();
            return Ok(());
        }
        let now = agent.resync_pending();
        if now == last {
            stalled += 1;
            if stalled >= MAX_STALLED_ROUNDS {
                return Err(Error::Conflict(
                    "the change log cannot take the blocks to sync (is its capacity too small?)"
                        .into(),
                ));
            }
        } else {
            stalled = 0;
            last = now;
        }
    }
}
