//! Shared by the benchmarks: test data, and the ratio report. Each benchmark measures its
//! floor in the same run; every timed iteration is recorded here through `iter_custom`, and
//! at the end the median throughput of each case is printed beside its floor's.

#![allow(dead_code)]

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());
static PAIRS: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Time `case` and its floor back to back, `iters` times, recording both; returns the
/// case's total time for criterion. Interleaving makes the ratio robust against a disk
/// whose speed drifts during the run (burst credits, background discards).
pub fn paired(
    case: &str,
    floor: &str,
    bytes: u64,
    iters: u64,
    mut run_case: impl FnMut() -> Duration,
    mut run_floor: impl FnMut() -> Duration,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let f = run_floor();
        let c = run_case();
        record(floor, bytes, f);
        record(case, bytes, c);
        PAIRS
            .lock()
            .entry(case.to_string())
            .or_default()
            .push(f.as_secs_f64() / c.as_secs_f64().max(1e-9));
        total += c;
    }
    total
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(v[v.len() / 2])
}

/// Record one timed iteration of `case` that moved `bytes`.
pub fn record(case: &str, bytes: u64, took: Duration) {
    let rate = bytes as f64 / took.as_secs_f64().max(1e-9);
    SAMPLES
        .lock()
        .entry(case.to_string())
        .or_default()
        .push(rate);
}

/// Median bytes per second of a case.
pub fn median_rate(case: &str) -> Option<f64> {
    median(SAMPLES.lock().get(case)?.clone())
}

/// Median of the per-pair ratios of a case measured with [`paired`], else the ratio of
/// the medians.
pub fn ratio(case: &str, floor: &str) -> Option<f64> {
    if let Some(r) = PAIRS.lock().get(case).cloned().and_then(median) {
        return Some(r);
    }
    Some(median_rate(case)? / median_rate(floor)?)
}

/// One line of the ratio table: a case against its floor, with the target ratio.
pub struct Ratio<'a> {
    pub case: &'a str,
    pub floor: &'a str,
    pub target: f64,
}

/// Print each case's median throughput, its floor's, and the ratio against the target.
pub fn print_ratios(title: &str, rows: &[Ratio<'_>]) {
    println!();
    println!("== {title}: ratio to the floor measured in the same run (median of samples) ==");
    println!(
        "{:<44} {:>11} {:>11} {:>7} {:>7}",
        "case", "MB/s", "floor MB/s", "ratio", "target"
    );
    for r in rows {
        match (
            median_rate(r.case),
            median_rate(r.floor),
            ratio(r.case, r.floor),
        ) {
            (Some(c), Some(f), Some(ratio)) => {
                println!(
                    "{:<44} {:>11.1} {:>11.1} {:>7.2} {:>6.2}{}",
                    r.case,
                    c / 1e6,
                    f / 1e6,
                    ratio,
                    r.target,
                    if ratio >= r.target { " ok" } else { " BELOW" }
                );
            }
            _ => println!("{:<44} (not measured in this run)", r.case),
        }
    }
    println!();
}

/// Incompressible bytes (xorshift), deterministic.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Realistic disk contents: the bytes of the files under /usr/lib, concatenated (repeated
/// if there are fewer than `len`), falling back to noise mixed with text if none can be read.
pub fn disk_like(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut stack: Vec<PathBuf> = vec![PathBuf::from("/usr/lib")];
    while out.len() < len {
        let Some(dir) = stack.pop() else { break };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(bytes) = std::fs::read(e.path()) {
                    out.extend_from_slice(&bytes);
                    if out.len() >= len {
                        break;
                    }
                }
            }
        }
    }
    if out.is_empty() {
        out = noise(len / 2);
        out.extend(b"standby ".iter().cycle().take(len / 2));
    }
    while out.len() < len {
        let more = out[..(len - out.len()).min(out.len())].to_vec();
        out.extend_from_slice(&more);
    }
    out.truncate(len);
    out
}

/// A scratch directory on the same filesystem as the build (not a tmpfs).
pub fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    tempfile::tempdir_in(base).expect("scratch dir")
}
