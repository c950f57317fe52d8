//! Opening a replica: load the manifest and every live layer index, rebuild the open layer
//! by scanning the data files from the manifest's open position (cutting off a torn tail),
//! and heal what a crash between a manifest swap and its clean-up left behind (unreferenced
//! index files, data files and frames). Opening twice in a row changes nothing the second
//! time.
//!
//! A damaged layer index is contained, not fatal: point k reads layers L0..=Lk, so a
//! damaged layer j spoils points j.. and the latest state, and nothing else. The replica
//! opens read-only with the damage recorded ([`Replica::damage`]): points before j still
//! view, fail over and mount bit-exact; a view that needs layer j is refused with an error
//! naming the file; nothing is applied, cut, pruned or punched (the damaged layer's
//! references are unknown, so any punch or file removal could destroy frames it reads,
//! and any new point would read the damaged layer too). Only the manifest, the root of
//! everything, still refuses to open.

use super::datafile::{self, decode_data_header, HEADER_BYTES as DATA_HEADER_BYTES};
use super::extent::{verify_frame, FrameHeader, FRAME_HEADER_BYTES, KIND_DATA};
use super::index::{self, decode_layer_index_located, Entry, LayerIndex, Loc};
use super::manifest::{self, decode_manifest, Manifest, ManifestPoint, COMPAT_PUNCH_PENDING};
use super::store::{Refs, Store};
use super::verify::Damage;
use super::{OpenLayer, OpenReport, Replica, ReplicaConfig, DATA_DIR, LAYERS_DIR};
use crate::error::{Error, IoContext, Result};
use crate::vfs::{VFile, Vfs};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Read a whole (small) file, refusing one larger than `max` bytes.
pub(crate) fn read_all(vfs: &dyn Vfs, path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = vfs.open(path).at(path)?;
    let len = f.len().at(path)?;
    if len > max {
        return Err(Error::corrupt(
            path,
            0,
            format!("file of {len} bytes is larger than any valid one"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    let n = f.read_full_at(&mut buf, 0).at(path)?;
    buf.truncate(n);
    Ok(buf)
}

/// Largest layer index file accepted (1 G entries).
const MAX_INDEX_BYTES: u64 = 64 << 30;

impl Replica {
    /// Open an existing replica, recovering after a crash.
    pub fn open(
        vfs: Arc<dyn Vfs>,
        dir: impl AsRef<Path>,
        config: ReplicaConfig,
    ) -> Result<(Replica, OpenReport)> {
        let dir = dir.as_ref().to_path_buf();
        let mpath = dir.join(manifest::FILE_NAME);
        if !vfs.exists(&mpath) {
            return Err(Error::NotFound(format!(
                "no replica in {} (its manifest is missing)",
                dir.display()
            )));
        }
        let bytes = read_all(&*vfs, &mpath, manifest::MAX_MANIFEST_BYTES as u64 + 64)?;
        let m = decode_manifest(&bytes).map_err(|e| e.at(&mpath, 0))?;
        let mut report = OpenReport {
            points: m.points.len(),
            ..OpenReport::default()
        };
        let layers_dir = dir.join(LAYERS_DIR);
        let (layers, damaged) = load_layers(&*vfs, &layers_dir, &m)?;
        report.removed_files += remove_unreferenced_indexes(&*vfs, &layers_dir, &m)?;
        let mut refs = Refs::default();
        for l in &layers {
            refs.add(&l.entries);
        }
        let store = Arc::new(Store::new(vfs.clone(), dir.join(DATA_DIR)));
        let open = scan_open_layer(&store, &m, &mut report)?;
        let applied_seq = m.sealed_seq().max(open.last_frame_seq);
        let applied_time_us = if open.last_frame_seq > m.sealed_seq() {
            open.last_frame_time_us
        } else {
            m.points.last().map_or(0, |p| p.info.time_us)
        };
        let mut r = Replica {
            dir,
            config,
            store,
            manifest: m,
            layers,
            open,
            applied_seq,
            applied_time_us,
            refs,
            pins: Vec::new(),
            pending_pins: Mutex::new(Vec::new()),
            poisoned: None,
            damaged,
            frame_buf: Vec::new(),
        };
        if !r.damaged.is_empty() {
            // Healing needs every layer's references: leave all files as they are.
            return Ok((r, report));
        }
        report.removed_files += r.remove_dead_data_files()?;
        if r.manifest.compat & COMPAT_PUNCH_PENDING != 0 {
            report.punched_ranges += r.heal_all()?;
            let mut m = r.manifest.clone();
            m.compat &= !COMPAT_PUNCH_PENDING;
            r.commit(m)?;
        }
        Ok((r, report))
    }

    /// The reference scan: punch every gap between referenced frames below the open layer.
    /// Cost: the index entries (already in memory), not the data.
    fn heal_all(&mut self) -> Result<usize> {
        let mut n = 0;
        let data_dir = self.store.data_dir.clone();
        let names = self.store.vfs.list(&data_dir).at(&data_dir)?;
        for id in names.iter().filter_map(|s| datafile::parse_file_name(s)) {
            let Some(limit) = self.punch_limit(id)? else {
                continue;
            };
            for (start, end) in self.refs.all_gaps(id, limit) {
                self.store.punch(id, start, end)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// How far frames of a data file may be punched: the whole file below the open
    /// layer's file, up to the open layer's start in its file, nothing after.
    pub(super) fn punch_limit(&self, file_id: u64) -> Result<Option<u64>> {
        let m = &self.manifest;
        if file_id > m.open_file_id {
            return Ok(None);
        }
        if file_id == m.open_file_id {
            return Ok(Some(m.open_offset));
        }
        let path = self.store.path(file_id);
        if !self.store.vfs.exists(&path) {
            return Ok(None);
        }
        let f = self.store.file(file_id)?;
        Ok(Some(f.len().at(&path)?))
    }

    /// Delete data files below the open layer that no layer references any more.
    pub(super) fn remove_dead_data_files(&mut self) -> Result<usize> {
        let data_dir = self.store.data_dir.clone();
        let names = self.store.vfs.list(&data_dir).at(&data_dir)?;
        let mut removed = 0;
        for id in names.iter().filter_map(|s| datafile::parse_file_name(s)) {
            if id < self.manifest.open_file_id && !self.refs.is_referenced(id) {
                self.store.forget(id);
                let p = self.store.path(id);
                self.store.vfs.remove(&p).at(&p)?;
                removed += 1;
            }
        }
        if removed > 0 {
            self.store.vfs.sync_dir(&data_dir).at(&data_dir)?;
        }
        Ok(removed)
    }
}

/// Load every live layer index. A layer whose index is missing or fails validation gets an
/// empty stand-in (never read: views that need it are refused) and a [`Damage`] naming the
/// file, the offset and the points that read it; I/O errors are returned.
impl Replica {
    /// Damage found in the live layer indexes when the replica was opened, oldest layer
    /// first (empty when they are sound). Each names the file, the offset and the points
    /// that read it (that layer's point and every later one) and the latest state.
    pub fn damage(&self) -> Vec<Damage> {
        self.damaged.iter().map(|(_, d)| d.clone()).collect()
    }

    /// Ids of the points that read a damaged layer: they cannot be viewed.
    pub fn unreadable_points(&self) -> Vec<u64> {
        match self.damaged.first() {
            Some((_, d)) => d.points.clone(),
            None => Vec::new(),
        }
    }

    /// Position of the oldest damaged layer.
    pub(super) fn first_damaged(&self) -> Option<usize> {
        self.damaged.first().map(|(k, _)| *k)
    }

    /// Which points are still intact, for messages.
    fn intact_points(&self) -> String {
        let j = self.first_damaged().unwrap_or(self.manifest.points.len());
        let ids: Vec<String> = self.manifest.points[..j]
            .iter()
            .map(|p| p.info.id.to_string())
            .collect();
        match ids.len() {
            0 => "no point before it is intact".into(),
            1 => format!("point {} is intact", ids[0]),
            _ => format!("points {} are intact", ids.join(", ")),
        }
    }

    /// Refuse a view of `what` (a point, a seq) that needs layer `k` or a later one, when
    /// one of them is damaged: the error names the damaged file.
    pub(super) fn check_readable(&self, k: usize, what: &str) -> Result<()> {
        match self.damaged.iter().find(|(j, _)| *j <= k) {
            Some((_, d)) => Err(Error::corrupt(
                &d.path,
                d.offset,
                format!(
                    "{}: {what} reads this layer index and cannot be recovered; {}",
                    d.what,
                    self.intact_points()
                ),
            )),
            None => Ok(()),
        }
    }

    /// Why nothing may change a replica with a damaged layer, if it has one.
    pub(super) fn damage_refusal(&self) -> Option<Error> {
        self.damaged.first().map(|(_, d)| {
            Error::corrupt(
                &d.path,
                d.offset,
                format!(
                    "{}: the replica is read-only, so processing of this VM has stopped \
                     (every new point would read this layer index); {}",
                    d.what,
                    self.intact_points()
                ),
            )
        })
    }
}

/// Damaged live layers: position in the manifest's points, and the damage.
type DamagedLayers = Vec<(usize, Damage)>;

fn load_layers(
    vfs: &dyn Vfs,
    layers_dir: &Path,
    m: &Manifest,
) -> Result<(Vec<Arc<LayerIndex>>, DamagedLayers)> {
    let mut out = Vec::with_capacity(m.points.len());
    let mut damaged = Vec::new();
    let mut base = 0;
    for (k, p) in m.points.iter().enumerate() {
        let path = layers_dir.join(index::file_name(p.layer_id));
        match load_layer(vfs, &path, m, p, base) {
            Ok(l) => out.push(Arc::new(l)),
            Err(e) => {
                let (path, offset, what) = super::verify::corruption(e)?;
                damaged.push((
                    k,
                    Damage {
                        path,
                        offset,
                        what,
                        points: m.points[k..].iter().map(|p| p.info.id).collect(),
                        latest: true,
                    },
                ));
                out.push(Arc::new(LayerIndex {
                    layer_id: p.layer_id,
                    base_seq: base,
                    end_seq: p.info.seq,
                    exact_from: p.layer_exact_from,
                    compat: 0,
                    entries: Vec::new(),
                }));
            }
        }
        base = p.info.seq;
    }
    Ok((out, damaged))
}

/// Load and check one layer index against the manifest's point `p` (whose layer starts at
/// `base`).
pub(super) fn load_layer(
    vfs: &dyn Vfs,
    path: &Path,
    m: &Manifest,
    p: &ManifestPoint,
    base: u64,
) -> Result<LayerIndex> {
    if !vfs.exists(path) {
        return Err(Error::corrupt(
            path,
            0,
            format!("the layer index of point {} is missing", p.info.id),
        ));
    }
    let bytes = read_all(vfs, path, MAX_INDEX_BYTES)?;
    let l = decode_layer_index_located(&bytes).map_err(|(off, e)| e.at(path, off))?;
    if l.layer_id != p.layer_id
        || l.base_seq != base
        || l.end_seq != p.info.seq
        || l.exact_from != p.layer_exact_from
        || l.entries.len() as u64 != p.layer_entries
    {
        return Err(Error::corrupt(
            path,
            0,
            format!(
                "layer index does not match the manifest's point {}",
                p.info.id
            ),
        ));
    }
    for (i, e) in l.entries.iter().enumerate() {
        check_entry_range(m, e).map_err(|what| {
            Error::corrupt(
                path,
                (index::HEADER_BYTES + i * index::ENTRY_BYTES) as u64,
                what,
            )
        })?;
    }
    Ok(l)
}

fn check_entry_range(m: &Manifest, e: &Entry) -> std::result::Result<(), String> {
    let size = m
        .disks
        .get(e.disk as usize)
        .map(|d| d.size_bytes)
        .ok_or_else(|| format!("entry names disk {}, which does not exist", e.disk))?;
    if e.offset.checked_add(e.len).is_none_or(|end| end > size) {
        return Err(format!(
            "entry range {}+{} is outside its disk",
            e.offset, e.len
        ));
    }
    Ok(())
}

fn remove_unreferenced_indexes(vfs: &dyn Vfs, layers_dir: &Path, m: &Manifest) -> Result<usize> {
    let mut removed = 0;
    for name in vfs.list(layers_dir).at(layers_dir)? {
        let live = index::parse_file_name(&name)
            .is_some_and(|id| m.points.iter().any(|p| p.layer_id == id));
        let ours = index::parse_file_name(&name).is_some() || name.ends_with(".tmp");
        if ours && !live {
            let p = layers_dir.join(&name);
            vfs.remove(&p).at(&p)?;
            removed += 1;
        }
    }
    if removed > 0 {
        vfs.sync_dir(layers_dir).at(layers_dir)?;
    }
    Ok(removed)
}

/// Sequential reads through a large buffer.
struct Scanner {
    file: Arc<dyn VFile>,
    path: PathBuf,
    buf: Vec<u8>,
    buf_start: u64,
}

const SCAN_CHUNK_BYTES: usize = 1 << 20;

impl Scanner {
    /// Bytes `[pos, pos+n)` (fewer at the end of the file).
    fn get(&mut self, pos: u64, n: usize) -> Result<&[u8]> {
        let have =
            pos >= self.buf_start && pos + n as u64 <= self.buf_start + self.buf.len() as u64;
        if !have {
            let want = n.max(SCAN_CHUNK_BYTES);
            self.buf.resize(want, 0);
            let got = self.file.read_full_at(&mut self.buf, pos).at(&self.path)?;
            self.buf.truncate(got);
            self.buf_start = pos;
        }
        let at = (pos - self.buf_start) as usize;
        let end = (at + n).min(self.buf.len());
        Ok(&self.buf[at.min(end)..end])
    }
}

/// Rebuild the open layer from the manifest's open position to the end of the data files.
fn scan_open_layer(store: &Store, m: &Manifest, report: &mut OpenReport) -> Result<OpenLayer> {
    let vfs = &store.vfs;
    let data_dir = &store.data_dir;
    let mut ids: Vec<u64> = vfs
        .list(data_dir)
        .at(data_dir)?
        .iter()
        .filter_map(|s| datafile::parse_file_name(s))
        .filter(|id| *id >= m.open_file_id)
        .collect();
    ids.sort_unstable();
    if ids.first() != Some(&m.open_file_id) {
        return Err(Error::corrupt(
            store.path(m.open_file_id),
            0,
            "the data file holding the open layer is missing",
        ));
    }
    let mut entries = Vec::new();
    let mut last_seq = m.sealed_seq();
    let mut last_time = 0;
    let mut current: Option<(u64, Arc<dyn VFile>, u64)> = None;
    // Index in `ids` where the open layer ended early (a torn write): files after it hold
    // nothing a flush ever promised and are removed.
    let mut ended_at: Option<usize> = None;
    for (i, &id) in ids.iter().enumerate() {
        let path = store.path(id);
        let file = store.file(id)?;
        let len = file.len().at(&path)?;
        let mut hb = [0u8; DATA_HEADER_BYTES];
        let n = file.read_full_at(&mut hb, 0).at(&path)?;
        match decode_data_header(&hb[..n]) {
            Ok(h) if h.file_id != id => {
                return Err(Error::corrupt(
                    &path,
                    0,
                    "data file header names another file",
                ))
            }
            Ok(h) => {
                if let Some((_, _, prev_len)) = &current {
                    if h.prev_end != *prev_len {
                        // The previous file lost frames this one follows: they (and this
                        // file) were never made durable by a flush.
                        ended_at = Some(i);
                        break;
                    }
                }
            }
            Err(e) => {
                if id != m.open_file_id && !e.is_unsupported() {
                    // Its creation was torn: nothing in it (or after it) was ever durable.
                    ended_at = Some(i);
                    break;
                }
                return Err(e.at(&path, 0));
            }
        }
        let mut pos = if id == m.open_file_id {
            m.open_offset
        } else {
            DATA_HEADER_BYTES as u64
        };
        if pos > len {
            return Err(Error::corrupt(
                &path,
                pos,
                "the open layer starts beyond the end of its data file",
            ));
        }
        let mut sc = Scanner {
            file: file.clone(),
            path: path.clone(),
            buf: Vec::new(),
            buf_start: 0,
        };
        while pos < len {
            let parsed = {
                let hbytes = sc.get(pos, FRAME_HEADER_BYTES)?;
                FrameHeader::parse(hbytes, id)
            };
            let verdict = match parsed {
                Ok(h) => {
                    let total = h.frame_bytes();
                    let frame = sc.get(pos, total)?;
                    verify_frame(frame, &h, id).map(|_| h)
                }
                Err(e) => Err(e),
            };
            let h = match verdict {
                Ok(h) => h,
                Err(e) => {
                    // A torn tail: the first frame that did not fully reach the disk ends
                    // the open layer, in whichever file it is.
                    file.set_len(pos).at(&path)?;
                    file.sync_data().at(&path)?;
                    report.truncated = Some((path.clone(), pos, len - pos, e.to_string()));
                    ended_at = Some(i + 1);
                    current = Some((id, file.clone(), pos));
                    break;
                }
            };
            let entry = Entry {
                disk: h.disk,
                offset: h.offset,
                len: h.len,
                seq: h.seq,
                time_us: h.time_us,
                loc: if h.kind == KIND_DATA {
                    Loc::Data {
                        file_id: id,
                        frame_offset: pos,
                        frame_len: h.frame_bytes() as u32,
                        skip: 0,
                    }
                } else {
                    Loc::Zero {
                        trim: h.flags & super::extent::FLAG_TRIM != 0,
                    }
                },
            };
            if entry.seq <= last_seq {
                return Err(Error::corrupt(
                    &path,
                    pos,
                    format!("extent seq {} follows seq {last_seq}", entry.seq),
                ));
            }
            check_entry_range(m, &entry).map_err(|w| Error::corrupt(&path, pos, w))?;
            last_seq = entry.seq;
            last_time = entry.time_us;
            entries.push(entry);
            pos += h.frame_bytes() as u64;
        }
        if ended_at.is_some() {
            break;
        }
        current = Some((id, file, pos));
    }
    if let Some(i) = ended_at {
        for &id in &ids[i..] {
            store.forget(id);
            let p = store.path(id);
            vfs.remove(&p).at(&p)?;
            report.removed_files += 1;
        }
        vfs.sync_dir(data_dir).at(data_dir)?;
    }
    let Some((file_id, file, end)) = current else {
        return Err(Error::corrupt(
            store.path(m.open_file_id),
            0,
            "no data file to append to",
        ));
    };
    report.open_entries = entries.len();
    // What the scan found may only be written (a process crash): make it durable, so the
    // change log may be trimmed up to it.
    let path = store.path(file_id);
    file.sync_data().at(&path)?;
    let last_frame_seq = if entries.is_empty() { 0 } else { last_seq };
    Ok(OpenLayer {
        synced_seq: last_frame_seq,
        unsynced: Vec::new(),
        last_frame_seq,
        last_frame_time_us: last_time,
        entries,
        file_id,
        file,
        end,
    })
}
