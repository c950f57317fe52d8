//! Extent frames: one applied write (data) or zero/trim range, appended to a data file.
//!
//! Byte map of a frame (integers little-endian; see `docs/format-replica.md`):
//!
//! ```text
//! off  size  field
//!   0     4  body_len    bytes of body as stored; 0 for zero frames; <= MAX_EXTENT_BYTES
//!   4     4  len_check   crc32 seeded with LEN_SEED over file_id(8) ‖ body_len(4)
//!   8     1  kind        1 data, 2 zero
//!   9     1  flags       bit 0 LZ4 body (data only), bit 1 trim (zero only); others 0
//!  10     2  disk        disk index within the VM
//!  12     4  reserved    0
//!  16     8  offset      byte offset on the disk
//!  24     8  len         logical bytes (data: raw body length; zero: range length)
//!  32     8  seq         the change-log sequence number the extent came from
//!  40     8  time_us     the change-log record's time
//!  48     n  body        data, lz4 block-compressed when that is smaller
//! 48+n    4  crc         crc32 seeded with CRC_SEED over file_id(8) ‖ bytes 0..48+n
//! ```
//!
//! Both checks bind the data file's id, so a frame copied from, or left over in, another
//! file never verifies, and all-zero bytes (a punched hole) never verify. The length check
//! is verified before anything is allocated.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::record::MAX_WRITE_BYTES;
use crate::util::codec::{part, seeded_crc, DecodeError, Reader, Writer};

pub const FRAME_HEADER_BYTES: usize = 48;
pub const FRAME_TRAILER_BYTES: usize = 4;
/// Bytes a frame adds to its body.
pub const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + FRAME_TRAILER_BYTES;
/// Largest data extent (and stored body) a frame may carry.
pub const MAX_EXTENT_BYTES: usize = MAX_WRITE_BYTES;

const LEN_SEED: u32 = 0x5354_454c; // "STEL"
const CRC_SEED: u32 = 0x5354_4546; // "STEF"

pub const KIND_DATA: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const FLAG_LZ4: u8 = 1 << 0;
pub const FLAG_TRIM: u8 = 1 << 1;

/// The fixed part of a frame, parsed; its length check verified, the crc not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_len: u32,
    pub kind: u8,
    pub flags: u8,
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
    pub seq: u64,
    pub time_us: u64,
}

impl FrameHeader {
    /// Parse the first [`FRAME_HEADER_BYTES`] of a frame and validate its fields, so the
    /// caller may allocate `frame_bytes()`.
    pub fn parse(b: &[u8], file_id: u64) -> Result<FrameHeader, DecodeError> {
        if b.len() < FRAME_HEADER_BYTES {
            return Err(DecodeError::truncated(
                "header",
                0,
                FRAME_HEADER_BYTES,
                b.len(),
            ));
        }
        let mut c = Reader::new(b);
        let body_len = c.u32("body_len")?;
        if c.u32("len_check")? != len_check(file_id, body_len) {
            return Err(c.invalid("extent frame length check failed"));
        }
        let kind = c.u8("kind")?;
        let flags = c.u8("flags")?;
        let disk = c.u16("disk")?;
        let _reserved = c.u32("reserved")?;
        let h = FrameHeader {
            body_len,
            kind,
            flags,
            disk,
            offset: c.u64("offset")?,
            len: c.u64("len")?,
            seq: c.u64("seq")?,
            time_us: c.u64("time_us")?,
        };
        if body_len as usize > MAX_EXTENT_BYTES {
            return Err(DecodeError::invalid(
                "body_len",
                0,
                format!("extent body of {body_len} bytes exceeds the limit"),
            ));
        }
        if h.len == 0 || h.offset.checked_add(h.len).is_none() {
            return Err(DecodeError::invalid(
                "len",
                24,
                "extent frame with an empty or overflowing range",
            ));
        }
        match kind {
            KIND_DATA => {
                if flags & !FLAG_LZ4 != 0 {
                    return Err(DecodeError::invalid(
                        "flags",
                        9,
                        format!("unknown data frame flags {flags:#04x}"),
                    ));
                }
                if h.len as usize > MAX_EXTENT_BYTES {
                    return Err(DecodeError::invalid(
                        "len",
                        24,
                        "data extent longer than the limit",
                    ));
                }
                if flags & FLAG_LZ4 == 0 && h.len != body_len as u64 {
                    return Err(DecodeError::invalid(
                        "len",
                        24,
                        "raw data frame whose body is not its length",
                    ));
                }
                if body_len == 0 {
                    return Err(DecodeError::invalid(
                        "body_len",
                        0,
                        "data frame without a body",
                    ));
                }
            }
            KIND_ZERO => {
                if flags & !FLAG_TRIM != 0 || body_len != 0 {
                    return Err(DecodeError::invalid(
                        "flags",
                        9,
                        "zero frame with a body or unknown flags",
                    ));
                }
            }
            k => {
                return Err(DecodeError::invalid(
                    "kind",
                    8,
                    format!("unknown extent frame kind {k}"),
                ))
            }
        }
        Ok(h)
    }

    pub fn frame_bytes(&self) -> usize {
        FRAME_OVERHEAD_BYTES + self.body_len as usize
    }
}

fn len_check(file_id: u64, body_len: u32) -> u32 {
    seeded_crc(LEN_SEED, file_id, &[&body_len.to_le_bytes()])
}

/// What a frame describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
    pub seq: u64,
    pub time_us: u64,
    /// `Some(data)` for data frames (`data.len() == len`); `None` for zero ranges.
    pub data: Option<Vec<u8>>,
    pub trim: bool,
}

/// Encode a data frame; `compress` tries lz4 and keeps it only if smaller.
#[allow(clippy::too_many_arguments)]
pub fn encode_data(
    out: &mut Vec<u8>,
    file_id: u64,
    disk: u16,
    offset: u64,
    seq: u64,
    time_us: u64,
    data: &[u8],
    compress: bool,
) {
    let mut flags = 0;
    let compressed = if compress {
        let mut buf = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
        match lz4_flex::block::compress_into(data, &mut buf) {
            Ok(n) if n < data.len() => {
                buf.truncate(n);
                flags |= FLAG_LZ4;
                Some(buf)
            }
            _ => None,
        }
    } else {
        None
    };
    let body = compressed.as_deref().unwrap_or(data);
    encode_raw(
        out,
        file_id,
        KIND_DATA,
        flags,
        disk,
        offset,
        data.len() as u64,
        seq,
        time_us,
        body,
    );
}

/// Encode a zero (or trim) frame.
#[allow(clippy::too_many_arguments)]
pub fn encode_zero(
    out: &mut Vec<u8>,
    file_id: u64,
    disk: u16,
    offset: u64,
    len: u64,
    seq: u64,
    time_us: u64,
    trim: bool,
) {
    let flags = if trim { FLAG_TRIM } else { 0 };
    encode_raw(
        out,
        file_id,
        KIND_ZERO,
        flags,
        disk,
        offset,
        len,
        seq,
        time_us,
        &[],
    );
}

#[allow(clippy::too_many_arguments)]
fn encode_raw(
    out: &mut Vec<u8>,
    file_id: u64,
    kind: u8,
    flags: u8,
    disk: u16,
    offset: u64,
    len: u64,
    seq: u64,
    time_us: u64,
    body: &[u8],
) {
    let start = out.len();
    let body_len = body.len() as u32;
    Writer::new(out)
        .u32(body_len)
        .u32(len_check(file_id, body_len))
        .u8(kind)
        .u8(flags)
        .u16(disk)
        .u32(0)
        .u64(offset)
        .u64(len)
        .u64(seq)
        .u64(time_us)
        .bytes(body);
    let crc = seeded_crc(CRC_SEED, file_id, &[out.get(start..).unwrap_or_default()]);
    Writer::new(out).u32(crc);
}

/// Check a whole frame's crc (`frame` holds at least `h.frame_bytes()` bytes).
pub fn verify_frame(frame: &[u8], h: &FrameHeader, file_id: u64) -> Result<(), DecodeError> {
    let total = h.frame_bytes();
    if frame.len() < total {
        return Err(DecodeError::truncated(
            "body",
            FRAME_HEADER_BYTES,
            total,
            frame.len(),
        ));
    }
    let body_end = FRAME_HEADER_BYTES + h.body_len as usize;
    let mut c = Reader::new(part(frame, body_end..total, "crc")?);
    if seeded_crc(CRC_SEED, file_id, &[part(frame, 0..body_end, "body")?]) != c.u32("crc")? {
        return Err(DecodeError::invalid(
            "crc",
            body_end,
            "extent frame checksum mismatch",
        ));
    }
    Ok(())
}

/// Decode one whole frame from the start of `b`: parse, verify, decompress.
/// Returns the extent and the frame's length in bytes.
pub fn decode_extent(b: &[u8], file_id: u64) -> Result<(Extent, usize), DecodeError> {
    let h = FrameHeader::parse(b, file_id)?;
    verify_frame(b, &h, file_id)?;
    let body = part(
        b,
        FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + h.body_len as usize,
        "body",
    )?;
    let data = match h.kind {
        KIND_DATA => Some(decode_body(body, &h)?),
        _ => None,
    };
    Ok((
        Extent {
            disk: h.disk,
            offset: h.offset,
            len: h.len,
            seq: h.seq,
            time_us: h.time_us,
            data,
            trim: h.flags & FLAG_TRIM != 0,
        },
        h.frame_bytes(),
    ))
}

/// Decode a verified frame's body into `out`, which must be exactly the extent's length.
pub fn decode_body_to_slice(
    body: &[u8],
    h: &FrameHeader,
    out: &mut [u8],
) -> Result<(), DecodeError> {
    if out.len() as u64 != h.len {
        return Err(DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            "extent is not the length its reader expects",
        ));
    }
    if h.flags & FLAG_LZ4 == 0 {
        if body.len() != out.len() {
            return Err(DecodeError::invalid(
                "body",
                FRAME_HEADER_BYTES,
                "stored extent body is not the extent's length",
            ));
        }
        out.copy_from_slice(body);
        return Ok(());
    }
    let n = lz4_flex::block::decompress_into(body, out).map_err(|e| {
        DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            format!("lz4 extent body does not decompress: {e}"),
        )
    })?;
    if n != out.len() {
        return Err(DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            "lz4 extent body decompresses to the wrong length",
        ));
    }
    Ok(())
}

/// The logical data of a verified data frame's body.
/// [`decode_body`] into `out` (its old contents and capacity reused: no allocation and no
/// zero-fill when it is already large enough).
pub fn decode_body_into(
    body: &[u8],
    h: &FrameHeader,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    if h.flags & FLAG_LZ4 == 0 {
        out.clear();
        out.extend_from_slice(body);
        return Ok(());
    }
    let len = h.len as usize;
    if out.len() < len {
        out.resize(len, 0);
    } else {
        // Stale bytes are fine: the whole length must decompress, or it is an error.
        out.truncate(len);
    }
    let n = lz4_flex::block::decompress_into(body, out).map_err(|e| {
        DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            format!("lz4 extent body does not decompress: {e}"),
        )
    })?;
    if n != len {
        return Err(DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            "lz4 extent body decompresses to the wrong length",
        ));
    }
    Ok(())
}

pub fn decode_body(body: &[u8], h: &FrameHeader) -> Result<Vec<u8>, DecodeError> {
    if h.flags & FLAG_LZ4 == 0 {
        return Ok(body.to_vec());
    }
    let mut out = vec![0u8; h.len as usize];
    let n = lz4_flex::block::decompress_into(body, &mut out).map_err(|e| {
        DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            format!("lz4 extent body does not decompress: {e}"),
        )
    })?;
    if n != out.len() {
        return Err(DecodeError::invalid(
            "body",
            FRAME_HEADER_BYTES,
            "lz4 extent body decompresses to the wrong length",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        let mut out = Vec::new();
        encode_data(&mut out, 5, 1, 4096, 10, 20, &noise(4096, 7), true);
        v.push(std::mem::take(&mut out));
        encode_data(&mut out, 5, 0, 0, 11, 21, &[0xab; 8192], true);
        v.push(std::mem::take(&mut out));
        encode_data(&mut out, 5, 0, 0, 11, 21, &[0xab; 512], false);
        v.push(std::mem::take(&mut out));
        encode_zero(&mut out, 5, 2, 1 << 40, 1 << 30, 12, 22, true);
        v.push(std::mem::take(&mut out));
        encode_zero(&mut out, 5, 2, 512, 512, 13, 23, false);
        v.push(out);
        v
    }

    #[test]
    fn round_trip() {
        let (e, n) = decode_extent(&samples()[0], 5).unwrap();
        assert_eq!(n, samples()[0].len());
        assert_eq!(
            (e.disk, e.offset, e.len, e.seq, e.time_us),
            (1, 4096, 4096, 10, 20)
        );
        assert_eq!(e.data.unwrap(), noise(4096, 7));
        let (e, _) = decode_extent(&samples()[1], 5).unwrap();
        assert_eq!(e.data.unwrap(), vec![0xab; 8192]);
        assert!(samples()[1].len() < 1024, "compressible data is compressed");
        let (e, _) = decode_extent(&samples()[3], 5).unwrap();
        assert_eq!((e.len, e.trim, e.data), (1 << 30, true, None));
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        for frame in samples() {
            for i in 0..frame.len() {
                for bit in [0, 4, 7] {
                    let mut f = frame.clone();
                    f[i] ^= 1 << bit;
                    assert!(decode_extent(&f, 5).is_err(), "byte {i} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn other_file_zeros_and_truncation_never_verify() {
        let f = &samples()[0];
        assert!(decode_extent(f, 6).is_err());
        assert!(decode_extent(&[0u8; 200], 0).is_err());
        assert!(decode_extent(&[0u8; 200], 5).is_err());
        for cut in 0..f.len() {
            assert!(decode_extent(&f[..cut], 5).unwrap_err().is_truncated());
        }
    }

    #[test]
    fn huge_length_refused_before_allocation() {
        let mut f = samples()[4].clone();
        let huge = u32::MAX;
        f[0..4].copy_from_slice(&huge.to_le_bytes());
        f[4..8].copy_from_slice(&len_check(5, huge).to_le_bytes());
        assert!(matches!(
            FrameHeader::parse(&f, 5),
            Err(DecodeError {
                kind: crate::util::codec::DecodeErrorKind::Invalid(_),
                ..
            })
        ));
    }
}
