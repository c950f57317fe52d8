//! `roundtrip`: delta sync of a 1 GiB disk image whose 64 KiB blocks changed at 1% and at
//! 10%, both sides on this machine: Standby's delta engine (both sides hash their blocks in
//! parallel, only the differing blocks are read and written into the target in place)
//! against two floors measured in the same run:
//!
//! - floor 1: `rsync --inplace --no-whole-file SRC DST` between the same two images
//!   (rsync's own delta algorithm; target: Standby at least 2x faster);
//! - floor 2: reading both images once, 1 MiB at a time (target: at least 0.8 of it).
//!
//! Both sides read from the page cache (the images were just written). The target is
//! reset to its old content and synced (untimed) before every run of either side. Printed too: bytes
//! shipped against bytes changed, and CPU-seconds per run of each side (the machine is
//! shared: CPU time is what contention does not distort; wall ratios are indicative).
//!
//! There is no user command that syncs two images yet (reprotect and failback will drive
//! this engine), so Standby's side runs the engine in-process.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use parking_lot::Mutex;
use standby_engine::delta::{self, BlockSource, FileImage, BLOCK_BYTES};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 1 << 30;
const BLOCKS: u64 = DISK_BYTES / BLOCK_BYTES;

static CPU: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// CPU-seconds of this process (all threads) and of its waited-for children.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = 100.0; // USER_HZ on Linux
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    // utime, stime, cutime, cstime are fields 14..17 (1-based): 11..14 after the name.
    (at(11) + at(12), at(13) + at(14))
}

fn note_cpu(case: &str, secs: f64) {
    CPU.lock().entry(case.to_string()).or_default().push(secs);
}

/// The changed blocks: `pct` % of them, spread over the disk (a stride coprime with the
/// number of blocks visits each at most once).
fn changed_blocks(pct: u64) -> Vec<u64> {
    let mut b: Vec<u64> = (0..BLOCKS * pct / 100).map(|k| k * 7919 % BLOCKS).collect();
    b.sort_unstable();
    b
}

fn block_noise(block: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (block + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::with_capacity(BLOCK_BYTES as usize);
    while out.len() < BLOCK_BYTES as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Put `blocks` of `dst` back to `base`'s content (untimed).
fn reset(dst: &Path, base: &Path, blocks: &[u64]) {
    let (d, b) = (
        std::fs::OpenOptions::new().write(true).open(dst).unwrap(),
        std::fs::File::open(base).unwrap(),
    );
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    for &blk in blocks {
        b.read_exact_at(&mut buf, blk * BLOCK_BYTES).unwrap();
        d.write_all_at(&buf, blk * BLOCK_BYTES).unwrap();
    }
    // Written back now, so no timed run pays for the reset's dirty pages.
    d.sync_data().unwrap();
}

/// Standby's delta sync: compare, then write the differing blocks of `src` into `dst`.
/// Returns the bytes shipped.
fn standby_sync(src: &Path, dst: &Path) -> u64 {
    let a = FileImage::open(src, DISK_BYTES).unwrap();
    let b = FileImage::open(dst, DISK_BYTES).unwrap();
    let d = delta::compare(&a, &b).unwrap();
    let out = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    let mut buf = Vec::new();
    for &(off, len) in &d.changed {
        buf.resize(len as usize, 0);
        a.read_at(off, &mut buf).unwrap();
        out.write_all_at(&buf, off).unwrap();
    }
    d.changed_bytes()
}

fn rsync(src: &Path, dst: &Path) {
    let st = std::process::Command::new("rsync")
        .args(["--inplace", "--no-whole-file"])
        .arg(src)
        .arg(dst)
        .status()
        .expect("rsync");
    assert!(st.success(), "rsync failed");
}

fn read_both(a: &Path, b: &Path) {
    let mut buf = vec![0u8; 1 << 20];
    for p in [a, b] {
        let f = std::fs::File::open(p).unwrap();
        let mut off = 0u64;
        while off < DISK_BYTES {
            let n = f.read_at(&mut buf, off).unwrap();
            assert!(n > 0);
            off += n as u64;
        }
    }
}

fn same(a: &Path, b: &Path) -> bool {
    let (x, y) = (
        FileImage::open(a, DISK_BYTES).unwrap(),
        FileImage::open(b, DISK_BYTES).unwrap(),
    );
    delta::compare(&x, &y).unwrap().changed.is_empty()
}

fn bench(c: &mut Criterion) {
    let dir = common::scratch();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, common::disk_like(DISK_BYTES as usize)).unwrap();
    let mut g = c.benchmark_group("roundtrip");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(DISK_BYTES));
    let mut rows = Vec::new();
    for pct in [1u64, 10] {
        let blocks = changed_blocks(pct);
        let src = dir.path().join(format!("src{pct}.raw"));
        let dst = dir.path().join(format!("dst{pct}.raw"));
        std::fs::copy(&base, &src).unwrap();
        std::fs::copy(&base, &dst).unwrap();
        {
            let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            for &blk in &blocks {
                f.write_all_at(&block_noise(blk), blk * BLOCK_BYTES)
                    .unwrap();
            }
        }
        let changed = blocks.len() as u64 * BLOCK_BYTES;
        let case: &'static str =
            Box::leak(format!("roundtrip/standby-delta/{pct}pct").into_boxed_str());
        let floor: &'static str =
            Box::leak(format!("floor/rsync-inplace/{pct}pct").into_boxed_str());
        let read: &'static str = Box::leak(format!("floor/read-both/{pct}pct").into_boxed_str());
        let shipped = Mutex::new(0u64);
        g.bench_function(case, |b| {
            b.iter_custom(|iters| {
                common::paired(
                    case,
                    floor,
                    DISK_BYTES,
                    iters,
                    || {
                        reset(&dst, &base, &blocks);
                        let (c0, _) = cpu_seconds();
                        let t = Instant::now();
                        *shipped.lock() = standby_sync(&src, &dst);
                        let took = t.elapsed();
                        note_cpu(case, cpu_seconds().0 - c0);
                        took
                    },
                    || {
                        let (c0, _) = cpu_seconds();
                        let t = Instant::now();
                        read_both(&src, &dst);
                        let took = t.elapsed();
                        note_cpu(read, cpu_seconds().0 - c0);
                        common::record(read, DISK_BYTES, took);
                        reset(&dst, &base, &blocks);
                        let (_, k0) = cpu_seconds();
                        let t = Instant::now();
                        rsync(&src, &dst);
                        let took = t.elapsed();
                        note_cpu(floor, cpu_seconds().1 - k0);
                        took
                    },
                )
            })
        });
        assert!(same(&src, &dst), "the delta sync left the images different");
        let shipped = *shipped.lock();
        assert!(
            shipped == changed,
            "shipped {shipped} bytes for {changed} changed"
        );
        rows.push((pct, case, floor, read, shipped, changed));
    }
    g.finish();
    let ratios: Vec<common::Ratio> = rows
        .iter()
        .map(|&(_, case, floor, _, _, _)| common::Ratio {
            case,
            floor,
            target: 2.0,
        })
        .collect();
    common::print_ratios(
        "roundtrip (floor 1: rsync --inplace --no-whole-file)",
        &ratios,
    );
    println!("== roundtrip (floor 2: reading both images once; ratio of medians) ==");
    for &(pct, case, floor, read, shipped, changed) in &rows {
        if let (Some(s), Some(r)) = (common::median_rate(case), common::median_rate(read)) {
            println!(
                "{case:<44} {:>9.1} MB/s  read-both {:>9.1} MB/s  ratio {:.2}  target 0.80{}",
                s / 1e6,
                r / 1e6,
                s / r,
                if s / r >= 0.8 { " ok" } else { " BELOW" }
            );
        }
        let med = |k: &str| {
            let mut v = CPU.lock().get(k).cloned().unwrap_or_default();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let (cs, cf, cr) = (med(case), med(floor), med(read));
        println!(
            "{pct}% changed: shipped {shipped} bytes for {changed} bytes changed ({:.3}x); CPU-seconds per run: standby {cs:.2}, rsync {cf:.2} ({:.1}x), read-both {cr:.2}",
            shipped as f64 / changed as f64,
            if cs > 0.0 { cf / cs } else { f64::NAN }
        );
    }
    println!();
}

criterion_group!(benches, bench);
criterion_main!(benches);
