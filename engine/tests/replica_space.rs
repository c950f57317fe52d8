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

/// Materializing on the real filesystem, where whole aligned blocks of a run are written
/// past the page cache and the rest through it: writes at every alignment (sector, odd
/// byte counts, page-straddling), overwrites that split earlier extents, compressible and
/// random data — the image and its sha256 are exactly the model's.
#[test]
fn a_materialized_image_is_exact_at_every_alignment() {
    use sha2::{Digest, Sha256};
    use standby_engine::vfs::Vfs;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replica");
    let size = 48 * MIB + 3 * 512;
    let disks = [DiskSpec {
        name: "os".into(),
        size_bytes: size,
    }];
    let mut r = Replica::create(Arc::new(RealFs), &dir, &disks, ReplicaConfig::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(11);
    let mut seq = 0;
    let mut write = |r: &mut Replica, model: &mut Vec<u8>, offset: u64, data: Vec<u8>| {
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        seq += 1;
        r.apply(&rec(
            seq,
            Op::Write {
                disk: 0,
                offset,
                data,
            },
        ))
        .unwrap();
    };
    // Large base extents (compressible and not), then small writes over them.
    for i in 0..20u64 {
        let len = (2 * MIB + i * 4096 + 512) as usize;
        let mut data = vec![0u8; len];
        if i % 2 == 0 {
            rng.fill(&mut data);
        } else {
            for (k, b) in data.iter_mut().enumerate() {
                *b = (k / 97) as u8;
            }
        }
        let offset = (i * (2 * MIB + 8192) + 512 * (i % 5)).min(size - len as u64);
        write(&mut r, &mut model, offset, data);
    }
    for _ in 0..400 {
        let len = match rng.next() % 4 {
            0 => 512,
            1 => 4096,
            2 => 1 + rng.next() % 9000,
            _ => 64 << 10,
        };
        let offset = rng.next() % (size - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        write(&mut r, &mut model, offset, data);
    }
    let p = r.cut_point(PointKind::Initial, Some("initial")).unwrap();
    let view = r.view_point(p.id).unwrap();
    let out = tmp.path().join("os.raw");
    let stats = view.materialize_at(&RealFs, 0, &out, true).unwrap();
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), model.len());
    let first_diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the image differs from the model");
    let want: [u8; 32] = Sha256::digest(&model).into();
    assert_eq!(stats.sha256, Some(want));
    // And the direct-write file itself, written at mismatched memory/file alignments.
    let f = RealFs
        .create_new_direct(&tmp.path().join("direct.raw"))
        .unwrap();
    let mut expect = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; (1 << 20) + 8192];
    rng.fill(&mut buf);
    for (mem, file, len) in [
        (0, 0, 65536),
        (4096, 8192, 12288),
        (17, 65536, 8192),
        (512, 131072 + 512, 20000),
        (0, 300000, 1),
    ] {
        let aligned = (4096 - buf.as_ptr() as usize % 4096) % 4096;
        let m = aligned + mem;
        f.write_all_at(&buf[m..m + len], file).unwrap();
        expect[file as usize..file as usize + len].copy_from_slice(&buf[m..m + len]);
    }
    f.sync_data().unwrap();
    let got = std::fs::read(tmp.path().join("direct.raw")).unwrap();
    assert_eq!(got[..], expect[..got.len()]);
    assert!(got.len() >= 300001);
}
