//! Change-log records: the framing of one write, zero/trim range or marker.
//!
//! Byte map of a frame (integers little-endian; see `docs/format.md`):
//!
//! ```text
//! off  size  field
//!   0     4  body_len    bytes of body as stored (after compression), <= MAX_BODY_BYTES
//!   4     4  len_check   crc32 seeded with LEN_SEED over segment_id(8) ‖ body_len(4)
//!   8     1  kind        1 write, 2 zero, 3 marker
//!   9     1  flags       bit 0 LZ4 body, bit 1 trim (zero only); other bits must be 0
//!  10     2  disk        disk index within the VM (0 for markers)
//!  12     4  raw_len     body bytes before compression (== body_len unless LZ4)
//!  16     8  seq         VM-wide sequence number
//!  24     8  time_us     microseconds since the Unix epoch when the record was accepted
//!  32     8  offset      byte offset on the disk (write, zero); 0 for markers
//!  40     n  body        write: data; zero: length u64; marker: see below
//! 40+n    4  crc         crc32 seeded with CRC_SEED over segment_id(8) ‖ bytes 0..40+n
//! ```
//!
//! Byte map of a marker body:
//!
//! ```text
//! off  size  field
//!   0     1  consistency 1 crash, 2 app
//!   1     1  present     bit 0 name, bit 1 group, bit 2 kind byte; other bits must be 0
//!   2     2  name_len    <= MAX_NAME_BYTES
//!   4     2  group_len   <= MAX_NAME_BYTES
//!   6     k  kind        k = 1 if present bit 2 (1 resync-begin, 2 resync-end), else 0
//! 6+k     n  name        UTF-8
//!  ...    g  group       UTF-8
//! ```
//!
//! A user's point marker has no kind byte, so it is byte for byte what the first version
//! wrote. The agent's own markers carry a kind, so no user's name can pass for one. A
//! marker without a kind named `standby:resync-begin` or `standby:resync-end` was written
//! by an older agent and reads as that kind; names starting with `standby:` are refused
//! for new point markers.
//!
//! Both checks bind the segment id, so a record copied from, or left over in, another
//! segment never verifies, and all-zero bytes never verify either. Untrusted bytes are
//! parsed into a [`FrameHeader`] (length checked before any allocation), then verified
//! against the crc, then decoded into a [`Record`] whose fields are validated.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS). Every read goes through the codec's bounds-checked cursor.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::util::codec::{part, DecodeError, Reader, Writer};
use crate::SECTOR_BYTES;
use std::borrow::Cow;

/// Size of the fixed part of a frame before the body.
pub const HEADER_BYTES: usize = 40;
/// Size of the trailing crc.
pub const TRAILER_BYTES: usize = 4;
/// Largest write a single record can carry (the NBD protocol's usual maximum is 32 MiB).
pub const MAX_WRITE_BYTES: usize = 32 << 20;
/// Largest body a frame may declare; checked before allocating.
pub const MAX_BODY_BYTES: usize = MAX_WRITE_BYTES;
/// Longest marker name or group id.
pub const MAX_NAME_BYTES: usize = 1024;

const LEN_SEED: u32 = 0x5354_424c; // "STBL"
const CRC_SEED: u32 = 0x5354_4252; // "STBR"

pub const KIND_WRITE: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_MARKER: u8 = 3;

pub const FLAG_LZ4: u8 = 1 << 0;
pub const FLAG_TRIM: u8 = 1 << 1;
const KNOWN_FLAGS: u8 = FLAG_LZ4 | FLAG_TRIM;

/// How consistent a recovery point cut at a marker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Any prefix of the write sequence: what the disks would hold after a power cut.
    Crash,
    /// Cut while the guest's applications were quiesced.
    App,
}

/// What a marker is for. Only [`MarkerKind::Point`] is a user's; the others are written by
/// Standby itself and are told apart by a typed field, never by their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MarkerKind {
    /// A recovery point asked for by a user, a policy or a tool.
    #[default]
    Point,
    /// The agent starts a resync: until [`MarkerKind::ResyncEnd`] the log is not a
    /// crash-consistent sequence (see [`crate::agent`]).
    ResyncBegin,
    /// The agent's resync is complete.
    ResyncEnd,
}

/// Marker names starting with this are Standby's own and refused for point markers.
pub const RESERVED_NAME_PREFIX: &str = "standby:";
/// The names the first record format gave the agent's resync markers (read as their kinds).
const LEGACY_RESYNC_BEGIN: &str = "standby:resync-begin";
const LEGACY_RESYNC_END: &str = "standby:resync-end";

const MARKER_KIND_RESYNC_BEGIN: u8 = 1;
const MARKER_KIND_RESYNC_END: u8 = 2;

/// A recovery-point cut written into the log, ordered with the writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub consistency: Consistency,
    pub name: Option<String>,
    /// A consistency group shares markers across VMs.
    pub group: Option<String>,
    pub kind: MarkerKind,
}

/// Check a name asked for a recovery point: at most [`MAX_NAME_BYTES`], and not in
/// Standby's reserved namespace.
pub fn check_point_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("point name longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.starts_with(RESERVED_NAME_PREFIX) {
        return Err(format!(
            "point name '{name}' is refused: names starting with '{RESERVED_NAME_PREFIX}' are reserved for Standby's own markers"
        ));
    }
    Ok(())
}

/// What a record does, as handed to [`crate::cache::Cache::append`].
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    Write {
        disk: u16,
        offset: u64,
        data: &'a [u8],
    },
    /// NBD WRITE_ZEROES (`trim == false`) or TRIM (`trim == true`): the range reads as zeros.
    Zero {
        disk: u16,
        offset: u64,
        len: u64,
        trim: bool,
    },
    Marker(&'a Marker),
}

/// A decoded, verified record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_us: u64,
    pub op: Op,
}

/// The owned form of [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u16,
        offset: u64,
        len: u64,
        trim: bool,
    },
    Marker(Marker),
}

impl Op {
    pub fn as_entry(&self) -> Entry<'_> {
        match self {
            Op::Write { disk, offset, data } => Entry::Write {
                disk: *disk,
                offset: *offset,
                data,
            },
            Op::Zero {
                disk,
                offset,
                len,
                trim,
            } => Entry::Zero {
                disk: *disk,
                offset: *offset,
                len: *len,
                trim: *trim,
            },
            Op::Marker(m) => Entry::Marker(m),
        }
    }

    /// Bytes of disk the record describes (data for writes, range for zeros, 0 for markers).
    pub fn logical_bytes(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            Op::Zero { len, .. } => *len,
            Op::Marker(_) => 0,
        }
    }
}

/// Check an entry before it gets a sequence number: alignment, bounds, sizes.
pub fn validate(entry: &Entry<'_>) -> Result<(), String> {
    match *entry {
        Entry::Write { offset, data, .. } => {
            if data.is_empty() || data.len() > MAX_WRITE_BYTES {
                return Err(format!(
                    "write of {} bytes: must be 1 to {MAX_WRITE_BYTES} bytes",
                    data.len()
                ));
            }
            check_aligned(offset, data.len() as u64)?;
            offset
                .checked_add(data.len() as u64)
                .ok_or("write past the end of the address space")?;
        }
        Entry::Zero { offset, len, .. } => {
            if len == 0 {
                return Err("zero range of 0 bytes".into());
            }
            check_aligned(offset, len)?;
            offset
                .checked_add(len)
                .ok_or("zero range past the end of the address space")?;
        }
        Entry::Marker(m) => {
            for s in [&m.name, &m.group].into_iter().flatten() {
                if s.len() > MAX_NAME_BYTES {
                    return Err(format!("marker name longer than {MAX_NAME_BYTES} bytes"));
                }
            }
            if let (MarkerKind::Point, Some(name)) = (m.kind, &m.name) {
                check_point_name(name)?;
            }
        }
    }
    Ok(())
}

fn check_aligned(offset: u64, len: u64) -> Result<(), String> {
    if !offset.is_multiple_of(SECTOR_BYTES) || !len.is_multiple_of(SECTOR_BYTES) {
        return Err(format!(
            "offset {offset} and length {len} must be multiples of {SECTOR_BYTES} bytes"
        ));
    }
    Ok(())
}

/// An entry made ready to frame: validated, compressed, body crc computed. This is the
/// expensive part of an append and runs on the caller's thread, outside any lock. A raw
/// body borrows the caller's data (the one copy happens when the frame is queued).
pub struct Prepared<'a> {
    kind: u8,
    flags: u8,
    disk: u16,
    offset: u64,
    raw_len: u32,
    body: Cow<'a, [u8]>,
    body_crc: crc32fast::Hasher,
    logical_bytes: u64,
}

thread_local! {
    /// Reused lz4 output buffer: allocating and zeroing one per record costs more than
    /// compressing incompressible data.
    static LZ4_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Consecutive write payloads (on this thread) that lz4 could not shrink.
    static INCOMPRESSIBLE_RUN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// After a run of incompressible payloads (encrypted or already compressed data), try
/// lz4 on only one payload in 16 until one shrinks again: the attempt costs a pass over
/// the bytes on the writer's thread for nothing.
fn worth_trying() -> bool {
    INCOMPRESSIBLE_RUN.with(|run| {
        let n = run.get();
        if n < 8 {
            return true;
        }
        run.set(n + 1);
        n % 16 == 0
    })
}

fn note_outcome(shrank: bool) {
    INCOMPRESSIBLE_RUN.with(|run| {
        if shrank {
            run.set(0);
        } else {
            run.set(run.get().saturating_add(1));
        }
    })
}

impl<'a> Prepared<'a> {
    /// Validate and encode the body. `compress` tries lz4 and keeps it only if smaller.
    pub fn new(entry: &Entry<'a>, compress: bool) -> Result<Prepared<'a>, String> {
        validate(entry)?;
        let (kind, mut flags, disk, offset, raw, logical_bytes): (
            u8,
            u8,
            u16,
            u64,
            Cow<'a, [u8]>,
            u64,
        ) = match *entry {
            Entry::Write { disk, offset, data } => (
                KIND_WRITE,
                0,
                disk,
                offset,
                Cow::Borrowed(data),
                data.len() as u64,
            ),
            Entry::Zero {
                disk,
                offset,
                len,
                trim,
            } => (
                KIND_ZERO,
                if trim { FLAG_TRIM } else { 0 },
                disk,
                offset,
                Cow::Owned(len.to_le_bytes().to_vec()),
                len,
            ),
            Entry::Marker(m) => (KIND_MARKER, 0, 0, 0, Cow::Owned(encode_marker(m)), 0),
        };
        let raw_len = raw.len() as u32;
        let mut body = raw;
        if compress && kind == KIND_WRITE && worth_trying() {
            // Keep the compressed form only if it is smaller: incompressible data grows
            // slightly under lz4 and is stored raw.
            let compressed = LZ4_SCRATCH.with(|scratch| {
                let mut out = scratch.borrow_mut();
                let max = lz4_flex::block::get_maximum_output_size(body.len());
                if out.len() < max {
                    out.resize(max, 0);
                }
                let room = out.get_mut(..max).unwrap_or_default();
                match lz4_flex::block::compress_into(&body, room) {
                    Ok(n) if n < body.len() => out.get(..n).map(<[u8]>::to_vec),
                    _ => None,
                }
            });
            note_outcome(compressed.is_some());
            if let Some(c) = compressed {
                body = Cow::Owned(c);
                flags |= FLAG_LZ4;
            }
        }
        let mut body_crc = crc32fast::Hasher::new();
        body_crc.update(&body);
        Ok(Prepared {
            kind,
            flags,
            disk,
            offset,
            raw_len,
            body,
            body_crc,
            logical_bytes,
        })
    }

    /// Total bytes this record occupies in a segment.
    pub fn frame_bytes(&self) -> usize {
        HEADER_BYTES + self.body.len() + TRAILER_BYTES
    }

    pub fn logical_bytes(&self) -> u64 {
        self.logical_bytes
    }

    pub fn is_write(&self) -> bool {
        self.kind == KIND_WRITE
    }

    /// Append the complete frame to `out`, bound to `segment_id`.
    pub fn encode_into(&self, out: &mut Vec<u8>, segment_id: u64, seq: u64, time_us: u64) {
        let start = out.len();
        let body_len = self.body.len() as u32;
        Writer::new(out)
            .u32(body_len)
            .u32(len_check(segment_id, body_len))
            .u8(self.kind)
            .u8(self.flags)
            .u16(self.disk)
            .u32(self.raw_len)
            .u64(seq)
            .u64(time_us)
            .u64(self.offset);
        let mut crc = crc32fast::Hasher::new_with_initial(CRC_SEED);
        crc.update(&segment_id.to_le_bytes());
        crc.update(out.get(start..).unwrap_or_default());
        crc.combine(&self.body_crc);
        Writer::new(out).bytes(&self.body).u32(crc.finalize());
    }
}

/// Encode one record as a whole frame (convenience for tests and tools).
pub fn encode(
    entry: &Entry<'_>,
    segment_id: u64,
    seq: u64,
    time_us: u64,
    compress: bool,
) -> Result<Vec<u8>, String> {
    let p = Prepared::new(entry, compress)?;
    let mut out = Vec::with_capacity(p.frame_bytes());
    p.encode_into(&mut out, segment_id, seq, time_us);
    Ok(out)
}

fn len_check(segment_id: u64, body_len: u32) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(LEN_SEED);
    h.update(&segment_id.to_le_bytes());
    h.update(&body_len.to_le_bytes());
    h.finalize()
}

fn encode_marker(m: &Marker) -> Vec<u8> {
    let name = m.name.as_deref().unwrap_or("").as_bytes();
    let group = m.group.as_deref().unwrap_or("").as_bytes();
    let mut out = Vec::with_capacity(7 + name.len() + group.len());
    let mut present = 0u8;
    if m.name.is_some() {
        present |= 1;
    }
    if m.group.is_some() {
        present |= 2;
    }
    let kind = match m.kind {
        MarkerKind::Point => None,
        MarkerKind::ResyncBegin => Some(MARKER_KIND_RESYNC_BEGIN),
        MarkerKind::ResyncEnd => Some(MARKER_KIND_RESYNC_END),
    };
    if kind.is_some() {
        present |= 4;
    }
    let mut w = Writer::new(&mut out);
    w.u8(match m.consistency {
        Consistency::Crash => 1,
        Consistency::App => 2,
    })
    .u8(present)
    .u16(name.len() as u16)
    .u16(group.len() as u16);
    if let Some(k) = kind {
        w.u8(k);
    }
    w.bytes(name).bytes(group);
    out
}

/// Decode a marker body. Offsets in errors are from the start of the body.
fn decode_marker(b: &[u8]) -> Result<Marker, DecodeError> {
    if b.len() < 6 {
        return Err(DecodeError::invalid(
            "marker",
            0,
            "marker body shorter than 6 bytes",
        ));
    }
    let mut r = Reader::new(b);
    let consistency = match r.u8("consistency")? {
        1 => Consistency::Crash,
        2 => Consistency::App,
        k => {
            return Err(DecodeError::invalid(
                "consistency",
                0,
                format!("unknown marker consistency {k}"),
            ))
        }
    };
    let present = r.u8("present")?;
    if present & !7 != 0 {
        return Err(DecodeError::invalid(
            "present",
            1,
            "unknown marker presence bits",
        ));
    }
    let name_len = r.u16("name_len")? as usize;
    let group_len = r.u16("group_len")? as usize;
    let kind_len = usize::from(present & 4 != 0);
    if name_len > MAX_NAME_BYTES
        || group_len > MAX_NAME_BYTES
        || 6 + kind_len + name_len + group_len != b.len()
    {
        return Err(DecodeError::invalid(
            "name_len",
            2,
            "marker name lengths do not match its body",
        ));
    }
    let kind = if kind_len == 0 {
        MarkerKind::Point
    } else {
        match r.u8("kind")? {
            MARKER_KIND_RESYNC_BEGIN => MarkerKind::ResyncBegin,
            MARKER_KIND_RESYNC_END => MarkerKind::ResyncEnd,
            k => {
                return Err(DecodeError::invalid(
                    "kind",
                    6,
                    format!("unknown marker kind {k}"),
                ))
            }
        }
    };
    let mut text = |len: usize, on: bool, field: &'static str| {
        let at = r.position();
        if !on {
            return if len == 0 {
                Ok(None)
            } else {
                Err(DecodeError::invalid(
                    field,
                    at,
                    "marker has text for an absent field",
                ))
            };
        }
        r.utf8(len, field).map(Some)
    };
    let name = text(name_len, present & 1 != 0, "name")?;
    let group = text(group_len, present & 2 != 0, "group")?;
    let mut m = Marker {
        consistency,
        name,
        group,
        kind,
    };
    if m.kind == MarkerKind::Point {
        // An older agent named its resync markers; they read as the kinds they meant.
        let legacy = match m.name.as_deref() {
            Some(LEGACY_RESYNC_BEGIN) => Some(MarkerKind::ResyncBegin),
            Some(LEGACY_RESYNC_END) => Some(MarkerKind::ResyncEnd),
            _ => None,
        };
        if let Some(kind) = legacy {
            m.kind = kind;
            m.name = None;
        }
    }
    Ok(m)
}

/// The fixed part of a frame, parsed but not yet verified against the crc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_len: u32,
    pub kind: u8,
    pub flags: u8,
    pub disk: u16,
    pub raw_len: u32,
    pub seq: u64,
    pub time_us: u64,
    pub offset: u64,
}

impl FrameHeader {
    /// Parse the first [`HEADER_BYTES`] of a frame. Checks the length check, the kind and
    /// the flags, and bounds `body_len` and `raw_len`, so the caller may then allocate.
    #[inline]
    pub fn parse(b: &[u8], segment_id: u64) -> Result<FrameHeader, DecodeError> {
        // One bounds check for the whole header; the reads below then cannot fail.
        let Some(head) = b.first_chunk::<HEADER_BYTES>() else {
            return Err(DecodeError::truncated("header", 0, HEADER_BYTES, b.len()));
        };
        let mut r = Reader::new(head);
        let body_len = r.u32("body_len")?;
        if r.u32("len_check")? != len_check(segment_id, body_len) {
            return Err(DecodeError::invalid(
                "len_check",
                4,
                "record length check failed",
            ));
        }
        let h = FrameHeader {
            body_len,
            kind: r.u8("kind")?,
            flags: r.u8("flags")?,
            disk: r.u16("disk")?,
            raw_len: r.u32("raw_len")?,
            seq: r.u64("seq")?,
            time_us: r.u64("time_us")?,
            offset: r.u64("offset")?,
        };
        if body_len as usize > MAX_BODY_BYTES {
            return Err(DecodeError::invalid(
                "body_len",
                0,
                format!("record body of {body_len} bytes exceeds the limit"),
            ));
        }
        if h.raw_len as usize > MAX_BODY_BYTES {
            return Err(DecodeError::invalid(
                "raw_len",
                12,
                format!("record body of {} bytes exceeds the limit", h.raw_len),
            ));
        }
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::invalid(
                "flags",
                9,
                format!("unknown record flags {:#04x}", h.flags),
            ));
        }
        if !matches!(h.kind, KIND_WRITE | KIND_ZERO | KIND_MARKER) {
            return Err(DecodeError::invalid(
                "kind",
                8,
                format!("unknown record kind {}", h.kind),
            ));
        }
        if h.flags & FLAG_LZ4 == 0 && h.raw_len != body_len {
            return Err(DecodeError::invalid(
                "raw_len",
                12,
                "uncompressed record with raw length unlike its body length",
            ));
        }
        Ok(h)
    }

    /// Bytes of the whole frame.
    #[inline]
    pub fn frame_bytes(&self) -> usize {
        HEADER_BYTES + self.body_len as usize + TRAILER_BYTES
    }

    /// Offset of the crc (the end of the body).
    #[inline]
    fn body_end(&self) -> usize {
        HEADER_BYTES + self.body_len as usize
    }

    /// `frame` split into what the crc covers (header and body) and the crc, or a
    /// truncation naming the part that is missing.
    #[inline]
    fn split<'a>(&self, frame: &'a [u8]) -> Result<(&'a [u8], u32), DecodeError> {
        let body_end = self.body_end();
        let total = self.frame_bytes();
        let cut = |field, at| DecodeError::truncated(field, at, total, frame.len());
        let (covered, rest) = frame
            .split_at_checked(body_end)
            .ok_or_else(|| cut("body", HEADER_BYTES))?;
        let crc = rest
            .first_chunk::<TRAILER_BYTES>()
            .ok_or_else(|| cut("crc", body_end))?;
        Ok((covered, u32::from_le_bytes(*crc)))
    }
}

/// Verify a complete frame (`frame` holds exactly `header.frame_bytes()` bytes) and decode it.
#[inline]
pub fn verify_and_decode(
    frame: &[u8],
    header: &FrameHeader,
    segment_id: u64,
) -> Result<Record, DecodeError> {
    verify(frame, header, segment_id)?;
    let body = part(frame, HEADER_BYTES..header.body_end(), "body")?;
    decode_verified(body, header)
}

/// Check a complete frame's crc without decoding its body.
#[inline]
pub fn verify(frame: &[u8], header: &FrameHeader, segment_id: u64) -> Result<(), DecodeError> {
    let (covered, stored) = header.split(frame)?;
    let mut crc = crc32fast::Hasher::new_with_initial(CRC_SEED);
    crc.update(&segment_id.to_le_bytes());
    crc.update(covered);
    if crc.finalize() != stored {
        return Err(DecodeError::invalid(
            "crc",
            header.body_end(),
            "record checksum mismatch",
        ));
    }
    Ok(())
}

/// Decode a verified body into a record, validating every field. Offsets in errors are
/// from the start of the frame.
pub fn decode_verified(body: &[u8], h: &FrameHeader) -> Result<Record, DecodeError> {
    let invalid = |field, what: String| DecodeError::invalid(field, HEADER_BYTES, what);
    let raw;
    let body: &[u8] = if h.flags & FLAG_LZ4 != 0 {
        if h.kind != KIND_WRITE {
            return Err(DecodeError::invalid(
                "flags",
                9,
                "compressed record of a kind that is never compressed",
            ));
        }
        let mut out = vec![0u8; h.raw_len as usize];
        let n = lz4_flex::block::decompress_into(body, &mut out)
            .map_err(|e| invalid("body", format!("lz4 body does not decompress: {e}")))?;
        if n != out.len() {
            return Err(invalid(
                "body",
                "lz4 body decompresses to the wrong length".into(),
            ));
        }
        raw = out;
        &raw
    } else {
        body
    };
    let op = match h.kind {
        KIND_WRITE => {
            let data = body.to_vec();
            let entry = Entry::Write {
                disk: h.disk,
                offset: h.offset,
                data: &data,
            };
            validate(&entry).map_err(|e| DecodeError::invalid("offset", 32, e))?;
            Op::Write {
                disk: h.disk,
                offset: h.offset,
                data,
            }
        }
        KIND_ZERO => {
            let Ok(len) = <[u8; 8]>::try_from(body) else {
                return Err(invalid("body", "zero record body is not 8 bytes".into()));
            };
            let len = u64::from_le_bytes(len);
            let trim = h.flags & FLAG_TRIM != 0;
            validate(&Entry::Zero {
                disk: h.disk,
                offset: h.offset,
                len,
                trim,
            })
            .map_err(|e| DecodeError::invalid("offset", 32, e))?;
            Op::Zero {
                disk: h.disk,
                offset: h.offset,
                len,
                trim,
            }
        }
        _ => {
            if h.disk != 0 || h.offset != 0 || h.flags != 0 {
                return Err(DecodeError::invalid(
                    "disk",
                    10,
                    "marker record with disk, offset or flags set",
                ));
            }
            Op::Marker(decode_marker(body).map_err(|e| e.shifted(HEADER_BYTES))?)
        }
    };
    if h.kind != KIND_ZERO && h.flags & FLAG_TRIM != 0 {
        return Err(DecodeError::invalid(
            "flags",
            9,
            "trim flag on a record that is not a zero range",
        ));
    }
    Ok(Record {
        seq: h.seq,
        time_us: h.time_us,
        op,
    })
}

/// Move a verified frame from one binding to another: check `frame` (exactly one whole
/// frame) against `from_segment`, then rewrite its length check and crc for `to_segment`.
/// One pass over the bytes: the crc of everything after the segment id is computed once
/// and combined with each binding. Used to ship frames between logs (segment ↔ wire)
/// without decompressing or recompressing them.
pub fn rebind(
    frame: &mut [u8],
    from_segment: u64,
    to_segment: u64,
) -> Result<FrameHeader, DecodeError> {
    let h = FrameHeader::parse(frame, from_segment)?;
    let total = h.frame_bytes();
    if frame.len() > total {
        return Err(DecodeError::invalid(
            "end",
            total,
            "bytes after the end of the frame",
        ));
    }
    let (_, stored) = h.split(frame)?;
    let body_end = h.body_end();
    let (covered, crc_out) = frame.split_at_mut(body_end.min(frame.len()));
    let (head, after) = covered
        .split_first_chunk_mut::<8>()
        .ok_or_else(|| DecodeError::truncated("header", 0, total, body_end))?;
    // The crc covers the length check, which depends on the binding: hash what follows it
    // once, and combine it with each binding's first 8 bytes.
    let mut rest = crc32fast::Hasher::new();
    rest.update(after);
    let body_len = h.body_len.to_le_bytes();
    // Parse checked the stored length check against `from_segment`.
    let from_check = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let bound = |segment_id: u64, len_check: u32| {
        let mut crc = crc32fast::Hasher::new_with_initial(CRC_SEED);
        crc.update(&segment_id.to_le_bytes());
        crc.update(&body_len);
        crc.update(&len_check.to_le_bytes());
        crc.combine(&rest);
        crc.finalize()
    };
    if bound(from_segment, from_check) != stored {
        return Err(DecodeError::invalid(
            "crc",
            body_end,
            "record checksum mismatch",
        ));
    }
    let new_check = len_check(to_segment, h.body_len);
    let crc = bound(to_segment, new_check);
    head[4..8].copy_from_slice(&new_check.to_le_bytes());
    if let Some(c) = crc_out.first_chunk_mut::<TRAILER_BYTES>() {
        *c = crc.to_le_bytes();
    }
    Ok(h)
}

/// Rewrite the length check and crc of the frame at the start of `frame` so that its
/// checks pass whatever its other bytes say (the body length is clamped to what is
/// there). Returns the frame's length, or `None` if there are too few bytes for a frame.
/// For fuzzing and tests only: it lets them reach the body decoders behind the checksums.
pub fn reseal(frame: &mut [u8], segment_id: u64) -> Option<usize> {
    let room = frame.len().checked_sub(HEADER_BYTES + TRAILER_BYTES)?;
    let head = frame.first_chunk_mut::<8>()?;
    let declared = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let body_len = declared.min(room).min(MAX_BODY_BYTES) as u32;
    head[0..4].copy_from_slice(&body_len.to_le_bytes());
    head[4..8].copy_from_slice(&len_check(segment_id, body_len).to_le_bytes());
    let body_end = HEADER_BYTES + body_len as usize;
    let (covered, rest) = frame.split_at_mut_checked(body_end)?;
    let mut crc = crc32fast::Hasher::new_with_initial(CRC_SEED);
    crc.update(&segment_id.to_le_bytes());
    crc.update(covered);
    *rest.first_chunk_mut::<TRAILER_BYTES>()? = crc.finalize().to_le_bytes();
    Some(body_end + TRAILER_BYTES)
}

/// Decode one whole frame from the start of `b` (for tests, fuzzing and tools).
/// Returns the record and the frame's length.
pub fn decode(b: &[u8], segment_id: u64) -> Result<(Record, usize), DecodeError> {
    let h = FrameHeader::parse(b, segment_id)?;
    let total = h.frame_bytes();
    let rec = verify_and_decode(b, &h, segment_id)?;
    Ok((rec, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::codec::DecodeErrorKind;

    fn samples() -> Vec<Op> {
        let text: Vec<u8> = b"standby keeps every acknowledged write "
            .iter()
            .cycle()
            .take(8192)
            .copied()
            .collect();
        let mut noise = vec![0u8; 4096];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        vec![
            Op::Write {
                disk: 3,
                offset: 512 * 9,
                data: text,
            },
            Op::Write {
                disk: 0,
                offset: 0,
                data: noise,
            },
            Op::Zero {
                disk: 1,
                offset: 1 << 40,
                len: 1 << 30,
                trim: false,
            },
            Op::Zero {
                disk: 1,
                offset: 4096,
                len: 512,
                trim: true,
            },
            Op::Marker(Marker {
                consistency: Consistency::Crash,
                name: None,
                group: None,
                kind: MarkerKind::Point,
            }),
            Op::Marker(Marker {
                consistency: Consistency::App,
                name: Some("before-upgrade".into()),
                group: Some("erp".into()),
                kind: MarkerKind::Point,
            }),
            Op::Marker(Marker {
                consistency: Consistency::App,
                name: Some(String::new()),
                group: None,
                kind: MarkerKind::Point,
            }),
            Op::Marker(Marker {
                consistency: Consistency::Crash,
                name: None,
                group: None,
                kind: MarkerKind::ResyncBegin,
            }),
            Op::Marker(Marker {
                consistency: Consistency::Crash,
                name: Some("named".into()),
                group: Some("g".into()),
                kind: MarkerKind::ResyncEnd,
            }),
        ]
    }

    #[test]
    fn after_incompressible_payloads_lz4_is_tried_less_and_comes_back() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = vec![b'a'; 4096];
        let write = |data: &[u8]| {
            let p = Prepared::new(
                &Entry::Write {
                    disk: 0,
                    offset: 0,
                    data,
                },
                true,
            )
            .unwrap();
            p.flags & FLAG_LZ4 != 0
        };
        std::thread::spawn(move || {
            for _ in 0..40 {
                assert!(!write(&noise));
            }
            // Compressible again: within one probe interval it is compressed again.
            let first = (0..17).position(|_| write(&text));
            assert!(first.is_some(), "lz4 never came back");
            assert!(
                write(&text),
                "after a payload shrank, every payload is tried"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn rebind_moves_a_frame_between_bindings() {
        for op in samples() {
            let frame = encode(&op.as_entry(), 7, 42, 1000, true).unwrap();
            let mut moved = frame.clone();
            let h = rebind(&mut moved, 7, 9).unwrap();
            assert_eq!(h.seq, 42);
            let (rec, n) = decode(&moved, 9).unwrap();
            assert_eq!((rec.op, n), (op.clone(), frame.len()));
            assert!(decode(&moved, 7).is_err());
            for i in 0..frame.len() {
                let mut bad = frame.clone();
                bad[i] ^= 0x04;
                assert!(rebind(&mut bad, 7, 9).is_err(), "flip at byte {i} passed");
            }
        }
    }

    #[test]
    fn every_kind_round_trips_compressed_or_not() {
        for compress in [false, true] {
            for (i, op) in samples().into_iter().enumerate() {
                let frame = encode(&op.as_entry(), 7, 100 + i as u64, 42, compress).unwrap();
                let (rec, n) = decode(&frame, 7).unwrap();
                assert_eq!(n, frame.len());
                assert_eq!(
                    rec,
                    Record {
                        seq: 100 + i as u64,
                        time_us: 42,
                        op
                    }
                );
            }
        }
    }

    #[test]
    fn compressible_data_is_stored_compressed_and_noise_raw() {
        let s = samples();
        let text = encode(&s[0].as_entry(), 1, 1, 0, true).unwrap();
        assert_eq!(text[9] & FLAG_LZ4, FLAG_LZ4);
        assert!(text.len() < 8192 / 4);
        let noise = encode(&s[1].as_entry(), 1, 1, 0, true).unwrap();
        assert_eq!(noise[9] & FLAG_LZ4, 0);
        assert_eq!(noise.len(), HEADER_BYTES + 4096 + TRAILER_BYTES);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        for op in samples() {
            let frame = encode(&op.as_entry(), 9, 5, 6, true).unwrap();
            for i in 0..frame.len() {
                for bit in [0u8, 3, 7] {
                    let mut f = frame.clone();
                    f[i] ^= 1 << bit;
                    assert!(
                        decode(&f, 9).is_err(),
                        "flip of bit {bit} at byte {i} of {op:?} went unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn another_segment_or_zeros_never_verify() {
        let frame = encode(&samples()[0].as_entry(), 9, 5, 6, true).unwrap();
        assert!(decode(&frame, 10).is_err());
        for seg in [0, 1, 9, u64::MAX] {
            assert!(decode(&[0u8; 64], seg).is_err());
        }
    }

    #[test]
    fn unaligned_and_empty_writes_are_refused() {
        let data = [1u8; 1000];
        assert!(validate(&Entry::Write {
            disk: 0,
            offset: 0,
            data: &data
        })
        .is_err());
        assert!(validate(&Entry::Write {
            disk: 0,
            offset: 100,
            data: &data[..512]
        })
        .is_err());
        assert!(validate(&Entry::Write {
            disk: 0,
            offset: 0,
            data: &[]
        })
        .is_err());
        assert!(validate(&Entry::Zero {
            disk: 0,
            offset: 512,
            len: 0,
            trim: false
        })
        .is_err());
        assert!(validate(&Entry::Zero {
            disk: 0,
            offset: 512,
            len: 100,
            trim: true
        })
        .is_err());
        assert!(validate(&Entry::Write {
            disk: 0,
            offset: u64::MAX - 511,
            data: &data[..512]
        })
        .is_err());
    }

    #[test]
    fn resealed_frames_with_bad_fields_are_refused_by_validation() {
        // Behind valid checks, an unaligned write, a bad marker and unknown bits still fail.
        let mut frame = encode(&samples()[0].as_entry(), 4, 1, 0, false).unwrap();
        frame[32] = 7; // offset 7: unaligned
        reseal(&mut frame, 4).unwrap();
        assert!(matches!(
            decode(&frame, 4),
            Err(DecodeError {
                kind: DecodeErrorKind::Invalid(_),
                ..
            })
        ));
        let mut frame = encode(&samples()[5].as_entry(), 4, 1, 0, false).unwrap();
        frame[HEADER_BYTES] = 9; // unknown consistency
        reseal(&mut frame, 4).unwrap();
        assert!(matches!(
            decode(&frame, 4),
            Err(DecodeError {
                kind: DecodeErrorKind::Invalid(_),
                ..
            })
        ));
        let mut frame = encode(&samples()[2].as_entry(), 4, 1, 0, false).unwrap();
        frame[9] |= FLAG_LZ4; // zero ranges are never compressed
        reseal(&mut frame, 4).unwrap();
        assert!(decode(&frame, 4).is_err());
        let mut frame = encode(&samples()[1].as_entry(), 4, 1, 0, false).unwrap();
        let n = reseal(&mut frame, 4).unwrap();
        assert_eq!(decode(&frame, 4).unwrap().1, n);
    }

    fn point(name: &str) -> Marker {
        Marker {
            consistency: Consistency::Crash,
            name: Some(name.into()),
            group: None,
            kind: MarkerKind::Point,
        }
    }

    /// A frame whose marker body is exactly what the first record format wrote for a
    /// crash-consistent marker named `name` (no kind byte), sealed for `segment`.
    fn first_format_marker(name: &str, segment: u64) -> Vec<u8> {
        let mut body = vec![1u8, 1];
        body.extend_from_slice(&(name.len() as u16).to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(name.as_bytes());
        let placeholder = "x".repeat(name.len());
        let mut frame = encode(&Entry::Marker(&point(&placeholder)), segment, 3, 0, false).unwrap();
        frame[HEADER_BYTES..HEADER_BYTES + body.len()].copy_from_slice(&body);
        reseal(&mut frame, segment).unwrap();
        frame
    }

    #[test]
    fn a_point_marker_is_byte_for_byte_the_first_format() {
        let frame = encode(&Entry::Marker(&point("nightly")), 4, 3, 0, false).unwrap();
        assert_eq!(frame, first_format_marker("nightly", 4));
    }

    #[test]
    fn the_agent_s_markers_are_typed_and_first_format_names_read_as_their_kinds() {
        for (name, kind) in [
            ("standby:resync-begin", MarkerKind::ResyncBegin),
            ("standby:resync-end", MarkerKind::ResyncEnd),
        ] {
            // Written by an older agent: told by its name.
            let (rec, _) = decode(&first_format_marker(name, 4), 4).unwrap();
            let Op::Marker(m) = rec.op else {
                panic!("not a marker: {rec:?}")
            };
            assert_eq!((m.kind, m.name), (kind, None));
            // Written now: typed, with a kind byte; the name plays no part.
            let typed = Marker {
                consistency: Consistency::Crash,
                name: None,
                group: None,
                kind,
            };
            let frame = encode(&Entry::Marker(&typed), 4, 3, 0, false).unwrap();
            assert_eq!(frame[HEADER_BYTES + 1], 4, "present: the kind bit alone");
            assert_eq!(decode(&frame, 4).unwrap().0.op, Op::Marker(typed));
        }
        // Any other name in the reserved namespace from an older log is a plain point.
        let (rec, _) = decode(&first_format_marker("standby:other", 4), 4).unwrap();
        assert_eq!(rec.op, Op::Marker(point("standby:other")));
    }

    #[test]
    fn a_user_point_cannot_take_a_reserved_name() {
        for name in ["standby:resync-begin", "standby:resync-end", "standby:x"] {
            let err = validate(&Entry::Marker(&point(name))).unwrap_err();
            assert!(err.contains("reserved"), "{err}");
            assert!(encode(&Entry::Marker(&point(name)), 1, 1, 0, false).is_err());
            assert!(check_point_name(name).is_err());
        }
        assert!(check_point_name("standby-nightly").is_ok());
        assert!(check_point_name(&"n".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn unknown_marker_kinds_and_presence_bits_are_refused() {
        let typed = Marker {
            consistency: Consistency::Crash,
            name: Some("n".into()),
            group: None,
            kind: MarkerKind::ResyncEnd,
        };
        for (at, value) in [(6, 0u8), (6, 3), (6, 0xff), (1, 1 | 4 | 8)] {
            let mut frame = encode(&Entry::Marker(&typed), 4, 1, 0, false).unwrap();
            frame[HEADER_BYTES + at] = value;
            reseal(&mut frame, 4).unwrap();
            assert!(
                matches!(
                    decode(&frame, 4),
                    Err(DecodeError {
                        kind: DecodeErrorKind::Invalid(_),
                        ..
                    })
                ),
                "byte {at} = {value}"
            );
        }
        // Without the kind bit, the kind byte is read as the name's first byte: lengths
        // then disagree with the body.
        let mut frame = encode(&Entry::Marker(&typed), 4, 1, 0, false).unwrap();
        frame[HEADER_BYTES + 1] = 1;
        reseal(&mut frame, 4).unwrap();
        assert!(matches!(
            decode(&frame, 4),
            Err(DecodeError {
                kind: DecodeErrorKind::Invalid(_),
                ..
            })
        ));
    }

    #[test]
    fn a_refusal_names_the_field_and_its_offset_in_the_frame() {
        let frame = encode(&samples()[1].as_entry(), 2, 1, 0, false).unwrap();
        let crc_at = frame.len() - TRAILER_BYTES;
        let mut f = frame.clone();
        f[crc_at] ^= 1;
        let e = decode(&f, 2).unwrap_err();
        assert_eq!((e.field, e.offset), ("crc", crc_at));
        assert_eq!(
            e.to_string(),
            format!("record checksum mismatch (crc at byte {crc_at})")
        );
        let mut f = frame.clone();
        f[9] = 0x80;
        let e = FrameHeader::parse(&f, 2).unwrap_err();
        assert_eq!((e.field, e.offset), ("flags", 9));
        // Inside a marker's body, offsets still count from the frame's start.
        let mut f = encode(&samples()[5].as_entry(), 4, 1, 0, false).unwrap();
        f[HEADER_BYTES] = 9;
        reseal(&mut f, 4).unwrap();
        let e = decode(&f, 4).unwrap_err();
        assert_eq!((e.field, e.offset), ("consistency", HEADER_BYTES));
        let e = decode(&frame[..HEADER_BYTES + 10], 2).unwrap_err();
        assert_eq!((e.field, e.offset), ("body", HEADER_BYTES));
        let e = decode(&frame[..frame.len() - 1], 2).unwrap_err();
        assert_eq!((e.field, e.offset), ("crc", crc_at));
    }

    #[test]
    fn truncated_frames_say_so() {
        let frame = encode(&samples()[0].as_entry(), 2, 1, 0, false).unwrap();
        for cut in 0..frame.len() {
            match decode(&frame[..cut], 2) {
                Err(e) if e.is_truncated() => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn huge_declared_length_is_refused_before_allocation() {
        let mut frame = encode(&samples()[4].as_entry(), 2, 1, 0, false).unwrap();
        let huge = u32::MAX;
        frame[0..4].copy_from_slice(&huge.to_le_bytes());
        frame[4..8].copy_from_slice(&len_check(2, huge).to_le_bytes());
        assert!(matches!(
            FrameHeader::parse(&frame, 2),
            Err(DecodeError {
                kind: DecodeErrorKind::Invalid(_),
                ..
            })
        ));
    }
}
