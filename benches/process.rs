//! `process`: applying 1 GiB of 64 KiB writes at random 4 KiB-aligned offsets of a 64 GiB
//! disk (incompressible data) from the change log into a fresh replica with one
//! `Processor::run_pass` (which makes everything durable and advances the log's
//! checkpoint, trimming the log), against the floor of writing the same 1 GiB sequentially
//! into a new file with 64 KiB `write_all` calls and ONE fdatasync at the end (the fastest
//! way to make those bytes durable; the processor itself syncs every 256 MiB).
//!
//! The log is built once, outside the timed region. Each iteration processes a copy of it:
//! its sealed segments hard-linked (the processor only unlinks them), its tail segment and
//! other files copied, so every pass reads the same log, trims it, and nothing it does
//! reaches the master copy. The log's files are in the page cache, as a log the processor
//! follows closely is.

mod common;
mod workload;

use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::policy::Policy;
use standby_engine::process::Processor;
use standby_engine::record::Entry;
use standby_engine::replica::{DiskSpec, Replica, ReplicaConfig};
use standby_engine::vfs::RealFs;
use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TOTAL_BYTES: usize = 1 << 30;
const WRITE_BYTES: usize = 64 << 10;
const DISK_BYTES: u64 = 64 << 30;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Random 4 KiB-aligned offsets that keep a `WRITE_BYTES` write inside the disk.
fn offsets(n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let blocks = (DISK_BYTES - WRITE_BYTES as u64) / 4096;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * 4096
        })
        .collect()
}

/// Build the master log in `dir`: one 64 KiB write record per chunk of `data`. Returns the
/// time of its last record.
fn build_log(dir: &Path, data: &[u8]) -> u64 {
    let (cache, _) = Cache::open(dir, CacheConfig::default()).unwrap();
    let offs = offsets(data.len() / WRITE_BYTES);
    let mut last = 0;
    for (chunk, off) in data.chunks(WRITE_BYTES).zip(offs) {
        last = cache
            .append(&Entry::Write {
                disk: 0,
                offset: off,
                data: chunk,
            })
            .unwrap();
    }
    cache.wait_durable(last).unwrap();
    cache.close().unwrap();
    now_us()
}

/// A private copy of the master log: sealed segments hard-linked, the rest copied.
fn link_log(master: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(master)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let tail = names.iter().rfind(|n| n.ends_with(".log")).cloned();
    for n in &names {
        let (from, to) = (master.join(n), into.join(n));
        if n.ends_with(".log") && Some(n) != tail.as_ref() {
            std::fs::hard_link(&from, &to).unwrap();
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

fn floor(data: &[u8]) -> Duration {
    let dir = common::scratch();
    let start = Instant::now();
    let mut f = File::create(dir.path().join("floor.raw")).unwrap();
    for chunk in data.chunks(WRITE_BYTES) {
        f.write_all(chunk).unwrap();
    }
    f.sync_data().unwrap();
    let took = start.elapsed();
    drop(f);
    took
}

fn process(master: &Path, clock_us: u64) -> Duration {
    let dir = common::scratch();
    let log_dir = dir.path().join("log");
    link_log(master, &log_dir);
    let (cache, _) = Cache::open(&log_dir, CacheConfig::default()).unwrap();
    let cache = Arc::new(cache);
    let replica = Replica::create(
        Arc::new(RealFs),
        dir.path().join("replica"),
        &[DiskSpec {
            name: "disk0".into(),
            size_bytes: DISK_BYTES,
        }],
        ReplicaConfig::default(),
    )
    .unwrap();
    // The pass's wall clock is pinned to the log's end, so the end-of-pass interval check
    // never cuts a point in one iteration and not in another.
    let mut p = Processor::new(cache.clone(), replica, Policy::default())
        .unwrap()
        .with_clock(move || clock_us);
    let start = Instant::now();
    let report = p.run_pass().unwrap();
    let took = start.elapsed();
    assert_eq!(report.applied_bytes, TOTAL_BYTES as u64);
    assert!(report.points.is_empty());
    assert_eq!(cache.stats().checkpoint, report.durable_seq);
    drop(p);
    cache.close().unwrap();
    took
}

fn bench(c: &mut Criterion) {
    let data = common::noise(TOTAL_BYTES);
    let master_dir = common::scratch();
    let master = master_dir.path().join("log");
    let t = Instant::now();
    let clock_us = build_log(&master, &data);
    eprintln!("process: built a 1 GiB log in {:.1?}", t.elapsed());

    let mut g = c.benchmark_group("process");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(TOTAL_BYTES as u64));
    let case = "process/1GiB/64k-random/incompressible";
    let floor_case = "floor/1GiB/64k-sequential+1-fdatasync";
    let last_floor = Cell::new(Duration::ZERO);
    g.bench_function(case, |b| {
        b.iter_custom(|iters| {
            common::paired(
                case,
                floor_case,
                TOTAL_BYTES as u64,
                iters,
                || {
                    let took = process(&master, clock_us);
                    workload::note_pair(case, last_floor.get(), took);
                    took
                },
                || {
                    last_floor.set(floor(&data));
                    last_floor.get()
                },
            )
        })
    });
    g.finish();
    print_ratios(
        "process",
        &[Ratio {
            case,
            floor: floor_case,
            target: 0.7,
        }],
    );
    workload::print_spread(case, false);
}

criterion_group!(benches, bench);
criterion_main!(benches);
