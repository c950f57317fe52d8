//! The processor's resync window (`resync.window`, in the replica's directory): the seq of
//! the last resync-begin marker applied and of its resync-end marker (0 while the window
//! is open). Between them the log is not a crash-consistent sequence, so no point is cut.
//! Replaced atomically through the replica's Vfs when either marker is applied.
//!
//! Byte map (36 bytes; the frame is described in `util::statefile`):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `STBYRSYN` |
//! | 8 | 4 | format version u32 LE (= 1) |
//! | 12 | 4 | body length u32 LE (= 16) |
//! | 16 | 8 | begin u64 LE |
//! | 24 | 8 | end u64 LE (0: open) |
//! | 32 | 4 | crc32 of bytes 0..32, u32 LE |
//!
//! Validation: `end` is 0 or after `begin`. Version 0, what earlier builds wrote, is ASCII
//! `BEGIN END\n` (two decimal u64s); it is still read, and replaced by version 1 at the
//! next write. Absent means `(0, 0)`: no window.

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

/// The file's name in the replica's directory.
pub(super) const RESYNC_FILE: &str = "resync.window";

const KIND: Kind = Kind {
    magic: *b"STBYRSYN",
    version: 1,
    max_body_bytes: 16,
    what: "resync window",
};
/// Two decimal u64s, a space and a newline fit in 48 bytes; more is not a window.
const MAX_FILE_BYTES: usize = 64;

/// `(begin, end)` by sequence number.
pub(super) type Window = (u64, u64);

type Decoded = std::result::Result<(u32, Window), (u64, String)>;

pub(super) fn encode(w: Window) -> Vec<u8> {
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&w.0.to_le_bytes());
    body[8..].copy_from_slice(&w.1.to_le_bytes());
    statefile::encode(&KIND, &body)
}

fn validate(version: u32, w: Window, at: u64) -> Decoded {
    if w.1 != 0 && w.1 <= w.0 {
        return Err((
            at,
            format!("resync window ends ({}) before it begins ({})", w.1, w.0),
        ));
    }
    Ok((version, w))
}

/// The file's bytes (either version) → (version, window).
pub(super) fn decode(b: &[u8]) -> Decoded {
    if statefile::has_magic(&KIND, b) {
        let v = statefile::decode(&KIND, b)?;
        let word = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(v.body.get(at..at + 8)?.try_into().ok()?))
        };
        return match (v.body.len(), word(0), word(8)) {
            (16, Some(begin), Some(end)) => validate(v.version, (begin, end), 16),
            _ => Err((12, "resync window body is not 16 bytes".into())),
        };
    }
    let text = match b.len() < MAX_FILE_BYTES {
        true => std::str::from_utf8(b).unwrap_or(""),
        false => "",
    };
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(begin)), Some(Ok(end)), None) => validate(0, (begin, end), 0),
        _ => Err((
            0,
            "expected two sequence numbers (the resync window)".into(),
        )),
    }
}

/// The window kept in `dir` (`(0, 0)` if none).
pub(super) fn read(vfs: &dyn Vfs, dir: &Path) -> Result<Window> {
    let path = dir.join(RESYNC_FILE);
    match statefile::read_raw(vfs, &path, MAX_FILE_BYTES)? {
        None => Ok((0, 0)),
        Some(b) => decode(&b)
            .map(|(_, w)| w)
            .map_err(|(at, what)| Error::corrupt(&path, at, what)),
    }
}

/// Replace the window kept in `dir`, durably.
pub(super) fn write(vfs: &dyn Vfs, dir: &Path, w: Window) -> Result<()> {
    crate::fsutil::replace_atomic(vfs, dir, RESYNC_FILE, &encode(w))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_the_old_text() {
        for w in [(0, 0), (5, 0), (5, 9), (1, u64::MAX)] {
            let b = encode(w);
            assert_eq!(b.len(), 36);
            assert_eq!(decode(&b).unwrap(), (1, w));
            let text = format!("{} {}\n", w.0, w.1);
            assert_eq!(decode(text.as_bytes()).unwrap(), (0, w));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let b = encode((0x0102_0304, 0x0a0b_0c0d));
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(decode(&c).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let b = encode((3, 8));
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "{n} bytes");
        }
        for bad in [&b""[..], b"5", b"5 9 1", b"5 x", &[b'1'; 70], b"9 5\n"] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_end_before_the_begin_is_refused_in_either_version() {
        let (at, what) = decode(&encode((9, 4))).unwrap_err();
        assert_eq!(at, 16);
        assert!(what.contains("before it begins"), "{what}");
    }

    #[test]
    fn an_old_file_is_read_then_replaced_through_the_vfs() {
        let fs = crate::vfs::SimFs::new();
        let dir = Path::new("/replica");
        fs.create_dir_all(dir).unwrap();
        assert_eq!(read(&fs, dir).unwrap(), (0, 0));
        crate::fsutil::replace_atomic(&fs, dir, RESYNC_FILE, b"7 0\n").unwrap();
        assert_eq!(read(&fs, dir).unwrap(), (7, 0));
        write(&fs, dir, (7, 12)).unwrap();
        let after = fs.crash(0);
        assert_eq!(read(&after, dir).unwrap(), (7, 12));
        let raw = statefile::read_raw(&after, &dir.join(RESYNC_FILE), 64)
            .unwrap()
            .unwrap();
        assert_eq!(decode(&raw).unwrap(), (1, (7, 12)));
    }
}
