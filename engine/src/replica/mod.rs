//! The replica of one VM: its disks as copy-on-write layers of extents, its recovery
//! points, and the open layer that receives what the processor applies.
//!
//! A replica is one directory:
//!
//! ```text
//! manifest                 points, their layers, disks, where the open layer starts
//! data/{id:016x}.dat       append-only extent frames (punched where nothing reads them)
//! layers/{id:016x}.idx     one immutable index per sealed layer
//! ```
//!
//! Invariants:
//! - the manifest is replaced atomically and only after every file it names is durable;
//! - everything after the manifest's open position is the open layer, rebuilt on open by
//!   scanning (a torn tail is cut off), so `applied_seq` never claims more than is stored;
//! - point k reads layers L0..=Lk; a layer is never changed in place, only replaced by a
//!   new index file (coalesced or merged) in one manifest swap; a damaged layer j spoils
//!   points j.. only, and makes the replica read-only (see `open`);
//! - a frame's bytes are punched only after a durable manifest stops referencing them and
//!   no live view pins them; a crash in between is healed on open by a reference scan.

pub mod datafile;
pub mod extent;
pub mod index;
pub mod manifest;
pub mod map;
mod open;
pub mod retention;
mod store;
mod usage;
mod verify;
pub mod view;

pub use manifest::{DiskSpec, PointInfo, PointKind};
pub use retention::PruneReport;
pub use verify::{Damage, VerifyReport};
pub use view::{AllocatedExtent, MaterializeStats, View};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::replace_atomic;
use crate::record::{Marker, Op, Record};
use crate::vfs::{VFile, Vfs};
use extent::MAX_EXTENT_BYTES;
use index::{Entry, LayerIndex, Loc};
use manifest::{Manifest, ManifestPoint};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::{Refs, Store};

pub const DATA_DIR: &str = "data";
pub const LAYERS_DIR: &str = "layers";
/// Applied data is handed to the kernel's writeback in stretches of this many bytes.
const WRITEBACK_BYTES: u64 = 8 << 20;
/// Largest disk a replica accepts (64 TiB).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// Settings of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// A data file is closed and a new one started once it would grow past this.
    pub data_file_max_bytes: u64,
    /// Store extents lz4-compressed when that saves space.
    pub compress: bool,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            data_file_max_bytes: 256 << 20,
            compress: true,
        }
    }
}

/// What [`Replica::apply`] did with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Already applied (seq <= applied_seq): nothing done.
    Skipped,
    /// A write or zero range, appended to the open layer.
    Stored,
    /// A marker: the caller cuts a point for it (see [`Replica::cut_marker_point`]).
    Marker(Marker),
}

/// What opening a replica found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub points: usize,
    /// Extents of the open layer, rebuilt by scanning.
    pub open_entries: usize,
    /// A torn tail that was cut off: file, byte offset, bytes removed, why.
    pub truncated: Option<(PathBuf, u64, u64, String)>,
    /// Files removed because nothing referenced them (data files, index files).
    pub removed_files: usize,
    /// Byte ranges punched by the reference scan after an interrupted prune.
    pub punched_ranges: usize,
}

/// Counters of a replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    pub points: usize,
    pub layers: usize,
    pub index_entries: u64,
    pub open_entries: u64,
    pub applied_seq: u64,
    pub durable_seq: u64,
    pub data_files: usize,
    /// Bytes of index entries held in memory (layers, open layer and pinned views).
    pub index_memory_bytes: u64,
}

/// The open layer: everything applied since the newest point.
struct OpenLayer {
    entries: Vec<Entry>,
    file_id: u64,
    file: Arc<dyn VFile>,
    /// Append position in `file`.
    end: u64,
    last_frame_seq: u64,
    last_frame_time_us: u64,
    /// Every frame up to this seq is fdatasynced.
    synced_seq: u64,
    /// Data files rotated away from whose frames are not yet synced, oldest first.
    unsynced: Vec<(u64, Arc<dyn VFile>)>,
}

/// One VM's replica. See the module comment.
pub struct Replica {
    dir: PathBuf,
    config: ReplicaConfig,
    store: Arc<Store>,
    manifest: Manifest,
    /// The points' layers, oldest first (parallel to `manifest.points`).
    layers: Vec<Arc<LayerIndex>>,
    open: OpenLayer,
    applied_seq: u64,
    applied_time_us: u64,
    refs: Refs,
    /// Retired layers a view still reads: their frames stay referenced.
    pins: Vec<Arc<LayerIndex>>,
    /// Snapshots of the open layer taken by views since the last maintenance.
    pending_pins: Mutex<Vec<Arc<LayerIndex>>>,
    poisoned: Option<Error>,
    /// Live layers whose index failed to load (position in `layers`, oldest first): the
    /// replica is read-only and views from the first one on are refused (see `open`).
    damaged: Vec<(usize, Damage)>,
    frame_buf: Vec<u8>,
}

impl Replica {
    /// Create a new, empty replica in `dir` with the given disks.
    pub fn create(
        vfs: Arc<dyn Vfs>,
        dir: impl AsRef<Path>,
        disks: &[DiskSpec],
        config: ReplicaConfig,
    ) -> Result<Replica> {
        let dir = dir.as_ref().to_path_buf();
        check_disks(disks)?;
        let data_dir = dir.join(DATA_DIR);
        let layers_dir = dir.join(LAYERS_DIR);
        for d in [&dir, &data_dir, &layers_dir] {
            vfs.create_dir_all(d).at(d)?;
        }
        let mpath = dir.join(manifest::FILE_NAME);
        if vfs.exists(&mpath) {
            return Err(Error::Invalid(format!(
                "a replica already exists in {}",
                dir.display()
            )));
        }
        // Leftovers of a creation that crashed before its manifest was written.
        for (d, is_ours) in [
            (
                &data_dir,
                datafile::parse_file_name as fn(&str) -> Option<u64>,
            ),
            (&layers_dir, index::parse_file_name),
        ] {
            for name in vfs.list(d).at(d)? {
                if is_ours(&name).is_some() {
                    let p = d.join(&name);
                    vfs.remove(&p).at(&p)?;
                }
            }
        }
        let first = 1;
        let path = data_dir.join(datafile::file_name(first));
        let f = vfs.create_new(&path).at(&path)?;
        f.write_all_at(&datafile::DataHeader::new(first, 0).encode(), 0)
            .at(&path)?;
        f.sync_data().at(&path)?;
        vfs.sync_dir(&data_dir).at(&data_dir)?;
        vfs.sync_dir(&layers_dir).at(&layers_dir)?;
        let m = Manifest {
            compat: 0,
            generation: 1,
            next_layer_id: 1,
            next_point_id: 1,
            open_file_id: first,
            open_offset: datafile::HEADER_BYTES as u64,
            disks: disks.to_vec(),
            points: Vec::new(),
            disk_history: manifest::initial_history(disks),
        };
        replace_atomic(&*vfs, &dir, manifest::FILE_NAME, &m.encode())?;
        Ok(Self::open(vfs, dir, config)?.0)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The I/O seam this replica's files go through (for the small files kept beside it).
    pub fn vfs(&self) -> &Arc<dyn Vfs> {
        &self.store.vfs
    }

    pub fn disks(&self) -> &[DiskSpec] {
        &self.manifest.disks
    }

    /// The disks of the replica in `dir` and each one's sizes over time, read from its
    /// manifest alone (no lock needed: the manifest is only ever replaced whole, and its
    /// disk history changes only while nothing else has the VM open).
    pub fn read_disk_history(
        vfs: &dyn Vfs,
        dir: &Path,
    ) -> Result<Vec<(DiskSpec, Vec<manifest::DiskEpoch>)>> {
        let mpath = dir.join(manifest::FILE_NAME);
        let bytes = open::read_all(vfs, &mpath, manifest::MAX_MANIFEST_BYTES as u64 + 64)?;
        let m = manifest::decode_manifest(&bytes).map_err(|e| e.at(&mpath, 0))?;
        Ok(m.disks.into_iter().zip(m.disk_history).collect())
    }

    /// The disks of the state at `seq`, each at its size then (disks added later are not
    /// there; a grown disk has its earlier size).
    pub fn disks_at(&self, seq: u64) -> Vec<DiskSpec> {
        self.manifest.disks_at(seq)
    }

    /// Add a disk to the VM at `index`, in no state yet (see [`Replica::publish_disk`]):
    /// the caller applies its initial copy, then publishes it at the seq from which states
    /// have it. `index` is the number of disks the VM's catalog lists: a disk beyond them is
    /// the leftover of a `disk add` that did not finish and is taken over (renamed,
    /// resized, in no state again); the caller must then zero it before copying. Returns
    /// whether a leftover was taken over.
    pub fn add_disk(&mut self, index: u16, spec: DiskSpec) -> Result<bool> {
        self.check_writable()?;
        let mut m = self.manifest.clone();
        let index = index as usize;
        let takeover = match m.disks.len().checked_sub(index) {
            Some(0) => false,
            Some(1) => true,
            _ => {
                return Err(Error::Invalid(format!(
                    "the replica has {} disks; a new disk cannot be disk {index}",
                    m.disks.len()
                )))
            }
        };
        if let Some(left) = m
            .disks
            .get(index)
            .filter(|d| d.size_bytes > spec.size_bytes)
        {
            // Its stored extents must stay inside the disk (a layer is checked on open).
            return Err(Error::Invalid(format!(
                "a disk add that did not finish left disk '{}' of {} bytes in the replica: the disk added in its place needs at least that size",
                left.name, left.size_bytes
            )));
        }
        m.disks.truncate(index);
        m.disk_history.truncate(index);
        m.disks.push(spec.clone());
        m.disk_history.push(vec![manifest::DiskEpoch {
            from_seq: manifest::PENDING_SEQ,
            size_bytes: spec.size_bytes,
        }]);
        check_disks(&m.disks)?;
        self.guard(|r| r.commit(m))?;
        Ok(takeover)
    }

    /// The disk being added (the last one, pending) is in every state from `from_seq` on:
    /// past the last record of its initial copy, which the caller has applied (later seqs
    /// not applied yet are fine: they hold nothing of this disk), and past every point.
    pub fn publish_disk(&mut self, disk: u16, from_seq: u64) -> Result<()> {
        self.check_writable()?;
        let mut m = self.manifest.clone();
        let last = m.disks.len().checked_sub(1);
        match m.disk_history.get_mut(disk as usize) {
            Some(h) if last == Some(disk as usize) && h.len() == 1 => {
                if from_seq == manifest::PENDING_SEQ
                    || from_seq <= m.points.last().map_or(0, |p| p.info.seq)
                {
                    return Err(Error::Invalid(format!(
                        "disk {disk} cannot appear at seq {from_seq} (applied {})",
                        self.applied_seq
                    )));
                }
                h[0].from_seq = from_seq;
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "disk {disk} is not a disk being added"
                )))
            }
        }
        self.guard(|r| r.commit(m))
    }

    /// The seq from which disk `disk` has its current size, if it grew after it was added.
    pub fn disk_grown_at(&self, disk: u16) -> Option<u64> {
        let h = self.manifest.disk_history.get(disk as usize)?;
        (h.len() > 1)
            .then(|| h.last().map(|e| e.from_seq))
            .flatten()
    }

    /// Grow disk `disk` to `size_bytes` for every state from `from_seq` on: `from_seq` is
    /// past every record the change log holds (those were checked against the old size),
    /// so states before it keep their size. Growing to the current size changes nothing.
    pub fn grow_disk(&mut self, disk: u16, size_bytes: u64, from_seq: u64) -> Result<()> {
        self.check_writable()?;
        let mut m = self.manifest.clone();
        let (Some(d), Some(h)) = (
            m.disks.get_mut(disk as usize),
            m.disk_history.get_mut(disk as usize),
        ) else {
            return Err(Error::NotFound(format!("disk {disk} does not exist")));
        };
        if size_bytes == d.size_bytes {
            return Ok(());
        }
        if size_bytes < d.size_bytes {
            return Err(Error::Invalid(format!(
                "disk '{}' is {} bytes: it can only grow, not shrink to {size_bytes}",
                d.name, d.size_bytes
            )));
        }
        let newest = h.last().map_or(0, |e| e.from_seq);
        if newest == manifest::PENDING_SEQ || from_seq <= self.applied_seq {
            return Err(Error::Invalid(format!(
                "disk '{}' cannot grow at seq {from_seq} (applied {})",
                d.name, self.applied_seq
            )));
        }
        d.size_bytes = size_bytes;
        if newest >= from_seq {
            // Grown again before anything was written at the size before: one epoch.
            if let Some(e) = h.last_mut() {
                e.size_bytes = size_bytes;
            }
        } else {
            h.push(manifest::DiskEpoch {
                from_seq,
                size_bytes,
            });
        }
        check_disks(&m.disks)?;
        self.guard(|r| r.commit(m))
    }

    /// Highest sequence number applied (some of it may not be durable yet).
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// Highest sequence number that survives a power loss: the change log may be trimmed
    /// up to here.
    pub fn durable_seq(&self) -> u64 {
        self.manifest.sealed_seq().max(self.open_durable_seq())
    }

    fn open_durable_seq(&self) -> u64 {
        self.open.synced_seq
    }

    /// Recovery points, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        self.manifest
            .points
            .iter()
            .map(|p| p.info.clone())
            .collect()
    }

    /// The point cut at the marker `seq`, looked for from the newest (where a point just
    /// cut is), cloning only that one.
    pub fn point_at_seq(&self, seq: u64) -> Option<PointInfo> {
        self.manifest
            .points
            .iter()
            .rev()
            .find(|p| p.info.seq == seq)
            .map(|p| p.info.clone())
    }

    pub fn point(&self, id: u64) -> Option<PointInfo> {
        self.manifest
            .points
            .iter()
            .find(|p| p.info.id == id)
            .map(|p| p.info.clone())
    }

    pub fn latest_point(&self) -> Option<PointInfo> {
        self.manifest.points.last().map(|p| p.info.clone())
    }

    /// The newest app-consistent point.
    pub fn latest_app_consistent_point(&self) -> Option<PointInfo> {
        self.manifest
            .points
            .iter()
            .rev()
            .find(|p| p.info.kind == PointKind::AppConsistent)
            .map(|p| p.info.clone())
    }

    /// Make everything applied durable and close the replica; returns the durable seq.
    /// Dropping a replica without closing it is like a crash of the process: what was
    /// applied but not flushed is redone from the change log on the next open.
    pub fn close(mut self) -> Result<u64> {
        self.flush()
    }

    /// True if something was applied since the newest point (or since creation).
    pub fn changed_since_last_point(&self) -> bool {
        self.applied_seq > self.manifest.sealed_seq()
    }

    /// Time of the oldest change no point covers yet (the first change of the open
    /// layer); `None` when every change is in a point. The processor's interval runs from
    /// here, so no change stays unprotected longer than the interval.
    pub fn open_since_us(&self) -> Option<u64> {
        self.open.entries.first().map(|e| e.time_us)
    }

    /// Time of the last applied record.
    pub fn applied_time_us(&self) -> u64 {
        self.applied_time_us
    }

    pub fn stats(&self) -> ReplicaStats {
        let index_entries: u64 = self.layers.iter().map(|l| l.entries.len() as u64).sum();
        let pinned: u64 = self.pins.iter().map(|l| l.entries.len() as u64).sum();
        let open = self.open.entries.len() as u64;
        ReplicaStats {
            points: self.manifest.points.len(),
            layers: self.layers.len(),
            index_entries,
            open_entries: open,
            applied_seq: self.applied_seq,
            durable_seq: self.durable_seq(),
            data_files: self
                .store
                .vfs
                .list(&self.store.data_dir)
                .map(|v| {
                    v.iter()
                        .filter(|n| datafile::parse_file_name(n).is_some())
                        .count()
                })
                .unwrap_or(0),
            index_memory_bytes: (index_entries + pinned + open)
                * std::mem::size_of::<Entry>() as u64,
        }
    }

    /// Apply one change-log record. Records at or below `applied_seq` are skipped (redo
    /// after a crash is idempotent). Writes and zero ranges beyond a disk's size are
    /// refused, never applied.
    pub fn apply(&mut self, rec: &Record) -> Result<Applied> {
        self.check_writable()?;
        if rec.seq <= self.applied_seq {
            return Ok(Applied::Skipped);
        }
        match &rec.op {
            Op::Write { disk, offset, data } => {
                self.check_range(*disk, *offset, data.len() as u64)?;
                if data.len() > MAX_EXTENT_BYTES {
                    return Err(Error::Invalid(format!(
                        "write of {} bytes exceeds {MAX_EXTENT_BYTES}",
                        data.len()
                    )));
                }
                let (disk, offset) = (*disk, *offset);
                self.guard(|r| {
                    r.append_frame(rec.seq, rec.time_us, |buf, file_id, compress| {
                        extent::encode_data(
                            buf,
                            file_id,
                            disk,
                            offset,
                            rec.seq,
                            rec.time_us,
                            data,
                            compress,
                        );
                        (disk, offset, data.len() as u64, None)
                    })
                })?;
            }
            Op::Zero {
                disk,
                offset,
                len,
                trim,
            } => {
                self.check_range(*disk, *offset, *len)?;
                let (disk, offset, len, trim) = (*disk, *offset, *len, *trim);
                self.guard(|r| {
                    r.append_frame(rec.seq, rec.time_us, |buf, file_id, _| {
                        extent::encode_zero(
                            buf,
                            file_id,
                            disk,
                            offset,
                            len,
                            rec.seq,
                            rec.time_us,
                            trim,
                        );
                        (disk, offset, len, Some(trim))
                    })
                })?;
            }
            Op::Marker(m) => {
                self.applied_seq = rec.seq;
                self.applied_time_us = rec.time_us;
                return Ok(Applied::Marker(m.clone()));
            }
        }
        self.applied_seq = rec.seq;
        self.applied_time_us = rec.time_us;
        Ok(Applied::Stored)
    }

    /// Encode a frame with `encode(buf, file_id, compress) -> (disk, offset, len, zero)`,
    /// rotating the data file first if it would grow past its limit, and append it.
    fn append_frame(
        &mut self,
        seq: u64,
        time_us: u64,
        encode: impl Fn(&mut Vec<u8>, u64, bool) -> (u16, u64, u64, Option<bool>),
    ) -> Result<()> {
        let mut buf = std::mem::take(&mut self.frame_buf);
        buf.clear();
        let mut what = encode(&mut buf, self.open.file_id, self.config.compress);
        let header = datafile::HEADER_BYTES as u64;
        if self.open.end > header
            && self.open.end + buf.len() as u64 > self.config.data_file_max_bytes
        {
            self.rotate()?;
            buf.clear();
            what = encode(&mut buf, self.open.file_id, self.config.compress);
        }
        let path = self.store.path(self.open.file_id);
        self.open.file.write_all_at(&buf, self.open.end).at(&path)?;
        let (disk, offset, len, zero) = what;
        let loc = match zero {
            Some(trim) => Loc::Zero { trim },
            None => Loc::Data {
                file_id: self.open.file_id,
                frame_offset: self.open.end,
                frame_len: buf.len() as u32,
                skip: 0,
            },
        };
        self.open.entries.push(Entry {
            disk,
            offset,
            len,
            seq,
            time_us,
            loc,
        });
        let before = self.open.end;
        self.open.end += buf.len() as u64;
        if before / WRITEBACK_BYTES != self.open.end / WRITEBACK_BYTES {
            // Start writing the last full stretch back now, so the flush that makes it
            // durable (before the log may trim it) finds little left to do. Only a hint.
            let upto = self.open.end / WRITEBACK_BYTES * WRITEBACK_BYTES;
            let from = upto.saturating_sub(WRITEBACK_BYTES);
            let _ = self.open.file.start_writeback(from, upto - from);
        }
        self.open.last_frame_seq = seq;
        self.open.last_frame_time_us = time_us;
        self.frame_buf = buf;
        Ok(())
    }

    /// Start the next data file. The old one is synced by the next flush (with the new
    /// one, oldest first), not here: recovery ends the open layer at the first frame that
    /// did not survive, in whichever file, so nothing needs to be durable before a flush
    /// says so, and applying never waits for the disk.
    fn rotate(&mut self) -> Result<()> {
        self.open
            .unsynced
            .push((self.open.file_id, self.open.file.clone()));
        let id = self.open.file_id + 1;
        let path = self.store.path(id);
        let vfs = &self.store.vfs;
        if vfs.exists(&path) {
            // Left over from a crash after creation: nothing in it was ever referenced.
            vfs.remove(&path).at(&path)?;
        }
        let f = vfs.create_new(&path).at(&path)?;
        f.write_all_at(&datafile::DataHeader::new(id, self.open.end).encode(), 0)
            .at(&path)?;
        vfs.sync_dir(&self.store.data_dir)
            .at(&self.store.data_dir)?;
        self.store.insert(id, f.clone());
        self.open.file_id = id;
        self.open.file = f;
        self.open.end = datafile::HEADER_BYTES as u64;
        Ok(())
    }

    /// Make everything applied durable; returns the durable sequence number, up to which
    /// the change log may now be trimmed.
    pub fn flush(&mut self) -> Result<u64> {
        self.check_writable()?;
        self.guard(|r| r.sync_data_files())?;
        Ok(self.durable_seq())
    }

    /// fdatasync every data file with unsynced frames, oldest first.
    fn sync_data_files(&mut self) -> Result<()> {
        for (id, f) in &self.open.unsynced {
            f.sync_data().at(&self.store.path(*id))?;
        }
        self.open.unsynced.clear();
        let path = self.store.path(self.open.file_id);
        self.open.file.sync_data().at(&path)?;
        self.open.synced_seq = self.open.last_frame_seq;
        Ok(())
    }

    /// Cut a recovery point at `applied_seq`: seal the open layer.
    pub fn cut_point(&mut self, kind: PointKind, name: Option<&str>) -> Result<PointInfo> {
        self.cut(kind, name.map(str::to_owned), None)
    }

    /// Cut the point a marker asks for (app- or crash-consistent, with its name and group).
    pub fn cut_marker_point(&mut self, marker: &Marker) -> Result<PointInfo> {
        let kind = match marker.consistency {
            crate::record::Consistency::App => PointKind::AppConsistent,
            crate::record::Consistency::Crash => PointKind::CrashConsistent,
        };
        self.cut(kind, marker.name.clone(), marker.group.clone())
    }

    fn cut(
        &mut self,
        kind: PointKind,
        name: Option<String>,
        group: Option<String>,
    ) -> Result<PointInfo> {
        self.check_writable()?;
        for s in [&name, &group].into_iter().flatten() {
            Manifest::check_name(s).map_err(Error::Invalid)?;
        }
        let seq = self.applied_seq;
        if let Some(last) = self.manifest.points.last() {
            if seq == last.info.seq {
                return Err(Error::Invalid(format!(
                    "nothing was applied since point {} (seq {seq})",
                    last.info.id
                )));
            }
        }
        let info = PointInfo {
            id: self.manifest.next_point_id,
            seq,
            // Nothing applied yet (a remote VM's first point, before its agent's first
            // write arrived): the empty disk as of now. Time 0 made retention take the
            // point for 56 years old and prune it at the next pass, while a test failover
            // still named it.
            time_us: if seq == 0 && self.applied_time_us == 0 {
                crate::now_us()
            } else {
                self.applied_time_us
            },
            kind,
            name,
            group,
        };
        self.guard(|r| r.seal(info.clone()))?;
        Ok(info)
    }

    fn seal(&mut self, info: PointInfo) -> Result<()> {
        self.sync_data_files()?;
        let base = self.manifest.sealed_seq();
        let layer = LayerIndex {
            layer_id: self.manifest.next_layer_id,
            base_seq: base,
            end_seq: info.seq,
            exact_from: base,
            compat: 0,
            entries: std::mem::take(&mut self.open.entries),
        };
        self.write_index(&layer)?;
        self.sync_layers_dir()?;
        let mut m = self.manifest.clone();
        m.next_layer_id += 1;
        m.next_point_id += 1;
        m.open_file_id = self.open.file_id;
        m.open_offset = self.open.end;
        m.points.push(ManifestPoint {
            info,
            layer_id: layer.layer_id,
            layer_exact_from: layer.exact_from,
            layer_entries: layer.entries.len() as u64,
        });
        self.commit(m)?;
        self.refs.add(&layer.entries);
        self.layers.push(Arc::new(layer));
        Ok(())
    }

    fn layers_dir(&self) -> PathBuf {
        self.dir.join(LAYERS_DIR)
    }

    /// Write a new index file and sync it (the caller syncs the directory).
    fn write_index(&self, layer: &LayerIndex) -> Result<()> {
        let path = self.layers_dir().join(index::file_name(layer.layer_id));
        let vfs = &self.store.vfs;
        if vfs.exists(&path) {
            vfs.remove(&path).at(&path)?;
        }
        let f = vfs.create_new(&path).at(&path)?;
        f.write_all_at(&layer.encode(), 0).at(&path)?;
        f.sync_data().at(&path)
    }

    fn sync_layers_dir(&self) -> Result<()> {
        let d = self.layers_dir();
        self.store.vfs.sync_dir(&d).at(&d)
    }

    /// Replace the manifest atomically with `m` (generation bumped).
    fn commit(&mut self, mut m: Manifest) -> Result<()> {
        m.generation = self.manifest.generation + 1;
        replace_atomic(
            &*self.store.vfs,
            &self.dir,
            manifest::FILE_NAME,
            &m.encode(),
        )?;
        self.manifest = m;
        Ok(())
    }

    /// The failure that latched this replica (it refuses changes until reopened), if any.
    pub fn failure(&self) -> Option<Error> {
        self.poisoned.clone()
    }

    fn check_writable(&self) -> Result<()> {
        if let Some(e) = self.damage_refusal() {
            return Err(e);
        }
        match &self.poisoned {
            Some(why) => Err(why.poisoned()),
            None => Ok(()),
        }
    }

    /// Run a mutation; any failure latches: the replica refuses further changes until it
    /// is reopened (and recovery decides what survived).
    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if let Err(e) = &r {
            self.poisoned = Some(e.clone());
        }
        r
    }

    fn check_range(&self, disk: u16, offset: u64, len: u64) -> Result<()> {
        let Some(d) = self.manifest.disks.get(disk as usize) else {
            return Err(Error::Invalid(format!(
                "disk {disk} does not exist (the VM has {} disks)",
                self.manifest.disks.len()
            )));
        };
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= d.size_bytes => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is outside disk {disk} ({}, {} bytes)",
                d.name, d.size_bytes
            ))),
        }
    }
}

fn check_disks(disks: &[DiskSpec]) -> Result<()> {
    if disks.len() > u16::MAX as usize + 1 {
        return Err(Error::Invalid("too many disks".into()));
    }
    for d in disks {
        Manifest::check_name(&d.name).map_err(Error::Invalid)?;
        if d.size_bytes == 0
            || d.size_bytes > MAX_DISK_BYTES
            || d.size_bytes % crate::SECTOR_BYTES != 0
        {
            return Err(Error::Invalid(format!(
                "disk {}: size {} must be a positive multiple of {} up to {MAX_DISK_BYTES}",
                d.name,
                d.size_bytes,
                crate::SECTOR_BYTES
            )));
        }
    }
    Ok(())
}
