//! Group commit: appenders copy their frame into the pending batch under the state lock
//! ([`Cache::append_framed`]); one writer thread writes whole batches with a single
//! `write` and hands fdatasyncs to a syncer thread, which makes every waiter it covers
//! durable at once. A failed write or sync latches the error ([`fail`]).

use super::{Cache, Chunk, Framed, SegInfo, Shared, State, CHUNK_RESERVE_BYTES};
use crate::error::{Error, IoContext, Result};
use crate::segment::{self, SegmentHeader, SEGMENT_HEADER_BYTES};
use crate::vfs::{VFile, Vfs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Cache {
    pub(super) fn append_framed(
        &self,
        f: Framed,
        given: Option<(u64, u64)>,
        encode: impl FnOnce(&mut Vec<u8>, u64, u64, u64) -> Result<()>,
    ) -> Result<u64> {
        let sh = &*self.shared;
        let frame = f.bytes;
        let mut st = sh.state.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(e.poisoned());
            }
            if st.closing {
                return Err(Error::Closed);
            }
            if st.pending_bytes < sh.config.max_pending_bytes {
                break;
            }
            sh.written.wait(&mut st);
        }
        if let Some((seq, _)) = given {
            if seq != st.next_seq {
                return Err(Error::Conflict(format!(
                    "record {seq} does not follow this log, which expects {} next",
                    st.next_seq
                )));
            }
        }
        let tail = &st.segments[&st.tail_id];
        let roll =
            tail.bytes + frame > sh.config.segment_max_bytes && tail.last_seq >= tail.base_seq;
        let needed = frame + if roll { SEGMENT_HEADER_BYTES as u64 } else { 0 };
        if let Some(cap) = sh.config.capacity_bytes {
            if st.total_bytes + needed > cap {
                return Err(Error::CacheFull {
                    used_bytes: st.total_bytes,
                    capacity_bytes: cap,
                });
            }
        }
        let seq = st.next_seq;
        let time_us = match given {
            Some((_, t)) => t,
            None => crate::now_us().max(st.last_time_us),
        };
        let tail_id = if roll { st.tail_id + 1 } else { st.tail_id };
        {
            // Encode first: a shipped frame that fails its check changes nothing.
            let need_chunk = match st.pending.back() {
                Some(c) => c.segment_id != tail_id,
                None => true,
            };
            if need_chunk {
                let mut bytes = st.spare.pop().unwrap_or_default();
                bytes.clear();
                bytes.reserve(CHUNK_RESERVE_BYTES.max(frame as usize));
                st.pending.push_back(Chunk {
                    segment_id: tail_id,
                    create_with_base_seq: roll.then_some(seq),
                    bytes,
                    last_seq: seq,
                });
            }
            let chunk = st.pending.back_mut().expect("a chunk was just ensured");
            if let Err(e) = encode(&mut chunk.bytes, tail_id, seq, time_us) {
                if need_chunk {
                    let c = st.pending.pop_back().expect("pushed above");
                    st.spare.push(c.bytes);
                }
                return Err(e);
            }
            chunk.last_seq = seq;
        }
        st.next_seq += 1;
        st.last_time_us = st.last_time_us.max(time_us);
        if roll {
            st.tail_id = tail_id;
            st.segments.insert(
                tail_id,
                SegInfo {
                    base_seq: seq,
                    last_seq: seq - 1,
                    bytes: SEGMENT_HEADER_BYTES as u64,
                    durable_bytes: 0,
                },
            );
        }
        let seg = st.segments.get_mut(&tail_id).expect("tail segment exists");
        seg.bytes += frame;
        seg.last_seq = seq;
        st.total_bytes += needed;
        st.pending_bytes += frame as usize;
        st.appended_records += 1;
        st.appended_logical_bytes += f.logical;
        st.appended_stored_bytes += frame;
        if f.is_write {
            st.write_logical_bytes += f.logical;
            st.write_stored_bytes += frame;
        }
        drop(st);
        sh.work.notify_one();
        Ok(seq)
    }
}

struct Tail {
    id: u64,
    file: Arc<dyn VFile>,
    len: u64,
    /// Last seq written to this file and not yet synced (0 if clean).
    dirty_seq: u64,
    /// Bytes written to this file since the last sync was handed out.
    dirty_bytes: u64,
    /// The file holds zeros from `len` up to here, written ahead of the records (see
    /// [`Prepare`]); equal to `len` when nothing is prepared.
    prepared: u64,
}

impl Tail {
    fn new(id: u64, file: Arc<dyn VFile>, len: u64) -> Tail {
        Tail {
            id,
            file,
            len,
            dirty_seq: 0,
            dirty_bytes: 0,
            prepared: len,
        }
    }
}

/// Zero-filling past the tail while commits are small and waited for: a record written
/// over an allocated, already-zero block of a file whose size does not change makes its
/// fdatasync write the data and flush the device, without a journal commit of the file
/// system's metadata (ext4, xfs): about half the latency of an appending write's sync.
/// Bulk streams (large or unwaited syncs) never trigger it, so their bytes are written once.
struct Prepare {
    ahead: u64,
    segment_max: u64,
    /// Consecutive small syncs that someone waited for (capped).
    small_syncs: u32,
    /// Where the current step ends, if one is under way; and where it began.
    goal: u64,
    step_start: u64,
    /// A zero-fill failed (a full disk): none for this segment.
    off: bool,
    /// The segment the step and `off` are about.
    segment_id: u64,
    zeros: Vec<u8>,
}

/// Bytes of zeros written at a time, so that a writer that finds work waits at most one
/// piece (a memcpy into the page cache).
const PREPARE_PIECE: usize = 128 << 10;
/// A step starts once fewer than this many prepared bytes remain past the tail.
const PREPARE_LOW_WATER: u64 = 1 << 20;
/// A sync of at most this many bytes that someone waited for is a commit.
const PREPARE_SMALL_SYNC: u64 = 64 << 10;
/// This many commits in a row, and the next syncs are expected to be commits too.
const PREPARE_AFTER_SYNCS: u32 = 4;

impl Prepare {
    fn new(config: &super::CacheConfig) -> Prepare {
        Prepare {
            ahead: config.prepare_ahead_bytes,
            segment_max: config.segment_max_bytes,
            small_syncs: 0,
            goal: 0,
            step_start: 0,
            off: false,
            segment_id: 0,
            zeros: Vec::new(),
        }
    }

    fn note_sync(&mut self, waited: bool, bytes: u64) {
        if waited && bytes <= PREPARE_SMALL_SYNC {
            self.small_syncs = (self.small_syncs + 1).min(PREPARE_AFTER_SYNCS);
        } else if bytes > PREPARE_SMALL_SYNC {
            self.small_syncs = 0;
        }
    }

    /// Whether the idle writer should zero-fill a piece now (starting a step if due).
    fn wanted(&mut self, tail: &Tail) -> bool {
        if self.segment_id != tail.id {
            // A new tail segment: nothing prepared in it yet.
            (self.segment_id, self.goal, self.off) = (tail.id, 0, false);
        }
        if self.ahead == 0 || self.off || self.small_syncs < PREPARE_AFTER_SYNCS {
            return false;
        }
        let from = tail.prepared.max(tail.len);
        if self.goal <= from {
            if tail.prepared.saturating_sub(tail.len) >= PREPARE_LOW_WATER {
                return false;
            }
            self.goal = (tail.len + self.ahead).min(self.segment_max);
            self.step_start = from;
        }
        self.goal > from
    }

    /// Zero-fill the next piece of the step. A failure (a full disk) is no failure of the
    /// log: the zeros are cut off again and preparing stops for this segment.
    fn piece(&mut self, tail: &mut Tail) {
        let from = tail.prepared.max(tail.len);
        let n = (self.goal - from).min(PREPARE_PIECE as u64) as usize;
        if self.zeros.len() < n {
            self.zeros.resize(PREPARE_PIECE, 0);
        }
        if tail.file.write_all_at(&self.zeros[..n], from).is_err() {
            self.off = true;
            if tail.file.set_len(tail.len).is_ok() {
                tail.prepared = tail.len;
            }
            return;
        }
        tail.prepared = from + n as u64;
        if tail.prepared >= self.goal {
            // Allocate the step's blocks now, in the background, rather than in the next
            // commit's fdatasync.
            let _ = tail
                .file
                .start_writeback(self.step_start, self.goal - self.step_start);
        }
    }
}

/// Cut the zeros prepared past the tail's last record (a closing log, a sealed segment).
fn cut_prepared(sh: &Shared, tail: &mut Tail) -> Result<bool> {
    if tail.prepared <= tail.len {
        return Ok(false);
    }
    let path = sh.dir.join(segment::file_name(tail.id));
    tail.file.set_len(tail.len).at(&path)?;
    tail.prepared = tail.len;
    Ok(true)
}

/// Whether the tail should be synced now: someone waits for durability, the log is
/// closing, or unsynced data has waited longer than the auto-sync interval — and no sync
/// is already running (the next one starts when it ends, covering what came meanwhile).
fn sync_due(sh: &Shared, st: &State, tail: &Tail, dirty_since: Option<Instant>) -> bool {
    tail.dirty_seq != 0
        && !st.sync_in_flight
        && (st.sync_wanted > st.durable_seq
            || st.closing
            || match (sh.config.auto_sync, dirty_since) {
                (Some(every), Some(t)) => t.elapsed() >= every,
                _ => false,
            }
            || sh
                .config
                .auto_sync_bytes
                .is_some_and(|b| tail.dirty_bytes >= b))
}

/// Longest the writer holds a sync back to let more concurrent writers join it.
const MAX_COMMIT_DELAY: Duration = Duration::from_millis(1);

/// One fdatasync handed to the syncer thread: the file, and what it makes durable.
struct SyncJob {
    segment_id: u64,
    file: Arc<dyn VFile>,
    seq: u64,
    len: u64,
}

/// Runs the fdatasyncs the writer asks for, so the writer keeps writing meanwhile.
fn syncer_loop(sh: Arc<Shared>, jobs: crossbeam_channel::Receiver<SyncJob>) {
    for job in jobs {
        let path = sh.dir.join(segment::file_name(job.segment_id));
        let result = job.file.sync_data().at(&path);
        let mut st = sh.state.lock();
        st.sync_in_flight = false;
        match result {
            Ok(()) => {
                st.syncs += 1;
                st.durable_seq = st.durable_seq.max(job.seq);
                if let Some(seg) = st.segments.get_mut(&job.segment_id) {
                    seg.durable_bytes = seg.durable_bytes.max(job.len);
                }
            }
            Err(e) => {
                if st.error.is_none() {
                    st.error = Some(e.clone());
                }
            }
        }
        let durable = if st.error.is_some() {
            u64::MAX
        } else {
            st.durable_seq
        };
        drop(st);
        unpark_durable(&sh, durable);
        sh.progress.notify_all();
        sh.work.notify_all();
    }
}

/// Wake every `wait_durable` caller waiting for a sequence number up to `durable`
/// (`u64::MAX`: all of them, to learn of a failure or a close).
fn unpark_durable(sh: &Shared, durable: u64) {
    sh.parked.lock().retain(|(seq, thread)| {
        if *seq <= durable {
            thread.unpark();
            false
        } else {
            true
        }
    });
}

pub(super) fn writer_loop(sh: Arc<Shared>, (id, file, len): (u64, Arc<dyn VFile>, u64)) {
    let mut tail = Tail::new(id, file, len);
    let (sync_tx, sync_rx) = crossbeam_channel::bounded::<SyncJob>(1);
    let syncer = {
        let sh = sh.clone();
        std::thread::Builder::new()
            .name("standby-log-sync".into())
            .spawn(move || syncer_loop(sh, sync_rx))
    };
    let Ok(syncer) = syncer else {
        fail(
            &sh,
            Error::Invalid("cannot start the log's sync thread".into()),
        );
        return;
    };
    writer_body(&sh, &mut tail, &sync_tx);
    drop(sync_tx);
    let _ = syncer.join();
    // Whoever still waits learns that the log closed or failed.
    unpark_durable(&sh, u64::MAX);
    sh.progress.notify_all();
    sh.written.notify_all();
}

fn writer_body(sh: &Shared, tail: &mut Tail, sync_tx: &crossbeam_channel::Sender<SyncJob>) {
    let mut dirty_since: Option<Instant> = None;
    // Group commit with a commit delay: when several writers were waiting at the last sync,
    // hold the next sync back (at most half the last sync's duration) until as many are
    // waiting again, writing what they append meanwhile. One writer never waits.
    let mut peak_waiters = 0usize;
    let mut last_sync = Duration::ZERO;
    let mut sync_started: Option<Instant> = None;
    let mut prepare = Prepare::new(&sh.config);
    loop {
        let chunks = {
            let mut st = sh.state.lock();
            loop {
                if st.error.is_some() {
                    return;
                }
                if let (false, Some(t)) = (st.sync_in_flight, sync_started) {
                    last_sync = t.elapsed();
                    sync_started = None;
                }
                if !st.pending.is_empty() || sync_due(sh, &st, tail, dirty_since) {
                    break;
                }
                if st.closing && !st.sync_in_flight {
                    drop(st);
                    // A cleanly closed log ends at its last record.
                    if let Ok(true) = cut_prepared(sh, tail) {
                        let _ = tail.file.sync_data();
                    }
                    return;
                }
                if !st.closing && prepare.wanted(tail) {
                    drop(st);
                    prepare.piece(tail);
                    st = sh.state.lock();
                    continue;
                }
                match (sh.config.auto_sync, dirty_since) {
                    (Some(every), Some(t)) if tail.dirty_seq != 0 => {
                        let left = every.saturating_sub(t.elapsed());
                        sh.work
                            .wait_for(&mut st, left.max(Duration::from_micros(100)));
                    }
                    _ => sh.work.wait(&mut st),
                }
            }
            take_pending(&mut st)
        };
        sh.written.notify_all();
        if let Err(e) = write_chunks(sh, tail, chunks, &mut dirty_since) {
            fail(sh, e);
            return;
        }
        if !sync_due(sh, &sh.state.lock(), tail, dirty_since) {
            continue;
        }
        if peak_waiters > 1 {
            let deadline = Instant::now() + (last_sync / 2).min(MAX_COMMIT_DELAY);
            loop {
                let chunks = {
                    let mut st = sh.state.lock();
                    if st.pending.is_empty() {
                        if st.durable_waiters >= peak_waiters
                            || st.closing
                            || Instant::now() >= deadline
                        {
                            break;
                        }
                        sh.work.wait_until(&mut st, deadline);
                        continue;
                    }
                    take_pending(&mut st)
                };
                sh.written.notify_all();
                if let Err(e) = write_chunks(sh, tail, chunks, &mut dirty_since) {
                    fail(sh, e);
                    return;
                }
            }
        }
        // Hand the sync to the syncer and go on writing; it reports durability itself.
        let tail_dirty_bytes = tail.dirty_bytes;
        let (job, waited) = {
            let mut st = sh.state.lock();
            let waited = st.sync_wanted > st.durable_seq;
            peak_waiters = st.durable_waiters.max(peak_waiters.saturating_sub(1));
            st.sync_in_flight = true;
            let job = SyncJob {
                segment_id: tail.id,
                file: tail.file.clone(),
                seq: tail.dirty_seq,
                len: tail.len,
            };
            (job, waited)
        };
        tail.dirty_seq = 0;
        tail.dirty_bytes = 0;
        dirty_since = None;
        sync_started = Some(Instant::now());
        prepare.note_sync(waited, tail_dirty_bytes);
        if sync_tx.send(job).is_err() {
            fail(sh, Error::Invalid("the log's sync thread stopped".into()));
            return;
        }
    }
}

fn take_pending(st: &mut State) -> Vec<Chunk> {
    st.pending_bytes = 0;
    st.pending.drain(..).collect()
}

fn fail(sh: &Shared, e: Error) {
    let mut st = sh.state.lock();
    if st.error.is_none() {
        st.error = Some(e.clone());
    }
    drop(st);
    unpark_durable(sh, u64::MAX);
    sh.progress.notify_all();
    sh.written.notify_all();
}

fn sync_tail(sh: &Shared, tail: &mut Tail) -> Result<()> {
    let path = sh.dir.join(segment::file_name(tail.id));
    tail.file.sync_data().at(&path)?;
    let mut st = sh.state.lock();
    st.syncs += 1;
    st.durable_seq = st.durable_seq.max(tail.dirty_seq);
    if let Some(seg) = st.segments.get_mut(&tail.id) {
        seg.durable_bytes = tail.len;
    }
    tail.dirty_seq = 0;
    tail.dirty_bytes = 0;
    let durable = st.durable_seq;
    drop(st);
    unpark_durable(sh, durable);
    sh.progress.notify_all();
    Ok(())
}

fn write_chunks(
    sh: &Shared,
    tail: &mut Tail,
    chunks: Vec<Chunk>,
    dirty_since: &mut Option<Instant>,
) -> Result<()> {
    for chunk in chunks {
        if chunk.segment_id != tail.id {
            // Roll: the old segment becomes durable before the new one takes records (else
            // a power cut could keep the new segment and lose the old one's tail: a gap).
            // A sync the syncer is running may cover it; wait for it, then make sure.
            let old_durable_bytes = {
                let mut st = sh.state.lock();
                while st.sync_in_flight && st.error.is_none() {
                    sh.progress.wait(&mut st);
                }
                if let Some(e) = &st.error {
                    return Err(e.poisoned());
                }
                st.segments.get(&tail.id).map_or(0, |s| s.durable_bytes)
            };
            // A sealed segment ends at its last record.
            let cut = cut_prepared(sh, tail)?;
            if cut || tail.dirty_seq != 0 || old_durable_bytes < tail.len {
                sync_tail(sh, tail)?;
            }
            let base_seq = chunk
                .create_with_base_seq
                .ok_or_else(|| Error::Invalid("internal: chunk for an unknown segment".into()))?;
            let file = create_segment(&*sh.vfs, &sh.dir, chunk.segment_id, base_seq)?;
            {
                let mut st = sh.state.lock();
                st.syncs += 2;
                if let Some(seg) = st.segments.get_mut(&chunk.segment_id) {
                    seg.durable_bytes = SEGMENT_HEADER_BYTES as u64;
                }
            }
            sh.progress.notify_all();
            *tail = Tail::new(chunk.segment_id, file, SEGMENT_HEADER_BYTES as u64);
        }
        if chunk.bytes.is_empty() {
            continue; // a roll without records (see set_checkpoint)
        }
        let path = sh.dir.join(segment::file_name(tail.id));
        tail.file.write_all_at(&chunk.bytes, tail.len).at(&path)?;
        tail.len += chunk.bytes.len() as u64;
        tail.dirty_bytes += chunk.bytes.len() as u64;
        tail.dirty_seq = chunk.last_seq;
        if dirty_since.is_none() {
            *dirty_since = Some(Instant::now());
        }
        let mut st = sh.state.lock();
        st.written_seq = chunk.last_seq;
        if st.spare.len() < 4 {
            st.spare.push(chunk.bytes);
        }
        drop(st);
        sh.written.notify_all();
    }
    Ok(())
}

/// Create a segment with its header, durable together with its directory entry.
pub(super) fn create_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    id: u64,
    base_seq: u64,
) -> Result<Arc<dyn VFile>> {
    let path = dir.join(segment::file_name(id));
    let file = vfs.create_new(&path).at(&path)?;
    let header = SegmentHeader {
        segment_id: id,
        base_seq,
        compat: 0,
    };
    file.write_all_at(&header.encode(), 0).at(&path)?;
    file.sync_data().at(&path)?;
    vfs.sync_dir(dir).at(dir)?;
    Ok(file)
}
