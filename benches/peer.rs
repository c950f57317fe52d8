//! `peer`: the `materialize` workload (see `workload/mod.rs`) kept the way a qcow2-based
//! peer keeps it: a base image (`qemu-img convert -O qcow2` of the same 1 GiB contents)
//! and one external overlay per point (`qemu-img create -f qcow2 -b prev -F qcow2 next`),
//! each round's writes made through one `qemu-io` run (one `write -s FILE off len` per
//! write, so the bytes are the same as Standby's; cache=writeback, flushed when it exits).
//! Before timing, `qemu-img compare` checks that overlay 49 equals Standby's point 50.
//!
//! Two comparisons, Standby against the peer, each interleaved:
//! - materializing point 50 of 100 into a raw image: Standby's view + materialize (durable)
//!   against `qemu-img convert -f qcow2 -O raw` of the 50-deep chain plus an fdatasync of
//!   its output;
//! - cutting a point after the same round of writes (164 × 64 KiB), made durable before
//!   the clock starts on both sides (Standby: `Replica::flush`; qemu-io: its exit flush):
//!   `Replica::cut_point` against `qemu-img create` of the next overlay on the chain
//!   (which grows past 100 as the benchmark runs, on both sides alike).
//!
//! Target: Standby at least 3× faster at both.

mod common;
mod workload;

use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use standby_engine::replica::PointKind;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use workload::{run, Rounds, Writer, DISK_BYTES, MIDDLE, POINTS, ROUND_WRITE};

/// Write `writes` into the qcow2 image `img` with one qemu-io run, from files made in
/// `tmp` (left there until the end: deleting files between cuts would slow every later
/// file creation on ext4 without a journal, for both sides, see `point.rs`).
fn qemu_write(img: &Path, writes: &[(u64, &[u8])], tmp: &Path) {
    std::fs::create_dir_all(tmp).unwrap();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-t", "writeback", "-f", "qcow2"]);
    for (j, (off, data)) in writes.iter().enumerate() {
        let src = tmp.join(format!("w{j}"));
        std::fs::write(&src, data).unwrap();
        cmd.arg("-c").arg(format!(
            "write -q -s {} {off} {}",
            src.display(),
            data.len()
        ));
    }
    run(cmd.arg(img));
}

fn overlay(dir: &Path, i: u64) -> PathBuf {
    dir.join(format!("q{i:04}.qcow2"))
}

/// `qemu-img create` of overlay `i` on overlay `i - 1`; returns how long it took.
fn create_overlay(dir: &Path, i: u64) -> Duration {
    let (prev, next) = (overlay(dir, i - 1), overlay(dir, i));
    let start = Instant::now();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&prev)
        .arg(&next));
    start.elapsed()
}

/// The qcow2 chain of the workload: q0000 is point 1, q{r} holds round r (point r + 1).
fn build_chain(dir: &Path, base: &[u8], rounds: &Rounds) {
    let t = Instant::now();
    std::fs::create_dir_all(dir).unwrap();
    let raw = dir.join("base.raw");
    std::fs::write(&raw, base).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(overlay(dir, 0)));
    std::fs::remove_file(&raw).unwrap();
    for r in 1..POINTS {
        create_overlay(dir, r);
        qemu_write(
            &overlay(dir, r),
            &rounds.round(r),
            &dir.join(format!("round{r}")),
        );
    }
    eprintln!(
        "peer: built the 100-image qcow2 chain in {:.1?}",
        t.elapsed()
    );
}

/// Median time of a case measured with `bytes == 1`.
fn median_time(case: &str) -> Option<Duration> {
    common::median_rate(case).map(|r| Duration::from_secs_f64(1.0 / r))
}

fn bench(c: &mut Criterion) {
    let dir = common::scratch();
    let rounds = Rounds::new();
    let base = common::disk_like(DISK_BYTES as usize);
    let w = workload::build_replica(&dir.path().join("replica"), &base, &rounds);
    let chain = dir.path().join("chain");
    build_chain(&chain, &base, &rounds);
    drop(base);
    let check = dir.path().join("check.raw");
    workload::materialize(&w.replica, MIDDLE, &check);
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&check)
        .arg(overlay(&chain, MIDDLE - 1)));
    std::fs::remove_file(&check).unwrap();

    let mut g = c.benchmark_group("peer");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));

    let mat = "peer/materialize/standby/point50of100";
    let mat_floor = "peer/materialize/qcow2-chain-convert+fdatasync";
    let mat_nosync = "qcow2-chain-convert (no fdatasync)";
    let mid = overlay(&chain, MIDDLE - 1);
    g.throughput(Throughput::Bytes(DISK_BYTES));
    let last_floor = Cell::new(Duration::ZERO);
    g.bench_function(mat, |b| {
        b.iter_custom(|iters| {
            common::paired(
                mat,
                mat_floor,
                DISK_BYTES,
                iters,
                || {
                    let out = common::scratch();
                    let took =
                        workload::materialize(&w.replica, MIDDLE, &out.path().join("out.raw"));
                    workload::note_pair(mat, last_floor.get(), took);
                    took
                },
                || {
                    let out = common::scratch();
                    let (conv, durable) =
                        workload::qemu_convert("qcow2", &mid, &out.path().join("out.raw"));
                    common::record(mat_nosync, DISK_BYTES, conv);
                    last_floor.set(durable);
                    durable
                },
            )
        })
    });

    let cut = "peer/cut/standby";
    let cut_floor = "peer/cut/qemu-img-create-overlay";
    // (Standby, the round/overlay number the next cut makes)
    let state: RefCell<(Writer, u64)> = RefCell::new((w, POINTS));
    g.throughput(Throughput::Elements(1));
    // Criterion sizes samples by the wall time of a whole iteration (both sides' writes and
    // cuts, ~0.5 s): 15 s gives about 3 pairs per sample.
    g.measurement_time(Duration::from_secs(15));
    g.bench_function(cut, |b| {
        b.iter_custom(|iters| {
            common::paired(
                cut,
                cut_floor,
                1,
                iters,
                || {
                    let mut st = state.borrow_mut();
                    let start = Instant::now();
                    st.0.replica
                        .cut_point(PointKind::CrashConsistent, None)
                        .unwrap();
                    let took = start.elapsed();
                    workload::note_pair(cut, last_floor.get(), took);
                    took
                },
                || {
                    // The same round of writes into both, durable; then the peer's cut.
                    let mut st = state.borrow_mut();
                    let r = st.1;
                    let writes = rounds.round(r);
                    for (off, data) in &writes {
                        st.0.write(*off, data);
                    }
                    st.0.replica.flush().unwrap();
                    let tmp = chain.join(format!("round{r}"));
                    qemu_write(&overlay(&chain, r - 1), &writes, &tmp);
                    st.1 += 1;
                    last_floor.set(create_overlay(&chain, r));
                    last_floor.get()
                },
            )
        })
    });
    g.finish();

    print_ratios(
        "peer: materialize",
        &[Ratio {
            case: mat,
            floor: mat_floor,
            target: 3.0,
        }],
    );
    workload::print_spread(mat, false);
    if let (Some(s), Some(q)) = (common::median_rate(mat), common::median_rate(mat_nosync)) {
        println!(
            "{mat_nosync}: {:.1} MB/s; Standby / that = {:.2}",
            q / 1e6,
            s / q
        );
    }
    let st = state.borrow();
    println!(
        "\n== peer: cutting a point after {} × {} KiB writes (chain now {} images, {} points) ==",
        workload::ROUND_WRITES,
        ROUND_WRITE / 1024,
        st.1,
        st.0.replica.points().len()
    );
    if let (Some(s), Some(q), Some(r)) = (
        median_time(cut),
        median_time(cut_floor),
        common::ratio(cut, cut_floor),
    ) {
        println!(
            "standby cut_point {:.2} ms, qemu-img create {:.2} ms, ratio (peer/standby, median of pairs) {:.2}, target 3.00{}",
            s.as_secs_f64() * 1e3,
            q.as_secs_f64() * 1e3,
            r,
            if r >= 3.0 { " ok" } else { " BELOW" }
        );
    }
    workload::print_spread(cut, false);
    println!();
}

criterion_group!(benches, bench);
criterion_main!(benches);
