//! Flag files: a durable yes/no a runtime keeps beside its log (`resync.required`: the
//! dirty bitmap may be lost with the process; `initialized`: the first run's initial copy
//! began). Written through the Vfs, so crash tests see them.
//!
//! Byte map (16 bytes): magic `STBYFLAG` (8), format version u32 LE (= 1), crc32 of the
//! first 12 bytes u32 LE. A flag is set once its file is durable with its directory entry;
//! a file that fails its check is reported as corruption, never taken for either answer.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS). Reads go through the codec's bounds-checked cursor.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, IoContext, Result};
use crate::util::codec::{part, DecodeError, Reader, Writer};
use crate::vfs::Vfs;
use std::path::Path;

const MAGIC: [u8; 8] = *b"STBYFLAG";
const VERSION: u32 = 1;
const BYTES: usize = 16;

fn encode() -> Vec<u8> {
    let mut b = Vec::with_capacity(BYTES);
    Writer::new(&mut b).bytes(&MAGIC).u32(VERSION);
    let crc = crc32fast::hash(&b);
    Writer::new(&mut b).u32(crc);
    b
}

/// Check a small file of `bytes` bytes: its length, its magic and the crc32 of everything
/// before its last 4 bytes, then its version (u32 after the magic). Returns a reader at
/// the field after the version. `what` names the file ("flag", "slot").
fn check<'a>(
    b: &'a [u8],
    bytes: usize,
    magic: &[u8; 8],
    what: &str,
) -> std::result::Result<Reader<'a>, String> {
    if b.len() != bytes {
        return Err(format!(
            "a {what} file is {bytes} bytes, this one {}",
            b.len()
        ));
    }
    let fields = || -> std::result::Result<Reader<'a>, DecodeError> {
        let mut r = Reader::new(b);
        if r.array::<8>("magic")? != *magic {
            return Err(DecodeError::invalid(
                "magic",
                0,
                format!("not a Standby {what} file (bad magic)"),
            ));
        }
        let covered = part(b, 0..bytes - 4, "crc")?;
        let mut t = Reader::new(part(b, bytes - 4..bytes, "crc")?);
        if t.u32("crc")? != crc32fast::hash(covered) {
            return Err(DecodeError::invalid(
                "crc",
                bytes - 4,
                format!("{what} file checksum mismatch"),
            ));
        }
        let version = r.u32("version")?;
        if version != VERSION {
            return Err(DecodeError::invalid(
                "version",
                8,
                format!(
                    "{what} file format version {version} is newer than this Standby ({VERSION})"
                ),
            ));
        }
        Ok(r)
    };
    fields().map_err(|e| e.to_string())
}

/// Set the flag `name` in `dir` durably.
pub fn set(vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<()> {
    crate::fsutil::replace_atomic(vfs, dir, name, &encode())
}

/// Clear the flag durably (nothing if it is not set).
pub fn clear(vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    if !vfs.exists(&path) {
        return Ok(());
    }
    vfs.remove(&path).at(&path)?;
    vfs.sync_dir(dir).at(dir)
}

/// Whether the flag is set. An empty file counts as set (a flag written by an older
/// Standby, which created empty files); any other content must verify.
pub fn is_set(vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<bool> {
    let path = dir.join(name);
    if !vfs.exists(&path) {
        return Ok(false);
    }
    let f = vfs.open(&path).at(&path)?;
    let mut b = [0u8; BYTES + 1];
    let n = f.read_full_at(&mut b, 0).at(&path)?;
    if n == 0 {
        return Ok(true);
    }
    decode(b.get(..n).unwrap_or_default()).map_err(|what| Error::corrupt(&path, 0, what))?;
    Ok(true)
}

fn decode(b: &[u8]) -> std::result::Result<(), String> {
    check(b, BYTES, &MAGIC, "flag").map(|_| ())
}

/// Slots: a yes/no that can be changed when the disk is full. The file is created (clear)
/// while there is room and later only overwritten in place, which allocates nothing.
///
/// Byte map (20 bytes): magic `STBYSLOT` (8), format version u32 LE (= 1), state u32 LE
/// (0 clear, 1 set; anything else is refused), crc32 of the first 16 bytes u32 LE.
pub mod slot {
    use super::*;

    const MAGIC: [u8; 8] = *b"STBYSLOT";
    const BYTES: usize = 20;

    fn encode(set: bool) -> Vec<u8> {
        let mut b = Vec::with_capacity(BYTES);
        Writer::new(&mut b)
            .bytes(&MAGIC)
            .u32(VERSION)
            .u32(u32::from(set));
        let crc = crc32fast::hash(&b);
        Writer::new(&mut b).u32(crc);
        b
    }

    /// Make sure the slot `name` exists in `dir` (created clear, durably, if it does not).
    pub fn prepare(vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<()> {
        if vfs.exists(&dir.join(name)) {
            return get(vfs, dir, name).map(|_| ());
        }
        crate::fsutil::replace_atomic(vfs, dir, name, &encode(false))
    }

    /// Set or clear the slot durably, in place (it must have been prepared).
    pub fn put(vfs: &dyn Vfs, dir: &Path, name: &str, set: bool) -> Result<()> {
        let path = dir.join(name);
        let f = vfs.open(&path).at(&path)?;
        f.write_all_at(&encode(set), 0).at(&path)?;
        f.sync_data().at(&path)
    }

    /// The slot's state (clear if it does not exist).
    pub fn get(vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<bool> {
        let path = dir.join(name);
        if !vfs.exists(&path) {
            return Ok(false);
        }
        let f = vfs.open(&path).at(&path)?;
        let mut b = [0u8; BYTES + 1];
        let n = f.read_full_at(&mut b, 0).at(&path)?;
        decode(b.get(..n).unwrap_or_default()).map_err(|what| Error::corrupt(&path, 0, what))
    }

    fn decode(b: &[u8]) -> std::result::Result<bool, String> {
        let mut r = check(b, BYTES, &MAGIC, "slot")?;
        match r.u32("state").map_err(|e| e.to_string())? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(format!("slot state {n} is neither 0 nor 1")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::RealFs;

    #[test]
    fn set_clear_and_every_flipped_byte_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RealFs;
        assert!(!is_set(&fs, dir.path(), "f").unwrap());
        set(&fs, dir.path(), "f").unwrap();
        assert!(is_set(&fs, dir.path(), "f").unwrap());
        let good = std::fs::read(dir.path().join("f")).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            std::fs::write(dir.path().join("f"), &b).unwrap();
            assert!(
                matches!(is_set(&fs, dir.path(), "f"), Err(Error::Corrupt { .. })),
                "byte {i}"
            );
        }
        std::fs::write(dir.path().join("f"), b"").unwrap();
        assert!(is_set(&fs, dir.path(), "f").unwrap(), "an old empty flag");
        clear(&fs, dir.path(), "f").unwrap();
        assert!(!is_set(&fs, dir.path(), "f").unwrap());
        clear(&fs, dir.path(), "f").unwrap();
    }

    /// A power cut at every sync of setting and of clearing a flag leaves it set or unset,
    /// never unreadable; once `set` (`clear`) returned, it survives any later cut.
    #[test]
    fn a_power_cut_at_any_sync_leaves_the_flag_whole() {
        use crate::vfs::SimFs;
        let dir = Path::new("/j");
        for op in ["set", "clear"] {
            for cut in 1..=8u64 {
                let fs = SimFs::new();
                fs.create_dir_all(dir).unwrap();
                if op == "clear" {
                    set(&fs, dir, "resync.required").unwrap();
                }
                fs.fail_at_sync(cut);
                let r = if op == "set" {
                    set(&fs, dir, "resync.required")
                } else {
                    clear(&fs, dir, "resync.required")
                };
                for torn in [0, 3, 64] {
                    let after = fs.crash(torn);
                    let got = is_set(&after, dir, "resync.required")
                        .unwrap_or_else(|e| panic!("{op}, cut {cut}, torn {torn}: {e}"));
                    if r.is_ok() {
                        assert_eq!(got, op == "set", "{op} returned, cut {cut}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_slot_flips_in_place_on_a_full_disk_and_every_flipped_byte_is_reported() {
        let fs = crate::vfs::SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        assert!(!slot::get(&fs, dir, "s").unwrap());
        slot::prepare(&fs, dir, "s").unwrap();
        assert!(!slot::get(&fs, dir, "s").unwrap());
        fs.set_full(true);
        slot::put(&fs, dir, "s", true).unwrap();
        assert!(slot::get(&fs, dir, "s").unwrap());
        slot::prepare(&fs, dir, "s").unwrap();
        assert!(slot::get(&fs, dir, "s").unwrap(), "prepare keeps the state");
        let crashed = fs.crash(0);
        assert!(slot::get(&crashed, dir, "s").unwrap(), "durable");
        slot::put(&fs, dir, "s", false).unwrap();
        assert!(!slot::get(&fs, dir, "s").unwrap());
        let good = {
            let f = fs.open(&dir.join("s")).unwrap();
            let mut b = vec![0u8; 20];
            f.read_full_at(&mut b, 0).unwrap();
            b
        };
        fs.set_full(false);
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            fs.open(&dir.join("s"))
                .unwrap()
                .write_all_at(&b, 0)
                .unwrap();
            assert!(
                matches!(slot::get(&fs, dir, "s"), Err(Error::Corrupt { .. })),
                "byte {i}"
            );
        }
    }
}
