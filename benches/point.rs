//! `point`: cutting a recovery point after 1,000 random 4 KiB writes, on a replica whose
//! disk is 1 TiB (virtual) with 10 and with 1,000 existing points, and on a 1 GiB disk
//! with 10 points. The time must not grow with the number of points or the virtual size.
//!
//! Each configuration is a template replica built once (every existing point holds 10
//! random 4 KiB writes). Each timed iteration works on a fresh copy of its template
//! (`cp -a`, directories synced, then `Replica::open`; copies are deleted only at the end,
//! see [`cut`]), so the point count is exactly 10 or 1,000 every time;
//! the 1,000 writes are applied and flushed (`Replica::flush`) before the clock starts, so
//! the time is the cut itself (sealing the open layer's index, the manifest swap), not
//! the data's fdatasync, which is the same for every configuration.
//!
//! Pairs, interleaved: 1 TiB/1,000 points against 1 TiB/10 points, and 1 TiB/10 points
//! against 1 GiB/10 points. Printed: median cut times over each pairing's own pairs and
//! the growth factor (median of per-pair time ratios, bigger over smaller). Target:
//! growth ≤ 1.25 (no growth, within the noise of the disk's fdatasync latency).

mod common;
mod workload;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use standby_engine::record::{Op, Record};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::RealFs;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const WRITES: usize = 1000;
const WRITE_BYTES: usize = 4096;
const WRITES_PER_OLD_POINT: usize = 10;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Apply `n` random 4 KiB writes (data from `pool`) to `r`.
fn write(r: &mut Replica, n: usize, disk_bytes: u64, rng: &mut Rng, pool: &[u8]) {
    let blocks = disk_bytes / WRITE_BYTES as u64;
    let steps = (pool.len() - WRITE_BYTES) / 64;
    for _ in 0..n {
        let at = (rng.next() as usize % steps) * 64;
        let rec = Record {
            seq: r.applied_seq() + 1,
            time_us: now_us(),
            op: Op::Write {
                disk: 0,
                offset: (rng.next() % blocks) * WRITE_BYTES as u64,
                data: pool[at..at + WRITE_BYTES].to_vec(),
            },
        };
        r.apply(&rec).unwrap();
    }
}

/// A template replica with `points` points on a disk of `disk_bytes`.
fn template(dir: &Path, disk_bytes: u64, points: usize, pool: &[u8]) -> PathBuf {
    let t = Instant::now();
    let path = dir.join(format!("t-{disk_bytes}-{points}"));
    let mut r = Replica::create(
        Arc::new(RealFs),
        &path,
        &[DiskSpec {
            name: "disk0".into(),
            size_bytes: disk_bytes,
        }],
        ReplicaConfig::default(),
    )
    .unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ points as u64);
    for _ in 0..points {
        write(&mut r, WRITES_PER_OLD_POINT, disk_bytes, &mut rng, pool);
        r.cut_point(PointKind::CrashConsistent, None).unwrap();
    }
    let manifest = std::fs::metadata(path.join("manifest")).unwrap().len();
    eprintln!(
        "point: template {} GiB / {points} points built in {:.1?}, manifest {manifest} bytes",
        disk_bytes >> 30,
        t.elapsed()
    );
    path
}

/// Copy `template` (into `keep`), apply and flush 1,000 writes, then time the cut.
///
/// The copies are kept until the end: deleting a thousand files per iteration makes ext4
/// (without a journal, as here) skip the recently freed inodes on every later file
/// creation, a cost that would land in the timed cut (which creates two files) and grow
/// with the template's file count. The copied directories are synced before the clock
/// starts, so the cut's directory syncs do not write back the copy's entries.
fn cut(
    template: &Path,
    disk_bytes: u64,
    points: usize,
    seed: u64,
    pool: &[u8],
    keep: &RefCell<Vec<tempfile::TempDir>>,
) -> Duration {
    let dir = common::scratch();
    let copy = dir.path().join("r");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(template)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(ok.success());
    for d in [copy.join("data"), copy.join("layers"), copy.clone()] {
        std::fs::File::open(&d).unwrap().sync_all().unwrap();
    }
    keep.borrow_mut().push(dir);
    let (mut r, _) = Replica::open(Arc::new(RealFs), &copy, ReplicaConfig::default()).unwrap();
    assert_eq!(r.points().len(), points);
    write(&mut r, WRITES, disk_bytes, &mut Rng(seed | 1), pool);
    r.flush().unwrap();
    let start = Instant::now();
    r.cut_point(PointKind::CrashConsistent, None).unwrap();
    start.elapsed()
}

fn name(disk_bytes: u64, points: usize) -> String {
    let size = if disk_bytes >= TIB { "1TiB" } else { "1GiB" };
    format!("point/cut/{size}/{points}pts")
}

fn bench(c: &mut Criterion) {
    let dir = common::scratch();
    let pool = common::noise(16 << 20);
    let configs = [(GIB, 10), (TIB, 10), (TIB, 1000)];
    let templates: Vec<PathBuf> = configs
        .iter()
        .map(|&(size, points)| template(dir.path(), size, points, &pool))
        .collect();

    let mut g = c.benchmark_group("point");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    // Criterion sizes samples by the wall time of a whole iteration (copy, writes and both
    // cuts, ~0.1-0.3 s here): 6 s gives 3-5 pairs per sample, 30-50 pairs in all.
    g.measurement_time(Duration::from_secs(6));
    // (case config, floor config): indexes into `configs`.
    let pairs = [(2usize, 1usize), (1, 0)];
    let keep = RefCell::new(Vec::new());
    // Two untimed cuts per configuration first, so criterion's one warm-up iteration is
    // not a cold one and it sizes the samples by a typical cut.
    for (t, &(size, points)) in templates.iter().zip(&configs) {
        for s in 0..2 {
            cut(t, size, points, 1000 + s, &pool, &keep);
        }
    }
    let seed = Cell::new(1u64);
    let last_floor = Cell::new(Duration::ZERO);
    for (ci, fi) in pairs {
        let (case, floor) = (
            name(configs[ci].0, configs[ci].1),
            name(configs[fi].0, configs[fi].1),
        );
        g.bench_function(&case, |b| {
            b.iter_custom(|iters| {
                common::paired(
                    &case,
                    &floor,
                    1,
                    iters,
                    || {
                        seed.set(seed.get() + 1);
                        let (size, points) = configs[ci];
                        let took = cut(&templates[ci], size, points, seed.get(), &pool, &keep);
                        workload::note_pair(&case, last_floor.get(), took);
                        took
                    },
                    || {
                        seed.set(seed.get() + 1);
                        let (size, points) = configs[fi];
                        last_floor.set(cut(&templates[fi], size, points, seed.get(), &pool, &keep));
                        last_floor.get()
                    },
                )
            })
        });
    }
    g.finish();

    println!("\n== point: cutting a point after {WRITES} random 4 KiB writes (median) ==");
    println!(
        "{:<28} {:>10} {:<24} {:>10} {:>8} {:>7}",
        "case", "ms", "against", "ms", "growth", "target"
    );
    for (ci, fi) in pairs {
        let (case, floor) = (
            name(configs[ci].0, configs[ci].1),
            name(configs[fi].0, configs[fi].1),
        );
        if let (Some((f, c)), Some(r)) =
            (workload::pair_medians(&case), common::ratio(&case, &floor))
        {
            let (f, c) = (f.as_secs_f64() * 1e3, c.as_secs_f64() * 1e3);
            let growth = 1.0 / r;
            println!(
                "{case:<28} {c:>10.2} {floor:<24} {f:>10.2} {growth:>8.2} {:>7.2}{}",
                1.25,
                if growth <= 1.25 { " ok" } else { " ABOVE" }
            );
        }
    }
    for (ci, _) in pairs {
        workload::print_spread(&name(configs[ci].0, configs[ci].1), true);
    }
    println!();
}

criterion_group!(benches, bench);
criterion_main!(benches);
