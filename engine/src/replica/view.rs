//! Read views of a replica: the state of every disk at a recovery point, or at any
//! sequence number (or wall-clock time) inside the any-moment window. A view is built by
//! overlaying layers into one interval map per disk (newer over older, zero ranges become
//! holes), so its memory and build time follow the layers' entries, never the disks'
//! virtual size. A view pins the layers it reads: pruning never punches their frames while
//! it lives.
//!
//! Reads verify every frame they touch; damage is an error naming the file and offset,
//! never garbage. A view that needs a layer whose index was found damaged on open (a point
//! at or after it, a seq or time inside or after it, the latest state) is refused the same
//! way; older points are untouched by it. Materialization writes only allocated ranges, in offset order, into a
//! sparse file.

use super::index::{Entry, LayerIndex, Loc};
use super::manifest::{DiskSpec, PointInfo};
use super::map::{IntervalMap, Piece};
use super::store::Store;
use super::Replica;
use crate::error::{Error, IoContext, Result};
use crate::vfs::VFile;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;

/// Where a mapped range's bytes are: `skip` bytes into the extent of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DataRef {
    file_id: u64,
    frame_offset: u64,
    frame_len: u32,
    skip: u64,
}

impl Piece for DataRef {
    fn advance(&self, by: u64) -> Self {
        DataRef {
            skip: self.skip + by,
            ..*self
        }
    }
}

/// A run of allocated (written, not zeroed) bytes of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatedExtent {
    pub offset: u64,
    pub len: u64,
}

/// What materializing a disk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterializeStats {
    pub virtual_bytes: u64,
    /// Bytes written to the image (the allocated bytes of the disk at this view).
    pub written_bytes: u64,
    /// Writes issued (adjacent extents are coalesced into one).
    pub writes: u64,
    /// sha256 of the whole image (holes as zeros), when it was asked for.
    pub sha256: Option<[u8; 32]>,
}

/// A read-only view of all disks of a VM at one sequence number.
pub struct View {
    store: Arc<Store>,
    disks: Vec<DiskSpec>,
    maps: Vec<IntervalMap<DataRef>>,
    seq: u64,
    time_us: u64,
    point: Option<PointInfo>,
    /// The last extent decoded, for reads that touch the same frame repeatedly.
    /// Recently decoded extents, most recent first (see `extent`).
    cache: Mutex<ExtentCache>,
    /// Wakes readers waiting for an extent another reader is decoding.
    decoded: parking_lot::Condvar,
    _pins: Vec<Arc<LayerIndex>>,
}

/// A decoded extent and the frame `(file_id, frame_offset)` it came from.
type CachedExtent = ((u64, u64), Arc<Vec<u8>>);

/// Recently decoded extents, most recent first, and the ones being decoded right now (so
/// concurrent readers of one extent decode it once).
#[derive(Default)]
struct ExtentCache {
    entries: std::collections::VecDeque<CachedExtent>,
    loading: Vec<(u64, u64)>,
    /// Memory of evicted extents, reused by the next decodes.
    spare: Vec<Vec<u8>>,
}

/// Evicted extents' buffers kept for reuse.
const SPARE_EXTENTS: usize = 4;

/// Decoded extents a view keeps, by count and by bytes.
const EXTENT_CACHE_ENTRIES: usize = 16;
const EXTENT_CACHE_BYTES: usize = 64 << 20;

/// Longest run a materialization gathers into one write.
const RUN_BYTES: u64 = 8 << 20;

impl View {
    /// The sequence number this view shows (every change up to and including it).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Time of the newest change the view includes.
    pub fn time_us(&self) -> u64 {
        self.time_us
    }

    /// The point this view shows, if it was opened by point.
    pub fn point(&self) -> Option<&PointInfo> {
        self.point.as_ref()
    }

    pub fn disks(&self) -> &[DiskSpec] {
        &self.disks
    }

    fn disk(&self, disk: u16) -> Result<(&DiskSpec, &IntervalMap<DataRef>)> {
        match (self.disks.get(disk as usize), self.maps.get(disk as usize)) {
            (Some(d), Some(m)) => Ok((d, m)),
            _ => Err(Error::NotFound(format!("disk {disk} does not exist"))),
        }
    }

    /// Bytes of `disk` that hold data at this view (the rest reads as zeros).
    pub fn allocated_bytes(&self, disk: u16) -> Result<u64> {
        Ok(self.disk(disk)?.1.mapped_bytes())
    }

    /// Allocated runs of `disk` in offset order, adjacent pieces merged.
    pub fn extents(&self, disk: u16) -> Result<Vec<AllocatedExtent>> {
        let (_, map) = self.disk(disk)?;
        let mut out: Vec<AllocatedExtent> = Vec::new();
        for (s, l, _) in map.iter() {
            match out.last_mut() {
                Some(e) if e.offset + e.len == s => e.len += l,
                _ => out.push(AllocatedExtent { offset: s, len: l }),
            }
        }
        Ok(out)
    }

    /// Allocated runs of `disk` within `[offset, offset+len)`, clipped to it (for block
    /// status queries of a mount).
    pub fn extents_in(&self, disk: u16, offset: u64, len: u64) -> Result<Vec<AllocatedExtent>> {
        let (_, map) = self.disk(disk)?;
        let mut out: Vec<AllocatedExtent> = Vec::new();
        for (s, l, _) in map.overlapping(offset, offset.saturating_add(len)) {
            match out.last_mut() {
                Some(e) if e.offset + e.len == s => e.len += l,
                _ => out.push(AllocatedExtent { offset: s, len: l }),
            }
        }
        Ok(out)
    }

    /// Byte ranges `(start, end)` of `disk` where this view and `other` (a view of the
    /// same replica) may differ: everything mapped on either side except the ranges both
    /// read from the same bytes of the same frame. Costs the two views' pieces, no data.
    pub fn maybe_different(&self, other: &View, disk: u16) -> Result<Vec<(u64, u64)>> {
        let (_, a) = self.disk(disk)?;
        let (_, b) = other.disk(disk)?;
        let mut same: Vec<(u64, u64)> = Vec::new();
        for (s, l, r) in a.iter() {
            for (bs, bl, br) in b.overlapping(s, s + l) {
                if r.advance(bs - s) == br {
                    match same.last_mut() {
                        Some(x) if x.1 == bs => x.1 = bs + bl,
                        _ => same.push((bs, bs + bl)),
                    }
                }
            }
        }
        let mut mapped: Vec<(u64, u64)> = a
            .iter()
            .chain(b.iter())
            .map(|(s, l, _)| (s, s + l))
            .collect();
        mapped.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut k = 0usize;
        let mut push = |s: u64, e: u64| {
            if s < e {
                match out.last_mut() {
                    Some(x) if x.1 >= s => x.1 = x.1.max(e),
                    _ => out.push((s, e)),
                }
            }
        };
        for (s, e) in mapped {
            // Subtract the identical ranges (sorted, disjoint) from [s, e).
            while k < same.len() && same[k].1 <= s {
                k += 1;
            }
            let mut at = s;
            let mut j = k;
            while j < same.len() && same[j].0 < e {
                push(at, same[j].0.min(e));
                at = at.max(same[j].1);
                j += 1;
            }
            push(at, e);
        }
        Ok(out)
    }

    /// Frames `(file_id, frame_offset)` this view reads.
    pub(crate) fn frames_read(&self) -> std::collections::BTreeSet<(u64, u64)> {
        self.maps
            .iter()
            .flat_map(|m| m.iter().map(|(_, _, r)| (r.file_id, r.frame_offset)))
            .collect()
    }

    /// The whole extent of a frame (verified), cached.
    fn extent(&self, r: &DataRef) -> Result<Arc<Vec<u8>>> {
        let key = (r.file_id, r.frame_offset);
        {
            let mut cache = self.cache.lock();
            loop {
                if let Some(i) = cache.entries.iter().position(|(k, _)| *k == key) {
                    // Most recently used first: a base extent split by many small overwrites
                    // stays decoded while the reader walks past them.
                    let hit = cache.entries.remove(i).expect("index from position");
                    let data = hit.1.clone();
                    cache.entries.push_front(hit);
                    return Ok(data);
                }
                if !cache.loading.contains(&key) {
                    cache.loading.push(key);
                    break;
                }
                self.decoded.wait(&mut cache);
            }
        }
        let mut out = self.cache.lock().spare.pop().unwrap_or_default();
        let result = self
            .store
            .read_extent_into(r.file_id, r.frame_offset, r.frame_len, &mut out)
            .map(|()| Arc::new(out));
        let mut cache = self.cache.lock();
        cache.loading.retain(|k| *k != key);
        if let Ok(data) = &result {
            Self::keep_decoded(&mut cache, key, data.clone());
        }
        drop(cache);
        self.decoded.notify_all();
        result
    }

    /// Put a decoded extent at the front of the cache (once), evicting by count and bytes.
    fn keep_decoded(cache: &mut ExtentCache, key: (u64, u64), data: Arc<Vec<u8>>) {
        if !cache.entries.iter().any(|(k, _)| *k == key) {
            cache.entries.push_front((key, data));
        }
        {
            let mut bytes = 0usize;
            let mut keep = 0usize;
            for (_, d) in cache.entries.iter() {
                if keep >= EXTENT_CACHE_ENTRIES || bytes + d.len() > EXTENT_CACHE_BYTES {
                    break;
                }
                bytes += d.len();
                keep += 1;
            }
            let keep = keep.max(1);
            while cache.entries.len() > keep {
                // Keep the memory of evicted extents no reader holds any more, for the
                // next decode (fresh allocations cost page faults and zero-fill).
                let Some((_, evicted)) = cache.entries.pop_back() else {
                    break;
                };
                if cache.spare.len() < SPARE_EXTENTS {
                    if let Ok(v) = Arc::try_unwrap(evicted) {
                        cache.spare.push(v);
                    }
                }
            }
        }
    }

    /// Fill `dst` with the bytes of piece `r`. A piece that starts its extent and is not
    /// cached is decoded straight into `dst` when it covers the whole extent (the common
    /// case of a materialization: no intermediate buffer, no second copy); one that turns
    /// out to use only part of its extent leaves the decoded extent cached for the pieces
    /// after it.
    fn fill_piece(&self, r: &DataRef, dst: &mut [u8]) -> Result<()> {
        let key = (r.file_id, r.frame_offset);
        if r.skip == 0 {
            let mut spill = {
                let mut cache = self.cache.lock();
                if cache.entries.iter().any(|(k, _)| *k == key) || cache.loading.contains(&key) {
                    drop(cache);
                    return self.copy_piece(r, dst);
                }
                cache.spare.pop().unwrap_or_default()
            };
            let fit = self.store.read_extent_fit(
                r.file_id,
                r.frame_offset,
                r.frame_len,
                dst,
                &mut spill,
            )?;
            let mut cache = self.cache.lock();
            if fit {
                if cache.spare.len() < SPARE_EXTENTS {
                    cache.spare.push(spill);
                }
                return Ok(());
            }
            let data = Arc::new(spill);
            Self::keep_decoded(&mut cache, key, data.clone());
            drop(cache);
            self.decoded.notify_all();
            let src = data.get(..dst.len()).ok_or_else(|| {
                Error::corrupt(
                    self.store.path(r.file_id),
                    r.frame_offset,
                    "index entry reaches past the end of its extent",
                )
            })?;
            dst.copy_from_slice(src);
            return Ok(());
        }
        self.copy_piece(r, dst)
    }

    /// Hint the data files to read the frames of `run` ahead.
    fn prefetch(&self, run: &Run, pieces: &[(u64, u64, &DataRef)]) {
        let mut last = None;
        for &(_, _, r) in &pieces[run.pieces.clone()] {
            let key = (r.file_id, r.frame_offset);
            if last != Some(key) {
                self.store.will_need(r.file_id, r.frame_offset, r.frame_len);
                last = Some(key);
            }
        }
    }

    fn copy_piece(&self, r: &DataRef, out: &mut [u8]) -> Result<()> {
        let data = self.extent(r)?;
        let start = r.skip as usize;
        let src = data.get(start..start + out.len()).ok_or_else(|| {
            Error::corrupt(
                self.store.path(r.file_id),
                r.frame_offset,
                "index entry reaches past the end of its extent",
            )
        })?;
        out.copy_from_slice(src);
        Ok(())
    }

    /// Read `buf.len()` bytes of `disk` at `offset`.
    pub fn read(&self, disk: u16, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (d, map) = self.disk(disk)?;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= d.size_bytes)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "read of {}+{} is outside disk {disk} ({} bytes)",
                    offset,
                    buf.len(),
                    d.size_bytes
                ))
            })?;
        // Zero only what no piece covers (holes), not the whole buffer first.
        let mut filled = 0usize;
        for (s, l, r) in map.overlapping(offset, end) {
            let at = (s - offset) as usize;
            buf[filled..at].fill(0);
            self.copy_piece(&r, &mut buf[at..at + l as usize])?;
            filled = at + l as usize;
        }
        buf[filled..].fill(0);
        Ok(())
    }

    /// [`View::read`] if every piece of the range is already decoded in the view's cache
    /// (or a hole): `None`, with `buf` unspecified, when any piece would need a decode.
    /// A server's request reader calls it to answer such a read itself (one copy from
    /// memory) instead of handing it to a worker thread and waking it.
    pub fn read_cached(&self, disk: u16, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        let (d, map) = match self.disk(disk) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let end = match offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= d.size_bytes)
        {
            Some(end) => end,
            // The full read names the error.
            None => return Some(self.read(disk, offset, buf)),
        };
        let pieces = map.overlapping(offset, end);
        let mut hits: Vec<Arc<Vec<u8>>> = Vec::with_capacity(pieces.len());
        {
            let mut cache = self.cache.lock();
            for (_, _, r) in &pieces {
                let key = (r.file_id, r.frame_offset);
                let i = cache.entries.iter().position(|(k, _)| *k == key)?;
                if i != 0 {
                    // Most recently used first, as a decoding read leaves it.
                    let hit = cache.entries.remove(i).expect("index from position");
                    cache.entries.push_front(hit);
                }
                hits.push(cache.entries[0].1.clone());
            }
        }
        let mut filled = 0usize;
        for ((s, l, r), data) in pieces.iter().zip(&hits) {
            let at = (s - offset) as usize;
            buf[filled..at].fill(0);
            let out = &mut buf[at..at + *l as usize];
            let start = r.skip as usize;
            match data.get(start..start + out.len()) {
                Some(src) => out.copy_from_slice(src),
                None => {
                    return Some(Err(Error::corrupt(
                        self.store.path(r.file_id),
                        r.frame_offset,
                        "index entry reaches past the end of its extent",
                    )))
                }
            }
            filled = at + *l as usize;
        }
        buf[filled..].fill(0);
        Some(Ok(()))
    }

    /// Write `disk` as a sparse raw image at `out` (which must not exist yet).
    pub fn materialize(&self, disk: u16, out: &Path) -> Result<MaterializeStats> {
        self.materialize_at(&*self.store.vfs, disk, out, false)
    }

    /// [`View::materialize`] through `vfs`, and with `hash` the image's sha256 over its
    /// whole virtual size in [`MaterializeStats::sha256`], computed from the bytes as they
    /// are written (holes hash as zeros), so the image is never read back.
    pub fn materialize_at(
        &self,
        vfs: &dyn crate::vfs::Vfs,
        disk: u16,
        out: &Path,
        hash: bool,
    ) -> Result<MaterializeStats> {
        self.materialize_at_with(vfs, disk, out, hash, &mut |_| {})
    }

    /// [`View::materialize_at`], telling `progress` the bytes of each run as it is done
    /// (in offset order, on the calling thread).
    pub fn materialize_at_with(
        &self,
        vfs: &dyn crate::vfs::Vfs,
        disk: u16,
        out: &Path,
        hash: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<MaterializeStats> {
        let f = vfs.create_new_direct(out).at(out)?;
        let stats = self.materialize_runs(disk, &*f, out, hash, progress)?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            vfs.sync_dir(parent).at(parent)?;
        }
        Ok(stats)
    }

    /// Write `disk` into an open file: set its length to the virtual size, write only
    /// allocated data (holes stay holes), in offset order, adjacent runs coalesced; then
    /// sync it. `path` names the file in errors.
    pub fn materialize_to(
        &self,
        disk: u16,
        f: &dyn VFile,
        path: &Path,
    ) -> Result<MaterializeStats> {
        self.materialize_into(disk, f, path, false)
    }

    /// [`View::materialize_to`], hashing the image as it is written when `hash` is set.
    ///
    /// The runs (adjacent pieces gathered up to [`RUN_BYTES`]) are claimed in offset order
    /// by a few workers, which read, check and decode their extents and write them; each
    /// filled buffer then comes back to this thread, which hashes the runs strictly in
    /// offset order (the gaps between them as zeros) and hands the buffer back. A worker
    /// takes a buffer before it claims a run, so the run this thread waits for always has
    /// one: memory stays at `2 × workers` runs and the pipeline cannot stall.
    pub fn materialize_into(
        &self,
        disk: u16,
        f: &dyn VFile,
        path: &Path,
        hash: bool,
    ) -> Result<MaterializeStats> {
        self.materialize_runs(disk, f, path, hash, &mut |_| {})
    }

    fn materialize_runs(
        &self,
        disk: u16,
        f: &dyn VFile,
        path: &Path,
        hash: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<MaterializeStats> {
        use sha2::Digest;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (d, map) = self.disk(disk)?;
        f.set_len(d.size_bytes).at(path)?;
        let pieces: Vec<(u64, u64, &DataRef)> = map.iter().collect();
        let runs = plan_runs(&pieces);
        // At least four: with writes that bypass the page cache a worker waits for the
        // disk as well as decodes, and four keep both busy on a two-core machine.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(4, 8)
            .min(runs.len().max(1));
        let buffers = 2 * workers;
        let align = f.direct_align().unwrap_or(1);
        let (pool_tx, pool_rx) = crossbeam_channel::bounded::<Vec<u8>>(buffers);
        for _ in 0..buffers {
            let _ = pool_tx.send(Vec::new());
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded::<(usize, Result<Vec<u8>>)>(buffers);
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let mut hasher = hash.then(sha2::Sha256::new);
        let mut stats = MaterializeStats {
            virtual_bytes: d.size_bytes,
            ..Default::default()
        };
        let (runs, pieces) = (&runs, &pieces);
        for run in runs.iter().take(buffers) {
            self.prefetch(run, pieces);
        }
        let outcome: Result<u64> = std::thread::scope(|scope| {
            for _ in 0..workers {
                let (pool_rx, done_tx, next, abort) =
                    (pool_rx.clone(), done_tx.clone(), &next, &abort);
                scope.spawn(move || {
                    while let Ok(mut buf) = pool_rx.recv() {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(run) = runs.get(i).filter(|_| !abort.load(Ordering::SeqCst))
                        else {
                            break;
                        };
                        // Keep the reads of the runs after the ones in flight going while
                        // this one decodes and writes (a cold page cache otherwise waits
                        // on one read per worker at a time).
                        if let Some(ahead) = runs.get(i + buffers) {
                            self.prefetch(ahead, pieces);
                        }
                        let r = self.write_run(run, pieces, &mut buf, f, path).map(|_| buf);
                        if done_tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done_tx);
            drop(pool_rx);
            let (pool_tx, done_rx) = (pool_tx, done_rx);
            let result = (|| {
                let mut ready: std::collections::BTreeMap<usize, Vec<u8>> = Default::default();
                let mut hashed_to = 0u64;
                let mut k = 0usize;
                while k < runs.len() {
                    let (i, r) = done_rx
                        .recv()
                        .map_err(|_| Error::Invalid("a materialize thread panicked".into()))?;
                    ready.insert(i, r?);
                    while let Some(buf) = ready.remove(&k) {
                        let run = &runs[k];
                        if let Some(h) = hasher.as_mut() {
                            hash_zeros(h, run.start - hashed_to);
                            h.update(&buf[window(&buf, run, align)]);
                            hashed_to = run.start + run.len;
                        }
                        stats.written_bytes += run.len;
                        stats.writes += 1;
                        progress(run.len);
                        let _ = pool_tx.send(buf);
                        k += 1;
                    }
                }
                Ok(hashed_to)
            })();
            if result.is_err() {
                abort.store(true, Ordering::SeqCst);
            }
            result
        });
        let hashed_to = outcome?;
        if let Some(mut h) = hasher {
            hash_zeros(&mut h, d.size_bytes - hashed_to);
            stats.sha256 = Some(h.finalize().into());
        }
        f.sync_data().at(path)?;
        Ok(stats)
    }
}

/// Where in `buf` a run's bytes go: at the same offset modulo `align` in memory as in the
/// file, so a file that writes aligned blocks direct can take them from this memory.
fn window(buf: &[u8], run: &Run, align: usize) -> std::ops::Range<usize> {
    let a = align as u64;
    let start = ((run.start % a + a - (buf.as_ptr() as u64) % a) % a) as usize;
    start..start + run.len as usize
}

/// One write of a materialization: `len` bytes at `start`, gathered from `pieces`.
struct Run {
    start: u64,
    len: u64,
    pieces: std::ops::Range<usize>,
}

/// Group pieces (in offset order) into runs of adjacent ones, each at most [`RUN_BYTES`]
/// (a single longer piece is a run of its own).
fn plan_runs(pieces: &[(u64, u64, &DataRef)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, &(s, l, _)) in pieces.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if r.start + r.len == s && r.len + l <= RUN_BYTES => {
                r.len += l;
                r.pieces.end = i + 1;
            }
            _ => runs.push(Run {
                start: s,
                len: l,
                pieces: i..i + 1,
            }),
        }
    }
    runs
}

/// Feed `n` zero bytes to `h` (a hole of the image), without reading anything.
fn hash_zeros(h: &mut sha2::Sha256, mut n: u64) {
    use sha2::Digest;
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

impl View {
    /// Gather `run`'s pieces into `buf` and write them at the run's offset.
    fn write_run(
        &self,
        run: &Run,
        pieces: &[(u64, u64, &DataRef)],
        buf: &mut Vec<u8>,
        f: &dyn VFile,
        path: &Path,
    ) -> Result<()> {
        let len = run.len as usize;
        let align = f.direct_align().unwrap_or(1);
        if buf.len() < len + align {
            // Grown only (buffers are reused): the run's pieces cover its window exactly,
            // so every byte written below is overwritten first, and nothing is zeroed twice.
            buf.resize(len + align, 0);
        }
        let w = window(buf, run, align);
        let mut at = w.start;
        for &(_, l, r) in &pieces[run.pieces.clone()] {
            let l = l as usize;
            self.fill_piece(r, &mut buf[at..at + l])?;
            at += l;
        }
        f.write_all_at(&buf[w], run.start).at(path)?;
        // Start writing it back now, so the final sync finds little left (a hint).
        let _ = f.start_writeback(run.start, run.len);
        Ok(())
    }
}

impl Replica {
    /// A view of a recovery point.
    pub fn view_point(&self, id: u64) -> Result<View> {
        let (k, p) = self
            .manifest
            .points
            .iter()
            .enumerate()
            .find(|(_, p)| p.info.id == id)
            .ok_or_else(|| Error::NotFound(format!("recovery point {id} does not exist")))?;
        self.check_readable(k, &format!("recovery point {id}"))?;
        let mut v = self.build_view(&self.layers[..=k], None, p.info.seq)?;
        v.point = Some(p.info.clone());
        v.time_us = p.info.time_us;
        Ok(v)
    }

    /// A view of everything applied so far.
    pub fn view_latest(&self) -> Result<View> {
        self.view_seq(self.applied_seq)
    }

    /// Whether the state at `seq` can be rebuilt exactly: a point's seq, anything in the
    /// open layer, or a seq inside a layer's exact range (the any-moment window).
    pub fn is_viewable(&self, seq: u64) -> bool {
        self.locate(seq).is_ok()
    }

    /// Index of the layer that holds `seq` (`layers.len()` for the open layer).
    fn locate(&self, seq: u64) -> Result<usize> {
        if seq > self.applied_seq {
            return Err(Error::NotFound(format!(
                "sequence number {seq} is beyond what was applied ({})",
                self.applied_seq
            )));
        }
        let k = self.layers.partition_point(|l| l.end_seq < seq);
        self.check_readable(k, &format!("the state at seq {seq}"))?;
        if k == self.layers.len() {
            return Ok(k);
        }
        let l = &self.layers[k];
        if seq == l.end_seq || seq >= l.exact_from {
            return Ok(k);
        }
        Err(Error::NotFound(format!(
            "sequence number {seq} is outside the any-moment window (changes between \
             points there were coalesced); pick a recovery point"
        )))
    }

    /// Sequence numbers that can be viewed exactly, as inclusive ranges (oldest first).
    pub fn viewable_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, b: u64| match out.last_mut() {
            Some(r) if r.1 + 1 >= a => r.1 = r.1.max(b),
            _ => out.push((a, b)),
        };
        let intact = self.first_damaged().unwrap_or(self.layers.len());
        for l in &self.layers[..intact] {
            if l.exact_from < l.end_seq {
                push(l.exact_from, l.end_seq);
            } else {
                push(l.end_seq, l.end_seq);
            }
        }
        if intact == self.layers.len() {
            push(self.manifest.sealed_seq(), self.applied_seq);
        }
        out
    }

    /// A view of the state right after `seq` was applied (inside the any-moment window).
    pub fn view_seq(&self, seq: u64) -> Result<View> {
        let k = self.locate(seq)?;
        if k == self.layers.len() {
            let snap = self.open_snapshot(seq);
            return self.build_view(&self.layers, Some(snap), seq);
        }
        let l = &self.layers[k];
        if seq == l.end_seq {
            return self.build_view(&self.layers[..=k], None, seq);
        }
        self.build_view(&self.layers[..k], Some(l.clone()), seq)
    }

    /// A view of the state at wall-clock `time_us`: every change recorded at or before it.
    ///
    /// The answer is the state after the last change at or before `time_us`, which lies
    /// between the newest known seq at or before it and the next known seq after it (seqs
    /// of records that left no entry, such as markers, are not known); any viewable seq in
    /// that gap shows the same state, and the newest one is used. A time whose changes were
    /// coalesced away (outside the any-moment window) is refused.
    pub fn view_time(&self, time_us: u64) -> Result<View> {
        let mut best: Option<u64> = None;
        let mut upper = self.applied_seq + 1;
        let mut known = |seq: u64, t: u64| {
            if t <= time_us {
                best = Some(best.map_or(seq, |b| b.max(seq)));
            } else {
                upper = upper.min(seq);
            }
        };
        for p in &self.manifest.points {
            known(p.info.seq, p.info.time_us);
        }
        for l in self
            .layers
            .iter()
            .map(|l| &l.entries)
            .chain([&self.open.entries])
        {
            let n = l.partition_point(|e| e.time_us <= time_us);
            if n > 0 {
                known(l[n - 1].seq, l[n - 1].time_us);
            }
            if let Some(e) = l.get(n) {
                known(e.seq, e.time_us);
            }
        }
        known(self.applied_seq, self.applied_time_us);
        let Some(best) = best else {
            return Err(Error::NotFound(format!(
                "nothing was replicated at or before time {time_us} µs"
            )));
        };
        if let Some(j) = self.first_damaged() {
            if best > self.layers[j].base_seq {
                self.check_readable(j, &format!("the state at time {time_us} µs"))?;
            }
        }
        let seq = self
            .viewable_ranges()
            .into_iter()
            .filter_map(|(a, b)| {
                let hi = b.min(upper.saturating_sub(1));
                (hi >= a.max(best)).then_some(hi)
            })
            .max()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "time {time_us} µs is outside the any-moment window (changes around it \
                     were coalesced); pick a recovery point"
                ))
            })?;
        self.view_seq(seq)
    }

    /// The open layer's entries up to `seq`, as a pinned snapshot.
    fn open_snapshot(&self, seq: u64) -> Arc<LayerIndex> {
        let n = self.open.entries.partition_point(|e| e.seq <= seq);
        let snap = Arc::new(LayerIndex {
            layer_id: 0,
            base_seq: self.manifest.sealed_seq(),
            end_seq: seq,
            exact_from: self.manifest.sealed_seq(),
            compat: 0,
            entries: self.open.entries[..n].to_vec(),
        });
        let mut pending = self.pending_pins.lock();
        // Snapshots no view holds any more never counted as references: just drop them.
        pending.retain(|p| Arc::strong_count(p) > 1);
        pending.push(snap.clone());
        snap
    }

    /// Overlay `full` layers wholly, then `partial`'s entries up to `seq`.
    fn build_view(
        &self,
        full: &[Arc<LayerIndex>],
        partial: Option<Arc<LayerIndex>>,
        seq: u64,
    ) -> Result<View> {
        // The disks of that state: one added later is not there, a grown one has its size
        // then (its entries fit it; a clip only guards an add that was taken over).
        let disks = self.manifest.disks_at(seq);
        let mut maps: Vec<IntervalMap<DataRef>> =
            disks.iter().map(|_| IntervalMap::new()).collect();
        let mut time_us = 0;
        let mut overlay = |e: &Entry| {
            let (Some(map), Some(d)) = (maps.get_mut(e.disk as usize), disks.get(e.disk as usize))
            else {
                return;
            };
            time_us = time_us.max(e.time_us);
            if e.offset >= d.size_bytes {
                return;
            }
            let mut e = *e;
            e.len = e.len.min(d.size_bytes - e.offset);
            let e = &e;
            match e.loc {
                Loc::Data {
                    file_id,
                    frame_offset,
                    frame_len,
                    skip,
                } => map.insert(
                    e.offset,
                    e.len,
                    DataRef {
                        file_id,
                        frame_offset,
                        frame_len,
                        skip: skip as u64,
                    },
                ),
                Loc::Zero { .. } => map.remove(e.offset, e.len),
            }
        };
        for l in full {
            l.entries.iter().for_each(&mut overlay);
        }
        if let Some(p) = &partial {
            p.entries
                .iter()
                .take_while(|e| e.seq <= seq)
                .for_each(&mut overlay);
        }
        let mut pins: Vec<Arc<LayerIndex>> = full.to_vec();
        pins.extend(partial);
        Ok(View {
            store: self.store.clone(),
            disks,
            maps,
            seq,
            time_us,
            point: None,
            cache: Mutex::new(ExtentCache::default()),
            decoded: parking_lot::Condvar::new(),
            _pins: pins,
        })
    }
}
