//! Damage and format tests through the public API: every on-disk structure's decoder
//! round-trips and refuses flipped bytes; damage inside a live replica is reported with the
//! file, the offset and the points that read it, never returned as data.

use standby_engine::policy::Policy;
use standby_engine::record::{Op, Record};
use standby_engine::replica::datafile::{decode_data_header, DataHeader};
use standby_engine::replica::extent::{decode_extent, encode_data, encode_zero};
use standby_engine::replica::index::{decode_layer_index, Entry, LayerIndex, Loc};
use standby_engine::replica::manifest::decode_manifest;
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::{SimFs, Vfs};
use standby_engine::Error;
use std::path::Path;
use std::sync::Arc;

const DIR: &str = "/r";

fn flips_are_caught(bytes: &[u8], decode: impl Fn(&[u8]) -> bool) {
    assert!(decode(bytes), "the intact bytes decode");
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.to_vec();
            b[i] ^= 1 << bit;
            assert!(!decode(&b), "flip of bit {bit} at byte {i} went unnoticed");
        }
    }
    for cut in 0..bytes.len() {
        assert!(!decode(&bytes[..cut]), "cut at {cut} went unnoticed");
    }
    assert!(!decode(&vec![0u8; bytes.len()]), "zeros decode");
}

#[test]
fn every_decoder_refuses_flipped_bytes() {
    flips_are_caught(&DataHeader::new(3, 1 << 20).encode(), |b| {
        decode_data_header(b).is_ok()
    });
    let mut frame = Vec::new();
    encode_data(&mut frame, 3, 0, 4096, 9, 10, &[7u8; 1024], true);
    flips_are_caught(&frame, |b| decode_extent(b, 3).is_ok());
    let mut zero = Vec::new();
    encode_zero(&mut zero, 3, 1, 0, 1 << 20, 9, 10, false);
    flips_are_caught(&zero, |b| decode_extent(b, 3).is_ok());
    let layer = LayerIndex {
        layer_id: 5,
        base_seq: 0,
        end_seq: 9,
        exact_from: 0,
        compat: 0,
        entries: vec![Entry {
            disk: 0,
            offset: 4096,
            len: 1024,
            seq: 9,
            time_us: 10,
            loc: Loc::Data {
                file_id: 3,
                frame_offset: 40,
                frame_len: frame.len() as u32,
                skip: 0,
            },
        }],
    };
    flips_are_caught(&layer.encode(), |b| decode_layer_index(b).is_ok());
    // A real manifest, with a point, a name and two disks.
    let fs = SimFs::new();
    let mut r = replica(&fs);
    write(&mut r, 1, 0, 0, 4096, 1);
    r.cut_point(PointKind::AppConsistent, Some("named"))
        .unwrap();
    let bytes = read_file(&fs, &Path::new(DIR).join("manifest"));
    flips_are_caught(&bytes, |b| decode_manifest(b).is_ok());
}

fn replica(fs: &SimFs) -> Replica {
    let disks = [
        DiskSpec {
            name: "os".into(),
            size_bytes: 1 << 30,
        },
        DiskSpec {
            name: "data".into(),
            size_bytes: 1 << 20,
        },
    ];
    let cfg = ReplicaConfig {
        compress: false,
        ..ReplicaConfig::default()
    };
    Replica::create(Arc::new(fs.clone()), DIR, &disks, cfg).unwrap()
}

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

fn read_file(fs: &SimFs, p: &Path) -> Vec<u8> {
    let f = fs.open(p).unwrap();
    let mut b = vec![0u8; f.len().unwrap() as usize];
    f.read_full_at(&mut b, 0).unwrap();
    b
}

fn flip(fs: &SimFs, p: &Path, at: u64) {
    let f = fs.open(p).unwrap();
    let mut b = [0u8];
    f.read_full_at(&mut b, at).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn a_damaged_extent_is_an_error_naming_file_offset_and_points() {
    let fs = SimFs::new();
    let mut r = replica(&fs);
    write(&mut r, 1, 0, 0, 8192, 1);
    let p1 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 2, 0, 1 << 20, 4096, 2);
    let p2 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 3, 0, 0, 8192, 3); // shadows the first write from p3 on
    let p3 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    assert!(r.verify().unwrap().is_clean());
    // The first frame starts right after the 40-byte data-file header.
    let data = Path::new(DIR).join("data").join(format!("{:016x}.dat", 1));
    flip(&fs, &data, 40 + 48 + 100);
    let v = r.view_point(p1.id).unwrap();
    let mut buf = vec![0u8; 4096];
    match v.read(0, 0, &mut buf) {
        Err(Error::Corrupt { path, offset, .. }) => {
            assert_eq!(path, data);
            assert_eq!(offset, 40);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // Point 3 does not read the damaged frame and stays good.
    r.view_point(p3.id).unwrap().read(0, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![3u8; 4096]);
    let report = r.verify().unwrap();
    assert_eq!(report.damage.len(), 1, "{report:?}");
    let d = &report.damage[0];
    assert_eq!((d.path.clone(), d.offset), (data, 40));
    assert_eq!(d.points, vec![p1.id, p2.id]);
    assert!(!d.latest);
}

#[test]
fn a_damaged_manifest_refuses_to_open_and_says_where() {
    let fs = SimFs::new();
    let mut r = replica(&fs);
    write(&mut r, 1, 0, 0, 4096, 1);
    r.cut_point(PointKind::CrashConsistent, None).unwrap();
    drop(r);
    let p = Path::new(DIR).join("manifest");
    flip(&fs, &p, 70);
    match Replica::open(Arc::new(fs.clone()), DIR, ReplicaConfig::default()) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, p),
        Err(e) => panic!("expected corruption, got {e}"),
        Ok(_) => panic!("opened a replica with a damaged manifest"),
    }
}

fn write_at(r: &mut Replica, seq: u64, time_us: u64, offset: u64, len: usize, fill: u8) {
    r.apply(&Record {
        seq,
        time_us,
        op: Op::Write {
            disk: 1,
            offset,
            data: vec![fill; len],
        },
    })
    .unwrap();
}

/// Every byte of disk 1 (1 MiB) at a point.
fn disk1_at(r: &Replica, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    r.view_point(id).unwrap().read(1, 0, &mut buf).unwrap();
    buf
}

fn files_under(fs: &SimFs, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = fs.list(dir).unwrap();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let b = read_file(fs, &dir.join(&n));
            (n, b)
        })
        .collect()
}

/// A layer index with one flipped byte spoils the points that read that layer (its point
/// and every later one, through merged layers too) and nothing else: the replica opens,
/// the earlier points read bit-exact, later ones and the latest state are refused naming
/// the file, verify reports it, and nothing is applied, cut, pruned or removed.
#[test]
fn a_damaged_layer_index_spoils_only_the_points_that_read_it() {
    const HOUR_US: u64 = 3_600_000_000;
    let fs = SimFs::new();
    let mut r = replica(&fs);
    // p1 (app) and p2 in hour 0, p3 (app) and p4 in hour 1, p5 in hour 10: thinning
    // merges p2 into p3's layer and p4 into p5's.
    let plan: [(u64, u64, bool); 5] = [
        (1, 60_000_000, true),
        (2, 120_000_000, false),
        (3, HOUR_US + 60_000_000, true),
        (4, HOUR_US + 120_000_000, false),
        (5, 10 * HOUR_US, false),
    ];
    let mut ids = Vec::new();
    for (seq, t, app) in plan {
        write_at(&mut r, seq, t, seq * 65536, 65536 + 4096, seq as u8);
        let kind = if app {
            PointKind::AppConsistent
        } else {
            PointKind::CrashConsistent
        };
        ids.push(r.cut_point(kind, None).unwrap().id);
    }
    let report = r
        .prune(&Policy::default(), 10 * HOUR_US + 60_000_000)
        .unwrap();
    assert_eq!(report.pruned_points, vec![ids[1], ids[3]]);
    let (p1, p3, p5) = (ids[0], ids[2], ids[4]);
    let kept: Vec<u64> = r.points().iter().map(|p| p.id).collect();
    assert_eq!(kept, vec![p1, p3, p5]);
    let before: Vec<Vec<u8>> = kept.iter().map(|id| disk1_at(&r, *id)).collect();
    r.close().unwrap();

    // p3's layer is the merged one: the second index file.
    let layers = Path::new(DIR).join("layers");
    let mut names = fs.list(&layers).unwrap();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    let victim = layers.join(&names[1]);
    flip(&fs, &victim, 64 + 30);
    let data_dir = Path::new(DIR).join("data");
    let data_before = files_under(&fs, &data_dir);

    let (mut r, _) = Replica::open(Arc::new(fs.clone()), DIR, ReplicaConfig::default())
        .expect("a damaged layer index is contained, not fatal");
    let damage = r.damage();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].path, victim);
    assert_eq!(damage[0].offset, 64);
    assert!(damage[0].what.contains("checksum"), "{}", damage[0].what);
    assert_eq!(damage[0].points, vec![p3, p5]);
    assert!(damage[0].latest);
    assert_eq!(r.unreadable_points(), vec![p3, p5]);
    // Every point is still listed; the intact one reads bit-exact.
    let listed: Vec<u64> = r.points().iter().map(|p| p.id).collect();
    assert_eq!(listed, vec![p1, p3, p5]);
    assert_eq!(disk1_at(&r, p1), before[0]);
    let names_victim = |e: Error| match e {
        Error::Corrupt { path, .. } => assert_eq!(path, victim),
        other => panic!("expected the damage, got {other}"),
    };
    for id in [p3, p5] {
        names_victim(r.view_point(id).err().expect("a spoiled point is refused"));
    }
    names_victim(r.view_latest().err().expect("the latest state is refused"));
    names_victim(
        r.view_seq(3)
            .err()
            .expect("a seq inside the layer is refused"),
    );
    assert!(r.is_viewable(1) && !r.is_viewable(3) && !r.is_viewable(5));
    assert!(r.viewable_ranges().iter().all(|(_, b)| *b <= 1));
    names_victim(r.view_time(HOUR_US + 90_000_000).err().unwrap());
    assert_eq!(r.view_time(90_000_000).unwrap().seq(), 1);
    // Verify reports it as it reports data damage.
    let v = r.verify().unwrap();
    assert!(!v.is_clean());
    assert_eq!(v.damage, damage);
    // Read-only: nothing changes the replica, each refusal names the damage.
    let rec = Record {
        seq: 6,
        time_us: 11 * HOUR_US,
        op: Op::Write {
            disk: 1,
            offset: 0,
            data: vec![9; 512],
        },
    };
    names_victim(r.apply(&rec).unwrap_err());
    names_victim(r.cut_point(PointKind::CrashConsistent, None).unwrap_err());
    names_victim(r.prune(&Policy::default(), 100 * HOUR_US).unwrap_err());
    names_victim(r.flush().unwrap_err());
    drop(r);
    assert_eq!(
        files_under(&fs, &data_dir),
        data_before,
        "data files were changed"
    );
    // Reopening finds the same, and the intact point is still bit-exact.
    let (r, _) = Replica::open(Arc::new(fs.clone()), DIR, ReplicaConfig::default()).unwrap();
    assert_eq!(r.damage(), damage);
    assert_eq!(disk1_at(&r, p1), before[0]);
}

/// A layer index that is missing, or damaged in the oldest layer, is contained the same
/// way; with the oldest layer damaged no point is readable, but the replica still opens.
#[test]
fn a_missing_or_bottom_layer_index_is_contained_too() {
    for missing in [true, false] {
        let fs = SimFs::new();
        let mut r = replica(&fs);
        write(&mut r, 1, 1, 0, 4096, 1);
        let p1 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
        write(&mut r, 2, 1, 4096, 4096, 2);
        let p2 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
        drop(r);
        let dir = Path::new(DIR).join("layers");
        let mut names = fs.list(&dir).unwrap();
        names.sort();
        let victim = dir.join(&names[0]);
        if missing {
            fs.remove(&victim).unwrap();
        } else {
            flip(&fs, &victim, 20);
        }
        let (r, _) = Replica::open(Arc::new(fs.clone()), DIR, ReplicaConfig::default()).unwrap();
        let damage = r.damage();
        assert_eq!(damage.len(), 1);
        assert_eq!((damage[0].path.clone(), damage[0].offset), (victim, 0));
        assert_eq!(damage[0].points, vec![p1.id, p2.id]);
        assert!(r.view_point(p1.id).is_err() && r.view_point(p2.id).is_err());
        assert_eq!(r.points().len(), 2);
    }
}

#[test]
fn writes_past_the_end_of_a_disk_are_refused_and_nothing_is_applied() {
    let fs = SimFs::new();
    let mut r = replica(&fs);
    for (disk, offset, len) in [
        (1u16, (1 << 20) - 512, 1024usize),
        (1, 1 << 20, 512),
        (2, 0, 512),
    ] {
        let e = r
            .apply(&Record {
                seq: 1,
                time_us: 1,
                op: Op::Write {
                    disk,
                    offset,
                    data: vec![1; len],
                },
            })
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
    let e = r
        .apply(&Record {
            seq: 1,
            time_us: 1,
            op: Op::Zero {
                disk: 0,
                offset: 1 << 30,
                len: 512,
                trim: true,
            },
        })
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    assert_eq!(r.applied_seq(), 0);
    // The replica still works after a refused record.
    write(&mut r, 1, 1, 0, 512, 9);
    assert_eq!(r.flush().unwrap(), 1);
}

/// Verify of a replica with a damaged layer index still checks every frame the intact
/// layers and the open layer reference, and names the intact points a damaged frame spoils.
#[test]
fn verify_reports_frame_damage_beside_a_damaged_layer() {
    let fs = SimFs::new();
    let mut r = replica(&fs);
    write(&mut r, 1, 0, 0, 8192, 1);
    let p1 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 2, 0, 1 << 20, 4096, 2);
    let p2 = r.cut_point(PointKind::CrashConsistent, None).unwrap();
    write(&mut r, 3, 0, 2 << 20, 4096, 3); // the open layer
    r.close().unwrap();
    let data = Path::new(DIR).join("data").join(format!("{:016x}.dat", 1));
    flip(&fs, &data, 40 + 48 + 100); // p1's frame
    let layers = Path::new(DIR).join("layers");
    let mut names = fs.list(&layers).unwrap();
    names.sort();
    let victim = layers.join(&names[1]); // p2's layer
    flip(&fs, &victim, 30);
    let (r, _) = Replica::open(Arc::new(fs.clone()), DIR, ReplicaConfig::default()).unwrap();
    let report = r.verify().unwrap();
    assert_eq!(report.damage.len(), 2, "{report:?}");
    let layer = report.damage.iter().find(|d| d.path == victim).unwrap();
    assert_eq!((layer.points.clone(), layer.latest), (vec![p2.id], true));
    let frame = report.damage.iter().find(|d| d.path == data).unwrap();
    assert_eq!((frame.offset, frame.points.clone()), (40, vec![p1.id]));
    assert!(!frame.latest, "the open layer does not read it");
    assert!(report.frames_checked >= 2, "{report:?}");
}
