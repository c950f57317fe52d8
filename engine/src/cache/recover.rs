//! Recovery on open: scan every segment, verify every frame, cut a torn tail (as the
//! [`RecoveryMode`] allows), finish an interrupted trim, and rebuild the log's state.

use super::commit::create_segment;
use super::state::read_checkpoint;
use super::{CacheConfig, RecoveryMode, RecoveryReport, SegInfo, State};
use crate::error::{Error, IoContext, Result};
use crate::segment::{self, Scan, SegmentReader, SEGMENT_HEADER_BYTES};
use crate::vfs::{VFile, Vfs};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

/// Scan every segment, verify every frame, cut a torn tail, and build the state.
pub(super) fn recover(
    vfs: &dyn Vfs,
    dir: &Path,
    config: &CacheConfig,
) -> Result<(State, RecoveryReport)> {
    let checkpoint = read_checkpoint(vfs, dir)?;
    let mut ids: Vec<u64> = vfs
        .list(dir)
        .at(dir)?
        .iter()
        .filter_map(|n| segment::parse_file_name(n))
        .collect();
    ids.sort_unstable();
    let mut report = RecoveryReport::default();
    let mut segments: BTreeMap<u64, SegInfo> = BTreeMap::new();
    let mut total_bytes = 0u64;
    let mut expected_seq: Option<u64> = None;
    let count = ids.len();
    for (i, id) in ids.iter().copied().enumerate() {
        let last = i + 1 == count;
        let path = dir.join(segment::file_name(id));
        let file = vfs.open(&path).at(&path)?;
        let len = file.len().at(&path)?;
        if last
            && len < SEGMENT_HEADER_BYTES as u64
            && config.recovery == RecoveryMode::TolerateTornTail
        {
            // Its creation was torn before the header was synced: no record ever reached it.
            vfs.remove(&path).at(&path)?;
            vfs.sync_dir(dir).at(dir)?;
            report.removed_segments += 1;
            continue;
        }
        let mut reader = SegmentReader::open(file.clone(), &path, len)?;
        if reader.header.segment_id != id {
            return Err(Error::corrupt(
                &path,
                20,
                format!("segment header names segment {}", reader.header.segment_id),
            ));
        }
        let base = reader.header.base_seq;
        if base == 0 {
            return Err(Error::corrupt(
                &path,
                28,
                "segment base sequence number is 0",
            ));
        }
        if let Some(exp) = expected_seq {
            if base != exp {
                return Err(Error::corrupt(
                    &path,
                    28,
                    format!("segment starts at sequence number {base}, expected {exp}: records are missing"),
                ));
            }
        }
        let mut next = base;
        // The first frame that fails (or breaks the sequence) ends the segment: a torn tail
        // of the last one is cut there, anywhere else it is corruption.
        let damage = loop {
            match reader.next(u64::MAX)? {
                Scan::End => break None,
                Scan::Skipped(offset, seq)
                | Scan::Record(offset, crate::record::Record { seq, .. })
                    if seq != next =>
                {
                    break Some((
                        offset,
                        format!("record has sequence number {seq}, expected {next}"),
                    ))
                }
                Scan::Skipped(..) | Scan::Record(..) => next += 1,
                Scan::Frame(..) => unreachable!("recovery reads with next(), never next_frame()"),
                Scan::Invalid { offset, what } => break Some((offset, what.to_string())),
            }
        };
        if let Some((offset, what)) = damage {
            if zeros_to_end(&*file, offset, len).at(&path)? {
                // Space the writer prepared past its last record: the segment's end, not
                // damage (a sequence gap it hid is caught by the next segment's base).
                file.set_len(offset).at(&path)?;
                file.sync_data().at(&path)?;
            } else {
                cut_or_fail(&path, &*file, last, config, offset, len, what, &mut report)?;
            }
        }
        let bytes = reader.position();
        let info = SegInfo {
            base_seq: base,
            last_seq: next - 1,
            bytes,
            durable_bytes: bytes,
        };
        if !last && info.last_seq <= checkpoint {
            // Wholly below the checkpoint: a trim was interrupted. Finish it.
            vfs.remove(&path).at(&path)?;
            report.removed_segments += 1;
            expected_seq = Some(next);
            continue;
        }
        total_bytes += bytes;
        expected_seq = Some(next);
        segments.insert(id, info);
    }
    if report.removed_segments > 0 {
        vfs.sync_dir(dir).at(dir)?;
    }
    let next_seq = expected_seq.unwrap_or(checkpoint + 1).max(checkpoint + 1);
    // No segment survived, or the checkpoint is ahead of every retained record (all were
    // trimmed and the last segment lost its records): start a fresh segment at next_seq.
    if segments
        .values()
        .next_back()
        .is_none_or(|s| s.last_seq + 1 != next_seq)
    {
        let id = ids.last().map_or(1, |i| i + 1);
        create_segment(vfs, dir, id, next_seq)?;
        segments.insert(
            id,
            SegInfo {
                base_seq: next_seq,
                last_seq: next_seq - 1,
                bytes: SEGMENT_HEADER_BYTES as u64,
                durable_bytes: SEGMENT_HEADER_BYTES as u64,
            },
        );
        total_bytes += SEGMENT_HEADER_BYTES as u64;
    }
    let tail_id = *segments.keys().next_back().expect("a tail segment exists");
    let first_seq = segments
        .values()
        .next()
        .map(|s| s.base_seq)
        .unwrap_or(next_seq);
    report.segments = segments.len();
    report.first_seq = first_seq;
    report.last_seq = next_seq - 1;
    report.records = next_seq - first_seq;
    let state = State {
        next_seq,
        last_time_us: 0,
        segments,
        tail_id,
        pending: VecDeque::new(),
        pending_bytes: 0,
        spare: Vec::new(),
        written_seq: next_seq - 1,
        durable_seq: next_seq - 1,
        sync_wanted: 0,
        durable_waiters: 0,
        sync_in_flight: false,
        total_bytes,
        checkpoint,
        error: None,
        closing: false,
        appended_records: 0,
        appended_logical_bytes: 0,
        appended_stored_bytes: 0,
        write_logical_bytes: 0,
        write_stored_bytes: 0,
        syncs: 0,
    };
    Ok((state, report))
}

#[allow(clippy::too_many_arguments)]
fn cut_or_fail(
    path: &Path,
    file: &dyn VFile,
    last: bool,
    config: &CacheConfig,
    offset: u64,
    len: u64,
    what: String,
    report: &mut RecoveryReport,
) -> Result<()> {
    if !last || config.recovery == RecoveryMode::Absolute {
        return Err(Error::corrupt(path, offset, what));
    }
    file.set_len(offset).at(path)?;
    file.sync_data().at(path)?;
    report.truncated = Some((path.to_path_buf(), offset, len - offset, what));
    Ok(())
}

/// Whether every byte of `file` from `offset` to `len` is zero.
fn zeros_to_end(file: &dyn VFile, offset: u64, len: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 128 << 10];
    let mut at = offset;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        let got = file.read_full_at(&mut buf[..n], at)?;
        if got == 0 {
            break;
        }
        if buf[..got].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += got as u64;
    }
    Ok(true)
}
