//! Small state files: the frame every little durable file of Standby shares (the change
//! log's `checkpoint` and `source.seq`, the processor's `resync.window`), so each of them
//! costs a magic, a version and a body, not a new dialect. Written through the Vfs with an
//! atomic replace, so crash tests see them.
//!
//! Byte map (20 + n bytes):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic, one per kind of file |
//! | 8 | 4 | format version u32 LE (1 and up; 0 names the unframed format before it) |
//! | 12 | 4 | body length n u32 LE (checked against the kind's limit before anything else) |
//! | 16 | n | body (the kind's own fields) |
//! | 16 + n | 4 | crc32 of bytes 0 .. 16 + n, u32 LE |
//!
//! The magic makes all-zero bytes (and a file of another kind) fail before the crc is even
//! looked at. A version newer than the reader's is refused with a readable message; a file
//! that fails any check is corruption, never taken for a value.

// A decoder of untrusted bytes: no unwrap, expect, panic or unchecked indexing.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, IoContext, Result};
use crate::vfs::Vfs;
use std::path::Path;

/// Bytes of the frame around a body.
pub const FRAME_BYTES: usize = 20;
const HEADER_BYTES: usize = 16;

/// One kind of state file.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub magic: [u8; 8],
    /// The version this build writes (and the newest it reads).
    pub version: u32,
    /// Longest body this kind has; a longer length field is corruption.
    pub max_body_bytes: u32,
    /// What the file is, for messages ("change-log checkpoint").
    pub what: &'static str,
}

/// A frame that passed every check: its version and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified<'a> {
    pub version: u32,
    pub body: &'a [u8],
}

/// Frame `body` as a `kind` file of the current version.
pub fn encode(kind: &Kind, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(FRAME_BYTES + body.len());
    b.extend_from_slice(&kind.magic);
    b.extend_from_slice(&kind.version.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Whether `b` starts with the kind's magic (else it may be the unframed version 0).
pub fn has_magic(kind: &Kind, b: &[u8]) -> bool {
    b.get(..8) == Some(&kind.magic[..])
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

/// Check a whole file's bytes as a `kind` frame; the error names the offset and what failed.
pub fn decode<'a>(kind: &Kind, b: &'a [u8]) -> std::result::Result<Verified<'a>, (u64, String)> {
    let what = kind.what;
    if b.len() < FRAME_BYTES {
        return Err((
            0,
            format!(
                "{what} file is {} bytes, shorter than its {FRAME_BYTES}-byte frame",
                b.len()
            ),
        ));
    }
    if !has_magic(kind, b) {
        return Err((0, format!("not a {what} file (bad magic)")));
    }
    let version = u32_at(b, 8).unwrap_or(0);
    let len = u32_at(b, 12).unwrap_or(0);
    if len > kind.max_body_bytes {
        return Err((
            12,
            format!(
                "{what} body length {len} is beyond its limit of {} bytes",
                kind.max_body_bytes
            ),
        ));
    }
    let end = HEADER_BYTES + len as usize;
    if b.len() != end + 4 {
        return Err((
            12,
            format!(
                "{what} file is {} bytes, its frame says {}",
                b.len(),
                end + 4
            ),
        ));
    }
    let stored = u32_at(b, end).unwrap_or(0);
    let covered = b.get(..end).unwrap_or_default();
    if crc32fast::hash(covered) != stored {
        return Err((end as u64, format!("{what} checksum mismatch")));
    }
    if version == 0 || version > kind.version {
        return Err((
            8,
            format!(
                "{what} format version {version} is not one this Standby reads (1 to {})",
                kind.version
            ),
        ));
    }
    Ok(Verified {
        version,
        body: b.get(HEADER_BYTES..end).unwrap_or_default(),
    })
}

/// Replace `dir/name` with `body` framed as `kind`, atomically (temporary file, sync,
/// rename, sync the directory).
pub fn write(vfs: &dyn Vfs, dir: &Path, name: &str, kind: &Kind, body: &[u8]) -> Result<()> {
    crate::fsutil::replace_atomic(vfs, dir, name, &encode(kind, body))
}

/// The bytes of `path` (`None` if it does not exist), refusing a file longer than
/// `max_bytes` before reading it whole.
pub fn read_raw(vfs: &dyn Vfs, path: &Path, max_bytes: usize) -> Result<Option<Vec<u8>>> {
    // A state file is replaced whole (write a temporary, rename it over): on an object
    // store a handle opened just before a replace reads "removed" (NotFound) where a local
    // file would still read the old bytes. Open again: the replacement is there.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match read_once(vfs, path, max_bytes) {
            Err(Raced(_)) if attempts < 5 => continue,
            Err(Raced(e)) => return Err(e).at(path),
            Ok(r) => return r,
        }
    }
}

/// A file that vanished between its open and its read (a concurrent replace or removal).
struct Raced(std::io::Error);

fn read_once(
    vfs: &dyn Vfs,
    path: &Path,
    max_bytes: usize,
) -> std::result::Result<Result<Option<Vec<u8>>>, Raced> {
    // Open rather than ask `exists` first: `exists` cannot tell a missing file from a
    // store that did not answer, and an unreachable object store must not read as "absent".
    let f = match vfs.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ok(None)),
        Err(e) => return Ok(Err(e).at(path)),
    };
    let raced = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Err(Raced(e))
        } else {
            Ok(Err(e).at(path))
        }
    };
    let len = match f.len() {
        Ok(l) => l,
        Err(e) => return raced(e),
    };
    if len > max_bytes as u64 {
        return Ok(Err(Error::corrupt(
            path,
            0,
            format!("a {len}-byte file where at most {max_bytes} bytes belong"),
        )));
    }
    let mut b = vec![0u8; len as usize];
    let n = match f.read_full_at(&mut b, 0) {
        Ok(n) => n,
        Err(e) => return raced(e),
    };
    b.truncate(n);
    Ok(Ok(Some(b)))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    const KIND: Kind = Kind {
        magic: *b"STBYTEST",
        version: 2,
        max_body_bytes: 64,
        what: "test state",
    };

    #[test]
    fn round_trips() {
        for body in [&b""[..], b"x", &[7u8; 64]] {
            let b = encode(&KIND, body);
            assert_eq!(b.len(), FRAME_BYTES + body.len());
            assert_eq!(decode(&KIND, &b).unwrap(), Verified { version: 2, body });
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let b = encode(&KIND, b"0123456789abcdef");
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(decode(&KIND, &c).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn truncated_and_extended_files_are_refused() {
        let b = encode(&KIND, b"0123456789abcdef");
        for n in 0..b.len() {
            assert!(decode(&KIND, &b[..n]).is_err(), "{n} bytes");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(decode(&KIND, &longer).is_err());
        assert!(decode(&KIND, &[0u8; 36]).is_err(), "zeros");
    }

    #[test]
    fn versions_and_lengths_outside_the_kind_are_refused() {
        let newer = Kind { version: 3, ..KIND };
        let (at, what) = decode(&KIND, &encode(&newer, b"")).unwrap_err();
        assert_eq!(at, 8);
        assert!(what.contains("version 3"), "{what}");
        let zero = Kind { version: 0, ..KIND };
        assert!(decode(&KIND, &encode(&zero, b"")).is_err());
        // An older framed version is still read (and says which it was).
        let older = Kind { version: 1, ..KIND };
        assert_eq!(decode(&KIND, &encode(&older, b"a")).unwrap().version, 1);
        let big = Kind {
            max_body_bytes: 1000,
            ..KIND
        };
        let (at, _) = decode(&KIND, &encode(&big, &[0u8; 65])).unwrap_err();
        assert_eq!(at, 12, "the length is checked before the crc");
        let other = Kind {
            magic: *b"STBYELSE",
            ..KIND
        };
        assert!(decode(&KIND, &encode(&other, b"")).is_err());
    }

    #[test]
    fn reads_through_the_vfs_and_bounds_the_size() {
        let fs = crate::vfs::SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        assert_eq!(read_raw(&fs, &dir.join("s"), 100).unwrap(), None);
        write(&fs, dir, "s", &KIND, b"hello").unwrap();
        let raw = read_raw(&fs, &dir.join("s"), 100).unwrap().unwrap();
        assert_eq!(decode(&KIND, &raw).unwrap().body, b"hello");
        let e = read_raw(&fs, &dir.join("s"), 10).unwrap_err();
        assert!(e.is_corruption(), "{e}");
        assert!(!fs.exists(&dir.join("s.tmp")));
    }
}
