//! Shared helpers of the replica's on-disk formats: the decode error every format module
//! returns, a bounds-checked little-endian cursor over untrusted bytes, and the qcow2-style
//! feature-bit rule. It owns no structure of its own; its invariant is that no read through
//! [`Cursor`] can index out of bounds.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fmt;

/// Why bytes failed to decode. Offsets are relative to the start of the decoded structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer bytes than the structure needs: a torn tail when at the end of a file.
    Truncated { needed: usize, have: usize },
    /// The bytes are not a valid structure (bad magic, checksum or field).
    Bad(String),
    /// A newer format version, or an unknown incompatible feature bit.
    Unsupported(String),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated { needed, have } => {
                write!(f, "truncated: needs {needed} bytes, {have} present")
            }
            FormatError::Bad(w) | FormatError::Unsupported(w) => f.write_str(w),
        }
    }
}

impl std::error::Error for FormatError {}

pub(crate) fn bad(what: impl Into<String>) -> FormatError {
    FormatError::Bad(what.into())
}

impl FormatError {
    /// Turn into the engine's error, naming the file and the structure's offset in it.
    pub fn at(self, path: &std::path::Path, offset: u64) -> crate::Error {
        match self {
            FormatError::Unsupported(what) => crate::Error::Unsupported {
                path: path.to_path_buf(),
                what,
            },
            other => crate::Error::corrupt(path, offset, other.to_string()),
        }
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked.
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Cursor { b, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.b.get(self.pos..end));
        let Some(s) = s else {
            return Err(FormatError::Truncated {
                needed: self.pos.saturating_add(n),
                have: self.b.len(),
            });
        };
        self.pos += n;
        Ok(s)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let have = self.b.len();
        <[u8; N]>::try_from(self.bytes(N)?).map_err(|_| FormatError::Truncated { needed: N, have })
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(u8::from_le_bytes(self.array()?))
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// An optional UTF-8 string: present u8 (0/1), length u16, bytes.
    pub fn opt_str(&mut self, max: usize) -> Result<Option<String>, FormatError> {
        let present = self.u8()?;
        let len = self.u16()? as usize;
        if len > max {
            return Err(bad(format!("string of {len} bytes exceeds {max}")));
        }
        let bytes = self.bytes(len)?;
        match present {
            0 if len == 0 => Ok(None),
            1 => String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| bad("string is not UTF-8")),
            _ => Err(bad("bad string presence byte")),
        }
    }
}

/// `b[range]`, or `Truncated` when `b` is shorter than the range's end.
pub(crate) fn part(b: &[u8], range: std::ops::Range<usize>) -> Result<&[u8], FormatError> {
    let needed = range.end;
    b.get(range).ok_or(FormatError::Truncated {
        needed,
        have: b.len(),
    })
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => {
            out.push(0);
            put_u16(out, 0);
        }
        Some(s) => {
            out.push(1);
            put_u16(out, s.len() as u16);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// A crc32 seeded with `seed` over `id` (little-endian) and then `parts`: binding a
/// checksum to the file or layer id means bytes copied from elsewhere, and all-zero bytes,
/// never verify.
pub(crate) fn seeded_crc(seed: u32, id: u64, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(&id.to_le_bytes());
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Check a structure's version and feature bits (qcow2's rule): an unknown incompatible
/// bit refuses the structure with a readable message; unknown compatible bits are ignored.
pub(crate) fn check_features(
    what: &str,
    version: u16,
    known_version: u16,
    incompat: u32,
    known_incompat: u32,
) -> Result<(), FormatError> {
    if version != known_version {
        return Err(FormatError::Unsupported(format!(
            "{what} format version {version} (this build reads version {known_version})"
        )));
    }
    if incompat & !known_incompat != 0 {
        return Err(FormatError::Unsupported(format!(
            "{what} needs unknown incompatible features {:#x}; a newer Standby wrote it",
            incompat & !known_incompat
        )));
    }
    Ok(())
}
