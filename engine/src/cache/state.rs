//! The log's small state files: the checkpoint (how far the processor has everything)
//! and the source hold (how far the source images are durable).

use crate::error::{Error, IoContext, Result};
use crate::vfs::Vfs;
use std::path::Path;

const CHECKPOINT_FILE: &str = "checkpoint";
/// How far the source images are durable (written by the agent through the log's API).
pub const SOURCE_SEQ_FILE: &str = "source.seq";
const CHECKPOINT_MAGIC: [u8; 8] = *b"STBYCKP\0";

pub(super) fn write_checkpoint(vfs: &dyn Vfs, dir: &Path, seq: u64) -> Result<()> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&CHECKPOINT_MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    crate::fsutil::replace_atomic(vfs, dir, CHECKPOINT_FILE, &b)
}

pub(super) fn read_checkpoint(vfs: &dyn Vfs, dir: &Path) -> Result<u64> {
    let path = dir.join(CHECKPOINT_FILE);
    if !vfs.exists(&path) {
        return Ok(0);
    }
    let f = vfs.open(&path).at(&path)?;
    let mut b = [0u8; 25];
    let n = f.read_full_at(&mut b, 0).at(&path)?;
    if n != 24 || b[0..8] != CHECKPOINT_MAGIC {
        return Err(Error::corrupt(&path, 0, "not a change-log checkpoint file"));
    }
    let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
    if crc32fast::hash(&b[..20]) != crc {
        return Err(Error::corrupt(&path, 20, "checkpoint checksum mismatch"));
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[8..16]);
    Ok(u64::from_le_bytes(s))
}

pub(super) fn read_source_seq(vfs: &dyn Vfs, dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(SOURCE_SEQ_FILE);
    if !vfs.exists(&path) {
        return Ok(None);
    }
    let f = vfs.open(&path).at(&path)?;
    let mut b = [0u8; 13];
    let n = f.read_full_at(&mut b, 0).at(&path)?;
    if n != 12 || crc32fast::hash(&b[..8]).to_le_bytes() != b[8..12] {
        return Err(Error::corrupt(&path, 0, "source sequence file is damaged"));
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[..8]);
    Ok(Some(u64::from_le_bytes(s)))
}
