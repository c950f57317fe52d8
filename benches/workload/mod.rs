//! The 100-point workload shared by the `materialize` and `peer` benchmarks: a 1 GiB disk
//! written fully (realistic contents, 1 MiB writes, as initial replication ships it) and
//! cut as point 1, then 99 rounds of 164 incompressible 64 KiB writes at random 64 KiB-
//! aligned offsets (about 1% of the disk per round), each round cut as the next point.
//! Point `p` is the state after round `p - 1`. Everything is deterministic, so the same
//! writes can be replayed into a qcow2 chain.
//!
//! Also here, for every benchmark of the replica: the spread of the per-pair ratios.

#![allow(dead_code)]

use parking_lot::Mutex;
use standby_engine::record::{Op, Record};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::RealFs;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const DISK_BYTES: u64 = 1 << 30;
pub const POINTS: u64 = 100;
/// The point in the middle of the 100.
pub const MIDDLE: u64 = 50;
pub const BASE_WRITE: usize = 1 << 20;
pub const ROUND_WRITE: usize = 64 << 10;
/// 164 × 64 KiB ≈ 1% of 1 GiB.
pub const ROUND_WRITES: usize = 164;
const POOL_BYTES: usize = 64 << 20;

/// Source of the rounds' data: noise, sliced at a different 4 KiB step for every write.
pub struct Rounds {
    pool: Vec<u8>,
}

impl Default for Rounds {
    fn default() -> Self {
        Self::new()
    }
}

impl Rounds {
    pub fn new() -> Self {
        Rounds {
            pool: crate::common::noise(POOL_BYTES + ROUND_WRITE),
        }
    }

    /// The writes of round `r` (1-based): `(offset, data)`.
    pub fn round(&self, r: u64) -> Vec<(u64, &[u8])> {
        let mut x = 0x2545_f491_4f6c_dd1du64 ^ r.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let slots = DISK_BYTES / ROUND_WRITE as u64;
        let steps = (POOL_BYTES / 4096) as u64;
        (0..ROUND_WRITES as u64)
            .map(|j| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (((r * ROUND_WRITES as u64 + j) * 7919) % steps) as usize * 4096;
                (
                    (x % slots) * ROUND_WRITE as u64,
                    &self.pool[at..at + ROUND_WRITE],
                )
            })
            .collect()
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A replica being written: the next sequence number to use.
pub struct Writer {
    pub replica: Replica,
    pub next_seq: u64,
}

impl Writer {
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let rec = Record {
            seq: self.next_seq,
            time_us: now_us(),
            op: Op::Write {
                disk: 0,
                offset,
                data: data.to_vec(),
            },
        };
        self.replica.apply(&rec).unwrap();
        self.next_seq += 1;
    }
}

/// Build the 100-point replica in `dir` from `base` (the disk's first contents).
pub fn build_replica(dir: &Path, base: &[u8], rounds: &Rounds) -> Writer {
    let t = Instant::now();
    let replica = Replica::create(
        Arc::new(RealFs),
        dir,
        &[DiskSpec {
            name: "disk0".into(),
            size_bytes: DISK_BYTES,
        }],
        ReplicaConfig::default(),
    )
    .unwrap();
    let mut w = Writer {
        replica,
        next_seq: 1,
    };
    for (i, chunk) in base.chunks(BASE_WRITE).enumerate() {
        w.write((i * BASE_WRITE) as u64, chunk);
    }
    w.replica.cut_point(PointKind::Initial, None).unwrap();
    for r in 1..POINTS {
        for (off, data) in rounds.round(r) {
            w.write(off, data);
        }
        w.replica
            .cut_point(PointKind::CrashConsistent, None)
            .unwrap();
    }
    assert_eq!(w.replica.points().len() as u64, POINTS);
    eprintln!(
        "workload: built the 100-point replica in {:.1?}",
        t.elapsed()
    );
    w
}

/// Materialize `point` of the replica into `out` (which must not exist); returns the
/// time from opening the view to the durable image.
pub fn materialize(replica: &Replica, point: u64, out: &Path) -> Duration {
    let start = Instant::now();
    let view = replica.view_point(point).unwrap();
    let stats = view.materialize(0, out).unwrap();
    let took = start.elapsed();
    assert_eq!(stats.virtual_bytes, DISK_BYTES);
    took
}

/// Run a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img convert -O raw` of `src` (format `fmt`) into `out`, then one fdatasync of
/// `out` (qemu-img convert's default cache mode for the target never syncs it, while a
/// materialized image is durable). Returns (convert, convert + fdatasync).
pub fn qemu_convert(fmt: &str, src: &Path, out: &Path) -> (Duration, Duration) {
    let start = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(src)
        .arg(out));
    let converted = start.elapsed();
    std::fs::File::open(out).unwrap().sync_data().unwrap();
    (converted, start.elapsed())
}

/// Per case: (floor time, case time) of every pair, in seconds.
static PAIRS: Mutex<BTreeMap<String, Vec<(f64, f64)>>> = Mutex::new(BTreeMap::new());

/// Note one pair's times of `case`, to print their spread.
pub fn note_pair(case: &str, floor: Duration, took: Duration) {
    PAIRS
        .lock()
        .entry(case.to_string())
        .or_default()
        .push((floor.as_secs_f64(), took.as_secs_f64().max(1e-9)));
}

fn median_of(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// Median floor time and median case time over the noted pairs of `case`.
pub fn pair_medians(case: &str) -> Option<(Duration, Duration)> {
    let v = PAIRS.lock().get(case)?.clone();
    let f = median_of(v.iter().map(|p| p.0).collect())?;
    let c = median_of(v.iter().map(|p| p.1).collect())?;
    Some((Duration::from_secs_f64(f), Duration::from_secs_f64(c)))
}

/// `[min, median, max]` of the noted pair ratios (floor / case) of `case`, and how many.
pub fn pair_spread(case: &str) -> Option<([f64; 3], usize)> {
    let pairs = PAIRS.lock().get(case)?.clone();
    let mut v: Vec<f64> = pairs.iter().map(|(f, c)| f / c).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(([v[0], v[v.len() / 2], v[v.len() - 1]], v.len()))
}

/// Print the spread of the pair ratios of `case` (inverted with `invert`: case / floor).
pub fn print_spread(case: &str, invert: bool) {
    if let Some((mut s, n)) = pair_spread(case) {
        if invert {
            s = [1.0 / s[2], 1.0 / s[1], 1.0 / s[0]];
        }
        println!(
            "  {case}: {} over {n} pairs: min {:.2}, median {:.2}, max {:.2}",
            if invert {
                "case/floor time"
            } else {
                "floor/case time"
            },
            s[0],
            s[1],
            s[2]
        );
    }
}
