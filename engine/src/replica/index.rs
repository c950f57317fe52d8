//! Layer index files (`layers/{id:016x}.idx`): the immutable list of extents one sealed
//! layer holds, in sequence order. A recovery point reads layers L0..=Lk overlaid in order.
//!
//! Byte map (integers little-endian; see `docs/format-replica.md`):
//!
//! ```text
//! header
//! off  size  field
//!   0     8  magic          "STBYIDX\0"
//!   8     2  version        1
//!  10     2  header_bytes   64
//!  12     4  incompat       feature bits a reader must know, or refuse the file
//!  16     4  compat         feature bits a reader may ignore
//!  20     4  entry_bytes    64
//!  24     8  layer_id       also the file name; both crcs are bound to it
//!  32     8  base_seq       the layer holds changes with base_seq < seq <= end_seq
//!  40     8  end_seq        the sequence number of the point this layer ends at
//!  48     8  exact_from     every seq in [exact_from, end_seq] can be rebuilt exactly
//!  56     4  entry_count
//!  60     4  header_crc     crc32 seeded with HEADER_SEED over layer_id ‖ bytes 0..60
//! entry (entry_count times, in seq order)
//!   0     2  disk
//!   2     1  kind           1 data, 2 zero
//!   3     1  flags          bit 0 trim (zero only)
//!   4     4  skip           bytes into the frame's extent where this piece starts
//!   8     8  offset         byte offset on the disk
//!  16     8  len            bytes
//!  24     8  seq            sequence number of the write it came from
//!  32     8  time_us
//!  40     8  file_id        data file of the frame (0 for zero entries)
//!  48     8  frame_offset   byte offset of the frame in that file (0 for zero entries)
//!  56     4  frame_len      bytes of the whole frame (0 for zero entries)
//!  60     4  reserved       0
//! trailer
//!   0     4  crc32          seeded with CRC_SEED over layer_id ‖ header ‖ entries
//! ```
//!
//! Invariant: entries are in non-decreasing seq order within (base_seq, end_seq]; entries
//! with the same seq never overlap; entries with seq <= exact_from never overlap each other
//! (they are the coalesced state at exact_from).

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::extent::{FRAME_OVERHEAD_BYTES, MAX_EXTENT_BYTES};
use crate::util::codec::{part, seeded_crc, DecodeError, Features, Reader};

pub const MAGIC: [u8; 8] = *b"STBYIDX\0";
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 64;
pub const ENTRY_BYTES: usize = 64;
pub const TRAILER_BYTES: usize = 4;
pub const KNOWN_INCOMPAT: u32 = 0;
const HEADER_SEED: u32 = 0x5354_4948; // "STIH"
const CRC_SEED: u32 = 0x5354_4943; // "STIC"

/// Where a piece's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loc {
    /// Bytes `skip..skip+len` of the extent held by the frame at `(file_id, frame_offset)`.
    Data {
        file_id: u64,
        frame_offset: u64,
        frame_len: u32,
        skip: u32,
    },
    /// The range reads as zeros.
    Zero { trim: bool },
}

/// One extent (or part of one) of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
    pub seq: u64,
    pub time_us: u64,
    pub loc: Loc,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A decoded layer index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerIndex {
    pub layer_id: u64,
    pub base_seq: u64,
    pub end_seq: u64,
    pub exact_from: u64,
    pub compat: u32,
    pub entries: Vec<Entry>,
}

impl LayerIndex {
    /// Bytes of the encoded file.
    pub fn encoded_bytes(&self) -> usize {
        HEADER_BYTES + self.entries.len() * ENTRY_BYTES + TRAILER_BYTES
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_bytes());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
        out.extend_from_slice(&KNOWN_INCOMPAT.to_le_bytes());
        out.extend_from_slice(&self.compat.to_le_bytes());
        out.extend_from_slice(&(ENTRY_BYTES as u32).to_le_bytes());
        for v in [self.layer_id, self.base_seq, self.end_seq, self.exact_from] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        debug_assert_eq!(out.len(), 60);
        let hcrc = seeded_crc(HEADER_SEED, self.layer_id, &[&out]);
        out.extend_from_slice(&hcrc.to_le_bytes());
        for e in &self.entries {
            let (kind, flags, skip, file_id, frame_offset, frame_len) = match e.loc {
                Loc::Data {
                    file_id,
                    frame_offset,
                    frame_len,
                    skip,
                } => (1u8, 0u8, skip, file_id, frame_offset, frame_len),
                Loc::Zero { trim } => (2, trim as u8, 0, 0, 0, 0),
            };
            out.extend_from_slice(&e.disk.to_le_bytes());
            out.push(kind);
            out.push(flags);
            out.extend_from_slice(&skip.to_le_bytes());
            for v in [e.offset, e.len, e.seq, e.time_us, file_id, frame_offset] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&frame_len.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        let crc = seeded_crc(CRC_SEED, self.layer_id, &[&out]);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// File name of a layer index.
pub fn file_name(layer_id: u64) -> String {
    format!("{layer_id:016x}.idx")
}

/// Layer id from a file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".idx")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Decode and validate a whole layer index file.
pub fn decode_layer_index(b: &[u8]) -> Result<LayerIndex, DecodeError> {
    decode_layer_index_located(b).map_err(|(_, e)| e)
}

/// Decode and validate a whole layer index file; a failure comes with the byte offset in
/// the file of the part that failed: 0 for the header, the entry's offset for a bad entry,
/// [`HEADER_BYTES`] when the checksum over the entries fails (the header's own checksum
/// held, so the damage is in the entries or the trailer).
pub fn decode_layer_index_located(b: &[u8]) -> Result<LayerIndex, (u64, DecodeError)> {
    let at = |off: usize| move |e: DecodeError| (off as u64, e);
    let mut c = Reader::new(b);
    let h = (|| {
        c.magic(&MAGIC, "not a Standby layer index (bad magic)")?;
        let version = c.u16("version")?;
        let header_bytes = c.u16("header_bytes")? as usize;
        let incompat = c.u32("incompat")?;
        let compat = c.u32("compat")?;
        let entry_bytes = c.u32("entry_bytes")? as usize;
        let layer_id = c.u64("layer_id")?;
        let base_seq = c.u64("base_seq")?;
        let end_seq = c.u64("end_seq")?;
        let exact_from = c.u64("exact_from")?;
        let count = c.u32("count")? as usize;
        let hcrc = c.u32("hcrc")?;
        if seeded_crc(HEADER_SEED, layer_id, &[part(b, 0..60, "header")?]) != hcrc {
            return Err(c.invalid("layer index header checksum mismatch"));
        }
        Features {
            version,
            version_at: 8,
            incompat,
            incompat_at: 12,
        }
        .check("layer index", VERSION, KNOWN_INCOMPAT)?;
        if header_bytes != HEADER_BYTES || entry_bytes != ENTRY_BYTES {
            return Err(DecodeError::invalid(
                "header_bytes",
                10,
                "layer index header or entry size is wrong",
            ));
        }
        if base_seq > end_seq || exact_from < base_seq || exact_from > end_seq {
            return Err(DecodeError::invalid(
                "base_seq",
                28,
                "layer index sequence range is inconsistent",
            ));
        }
        Ok((layer_id, base_seq, end_seq, exact_from, compat, count))
    })();
    let (layer_id, base_seq, end_seq, exact_from, compat, count) = h.map_err(at(0))?;
    // The count was verified by the header crc; still bound it by the bytes present
    // before allocating.
    let need = HEADER_BYTES as u64 + count as u64 * ENTRY_BYTES as u64 + TRAILER_BYTES as u64;
    if (b.len() as u64) < need {
        return Err((
            b.len() as u64,
            DecodeError::truncated("entries", HEADER_BYTES, need as usize, b.len()),
        ));
    }
    if b.len() as u64 != need {
        return Err((
            need,
            DecodeError::invalid("end", need as usize, "layer index has trailing bytes"),
        ));
    }
    let body_end = need as usize - TRAILER_BYTES;
    let (body, trailer) = b.split_at_checked(body_end).unwrap_or((b, &[]));
    let mut t = Reader::new(trailer);
    if seeded_crc(CRC_SEED, layer_id, &[body])
        != t.u32("crc")
            .map_err(|e| (body_end as u64, e.shifted(body_end)))?
    {
        return Err((
            HEADER_BYTES as u64,
            DecodeError::invalid(
                "crc",
                body_end,
                format!(
                    "layer index checksum mismatch (entries at bytes {HEADER_BYTES}..{body_end} \
                     or the trailer)"
                ),
            ),
        ));
    }
    let mut entries = Vec::with_capacity(count);
    let mut last_seq = base_seq;
    for i in 0..count {
        let off = HEADER_BYTES + i * ENTRY_BYTES;
        let e =
            decode_entry(&mut c).map_err(|e| (off as u64, e.context(format_args!("entry {i}"))))?;
        if e.seq <= base_seq || e.seq > end_seq || e.seq < last_seq {
            return Err((
                off as u64,
                DecodeError::invalid(
                    "seq",
                    off + 24,
                    format!("entry {i}: sequence number out of order"),
                ),
            ));
        }
        last_seq = e.seq;
        entries.push(e);
    }
    Ok(LayerIndex {
        layer_id,
        base_seq,
        end_seq,
        exact_from,
        compat,
        entries,
    })
}

fn decode_entry(c: &mut Reader<'_>) -> Result<Entry, DecodeError> {
    let at = c.position();
    let disk = c.u16("disk")?;
    let kind = c.u8("kind")?;
    let flags = c.u8("flags")?;
    let skip = c.u32("skip")?;
    let offset = c.u64("offset")?;
    let len = c.u64("len")?;
    let seq = c.u64("seq")?;
    let time_us = c.u64("time_us")?;
    let file_id = c.u64("file_id")?;
    let frame_offset = c.u64("frame_offset")?;
    let frame_len = c.u32("frame_len")?;
    let _reserved = c.u32("reserved")?;
    if len == 0 || offset.checked_add(len).is_none() {
        return Err(DecodeError::invalid(
            "len",
            at + 16,
            "empty or overflowing range",
        ));
    }
    let loc = match kind {
        1 => {
            if flags != 0
                || (frame_len as usize) < FRAME_OVERHEAD_BYTES
                || frame_len as usize > FRAME_OVERHEAD_BYTES + MAX_EXTENT_BYTES
                || skip as u64 + len > MAX_EXTENT_BYTES as u64
            {
                return Err(DecodeError::invalid(
                    "frame_len",
                    at + 56,
                    "bad data location",
                ));
            }
            Loc::Data {
                file_id,
                frame_offset,
                frame_len,
                skip,
            }
        }
        2 => {
            if flags & !1 != 0 || skip != 0 || file_id != 0 || frame_offset != 0 || frame_len != 0 {
                return Err(DecodeError::invalid(
                    "flags",
                    at + 3,
                    "zero entry with a location",
                ));
            }
            Loc::Zero {
                trim: flags & 1 != 0,
            }
        }
        k => {
            return Err(DecodeError::invalid(
                "kind",
                at + 2,
                format!("unknown entry kind {k}"),
            ))
        }
    };
    Ok(Entry {
        disk,
        offset,
        len,
        seq,
        time_us,
        loc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerIndex {
        LayerIndex {
            layer_id: 42,
            base_seq: 10,
            end_seq: 20,
            exact_from: 10,
            compat: 0,
            entries: vec![
                Entry {
                    disk: 0,
                    offset: 4096,
                    len: 4096,
                    seq: 11,
                    time_us: 100,
                    loc: Loc::Data {
                        file_id: 3,
                        frame_offset: 40,
                        frame_len: 4148,
                        skip: 0,
                    },
                },
                Entry {
                    disk: 1,
                    offset: 1 << 40,
                    len: 1 << 30,
                    seq: 12,
                    time_us: 101,
                    loc: Loc::Zero { trim: true },
                },
                Entry {
                    disk: 0,
                    offset: 512,
                    len: 512,
                    seq: 20,
                    time_us: 102,
                    loc: Loc::Data {
                        file_id: 4,
                        frame_offset: 9000,
                        frame_len: 2000,
                        skip: 1024,
                    },
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let l = sample();
        let b = l.encode();
        assert_eq!(b.len(), l.encoded_bytes());
        assert_eq!(decode_layer_index(&b).unwrap(), l);
        let empty = LayerIndex {
            entries: vec![],
            ..sample()
        };
        assert_eq!(decode_layer_index(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn every_flipped_bit_and_truncation_is_caught() {
        let b = sample().encode();
        for i in 0..b.len() {
            for bit in [0, 3, 7] {
                let mut d = b.clone();
                d[i] ^= 1 << bit;
                assert!(decode_layer_index(&d).is_err(), "byte {i} bit {bit}");
            }
        }
        for cut in 0..b.len() {
            assert!(decode_layer_index(&b[..cut]).is_err(), "cut {cut}");
        }
        assert!(decode_layer_index(&vec![0u8; b.len()]).is_err());
    }

    #[test]
    fn a_failure_says_which_part_of_the_file() {
        let b = sample().encode();
        let located = |i: usize| {
            let mut d = b.clone();
            d[i] ^= 0x10;
            decode_layer_index_located(&d).unwrap_err().0
        };
        assert_eq!(located(30), 0, "header");
        assert_eq!(located(HEADER_BYTES + ENTRY_BYTES + 9), HEADER_BYTES as u64);
        assert_eq!(located(b.len() - 1), HEADER_BYTES as u64, "trailer");
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(
            decode_layer_index_located(&longer).unwrap_err().0,
            b.len() as u64
        );
    }

    #[test]
    fn unknown_incompat_is_refused() {
        let mut b = sample().encode();
        b[12] = 4;
        let h = seeded_crc(HEADER_SEED, 42, &[&b[..60]]);
        b[60..64].copy_from_slice(&h.to_le_bytes());
        let n = b.len() - 4;
        let c = seeded_crc(CRC_SEED, 42, &[&b[..n]]);
        b[n..].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(
            decode_layer_index(&b),
            Err(e) if e.is_unsupported()
        ));
    }
}
