//! What the write path counts for monitoring: a latency histogram and a byte counter per
//! disk, recorded with relaxed atomic adds only (no lock, no allocation, no syscall), so
//! counting never slows or orders the VM's writes; a scrape reads them from another thread.
//!
//! Invariant: a snapshot's count is the sum of its buckets (the `+Inf` bucket), so the
//! exposition is always self-consistent; its sum may trail by the writes in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram's buckets (seconds): 10 µs to 10 s, 1-2.5-5 per decade.
pub const LATENCY_BUCKETS_SECONDS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds (what `record` compares against).
const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is past the largest bound.
    counts: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment: cumulative buckets, as Prometheus wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it), for every finite bound.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(BOUNDS_NS.len());
        let mut total = 0u64;
        for (bound, c) in LATENCY_BUCKETS_SECONDS.iter().zip(&self.counts) {
            total += c.load(Ordering::Relaxed);
            buckets.push((*bound, total));
        }
        total += self.counts[BOUNDS_NS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: total,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// One disk's figures.
#[derive(Debug, Default)]
pub struct DiskWriteStats {
    /// How long each client write, trim or write-zeroes took to be acknowledged (in the
    /// log; durable too with FUA).
    pub latency: Histogram,
    /// Payload bytes of acknowledged client writes (trims and zero ranges carry none).
    pub written_bytes: AtomicU64,
}

/// The write tap's figures, one entry per disk (in the VM's disk order).
#[derive(Debug, Default)]
pub struct WriteStats {
    pub disks: Vec<DiskWriteStats>,
}

impl WriteStats {
    pub fn new(disks: usize) -> WriteStats {
        WriteStats {
            disks: (0..disks).map(|_| DiskWriteStats::default()).collect(),
        }
    }

    /// Count an acknowledged client request on `disk`.
    pub fn record(&self, disk: u16, took: Duration, payload_bytes: u64) {
        if let Some(d) = self.disks.get(disk as usize) {
            d.latency.record(took);
            d.written_bytes.fetch_add(payload_bytes, Ordering::Relaxed);
        }
    }
}

/// Bytes applied into each VM's replica by this process since it started (a Prometheus
/// counter: it starts at 0 with the process). Processors count into it
/// ([`crate::process::Processor::counting_into`]); one entry per VM, made on first use.
pub fn replicated_bytes(vm: &str) -> std::sync::Arc<AtomicU64> {
    let mut m = REPLICATED.lock();
    m.entry(vm.to_string()).or_default().clone()
}

/// Every VM's [`replicated_bytes`] in this process, by name.
pub fn replicated_bytes_all() -> Vec<(String, u64)> {
    let m = REPLICATED.lock();
    let mut v: Vec<(String, u64)> = m
        .iter()
        .map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed)))
        .collect();
    v.sort();
    v
}

type Counters = std::collections::HashMap<String, std::sync::Arc<AtomicU64>>;
static REPLICATED: std::sync::LazyLock<parking_lot::Mutex<Counters>> =
    std::sync::LazyLock::new(Default::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        h.record(Duration::from_micros(10)); // exactly the first bound
        h.record(Duration::from_micros(11));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60)); // past every bound: only in +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.000_01, 1));
        assert_eq!(s.buckets[1], (0.000_025, 2));
        let at = |b: f64| s.buckets.iter().find(|(x, _)| *x == b).unwrap().1;
        assert_eq!(at(0.002_5), 2);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(10.0), 3);
        assert!((s.sum_seconds - (60.0 + 0.003 + 0.000_021)).abs() < 1e-9);
    }

    #[test]
    fn bounds_match_their_seconds() {
        for (ns, s) in BOUNDS_NS.iter().zip(LATENCY_BUCKETS_SECONDS) {
            assert_eq!(*ns, (s * 1e9).round() as u64);
        }
    }

    #[test]
    fn stats_count_per_disk_and_ignore_unknown_disks() {
        let w = WriteStats::new(2);
        w.record(1, Duration::from_micros(100), 4096);
        w.record(7, Duration::from_micros(100), 4096);
        assert_eq!(w.disks[0].latency.snapshot().count, 0);
        assert_eq!(w.disks[1].latency.snapshot().count, 1);
        assert_eq!(w.disks[1].written_bytes.load(Ordering::Relaxed), 4096);
    }
}
