//! The header of a replica data file (`data/{id:016x}.dat`). Data files are append-only
//! sequences of extent frames (see [`super::extent`]) after this header; space no retained
//! point reads any more is given back by punching holes, never by rewriting.
//!
//! Byte map (integers little-endian; see `docs/format-replica.md`):
//!
//! ```text
//! off  size  field
//!   0     8  magic          "STBYDAT\0"
//!   8     2  version        1
//!  10     2  header_bytes   40
//!  12     4  incompat       feature bits a reader must know, or refuse the file
//!  16     4  compat         feature bits a reader may ignore
//!  20     8  file_id        also the file name; every frame's crc is bound to it
//!  28     8  prev_end       length of the previous data file when this one was started
//!                            (0 for a replica's first file)
//!  36     4  crc32          seeded with HEADER_SEED over file_id ‖ bytes 0..36
//! ```
//!
//! Invariant: a data file's directory entry is synced before any frame is appended to it,
//! and a scan that crosses from one file into the next checks that the previous file still
//! ends at `prev_end`: a later file's frames never count when an earlier file lost some.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::util::codec::{part, seeded_crc, DecodeError, Features, Reader};

pub const MAGIC: [u8; 8] = *b"STBYDAT\0";
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 40;
/// Incompatible feature bits this build understands (none yet).
pub const KNOWN_INCOMPAT: u32 = 0;
const HEADER_SEED: u32 = 0x5354_4448; // "STDH"

/// A validated data-file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub file_id: u64,
    pub prev_end: u64,
    pub compat: u32,
}

impl DataHeader {
    pub fn new(file_id: u64, prev_end: u64) -> Self {
        DataHeader {
            file_id,
            prev_end,
            compat: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
        b[12..16].copy_from_slice(&KNOWN_INCOMPAT.to_le_bytes());
        b[16..20].copy_from_slice(&self.compat.to_le_bytes());
        b[20..28].copy_from_slice(&self.file_id.to_le_bytes());
        b[28..36].copy_from_slice(&self.prev_end.to_le_bytes());
        let crc = seeded_crc(HEADER_SEED, self.file_id, &[&b[0..36]]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Decode and validate a data-file header from the start of `b`.
pub fn decode_data_header(b: &[u8]) -> Result<DataHeader, DecodeError> {
    let mut c = Reader::new(b);
    c.magic(&MAGIC, "not a Standby replica data file (bad magic)")?;
    let version = c.u16("version")?;
    let header_bytes = c.u16("header_bytes")? as usize;
    let incompat = c.u32("incompat")?;
    let compat = c.u32("compat")?;
    let file_id = c.u64("file_id")?;
    let prev_end = c.u64("prev_end")?;
    let crc = c.u32("crc")?;
    if seeded_crc(HEADER_SEED, file_id, &[part(b, 0..36, "header")?]) != crc {
        return Err(c.invalid("data file header checksum mismatch"));
    }
    Features {
        version,
        version_at: 8,
        incompat,
        incompat_at: 12,
    }
    .check("data file", VERSION, KNOWN_INCOMPAT)?;
    if header_bytes != HEADER_BYTES {
        return Err(DecodeError::invalid(
            "header_bytes",
            10,
            "data file header has a bad length",
        ));
    }
    Ok(DataHeader {
        file_id,
        prev_end,
        compat,
    })
}

/// File name of a data file.
pub fn file_name(file_id: u64) -> String {
    format!("{file_id:016x}.dat")
}

/// Data file id from a file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".dat")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reseal(b: &mut [u8; HEADER_BYTES]) {
        let id = u64::from_le_bytes(b[20..28].try_into().unwrap());
        let crc = seeded_crc(HEADER_SEED, id, &[&b[0..36]]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trips_and_every_flipped_bit_is_caught() {
        let h = DataHeader::new(0x1234, 4096);
        let b = h.encode();
        assert_eq!(decode_data_header(&b), Ok(h));
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut d = b;
                d[i] ^= 1 << bit;
                assert!(decode_data_header(&d).is_err(), "byte {i} bit {bit}");
            }
        }
        for cut in 0..b.len() {
            assert!(decode_data_header(&b[..cut]).unwrap_err().is_truncated());
        }
        assert!(decode_data_header(&[0u8; HEADER_BYTES]).is_err());
    }

    #[test]
    fn unknown_incompat_refused_unknown_compat_ignored() {
        let mut b = DataHeader::new(9, 0).encode();
        b[19] = 0x80;
        reseal(&mut b);
        assert!(decode_data_header(&b).is_ok());
        b[12] = 1;
        reseal(&mut b);
        assert!(decode_data_header(&b).unwrap_err().is_unsupported());
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_file_name(&file_name(77)), Some(77));
        assert_eq!(parse_file_name("manifest"), None);
    }
}
