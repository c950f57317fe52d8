//! Views outlive pruning: a view pins the layers it reads, so a prune that merges or
//! coalesces them does not punch the frames the view still needs; once the view is dropped
//! the next prune gives the space back.

use standby_engine::policy::Policy;
use standby_engine::record::{Op, Record};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::SimFs;
use std::sync::Arc;
use std::time::Duration;

const HOUR_US: u64 = 3_600_000_000;

fn write(r: &mut Replica, seq: u64, time_us: u64, offset: u64, fill: u8) {
    r.apply(&Record {
        seq,
        time_us,
        op: Op::Write {
            disk: 0,
            offset,
            data: vec![fill; 4096],
        },
    })
    .unwrap();
}

fn read(v: &standby_engine::replica::View, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    v.read(0, offset, &mut b).unwrap();
    b
}

#[test]
fn a_view_keeps_reading_correct_data_while_its_point_is_pruned() {
    let fs = SimFs::new();
    let disks = [DiskSpec {
        name: "os".into(),
        size_bytes: 1 << 20,
    }];
    let cfg = ReplicaConfig {
        compress: false,
        ..ReplicaConfig::default()
    };
    let mut r = Replica::create(Arc::new(fs.clone()), "/r", &disks, cfg).unwrap();
    // Point 1 at hour 0 writes block 0 twice (the first copy is shadowed inside the layer);
    // point 2 at hour 30 overwrites block 0 again.
    write(&mut r, 1, 0, 0, 1);
    write(&mut r, 2, 1, 0, 2);
    write(&mut r, 3, 2, 8192, 3);
    let p1 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 4, 30 * HOUR_US, 0, 4);
    let p2 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 5, 30 * HOUR_US + 1, 4096, 5); // open layer

    let old = r.view_point(p1.id).unwrap();
    let mid = r.view_seq(1).unwrap(); // inside layer 1, before it is coalesced
    let open = r.view_seq(5).unwrap();
    let policy = Policy {
        any_moment_window: Duration::from_secs(3600),
        ..Policy::default()
    };
    let report = r.prune(&policy, 31 * HOUR_US).unwrap();
    assert_eq!(report.pruned_points, vec![p1.id]);
    assert!(r.view_point(p1.id).is_err());
    assert!(r.view_seq(1).is_err(), "seq 1 was coalesced away");
    // The views still read what they read before.
    assert_eq!(read(&old, 0), vec![2; 4096]);
    assert_eq!(read(&old, 8192), vec![3; 4096]);
    assert_eq!(read(&mid, 0), vec![1; 4096]);
    assert_eq!(read(&open, 4096), vec![5; 4096]);
    assert_eq!(read(&r.view_point(p2.id).unwrap(), 0), vec![4; 4096]);
    assert!(r.verify().unwrap().is_clean());
    // Once they are gone, the frames of seqs 1 and 2 are given back.
    drop((old, mid, open));
    let again = r.prune(&policy, 31 * HOUR_US).unwrap();
    assert!(again.punched_ranges > 0, "{again:?}");
    assert_eq!(read(&r.view_point(p2.id).unwrap(), 8192), vec![3; 4096]);
    assert!(r.verify().unwrap().is_clean());
    // And reopening agrees.
    drop(r);
    let (r, _) =
        Replica::open(Arc::new(fs.process_crash()), "/r", ReplicaConfig::default()).unwrap();
    let v = r.view_latest().unwrap();
    assert_eq!(read(&v, 0), vec![4; 4096]);
    assert_eq!(read(&v, 4096), vec![5; 4096]);
    assert_eq!(read(&v, 8192), vec![3; 4096]);
    let runs = v.extents_in(0, 2048, 1 << 20).unwrap();
    assert_eq!(
        runs.iter().map(|e| (e.offset, e.len)).collect::<Vec<_>>(),
        vec![(2048, 12288 - 2048)]
    );
}

/// A point cut before anything was applied (a remote VM's first `standby point`) is the
/// empty disk as of its cut: retention keeps it like any young point (it took time 0 for
/// 1970 and pruned it at once, while a test failover still named it).
#[test]
fn a_point_of_the_empty_disk_is_young_and_survives_retention() {
    let fs = SimFs::new();
    let disks = [DiskSpec {
        name: "os".into(),
        size_bytes: 1 << 20,
    }];
    let mut r = Replica::create(Arc::new(fs), "/r", &disks, ReplicaConfig::default()).unwrap();
    let before = standby_engine::now_us();
    let p1 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    assert!(p1.time_us >= before, "{p1:?}");
    write(&mut r, 1, standby_engine::now_us(), 0, 1);
    let p2 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    r.prune(&Policy::default(), standby_engine::now_us())
        .unwrap();
    let ids: Vec<u64> = r.points().iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![p1.id, p2.id]);
    assert_eq!(read(&r.view_point(p1.id).unwrap(), 0), vec![0u8; 4096]);
}

/// `read_cached` answers only what is decoded in memory, and then exactly what `read`
/// answers (holes as zeros, pieces of several extents, across an overwrite); it refuses
/// (None) a range with a piece not decoded yet, and names a range past the end as an error.
#[test]
fn a_cached_read_answers_only_decoded_pieces_and_agrees_with_read() {
    let fs = SimFs::new();
    let disks = [DiskSpec {
        name: "os".into(),
        size_bytes: 1 << 20,
    }];
    let mut r =
        Replica::create(Arc::new(fs.clone()), "/r", &disks, ReplicaConfig::default()).unwrap();
    write(&mut r, 1, 0, 0, 1);
    write(&mut r, 2, 1, 8192, 2);
    write(&mut r, 3, 2, 16384, 3);
    r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 4, 3, 10240, 4); // splits seq 2's extent
    let p = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    let v = r.view_point(p.id).unwrap();

    let mut got = vec![0xeeu8; 24576];
    assert!(
        v.read_cached(0, 0, &mut got).is_none(),
        "nothing is decoded yet"
    );
    // Decode the pieces of [0, 12 KiB) only: a range reaching 16 KiB still needs one.
    let mut head = vec![0u8; 12288];
    v.read(0, 0, &mut head).unwrap();
    assert!(v.read_cached(0, 0, &mut got).is_none(), "seq 3 not decoded");
    let mut want = vec![0u8; 24576];
    v.read(0, 0, &mut want).unwrap();
    // Now everything is decoded: the cached read agrees, and with a dirty buffer.
    got.fill(0xee);
    v.read_cached(0, 0, &mut got).unwrap().unwrap();
    assert_eq!(got, want);
    assert_eq!(&got[4096..8192], &[0u8; 4096][..], "a hole reads as zeros");
    assert_eq!(&got[10240..14336], &[4u8; 4096][..]);
    // An unaligned range inside decoded pieces.
    let mut part = vec![0xeeu8; 5000];
    v.read_cached(0, 3000, &mut part).unwrap().unwrap();
    assert_eq!(part, want[3000..8000]);
    // A range only of holes needs no decode.
    let mut hole = vec![0xeeu8; 4096];
    v.read_cached(0, 512 << 10, &mut hole).unwrap().unwrap();
    assert_eq!(hole, vec![0u8; 4096]);
    // Past the end: the error, not a refusal.
    let mut over = vec![0u8; 8192];
    assert!(v
        .read_cached(0, (1 << 20) - 4096, &mut over)
        .unwrap()
        .is_err());
}
