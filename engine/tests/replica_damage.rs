//! Damage and format tests through the public API: every on-disk structure's decoder
//! round-trips and refuses flipped bytes; damage inside a live replica is reported with the
//! file, the offset and the points that read it, never returned as data.

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
fn a_damaged_index_or_manifest_refuses_to_open_and_says_where() {
    for victim in ["layers", "manifest"] {
        let fs = SimFs::new();
        let mut r = replica(&fs);
        write(&mut r, 1, 0, 0, 4096, 1);
        r.cut_point(PointKind::CrashConsistent, None).unwrap();
        drop(r);
        let p = if victim == "manifest" {
            Path::new(DIR).join("manifest")
        } else {
            let dir = Path::new(DIR).join("layers");
            let name = fs.list(&dir).unwrap().into_iter().next().unwrap();
            dir.join(name)
        };
        flip(&fs, &p, 70);
        match Replica::open(Arc::new(fs.clone()), DIR, ReplicaConfig::default()) {
            Err(Error::Corrupt { path, .. }) => assert_eq!(path, p),
            Err(e) => panic!("{victim}: expected corruption, got {e}"),
            Ok(_) => panic!("{victim}: opened a damaged replica"),
        }
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
