//! Space and sparseness on the real filesystem: a replica's cost follows the data written,
//! never the disks' virtual size, and pruning gives back what no retained point reads.

use standby_engine::policy::Policy;
use standby_engine::record::{Op, Record};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::RealFs;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Bytes allocated on disk under `dir` (st_blocks), recursively.
fn allocated(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        if md.is_dir() {
            n += allocated(&e.path());
        } else {
            n += md.blocks() * 512;
        }
    }
    n
}

fn rec(seq: u64, op: Op) -> Record {
    Record {
        seq,
        time_us: 1_700_000_000_000_000 + seq * 1000,
        op,
    }
}

#[test]
fn a_1tib_disk_with_10mib_written_costs_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replica");
    let disks = [DiskSpec {
        name: "os".into(),
        size_bytes: 1 << 40,
    }];
    let mut r = Replica::create(Arc::new(RealFs), &dir, &disks, ReplicaConfig::default()).unwrap();
    let mut rng = Rng(7);
    let mut written = Vec::new();
    for i in 0..160u64 {
        let mut data = vec![0u8; 64 << 10];
        rng.fill(&mut data);
        let offset = (rng.next() % ((1u64 << 40) / (64 << 10))) * (64 << 10);
        written.push((offset, data.clone()));
        r.apply(&rec(
            i + 1,
            Op::Write {
                disk: 0,
                offset,
                data,
            },
        ))
        .unwrap();
    }
    let p = r.cut_point(PointKind::Initial, Some("initial")).unwrap();
    let on_disk = allocated(&dir);
    let memory = r.stats().index_memory_bytes;
    eprintln!("1 TiB disk, 10 MiB written: replica {on_disk} bytes on disk, {memory} bytes of index in memory");
    assert!((10 * MIB..64 * MIB).contains(&on_disk), "{on_disk}");
    assert!(memory < 64 * MIB);

    let view = r.view_point(p.id).unwrap();
    assert_eq!(view.allocated_bytes(0).unwrap(), 10 * MIB);
    let out = tmp.path().join("os.raw");
    let stats = view.materialize(0, &out).unwrap();
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!(md.len(), 1 << 40);
    assert_eq!(stats.written_bytes, 10 * MIB);
    let image_alloc = md.blocks() * 512;
    eprintln!(
        "materialized image: {} bytes allocated of {} virtual",
        image_alloc,
        md.len()
    );
    assert!(
        (10 * MIB..=10 * MIB + MIB).contains(&image_alloc),
        "image allocates {image_alloc}"
    );
    // Spot-check content through the file.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&out).unwrap();
    for (offset, data) in written.iter().take(20) {
        let mut buf = vec![0u8; data.len()];
        f.read_exact_at(&mut buf, *offset).unwrap();
        assert_eq!(&buf, data);
    }
}

/// 10 points of 2,000 random 4 KiB writes each; returns (replica bytes on disk, bytes some
/// retained point still reads, bytes written).
fn ten_points(disk_bytes: u64, compressible: bool, prune: bool) -> (u64, u64, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replica");
    let disks = [DiskSpec {
        name: "data".into(),
        size_bytes: disk_bytes,
    }];
    let mut r = Replica::create(Arc::new(RealFs), &dir, &disks, ReplicaConfig::default()).unwrap();
    let mut rng = Rng(11);
    let mut seq = 0;
    let mut written = 0;
    for _point in 0..10 {
        for _ in 0..2000 {
            let mut data = vec![0u8; 4096];
            if compressible {
                let words = [&b"standby "[..], b"replica ", b"point   ", b"extent  "];
                for c in data.chunks_mut(8) {
                    c.copy_from_slice(words[(rng.next() % 4) as usize]);
                }
            } else {
                rng.fill(&mut data);
            }
            let offset = (rng.next() % (disk_bytes / 4096)) * 4096;
            seq += 1;
            written += 4096;
            r.apply(&rec(
                seq,
                Op::Write {
                    disk: 0,
                    offset,
                    data,
                },
            ))
            .unwrap();
        }
        r.cut_point(PointKind::CrashConsistent, None).unwrap();
    }
    if prune {
        // Everything is older than the window: coalesce every layer.
        let policy = Policy {
            any_moment_window: Duration::ZERO,
            retention: Duration::from_secs(1 << 30),
            thin_after: Duration::from_secs(1 << 30),
            ..Policy::default()
        };
        r.prune(&policy, 1_700_000_000_000_000 + seq * 1000 + 1)
            .unwrap();
    }
    // Bytes some retained point reads: every (block, contents) any point's view holds.
    // Random 4 KiB blocks are unique, so their first 16 bytes identify the write.
    let mut distinct: BTreeSet<(u64, Vec<u8>)> = BTreeSet::new();
    for p in r.points() {
        let v = r.view_point(p.id).unwrap();
        for e in v.extents(0).unwrap() {
            let mut buf = vec![0u8; e.len as usize];
            v.read(0, e.offset, &mut buf).unwrap();
            for (i, c) in buf.chunks(4096).enumerate() {
                distinct.insert((e.offset + i as u64 * 4096, c[..16].to_vec()));
            }
        }
    }
    let needed_bytes = distinct.len() as u64 * 4096;
    let on_disk = allocated(&dir);
    (on_disk, needed_bytes, written)
}

#[test]
fn ten_points_of_random_4k_writes_cost_at_most_1_1x_what_points_read() {
    let (on_disk, needed, written) = ten_points(64 << 30, false, true);
    let ratio = on_disk as f64 / needed as f64;
    eprintln!(
        "64 GiB disk, incompressible: {on_disk} bytes on disk, {needed} bytes read by retained points, {written} written: {ratio:.3}x"
    );
    assert!(ratio <= 1.1, "{ratio}");
}

#[test]
fn overwrites_are_given_back_after_coalescing() {
    // A small disk: many writes overwrite each other inside a layer, and coalescing punches
    // the frames nothing reads.
    let (on_disk, needed, written) = ten_points(64 << 20, false, true);
    let ratio = on_disk as f64 / needed as f64;
    eprintln!(
        "64 MiB disk, incompressible: {on_disk} bytes on disk, {needed} bytes read by retained points, {written} written: {ratio:.3}x"
    );
    assert!(ratio <= 1.1, "{ratio}");
}

#[test]
fn compressible_data_costs_less_than_written() {
    let (on_disk, needed, written) = ten_points(64 << 30, true, true);
    eprintln!("compressible: {on_disk} bytes on disk, {needed} read by points, {written} written");
    assert!(on_disk < written, "{on_disk} >= {written}");
}
