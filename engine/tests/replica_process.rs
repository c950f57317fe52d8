//! The processor end to end over a real change log: points at markers and at the
//! crash-consistent interval (in record time), the log's checkpoint following what is
//! durable in the replica, and a power cut at every sync of a pass healed by processing
//! again into exactly the same replica and points.

use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::policy::Policy;
use standby_engine::process::Processor;
use standby_engine::record::{Consistency, Entry, Marker, MarkerKind};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::SimFs;
use std::sync::Arc;
use std::time::Duration;

const CACHE: &str = "/vault/cache/vm";
const REPLICA: &str = "/vault/replica/vm";
const DISK: u64 = 1 << 20;

fn open_cache(fs: &SimFs) -> Arc<Cache> {
    Arc::new(
        Cache::open_with(Arc::new(fs.clone()), CACHE, CacheConfig::default())
            .unwrap()
            .0,
    )
}

fn disks() -> Vec<DiskSpec> {
    vec![DiskSpec {
        name: "os".into(),
        size_bytes: DISK,
    }]
}

fn policy(crash_interval: Duration) -> Policy {
    Policy {
        crash_interval,
        ..Policy::default()
    }
}

/// Processor whose wall clock stands still at 0: only record times and markers cut points.
fn processor(fs: &SimFs, cache: Arc<Cache>, create: bool, interval: Duration) -> Processor {
    let vfs = Arc::new(fs.clone());
    let cfg = ReplicaConfig {
        data_file_max_bytes: 64 << 10,
        ..ReplicaConfig::default()
    };
    let replica = if create {
        Replica::create(vfs, REPLICA, &disks(), cfg).unwrap()
    } else {
        Replica::open(vfs, REPLICA, cfg).unwrap().0
    };
    Processor::new(cache, replica, policy(interval))
        .unwrap()
        .with_clock(|| 0)
}

struct Workload {
    model: Vec<u8>,
    x: u64,
}

impl Workload {
    fn writes(&mut self, cache: &Cache, n: usize) {
        for _ in 0..n {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let offset = (self.x % (DISK / 512 - 16)) * 512;
            let len = 512 * (1 + (self.x >> 20) % 16) as usize;
            let data: Vec<u8> = (0..len).map(|i| (self.x >> (i % 8)) as u8).collect();
            self.model[offset as usize..offset as usize + len].copy_from_slice(&data);
            cache
                .append(&Entry::Write {
                    disk: 0,
                    offset,
                    data: &data,
                })
                .unwrap();
        }
    }
}

fn marker(cache: &Cache, consistency: Consistency, name: &str) -> u64 {
    cache
        .append(&Entry::Marker(&Marker {
            consistency,
            name: Some(name.into()),
            group: None,
            kind: standby_engine::record::MarkerKind::Point,
        }))
        .unwrap()
}

fn read_disk(r: &Replica, point: Option<u64>) -> Vec<u8> {
    let v = match point {
        Some(id) => r.view_point(id).unwrap(),
        None => r.view_latest().unwrap(),
    };
    let mut buf = vec![0u8; DISK as usize];
    v.read(0, 0, &mut buf).unwrap();
    buf
}

#[test]
fn markers_cut_points_and_the_checkpoint_follows_durability() {
    let fs = SimFs::new();
    let cache = open_cache(&fs);
    let mut w = Workload {
        model: vec![0u8; DISK as usize],
        x: 5,
    };
    w.writes(&cache, 100);
    let m1 = marker(&cache, Consistency::App, "app-1");
    let at_m1 = w.model.clone();
    w.writes(&cache, 50);
    cache.sync().unwrap();
    let mut p = processor(&fs, cache.clone(), true, Duration::from_secs(3600));
    let report = p.run_pass().unwrap();
    assert_eq!(report.applied, 151);
    assert_eq!(report.points.len(), 1);
    assert_eq!(report.points[0].seq, m1);
    assert_eq!(report.points[0].kind, PointKind::AppConsistent);
    assert_eq!(report.points[0].name.as_deref(), Some("app-1"));
    assert_eq!(report.durable_seq, 151);
    assert_eq!(cache.stats().checkpoint, 151);
    let r = p.replica();
    assert_eq!(read_disk(r, Some(report.points[0].id)), at_m1);
    assert_eq!(read_disk(r, None), w.model);
    // A second pass with nothing new does nothing.
    let again = p.run_pass().unwrap();
    assert_eq!((again.applied, again.points.len()), (0, 0));
    // The initial-point API.
    let initial = p.cut_point(PointKind::Initial, Some("initial")).unwrap();
    assert_eq!(initial.seq, 151);
}

#[test]
fn the_crash_interval_is_measured_in_record_time() {
    let fs = SimFs::new();
    let cache = open_cache(&fs);
    let mut w = Workload {
        model: vec![0u8; DISK as usize],
        x: 9,
    };
    w.writes(&cache, 20);
    cache.sync().unwrap();
    let before_gap = w.model.clone();
    std::thread::sleep(Duration::from_millis(1100));
    w.writes(&cache, 20);
    cache.sync().unwrap();
    let mut p = processor(&fs, cache.clone(), true, Duration::from_secs(1));
    let report = p.run_pass().unwrap();
    assert_eq!(report.points.len(), 1, "{:?}", report.points);
    let pt = &report.points[0];
    assert_eq!((pt.seq, pt.kind), (20, PointKind::CrashConsistent));
    assert_eq!(read_disk(p.replica(), Some(pt.id)), before_gap);
}

#[test]
fn a_power_cut_at_any_sync_of_a_pass_is_healed_by_processing_again() {
    // The reference: one clean pass.
    let build = |fs: &SimFs| {
        let cache = open_cache(fs);
        let mut w = Workload {
            model: vec![0u8; DISK as usize],
            x: 77,
        };
        for i in 0..4 {
            w.writes(&cache, 40);
            let c = if i % 2 == 0 {
                Consistency::Crash
            } else {
                Consistency::App
            };
            marker(&cache, c, &format!("m{i}"));
        }
        w.writes(&cache, 30);
        cache.sync().unwrap();
        (cache, w.model)
    };
    let fs = SimFs::new();
    let (cache, model) = build(&fs);
    let mut p = processor(&fs, cache, true, Duration::from_secs(3600));
    p.run_pass().unwrap();
    let reference = p.replica().points();
    let ref_states: Vec<Vec<u8>> = reference
        .iter()
        .map(|pt| read_disk(p.replica(), Some(pt.id)))
        .collect();
    assert_eq!(reference.len(), 4);
    assert_eq!(read_disk(p.replica(), None), model);
    let syncs_of_a_pass = {
        let fs = SimFs::new();
        let (cache, _) = build(&fs);
        let mut p = processor(&fs, cache, true, Duration::from_secs(3600));
        let before = fs.sync_count();
        p.run_pass().unwrap();
        fs.sync_count() - before
    };
    assert!(syncs_of_a_pass > 10);
    for cut in 1..=syncs_of_a_pass {
        for torn in [0usize, 3000] {
            let fs = SimFs::new();
            let (cache, _) = build(&fs);
            let mut p = processor(&fs, cache, true, Duration::from_secs(3600));
            fs.fail_at_sync(cut);
            assert!(p.run_pass().is_err(), "cut {cut}");
            drop(p);
            let after = fs.crash(torn);
            let cache = open_cache(&after);
            let mut p = processor(&after, cache.clone(), false, Duration::from_secs(3600));
            p.run_pass().unwrap();
            let points = p.replica().points();
            let key = |v: &[standby_engine::replica::PointInfo]| {
                v.iter()
                    .map(|p| (p.id, p.seq, p.kind, p.name.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                key(&points),
                key(&reference),
                "cut at sync {cut}, torn {torn}"
            );
            for (pt, want) in points.iter().zip(&ref_states) {
                assert_eq!(&read_disk(p.replica(), Some(pt.id)), want, "cut {cut}");
            }
            assert_eq!(read_disk(p.replica(), None), model, "cut {cut}");
            assert_eq!(cache.stats().checkpoint, p.replica().durable_seq());
            assert!(p.replica().verify().unwrap().is_clean());
        }
    }
}

fn agent_marker(cache: &Cache, kind: MarkerKind) -> u64 {
    cache
        .append(&Entry::Marker(&Marker {
            consistency: Consistency::Crash,
            name: None,
            group: None,
            kind,
        }))
        .unwrap()
}

#[test]
fn the_resync_window_is_typed_and_survives_a_power_cut() {
    let fs = SimFs::new();
    let cache = open_cache(&fs);
    let mut w = Workload {
        model: vec![0u8; DISK as usize],
        x: 31,
    };
    // A user's point can never open the window: its name is refused before it is logged.
    let user = Marker {
        consistency: Consistency::Crash,
        name: Some("standby:resync-begin".into()),
        group: None,
        kind: MarkerKind::Point,
    };
    assert!(matches!(
        cache.append(&Entry::Marker(&user)),
        Err(standby_engine::Error::Invalid(_))
    ));
    w.writes(&cache, 10);
    agent_marker(&cache, MarkerKind::ResyncBegin);
    w.writes(&cache, 10);
    cache.sync().unwrap();
    let mut p = processor(&fs, cache.clone(), true, Duration::from_secs(3600));
    let report = p.run_pass().unwrap();
    assert!(report.points.is_empty(), "{:?}", report.points);
    assert!(p.in_resync());
    // The window is kept beside the replica through the I/O seam: a power cut keeps it.
    drop(p);
    let after = fs.crash(0);
    let cache = open_cache(&after);
    let mut p = processor(&after, cache.clone(), false, Duration::from_secs(3600));
    assert!(p.in_resync());
    let end = agent_marker(&cache, MarkerKind::ResyncEnd);
    cache.sync().unwrap();
    let report = p.run_pass().unwrap();
    assert!(!p.in_resync());
    let cut: Vec<_> = report
        .points
        .iter()
        .map(|pt| (pt.seq, pt.name.clone()))
        .collect();
    assert_eq!(cut, vec![(end, Some("resync".to_string()))]);
    assert_eq!(read_disk(p.replica(), None), w.model);
}
