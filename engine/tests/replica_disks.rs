//! A replica's disks over time: a disk added is in no state until it is published, then in
//! every state from its seq on; a grown disk has its old size in every earlier state; an
//! add that was never published is taken over (renamed, resized) by the next one, and its
//! data shows nowhere. Everything survives a reopen (the manifest's disk history).

use standby_engine::record::{Op, Record};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::SimFs;
use std::sync::Arc;

const DIR: &str = "/vault/replica/vm";
const KIB: u64 = 1024;

fn write(r: &mut Replica, seq: u64, disk: u16, offset: u64, len: usize, fill: u8) {
    r.apply(&Record {
        seq,
        time_us: seq,
        op: Op::Write {
            disk,
            offset,
            data: vec![fill; len],
        },
    })
    .unwrap();
}

fn zero(r: &mut Replica, seq: u64, disk: u16, len: u64) {
    r.apply(&Record {
        seq,
        time_us: seq,
        op: Op::Zero {
            disk,
            offset: 0,
            len,
            trim: true,
        },
    })
    .unwrap();
}

fn spec(name: &str, size_bytes: u64) -> DiskSpec {
    DiskSpec {
        name: name.into(),
        size_bytes,
    }
}

/// (name, size) of each disk at `seq`, and every byte of each.
fn state(r: &Replica, seq: u64) -> Vec<(String, Vec<u8>)> {
    let v = r.view_seq(seq).unwrap();
    v.disks()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut b = vec![0u8; d.size_bytes as usize];
            v.read(i as u16, 0, &mut b).unwrap();
            (d.name.clone(), b)
        })
        .collect()
}

#[test]
fn each_state_has_the_disks_and_sizes_it_had_across_reopens() {
    let fs = SimFs::new();
    let vfs: Arc<SimFs> = Arc::new(fs.clone());
    let mut r = Replica::create(
        vfs.clone(),
        DIR,
        &[spec("os", 64 * KIB)],
        ReplicaConfig::default(),
    )
    .unwrap();
    write(&mut r, 1, 0, 0, 4096, 1);
    let p1 = r.cut_point(PointKind::Initial, Some("initial")).unwrap();

    // An add that is never published: its data is in no state, and the next add takes
    // the slot over (a new name and size), zeroing it before its own copy.
    assert!(!r.add_disk(1, spec("junk", 32 * KIB)).unwrap());
    write(&mut r, 2, 1, 0, 8192, 0xee);
    assert_eq!(r.view_latest().unwrap().disks().len(), 1);
    drop(r); // a crash: the slot stays pending
    let mut r = Replica::open(vfs.clone(), DIR, ReplicaConfig::default())
        .unwrap()
        .0;
    assert_eq!(r.disks().len(), 2);
    assert_eq!(state(&r, 2).len(), 1, "a pending disk is in no state");
    let err = r
        .add_disk(1, spec("data", 16 * KIB))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs at least that size"), "{err}");
    assert!(r.add_disk(1, spec("data", 48 * KIB)).unwrap(), "taken over");
    zero(&mut r, 3, 1, 48 * KIB);
    write(&mut r, 4, 1, 4096, 4096, 2);
    r.publish_disk(1, 4).unwrap();
    let p2 = r
        .cut_point(PointKind::CrashConsistent, Some("disk-add"))
        .unwrap();
    assert_eq!(p2.seq, 4);

    // Grown from the next record on.
    let err = r.grow_disk(0, 32 * KIB, 5).unwrap_err().to_string();
    assert!(err.contains("only grow"), "{err}");
    assert!(
        r.grow_disk(0, 128 * KIB, 4).is_err(),
        "not at an applied seq"
    );
    r.grow_disk(0, 128 * KIB, 5).unwrap();
    write(&mut r, 5, 0, 120 * KIB, 8192, 3);
    let p3 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    r.flush().unwrap();
    drop(r);

    let r = Replica::open(vfs, DIR, ReplicaConfig::default()).unwrap().0;
    let mut os = vec![0u8; 64 * KIB as usize];
    os[..4096].fill(1);
    assert_eq!(state(&r, p1.seq), vec![("os".to_string(), os.clone())]);
    assert_eq!(
        state(&r, 3).len(),
        1,
        "the copy is not visible before its point"
    );
    let mut data = vec![0u8; 48 * KIB as usize];
    data[4096..8192].fill(2);
    assert_eq!(
        state(&r, p2.seq),
        vec![
            ("os".to_string(), os.clone()),
            ("data".to_string(), data.clone())
        ],
        "the taken-over disk shows none of the unfinished add's bytes"
    );
    os.resize(128 * KIB as usize, 0);
    os[120 * KIB as usize..].fill(3);
    assert_eq!(
        state(&r, p3.seq),
        vec![("os".to_string(), os), ("data".to_string(), data)]
    );
    assert_eq!(r.disk_grown_at(0), Some(5));
    let history = Replica::read_disk_history(&fs, DIR.as_ref()).unwrap();
    let firsts: Vec<(String, u64, usize)> = history
        .iter()
        .map(|(d, h)| (d.name.clone(), h[0].from_seq, h.len()))
        .collect();
    assert_eq!(
        firsts,
        vec![("os".to_string(), 0, 2), ("data".to_string(), 4, 1)]
    );
}
