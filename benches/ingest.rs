//! `ingest`: appending 256 MiB through the change log, against the floor of writing the
//! same bytes with plain `write_all` and one fdatasync per the same batch size (1 MiB),
//! measured in the same run, each log iteration right after a floor iteration. Cases: 4 KiB and 64 KiB writes, 1 and 16 writers,
//! incompressible and realistic data. Each log writer waits for durability after every
//! `BATCH_BYTES / writers` of its own bytes, so the log is asked for as many durable
//! points per byte as the floor makes.

mod common;

use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::record::Entry;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOTAL_BYTES: usize = 256 << 20;
const BATCH_BYTES: usize = 1 << 20;

fn floor(data: &[u8], write_bytes: usize) -> Duration {
    let dir = common::scratch();
    let start = Instant::now();
    let mut f = File::create(dir.path().join("floor.raw")).unwrap();
    let mut since_sync = 0;
    for chunk in data.chunks(write_bytes) {
        f.write_all(chunk).unwrap();
        since_sync += chunk.len();
        if since_sync >= BATCH_BYTES {
            f.sync_data().unwrap();
            since_sync = 0;
        }
    }
    f.sync_data().unwrap();
    let took = start.elapsed();
    drop(f);
    took
}

fn log(data: &Arc<Vec<u8>>, write_bytes: usize, writers: usize) -> Duration {
    let dir = common::scratch();
    let (cache, _) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
    let cache = Arc::new(cache);
    let records = data.len() / write_bytes;
    let per_writer_batch = (BATCH_BYTES / writers).max(write_bytes);
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let cache = cache.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                let mut since = 0;
                let mut last = 0;
                for i in (w..records).step_by(writers) {
                    let bytes = &data[i * write_bytes..(i + 1) * write_bytes];
                    let entry = Entry::Write {
                        disk: w as u16,
                        offset: (i * write_bytes) as u64,
                        data: bytes,
                    };
                    last = cache.append(&entry).unwrap();
                    since += write_bytes;
                    if since >= per_writer_batch {
                        cache.wait_durable(last).unwrap();
                        since = 0;
                    }
                }
                if last != 0 {
                    cache.wait_durable(last).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let took = start.elapsed();
    cache.close().unwrap();
    took
}

fn ingest(c: &mut Criterion) {
    let datasets = [
        ("incompressible", Arc::new(common::noise(TOTAL_BYTES))),
        ("realistic", Arc::new(common::disk_like(TOTAL_BYTES))),
    ];
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(TOTAL_BYTES as u64));
    let mut rows = Vec::new();
    for (kind, data) in &datasets {
        for write_bytes in [4096usize, 65536] {
            let floor_case = format!("floor/{kind}/{}k", write_bytes / 1024);
            for writers in [1usize, 16] {
                let case = format!("log/{kind}/{}k/{writers}w", write_bytes / 1024);
                g.bench_function(&case, |b| {
                    b.iter_custom(|iters| {
                        common::paired(
                            &case,
                            &floor_case,
                            TOTAL_BYTES as u64,
                            iters,
                            || log(data, write_bytes, writers),
                            || floor(data, write_bytes),
                        )
                    })
                });
                let target = match (*kind, write_bytes, writers) {
                    ("incompressible", 65536, 16) => 0.85,
                    ("realistic", _, _) => 1.5,
                    (_, 4096, 16) => 0.5,
                    _ => 0.0,
                };
                rows.push((case, floor_case.clone(), target));
            }
        }
    }
    g.finish();
    let rows: Vec<Ratio<'_>> = rows
        .iter()
        .map(|(case, floor, target)| Ratio {
            case,
            floor,
            target: *target,
        })
        .collect();
    print_ratios("ingest", &rows);
}

criterion_group!(benches, ingest);
criterion_main!(benches);
