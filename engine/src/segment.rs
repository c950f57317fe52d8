//! Segments: the append-only files of the change log, and the scanner that reads frames
//! out of them.
//!
//! Byte map of a segment header (integers little-endian; see `docs/format.md`):
//!
//! ```text
//! off  size  field
//!   0     8  magic          "STBYLOG\0"
//!   8     2  version        1
//!  10     2  header_bytes   40
//!  12     4  incompat       feature bits a reader must know, or refuse the file:
//!                           bit 0 MARKER_KINDS (markers may carry a kind byte)
//!  16     4  compat         feature bits a reader may ignore
//!  20     8  segment_id     also the file name: {segment_id:016x}.log
//!  28     8  base_seq       sequence number the first record of this segment carries
//!  36     4  crc32          of bytes 0..36
//! ```
//!
//! Frames (see [`crate::record`]) follow back to back from byte 40. A segment's frames
//! carry consecutive sequence numbers starting at `base_seq`.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, Result};
use crate::record::{self, FrameHeader, Record, HEADER_BYTES};
use crate::util::codec::{part, DecodeError, Features, Reader, Writer};
use crate::vfs::VFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const MAGIC: [u8; 8] = *b"STBYLOG\0";
pub const VERSION: u16 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 40;
/// Incompatible feature bit: markers in this segment may carry a kind byte (see
/// [`crate::record`]). Every segment this build creates sets it, so a build that predates
/// typed markers refuses the segment with a readable message instead of taking a marker
/// it cannot decode for a torn tail. Segments without it (written before) read as ever.
pub const INCOMPAT_MARKER_KINDS: u32 = 1 << 0;
/// Incompatible feature bits this build understands, and sets on the segments it creates.
pub const KNOWN_INCOMPAT: u32 = INCOMPAT_MARKER_KINDS;

/// A segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment_id: u64,
    pub base_seq: u64,
    pub compat: u32,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = Vec::with_capacity(SEGMENT_HEADER_BYTES);
        Writer::new(&mut out)
            .bytes(&MAGIC)
            .u16(VERSION)
            .u16(SEGMENT_HEADER_BYTES as u16)
            .u32(KNOWN_INCOMPAT)
            .u32(self.compat)
            .u64(self.segment_id)
            .u64(self.base_seq);
        let crc = crc32fast::hash(&out);
        Writer::new(&mut out).u32(crc);
        let mut b = [0u8; SEGMENT_HEADER_BYTES];
        b.copy_from_slice(&out);
        b
    }

    /// Parse and validate a header. Too few bytes (a segment whose creation was torn) is a
    /// truncation; a newer format is [`DecodeErrorKind::Unsupported`](crate::util::codec::DecodeErrorKind).
    pub fn decode(b: &[u8]) -> std::result::Result<SegmentHeader, DecodeError> {
        let whole = part(b, 0..SEGMENT_HEADER_BYTES, "header")?;
        let covered = whole.get(..36).unwrap_or_default();
        let mut r = Reader::new(whole);
        r.magic(&MAGIC, "not a Standby change-log segment (bad magic)")?;
        let version = r.u16("version")?;
        let header_bytes = r.u16("header_bytes")? as usize;
        let incompat = r.u32("incompat")?;
        let compat = r.u32("compat")?;
        let segment_id = r.u64("segment_id")?;
        let base_seq = r.u64("base_seq")?;
        if crc32fast::hash(covered) != r.u32("crc")? {
            return Err(DecodeError::invalid(
                "crc",
                36,
                "segment header checksum mismatch",
            ));
        }
        Features {
            version,
            version_at: 8,
            incompat,
            incompat_at: 12,
        }
        .check("segment", VERSION, KNOWN_INCOMPAT)?;
        if header_bytes != SEGMENT_HEADER_BYTES {
            return Err(DecodeError::invalid(
                "header_bytes",
                10,
                format!("segment header length {header_bytes}"),
            ));
        }
        Ok(SegmentHeader {
            segment_id,
            base_seq,
            compat,
        })
    }
}

/// File name of a segment.
pub fn file_name(segment_id: u64) -> String {
    format!("{segment_id:016x}.log")
}

/// Segment id from a file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// What the scanner found at its position.
#[derive(Debug)]
pub enum Scan {
    /// A verified record and the byte offset of its frame.
    Record(u64, Record),
    /// A verified frame whose body was skipped undecoded (its sequence number was below the
    /// reader's start).
    Skipped(u64, u64),
    /// The clean end of the readable bytes.
    End,
    /// A verified frame copied out undecoded (see [`SegmentReader::next_frame`]).
    Frame(u64, FrameHeader),
    /// Bytes at this offset do not form a valid frame (or stop mid-frame): a torn tail if
    /// this is the end of the log, corruption otherwise.
    Invalid { offset: u64, what: DecodeError },
}

/// Reads frames sequentially from a segment, up to a byte limit, through a large aligned
/// buffer (reads into a misaligned buffer are much slower).
pub struct SegmentReader {
    file: Arc<dyn VFile>,
    path: PathBuf,
    pub header: SegmentHeader,
    pos: u64,
    limit: u64,
    buf: Vec<u8>,
    buf_start: u64,
    buf_len: usize,
}

const READ_CHUNK_BYTES: usize = 1 << 20;

impl SegmentReader {
    /// Open a segment for reading: validates its header. `limit` caps how far frames are read.
    pub fn open(file: Arc<dyn VFile>, path: &Path, limit: u64) -> Result<SegmentReader> {
        let mut hb = [0u8; SEGMENT_HEADER_BYTES];
        let n = file
            .read_full_at(&mut hb, 0)
            .map_err(|e| Error::io(path, e))?;
        let header =
            SegmentHeader::decode(hb.get(..n).unwrap_or(&[])).map_err(|e| e.at(path, 0))?;
        Ok(SegmentReader {
            file,
            path: path.to_path_buf(),
            header,
            pos: SEGMENT_HEADER_BYTES as u64,
            limit,
            buf: Vec::new(),
            buf_start: 0,
            buf_len: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offset of the next frame.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Raise the byte limit (the durable end moved on).
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Make sure `[pos, pos+len)` is in the buffer, as far as the limit allows. Returns how
    /// many bytes from `pos` are available.
    fn fill(&mut self, len: usize) -> Result<usize> {
        let in_buf = self.pos >= self.buf_start
            && self.pos + len as u64 <= self.buf_start + self.buf_len as u64;
        let available = (self.limit.saturating_sub(self.pos)) as usize;
        if in_buf {
            return Ok(len);
        }
        let want = len.min(available);
        if self.pos >= self.buf_start
            && self.pos + want as u64 <= self.buf_start + self.buf_len as u64
        {
            return Ok(want);
        }
        let chunk = want.max(READ_CHUNK_BYTES).min(available);
        if self.buf.len() < chunk {
            self.buf = vec![0u8; chunk.next_power_of_two()];
        }
        let n = self
            .file
            .read_full_at(self.buf.get_mut(..chunk).unwrap_or_default(), self.pos)
            .map_err(|e| Error::io(&self.path, e))?;
        self.buf_start = self.pos;
        self.buf_len = n;
        Ok(n.min(len))
    }

    fn slice(&self, len: usize) -> &[u8] {
        // fill() put [pos, pos + len) in the buffer; were it not, the frame reads as short.
        let at = (self.pos - self.buf_start) as usize;
        at.checked_add(len)
            .and_then(|end| self.buf.get(at..end))
            .unwrap_or(&[])
    }

    /// Read the next frame. Records whose seq is below `skip_below` are verified by their
    /// length check only and skipped without decoding their body.
    pub fn next(&mut self, skip_below: u64) -> Result<Scan> {
        self.scan(skip_below, |frame, header, sid| {
            record::verify_and_decode(frame, header, sid).map(|rec| Scan::Record(0, rec))
        })
    }

    /// Like [`SegmentReader::next`], but a record at or above `skip_below` is not decoded:
    /// its frame is appended to `out` rebound to `binding` (checked against this segment on
    /// the way), for shipping to another log without decompressing it.
    pub fn next_frame(&mut self, skip_below: u64, out: &mut Vec<u8>, binding: u64) -> Result<Scan> {
        self.scan(skip_below, |frame, _, sid| {
            let start = out.len();
            out.extend_from_slice(frame);
            record::rebind(out.get_mut(start..).unwrap_or_default(), sid, binding)
                .map(|h| Scan::Frame(0, h))
                .inspect_err(|_| out.truncate(start))
        })
    }

    /// The frame at the read position: its header parsed and its bytes read; a record below
    /// `skip_below` is checked and skipped, any other handed to `take` (which checks it and
    /// says what it is; the offset is filled in here). The position moves past a good frame.
    fn scan(
        &mut self,
        skip_below: u64,
        take: impl FnOnce(&[u8], &FrameHeader, u64) -> Result<Scan, DecodeError>,
    ) -> Result<Scan> {
        if self.pos >= self.limit {
            return Ok(Scan::End);
        }
        let offset = self.pos;
        let have = self.fill(HEADER_BYTES)?;
        let header = match FrameHeader::parse(self.slice(have), self.header.segment_id) {
            Ok(h) => h,
            Err(what) => return Ok(Scan::Invalid { offset, what }),
        };
        let total = header.frame_bytes();
        let have = self.fill(total)?;
        if have < total {
            return Ok(Scan::Invalid {
                offset,
                what: DecodeError::truncated("body", HEADER_BYTES, total, have),
            });
        }
        let sid = self.header.segment_id;
        if header.seq < skip_below {
            if let Err(what) = record::verify(self.slice(total), &header, sid) {
                return Ok(Scan::Invalid { offset, what });
            }
            self.pos += total as u64;
            return Ok(Scan::Skipped(offset, header.seq));
        }
        match take(self.slice(total), &header, sid) {
            Ok(scan) => {
                self.pos += total as u64;
                Ok(match scan {
                    Scan::Record(_, rec) => Scan::Record(offset, rec),
                    Scan::Frame(_, h) => Scan::Frame(offset, h),
                    other => other,
                })
            }
            Err(what) => Ok(Scan::Invalid { offset, what }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = SegmentHeader {
            segment_id: 77,
            base_seq: 1234,
            compat: 0,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..b.len() {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(SegmentHeader::decode(&d).is_err(), "byte {i}");
        }
        assert!(SegmentHeader::decode(&b[..10]).unwrap_err().is_truncated());
    }

    #[test]
    fn unknown_incompat_feature_is_refused_compat_ignored() {
        let mut b = SegmentHeader {
            segment_id: 1,
            base_seq: 1,
            compat: 0,
        }
        .encode();
        b[16] = 0x80; // a compatible bit we do not know
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        assert!(SegmentHeader::decode(&b).is_ok());
        b[12] = 0x02;
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        let e = SegmentHeader::decode(&b).unwrap_err();
        assert!(e.is_unsupported(), "{e}");
        assert_eq!((e.field, e.offset), ("incompat", 12));
    }

    #[test]
    fn a_segment_of_the_first_version_without_feature_bits_still_reads() {
        let h = SegmentHeader {
            segment_id: 5,
            base_seq: 9,
            compat: 0,
        };
        let mut b = h.encode();
        assert_eq!(b[12..16], INCOMPAT_MARKER_KINDS.to_le_bytes());
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_file_name("checkpoint"), None);
        assert_eq!(parse_file_name("0000000000000abc.tmp"), None);
    }
}
