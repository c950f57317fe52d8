//! A protected VM's disks over its life: `disk add` (a new disk joins the VM's consistency:
//! its initial copy goes through the VM's change log, one seq across all disks) and
//! `disk resize` (a disk grows; no resync).
//!
//! Invariant: every state of the VM has the disks it had then, each at its size then. The
//! replica's manifest keeps each disk's history (`replica::manifest`, DISK_HISTORY): a new
//! disk is in no state until its whole initial copy is applied, and then in every state
//! from the seq of the point cut at its end; a grown disk has its new size from the first
//! seq after everything the log holds (every earlier record fits the old size). Older
//! points therefore fail over, mount, diff and verify with the disks and sizes they had.
//!
//! Crash safety: the replica is changed first and the catalog last. A `disk add`
//! interrupted before its catalog write leaves a disk beyond the catalog's in the replica
//! (in no state, or published in states no catalog listed it for): the next `disk add` takes
//! it over, zeroes it and copies again; meanwhile the agent skips its records when it
//! replays the log. A `disk resize` interrupted between the two is finished by running it
//! again (the replica's part is then a no-op).
//!
//! `disk resize` needs the VM to itself (a running agent serves the sizes it opened with);
//! `disk add` is done by the VM's running embedded agent when there is one
//! ([`Vault::disk_add_live`]): the copy goes into the log beside the VM's writes (tracked
//! by the tap like a marker, so its drain stays gapless), the disk is published once its
//! copy is applied, and the agent serves it after a restart.

use super::{create_sparse_image, drain_into, DiskRecord, DiskSource, Progress, Vault, VmState};
use crate::agent::{Agent, SourceDisk};
use crate::error::{Error, IoContext, Result};
use crate::process::Processor;
use crate::record::{Consistency, Entry, Marker, MarkerKind};
use crate::replica::manifest::PENDING_SEQ;
use crate::replica::{DiskSpec, PointInfo, PointKind, MAX_DISK_BYTES};
use crate::runtime::EMBEDDED_SOURCE_AHEAD as SOURCE_AHEAD;
use crate::util::names::check_name;
use parking_lot::Mutex;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The name of the point `disk add` cuts once the new disk is in the replica.
pub const DISK_ADD_POINT: &str = "disk-add";
/// The name of the point `disk resize` cuts: the first state with the new size.
pub const DISK_RESIZE_POINT: &str = "disk-resize";

/// What `disk add` did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskAddReport {
    pub vm: String,
    pub disk: String,
    pub source: PathBuf,
    /// Whether the image was created (`NAME=new:SIZE`).
    pub created: bool,
    pub size_bytes: u64,
    /// Bytes of the new disk read and shipped (holes and zero runs skipped).
    pub shipped_bytes: u64,
    pub scanned_bytes: u64,
    /// The point cut once the disk was in: it and every later state have the disk, every
    /// older one does not.
    pub point: PointInfo,
    /// The seq from which states have the disk (the point's).
    pub from_seq: u64,
}

/// What `disk resize` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskResizeReport {
    pub vm: String,
    pub disk: String,
    pub old_size_bytes: u64,
    pub size_bytes: u64,
    /// States from this seq on have the new size; older ones keep theirs.
    pub from_seq: u64,
    /// Whether the source image was grown here (it was smaller than the new size).
    pub source_grown: bool,
    /// The disk had that size already: nothing changed.
    pub unchanged: bool,
    /// The point cut at the resize (`disk-resize`): the first with the new size.
    pub point: Option<PointInfo>,
}

/// One change of a VM's disk set, for listing beside its points.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskChange {
    pub disk: String,
    /// States from this seq on see the change.
    pub seq: u64,
    /// `added` or `grown`.
    pub change: &'static str,
    /// The size before (a grown disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_size_bytes: Option<u64>,
    pub size_bytes: u64,
}

impl Vault {
    /// Add disk `name` to `vm`: a raw image (`Existing`) or a new sparse one, replicated
    /// through the VM's change log, then a point named `disk-add` that has it. The VM's
    /// agent must not run (see [`Vault::disk_add_live`] for the one that does).
    pub fn disk_add(
        &mut self,
        vm: &str,
        name: &str,
        src: &DiskSource,
        progress: &mut dyn Progress,
    ) -> Result<DiskAddReport> {
        let plan = self.plan_add(vm, name, src)?;
        let rec = self.catalog.vm(vm)?.clone();
        let lock = self.take_vm(vm, "disk add")?;
        // Source images that may hold writes the log lacks (an agent killed while it
        // tracked writes in its bitmap) must not have the log replayed over them: the
        // agent resyncs them by delta when it starts.
        let ahead = crate::runtime::flag::slot::get(&*self.vfs, &self.vm_dir(vm), SOURCE_AHEAD)?;
        if ahead || rec.state == VmState::ResyncRequired {
            return Err(Error::Conflict(format!(
                "VM '{vm}' needs a resync first: start its agent (`standby agent {vm}`) and let it resync, then add the disk"
            )));
        }
        plan.create_image()?;
        let done = (|| -> Result<DiskAddReport> {
            // Bring the source images up to the log first (an agent killed -9 left them
            // behind it): then they hold everything before the copy, and the copy's records
            // came from the new image, so the source hold can cover the copy too.
            let cache = self.open_cache(vm)?;
            drop(Agent::open(cache.clone(), source_disks(&rec.disks))?);
            let mut replica = self.open_replica(vm)?;
            drain_into(&cache, &mut replica)?;
            let takeover = replica.add_disk(plan.index, plan.spec())?;
            let mut append = |e: &Entry<'_>| -> Result<u64> {
                match cache.append(e) {
                    Err(Error::CacheFull { .. }) => {
                        // A capacity-limited log: apply what it holds, then go on.
                        drain_into(&cache, &mut replica)?;
                        cache.append(e)
                    }
                    other => other,
                }
            };
            let (shipped, scanned) = copy_disk(&plan, takeover, &mut append, progress)?;
            append(&Entry::Marker(&disk_add_marker()))?;
            let durable = cache.sync()?;
            cache.set_source_seq(durable)?;
            drain_into(&cache, &mut replica)?;
            let from_seq = replica.applied_seq();
            replica.publish_disk(plan.index, from_seq)?;
            let point = replica.cut_point(PointKind::CrashConsistent, Some(DISK_ADD_POINT))?;
            let applied = replica.flush()?;
            cache.set_checkpoint(applied.min(cache.durable_seq()))?;
            drop(replica);
            cache.close()?;
            self.finish_add(vm, &plan, shipped, scanned, point, from_seq)
        })();
        drop(lock);
        plan.undo_if(done.is_err());
        done
    }

    /// [`Vault::disk_add`] by the VM's running embedded agent (its tap and processor): the
    /// copy goes into the log beside the VM's writes, which go on meanwhile; the agent
    /// serves the new disk once restarted.
    pub fn disk_add_live(
        &mut self,
        vm: &str,
        name: &str,
        src: &DiskSource,
        agent: &Agent,
        processor: &Mutex<Processor>,
        progress: &mut dyn Progress,
    ) -> Result<DiskAddReport> {
        let plan = self.plan_add(vm, name, src)?;
        if agent.resync_pending().is_some() {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is resyncing (its writes are tracked in the dirty bitmap): add the disk once that has ended"
            )));
        }
        plan.create_image()?;
        let done = (|| -> Result<DiskAddReport> {
            let takeover = processor
                .lock()
                .replica_mut()
                .add_disk(plan.index, plan.spec())?;
            let mut append = |e: &Entry<'_>| -> Result<u64> {
                match agent.append_beside(e) {
                    Err(Error::CacheFull { .. }) => {
                        // A capacity-limited log: let processing trim it, then go on.
                        agent.make_durable()?;
                        processor.lock().run_pass()?;
                        agent.append_beside(e)
                    }
                    other => other,
                }
            };
            let (shipped, scanned) = copy_disk(&plan, takeover, &mut append, progress)?;
            // The copy applied, the disk is in every state from the next record on; the
            // marker's point (cut by processing, as for any marker) is the first with it.
            agent.make_durable()?;
            let last = agent.cache().durable_seq();
            let from_seq = {
                let mut p = processor.lock();
                p.run_pass()?;
                if p.replica().applied_seq() < last {
                    return Err(Error::Conflict(format!(
                        "processing did not reach seq {last} (at {}): the disk is not published; run `standby disk add` again",
                        p.replica().applied_seq()
                    )));
                }
                let from = agent.cache().next_seq();
                p.replica_mut().publish_disk(plan.index, from)?;
                p.replica_mut().flush()?;
                from
            };
            let seq = agent.marker(&disk_add_marker())?;
            let mut p = processor.lock();
            let report = p.run_pass()?;
            let point = report
                .points
                .into_iter()
                .find(|pt| pt.seq == seq)
                .or_else(|| p.replica().points().into_iter().find(|pt| pt.seq == seq))
                .ok_or_else(|| {
                    Error::Conflict(format!("the disk-add marker at seq {seq} cut no point"))
                })?;
            drop(p);
            self.finish_add(vm, &plan, shipped, scanned, point, from_seq)
        })();
        plan.undo_if(done.is_err());
        done
    }

    /// Everything `disk add` checks before it changes anything.
    fn plan_add(&self, vm: &str, name: &str, src: &DiskSource) -> Result<AddPlan> {
        check_name("disk", name)?;
        let rec = self.changeable_vm(vm)?.clone();
        if rec.disks.iter().any(|d| d.name == name) {
            return Err(Error::Conflict(format!(
                "VM '{vm}' already has a disk '{name}' (`standby disk resize {vm} {name} SIZE` grows it)"
            )));
        }
        let (path, size, create) = match src {
            DiskSource::Existing(p) => {
                let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
                if !meta.is_file() {
                    return Err(Error::Invalid(format!(
                        "source disk {} is not a raw image file",
                        p.display()
                    )));
                }
                (p.clone(), meta.len(), false)
            }
            DiskSource::New(p, size) => {
                if p.exists() {
                    return Err(Error::Conflict(format!(
                        "{} already exists; new:SIZE creates a new image",
                        p.display()
                    )));
                }
                (p.clone(), *size, true)
            }
            DiskSource::NewInVault(size) => {
                let p = self.new_disk_path(vm, name);
                if p.exists() {
                    return Err(Error::Conflict(format!(
                        "{} already exists; remove it, or use {name}=PATH for an existing image",
                        p.display()
                    )));
                }
                (p, *size, true)
            }
        };
        check_size(name, size)?;
        let path = std::path::absolute(&path).map_err(|e| Error::io(&path, e))?;
        let new = DiskRecord {
            name: name.to_string(),
            source: path.to_string_lossy().into_owned(),
            size_bytes: size,
        };
        // Against every VM's disks, this one's included.
        self.check_sources_unused(std::slice::from_ref(&new))?;
        let index = u16::try_from(rec.disks.len())
            .map_err(|_| Error::Invalid(format!("VM '{vm}' has too many disks")))?;
        Ok(AddPlan {
            new,
            path,
            create,
            index,
        })
    }

    /// The catalog names the disk: the add is done.
    fn finish_add(
        &mut self,
        vm: &str,
        plan: &AddPlan,
        shipped: u64,
        scanned: u64,
        point: PointInfo,
        from_seq: u64,
    ) -> Result<DiskAddReport> {
        self.update(|c| {
            let r = c.vm_mut(vm)?;
            if r.disks.len() != plan.index as usize {
                return Err(Error::Conflict(format!(
                    "the disks of VM '{vm}' changed meanwhile"
                )));
            }
            r.disks.push(plan.new.clone());
            Ok(())
        })?;
        Ok(DiskAddReport {
            vm: vm.to_string(),
            disk: plan.new.name.clone(),
            source: plan.path.clone(),
            created: plan.create,
            size_bytes: plan.new.size_bytes,
            shipped_bytes: shipped,
            scanned_bytes: scanned,
            point,
            from_seq,
        })
    }

    /// Grow disk `name` of `vm` to `size_bytes` (shrinking is refused). The source image
    /// is grown to it when smaller (never shrunk: a larger one is refused); states from now
    /// on have the new size, older points keep theirs. Nothing is copied.
    pub fn disk_resize(
        &mut self,
        vm: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<DiskResizeReport> {
        let rec = self.changeable_vm(vm)?.clone();
        let (index, disk) = rec
            .disks
            .iter()
            .enumerate()
            .find(|(_, d)| d.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = rec.disks.iter().map(|d| d.name.as_str()).collect();
                Error::NotFound(format!(
                    "VM '{vm}' has no disk '{name}' (its disks: {})",
                    names.join(", ")
                ))
            })?;
        check_size(name, size_bytes)?;
        if size_bytes < disk.size_bytes {
            return Err(Error::Invalid(format!(
                "disk '{name}' of VM '{vm}' is {} bytes: shrinking it to {size_bytes} is refused (a disk only grows)",
                disk.size_bytes
            )));
        }
        let index = index as u16;
        let source = PathBuf::from(&disk.source);
        let lock = self.take_vm(vm, "disk resize")?;
        let len = std::fs::metadata(&source)
            .map_err(|e| Error::io(&source, e))?
            .len();
        if len > size_bytes {
            return Err(Error::Invalid(format!(
                "the source image of disk '{name}' ({}) is {len} bytes, more than {size_bytes}: resize to at least its size",
                source.display()
            )));
        }
        let cache = self.open_cache(vm)?;
        let mut replica = self.open_replica(vm)?;
        let old = replica
            .disks()
            .get(index as usize)
            .map_or(disk.size_bytes, |d| d.size_bytes);
        if len < size_bytes {
            grow_image(&source, size_bytes)?;
        }
        let mut from_seq = cache.next_seq();
        let mut point = None;
        if old != size_bytes {
            // The new size holds from the next record on: a point there (so `latest`, and
            // every later state, has it at once; every record before fits the old size).
            replica.grow_disk(index, size_bytes, from_seq)?;
            let marker = Marker {
                consistency: Consistency::Crash,
                name: Some(DISK_RESIZE_POINT.into()),
                group: None,
                kind: MarkerKind::Point,
            };
            if let Err(Error::CacheFull { .. }) = cache.append(&Entry::Marker(&marker)) {
                drain_into(&cache, &mut replica)?;
                cache.append(&Entry::Marker(&marker))?;
            }
            drain_into(&cache, &mut replica)?;
            point = Some(replica.cut_point(PointKind::CrashConsistent, Some(DISK_RESIZE_POINT))?);
            let applied = replica.flush()?;
            cache.set_checkpoint(applied.min(cache.durable_seq()))?;
        } else if let Some(p) = replica.disk_grown_at(index) {
            from_seq = p; // an earlier resize that stopped before the catalog write
        }
        replica.close()?;
        cache.close()?;
        let unchanged = old == size_bytes && disk.size_bytes == size_bytes;
        if !unchanged {
            self.update(|c| {
                let d = c
                    .vm_mut(vm)?
                    .disks
                    .get_mut(index as usize)
                    .filter(|d| d.name == name)
                    .ok_or_else(|| {
                        Error::Conflict(format!("the disks of VM '{vm}' changed meanwhile"))
                    })?;
                d.size_bytes = size_bytes;
                Ok(())
            })?;
        }
        drop(lock);
        Ok(DiskResizeReport {
            vm: vm.to_string(),
            disk: name.to_string(),
            old_size_bytes: disk.size_bytes,
            size_bytes,
            from_seq,
            source_grown: len < size_bytes,
            unchanged,
            point,
        })
    }

    /// Every disk added or grown after protect, in seq order (read from the replica's
    /// manifest; no lock, so a running agent is not disturbed).
    pub fn disk_changes(&self, vm: &str) -> Result<Vec<DiskChange>> {
        let rec = self.catalog.vm(vm)?;
        let dir = self.vm_dir(vm).join("replica");
        if rec.committed || !self.vfs.exists(&dir) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (d, history) in crate::replica::Replica::read_disk_history(&*self.vfs, &dir)? {
            let mut before: Option<u64> = None;
            for e in history {
                if e.from_seq == PENDING_SEQ {
                    break;
                }
                if before.is_some() || e.from_seq > 0 {
                    out.push(DiskChange {
                        disk: d.name.clone(),
                        seq: e.from_seq,
                        change: if before.is_some() { "grown" } else { "added" },
                        old_size_bytes: before,
                        size_bytes: e.size_bytes,
                    });
                }
                before = Some(e.size_bytes);
            }
        }
        out.sort_by_key(|c| c.seq);
        Ok(out)
    }

    /// A VM whose disks may change: local, replicating, in its original set of disks.
    fn changeable_vm(&self, vm: &str) -> Result<&super::VmRecord> {
        let rec = self.catalog.vm(vm)?;
        self.refuse_retired(vm, rec)?;
        if let Some(r) = &rec.remote {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is replicated from a remote site (the cache service at {}): its disks are the ones its agent declares there; disk add and resize are not supported for it yet",
                r.cache
            )));
        }
        if rec.state == VmState::FailedOver {
            return Err(super::split_brain(vm, rec));
        }
        if rec.other_site_disks.is_some() {
            return Err(Error::Conflict(format!(
                "VM '{vm}' keeps its disks at another site for a failback: disk add and resize are not supported for it yet"
            )));
        }
        Ok(rec)
    }

    /// The VM's lock, if nothing holds it: a running agent serves the disks it opened.
    fn take_vm(&self, vm: &str, what: &str) -> Result<crate::util::lock::VaultLock> {
        match self.try_lock_vm(vm) {
            Err(Error::Locked(holder)) => Err(Error::Conflict(format!(
                "VM '{vm}' is in use by {holder}: stop its agent first ({what} needs the VM to itself; start the agent again afterwards to serve the disks as they are then)"
            ))),
            other => other,
        }
    }
}

fn source_disks(disks: &[DiskRecord]) -> Vec<SourceDisk> {
    disks
        .iter()
        .map(|d| SourceDisk {
            name: d.name.clone(),
            path: PathBuf::from(&d.source),
            size_bytes: d.size_bytes,
        })
        .collect()
}

fn check_size(name: &str, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(crate::SECTOR_BYTES) || size > MAX_DISK_BYTES {
        return Err(Error::Invalid(format!(
            "disk '{name}' is {size} bytes: a disk must be a non-zero multiple of 512 bytes, at most 64 TiB"
        )));
    }
    Ok(())
}

/// Grow a raw image (the new part reads as zeros) and make the new length durable.
fn grow_image(p: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .map_err(|e| Error::io(p, e))?;
    f.set_len(size).at(p)?;
    f.sync_all().at(p)
}

/// A checked `disk add`: the disk's record and where it goes.
struct AddPlan {
    new: DiskRecord,
    path: PathBuf,
    create: bool,
    index: u16,
}

impl AddPlan {
    fn spec(&self) -> DiskSpec {
        DiskSpec {
            name: self.new.name.clone(),
            size_bytes: self.new.size_bytes,
        }
    }

    fn create_image(&self) -> Result<()> {
        if self.create {
            create_sparse_image(&self.path, self.new.size_bytes)?;
        }
        Ok(())
    }

    /// A failed add removes the image it created.
    fn undo_if(&self, failed: bool) {
        if failed && self.create {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn disk_add_marker() -> Marker {
    Marker {
        consistency: Consistency::Crash,
        name: Some(DISK_ADD_POINT.into()),
        group: None,
        kind: MarkerKind::Point,
    }
}

/// Ship the allocated blocks of the new disk (runs of 4 KiB blocks that are not all
/// zeros) through `append`, after a zero of the whole disk when a leftover slot was taken
/// over. Returns the bytes shipped and the bytes of its allocated extents.
fn copy_disk(
    plan: &AddPlan,
    takeover: bool,
    append: &mut dyn FnMut(&Entry<'_>) -> Result<u64>,
    progress: &mut dyn Progress,
) -> Result<(u64, u64)> {
    const CHUNK: usize = 1 << 20;
    const BLOCK: usize = 4096;
    let (disk, size, path) = (plan.index, plan.new.size_bytes, &plan.path);
    if takeover {
        // What an unfinished add copied must not show through this disk's holes.
        append(&Entry::Zero {
            disk,
            offset: 0,
            len: size,
            trim: true,
        })?;
    }
    let f = std::fs::File::open(path).at(path)?;
    let extents = crate::fsutil::data_ranges(&f, size).at(path)?;
    let total: u64 = extents.iter().map(|(s, e)| e - s).sum();
    progress.begin("disk add", total);
    let mut shipped = 0;
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in extents {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            let chunk = buf
                .get_mut(..n)
                .ok_or_else(|| Error::Invalid("chunk".into()))?;
            f.read_exact_at(chunk, at).at(path)?;
            let mut run: Option<usize> = None;
            for b in (0..=n).step_by(BLOCK) {
                let zero = b >= n || chunk[b..(b + BLOCK).min(n)].iter().all(|&x| x == 0);
                match (zero, run) {
                    (false, None) => run = Some(b),
                    (true, Some(s)) => {
                        let data = &chunk[s..b.min(n)];
                        append(&Entry::Write {
                            disk,
                            offset: at + s as u64,
                            data,
                        })?;
                        shipped += data.len() as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            at += n as u64;
            progress.advance(n as u64);
        }
    }
    progress.end();
    Ok((shipped, total))
}
