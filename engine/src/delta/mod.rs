//! The delta engine: which 64 KiB blocks of two disks differ, found from block hashes
//! computed in parallel on both sides, so that only those blocks are shipped (the resync
//! after a lost dirty bitmap, `diff` between points, re-protect and failback).
//!
//! Cost scales with the data, never with the disks' virtual size: each side reports the
//! ranges that may hold data (SEEK_DATA/SEEK_HOLE of an image, the extent map of a replica
//! view), a block that is a hole on both sides is equal without a read, and a block that is
//! a hole on one side is hashed on the other side only (a hole hashes as zeros). Hashes are
//! xxh3-128 of the block's bytes; a block's hash never depends on how it is stored (a hole
//! and written zeros hash alike).
//!
//! Invariant: a block reported equal has equal bytes on both sides up to a 128-bit hash
//! collision; every block that differs is reported, in offset order.

mod hashes;
mod source;

pub use hashes::{block_hashes, compare_with_hashes};

pub use source::{FileImage, ViewDisk};

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// The unit of comparison and shipping.
pub const BLOCK_BYTES: u64 = 64 << 10;
/// Blocks one worker reads at once from each side (1 MiB: one read call per side).
const CHUNK_BLOCKS: u64 = 16;
/// Most hashing threads per comparison (each side hashes in every one of them).
const MAX_THREADS: usize = 4;

/// A block's hash.
pub type BlockHash = u128;

/// One side of a comparison: a disk of known size that can say where its data may be.
pub trait BlockSource: Sync {
    fn size_bytes(&self) -> u64;
    /// Half-open `(start, end)` byte ranges that may hold non-zero bytes, sorted and
    /// disjoint; everything else reads as zeros.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>>;
    /// Read `buf.len()` bytes at `offset` (inside the disk).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// The hash of `bytes` (a block, or the short last block of a disk).
pub fn hash_block(bytes: &[u8]) -> BlockHash {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// What a comparison found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Byte ranges `(offset, len)` whose blocks differ, in offset order, adjacent blocks
    /// merged. Whole blocks (the last one clipped to the disk).
    pub changed: Vec<(u64, u64)>,
    /// Bytes of the blocks that were hashed, on either side (holes on both sides cost
    /// nothing and are not counted).
    pub compared_bytes: u64,
}

impl Delta {
    /// Total bytes of the changed blocks.
    pub fn changed_bytes(&self) -> u64 {
        self.changed.iter().map(|(_, l)| l).sum()
    }
}

/// Runs of block indexes `[first, end)` that touch any of `ranges` (sorted, disjoint
/// byte ranges), merged.
fn block_runs(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in ranges {
        let e = e.min(size);
        if s >= e {
            continue;
        }
        let (first, end) = (s / BLOCK_BYTES, e.div_ceil(BLOCK_BYTES));
        match out.last_mut() {
            Some(r) if r.1 >= first => r.1 = r.1.max(end),
            _ => out.push((first, end)),
        }
    }
    out
}

/// The union of two sorted lists of block runs.
fn union_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some(r) if r.1 >= s => r.1 = r.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Whether block `b` touches any run of `runs` (sorted), searching from `*at` on (the
/// caller asks in increasing `b`).
fn in_runs(runs: &[(u64, u64)], at: &mut usize, b: u64) -> bool {
    while *at < runs.len() && runs[*at].1 <= b {
        *at += 1;
    }
    *at < runs.len() && runs[*at].0 <= b
}

/// One unit of work: `n` blocks from `first`.
#[derive(Clone, Copy)]
struct Chunk {
    first: u64,
    n: u64,
}

fn chunks(runs: &[(u64, u64)]) -> Vec<Chunk> {
    let mut out = Vec::new();
    for &(s, e) in runs {
        let mut b = s;
        while b < e {
            let n = (e - b).min(CHUNK_BLOCKS);
            out.push(Chunk { first: b, n });
            b += n;
        }
    }
    out
}

/// How many hashing threads a comparison of this many chunks uses.
fn threads_for(chunks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(1, MAX_THREADS).min(chunks.max(1))
}

/// The hashes of the blocks of `chunk` on `side`: blocks outside `runs` (holes on that
/// side) take the hash of zeros without a read. Returns the bytes it read.
fn hash_chunk(
    side: &dyn BlockSource,
    runs: &[(u64, u64)],
    chunk: Chunk,
    buf: &mut Vec<u8>,
    zero: &ZeroHashes,
    out: &mut Vec<BlockHash>,
) -> Result<u64> {
    let size = side.size_bytes();
    out.clear();
    let start = chunk.first * BLOCK_BYTES;
    let end = ((chunk.first + chunk.n) * BLOCK_BYTES).min(size);
    let mut at = 0usize;
    let mut holes = true;
    let mut present = Vec::with_capacity(chunk.n as usize);
    for b in chunk.first..chunk.first + chunk.n {
        let p = in_runs(runs, &mut at, b);
        holes &= !p;
        present.push(p);
    }
    if holes {
        for b in chunk.first..chunk.first + chunk.n {
            out.push(zero.of(block_len(b, size)));
        }
        return Ok(0);
    }
    // One read per run of present blocks: a hole costs nothing, on either side.
    buf.resize((end - start) as usize, 0);
    let mut read = 0u64;
    let mut i = 0usize;
    while i < present.len() {
        if !present[i] {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < present.len() && present[j] {
            j += 1;
        }
        let (s, e) = (
            (chunk.first + i as u64) * BLOCK_BYTES,
            ((chunk.first + j as u64) * BLOCK_BYTES).min(size),
        );
        side.read_at(s, &mut buf[(s - start) as usize..(e - start) as usize])?;
        read += e - s;
        i = j;
    }
    for (i, b) in (chunk.first..chunk.first + chunk.n).enumerate() {
        let len = block_len(b, size);
        let off = (b * BLOCK_BYTES - start) as usize;
        out.push(if present[i] {
            hash_block(&buf[off..off + len as usize])
        } else {
            zero.of(len)
        });
    }
    Ok(read)
}

fn block_len(b: u64, size: u64) -> u64 {
    BLOCK_BYTES.min(size - b * BLOCK_BYTES)
}

/// The hash of a block of zeros of a full block's length and of the disk's short last
/// block, computed once.
struct ZeroHashes {
    full: BlockHash,
    tail: (u64, BlockHash),
}

impl ZeroHashes {
    fn new(size: u64) -> ZeroHashes {
        let zeros = vec![0u8; BLOCK_BYTES as usize];
        let tail = size % BLOCK_BYTES;
        ZeroHashes {
            full: hash_block(&zeros),
            tail: (tail, hash_block(&zeros[..tail as usize])),
        }
    }
    fn of(&self, len: u64) -> BlockHash {
        if len == BLOCK_BYTES {
            self.full
        } else if len == self.tail.0 {
            self.tail.1
        } else {
            hash_block(&vec![0u8; len as usize])
        }
    }
}

/// Compare `a` and `b` (of one size), block by block: both sides hash their blocks in
/// parallel (bounded threads), and a block whose hashes differ is changed.
pub fn compare(a: &dyn BlockSource, b: &dyn BlockSource) -> Result<Delta> {
    compare_within(a, b, None)
}

/// [`compare`], only over the blocks touching `only` (sorted, disjoint byte ranges): the
/// caller knows from metadata that everything else is equal.
pub fn compare_within(
    a: &dyn BlockSource,
    b: &dyn BlockSource,
    only: Option<&[(u64, u64)]>,
) -> Result<Delta> {
    let size = a.size_bytes();
    if b.size_bytes() != size {
        return Err(Error::Invalid(format!(
            "cannot compare disks of {size} and {} bytes",
            b.size_bytes()
        )));
    }
    let runs_a = block_runs(&a.data_ranges()?, size);
    let runs_b = block_runs(&b.data_ranges()?, size);
    let mut work = union_runs(&runs_a, &runs_b);
    if let Some(only) = only {
        work = intersect_runs(&work, &block_runs(only, size));
    }
    let chunks = chunks(&work);
    let zero = ZeroHashes::new(size);
    let next = AtomicU64::new(0);
    let compared = AtomicU64::new(0);
    let threads = threads_for(chunks.len());
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Vec<u64>> {
                    let (mut buf_a, mut buf_b) = (Vec::new(), Vec::new());
                    let (mut ha, mut hb) = (Vec::new(), Vec::new());
                    let mut changed = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(&c) = chunks.get(i) else {
                            return Ok(changed);
                        };
                        let read = hash_chunk(a, &runs_a, c, &mut buf_a, &zero, &mut ha)?
                            + hash_chunk(b, &runs_b, c, &mut buf_b, &zero, &mut hb)?;
                        compared.fetch_add(read, Ordering::Relaxed);
                        for (k, (x, y)) in ha.iter().zip(&hb).enumerate() {
                            if x != y {
                                changed.push(c.first + k as u64);
                            }
                        }
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
    let mut blocks = Vec::new();
    for r in results {
        blocks.extend(r?);
    }
    blocks.sort_unstable();
    let mut changed: Vec<(u64, u64)> = Vec::new();
    for blk in blocks {
        let (off, len) = (blk * BLOCK_BYTES, block_len(blk, size));
        match changed.last_mut() {
            Some(r) if r.0 + r.1 == off => r.1 += len,
            _ => changed.push((off, len)),
        }
    }
    Ok(Delta {
        changed,
        compared_bytes: compared.into_inner(),
    })
}

/// Block runs in both `a` and `b`.
fn intersect_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
