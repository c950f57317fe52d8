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
