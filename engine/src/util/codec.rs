//! The one codec every binary format reads and writes through (the change log's records and
//! segments, the replica's files, the link's messages, the NBD protocol, the flag files):
//! a bounds-checked [`Reader`] over untrusted bytes, a [`Writer`] that appends, one
//! [`DecodeError`] that names the field and the byte offset where decoding stopped, and
//! the one feature-bit rule ([`Features::check`]). A new format costs a byte map and a
//! struct, not a new dialect (lsm-tree's `coding.rs` is the model).
//!
//! Integers are little-endian unless the method says `_be` (only NBD, whose specification
//! is in network order, uses those). Offsets in errors are relative to the start of the
//! bytes the [`Reader`] was made over, so the caller adds the structure's own offset in
//! its file (see [`DecodeError::at`]).
//!
//! The invariant: no read through a [`Reader`] indexes out of bounds, and a failing read
//! consumes nothing.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::borrow::Cow;
use std::fmt;

/// Why bytes failed to decode: which field, at which byte offset (from the start of the
/// decoded bytes), and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The field being read or checked ("crc", "body_len", "version", …).
    pub field: &'static str,
    /// Byte offset of that field from the start of the decoded bytes.
    pub offset: usize,
    pub kind: DecodeErrorKind,
}

/// What was wrong with the field a [`DecodeError`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// Fewer bytes than the structure needs: a torn tail when at the end of a file.
    Truncated { needed: usize, have: usize },
    /// The bytes are not a valid structure (bad magic, checksum or field value).
    Invalid(Cow<'static, str>),
    /// A newer format version, or an unknown incompatible feature bit: the bytes may be
    /// fine, this build cannot read them.
    Unsupported(String),
}

impl DecodeError {
    /// `field` at `offset` holds a bad value.
    #[cold]
    pub fn invalid(
        field: &'static str,
        offset: usize,
        what: impl Into<Cow<'static, str>>,
    ) -> DecodeError {
        DecodeError {
            field,
            offset,
            kind: DecodeErrorKind::Invalid(what.into()),
        }
    }

    /// `field` at `offset` needs `needed` bytes in all, and only `have` are there.
    #[cold]
    pub fn truncated(field: &'static str, offset: usize, needed: usize, have: usize) -> Self {
        DecodeError {
            field,
            offset,
            kind: DecodeErrorKind::Truncated { needed, have },
        }
    }

    /// `field` at `offset` says the bytes need a newer build.
    #[cold]
    pub fn unsupported(field: &'static str, offset: usize, what: String) -> DecodeError {
        DecodeError {
            field,
            offset,
            kind: DecodeErrorKind::Unsupported(what),
        }
    }

    pub fn is_truncated(&self) -> bool {
        matches!(self.kind, DecodeErrorKind::Truncated { .. })
    }

    pub fn is_unsupported(&self) -> bool {
        matches!(self.kind, DecodeErrorKind::Unsupported(_))
    }

    /// The same error, `by` bytes further on: for a structure decoded out of a larger
    /// one, whose offsets should count from the larger one's start.
    pub fn shifted(mut self, by: usize) -> DecodeError {
        self.offset = self.offset.saturating_add(by);
        if let DecodeErrorKind::Truncated { needed, have } = &mut self.kind {
            *needed = needed.saturating_add(by);
            *have = have.saturating_add(by);
        }
        self
    }

    /// The same error with `prefix` before its words ("entry 3: …"), where it has words.
    pub fn context(mut self, prefix: impl fmt::Display) -> DecodeError {
        match &mut self.kind {
            DecodeErrorKind::Invalid(what) => *what = format!("{prefix}: {what}").into(),
            DecodeErrorKind::Unsupported(what) => *what = format!("{prefix}: {what}"),
            DecodeErrorKind::Truncated { .. } => {}
        }
        self
    }

    /// Turn into the engine's error, naming the file and the decoded structure's offset in
    /// it (the field's own offset is in the message).
    #[cold]
    pub fn at(self, path: &std::path::Path, offset: u64) -> crate::Error {
        match self.kind {
            DecodeErrorKind::Unsupported(what) => crate::Error::Unsupported {
                path: path.to_path_buf(),
                what,
            },
            _ => crate::Error::corrupt(path, offset, self.to_string()),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DecodeError {
            field,
            offset,
            kind,
        } = self;
        match kind {
            DecodeErrorKind::Truncated { needed, have } => write!(
                f,
                "truncated at {field} (byte {offset}): needs {needed} bytes, {have} present"
            ),
            DecodeErrorKind::Invalid(what) => write!(f, "{what} ({field} at byte {offset})"),
            DecodeErrorKind::Unsupported(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A cursor over untrusted bytes: every read is bounds-checked and names its field.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The field read last and its offset, for [`Reader::invalid`].
    last: (&'static str, usize),
}

impl<'a> Reader<'a> {
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            last: ("start", 0),
        }
    }

    /// Offset of the next byte to read.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Whether every byte has been read.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The next `n` bytes.
    #[inline]
    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let got = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end));
        match got {
            Some(s) => {
                self.last = (field, self.pos);
                self.pos += n;
                Ok(s)
            }
            None => Err(self.short(n, field)),
        }
    }

    /// The next `N` bytes as an array.
    #[inline]
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.buf.get(self.pos..).and_then(|s| s.first_chunk::<N>()) {
            Some(a) => {
                self.last = (field, self.pos);
                self.pos += N;
                Ok(*a)
            }
            None => Err(self.short(N, field)),
        }
    }

    /// Skip `n` bytes (a reserved field).
    #[inline]
    pub fn skip(&mut self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        self.bytes(n, field).map(|_| ())
    }

    /// The next bytes must be `magic`; `what` is the refusal ("not a Standby …").
    #[inline]
    pub fn magic(&mut self, magic: &[u8], what: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        if self.bytes(magic.len(), "magic")? != magic {
            return Err(DecodeError::invalid("magic", at, what));
        }
        Ok(())
    }

    /// Everything not yet read.
    #[inline]
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        s
    }

    /// Every byte must have been read: `what` names the structure for the refusal.
    #[inline]
    pub fn expect_end(&self, what: &str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::invalid(
                "end",
                self.pos,
                format!("{n} bytes after the end of {what}"),
            )),
        }
    }

    /// The field read last holds a bad value: an error naming it and its offset.
    #[cold]
    pub fn invalid(&self, what: impl Into<Cow<'static, str>>) -> DecodeError {
        DecodeError::invalid(self.last.0, self.last.1, what)
    }

    #[cold]
    fn short(&self, n: usize, field: &'static str) -> DecodeError {
        DecodeError::truncated(field, self.pos, self.pos.saturating_add(n), self.buf.len())
    }

    #[inline]
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }
    #[inline]
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    #[inline]
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    #[inline]
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    #[inline]
    pub fn u16_be(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    #[inline]
    pub fn u32_be(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    #[inline]
    pub fn u64_be(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// `n` bytes of UTF-8.
    pub fn utf8(&mut self, n: usize, field: &'static str) -> Result<String, DecodeError> {
        let at = self.pos;
        String::from_utf8(self.bytes(n, field)?.to_vec())
            .map_err(|_| DecodeError::invalid(field, at, "text is not UTF-8"))
    }
}

/// `b[range]`, or a truncation of `field` when `b` is shorter than the range's end.
#[inline]
pub fn part<'a>(
    b: &'a [u8],
    range: std::ops::Range<usize>,
    field: &'static str,
) -> Result<&'a [u8], DecodeError> {
    let (start, end) = (range.start, range.end);
    b.get(range)
        .ok_or_else(|| DecodeError::truncated(field, start, end, b.len()))
}

/// Appends a structure's fields to a buffer (little-endian unless `_be`).
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    #[inline]
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }
    /// Bytes in the buffer (from its start, not from where this writer began).
    #[inline]
    pub fn len(&self) -> usize {
        self.out.len()
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }
    #[inline]
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    #[inline]
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    #[inline]
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    #[inline]
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    #[inline]
    pub fn u16_be(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    #[inline]
    pub fn u32_be(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    #[inline]
    pub fn u64_be(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
}

/// A structure's format version and incompatible-feature word, with where each was read:
/// the input of the one feature-bit rule.
#[derive(Debug, Clone, Copy)]
pub struct Features {
    pub version: u16,
    pub version_at: usize,
    pub incompat: u32,
    pub incompat_at: usize,
}

impl Features {
    /// qcow2's rule: another version, or an unknown incompatible bit, refuses the
    /// structure (as [`DecodeErrorKind::Unsupported`], with a readable message naming
    /// `what`); unknown compatible bits are not even looked at.
    pub fn check(
        &self,
        what: &str,
        known_version: u16,
        known_incompat: u32,
    ) -> Result<(), DecodeError> {
        let Features {
            version,
            version_at,
            incompat,
            incompat_at,
        } = *self;
        if version != known_version {
            return Err(DecodeError::unsupported(
                "version",
                version_at,
                format!(
                    "{what} format version {version} (this build reads version {known_version})"
                ),
            ));
        }
        let unknown = incompat & !known_incompat;
        if unknown != 0 {
            return Err(DecodeError::unsupported(
                "incompat",
                incompat_at,
                format!(
                    "{what} needs unknown incompatible features {unknown:#x}; a newer Standby wrote it"
                ),
            ));
        }
        Ok(())
    }
}

/// A crc32 seeded with `seed` over `id` (little-endian) and then `parts`: binding a
/// checksum to the file or layer id means bytes copied from elsewhere, and all-zero bytes,
/// never verify.
pub fn seeded_crc(seed: u32, id: u64, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(&id.to_le_bytes());
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked_name_their_field_and_consume_nothing_when_short() {
        let b = [1u8, 2, 0, 0, 0, 9, 8, 7];
        let mut r = Reader::new(&b);
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u32("b").unwrap(), 2);
        let e = r.u64("c").unwrap_err();
        assert_eq!(
            (e.field, e.offset, e.kind.clone()),
            (
                "c",
                5,
                DecodeErrorKind::Truncated {
                    needed: 13,
                    have: 8
                }
            )
        );
        assert_eq!(r.position(), 5, "a failed read consumes nothing");
        assert!(e.is_truncated());
        assert_eq!(
            e.to_string(),
            "truncated at c (byte 5): needs 13 bytes, 8 present"
        );
        assert_eq!(r.u16_be("d").unwrap(), 0x0908);
        let e = r.invalid("bad d").context("entry 2");
        assert_eq!(e.to_string(), "entry 2: bad d (d at byte 5)");
        let e = r.expect_end("a test").unwrap_err();
        assert_eq!((e.field, e.offset), ("end", 7));
        assert_eq!(
            e.to_string(),
            "1 bytes after the end of a test (end at byte 7)"
        );
        assert_eq!(r.rest(), &[7]);
        r.expect_end("a test").unwrap();
        assert!(r.bytes(usize::MAX, "huge").is_err(), "no overflow");
        assert_eq!(r.rest(), &[] as &[u8]);
    }

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let mut out = Vec::new();
        Writer::new(&mut out)
            .u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .u16_be(5)
            .u32_be(6)
            .u64_be(7)
            .bytes(b"xy");
        assert_eq!(out.len(), 1 + 2 + 4 + 8 + 2 + 4 + 8 + 2);
        let mut r = Reader::new(&out);
        assert_eq!(r.u8("f").unwrap(), 1);
        assert_eq!(r.u16("f").unwrap(), 2);
        assert_eq!(r.u32("f").unwrap(), 3);
        assert_eq!(r.u64("f").unwrap(), 4);
        assert_eq!(r.u16_be("f").unwrap(), 5);
        assert_eq!(r.u32_be("f").unwrap(), 6);
        assert_eq!(r.u64_be("f").unwrap(), 7);
        assert_eq!(r.utf8(2, "f").unwrap(), "xy");
        r.expect_end("it").unwrap();
        assert_eq!(&out[7..11], &[4, 0, 0, 0], "little-endian");
        assert_eq!(&out[17..21], &[0, 0, 0, 6], "big-endian");
    }

    #[test]
    fn the_feature_rule_refuses_other_versions_and_unknown_incompatible_bits() {
        let f = |version, incompat| Features {
            version,
            version_at: 8,
            incompat,
            incompat_at: 12,
        };
        f(1, 0b01).check("thing", 1, 0b11).unwrap();
        let e = f(2, 0).check("thing", 1, 0b11).unwrap_err();
        assert!(e.is_unsupported());
        assert_eq!((e.field, e.offset), ("version", 8));
        assert_eq!(
            e.to_string(),
            "thing format version 2 (this build reads version 1)"
        );
        let e = f(1, 0b101).check("thing", 1, 0b11).unwrap_err();
        assert_eq!((e.field, e.offset), ("incompat", 12));
        assert!(
            e.to_string().contains("unknown incompatible features 0x4"),
            "{e}"
        );
    }

    #[test]
    fn errors_become_the_engine_s_with_the_file_and_structure_offset() {
        let p = std::path::Path::new("/v/x");
        let e = DecodeError::invalid("crc", 36, "header checksum mismatch").at(p, 4096);
        assert_eq!(
            e.to_string(),
            "corruption in /v/x at byte 4096: header checksum mismatch (crc at byte 36)"
        );
        let e = DecodeError::unsupported("version", 8, "too new".into()).at(p, 0);
        assert!(matches!(e, crate::Error::Unsupported { .. }), "{e:?}");
        let e = DecodeError::truncated("body", 40, 100, 60).shifted(10);
        assert_eq!(
            (e.offset, e.kind),
            (
                50,
                DecodeErrorKind::Truncated {
                    needed: 110,
                    have: 70
                }
            )
        );
    }
}
