//! The reader of durable records, in sequence order across segments.

use super::Shared;
use crate::error::{Error, IoContext, Result};
use crate::record::{self, Record};
use crate::segment::{self, Scan, SegmentReader};
use std::sync::Arc;

/// Reads durable records in sequence order across segments. See [`Cache::reader`].
pub struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) next_seq: u64,
    pub(super) seg: Option<SegmentReader>,
}

impl Reader {
    /// Sequence number of the next record this reader returns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next durable record, `Ok(None)` at the durable end, or the damage found.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        match self.advance(None)? {
            Some(Next::Record(rec)) => Ok(Some(rec)),
            _ => Ok(None),
        }
    }

    /// The next durable record's frame, appended to `out` undecoded and rebound to
    /// `binding` (see [`record::rebind`]); `Ok(None)` at the durable end.
    pub fn next_frame(
        &mut self,
        out: &mut Vec<u8>,
        binding: u64,
    ) -> Result<Option<record::FrameHeader>> {
        match self.advance(Some((out, binding)))? {
            Some(Next::Frame(h)) => Ok(Some(h)),
            _ => Ok(None),
        }
    }

    fn advance(&mut self, mut raw: Option<(&mut Vec<u8>, u64)>) -> Result<Option<Next>> {
        let mut reopened_without_progress = false;
        loop {
            let target = {
                let st = self.shared.state.lock();
                let durable_seq = st.durable_seq;
                if self.next_seq > durable_seq {
                    return Ok(None);
                }
                let found = st
                    .segments
                    .iter()
                    .rev()
                    .find(|(_, s)| s.base_seq <= self.next_seq)
                    .map(|(id, s)| (*id, s.durable_bytes));
                found
            };
            let Some((seg_id, durable_bytes)) = target else {
                return Err(Error::NotFound(format!(
                    "change log no longer holds sequence number {}",
                    self.next_seq
                )));
            };
            match &mut self.seg {
                Some(r) if r.header.segment_id == seg_id => r.set_limit(durable_bytes),
                _ => {
                    let path = self.shared.dir.join(segment::file_name(seg_id));
                    let file = self.shared.vfs.open(&path).at(&path)?;
                    self.seg = Some(SegmentReader::open(file, &path, durable_bytes)?);
                }
            }
            let reader = self.seg.as_mut().expect("segment reader set above");
            let scan = match &mut raw {
                Some((out, binding)) => reader.next_frame(self.next_seq, out, *binding)?,
                None => reader.next(self.next_seq)?,
            };
            let (offset, seq, next) = match scan {
                Scan::Record(offset, rec) => (offset, rec.seq, Next::Record(rec)),
                Scan::Frame(offset, h) => (offset, h.seq, Next::Frame(h)),
                Scan::Skipped(..) => {
                    reopened_without_progress = false;
                    continue;
                }
                Scan::End => {
                    if reopened_without_progress {
                        return Err(Error::corrupt(
                            reader.path(),
                            reader.position(),
                            format!("durable record {} is missing", self.next_seq),
                        ));
                    }
                    // Move on: the next lookup finds the segment that starts at next_seq.
                    self.seg = None;
                    reopened_without_progress = true;
                    continue;
                }
                Scan::Invalid { offset, what } => {
                    return Err(Error::corrupt(reader.path(), offset, what.to_string()));
                }
            };
            if seq != self.next_seq {
                return Err(Error::corrupt(
                    reader.path(),
                    offset,
                    format!(
                        "record has sequence number {seq}, expected {}",
                        self.next_seq
                    ),
                ));
            }
            self.next_seq += 1;
            return Ok(Some(next));
        }
    }
}

enum Next {
    Record(Record),
    Frame(record::FrameHeader),
}

impl Iterator for Reader {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}
