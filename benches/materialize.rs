//! `materialize`: the middle point (50 of 100) of a fully written 1 GiB disk, materialized
//! by Standby into a sparse raw image (view built, image written and fdatasynced), against
//! the floor of `qemu-img convert -f raw -O raw` of a 1 GiB raw image of the same content
//! followed by one fdatasync of its output. The raw image is Standby's own materialization
//! of that point, made once outside the timed region. See `workload/mod.rs` for the
//! workload. Both sides read from the page cache (the replica and the raw image were just
//! written) and write a new file on the same filesystem.
//!
//! Also printed: qemu-img convert alone, without the fdatasync (its default cache mode for
//! the target does not sync), for reference.

mod common;
mod workload;

use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::cell::Cell;
use std::time::Duration;
use workload::{DISK_BYTES, MIDDLE};

fn bench(c: &mut Criterion) {
    let dir = common::scratch();
    let rounds = workload::Rounds::new();
    let base = common::disk_like(DISK_BYTES as usize);
    let w = workload::build_replica(&dir.path().join("replica"), &base, &rounds);
    drop(base);
    let raw = dir.path().join("point50.raw");
    workload::materialize(&w.replica, MIDDLE, &raw);

    let case = "materialize/standby/point50of100";
    let floor_case = "floor/qemu-img-convert-raw+fdatasync";
    let nosync = "qemu-img-convert-raw (no fdatasync)";
    let mut g = c.benchmark_group("materialize");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(DISK_BYTES));
    let last_floor = Cell::new(Duration::ZERO);
    g.bench_function(case, |b| {
        b.iter_custom(|iters| {
            common::paired(
                case,
                floor_case,
                DISK_BYTES,
                iters,
                || {
                    let out = common::scratch();
                    let took =
                        workload::materialize(&w.replica, MIDDLE, &out.path().join("out.raw"));
                    workload::note_pair(case, last_floor.get(), took);
                    took
                },
                || {
                    let out = common::scratch();
                    let (conv, durable) =
                        workload::qemu_convert("raw", &raw, &out.path().join("out.raw"));
                    common::record(nosync, DISK_BYTES, conv);
                    last_floor.set(durable);
                    durable
                },
            )
        })
    });
    g.finish();
    print_ratios(
        "materialize",
        &[Ratio {
            case,
            floor: floor_case,
            target: 0.8,
        }],
    );
    workload::print_spread(case, false);
    if let (Some(s), Some(q)) = (common::median_rate(case), common::median_rate(nosync)) {
        println!(
            "{nosync}: {:.1} MB/s; Standby (durable) / that = {:.2}\n",
            q / 1e6,
            s / q
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
