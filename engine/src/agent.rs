//! The write tap (the mobility agent's library face): a block device over a VM's source
//! images whose every write, zero range and marker goes through the VM's change log first.
//!
//! The log is the source images' write-ahead log. A write is acknowledged once it is
//! *written* to the log (or *durable*, with FUA); it reaches the source image only after
//! it is durable in the log, in sequence order, so the source never holds a write the log
//! lacks. Meanwhile reads see it from the pending set. After the pending writes are applied
//! and the source images fdatasynced, the agent records the sequence number it reached in
//! the log (`Cache::set_source_seq`), which also keeps the log from trimming what the
//! source may still need; on open it replays every retained record above it into the
//! source (idempotent: same bytes, same order), which heals a crash at any instruction.

use crate::cache::Cache;
use crate::error::{Error, IoContext, Result};
use crate::record::{Entry, Marker, MarkerKind, Op};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Past this many pending bytes, a write first makes the log durable and drains them. The
/// background drain keeps the set far below this (the log syncs itself every
/// [`crate::cache::CacheConfig::auto_sync_bytes`]); the bound only stops a stalled drain
/// from letting memory grow without limit.
const MAX_PENDING_BYTES: u64 = 256 << 20;
/// Most bytes one block-status answer of the agent covers.
const BLOCK_STATUS_WINDOW_BYTES: u64 = 64 << 20;
/// Most data ranges of a source image one block-status answer looks at.
const BLOCK_STATUS_MAX_RANGES: usize = 64;
/// Most bytes one drain round applies to the source images before it lets writers and
/// readers at the pending set again.
const DRAIN_BATCH_BYTES: u64 = 8 << 20;

/// One source disk of the VM.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

#[derive(Clone)]
enum Change {
    /// Shared, so a drain can apply it to the source image without holding the set;
    /// a `Vec`, so the buffer the NBD server read the payload into is kept, not copied.
    Data(Arc<Vec<u8>>),
    Zero(u64),
    /// A marker: nothing to apply, but it holds its place in the sequence.
    Nothing,
    /// A resync block of this many bytes: the source image already holds it (nothing to
    /// apply, nor to overlay on reads), but until it is durable in the log its blocks are
    /// marked again if the log fails.
    Shipped(u64),
}

#[derive(Clone)]
struct Pending {
    disk: u16,
    offset: u64,
    change: Change,
}

struct State {
    /// Acknowledged changes not yet in the source images, by sequence number.
    pending: BTreeMap<u64, Pending>,
    /// The same changes by place, per disk: `(offset, seq) -> len`, so a read finds the
    /// pending changes it overlaps without scanning the whole set.
    by_place: Vec<BTreeMap<(u64, u64), u64>>,
    /// Longest pending change per disk (bounds how far before a read to look).
    longest: Vec<u64>,
    pending_bytes: u64,
    /// Every change up to here is in the source images (maybe not yet synced).
    applied_seq: u64,
}

impl Pending {
    /// The byte range this change covers, if it changes bytes.
    fn range(&self) -> Option<(u64, u64)> {
        match &self.change {
            Change::Data(d) => Some((self.offset, d.len() as u64)),
            Change::Zero(len) => Some((self.offset, *len)),
            Change::Nothing | Change::Shipped(_) => None,
        }
    }
}

impl State {
    fn insert(&mut self, seq: u64, p: Pending) {
        if let Some((offset, len)) = p.range() {
            let d = p.disk as usize;
            if let (Some(map), Some(longest)) = (self.by_place.get_mut(d), self.longest.get_mut(d))
            {
                map.insert((offset, seq), len);
                *longest = (*longest).max(len);
            }
        }
        if let Change::Data(d) = &p.change {
            self.pending_bytes += d.len() as u64;
        }
        self.pending.insert(seq, p);
    }

    fn remove(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        if let Some((offset, _)) = p.range() {
            let d = p.disk as usize;
            if let Some(map) = self.by_place.get_mut(d) {
                map.remove(&(offset, seq));
                if map.is_empty() {
                    self.longest[d] = 0;
                }
            }
        }
        if let Change::Data(d) = &p.change {
            self.pending_bytes -= d.len() as u64;
        }
        Some(p)
    }

    /// Sequence numbers of the pending changes of `disk` that overlap `[start, end)`, in
    /// sequence order.
    fn overlapping(&self, disk: u16, start: u64, end: u64) -> Vec<u64> {
        let (Some(map), Some(&longest)) = (
            self.by_place.get(disk as usize),
            self.longest.get(disk as usize),
        ) else {
            return Vec::new();
        };
        let from = start.saturating_sub(longest);
        let mut seqs: Vec<u64> = map
            .range((from, 0)..(end, 0))
            .filter(|(&(o, _), &len)| o + len > start)
            .map(|(&(_, seq), _)| seq)
            .collect();
        seqs.sort_unstable();
        seqs
    }
}

/// The write tap over one VM. All methods take `&self` and may be called from many threads.
pub struct Agent {
    /// The log. Swapped (under the mode's write lock, in bitmap mode) when its owner reopens
    /// it after a failure: see [`Agent::reopen_log`].
    cache: RwLock<Arc<Cache>>,
    disks: Vec<(SourceDisk, File)>,
    state: RwLock<State>,
    /// Serializes draining (applying pending changes to the source images).
    drain: Mutex<()>,
    /// `Some` while the log cannot take writes (full): they go straight to the source
    /// images and their blocks are marked here until a resync ships them.
    mode: RwLock<Option<Dirty>>,
    /// Why the log failed (a write or sync error latched it, e.g. its disk is full), while
    /// it has: the agent is in bitmap mode until its owner reopens the log.
    log_failure: Mutex<Option<String>>,
    /// Called before the first write goes to the source images alone (entering bitmap
    /// mode), so the caller can persist that a resync is owed before it can be lost.
    on_bitmap: Mutex<Option<BitmapHook>>,
    /// Whether the current resync has written its `standby:resync-begin` marker.
    resync_begun: Mutex<bool>,
    /// Writes and zero ranges the client has asked for since open (background work such
    /// as a resync is not counted): how the runtime tells that the client is busy.
    client_ops: std::sync::atomic::AtomicU64,
    /// Latency and bytes of the client's requests, for monitoring (atomics only).
    stats: Arc<crate::util::latency::WriteStats>,
    /// Bytes of source blocks resyncs shipped into the log since open.
    resync_shipped: std::sync::atomic::AtomicU64,
    /// A group point's barrier holds the client's acknowledgements here (docs/groups.md).
    hold: crate::util::hold::Hold,
    /// The marker the barrier cut under its hold, not yet known durable: the group point's
    /// id, the marker's seq and the log it went into.
    group_marker: Mutex<Option<(String, u64, Arc<Cache>)>>,
}

/// Called with `true` before the first write goes to the source images alone, and with
/// `false` once a resync ended and the source hold covers it, before writes go through
/// the log again.
type BitmapHook = Box<dyn Fn(bool) -> Result<()> + Send + Sync>;

/// The markers the agent writes around a resync: the log between them is not a
/// crash-consistent sequence (blocks arrive in block order, not write order), so the
/// processor cuts no point inside that window. Typed, so no user's point name can pass
/// for one.
pub const RESYNC_BEGIN: MarkerKind = MarkerKind::ResyncBegin;
pub const RESYNC_END: MarkerKind = MarkerKind::ResyncEnd;

/// Blocks written while the log could not take them, per disk, in bounded memory: the
/// block size grows with the disks so the whole map stays under `MAX_DIRTY_BITS` bits.
pub struct Dirty {
    block_bytes: u64,
    bits: Vec<Vec<u64>>,
    count: u64,
}

const MAX_DIRTY_BITS: u64 = 64 << 20; // 8 MiB of bitmap
const MIN_DIRTY_BLOCK: u64 = 64 << 10;

impl Dirty {
    fn new(sizes: &[u64]) -> Dirty {
        let total: u64 = sizes.iter().sum();
        let mut block_bytes = MIN_DIRTY_BLOCK;
        while total / block_bytes > MAX_DIRTY_BITS {
            block_bytes *= 2;
        }
        let bits = sizes
            .iter()
            .map(|s| vec![0u64; s.div_ceil(block_bytes).div_ceil(64) as usize])
            .collect();
        Dirty {
            block_bytes,
            bits,
            count: 0,
        }
    }

    fn mark(&mut self, disk: u16, offset: u64, len: u64) {
        let Some(words) = self.bits.get_mut(disk as usize) else {
            return;
        };
        let first = offset / self.block_bytes;
        let last = (offset + len.max(1) - 1) / self.block_bytes;
        for b in first..=last {
            let (w, bit) = ((b / 64) as usize, b % 64);
            if let Some(word) = words.get_mut(w) {
                if *word & (1 << bit) == 0 {
                    *word |= 1 << bit;
                    self.count += 1;
                }
            }
        }
    }

    /// The first dirty block: (disk, block index).
    fn first(&self) -> Option<(u16, u64)> {
        for (d, words) in self.bits.iter().enumerate() {
            for (w, word) in words.iter().enumerate() {
                if *word != 0 {
                    return Some((d as u16, w as u64 * 64 + word.trailing_zeros() as u64));
                }
            }
        }
        None
    }

    fn clear(&mut self, disk: u16, block: u64) {
        if let Some(word) = self
            .bits
            .get_mut(disk as usize)
            .and_then(|w| w.get_mut((block / 64) as usize))
        {
            if *word & (1 << (block % 64)) != 0 {
                *word &= !(1 << (block % 64));
                self.count -= 1;
            }
        }
    }

    /// Bytes still to resync (whole blocks).
    pub fn bytes(&self) -> u64 {
        self.count * self.block_bytes
    }
}

impl Agent {
    /// Open the tap over `disks`, replaying into the source images whatever the log holds
    /// beyond what they are known to hold.
    pub fn open(cache: Arc<Cache>, disks: Vec<SourceDisk>) -> Result<Agent> {
        Self::open_with(cache, disks, true)
    }

    /// Open the tap; without `replay`, the source images are known to hold every change
    /// the log retains and possibly newer writes (the log failed while the agent wrote
    /// around it): nothing is replayed over them, and the source hold is recorded at the
    /// log's durable end. The caller must then resync every block
    /// ([`Agent::require_full_resync`]).
    pub fn open_with(cache: Arc<Cache>, disks: Vec<SourceDisk>, replay: bool) -> Result<Agent> {
        let mut opened = Vec::with_capacity(disks.len());
        for d in disks {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&d.path)
                .at(&d.path)?;
            // Two agents writing one image would each replicate half of it: the first to
            // open it holds it for as long as it runs.
            if !crate::fsutil::try_lock_exclusive(&f).at(&d.path)? {
                return Err(Error::Conflict(format!(
                    "source disk '{}' ({}) is locked by {}: one agent at a time serves an image",
                    d.name,
                    d.path.display(),
                    crate::fsutil::flock_holder(&f)
                        .unwrap_or_else(|| "another process (it holds a lock on it)".into())
                )));
            }
            let len = f.metadata().at(&d.path)?.len();
            if len != d.size_bytes {
                let hint = if len > d.size_bytes {
                    format!(
                        " (a grown image: `standby disk resize VM {} {len}` records its new size)",
                        d.name
                    )
                } else {
                    String::new()
                };
                return Err(Error::Invalid(format!(
                    "source disk '{}' ({}) is {len} bytes, the vault expects {}{hint}",
                    d.name,
                    d.path.display(),
                    d.size_bytes
                )));
            }
            opened.push((d, f));
        }
        let synced = cache.source_seq()?.unwrap_or(0);
        let stats = Arc::new(crate::util::latency::WriteStats::new(opened.len()));
        let agent = Agent {
            stats,
            state: RwLock::new(State {
                pending: BTreeMap::new(),
                by_place: vec![BTreeMap::new(); opened.len()],
                longest: vec![0; opened.len()],
                pending_bytes: 0,
                applied_seq: synced,
            }),
            cache: RwLock::new(cache),
            disks: opened,
            drain: Mutex::new(()),
            mode: RwLock::new(None),
            log_failure: Mutex::new(None),
            on_bitmap: Mutex::new(None),
            resync_begun: Mutex::new(false),
            client_ops: std::sync::atomic::AtomicU64::new(0),
            resync_shipped: std::sync::atomic::AtomicU64::new(0),
            hold: Default::default(),
            group_marker: Mutex::new(None),
        };
        if replay {
            agent.replay(synced)?;
        } else {
            let durable = agent.log().durable_seq();
            agent.state.write().applied_seq = durable;
            if synced != durable {
                agent.log().set_source_seq(durable)?;
            }
        }
        Ok(agent)
    }

    fn replay(&self, synced: u64) -> Result<()> {
        let durable = self.log().durable_seq();
        if durable <= synced {
            self.state.write().applied_seq = durable.max(synced);
            return Ok(());
        }
        let first = self.log().stats().first_seq;
        let mut reader = self.log().reader((synced + 1).max(first))?;
        while let Some(rec) = reader.next_record()? {
            // A record of a disk beyond the VM's disks is a `disk add` that did not finish
            // (the catalog does not list the disk): its data came from that disk's image,
            // which this agent does not serve, and the next `disk add` copies it again.
            let disk = match &rec.op {
                Op::Write { disk, .. } | Op::Zero { disk, .. } => Some(*disk as usize),
                Op::Marker(_) => None,
            };
            if disk.is_some_and(|d| d >= self.disks.len()) {
                continue;
            }
            self.apply_op(&rec.op)?;
        }
        self.sync_sources()?;
        self.state.write().applied_seq = durable;
        self.log().set_source_seq(durable)
    }

    /// Run `hook(true)` before the agent first writes to the source images alone (it
    /// enters bitmap mode; if the hook fails, the write fails and nothing is written,
    /// unless the log failed: then the write goes on), and `hook(false)` when a resync has
    /// ended, the log holds it durably and the source hold covers it, before writes go
    /// through the log again (if it fails, the agent stays in bitmap mode and tries again
    /// at the next resync step).
    pub fn on_bitmap(&self, hook: impl Fn(bool) -> Result<()> + Send + Sync + 'static) {
        *self.on_bitmap.lock() = Some(Box::new(hook));
    }

    pub fn disks(&self) -> impl Iterator<Item = &SourceDisk> {
        self.disks.iter().map(|(d, _)| d)
    }

    /// The log (the one in use now: its owner may reopen it after a failure).
    pub fn cache(&self) -> Arc<Cache> {
        self.log()
    }

    fn log(&self) -> Arc<Cache> {
        self.cache.read().clone()
    }

    /// True if `e` says the log itself failed (rather than the request or a source image):
    /// its latched error, or an I/O error on one of its files.
    pub fn is_log_error(&self, e: &Error) -> bool {
        match e {
            Error::Poisoned(_) => true,
            Error::Io { path, .. } => path.starts_with(self.log().dir()),
            _ => false,
        }
    }

    /// Why the log cannot take writes because it failed, if it did (not merely full).
    pub fn log_failure(&self) -> Option<String> {
        self.log_failure.lock().clone()
    }

    /// The log failed (its owner saw `e` on it): track writes in the dirty bitmap until the
    /// log is reopened.
    pub fn log_failed(&self, e: &Error) -> Result<()> {
        self.enter_bitmap_mode(Some(e))
    }

    /// Swap in `log`, the failed log reopened (recovery ran): the source images hold every
    /// change the new log retains, so it is told so, and the resync of the dirty bitmap
    /// can begin. Only while the old log is failed (so nothing is in flight through it).
    pub fn reopen_log(&self, log: Arc<Cache>) -> Result<()> {
        let mode = self.mode.write();
        if mode.is_none() || self.log_failure.lock().is_none() {
            return Err(Error::Conflict(
                "internal: the change log is reopened only after it failed".into(),
            ));
        }
        let _one = self.drain.lock();
        // Every change the new log holds is in the source images (bitmap mode began by
        // applying every pending change to them): no replay may ever redo one over a
        // newer direct write.
        let durable = log.durable_seq();
        log.set_source_seq(durable)?;
        {
            let mut st = self.state.write();
            st.pending.clear();
            for m in &mut st.by_place {
                m.clear();
            }
            st.longest.iter_mut().for_each(|l| *l = 0);
            st.pending_bytes = 0;
            st.applied_seq = durable;
        }
        let old = std::mem::replace(&mut *self.cache.write(), log);
        // Stop the old log's writer (it refuses everything anyway).
        let _ = old.close();
        *self.log_failure.lock() = None;
        *self.resync_begun.lock() = false;
        drop(mode);
        Ok(())
    }

    fn check(&self, disk: u16, offset: u64, len: u64) -> Result<&(SourceDisk, File)> {
        let d = self
            .disks
            .get(disk as usize)
            .ok_or_else(|| Error::NotFound(format!("disk {disk} does not exist")))?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > d.0.size_bytes)
        {
            return Err(Error::Invalid(format!(
                "{len} bytes at offset {offset} run past the end of disk '{}' ({} bytes)",
                d.0.name, d.0.size_bytes
            )));
        }
        Ok(d)
    }

    /// The latency and bytes of the client's requests (what `--metrics` exposes); an
    /// `Arc` apart from the tap, so a reader never keeps the tap itself alive.
    pub fn write_stats(&self) -> Arc<crate::util::latency::WriteStats> {
        self.stats.clone()
    }

    /// Writes and zero ranges the client has asked for since the tap was opened.
    pub fn client_ops(&self) -> u64 {
        self.client_ops.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Write `data` at `offset` of `disk`; returns once it is written to the log (durable
    /// too if `fua`). Offset and length must be multiples of 512.
    pub fn write(&self, disk: u16, offset: u64, data: &[u8], fua: bool) -> Result<u64> {
        self.check(disk, offset, data.len() as u64)?;
        self.write_owned(disk, offset, data.to_vec(), fua)
    }

    /// [`Agent::write`] of a buffer the caller gives up: the pending set keeps it until
    /// the source image holds it, so the payload is not copied once more.
    pub fn write_owned(&self, disk: u16, offset: u64, data: Vec<u8>, fua: bool) -> Result<u64> {
        self.check(disk, offset, data.len() as u64)?;
        self.client_ops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let len = data.len() as u64;
        let data = Arc::new(data);
        let r = self.submit(
            &Entry::Write {
                disk,
                offset,
                data: &data,
            },
            || Pending {
                disk,
                offset,
                change: Change::Data(data.clone()),
            },
            fua,
        );
        self.hold.pass();
        let seq = r?;
        self.stats.record(disk, started.elapsed(), len);
        Ok(seq)
    }

    /// Make `len` bytes at `offset` read as zeros (NBD WRITE_ZEROES, or TRIM if `trim`).
    pub fn zero(&self, disk: u16, offset: u64, len: u64, trim: bool, fua: bool) -> Result<u64> {
        self.check(disk, offset, len)?;
        self.client_ops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = self.submit(
            &Entry::Zero {
                disk,
                offset,
                len,
                trim,
            },
            || Pending {
                disk,
                offset,
                change: Change::Zero(len),
            },
            fua,
        );
        self.hold.pass();
        let seq = r?;
        self.stats.record(disk, started.elapsed(), 0);
        Ok(seq)
    }

    /// The hold on the client's acknowledgements (a group point's barrier): writes still
    /// go into the log while it is in force; [`Agent::write`] and [`Agent::zero`] return
    /// only once it ends.
    pub fn ack_hold(&self) -> &crate::util::hold::Hold {
        &self.hold
    }

    /// Write a recovery-point marker, ordered with the writes; returns once it is durable.
    pub fn marker(&self, marker: &Marker) -> Result<u64> {
        self.submit(
            &Entry::Marker(marker),
            || Pending {
                disk: 0,
                offset: 0,
                change: Change::Nothing,
            },
            true,
        )
    }

    /// A group point's marker, cut under the hold `group_point`: returns its seq once it is
    /// written, not waiting for it to be durable, so the hold (the VM's acknowledgements
    /// waiting) lasts no fsync. [`Agent::group_release`] waits for its durability after
    /// the hold ends: every write acknowledged after the release is behind the marker in the
    /// log and durable only with it, so nothing acknowledged can be in the log without it.
    pub fn group_marker(&self, group_point: &str, marker: &Marker) -> Result<u64> {
        // The log before the append: if it is swapped meanwhile (it failed), waiting on the
        // old one fails, and the group point with it.
        let log = self.log();
        let seq = self.submit(
            &Entry::Marker(marker),
            || Pending {
                disk: 0,
                offset: 0,
                change: Change::Nothing,
            },
            false,
        )?;
        *self.group_marker.lock() = Some((group_point.to_string(), seq, log));
        Ok(seq)
    }

    /// End the hold `group_point`, then wait until the marker cut under it is durable.
    /// `Ok(true)` if the hold lasted until now and its marker is durable; `Ok(false)` if the
    /// hold lapsed at its deadline; an error if the marker could not be made durable.
    pub fn group_release(&self, group_point: &str) -> Result<bool> {
        let intact = self.hold.release(group_point);
        let marker = {
            let mut m = self.group_marker.lock();
            match &*m {
                Some((id, _, _)) if id == group_point => m.take(),
                _ => None,
            }
        };
        if let Some((_, seq, log)) = marker {
            log.wait_durable(seq)?;
        }
        Ok(intact)
    }

    /// Append `entry`, a record of a disk this tap does not serve (the initial copy of a
    /// disk being added), in order with the VM's writes, without touching the source images:
    /// it is tracked like a marker, so the drain stays gapless. Refused while the tap tracks
    /// writes in its dirty bitmap; a full log (`Error::CacheFull`) is the caller's to wait
    /// out (by processing). Returns its seq once it is written.
    pub fn append_beside(&self, entry: &Entry<'_>) -> Result<u64> {
        let mode = self.mode.read();
        if mode.is_some() {
            return Err(Error::Conflict(
                "the VM's writes are tracked in the dirty bitmap (the change log could not take them): try again once the resync has ended".into(),
            ));
        }
        let log = self.log();
        let seq = log.append(entry)?;
        self.state.write().insert(
            seq,
            Pending {
                disk: 0,
                offset: 0,
                change: Change::Nothing,
            },
        );
        drop(mode);
        log.wait_written(seq)?;
        Ok(seq)
    }

    fn submit(
        &self,
        entry: &Entry<'_>,
        pending: impl FnOnce() -> Pending,
        durable: bool,
    ) -> Result<u64> {
        if self.state.read().pending_bytes > MAX_PENDING_BYTES {
            if let Err(e) = self.flush_log_and_drain() {
                if !self.is_log_error(&e) {
                    return Err(e);
                }
                self.enter_bitmap_mode(Some(&e))?;
            }
        }
        loop {
            // Appending and recording the pending change happen under the mode's read lock,
            // so a switch to bitmap mode (write lock) sees every appended change in `pending`.
            let mode = self.mode.read();
            if mode.is_some() {
                drop(mode);
                match self.direct(entry, durable)? {
                    Some(seq) => return Ok(seq),
                    None => continue, // the resync ended meanwhile: through the log again
                }
            }
            let log = self.log();
            let seq = match log.append(entry) {
                Ok(seq) => seq,
                Err(e) if self.refused(&e) && !matches!(entry, Entry::Marker(_)) => {
                    drop(mode);
                    // Full, or failed (its disk is full, an I/O error): the VM's write
                    // must not fail for the vault's trouble.
                    let failed = !matches!(e, Error::CacheFull { .. });
                    self.enter_bitmap_mode(failed.then_some(&e))?;
                    match self.direct(entry, durable)? {
                        Some(seq) => return Ok(seq),
                        None => continue,
                    }
                }
                Err(e) => {
                    if self.is_log_error(&e) {
                        self.enter_bitmap_mode(Some(&e))?;
                    }
                    return Err(e);
                }
            };
            let p = pending();
            self.state.write().insert(seq, p);
            drop(mode);
            let waited = if durable {
                log.wait_durable(seq)
            } else {
                log.wait_written(seq)
            };
            match waited {
                Ok(()) => return Ok(seq),
                Err(e) if self.is_log_error(&e) => {
                    // The log failed under this change: bitmap mode begins by applying
                    // every pending change (this one too) to the source images and
                    // marking its blocks, and syncs them.
                    self.enter_bitmap_mode(Some(&e))?;
                    if matches!(entry, Entry::Marker(_)) {
                        return Err(e);
                    }
                    return Ok(seq);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the log refused an append in a way bitmap mode answers: it is full, or it
    /// failed.
    fn refused(&self, e: &Error) -> bool {
        matches!(e, Error::CacheFull { .. }) || self.is_log_error(e)
    }

    /// The log cannot take writes: track them in the dirty bitmap instead. If it is full,
    /// first make everything it took durable and applied. If it failed (`failure`), what
    /// it took may never become durable there: every pending change is applied to the
    /// source images, synced, and its blocks marked, so the resync ships it once the log
    /// is reopened.
    fn enter_bitmap_mode(&self, failure: Option<&Error>) -> Result<()> {
        let mut mode = self.mode.write();
        let mut failure = failure.map(|e| self.failure_text(e));
        if let Some(dirty) = mode.as_mut() {
            if let Some(f) = failure {
                // The log failed in the middle of a resync: blocks it took may never be
                // written, so they are dirty again.
                self.remark_shipped(dirty);
                self.log_failure.lock().get_or_insert(f);
            }
            return Ok(());
        }
        let sizes: Vec<u64> = self.disks.iter().map(|(d, _)| d.size_bytes).collect();
        let mut dirty = Dirty::new(&sizes);
        if failure.is_none() {
            match self.flush_log_and_drain() {
                Ok(_) => {}
                Err(e) if self.is_log_error(&e) => failure = Some(self.failure_text(&e)),
                Err(e) => return Err(e),
            }
        }
        if failure.is_some() {
            self.spill_pending(&mut dirty)?;
        }
        if let Some(hook) = &*self.on_bitmap.lock() {
            // A failed log's hook may well fail for the same reason (a full disk): the
            // VM's write goes on all the same (its owner records the resync later).
            if let Err(e) = hook(true) {
                if failure.is_none() {
                    return Err(e);
                }
            }
        }
        if let Some(f) = failure {
            *self.log_failure.lock() = Some(f);
        }
        *mode = Some(dirty);
        *self.resync_begun.lock() = false;
        Ok(())
    }

    fn failure_text(&self, e: &Error) -> String {
        self.log()
            .failure()
            .map_or_else(|| e.to_string(), |f| f.to_string())
    }

    /// Mark again the resync blocks the log took but may not hold.
    fn remark_shipped(&self, dirty: &mut Dirty) {
        let st = self.state.read();
        for p in st.pending.values() {
            if let Change::Shipped(len) = p.change {
                dirty.mark(p.disk, p.offset, len);
            }
        }
    }

    /// Apply every pending change to the source images, in order, marking its blocks, and
    /// sync them: the log failed, so it cannot be trusted to hold them.
    fn spill_pending(&self, dirty: &mut Dirty) -> Result<()> {
        let _one = self.drain.lock();
        let all: Vec<(u64, Pending)> = self
            .state
            .read()
            .pending
            .iter()
            .map(|(&s, p)| (s, p.clone()))
            .collect();
        for (_, p) in &all {
            self.apply_pending(p)?;
            if let Some((offset, len)) = p.range() {
                dirty.mark(p.disk, offset, len);
            }
            if let Change::Shipped(len) = p.change {
                dirty.mark(p.disk, p.offset, len);
            }
        }
        self.sync_sources()?;
        let mut st = self.state.write();
        for (seq, _) in &all {
            st.remove(*seq);
        }
        if let Some((last, _)) = all.last() {
            st.applied_seq = st.applied_seq.max(*last);
        }
        Ok(())
    }

    /// A write while the log cannot take it: straight to the source image, block marked.
    /// Returns 0 (no sequence number: the change will be shipped by the resync).
    fn direct(&self, entry: &Entry<'_>, durable: bool) -> Result<Option<u64>> {
        let mut mode = self.mode.write();
        let Some(dirty) = mode.as_mut() else {
            // A resync finished between the caller's look and this lock: the log takes
            // writes again.
            return Ok(None);
        };
        match *entry {
            Entry::Write { disk, offset, data } => {
                self.write_source(disk, offset, data)?;
                dirty.mark(disk, offset, data.len() as u64);
            }
            Entry::Zero {
                disk, offset, len, ..
            } => {
                self.zero_source(disk, offset, len)?;
                dirty.mark(disk, offset, len);
            }
            Entry::Marker(_) => return Err(Error::Conflict(
                "the change log cannot take writes: a resync must finish before points can be cut"
                    .into(),
            )),
        }
        if durable {
            self.sync_sources()?;
        }
        Ok(Some(0))
    }

    /// Bytes of blocks waiting for a resync, if the agent is tracking writes in its dirty
    /// bitmap because the log could not take them.
    pub fn resync_pending(&self) -> Option<u64> {
        self.mode.read().as_ref().map(|d| d.bytes())
    }

    /// Mark every allocated block of every source disk for a resync (after the bitmap was
    /// lost, e.g. the agent was killed while the log was full).
    pub fn require_full_resync(&self) -> Result<()> {
        self.enter_bitmap_mode(None)?;
        let mut mode = self.mode.write();
        let dirty = mode
            .as_mut()
            .ok_or_else(|| Error::Conflict("internal: no bitmap".into()))?;
        for (i, (d, f)) in self.disks.iter().enumerate() {
            for (s, e) in crate::fsutil::data_ranges(f, d.size_bytes).at(&d.path)? {
                dirty.mark(i as u16, s, e - s);
            }
        }
        Ok(())
    }

    /// Mark only `changed` blocks `(disk, offset, len)` for a resync (after the bitmap was
    /// lost, when the delta engine found which blocks of the source images differ from
    /// the replica): the resync then ships those and nothing else.
    pub fn require_resync_of(&self, changed: &[(u16, u64, u64)]) -> Result<()> {
        self.enter_bitmap_mode(None)?;
        let mut mode = self.mode.write();
        let dirty = mode
            .as_mut()
            .ok_or_else(|| Error::Conflict("internal: no bitmap".into()))?;
        for &(disk, offset, len) in changed {
            dirty.mark(disk, offset, len);
        }
        Ok(())
    }

    /// Bytes of source blocks resyncs have read and shipped into the log since open.
    pub fn resync_shipped_bytes(&self) -> u64 {
        self.resync_shipped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The source images (name, path, size), for a comparison with the replica.
    pub fn source_images(&self) -> Result<Vec<crate::delta::FileImage>> {
        self.disks
            .iter()
            .map(|(d, f)| {
                Ok(crate::delta::FileImage::from_file(
                    f.try_clone().at(&d.path)?,
                    &d.path,
                    d.size_bytes,
                ))
            })
            .collect()
    }

    /// Ship up to `max_bytes` of dirty blocks from the source images into the log. Returns
    /// `Ok(true)` once the bitmap is empty and every shipped block is durable (the agent is
    /// back to normal), `Ok(false)` if blocks remain (the log may still be full).
    pub fn resync_step(&self, max_bytes: u64) -> Result<bool> {
        if self.log_failure.lock().is_some() {
            return Ok(false); // nothing ships until the log is reopened
        }
        match self.ship_dirty(max_bytes) {
            Err(e) if self.is_log_error(&e) => {
                // The blocks it took may never be written: dirty again, until it reopens.
                self.enter_bitmap_mode(Some(&e))?;
                Ok(false)
            }
            other => other,
        }
    }

    fn ship_dirty(&self, max_bytes: u64) -> Result<bool> {
        // Pieces a record can carry, and that a small log can hold a few of at once.
        let piece_max = match self.log().stats().capacity_bytes {
            Some(cap) => {
                ((cap / 4) as usize / 512 * 512).clamp(512, crate::record::MAX_WRITE_BYTES)
            }
            None => crate::record::MAX_WRITE_BYTES,
        };
        let mut shipped = 0u64;
        let mut buf = Vec::new();
        loop {
            let mut mode = self.mode.write();
            let Some(dirty) = mode.as_mut() else {
                return Ok(true);
            };
            let Some((disk, block)) = dirty.first() else {
                // Everything shipped: close the window, durable first, then back to the log.
                if *self.resync_begun.lock() {
                    match self.append_placeholder(&Entry::Marker(&resync_marker(RESYNC_END))) {
                        Ok(()) => *self.resync_begun.lock() = false,
                        Err(Error::CacheFull { .. }) => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
                // The source hold past every record of the resync: a replay after a crash
                // then never redoes one of them over a newer write.
                let durable = self.log().sync()?;
                self.drain_to(durable, true)?;
                if let Some(hook) = &*self.on_bitmap.lock() {
                    if hook(false).is_err() {
                        return Ok(false);
                    }
                }
                *mode = None;
                return Ok(true);
            };
            if shipped >= max_bytes {
                return Ok(false);
            }
            if !*self.resync_begun.lock() {
                match self.append_placeholder(&Entry::Marker(&resync_marker(RESYNC_BEGIN))) {
                    Ok(()) => *self.resync_begun.lock() = true,
                    Err(Error::CacheFull { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            let (d, f) = &self.disks[disk as usize];
            let offset = block * dirty.block_bytes;
            let len = dirty.block_bytes.min(d.size_bytes - offset);
            buf.resize(len as usize, 0);
            f.read_exact_at(&mut buf, offset).at(&d.path)?;
            // Ship in pieces a record can carry; holes and zero runs as zero records.
            let mut at = 0usize;
            while at < buf.len() {
                let n = (buf.len() - at).min(piece_max);
                let piece = &buf[at..at + n];
                let entry = if piece.iter().all(|&b| b == 0) {
                    Entry::Zero {
                        disk,
                        offset: offset + at as u64,
                        len: n as u64,
                        trim: false,
                    }
                } else {
                    Entry::Write {
                        disk,
                        offset: offset + at as u64,
                        data: piece,
                    }
                };
                match self.append_placeholder(&entry) {
                    Ok(()) => {}
                    Err(Error::CacheFull { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
                at += n;
            }
            dirty.clear(disk, block);
            shipped += len;
            self.resync_shipped
                .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Append a change the source images already hold (a resync block or marker): a
    /// placeholder in the pending set keeps the drain in order.
    fn append_placeholder(&self, entry: &Entry<'_>) -> Result<()> {
        // Off the client's path: worth compressing even where the log stores writes as
        // they came.
        let seq = self.log().append_compressed(entry)?;
        let p = match *entry {
            Entry::Write { disk, offset, data } => Pending {
                disk,
                offset,
                change: Change::Shipped(data.len() as u64),
            },
            Entry::Zero {
                disk, offset, len, ..
            } => Pending {
                disk,
                offset,
                change: Change::Shipped(len),
            },
            Entry::Marker(_) => Pending {
                disk: 0,
                offset: 0,
                change: Change::Nothing,
            },
        };
        self.state.write().insert(seq, p);
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` of `disk`, seeing every acknowledged write.
    pub fn read(&self, disk: u16, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (d, f) = self.check(disk, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        // The image is read under the set's read lock: a drain removes a change from the
        // set only after the image holds it, so image + set always show every change.
        let st = self.state.read();
        f.read_exact_at(buf, offset).at(&d.path)?;
        for seq in st.overlapping(disk, offset, end) {
            let Some(p) = st.pending.get(&seq) else {
                continue;
            };
            let Some((p_start, p_len)) = p.range() else {
                continue;
            };
            let s = p_start.max(offset);
            let e = (p_start + p_len).min(end);
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match &p.change {
                Change::Data(data) => {
                    dst.copy_from_slice(&data[(s - p_start) as usize..(e - p_start) as usize])
                }
                _ => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Make every acknowledged change durable, as NBD FLUSH promises: in the log (the
    /// source images' write-ahead log), or in the source images while the log is full.
    pub fn make_durable(&self) -> Result<()> {
        if let Err(e) = self.log().sync() {
            if !self.is_log_error(&e) {
                return Err(e);
            }
            // The log failed: what it took is in the source images now (bitmap mode).
            self.enter_bitmap_mode(Some(&e))?;
        }
        if self.mode.read().is_some() {
            self.sync_sources()?;
        }
        Ok(())
    }

    /// Make every acknowledged change durable in the log and in the source images.
    pub fn flush(&self) -> Result<()> {
        if let Err(e) = self.flush_log_and_drain() {
            if !self.is_log_error(&e) {
                return Err(e);
            }
            self.enter_bitmap_mode(Some(&e))?;
        }
        if self.mode.read().is_some() {
            self.sync_sources()?;
        }
        Ok(())
    }

    fn flush_log_and_drain(&self) -> Result<u64> {
        let durable = self.log().sync()?;
        self.drain_to(durable, true)?;
        Ok(durable)
    }

    /// Apply pending changes that are durable in the log to the source images, in order.
    /// With `persist`, also sync the images and record how far they are (which lets the log
    /// trim what they no longer need); without, the images only catch up in the page cache.
    pub fn drain(&self, persist: bool) -> Result<()> {
        self.drain_to(self.log().durable_seq(), persist)
    }

    fn drain_to(&self, durable: u64, persist: bool) -> Result<()> {
        let _one = self.drain.lock();
        let mut applied = self.state.read().applied_seq;
        while durable > applied {
            // Copy out a batch (the data is shared, not copied) and apply it to the images
            // without holding the set: writers and readers go on meanwhile. A reader that
            // sees a change half in the image still finds it whole in the set, which is
            // overlaid in sequence order; only then are the changes removed from the set.
            let batch: Vec<(u64, Pending)> = {
                let st = self.state.read();
                let mut bytes = 0u64;
                st.pending
                    .range(applied + 1..=durable)
                    .take_while(|(_, p)| {
                        let ok = bytes < DRAIN_BATCH_BYTES;
                        if let Change::Data(d) = &p.change {
                            bytes += d.len() as u64;
                        }
                        ok
                    })
                    .map(|(&seq, p)| (seq, p.clone()))
                    .collect()
            };
            // Only a gapless run from `applied` on may be applied.
            let mut run = 0;
            for (i, (seq, _)) in batch.iter().enumerate() {
                if *seq != applied + 1 + i as u64 {
                    break;
                }
                run = i + 1;
            }
            if run == 0 {
                break;
            }
            for (_, p) in &batch[..run] {
                self.apply_pending(p)?;
            }
            let mut st = self.state.write();
            for (seq, _) in &batch[..run] {
                st.remove(*seq);
            }
            applied += run as u64;
            st.applied_seq = applied;
        }
        if !persist || self.log().source_seq()? == Some(applied) {
            return Ok(());
        }
        self.sync_sources()?;
        self.log().set_source_seq(applied)
    }

    fn apply_pending(&self, p: &Pending) -> Result<()> {
        match &p.change {
            Change::Data(d) => self.write_source(p.disk, p.offset, d),
            Change::Zero(len) => self.zero_source(p.disk, p.offset, *len),
            Change::Nothing | Change::Shipped(_) => Ok(()),
        }
    }

    fn apply_op(&self, op: &Op) -> Result<()> {
        match op {
            Op::Write { disk, offset, data } => {
                self.check(*disk, *offset, data.len() as u64)?;
                self.write_source(*disk, *offset, data)
            }
            Op::Zero {
                disk, offset, len, ..
            } => {
                self.check(*disk, *offset, *len)?;
                self.zero_source(*disk, *offset, *len)
            }
            Op::Marker(_) => Ok(()),
        }
    }

    fn write_source(&self, disk: u16, offset: u64, data: &[u8]) -> Result<()> {
        let (d, f) = &self.disks[disk as usize];
        f.write_all_at(data, offset).at(&d.path)
    }

    fn zero_source(&self, disk: u16, offset: u64, len: u64) -> Result<()> {
        let (d, f) = &self.disks[disk as usize];
        crate::fsutil::zero_range(f, offset, len).at(&d.path)
    }

    fn sync_sources(&self) -> Result<()> {
        for (d, f) in &self.disks {
            f.sync_data().at(&d.path)?;
        }
        Ok(())
    }

    /// Flush everything and close the log.
    /// A failed log is closed without complaint: every change it took is in the source
    /// images, and its owner has recorded that a resync is owed.
    pub fn close(self) -> Result<()> {
        self.flush()?;
        match self.log().close() {
            Err(e) if self.log_failure.lock().is_some() && self.is_log_error(&e) => Ok(()),
            other => other,
        }
    }

    /// Allocation of `[offset, offset+len)` of `disk` as every acknowledged change left it:
    /// runs of `(length, zero)` in order, covering the range, where `zero` means a hole
    /// that reads as zeros. The source image's holes (SEEK_DATA/SEEK_HOLE), then the
    /// pending changes painted over them in sequence order: a write makes data, a zero or
    /// trim makes a hole.
    pub fn block_status(&self, disk: u16, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let (d, f) = self.check(disk, offset, len)?;
        // The answer may cover less than was asked (the protocol allows it): a bounded
        // window keeps each call's cost bounded, however fragmented the image, for clients
        // (qemu) that ask again from the end of each answer.
        let mut end = offset + len.min(BLOCK_STATUS_WINDOW_BYTES);
        // start -> (end, zero): non-overlapping, covering [offset, end).
        let mut runs: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
        fn paint(runs: &mut BTreeMap<u64, (u64, bool)>, s: u64, e: u64, zero: bool) {
            let hit: Vec<(u64, (u64, bool))> = runs
                .range(..e)
                .rev()
                .take_while(|(_, &(re, _))| re > s)
                .map(|(&rs, &r)| (rs, r))
                .collect();
            for (rs, (re, z)) in hit {
                runs.remove(&rs);
                if rs < s {
                    runs.insert(rs, (s, z));
                }
                if re > e {
                    runs.insert(e, (re, z));
                }
            }
            runs.insert(s, (e, zero));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        // Under the state's read lock, image + pending set show every change: a drain
        // removes a change from the set only after the image holds it.
        let st = self.state.read();
        // At most so many of the image's data ranges: qemu asks for one extent at a time
        // (REQ_ONE) from the end of each answer, so on a fragmented image an answer that
        // looked at the whole window cost O(ranges) per extent, O(ranges²) per pass.
        let ranges =
            crate::fsutil::data_ranges_upto(f, offset, end, BLOCK_STATUS_MAX_RANGES).at(&d.path)?;
        if ranges.len() == BLOCK_STATUS_MAX_RANGES {
            if let Some(&(_, e)) = ranges.last() {
                end = e.max(offset + crate::SECTOR_BYTES).min(end);
            }
        }
        paint(&mut runs, offset, end, true);
        for (s, e) in ranges {
            let e = e.min(end);
            if s < e {
                paint(&mut runs, s, e, false);
            }
        }
        for seq in st.overlapping(disk, offset, end) {
            let Some(p) = st.pending.get(&seq) else {
                continue;
            };
            let (n, zero) = match &p.change {
                Change::Data(data) => (data.len() as u64, false),
                Change::Zero(n) => (*n, true),
                Change::Nothing | Change::Shipped(_) => continue,
            };
            let (s, e) = (p.offset.max(offset), (p.offset + n).min(end));
            if s < e {
                paint(&mut runs, s, e, zero);
            }
        }
        drop(st);
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (s, (e, zero)) in runs {
            match out.last_mut() {
                Some(last) if last.1 == zero => last.0 += e - s,
                _ => out.push((e - s, zero)),
            }
        }
        Ok(out)
    }
}

fn resync_marker(kind: MarkerKind) -> Marker {
    Marker {
        consistency: crate::record::Consistency::Crash,
        name: None,
        group: None,
        kind,
    }
}

/// One disk of the agent as an NBD block device: reads see every acknowledged write;
/// writes, trims and write-zeroes go through the log first; FLUSH and FUA make them durable.
pub struct AgentDisk {
    agent: Arc<Agent>,
    disk: u16,
    size: u64,
}

impl AgentDisk {
    pub fn new(agent: Arc<Agent>, disk: u16) -> Result<AgentDisk> {
        let size = agent
            .disks
            .get(disk as usize)
            .map(|(d, _)| d.size_bytes)
            .ok_or_else(|| Error::NotFound(format!("disk {disk} does not exist")))?;
        Ok(AgentDisk { agent, disk, size })
    }
}

impl crate::nbd::BlockDevice for AgentDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn min_block_bytes(&self) -> u32 {
        crate::SECTOR_BYTES as u32
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> crate::nbd::DevResult<()> {
        Ok(self.agent.read(self.disk, offset, buf)?)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::nbd::DevResult<()> {
        self.agent.write(self.disk, offset, data, fua)?;
        Ok(())
    }
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> crate::nbd::DevResult<()> {
        self.agent.write_owned(self.disk, offset, data, fua)?;
        Ok(())
    }
    fn flush(&self) -> crate::nbd::DevResult<()> {
        self.agent.make_durable()?;
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::nbd::DevResult<()> {
        self.agent.zero(self.disk, offset, len, true, fua)?;
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> crate::nbd::DevResult<()> {
        self.agent.zero(self.disk, offset, len, false, fua)?;
        Ok(())
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::nbd::DevResult<Vec<crate::nbd::Extent>> {
        // A prefix is enough (the client asks again for the rest): at most 1 GiB a call,
        // which bounds the time the state's read lock is held over SEEK_DATA calls.
        let runs = self
            .agent
            .block_status(self.disk, offset, len.min(1 << 30))?;
        Ok(runs
            .into_iter()
            .map(|(len, zero)| crate::nbd::Extent {
                len,
                hole: zero,
                zero,
            })
            .collect())
    }
}
