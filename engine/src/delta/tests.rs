use super::*;
use std::collections::BTreeMap;

/// A disk in memory: sparse pieces over zeros, with the data ranges it reports.
struct Mem {
    size: u64,
    pieces: BTreeMap<u64, Vec<u8>>,
    reads: AtomicU64,
}

impl Mem {
    fn new(size: u64) -> Mem {
        Mem {
            size,
            pieces: BTreeMap::new(),
            reads: AtomicU64::new(0),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // Keep pieces disjoint: read the merged bytes back and rewrite one piece.
        let end = offset + data.len() as u64;
        let mut s = offset;
        let mut e = end;
        let over: Vec<u64> = self
            .pieces
            .iter()
            .filter(|(&o, d)| o < end && o + d.len() as u64 > offset)
            .map(|(&o, _)| o)
            .collect();
        for &o in &over {
            s = s.min(o);
            e = e.max(o + self.pieces[&o].len() as u64);
        }
        let mut buf = vec![0u8; (e - s) as usize];
        self.read_at(s, &mut buf).unwrap();
        buf[(offset - s) as usize..(end - s) as usize].copy_from_slice(data);
        for o in over {
            self.pieces.remove(&o);
        }
        self.pieces.insert(s, buf);
    }
    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.read_at(0, &mut v).unwrap();
        v
    }
}

impl BlockSource for Mem {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        Ok(self
            .pieces
            .iter()
            .map(|(&o, d)| (o, o + d.len() as u64))
            .collect())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (&o, d) in &self.pieces {
            let (s, e) = (o.max(offset), (o + d.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        Ok(())
    }
}

/// The blocks whose bytes differ, by direct comparison: the model.
fn model(a: &Mem, b: &Mem) -> Vec<(u64, u64)> {
    let (x, y) = (a.bytes(), b.bytes());
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, (p, q)) in x
        .chunks(BLOCK_BYTES as usize)
        .zip(y.chunks(BLOCK_BYTES as usize))
        .enumerate()
    {
        if p != q {
            let off = i as u64 * BLOCK_BYTES;
            match out.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += p.len() as u64,
                _ => out.push((off, p.len() as u64)),
            }
        }
    }
    out
}

/// A small deterministic generator (tests must not depend on chance).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn every_changed_block_is_found_and_nothing_else() {
    for seed in 0..20u64 {
        let mut g = Lcg(seed);
        // Sizes that end in a short block too.
        let size = (40 + g.next() % 40) * BLOCK_BYTES + (g.next() % 3) * 4096;
        let (mut a, mut b) = (Mem::new(size), Mem::new(size));
        for _ in 0..30 {
            let len = 1 + g.next() % (3 * BLOCK_BYTES);
            let off = g.next() % (size - len);
            let byte = (g.next() % 256) as u8;
            let data = vec![byte; len as usize];
            a.write(off, &data);
            b.write(off, &data);
        }
        for _ in 0..(g.next() % 8) {
            let len = 1 + g.next() % 5000;
            let off = g.next() % (size - len);
            let data: Vec<u8> = (0..len).map(|_| g.next() as u8).collect();
            if g.next().is_multiple_of(2) {
                a.write(off, &data);
            } else {
                b.write(off, &data);
            }
        }
        let d = compare(&a, &b).unwrap();
        assert_eq!(d.changed, model(&a, &b), "seed {seed}");
    }
}

#[test]
fn holes_and_written_zeros_are_equal() {
    let size = 8 * BLOCK_BYTES;
    let (mut a, b) = (Mem::new(size), Mem::new(size));
    a.write(BLOCK_BYTES, &vec![0u8; 3 * BLOCK_BYTES as usize]);
    let d = compare(&a, &b).unwrap();
    assert!(d.changed.is_empty());
    // Only a's written blocks were read and hashed.
    assert_eq!(d.compared_bytes, 3 * BLOCK_BYTES);
}

#[test]
fn cost_follows_the_data_not_the_virtual_size() {
    let size = 1u64 << 40; // 1 TiB, two blocks of data
    let (mut a, mut b) = (Mem::new(size), Mem::new(size));
    a.write(5 * BLOCK_BYTES, &[7u8; 100]);
    b.write(5 * BLOCK_BYTES, &[7u8; 100]);
    b.write(size - BLOCK_BYTES, &[9u8; 10]);
    a.reads.store(0, Ordering::Relaxed);
    b.reads.store(0, Ordering::Relaxed);
    let d = compare(&a, &b).unwrap();
    assert_eq!(d.changed, vec![(size - BLOCK_BYTES, BLOCK_BYTES)]);
    // a's hole at the end was not read: only a's block 5, b's blocks 5 and last.
    assert_eq!(a.reads.load(Ordering::Relaxed), BLOCK_BYTES);
    assert_eq!(b.reads.load(Ordering::Relaxed), 2 * BLOCK_BYTES);
    assert_eq!(d.compared_bytes, 3 * BLOCK_BYTES);
}

#[test]
fn a_comparison_within_ranges_looks_only_there() {
    let size = 10 * BLOCK_BYTES;
    let (mut a, mut b) = (Mem::new(size), Mem::new(size));
    a.write(0, &[1u8; 10]);
    b.write(0, &[2u8; 10]);
    a.write(6 * BLOCK_BYTES, &[1u8; 10]);
    b.write(6 * BLOCK_BYTES + 100, &[2u8; 10]);
    let only = [(6 * BLOCK_BYTES + 5, 6 * BLOCK_BYTES + 6)];
    let d = compare_within(&a, &b, Some(&only)).unwrap();
    assert_eq!(d.changed, vec![(6 * BLOCK_BYTES, BLOCK_BYTES)]);
    assert_eq!(d.compared_bytes, 2 * BLOCK_BYTES);
}

#[test]
fn disks_of_different_sizes_are_refused() {
    let e = compare(&Mem::new(BLOCK_BYTES), &Mem::new(2 * BLOCK_BYTES)).unwrap_err();
    assert!(e.to_string().contains("different") || e.to_string().contains("bytes"));
}

#[test]
fn an_image_file_reports_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.raw");
    let size = 64 * BLOCK_BYTES;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&[3u8; 10], 40 * BLOCK_BYTES).unwrap();
    drop(f);
    let img = FileImage::open(&path, size).unwrap();
    let mut m = Mem::new(size);
    m.write(40 * BLOCK_BYTES, &[3u8; 10]);
    let d = compare(&img, &m).unwrap();
    assert!(d.changed.is_empty());
    m.write(2, &[1]);
    let d = compare(&img, &m).unwrap();
    assert_eq!(d.changed, vec![(0, BLOCK_BYTES)]);
}
use std::os::unix::fs::FileExt;
