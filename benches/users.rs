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

use client::Pattern;
use deploy::{compare, standby, url, Deployment, Kind, QemuNbd, Res, VM};
use parking_lot::Mutex;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

fn wanted(row: &str) -> bool {
    match std::env::var("STANDBY_USERS_CASES") {
        Ok(list) => list.split(',').any(|w| w.trim() == row),
        Err(_) => true,
    }
}

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

// ---------------------------------------------------------------------------------------
// during: RPO, a point and a test failover while a bulk copy runs.

/// `vm.json`'s point id and disks (path, sha256).
fn manifest(dir: &Path) -> Res<(u64, Vec<(PathBuf, String)>)> {
    let text = std::fs::read_to_string(dir.join("vm.json"))
        .map_err(|e| format!("{}: {e}", dir.join("vm.json").display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("vm.json: {e}"))?;
    let id = v["point"]["id"]
        .as_u64()
        .ok_or_else(|| "vm.json names no point id".to_string())?;
    let disks = v["disks"]
        .as_array()
        .ok_or_else(|| "vm.json lists no disks".to_string())?
        .iter()
        .map(|d| {
            (
                PathBuf::from(d["path"].as_str().unwrap_or_default()),
                d["sha256"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    Ok((id, disks))
}

/// Every disk's sha256 equals what `vm.json` says.
fn check_manifest(disks: &[(PathBuf, String)]) -> Res<()> {
    for (path, want) in disks {
        let got = deploy::sha256(path)?;
        if &got != want {
            return Err(format!(
                "{}: sha256 {got}, vm.json says {want}",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Serve `--point ID` with `standby mount` and compare it with `image`.
fn compare_with_mount(d: &Deployment, id: u64, image: &Path, timeout: Duration) -> Res<()> {
    let addr = deploy::free_addr([127, 0, 0, 1]);
    let (listen, point) = (addr.to_string(), id.to_string());
    let mut m = deploy::Proc::spawn(
        "standby mount",
        deploy::standby_bin(),
        &["mount", VM, "--point", &point, "--listen", &listen],
        Some(&d.vault),
        &d.dir.join("mount.log"),
    );
    m.wait_listening(addr, timeout)?;
    compare(image.to_str().unwrap(), &url(addr))?;
    m.stop(STOP)
}

fn during(kind: Kind, src: &Path, s: &Sizes) {
    let label = kind.label();
    let rpo_case = format!("RPO during the bulk copy ({label})");
    let tf_case = format!("test failover mid-copy, then bit-exact check ({label})");
    let point_case = format!("`standby point` mid-copy ({label})");
    let tf_target = "completes, bit-exact";
    guarded(&rpo_case.clone(), "< 5 s", || {
        let dir = common::scratch();
        let mut d = Deployment::start(kind, dir.path(), s.bulk)?;
        let target = url(d.addr);
        let src_owned = src.to_path_buf();
        // The RPO, every 200 ms, while the copy runs.
        let stop = Arc::new(AtomicBool::new(false));
        let copy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let r = convert(&src_owned, &target);
                stop.store(true, Ordering::SeqCst);
                r
            })
        };
        let sampler = {
            let (stop, vault) = (stop.clone(), d.vault.clone());
            std::thread::spawn(move || {
                let (mut rpo, mut errors) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    match standby(&vault, &["status", VM, "--json"], Duration::from_secs(10))
                        .and_then(|o| {
                            serde_json::from_str::<serde_json::Value>(&o).map_err(|e| e.to_string())
                        }) {
                        Ok(v) => match v["vms"][0]["rpo_seconds"].as_f64() {
                            Some(r) => rpo.push(r),
                            None => errors.push("no rpo_seconds".to_string()),
                        },
                        Err(e) => errors.push(e),
                    }
                    std::thread::sleep(Duration::from_millis(200).saturating_sub(t.elapsed()));
                }
                (rpo, errors)
            })
        };
        // The middle of the copy: half of what a copy of this size took in the bulk row,
        // else a second.
        let key = format!("bulk/{label}/random");
        let half = common::median_rate(&key)
            .map(|r| Duration::from_secs_f64(s.bulk as f64 / r / 2.0))
            .unwrap_or(Duration::from_secs(1));
        std::thread::sleep(half);
        let t = Instant::now();
        let point = standby(&d.vault, &["point", VM], s.dr_timeout);
        let point_took = t.elapsed();
        let copy_running = !copy.is_finished();
        let t = Instant::now();
        let tf = standby(
            &d.vault,
            &["test-failover", VM, "--point", "latest-processed"],
            s.dr_timeout,
        );
        let tf_took = t.elapsed();
        let copied = copy
            .join()
            .map_err(|_| "copy thread panicked".to_string())??;
        stop.store(true, Ordering::SeqCst);
        let (mut rpo, errors) = sampler.join().map_err(|_| "sampler panicked")?;
        compare(src.to_str().unwrap(), &url(d.addr))?;
        match point {
            Ok(_) => push(
                &point_case,
                ms(point_took),
                String::new(),
                String::new(),
                "—",
                None,
            ),
            Err(e) => failed(&point_case, "—", &e),
        }
        if rpo.is_empty() {
            failed(
                &rpo_case,
                "< 5 s",
                &format!(
                    "no RPO sample: {}",
                    errors.first().cloned().unwrap_or_default()
                ),
            );
        } else {
            rpo.sort_by(|a, b| a.total_cmp(b));
            let max = rpo[rpo.len() - 1];
            push(
                &rpo_case,
                format!(
                    "median {:.2} s, max {max:.2} s ({} samples over {:.1} s{})",
                    rpo[rpo.len() / 2],
                    rpo.len(),
                    copied.as_secs_f64(),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(", {} status calls failed", errors.len())
                    }
                ),
                String::new(),
                String::new(),
                "< 5 s",
                Some(max < 5.0 && errors.is_empty()),
            );
        }
        let tf_result = (|| -> Res<String> {
            tf?;
            let st = d.status()?;
            let tdir = st["test_failover"]["dir"]
                .as_str()
                .ok_or("status shows no test failover")?
                .to_string();
            let (id, disks) = manifest(Path::new(&tdir))?;
            check_manifest(&disks)?;
            if kind == Kind::Embedded {
                d.stop_agent(STOP)?;
            }
            for (path, _) in &disks {
                compare_with_mount(&d, id, path, s.dr_timeout)?;
            }
            standby(&d.vault, &["test-failover-cleanup", VM], s.dr_timeout)?;
            Ok(format!(
                "{} ({}), point {id} bit-exact",
                ms(tf_took),
                if copy_running {
                    "started mid-copy"
                } else {
                    "started after the copy ended"
                }
            ))
        })();
        match tf_result {
            Ok(what) => push(
                &tf_case,
                what,
                String::new(),
                String::new(),
                tf_target,
                Some(true),
            ),
            Err(e) => failed(&tf_case, tf_target, &e),
        }
        d.stop(STOP)?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// failover and mount reads: a VM holding the system files with random writes over them.

fn failover_and_mount(
    system: &Path,
    s: &Sizes,
    pool: &[u8],
    scratch: &Path,
    do_failover: bool,
    do_mount: bool,
) {
    let case = "`standby failover --point latest`, page cache dropped (embedded)";
    let key = "failover";
    let mut mounted: Option<(Deployment, tempfile::TempDir, u64, PathBuf, PathBuf)> = None;
    guarded(case, "≥ 0.8", || {
        let dir = common::scratch();
        let mut d = Deployment::start(Kind::Embedded, dir.path(), s.bulk)?;
        // The system files, a point, then 4 KiB random writes over 1/64 of the disk.
        convert(system, &url(d.addr))?;
        let t = Instant::now();
        standby(&d.vault, &["point", VM], STOP)?;
        verbose(&format!("point after the copy: {:?}", t.elapsed()));
        let pattern = Pattern::RandomWrite {
            req: 4096,
            total: s.bulk / 64,
            disk: s.bulk,
            flush_every: FLUSH_EVERY,
        };
        client::drive(d.addr, s.bulk, pattern, pool, DEPTH, false);
        d.stop(STOP)?;
        let model = scratch.join("model-failover.raw");
        std::fs::copy(system, &model).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&model)
                .map_err(|e| e.to_string())?;
            for op in client::ops(pattern, pool) {
                if let client::Op::Write(at, data) = op {
                    f.write_all_at(data, at).map_err(|e| e.to_string())?;
                }
            }
        }
        compare(model.to_str().unwrap(), d.disk.to_str().unwrap())?;
        let out = d.vault.join("failover");
        let failover = |check: bool| -> Res<Duration> {
            let _ = std::fs::remove_dir_all(&out);
            if !deploy::drop_caches() {
                return Err("cannot drop the page cache (needs root)".into());
            }
            let t = Instant::now();
            standby(&d.vault, &["failover", VM, "--point", "latest"], STOP)?;
            let took = t.elapsed();
            if check {
                let st = d.status()?;
                let fdir = st["failover"]["dir"]
                    .as_str()
                    .ok_or("status shows no failover")?
                    .to_string();
                let (_, disks) = manifest(Path::new(&fdir))?;
                check_manifest(&disks)?;
                compare(model.to_str().unwrap(), disks[0].0.to_str().unwrap())?;
            }
            Ok(took)
        };
        let floor_out = scratch.join("floor-failover.raw");
        let floor = |check: bool| -> Res<Duration> {
            let _ = std::fs::remove_file(&floor_out);
            if !deploy::drop_caches() {
                return Err("cannot drop the page cache (needs root)".into());
            }
            let t = Instant::now();
            deploy::run(
                "qemu-img",
                &[
                    "convert",
                    "-t",
                    "writeback",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    model.to_str().unwrap(),
                    floor_out.to_str().unwrap(),
                ],
                None,
                STOP,
            )?;
            let took = t.elapsed();
            if check {
                compare(model.to_str().unwrap(), floor_out.to_str().unwrap())?;
            }
            Ok(took)
        };
        failover(true)?;
        if do_failover {
            floor(true)?;
            common::paired(
                key,
                &format!("floor/{key}"),
                s.bulk,
                s.iters,
                || or_panic(failover(false)),
                || or_panic(floor(false)),
            );
            rate_row(case, key, 0.8);
        }
        let st = d.status()?;
        let fdir = st["failover"]["dir"]
            .as_str()
            .ok_or("status shows no failover")?
            .to_string();
        let (id, disks) = manifest(Path::new(&fdir))?;
        let _ = std::fs::remove_file(&floor_out);
        // Dropped in order: the deployment, then its directory.
        mounted = Some((d, dir, id, disks[0].0.clone(), model));
        Ok(())
    });
    if !do_mount {
        return;
    }
    let Some((d, _dir, id, image, model)) = mounted else {
        failed("mount reads", "≥ 0.8", "the failover setup failed");
        return;
    };
    let d = &d;
    for req in [64u32 << 10, 1 << 20] {
        let case = format!(
            "mount reads, {} KiB requests, 16 in flight (embedded)",
            req >> 10
        );
        let key = format!("mount/{}k", req >> 10);
        guarded(&case.clone(), "≥ 0.8", || {
            let addr = deploy::free_addr([127, 0, 0, 1]);
            let (listen, point) = (addr.to_string(), id.to_string());
            let mut m = deploy::Proc::spawn(
                "standby mount",
                deploy::standby_bin(),
                &["mount", VM, "--point", &point, "--listen", &listen],
                Some(&d.vault),
                &d.dir.join("mount.log"),
            );
            m.wait_listening(addr, s.dr_timeout)?;
            let q = QemuNbd::start(&image, true, &d.dir.join("qemu-nbd-r.log"))?;
            let pattern = Pattern::SeqRead { req, disk: s.bulk };
            compare(model.to_str().unwrap(), &url(addr))?;
            let (_, a) = client::drive(addr, s.bulk, pattern, &[], DEPTH, true);
            let (_, b) = client::drive(q.addr, s.bulk, pattern, &[], DEPTH, true);
            if a != b {
                return Err("the mount serves other bytes than qemu-nbd".into());
            }
            common::paired(
                &key,
                &format!("floor/{key}"),
                s.bulk,
                s.iters,
                || client::drive(addr, s.bulk, pattern, &[], DEPTH, false).0,
                || client::drive(q.addr, s.bulk, pattern, &[], DEPTH, false).0,
            );
            rate_row(&case, &key, 0.8);
            m.stop(STOP)
        });
    }
}

fn main() {
    let started = Instant::now();
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
            during(kind, &random, &s);
        }
    }
    if wanted("commit") {
        commit(&s, &pool, scratch.path());
    }
    if wanted("failover") || wanted("mount") {
        failover_and_mount(
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
