//! Block hashes of one side, kept or sent apart from the other side: a two-site reprotect
//! hashes the vault's replica at the target site and the agent at the new source compares
//! its images with those hashes (the other side's blocks never cross the link).

use super::{block_len, block_runs, chunks, hash_chunk, threads_for, BlockHash, BlockSource};
use super::{Delta, ZeroHashes, BLOCK_BYTES};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// The hashes of a run of chunks, by first block.
type Hashed = Vec<(u64, Vec<BlockHash>)>;

/// The hash of every block of `side`, in block order, and the bytes read for them (holes
/// take the hash of zeros without a read).
pub fn block_hashes(side: &dyn BlockSource) -> Result<(Vec<BlockHash>, u64)> {
    let size = side.size_bytes();
    let runs = block_runs(&side.data_ranges()?, size);
    let all = chunks(&[(0, size.div_ceil(BLOCK_BYTES))]);
    let zero = ZeroHashes::new(size);
    let next = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let threads = threads_for(all.len());
    let results: Vec<Result<Hashed>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Hashed> {
                    let mut buf = Vec::new();
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(&c) = all.get(i) else {
                            return Ok(out);
                        };
                        let mut h = Vec::new();
                        read.fetch_add(
                            hash_chunk(side, &runs, c, &mut buf, &zero, &mut h)?,
                            Ordering::Relaxed,
                        );
                        out.push((c.first, h));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a hashing thread panicked".into())))
            })
            .collect()
    });
    let mut parts = Vec::new();
    for r in results {
        parts.extend(r?);
    }
    parts.sort_unstable_by_key(|p| p.0);
    let hashes: Vec<BlockHash> = parts.into_iter().flat_map(|p| p.1).collect();
    Ok((hashes, read.into_inner()))
}

/// Compare `side` with the block hashes of another disk of its size: the blocks whose
/// hashes differ.
pub fn compare_with_hashes(side: &dyn BlockSource, other: &[BlockHash]) -> Result<Delta> {
    let size = side.size_bytes();
    let n = size.div_ceil(BLOCK_BYTES);
    if other.len() as u64 != n {
        return Err(Error::Invalid(format!(
            "{} block hashes for a disk of {size} bytes ({n} blocks)",
            other.len()
        )));
    }
    let (mine, compared_bytes) = block_hashes(side)?;
    let mut changed: Vec<(u64, u64)> = Vec::new();
    for (b, (x, y)) in mine.iter().zip(other).enumerate() {
        if x == y {
            continue;
        }
        let (off, len) = (b as u64 * BLOCK_BYTES, block_len(b as u64, size));
        match changed.last_mut() {
            Some(r) if r.0 + r.1 == off => r.1 += len,
            _ => changed.push((off, len)),
        }
    }
    Ok(Delta {
        changed,
        compared_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{compare, FileImage};
    use std::io::Write;

    fn image(dir: &std::path::Path, name: &str, bytes: &[u8]) -> FileImage {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        FileImage::open(&p, bytes.len() as u64).unwrap()
    }

    #[test]
    fn hashes_find_what_a_two_sided_comparison_finds() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * BLOCK_BYTES + 4096; // a short last block
        let mut a = vec![0u8; size as usize];
        for (i, b) in a.iter_mut().enumerate().skip(BLOCK_BYTES as usize) {
            *b = (i % 251) as u8;
        }
        let mut b = a.clone();
        b[10] = 1; // block 0: a hole in a, data in b
        b[3 * BLOCK_BYTES as usize + 7] ^= 0xff;
        b[size as usize - 1] ^= 1; // the short block
        let (ia, ib) = (image(dir.path(), "a", &a), image(dir.path(), "b", &b));
        let (hb, _) = block_hashes(&ib).unwrap();
        assert_eq!(hb.len() as u64, size.div_ceil(BLOCK_BYTES));
        let by_hashes = compare_with_hashes(&ia, &hb).unwrap();
        assert_eq!(by_hashes.changed, compare(&ia, &ib).unwrap().changed);
        assert_eq!(
            by_hashes.changed,
            vec![
                (0, BLOCK_BYTES),
                (3 * BLOCK_BYTES, BLOCK_BYTES),
                (5 * BLOCK_BYTES, 4096)
            ]
        );
        assert!(compare_with_hashes(&ia, &hb[1..]).is_err());
    }
}
