//! The change log in a container: the agent ships its journal as immutable objects
//! (outbound HTTPS only, no Standby server at the source site) and the target's processor
//! pulls them into the vault's staging log, then writes a durable-trim marker and deletes
//! what the vault holds durably.
//!
//! Layout under the store's prefix, for VM `vm`:
//!
//! ```text
//! cache/VM/log/FIRST-LAST   one sealed `Records` message of the link (wire.rs): the
//!                           journal's record frames FIRST..=LAST (20-digit decimal
//!                           sequence numbers, so names sort by sequence), created with
//!                           If-None-Match: * and never rewritten
//! cache/VM/trim             the durable-trim marker (below): every record up to its seq
//!                           is durable in the vault; segments wholly at or below it may go
//! ```
//!
//! Trim marker byte map (28 bytes, little-endian):
//!
//! ```text
//! 0   8  magic "STBYOTRM"
//! 8   4  version (1)
//! 12  4  flags (0; any bit set is refused)
//! 16  8  seq
//! 24  4  crc32 of bytes 0..24
//! ```
//!
//! Invariants. The shipper reads only records durable in the journal (the journal's reader
//! stops at its durable end) and trims the journal only up to the last record a successful
//! PUT stored, so nothing acknowledged is ever only in flight. A segment's name says which
//! records it holds, and records never change once written, so a create that finds its
//! name taken (a retried PUT whose first answer was lost) holds the same bytes and counts
//! as stored. On every (re)start the shipper resumes after the highest record the store
//! holds (the newest segment, or the trim marker once segments are gone); the puller
//! appends only records past its staging log's end, so overlaps between segments are
//! harmless and nothing is applied twice.

use super::ship::ShipStatus;
use super::wire::{self, DiskInfo, Msg, HEADER_BYTES, WIRE_BINDING};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::objstore::{Cond, Store, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Records are shipped in objects of about this size (few, large PUTs).
pub const SEGMENT_BYTES: usize = 8 << 20;
/// A partly filled segment is shipped once its oldest record waited this long.
pub const LINGER: Duration = Duration::from_millis(200);

const TRIM_MAGIC: &[u8; 8] = b"STBYOTRM";
const TRIM_VERSION: u32 = 1;
const TRIM_BYTES: usize = 28;

/// `cache/VM/log`.
pub fn log_dir(vm: &str) -> String {
    format!("cache/{vm}/log")
}

/// The key of the segment holding records `first..=last`.
pub fn segment_key(vm: &str, first: u64, last: u64) -> String {
    format!("{}/{first:020}-{last:020}", log_dir(vm))
}

/// `cache/VM/trim`.
pub fn trim_key(vm: &str) -> String {
    format!("cache/{vm}/trim")
}

/// `(first, last)` of a segment's name (the last path component), or `None` for a name
/// that is not one.
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let name = name.rsplit('/').next()?;
    let (a, b) = name.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    let (first, last) = (a.parse().ok()?, b.parse().ok()?);
    (first <= last && first > 0).then_some((first, last))
}

pub fn encode_trim(seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(TRIM_BYTES);
    out.extend_from_slice(TRIM_MAGIC);
    out.extend_from_slice(&TRIM_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The seq of a trim marker, or the damage found (`what` names the object).
pub fn decode_trim(bytes: &[u8], what: &str) -> Result<u64> {
    let bad = |why: &str| Error::Invalid(format!("{what}: not a trim marker ({why})"));
    if bytes.len() != TRIM_BYTES {
        return Err(bad(&format!("{} bytes, not {TRIM_BYTES}", bytes.len())));
    }
    let field = |r: std::ops::Range<usize>| bytes.get(r).unwrap_or_default();
    let u32_at = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(field(at..at + 4));
        u32::from_le_bytes(b)
    };
    if field(0..8) != TRIM_MAGIC {
        return Err(bad("bad magic at offset 0"));
    }
    if crc32fast::hash(field(0..24)) != u32_at(24) {
        return Err(bad("crc mismatch at offset 24"));
    }
    if u32_at(8) != TRIM_VERSION {
        return Err(bad(&format!("version {} at offset 8", u32_at(8))));
    }
    if u32_at(12) != 0 {
        return Err(bad(&format!(
            "unknown flags {:#x} at offset 12",
            u32_at(12)
        )));
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(field(16..24));
    Ok(u64::from_le_bytes(s))
}

fn store_err(store: &Store, key: &str, e: StoreError) -> Error {
    Error::io(store.name(key), e.into_io(&store.name(key)))
}

/// The trim marker's seq, 0 if there is none.
pub fn read_trim(store: &Store, vm: &str) -> Result<u64> {
    let key = trim_key(vm);
    match store.get(&key) {
        Ok((b, _)) => decode_trim(&b, &store.name(&key)),
        Err(StoreError::NotFound) => Ok(0),
        Err(e) => Err(store_err(store, &key, e)),
    }
}

/// Every segment of `vm` in the store, by first seq.
pub fn segments(store: &Store, vm: &str) -> Result<Vec<(u64, u64)>> {
    let dir = log_dir(vm);
    let listed = store.list(&dir).map_err(|e| store_err(store, &dir, e))?;
    let mut v: Vec<(u64, u64)> = listed
        .objects
        .iter()
        .filter_map(|(n, _)| parse_segment_name(n))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The highest record the store holds for `vm` (in a segment or below the trim marker).
pub fn stored_end(store: &Store, vm: &str) -> Result<u64> {
    let segs = segments(store, vm)?;
    let last = segs.iter().map(|s| s.1).max().unwrap_or(0);
    Ok(last.max(read_trim(store, vm)?))
}

/// The agent's shipper to a container: the journal's durable records, in segments.
pub struct ObjShipper {
    pub status: Arc<ShipStatus>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ObjShipper {
    pub fn start(
        journal: Arc<Cache>,
        store: Store,
        vm: String,
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> ObjShipper {
        let status = Arc::new(ShipStatus::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (status, stop) = (status.clone(), stop.clone());
            std::thread::Builder::new()
                .name("standby-objship".into())
                .spawn(move || run(&journal, &store, &vm, &log, &status, &stop))
                .expect("start the object shipper thread")
        };
        ObjShipper {
            status,
            stop,
            thread: Some(thread),
        }
    }

    /// Wait until every journal record up to `seq` is stored, or `timeout`.
    pub fn wait_acked(&self, seq: u64, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while self.status.acked_seq.load(Ordering::SeqCst) < seq {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for ObjShipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    journal: &Cache,
    store: &Store,
    vm: &str,
    log: &(dyn Fn(&str) + Send + Sync),
    status: &ShipStatus,
    stop: &AtomicBool,
) {
    let mut backoff = Duration::from_millis(50);
    let mut last_logged: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        match session(journal, store, vm, status, stop) {
            Ok(()) => return,
            Err(e) => {
                status.connected.store(false, Ordering::SeqCst);
                let msg = e.to_string();
                if last_logged.as_deref() != Some(&msg) {
                    log(&format!("shipping to {}: {msg}", store.name(&log_dir(vm))));
                    last_logged = Some(msg.clone());
                }
                *status.last_error.lock() = Some(msg);
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Resume after what the store holds and ship until `stop` (Ok) or an error.
fn session(
    journal: &Cache,
    store: &Store,
    vm: &str,
    status: &ShipStatus,
    stop: &AtomicBool,
) -> Result<()> {
    let stored = stored_end(store, vm)?;
    status.connected.store(true, Ordering::SeqCst);
    status.acked_seq.fetch_max(stored, Ordering::SeqCst);
    let _ = journal.set_checkpoint(stored.min(journal.durable_seq()));
    let from = (stored + 1).max(journal.stats().first_seq);
    let mut reader = journal.reader(from)?;
    let mut batch = vec![0u8; HEADER_BYTES];
    let mut first: Option<(u64, Instant)> = None;
    let mut last = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut progressed = false;
        while batch.len() < SEGMENT_BYTES {
            match reader.next_frame(&mut batch, WIRE_BINDING)? {
                Some(h) => {
                    first.get_or_insert((h.seq, Instant::now()));
                    last = h.seq;
                    progressed = true;
                }
                None => break,
            }
        }
        let due = first.is_some_and(|(_, t)| batch.len() >= SEGMENT_BYTES || t.elapsed() >= LINGER);
        if let (true, Some((f, _))) = (due, first) {
            wire::seal_records(&mut batch);
            let key = segment_key(vm, f, last);
            match store.put(&key, batch.clone(), &Cond::Absent) {
                Ok(_) | Err(StoreError::Conflict) => {}
                Err(e) => return Err(store_err(store, &key, e)),
            }
            *status.last_error.lock() = None;
            status.acked_seq.fetch_max(last, Ordering::SeqCst);
            journal.set_checkpoint(last.min(journal.durable_seq()))?;
            batch.truncate(HEADER_BYTES);
            first = None;
            continue;
        }
        if !progressed {
            // Caught up with the durable end: wait for the journal's next sync, and sync
            // only if none came (as the TCP shipper does).
            let durable = journal.durable_seq();
            if journal.wait_durable_beyond(durable, Duration::from_millis(50))? == durable
                && journal.next_seq() > durable + 1
            {
                journal.sync()?;
            }
        }
    }
    Ok(())
}

/// What one pull pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullReport {
    pub segments: u64,
    pub records: u64,
    /// The staging log is durable up to here; the trim marker says so.
    pub durable_seq: u64,
    pub deleted: u64,
}

/// Pull every segment past the staging log's end into it, make it durable, write the
/// trim marker and delete the segments wholly at or below it. `expected` are the VM's
/// disks as the vault knows them (a record for another disk is refused).
pub fn pull_pass(
    store: &Store,
    vm: &str,
    staging: &Cache,
    expected: &[DiskInfo],
) -> Result<PullReport> {
    let mut report = PullReport::default();
    let mut buf = Vec::new();
    for (first, last) in segments(store, vm)? {
        if last < staging.next_seq() {
            continue;
        }
        let key = segment_key(vm, first, last);
        let (bytes, _) = store.get(&key).map_err(|e| store_err(store, &key, e))?;
        let named = |e: Error| Error::Invalid(format!("{}: {e}", store.name(&key)));
        let payload = match wire::read_msg(&mut &bytes[..], &mut buf).map_err(named)? {
            Some(Msg::Records(p)) => p,
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: not a segment of records",
                    store.name(&key)
                )))
            }
        };
        let frames = wire::check_records(&payload, expected).map_err(named)?;
        for (i, (at, h)) in frames.iter().enumerate() {
            let end = frames.get(i + 1).map(|(a, _)| *a).unwrap_or(payload.len());
            if h.seq == staging.next_seq() {
                let frame = payload.get(*at..end).unwrap_or_default();
                staging.append_frame(frame, WIRE_BINDING)?;
                report.records += 1;
            } else if h.seq > staging.next_seq() {
                return Err(Error::Invalid(format!(
                    "{}: record {} follows {} (a gap in the shipped log)",
                    store.name(&key),
                    h.seq,
                    staging.next_seq() - 1
                )));
            }
        }
        report.segments += 1;
    }
    let end = staging.next_seq() - 1;
    if end > 0 {
        staging.wait_durable(end)?;
    }
    report.durable_seq = staging.durable_seq();
    if report.durable_seq > read_trim(store, vm)? {
        let key = trim_key(vm);
        store
            .put(&key, encode_trim(report.durable_seq), &Cond::Any)
            .map_err(|e| store_err(store, &key, e))?;
    }
    for (first, last) in segments(store, vm)? {
        if last <= report.durable_seq {
            let key = segment_key(vm, first, last);
            match store.delete(&key) {
                Ok(()) | Err(StoreError::NotFound) => report.deleted += 1,
                Err(e) => return Err(store_err(store, &key, e)),
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_round_trips_and_every_flipped_byte_is_refused() {
        let b = encode_trim(0x1234_5678_9abc);
        assert_eq!(decode_trim(&b, "t").unwrap(), 0x1234_5678_9abc);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(decode_trim(&c, "t").is_err(), "flip at {i} accepted");
        }
        assert!(decode_trim(&b[..27], "t").is_err());
        assert!(decode_trim(&[0u8; TRIM_BYTES], "t").is_err());
    }

    #[test]
    fn segment_names_sort_by_sequence_and_parse_back() {
        let a = segment_key("vm", 9, 10);
        let b = segment_key("vm", 11, 200);
        assert!(a < b);
        assert_eq!(parse_segment_name(&a), Some((9, 10)));
        assert_eq!(parse_segment_name(&b), Some((11, 200)));
        assert_eq!(parse_segment_name("cache/vm/log/junk"), None);
        assert_eq!(parse_segment_name(&segment_key("vm", 5, 4)), None);
    }
}
