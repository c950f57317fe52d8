//! `users`: the commands users run, each against its floor in the same run, back to back.
//!
//! Everything goes through the real `standby` binary (the one cargo builds for this
//! benchmark, target/release/standby), started exactly as README tells users, with its
//! background work running (the embedded agent processes its log every second; the
//! two-site deployment runs `cache serve`, `agent --cache --journal`, and
//! `process --cache --follow`), and real NBD clients: `qemu-img` and the pipelined client
//! in `users/client.rs`. Floors are `qemu-nbd` / `qemu-img` doing the same job.
//!
//! Rows (sizes shrink 8× with `STANDBY_USERS_QUICK=1`; `STANDBY_USERS_CASES=bulk,pipelined,
//! commit,during,failover,mount` picks rows; `STANDBY_USERS_ITERS` pairs per row, default 3):
//!
//! - bulk: `qemu-img convert -n -f raw -O raw SRC nbd://ADDR/os` of 512 MiB of system files
//!   (`tar cf - /usr/lib | head -c 512M`) and of random data, into a fresh 512 MiB disk;
//!   floor: the same command into `qemu-nbd -f raw -t --cache=writeback` on a fresh sparse
//!   file. Embedded and two-site.
//! - pipelined: 256 MiB of 64 KiB sequential writes and 64 MiB of 4 KiB random writes,
//!   16 in flight, FLUSH every 16 MiB and at the end; floor: qemu-nbd, same client.
//!   Embedded and two-site.
//! - commit: 2,000 4 KiB writes with FUA, one at a time (a database's commits): p50, p99.
//!   The client checks that each server offers FUA; qemu-nbd (`--cache=writeback`) does
//!   one fdatasync per FUA write (strace: 101 fdatasync for 100 FUA writes).
//! - during: while a bulk copy runs, `standby status web01 --json` every 200 ms (RPO), and
//!   in its middle `standby point web01` then `standby test-failover web01 --point
//!   latest-processed`; afterwards the test failover's disk is checked against its
//!   `vm.json` sha256 and against `standby mount web01 --point ID`, then cleaned up.
//! - failover: `standby failover web01 --point latest` with the page cache dropped first;
//!   floor: `qemu-img convert -t writeback -f raw -O raw` of a raw file holding the same
//!   bytes, page cache dropped first.
//! - mount: `standby mount web01 --point ID` read whole, 64 KiB and 1 MiB requests, 16 in
//!   flight; floor: `qemu-nbd -r -f raw` on the point's materialized image.
//!
//! Every case first checks once that the server ends with (or serves) the right bytes
//! (`qemu-img compare` against the source or a model of what the client wrote). A step
//! that fails or hangs (each has a timeout) is reported as `failed: reason` in the table.
//!
//! Rows do not use criterion's sampler: its minimum (10 samples plus warm-up per case)
//! would take the 512 MiB rows past the time budget on a 2-core machine; each row runs
//! [`common::paired`] a fixed number of times instead (median of the per-pair ratios).

#[path = "users/client.rs"]
mod client;
mod common;
#[path = "users/deploy.rs"]
mod deploy;
#[path = "users/recovery.rs"]
mod recovery;

use client::Pattern;
use deploy::{compare, standby, url, Deployment, Kind, QemuNbd, Res, VM};
use parking_lot::Mutex;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const DEPTH: usize = 16;
const FLUSH_EVERY: u64 = 16 * MIB;
const STOP: Duration = Duration::from_secs(120);

struct Sizes {
    bulk: u64,
    pipe_disk: u64,
    seq: u64,
    random: u64,
    commits: u64,
    iters: u64,
    /// How long a DR command may wait (for a lock) before it is reported as failed.
    dr_timeout: Duration,
}

fn sizes() -> Sizes {
    let quick = std::env::var("STANDBY_USERS_QUICK").is_ok_and(|v| v != "0");
    let div = if quick { 8 } else { 1 };
    Sizes {
        bulk: 512 * MIB / div,
        pipe_disk: 256 * MIB / div,
        seq: 256 * MIB / div,
        random: 64 * MIB / div,
        commits: 2000 / div,
        iters: std::env::var("STANDBY_USERS_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
        dr_timeout: Duration::from_secs(if quick { 10 } else { 30 }),
    }
}

/// `STANDBY_USERS_VERBOSE=1`: where each case's wall time goes.
fn verbose(what: &str) {
    if std::env::var_os("STANDBY_USERS_VERBOSE").is_some() {
        eprintln!("users:   {what}");
    }
}

/// Rows are `bulk`, `pipelined`, `commit`, `during`, `failover`, `mount`. A row runs if
/// `STANDBY_USERS_CASES` lists it (or is unset), and, when `cargo bench -- FILTER` passes
/// filters (as criterion takes them), if one of them is part of `users/ROW`, so that
/// `cargo bench -- nbd-write` does not start this 10-minute benchmark.
fn wanted(row: &str) -> bool {
    let listed = match std::env::var("STANDBY_USERS_CASES") {
        Ok(list) => list.split(',').any(|w| w.trim() == row),
        Err(_) => true,
    };
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let name = format!("users/{row}");
    listed && (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
}

const ROWS_ALL: [&str; 6] = ["bulk", "pipelined", "commit", "during", "failover", "mount"];

// ---------------------------------------------------------------------------------------
// The table.

struct Row {
    case: String,
    standby: String,
    floor: String,
    ratio: String,
    target: String,
    ok: Option<bool>,
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

fn push(case: &str, standby: String, floor: String, ratio: String, target: &str, ok: Option<bool>) {
    ROWS.lock().push(Row {
        case: case.into(),
        standby,
        floor,
        ratio,
        target: target.into(),
        ok,
    });
}

fn failed(case: &str, target: &str, why: &str) {
    push(
        case,
        format!("failed: {why}"),
        String::new(),
        String::new(),
        target,
        Some(false),
    );
}

fn mbs(rate: f64) -> String {
    format!("{:.0} MB/s", rate / 1e6)
}

fn ms(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 0.01 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// A throughput row from what [`common::paired`] recorded under `key` and `floor/key`.
fn rate_row(case: &str, key: &str, target: f64) {
    let floor = format!("floor/{key}");
    match (
        common::median_rate(key),
        common::median_rate(&floor),
        common::ratio(key, &floor),
    ) {
        (Some(c), Some(f), Some(r)) => push(
            case,
            mbs(c),
            mbs(f),
            format!("{r:.2}"),
            &format!("≥ {target}"),
            Some(r >= target),
        ),
        _ => failed(case, &format!("≥ {target}"), "not measured"),
    }
}

fn print_table(started: Instant) {
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    println!();
    println!(
        "== users: the commands users run, against their floors ({}, {:.0} s) ==",
        &date[..10],
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| case | Standby | floor | ratio | target | |");
    println!("|---|---:|---:|---:|---:|---|");
    for r in ROWS.lock().iter() {
        let mark = match r.ok {
            Some(true) => "✓",
            Some(false) => "✗",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.case, r.standby, r.floor, r.ratio, r.target, mark
        );
    }
    println!();
}

/// Run one case; a panic or an error becomes a `failed` row.
fn guarded(case: &str, target: &str, f: impl FnOnce() -> Res<()>) {
    let t = Instant::now();
    eprintln!("users: {case} ...");
    let r = catch_unwind(AssertUnwindSafe(f));
    let why = match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(p) => Some(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()),
        ),
    };
    if let Some(why) = why {
        eprintln!("users: {case}: failed: {why}");
        failed(case, target, &why);
    }
    eprintln!("users: {case}: {:.1} s", t.elapsed().as_secs_f64());
}

fn or_panic<T>(r: Res<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------
// Inputs.

/// `tar cf - /usr/lib | head -c SIZE` (padded with zeros if shorter) and `SIZE` random
/// bytes, made once.
fn inputs(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let system = dir.join("system.raw");
    let random = dir.join("random.raw");
    let sh = format!(
        "tar cf - /usr/lib 2>/dev/null | head -c {size} > '{}'; truncate -s {size} '{}'; \
         head -c {size} /dev/urandom > '{}'",
        system.display(),
        system.display(),
        random.display()
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &sh])
        .status()
        .expect("sh");
    assert!(st.success(), "making the inputs failed");
    (system, random)
}

/// `qemu-img convert -n -f raw -O raw SRC nbd://ADDR/os`, timed.
fn convert(src: &Path, target: &str) -> Res<Duration> {
    let t = Instant::now();
    deploy::run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            target,
        ],
        None,
        Duration::from_secs(600),
    )?;
    Ok(t.elapsed())
}

// ---------------------------------------------------------------------------------------
// bulk: qemu-img convert into the agent vs into qemu-nbd.

fn standby_copy(kind: Kind, src: &Path, size: u64, check: bool) -> Res<Duration> {
    let dir = common::scratch();
    let mut d = Deployment::start(kind, dir.path(), size)?;
    let took = convert(src, &url(d.addr))?;
    if check {
        compare(src.to_str().unwrap(), &url(d.addr))?;
    }
    d.stop(STOP)?;
    if check {
        compare(src.to_str().unwrap(), d.disk.to_str().unwrap())?;
    }
    Ok(took)
}

fn qemu_copy(src: &Path, size: u64, check: bool) -> Res<Duration> {
    let dir = common::scratch();
    let image = dir.path().join("os.raw");
    deploy::sparse(&image, size);
    let q = QemuNbd::start(&image, false, &dir.path().join("qemu-nbd.log"))?;
    let took = convert(src, &url(q.addr))?;
    if check {
        compare(src.to_str().unwrap(), &url(q.addr))?;
    }
    Ok(took)
}

fn bulk(kind: Kind, data: &str, src: &Path, s: &Sizes) {
    let case = format!("bulk copy, {data} ({})", kind.label());
    let key = format!("bulk/{}/{data}", kind.label());
    guarded(&case.clone(), "≥ 0.8", || {
        standby_copy(kind, src, s.bulk, true)?;
        qemu_copy(src, s.bulk, true)?;
        common::paired(
            &key,
            &format!("floor/{key}"),
            s.bulk,
            s.iters,
            || or_panic(standby_copy(kind, src, s.bulk, false)),
            || or_panic(qemu_copy(src, s.bulk, false)),
        );
        rate_row(&case, &key, 0.8);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// pipelined: the same client against the agent and against qemu-nbd.

fn standby_pipelined(
    kind: Kind,
    pattern: Pattern,
    disk: u64,
    pool: &[u8],
    model: Option<&Path>,
) -> Res<Duration> {
    let dir = common::scratch();
    let t = Instant::now();
    let mut d = Deployment::start(kind, dir.path(), disk)?;
    let started = t.elapsed();
    let (took, _) = client::drive(d.addr, disk, pattern, pool, DEPTH, false);
    if let Some(m) = model {
        compare(m.to_str().unwrap(), &url(d.addr))?;
    }
    let t = Instant::now();
    d.stop(STOP)?;
    let stopped = t.elapsed();
    if let Some(m) = model {
        compare(m.to_str().unwrap(), d.disk.to_str().unwrap())?;
    }
    verbose(&format!(
        "{} {pattern:?}: start {started:?}, run {took:?}, stop {stopped:?}",
        kind.label()
    ));
    Ok(took)
}

fn qemu_pipelined(pattern: Pattern, disk: u64, pool: &[u8], model: Option<&Path>) -> Res<Duration> {
    let dir = common::scratch();
    let image = dir.path().join("os.raw");
    let t = Instant::now();
    deploy::sparse(&image, disk);
    let q = QemuNbd::start(&image, false, &dir.path().join("qemu-nbd.log"))?;
    let started = t.elapsed();
    let (took, _) = client::drive(q.addr, disk, pattern, pool, DEPTH, false);
    if let Some(m) = model {
        compare(m.to_str().unwrap(), &url(q.addr))?;
    }
    let t = Instant::now();
    drop(q);
    verbose(&format!(
        "qemu-nbd {pattern:?}: start {started:?}, run {took:?}, stop {:?}",
        t.elapsed()
    ));
    Ok(took)
}

fn pipelined(kind: Kind, s: &Sizes, pool: &[u8], scratch: &Path) {
    let cases = [
        (
            "seq-64k",
            "64 KiB sequential writes",
            Pattern::SeqWrite {
                req: 64 << 10,
                total: s.seq,
                flush_every: FLUSH_EVERY,
            },
            s.seq,
        ),
        (
            "random-4k",
            "4 KiB random writes",
            Pattern::RandomWrite {
                req: 4096,
                total: s.random,
                disk: s.pipe_disk,
                flush_every: FLUSH_EVERY,
            },
            s.random,
        ),
    ];
    for (name, what, pattern, bytes) in cases {
        let case = format!("{what}, 16 in flight ({})", kind.label());
        let key = format!("pipelined/{}/{name}", kind.label());
        guarded(&case.clone(), "≥ 0.8", || {
            let model = scratch.join(format!("model-{name}.raw"));
            client::model_image(&model, s.pipe_disk, pattern, pool);
            standby_pipelined(kind, pattern, s.pipe_disk, pool, Some(&model))?;
            qemu_pipelined(pattern, s.pipe_disk, pool, Some(&model))?;
            common::paired(
                &key,
                &format!("floor/{key}"),
                bytes,
                s.iters,
                || or_panic(standby_pipelined(kind, pattern, s.pipe_disk, pool, None)),
                || or_panic(qemu_pipelined(pattern, s.pipe_disk, pool, None)),
            );
            rate_row(&case, &key, 0.8);
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------
// commit: one FUA write at a time.

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn commit(s: &Sizes, pool: &[u8], scratch: &Path) {
    let case = "database commit: 4 KiB write + FUA, one at a time (embedded)";
    guarded(case, "≤ 1.25×", || {
        let disk = s.pipe_disk;
        let model = scratch.join("model-commits.raw");
        client::commits_model(&model, disk, s.commits, pool);
        let standby_side = |check: bool| -> Res<Vec<Duration>> {
            let dir = common::scratch();
            let mut d = Deployment::start(Kind::Embedded, dir.path(), disk)?;
            let lat = client::commits(d.addr, disk, s.commits, pool);
            if check {
                compare(model.to_str().unwrap(), &url(d.addr))?;
            }
            d.stop(STOP)?;
            if check {
                compare(model.to_str().unwrap(), d.disk.to_str().unwrap())?;
            }
            Ok(lat)
        };
        let qemu_side = |check: bool| -> Res<Vec<Duration>> {
            let dir = common::scratch();
            let image = dir.path().join("os.raw");
            deploy::sparse(&image, disk);
            let q = QemuNbd::start(&image, false, &dir.path().join("qemu-nbd.log"))?;
            let lat = client::commits(q.addr, disk, s.commits, pool);
            if check {
                compare(model.to_str().unwrap(), &url(q.addr))?;
            }
            Ok(lat)
        };
        standby_side(true)?;
        qemu_side(true)?;
        let (mut sl, mut ql) = (Vec::new(), Vec::new());
        common::paired(
            "commit",
            "floor/commit",
            s.commits * 4096,
            s.iters,
            || {
                let l = or_panic(standby_side(false));
                let t = l.iter().sum();
                sl.extend(l);
                t
            },
            || {
                let l = or_panic(qemu_side(false));
                let t = l.iter().sum();
                ql.extend(l);
                t
            },
        );
        for (name, v) in [("standby", &sl), ("qemu-nbd", &ql)] {
            let slow: Vec<String> = v
                .iter()
                .enumerate()
                .filter(|(_, d)| d.as_secs_f64() > 0.01)
                .map(|(i, d)| {
                    format!(
                        "{}:{}:{:.0}",
                        i / s.commits as usize,
                        i % s.commits as usize,
                        d.as_secs_f64() * 1e3
                    )
                })
                .collect();
            verbose(&format!(
                "commit {name} slow (run:index:ms): {}",
                slow.join(" ")
            ));
        }
        for (name, v) in [("standby", &mut sl), ("qemu-nbd", &mut ql)] {
            let tail: Vec<String> = [0.5, 0.9, 0.95, 0.99, 0.999, 1.0]
                .iter()
                .map(|&q| format!("{:.3}", percentile(v, q).as_secs_f64() * 1e3))
                .collect();
            verbose(&format!(
                "commit latency {name} p50/90/95/99/99.9/max ms: {}",
                tail.join(" ")
            ));
        }
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (a, b) = (percentile(&mut sl, q), percentile(&mut ql, q));
            let r = a.as_secs_f64() / b.as_secs_f64().max(1e-9);
            push(
                &format!("database commit {label} latency (embedded)"),
                ms(a),
                ms(b),
                format!("{r:.2}×"),
                "≤ 1.25×",
                Some(r <= 1.25),
            );
        }
        Ok(())
    });
}

fn main() {
    let started = Instant::now();
    if !ROWS_ALL.iter().any(|r| wanted(r)) {
        println!("users: no row matches the filter");
        return;
    }
    let s = sizes();
    let scratch = common::scratch();
    eprintln!(
        "users: standby at {}, scratch {}, bulk {} MiB, {} pairs a row",
        deploy::standby_bin(),
        scratch.path().display(),
        s.bulk >> 20,
        s.iters
    );
    let (system, random) = inputs(scratch.path(), s.bulk);
    let pool = common::noise(64 << 20);
    for kind in [Kind::Embedded, Kind::TwoSite] {
        if wanted("bulk") {
            bulk(kind, "system files", &system, &s);
            bulk(kind, "random", &random, &s);
        }
        if wanted("pipelined") {
            pipelined(kind, &s, &pool, scratch.path());
        }
        if wanted("during") {
            recovery::during(kind, &random, &s);
        }
    }
    if wanted("commit") {
        commit(&s, &pool, scratch.path());
    }
    if wanted("failover") || wanted("mount") {
        recovery::failover_and_mount(
            &system,
            &s,
            &pool,
            scratch.path(),
            wanted("failover"),
            wanted("mount"),
        );
    }
    print_table(started);
}
