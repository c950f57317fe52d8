//! The change log (the cache store): every write of a protected VM lands here first.
//!
//! Appenders validate and compress their record on their own thread, then take a short
//! lock to get the next sequence number and copy the frame into the pending batch. One
//! writer thread writes whole batches with a single `write` (acknowledging them *written*)
//! and, when anyone waits for *durable* (or the auto-sync interval has passed), makes them
//! durable with one fdatasync for every waiter (group commit).
//!
//! Invariants:
//! - sequence numbers are assigned under the state lock, so the log holds one total order
//!   with no gap and no duplicate, and frames reach the file in that order;
//! - `durable_seq` only advances after an fdatasync that covers every record up to it, and a
//!   new segment (header + directory entry) is synced before any record in it is written;
//! - a failed write or sync latches the error: every later append and wait fails until the
//!   log is reopened (and recovery decides what survived);
//! - segments are deleted only by [`Cache::set_checkpoint`], never on the commit path.
//!
//! The log's ideas, one file each: this file holds the API and its accounting;
//! [`commit`] the appenders' half of group commit and the writer and syncer threads;
//! [`state`] the small state files (checkpoint, source hold); [`recover`] the scan
//! that rebuilds the state on open; [`reader`] the reader of durable records.

mod commit;
mod reader;
mod recover;
mod state;

pub use reader::Reader;
pub use state::SOURCE_SEQ_FILE;

use crate::error::{Error, IoContext, Result};
use crate::record::{self, Entry, Prepared};
use crate::segment::{self, SEGMENT_HEADER_BYTES};
use crate::vfs::{RealFs, Vfs};
use commit::writer_loop;
use parking_lot::{Condvar, Mutex};
use recover::recover;
use state::{read_source_seq, write_checkpoint, write_source_seq};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do with damage found when opening the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Truncate an invalid or incomplete tail of the *last* segment (what a crash leaves);
    /// report damage anywhere else.
    #[default]
    TolerateTornTail,
    /// Report any damage, including a torn tail.
    Absolute,
}

/// Settings of a change log.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// A segment is closed and a new one started once it would grow past this.
    pub segment_max_bytes: u64,
    /// Appends fail with [`Error::CacheFull`] rather than let the log's files grow past this.
    pub capacity_bytes: Option<u64>,
    pub recovery: RecoveryMode,
    /// Store write payloads lz4-compressed when that saves space.
    pub compress: bool,
    /// Sync on its own this long after unsynced data was written, even if nobody asked.
    pub auto_sync: Option<Duration>,
    /// Sync on its own once this many bytes are written and not yet synced, even if
    /// nobody asked (bounds what a power cut can take of what nobody flushed, and how much
    /// the agent holds in memory until the source images may have it).
    pub auto_sync_bytes: Option<u64>,
    /// Appenders wait once this many bytes are queued and not yet written.
    pub max_pending_bytes: usize,
    /// While the log's syncs are small and waited for (a database's commits, one FUA
    /// write at a time), its writer zero-fills up to this many bytes past the tail
    /// whenever it is idle, so that a commit's fdatasync overwrites allocated blocks of
    /// an unchanged file size (data and one device flush, no journal commit of the file
    /// system). 0 turns it off. Zeros past the last record end a segment (see
    /// docs/format.md); bulk writes never trigger it.
    pub prepare_ahead_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            segment_max_bytes: 64 << 20,
            capacity_bytes: None,
            recovery: RecoveryMode::default(),
            compress: true,
            auto_sync: Some(Duration::from_millis(5)),
            auto_sync_bytes: None,
            max_pending_bytes: 64 << 20,
            prepare_ahead_bytes: 4 << 20,
        }
    }
}

impl CacheConfig {
    /// The settings of a log in a VM's write path (the embedded agent's log, the source
    /// site's journal): it pays only for what the client asked. Payloads are stored as
    /// they came (compression costs the writer's thread before the acknowledgement; the
    /// replica compresses in the background instead), and the log syncs on its own only
    /// every 200 ms or 16 MiB of unsynced data, not every few milliseconds: FLUSH and FUA
    /// still make everything before them durable at once.
    pub fn write_path(capacity_bytes: Option<u64>) -> CacheConfig {
        CacheConfig {
            compress: false,
            auto_sync: Some(WRITE_PATH_SYNC_EVERY),
            auto_sync_bytes: Some(WRITE_PATH_SYNC_BYTES),
            ..CacheConfig::with_capacity(capacity_bytes)
        }
    }

    /// The default settings with a capacity limit. Segments are kept to an eighth of the
    /// limit (at most the default size), so trimming frees space in steps a full log can use.
    pub fn with_capacity(capacity_bytes: Option<u64>) -> CacheConfig {
        let mut c = CacheConfig {
            capacity_bytes,
            ..CacheConfig::default()
        };
        if let Some(cap) = capacity_bytes {
            c.segment_max_bytes = (cap / 8).clamp(4096, c.segment_max_bytes);
        }
        c
    }
}

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Records retained (first_seq ..= last_seq).
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// A torn tail that was cut off: file, byte offset, bytes removed, why.
    pub truncated: Option<(PathBuf, u64, u64, String)>,
    /// Segments removed because they were wholly below the checkpoint (an interrupted trim)
    /// or their creation was torn before any record reached them.
    pub removed_segments: usize,
}

/// Counters of a change log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheStats {
    /// Records retained in the log.
    pub records: u64,
    /// Bytes of the log's files (what the capacity limit counts).
    pub stored_bytes: u64,
    /// Records appended since open, their logical bytes (data written or zeroed) and the
    /// bytes they took in the log.
    pub appended_records: u64,
    pub appended_logical_bytes: u64,
    pub appended_stored_bytes: u64,
    /// Logical bytes of data carried per stored byte (write payloads only).
    pub compression_ratio: f64,
    pub segments: usize,
    pub first_seq: u64,
    pub written_seq: u64,
    pub durable_seq: u64,
    /// Sequence number the next append gets.
    pub next_seq: u64,
    pub checkpoint: u64,
    pub capacity_bytes: Option<u64>,
    /// fdatasyncs of the log's files since open.
    pub syncs: u64,
}

struct SegInfo {
    base_seq: u64,
    /// Last sequence number appended to it (`base_seq - 1` while empty).
    last_seq: u64,
    /// Bytes appended (including those not yet written).
    bytes: u64,
    /// Bytes known durable.
    durable_bytes: u64,
}

struct Chunk {
    segment_id: u64,
    /// Set on the first chunk of a new segment: the writer creates it first.
    create_with_base_seq: Option<u64>,
    bytes: Vec<u8>,
    last_seq: u64,
}

struct State {
    next_seq: u64,
    last_time_us: u64,
    segments: BTreeMap<u64, SegInfo>,
    tail_id: u64,
    pending: VecDeque<Chunk>,
    pending_bytes: usize,
    spare: Vec<Vec<u8>>,
    written_seq: u64,
    durable_seq: u64,
    sync_wanted: u64,
    /// Callers blocked in `wait_durable`.
    durable_waiters: usize,
    /// The syncer thread is running an fdatasync.
    sync_in_flight: bool,
    total_bytes: u64,
    checkpoint: u64,
    error: Option<Error>,
    closing: bool,
    appended_records: u64,
    appended_logical_bytes: u64,
    appended_stored_bytes: u64,
    write_logical_bytes: u64,
    write_stored_bytes: u64,
    syncs: u64,
}

struct Shared {
    dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    config: CacheConfig,
    state: Mutex<State>,
    /// Wakes the writer.
    work: Condvar,
    /// Wakes waiters for durability (and checkpoint or failure news).
    progress: Condvar,
    /// Wakes waiters for written progress and for room in the pending batch. Apart from
    /// `progress` so that writing each chunk does not wake every durability waiter (a
    /// thundering herd per chunk when many writers group-commit).
    written: Condvar,
    /// Threads in `wait_durable`, with the sequence number each waits for.
    parked: Mutex<Vec<(u64, std::thread::Thread)>>,
    /// Serializes checkpoint updates and segment deletion.
    trim_lock: Mutex<()>,
}

/// Sizes of a frame about to be appended (for the log's accounting).
struct Framed {
    bytes: u64,
    logical: u64,
    is_write: bool,
}

/// The change log. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Cache {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// A write-path log's own sync cadence (see [`CacheConfig::write_path`]).
pub const WRITE_PATH_SYNC_EVERY: Duration = Duration::from_millis(200);
pub const WRITE_PATH_SYNC_BYTES: u64 = 16 << 20;

const CHUNK_RESERVE_BYTES: usize = 1 << 20;

impl Cache {
    /// Open (or create) the log in `dir` on the real filesystem, recovering after a crash.
    pub fn open(dir: impl AsRef<Path>, config: CacheConfig) -> Result<(Cache, RecoveryReport)> {
        Self::open_with(Arc::new(RealFs), dir, config)
    }

    /// Open (or create) the log through the given filesystem.
    pub fn open_with(
        vfs: Arc<dyn Vfs>,
        dir: impl AsRef<Path>,
        config: CacheConfig,
    ) -> Result<(Cache, RecoveryReport)> {
        let dir = dir.as_ref().to_path_buf();
        if config.segment_max_bytes < (SEGMENT_HEADER_BYTES as u64) * 2 {
            return Err(Error::Invalid("segment size is too small".into()));
        }
        vfs.create_dir_all(&dir).at(&dir)?;
        let (state, report) = recover(&*vfs, &dir, &config)?;
        let shared = Arc::new(Shared {
            dir,
            vfs,
            config,
            state: Mutex::new(state),
            work: Condvar::new(),
            progress: Condvar::new(),
            written: Condvar::new(),
            parked: Mutex::new(Vec::new()),
            trim_lock: Mutex::new(()),
        });
        let tail_file = {
            let st = shared.state.lock();
            let path = shared.dir.join(segment::file_name(st.tail_id));
            let len = st.segments[&st.tail_id].bytes;
            (st.tail_id, shared.vfs.open(&path).at(&path)?, len)
        };
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("standby-log-writer".into())
            .spawn(move || writer_loop(s2, tail_file))
            .map_err(|e| Error::io("writer thread", e))?;
        Ok((
            Cache {
                shared,
                writer: Mutex::new(Some(writer)),
            },
            report,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Create a new, empty log in `dir` whose first record gets sequence number
    /// `after + 1` (a log that continues another's numbering: a cache service's log and
    /// an agent's journal after a two-site reprotect). Refused if `dir` holds anything.
    pub fn create_after(
        vfs: Arc<dyn Vfs>,
        dir: impl AsRef<Path>,
        config: CacheConfig,
        after: u64,
    ) -> Result<Cache> {
        let dir = dir.as_ref();
        vfs.create_dir_all(dir).at(dir)?;
        if !vfs.list(dir).at(dir)?.is_empty() {
            return Err(Error::Conflict(format!(
                "{} holds a change log already",
                dir.display()
            )));
        }
        state::write_checkpoint(&*vfs, dir, after)?;
        Ok(Self::open_with(vfs, dir, config)?.0)
    }

    /// Append one record; returns its sequence number once it is queued (neither written
    /// nor durable yet: see [`Cache::wait_written`] and [`Cache::wait_durable`]).
    pub fn append(&self, entry: &Entry<'_>) -> Result<u64> {
        let prepared = Prepared::new(entry, self.shared.config.compress).map_err(Error::Invalid)?;
        self.append_prepared(&prepared)
    }

    /// Append one record, compressing its payload where that saves space whatever the
    /// log's setting (for appends off the client's path, like a resync's blocks).
    pub fn append_compressed(&self, entry: &Entry<'_>) -> Result<u64> {
        let prepared = Prepared::new(entry, true).map_err(Error::Invalid)?;
        self.append_prepared(&prepared)
    }

    /// Append and wait for the given acknowledgement.
    pub fn append_wait(&self, entry: &Entry<'_>, ack: Ack) -> Result<u64> {
        let seq = self.append(entry)?;
        match ack {
            Ack::Queued => {}
            Ack::Written => self.wait_written(seq)?,
            Ack::Durable => self.wait_durable(seq)?,
        }
        Ok(seq)
    }

    fn append_prepared(&self, p: &Prepared) -> Result<u64> {
        let frame = Framed {
            bytes: p.frame_bytes() as u64,
            logical: p.logical_bytes(),
            is_write: p.is_write(),
        };
        self.append_framed(frame, None, |out, segment_id, seq, time_us| {
            p.encode_into(out, segment_id, seq, time_us);
            Ok(())
        })
    }

    /// Append a record that was framed elsewhere — by the log this one mirrors, shipped
    /// over the link — keeping its sequence number and acceptance time. `frame` is one
    /// whole frame bound to `binding`; it is checked against that binding and rebound to
    /// this log's segment without decompressing it. Its sequence number must be the next
    /// one this log expects ([`Error::Conflict`] otherwise: a gap, or a record this log
    /// already holds), so a mirror never holds a record twice or out of order.
    pub fn append_frame(&self, frame: &[u8], binding: u64) -> Result<u64> {
        let h = record::FrameHeader::parse(frame, binding)
            .map_err(|e| Error::Invalid(format!("shipped record: {e}")))?;
        if h.frame_bytes() != frame.len() {
            return Err(Error::Invalid(format!(
                "shipped record: frame of {} bytes holds {} bytes",
                h.frame_bytes(),
                frame.len()
            )));
        }
        let framed = Framed {
            bytes: frame.len() as u64,
            logical: match h.kind {
                record::KIND_WRITE => h.raw_len as u64,
                record::KIND_ZERO => {
                    let at = record::HEADER_BYTES;
                    frame
                        .get(at..at + 8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .unwrap_or(0)
                }
                _ => 0,
            },
            is_write: h.kind == record::KIND_WRITE,
        };
        self.append_framed(framed, Some((h.seq, h.time_us)), |out, segment_id, _, _| {
            let start = out.len();
            out.extend_from_slice(frame);
            record::rebind(&mut out[start..], binding, segment_id).map_err(|e| {
                out.truncate(start);
                Error::Invalid(format!("shipped record {}: {e}", h.seq))
            })?;
            Ok(())
        })
    }

    /// The sequence number the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.shared.state.lock().next_seq
    }
    /// Wait until every record up to `seq` is written (survives a crash of the process).
    pub fn wait_written(&self, seq: u64) -> Result<()> {
        let sh = &*self.shared;
        let mut st = sh.state.lock();
        while st.written_seq < seq {
            check_alive(&st, seq)?;
            sh.written.wait(&mut st);
        }
        Ok(())
    }

    /// Wait until every record up to `seq` is durable (survives a power loss). Waiters are
    /// group-committed: one fdatasync serves all of them.
    pub fn wait_durable(&self, seq: u64) -> Result<()> {
        let sh = &*self.shared;
        {
            let mut st = sh.state.lock();
            if st.durable_seq >= seq {
                return Ok(());
            }
            check_alive(&st, seq)?;
            if st.sync_wanted < seq {
                st.sync_wanted = seq;
            }
            st.durable_waiters += 1;
            // Parked, not on a condvar: the syncer unparks every waiter its sync covers at
            // once, so they wake in parallel rather than one after another through the
            // state lock (which cost a context switch per waiter per group commit). Listed
            // before the state lock is let go: a sync that ends after the check above
            // finds this waiter to unpark (listed later, it was missed, and the waiter
            // slept its whole timeout, 50 ms, with its record durable).
            sh.parked.lock().push((seq, std::thread::current()));
        }
        sh.work.notify_one();
        loop {
            std::thread::park_timeout(Duration::from_millis(50));
            let mut st = sh.state.lock();
            let result = if st.durable_seq >= seq {
                Some(Ok(()))
            } else {
                check_alive(&st, seq).err().map(Err)
            };
            if let Some(r) = result {
                st.durable_waiters -= 1;
                return r;
            }
        }
    }

    /// Wait up to `timeout` for the durable end to pass `seq` (without asking for a sync);
    /// returns the durable sequence number then. For followers of the log.
    pub fn wait_durable_beyond(&self, seq: u64, timeout: Duration) -> Result<u64> {
        let sh = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut st = sh.state.lock();
        while st.durable_seq <= seq {
            if let Some(e) = &st.error {
                return Err(e.poisoned());
            }
            if st.closing || sh.progress.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        Ok(st.durable_seq)
    }

    /// Time the newest appended record was accepted (0 if none since the log was opened).
    pub fn last_time_us(&self) -> u64 {
        self.shared.state.lock().last_time_us
    }

    /// Make everything appended so far durable; returns the durable sequence number.
    pub fn sync(&self) -> Result<u64> {
        let last = self.shared.state.lock().next_seq - 1;
        self.wait_durable(last)?;
        Ok(last)
    }

    /// The error that latched this log (a failed write or sync), if one did: every later
    /// append and wait fails with [`Error::Poisoned`] until the log is reopened.
    pub fn failure(&self) -> Option<Error> {
        self.shared.state.lock().error.clone()
    }

    /// Last sequence number known durable (0 if none).
    pub fn durable_seq(&self) -> u64 {
        self.shared.state.lock().durable_seq
    }

    /// A reader of durable records from `from_seq` on. It yields `None` when it reaches
    /// the durable end; call again later to follow the log.
    pub fn reader(&self, from_seq: u64) -> Result<Reader> {
        let st = self.shared.state.lock();
        let first = st
            .segments
            .values()
            .next()
            .map(|s| s.base_seq)
            .unwrap_or(st.next_seq);
        if from_seq < first {
            return Err(Error::NotFound(format!(
                "change log no longer holds sequence number {from_seq} (it starts at {first}; trimmed below checkpoint {})",
                st.checkpoint
            )));
        }
        Ok(Reader {
            shared: self.shared.clone(),
            next_seq: from_seq,
            seg: None,
        })
    }

    /// The source images this log is the write-ahead log of are durable up to `seq`
    /// (see [`crate::agent`]). Once set, the checkpoint never passes it: records the source
    /// may still need for replay are kept even after the replica has them.
    pub fn set_source_seq(&self, seq: u64) -> Result<()> {
        write_source_seq(&*self.shared.vfs, &self.shared.dir, seq)
    }

    /// How far the source images are durable (`None` if this log has no source hold).
    pub fn source_seq(&self) -> Result<Option<u64>> {
        read_source_seq(&*self.shared.vfs, &self.shared.dir)
    }

    /// The processor has made everything up to `seq` durable elsewhere: record it, and
    /// delete every segment wholly at or below it (never the one being appended to, nor
    /// one the source images may still need, see [`Cache::set_source_seq`]).
    /// Returns how many segments were deleted.
    pub fn set_checkpoint(&self, seq: u64) -> Result<usize> {
        let sh = &*self.shared;
        let _trim = sh.trim_lock.lock();
        let seq = match self.source_seq()? {
            Some(hold) => seq.min(hold),
            None => seq,
        };
        let seq = {
            let mut st = sh.state.lock();
            if st.closing {
                // Closed: its directory may already belong to the log reopened over it,
                // whose segments this one's view would delete.
                return Err(Error::Closed);
            }
            if seq > st.checkpoint && seq > st.durable_seq {
                return Err(Error::Invalid(format!(
                    "checkpoint {seq} is beyond the durable end of the log ({})",
                    st.durable_seq
                )));
            }
            // Never backwards; but the same checkpoint again still frees what it could not
            // free before (a tail that was busy then).
            let seq = seq.max(st.checkpoint);
            // The file only has to be ahead of the segments deleted (so a crash in the
            // middle of deleting them is finished on reopen): while the checkpoint frees no
            // segment, it moves in memory alone — no sync per acknowledgement.
            let t = &st.segments[&st.tail_id];
            let frees = st
                .segments
                .iter()
                .any(|(id, s)| *id != st.tail_id && s.last_seq <= seq)
                || (t.last_seq >= t.base_seq && t.last_seq <= seq && st.pending.is_empty());
            if !frees {
                st.checkpoint = seq;
                return Ok(0);
            }
            seq
        };
        write_checkpoint(&*sh.vfs, &sh.dir, seq)?;
        let mut rolled = None;
        let doomed: Vec<u64> = {
            let mut st = sh.state.lock();
            st.checkpoint = seq;
            // A tail segment wholly below the checkpoint would never be freed (a full log
            // takes no appends, so it never rolls): roll it now, so it can go too.
            let old_tail = st.tail_id;
            let t = &st.segments[&old_tail];
            if t.last_seq >= t.base_seq && t.last_seq <= seq && st.pending.is_empty() {
                let id = old_tail + 1;
                let base_seq = st.next_seq;
                st.segments.insert(
                    id,
                    SegInfo {
                        base_seq,
                        last_seq: base_seq - 1,
                        bytes: SEGMENT_HEADER_BYTES as u64,
                        durable_bytes: 0,
                    },
                );
                st.tail_id = id;
                rolled = Some(id);
                st.total_bytes += SEGMENT_HEADER_BYTES as u64;
                st.pending.push_back(Chunk {
                    segment_id: id,
                    create_with_base_seq: Some(base_seq),
                    bytes: Vec::new(),
                    last_seq: base_seq - 1,
                });
                sh.work.notify_one();
            }
            let tail = st.tail_id;
            let ids: Vec<u64> = st
                .segments
                .iter()
                .filter(|(id, s)| **id != tail && s.last_seq <= seq)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                if let Some(s) = st.segments.remove(id) {
                    st.total_bytes -= s.bytes;
                }
            }
            ids
        };
        // Wait for the writer to create the rolled segment, so the syncs of this call are
        // all done when it returns (a crash test cutting at the Nth sync of a pass then
        // meets the same sync every run) and a failure to create it is reported here.
        if let Some(id) = rolled {
            let mut st = sh.state.lock();
            loop {
                if let Some(e) = &st.error {
                    return Err(e.poisoned());
                }
                let created = st
                    .segments
                    .get(&id)
                    .is_none_or(|s| s.durable_bytes >= SEGMENT_HEADER_BYTES as u64);
                if created || st.closing {
                    break;
                }
                sh.progress.wait(&mut st);
            }
        }
        for id in &doomed {
            let path = sh.dir.join(segment::file_name(*id));
            sh.vfs.remove(&path).at(&path)?;
        }
        if !doomed.is_empty() {
            sh.vfs.sync_dir(&sh.dir).at(&sh.dir)?;
        }
        // Space was freed: appenders waiting on nothing in particular need no wake-up, but
        // a caller polling for room may.
        sh.progress.notify_all();
        sh.written.notify_all();
        Ok(doomed.len())
    }

    /// Records after `seq` and an estimate of their bytes in the log (whole segments
    /// counted exactly, the segment holding `seq` prorated by records).
    pub fn backlog(&self, seq: u64) -> (u64, u64) {
        let st = self.shared.state.lock();
        let records = (st.next_seq - 1).saturating_sub(seq);
        let mut bytes = 0u64;
        for s in st.segments.values() {
            if s.last_seq <= seq || s.last_seq < s.base_seq {
                continue;
            }
            let frames = s.bytes - SEGMENT_HEADER_BYTES as u64;
            if s.base_seq > seq {
                bytes += frames;
            } else {
                let n = s.last_seq - s.base_seq + 1;
                bytes += frames * (s.last_seq - seq) / n;
            }
        }
        (records, bytes)
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.shared.state.lock();
        let first_seq = st
            .segments
            .values()
            .next()
            .map(|s| s.base_seq)
            .unwrap_or(st.next_seq);
        CacheStats {
            records: st.next_seq - first_seq,
            stored_bytes: st.total_bytes,
            appended_records: st.appended_records,
            appended_logical_bytes: st.appended_logical_bytes,
            appended_stored_bytes: st.appended_stored_bytes,
            compression_ratio: if st.write_stored_bytes == 0 {
                1.0
            } else {
                st.write_logical_bytes as f64 / st.write_stored_bytes as f64
            },
            segments: st.segments.len(),
            first_seq,
            written_seq: st.written_seq,
            durable_seq: st.durable_seq,
            next_seq: st.next_seq,
            checkpoint: st.checkpoint,
            capacity_bytes: self.shared.config.capacity_bytes,
            syncs: st.syncs,
        }
    }

    /// Make everything durable and stop the writer. Dropping the log does the same.
    pub fn close(&self) -> Result<()> {
        let result = self.sync();
        {
            // A trim under way finishes first; none starts after (see set_checkpoint).
            let _trim = self.shared.trim_lock.lock();
            let mut st = self.shared.state.lock();
            st.closing = true;
        }
        self.shared.work.notify_all();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
        match result {
            Err(Error::Closed) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock();
            st.closing = true;
        }
        self.shared.work.notify_all();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

/// Which acknowledgement [`Cache::append_wait`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Queued,
    Written,
    Durable,
}

fn check_alive(st: &State, seq: u64) -> Result<()> {
    if let Some(e) = &st.error {
        return Err(e.poisoned());
    }
    if st.closing && seq >= st.next_seq {
        return Err(Error::Closed);
    }
    if seq >= st.next_seq {
        return Err(Error::Invalid(format!(
            "sequence number {seq} was never appended (next is {})",
            st.next_seq
        )));
    }
    Ok(())
}
