//! The damage record (`VAULT/vms/VM/damage`): what the last `verify` that found damage in a
//! VM's log or replica found, kept until a later verify finds none. `status` reads it, so a
//! VM whose stored bytes are known to be damaged shows `critical` however healthy its
//! replication looks, in every later command and after a restart.
//!
//! Byte map (integers little-endian; see `docs/format.md`):
//!
//! ```text
//! off  size  field
//!   0     8  magic      "STBYDMG\0"
//!   8     2  version    1
//!  10     2  reserved   0
//!  12     4  count      damaged places the verify found (>= 1)
//!  16     8  found_us   when (µs since the Unix epoch)
//!  24     4  text_len   <= MAX_TEXT_BYTES
//!  28     n  text       the first damage, one line of UTF-8
//! 28+n    4  crc32      of bytes 0..28+n
//! ```
//!
//! Written atomically through the vault's I/O seam; a clean verify removes it.

use crate::error::{Error, IoContext, Result};
use crate::fsutil::replace_atomic;
use crate::vfs::Vfs;
use std::path::Path;

pub const FILE_NAME: &str = "damage";
const MAGIC: [u8; 8] = *b"STBYDMG\0";
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 28;
/// Longest description kept (longer ones are cut at a character boundary).
pub const MAX_TEXT_BYTES: usize = 4096;

/// Damage a verify found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamageRecord {
    pub count: u32,
    pub found_us: u64,
    /// The first damage, as one line.
    pub text: String,
}

pub fn encode(d: &DamageRecord) -> Vec<u8> {
    let mut text = d.text.replace('\n', " ");
    if text.len() > MAX_TEXT_BYTES {
        let mut cut = MAX_TEXT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    let mut b = Vec::with_capacity(HEADER_BYTES + text.len() + 4);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&d.count.to_le_bytes());
    b.extend_from_slice(&d.found_us.to_le_bytes());
    b.extend_from_slice(&(text.len() as u32).to_le_bytes());
    b.extend_from_slice(text.as_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode(b: &[u8], path: &Path) -> Result<DamageRecord> {
    let corrupt = |offset: u64, what: &str| Error::corrupt(path, offset, what.to_string());
    if b.len() < HEADER_BYTES + 4 {
        return Err(corrupt(0, "damage record is truncated"));
    }
    if b[0..8] != MAGIC {
        return Err(corrupt(0, "not a Standby damage record (bad magic)"));
    }
    let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let text_len = le32(24) as usize;
    if text_len > MAX_TEXT_BYTES || HEADER_BYTES + text_len + 4 != b.len() {
        return Err(corrupt(24, "damage record length does not match the file"));
    }
    let end = HEADER_BYTES + text_len;
    if crc32fast::hash(&b[..end]) != le32(end) {
        return Err(corrupt(end as u64, "damage record checksum mismatch"));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(Error::Unsupported {
            path: path.into(),
            what: format!("damage record version {version} (this build reads version {VERSION})"),
        });
    }
    let count = le32(12);
    if count == 0 {
        return Err(corrupt(12, "damage record with no damage"));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[16..24]);
    let text = std::str::from_utf8(&b[HEADER_BYTES..end])
        .map_err(|_| corrupt(HEADER_BYTES as u64, "damage record text is not UTF-8"))?;
    if text.contains('\n') {
        return Err(corrupt(
            HEADER_BYTES as u64,
            "damage record text spans lines",
        ));
    }
    Ok(DamageRecord {
        count,
        found_us: u64::from_le_bytes(t),
        text: text.to_string(),
    })
}

/// Record damage, replacing any earlier record.
pub fn store(vfs: &dyn Vfs, dir: &Path, d: &DamageRecord) -> Result<()> {
    replace_atomic(vfs, dir, FILE_NAME, &encode(d))
}

/// Forget recorded damage (a clean verify), durably.
pub fn clear(vfs: &dyn Vfs, dir: &Path) -> Result<()> {
    let path = dir.join(FILE_NAME);
    if vfs.exists(&path) {
        vfs.remove(&path).at(&path)?;
        vfs.sync_dir(dir).at(dir)?;
    }
    Ok(())
}

/// The recorded damage, if any.
pub fn load(vfs: &dyn Vfs, dir: &Path) -> Result<Option<DamageRecord>> {
    let path = dir.join(FILE_NAME);
    if !vfs.exists(&path) {
        return Ok(None);
    }
    let f = vfs.open(&path).at(&path)?;
    let mut b = vec![0u8; HEADER_BYTES + MAX_TEXT_BYTES + 5];
    let n = f.read_full_at(&mut b, 0).at(&path)?;
    b.truncate(n);
    decode(&b, &path).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::SimFs;

    fn sample() -> DamageRecord {
        DamageRecord {
            count: 3,
            found_us: 1_764_000_000_000_000,
            text: "corruption in /v/data/1.dat at byte 4096: extent checksum mismatch".into(),
        }
    }

    #[test]
    fn round_trip_and_every_flipped_byte_is_refused() {
        let b = encode(&sample());
        let p = Path::new("damage");
        assert_eq!(decode(&b, p).unwrap(), sample());
        // Every byte but the reserved field (ignored on read, as the format rules say).
        for i in (0..b.len()).filter(|i| !(10..12).contains(i)) {
            for bit in [0u8, 4, 7] {
                let mut d = b.clone();
                d[i] ^= 1 << bit;
                assert!(decode(&d, p).is_err(), "flip of bit {bit} at {i}");
            }
        }
        for cut in 0..b.len() {
            assert!(decode(&b[..cut], p).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn long_or_multi_line_text_is_kept_as_one_bounded_line() {
        let d = DamageRecord {
            text: format!("a\nb{}", "é".repeat(MAX_TEXT_BYTES)),
            ..sample()
        };
        let back = decode(&encode(&d), Path::new("damage")).unwrap();
        assert!(back.text.len() <= MAX_TEXT_BYTES);
        assert!(back.text.starts_with("a b"));
    }

    #[test]
    fn stored_durably_and_cleared_durably() {
        let fs = SimFs::new();
        let dir = Path::new("/vm");
        fs.create_dir_all(dir).unwrap();
        assert_eq!(load(&fs, dir).unwrap(), None);
        store(&fs, dir, &sample()).unwrap();
        assert_eq!(load(&fs.crash(0), dir).unwrap(), Some(sample()));
        clear(&fs, dir).unwrap();
        assert_eq!(load(&fs.crash(0), dir).unwrap(), None);
    }
}
