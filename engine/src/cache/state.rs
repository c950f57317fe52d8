//! The log's small state files: the checkpoint (how far the processor has everything)
//! and the source hold (how far the source images are durable). Both are
//! [`crate::util::statefile`] frames around one sequence number, replaced atomically through
//! the log's Vfs.
//!
//! Byte map of each (28 bytes; the frame is described in `util::statefile`):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic: `STBYCKPT` (`checkpoint`), `STBYSSEQ` (`source.seq`) |
//! | 8 | 4 | format version u32 LE (= 1) |
//! | 12 | 4 | body length u32 LE (= 8) |
//! | 16 | 8 | seq u64 LE |
//! | 24 | 4 | crc32 of bytes 0..24, u32 LE |
//!
//! Version 0 is what earlier builds wrote, still read (and replaced by version 1 at the
//! next write): `checkpoint` as magic `STBYCKP\0`, seq u64, a reserved u32 and a crc32 of
//! the first 20 bytes (24 bytes); `source.seq` as seq u64 and a crc32 of it (12 bytes).

// A decoder of untrusted bytes: no unwrap, expect, panic or unchecked indexing.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, Result};
use crate::util::statefile::{self, Kind};
use crate::vfs::Vfs;
use std::path::Path;

pub(super) const CHECKPOINT_FILE: &str = "checkpoint";
/// How far the source images are durable (written by the agent through the log's API).
pub const SOURCE_SEQ_FILE: &str = "source.seq";

const CHECKPOINT: Kind = Kind {
    magic: *b"STBYCKPT",
    version: 1,
    max_body_bytes: 8,
    what: "change-log checkpoint",
};
const SOURCE_SEQ: Kind = Kind {
    magic: *b"STBYSSEQ",
    version: 1,
    max_body_bytes: 8,
    what: "source sequence",
};
const CHECKPOINT_V0_MAGIC: [u8; 8] = *b"STBYCKP\0";
/// Longest file either reader looks at (a larger one is corruption, not read whole).
const MAX_FILE_BYTES: usize = 64;

type Decoded = std::result::Result<(u32, u64), (u64, String)>;

fn seq_body(kind: &Kind, v: statefile::Verified<'_>) -> Decoded {
    match <[u8; 8]>::try_from(v.body) {
        Ok(b) => Ok((v.version, u64::from_le_bytes(b))),
        Err(_) => Err((12, format!("{} body is not 8 bytes", kind.what))),
    }
}

fn crc_at(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

/// The checkpoint file's bytes (either version) → (version, seq).
pub(super) fn decode_checkpoint(b: &[u8]) -> Decoded {
    if statefile::has_magic(&CHECKPOINT, b) {
        return statefile::decode(&CHECKPOINT, b).and_then(|v| seq_body(&CHECKPOINT, v));
    }
    if b.len() != 24 || b.get(..8) != Some(&CHECKPOINT_V0_MAGIC[..]) {
        return Err((0, "not a change-log checkpoint file".into()));
    }
    let covered = b.get(..20).unwrap_or_default();
    if crc_at(b, 20) != Some(crc32fast::hash(covered)) {
        return Err((20, "checkpoint checksum mismatch".into()));
    }
    u64_at(b, 8)
        .map(|seq| (0, seq))
        .ok_or((8, "checkpoint too short".into()))
}

/// The source hold's bytes (either version) → (version, seq).
pub(super) fn decode_source_seq(b: &[u8]) -> Decoded {
    if statefile::has_magic(&SOURCE_SEQ, b) {
        return statefile::decode(&SOURCE_SEQ, b).and_then(|v| seq_body(&SOURCE_SEQ, v));
    }
    let seq = u64_at(b, 0);
    match (b.len(), seq) {
        (12, Some(seq)) if crc_at(b, 8) == Some(crc32fast::hash(&seq.to_le_bytes())) => {
            Ok((0, seq))
        }
        _ => Err((0, "source sequence file is damaged".into())),
    }
}

pub(super) fn encode_checkpoint(seq: u64) -> Vec<u8> {
    statefile::encode(&CHECKPOINT, &seq.to_le_bytes())
}

pub(super) fn encode_source_seq(seq: u64) -> Vec<u8> {
    statefile::encode(&SOURCE_SEQ, &seq.to_le_bytes())
}

fn read(
    vfs: &dyn Vfs,
    dir: &Path,
    name: &str,
    decode: fn(&[u8]) -> Decoded,
) -> Result<Option<u64>> {
    let path = dir.join(name);
    match statefile::read_raw(vfs, &path, MAX_FILE_BYTES)? {
        None => Ok(None),
        Some(b) => decode(&b)
            .map(|(_, seq)| Some(seq))
            .map_err(|(at, what)| Error::corrupt(&path, at, what)),
    }
}

pub(super) fn write_checkpoint(vfs: &dyn Vfs, dir: &Path, seq: u64) -> Result<()> {
    crate::fsutil::replace_atomic(vfs, dir, CHECKPOINT_FILE, &encode_checkpoint(seq))
}

pub(super) fn read_checkpoint(vfs: &dyn Vfs, dir: &Path) -> Result<u64> {
    Ok(read(vfs, dir, CHECKPOINT_FILE, decode_checkpoint)?.unwrap_or(0))
}

pub(super) fn write_source_seq(vfs: &dyn Vfs, dir: &Path, seq: u64) -> Result<()> {
    crate::fsutil::replace_atomic(vfs, dir, SOURCE_SEQ_FILE, &encode_source_seq(seq))
}

pub(super) fn read_source_seq(vfs: &dyn Vfs, dir: &Path) -> Result<Option<u64>> {
    read(vfs, dir, SOURCE_SEQ_FILE, decode_source_seq)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn v0_checkpoint(seq: u64) -> Vec<u8> {
        let mut b = CHECKPOINT_V0_MAGIC.to_vec();
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn v0_source_seq(seq: u64) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        b
    }

    type Codec = (fn(u64) -> Vec<u8>, fn(u64) -> Vec<u8>, fn(&[u8]) -> Decoded);
    const CODECS: [Codec; 2] = [
        (encode_checkpoint, v0_checkpoint, decode_checkpoint),
        (encode_source_seq, v0_source_seq, decode_source_seq),
    ];

    #[test]
    fn both_versions_round_trip() {
        for (enc, enc_v0, dec) in CODECS {
            for seq in [0, 1, 77, u64::MAX] {
                assert_eq!(enc(seq).len(), 28);
                assert_eq!(dec(&enc(seq)).unwrap(), (1, seq));
                assert_eq!(dec(&enc_v0(seq)).unwrap(), (0, seq));
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused_in_either_version() {
        for (enc, enc_v0, dec) in CODECS {
            for b in [enc(0x1234_5678_9abc), enc_v0(0x1234_5678_9abc)] {
                for i in 0..b.len() {
                    for bit in 0..8 {
                        let mut c = b.clone();
                        c[i] ^= 1 << bit;
                        assert!(dec(&c).is_err(), "byte {i} bit {bit} of {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        for (enc, enc_v0, dec) in CODECS {
            for b in [enc(9), enc_v0(9)] {
                for n in 0..b.len() {
                    assert!(dec(&b[..n]).is_err(), "{n} of {} bytes", b.len());
                }
            }
        }
        assert!(decode_checkpoint(&[0u8; 28]).is_err());
        assert!(decode_source_seq(&[0u8; 28]).is_err());
    }

    #[test]
    fn one_kind_is_not_taken_for_the_other() {
        assert!(decode_checkpoint(&encode_source_seq(5)).is_err());
        assert!(decode_source_seq(&encode_checkpoint(5)).is_err());
    }

    #[test]
    fn an_old_file_is_read_and_the_next_write_replaces_it() {
        let fs = crate::vfs::SimFs::new();
        let dir = Path::new("/log");
        fs.create_dir_all(dir).unwrap();
        crate::fsutil::replace_atomic(&fs, dir, CHECKPOINT_FILE, &v0_checkpoint(40)).unwrap();
        crate::fsutil::replace_atomic(&fs, dir, SOURCE_SEQ_FILE, &v0_source_seq(50)).unwrap();
        assert_eq!(read_checkpoint(&fs, dir).unwrap(), 40);
        assert_eq!(read_source_seq(&fs, dir).unwrap(), Some(50));
        write_checkpoint(&fs, dir, 41).unwrap();
        write_source_seq(&fs, dir, 51).unwrap();
        let raw = |n: &str| statefile::read_raw(&fs, &dir.join(n), 64).unwrap().unwrap();
        assert_eq!(decode_checkpoint(&raw(CHECKPOINT_FILE)).unwrap(), (1, 41));
        assert_eq!(decode_source_seq(&raw(SOURCE_SEQ_FILE)).unwrap(), (1, 51));
        // Survives a power cut: both were replaced durably.
        let after = fs.crash(0);
        assert_eq!(read_checkpoint(&after, dir).unwrap(), 41);
        assert_eq!(read_source_seq(&after, dir).unwrap(), Some(51));
    }

    #[test]
    fn damage_is_reported_with_the_file() {
        let fs = crate::vfs::SimFs::new();
        let dir = Path::new("/log");
        fs.create_dir_all(dir).unwrap();
        let mut b = encode_checkpoint(3);
        b[17] ^= 1;
        crate::fsutil::replace_atomic(&fs, dir, CHECKPOINT_FILE, &b).unwrap();
        let e = read_checkpoint(&fs, dir).unwrap_err();
        assert!(
            e.is_corruption() && e.to_string().contains("checkpoint"),
            "{e}"
        );
        crate::fsutil::replace_atomic(&fs, dir, SOURCE_SEQ_FILE, &[1u8; 100]).unwrap();
        assert!(read_source_seq(&fs, dir).unwrap_err().is_corruption());
    }
}
