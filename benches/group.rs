//! `group`: 16 VMs as users run them — `standby protect`, `standby group create`, one
//! `standby agent VM` process per VM (the embedded default) — each written by its own NBD
//! client: 4 KiB FUA writes one at a time, each waited for (a database's commits,
//! `client::commits`). One run, two phases: first without group points, then with
//! `standby point --group g` run every second. Printed: each member's p99 write latency
//! without and with group points, p50/p99 over all members, the p99 added and its ratio,
//! and the time to cut one group point of 16 VMs (the command's wall time as a user sees
//! it, process start included; median and max: it includes the settle step, which waits for
//! the members' own processing passes). Target: ≤ 1 ms of p99 added. Group points start on
//! a fixed schedule, each whether or not the one before has returned.
//!
//! `cargo bench --bench group` writes 8 s per phase; `-- --test` (or
//! STANDBY_GROUP_PHASE_S=N) a short run that checks it works. Wall-clock latencies on a
//! shared machine are indicative; take figures on a quiet one.

#[path = "users/client.rs"]
#[allow(dead_code)]
mod client;
mod common;
#[path = "users/deploy.rs"]
#[allow(dead_code)]
mod deploy;

use deploy::{free_addr, run, standby_bin, Proc};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const VMS: usize = 16;
const DISK_BYTES: u64 = 64 << 20;
/// Commits per round of a client (rounds repeat until the phase ends).
const ROUND: u64 = 200;
/// How often a group point is cut in the second phase.
const EVERY: Duration = Duration::from_secs(1);

/// How long each phase writes.
fn phase_len() -> Duration {
    if let Some(s) = std::env::var("STANDBY_GROUP_PHASE_S")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Duration::from_secs(s);
    }
    if std::env::args().any(|a| a == "--test") {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(8)
    }
}

fn p(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn standby(vault: &Path, args: &[&str]) -> String {
    run(standby_bin(), args, Some(vault), Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("standby {args:?}: {e}"))
}

/// Every member's latencies over one phase; with `every`, `standby point --group g` runs
/// that often meanwhile, and its wall times are returned too.
fn phase(
    vault: &Path,
    addrs: &[std::net::SocketAddr],
    pool: &[u8],
    len: Duration,
    every: Option<Duration>,
) -> (Vec<Vec<Duration>>, Vec<Duration>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writers: Vec<_> = addrs
            .iter()
            .map(|a| {
                let stop = &stop;
                s.spawn(move || {
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        lat.extend(client::commits(*a, DISK_BYTES, ROUND, pool));
                    }
                    lat
                })
            })
            .collect();
        let cuts = s.spawn(|| {
            // On a fixed schedule: one `standby point --group g` starts every `every`,
            // whether or not the one before has returned (its settle step may still wait
            // for the members' own passes).
            let start = Instant::now();
            let mut running = Vec::new();
            let mut next = start;
            while start.elapsed() < len {
                match every {
                    Some(e) => {
                        next += e;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        let vault = vault.to_path_buf();
                        running.push(std::thread::spawn(move || {
                            let t = Instant::now();
                            let out = standby(&vault, &["point", "--group", "g"]);
                            assert!(out.starts_with("cut group point"), "{out}");
                            t.elapsed()
                        }));
                    }
                    None => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            let cuts = running.into_iter().map(|t| t.join().unwrap()).collect();
            stop.store(true, Ordering::SeqCst);
            cuts
        });
        let cuts = cuts.join().unwrap();
        let lats = writers.into_iter().map(|w| w.join().unwrap()).collect();
        (lats, cuts)
    })
}

fn main() {
    let len = phase_len();
    let tmp = common::scratch();
    let vault = tmp.path().join("vault");
    standby(&vault, &["init", vault.to_str().unwrap()]);
    let names: Vec<String> = (0..VMS).map(|i| format!("vm{i:02}")).collect();
    let mut create = vec!["group", "create", "g"];
    for n in &names {
        let disk = format!("{}=new:{}MiB", client::EXPORT, DISK_BYTES >> 20);
        standby(&vault, &["protect", n, "--disk", &disk]);
        create.extend(["--vm", n]);
    }
    standby(&vault, &create);
    let mut agents = Vec::new();
    let mut addrs = Vec::new();
    for n in &names {
        let addr = free_addr([127, 0, 0, 1]);
        let mut a = Proc::spawn(
            &format!("agent {n}"),
            standby_bin(),
            &["agent", n, "--listen", &addr.to_string()],
            Some(&vault),
            &tmp.path().join(format!("agent-{n}.log")),
        );
        a.wait_listening(addr, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        agents.push(a);
        addrs.push(addr);
    }
    let pool = common::noise(1 << 20);
    let (mut without, _) = phase(&vault, &addrs, &pool, len, None);
    let (mut with, mut cuts) = phase(&vault, &addrs, &pool, len, Some(EVERY));
    for mut a in agents {
        let what = a.what.clone();
        a.stop(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let listed: serde_json::Value =
        serde_json::from_str(&standby(&vault, &["points", "--group", "g", "--json"]))
            .expect("points --json");
    let listed = listed["points"].as_array().map_or(0, |p| p.len());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "group: {VMS} VMs (one `standby agent` each), 4 KiB FUA commits one at a time per VM, {len:?} per phase"
    );
    println!("  member   p99 without   p99 with   added");
    for (i, n) in names.iter().enumerate() {
        let (a, b) = (p(&mut without[i], 0.99), p(&mut with[i], 0.99));
        println!(
            "  {n}   {:>8.2} ms {:>8.2} ms {:>+7.2} ms",
            ms(a),
            ms(b),
            ms(b) - ms(a)
        );
    }
    let summary = |lats: &[Vec<Duration>]| {
        let mut all: Vec<Duration> = lats.iter().flatten().copied().collect();
        (all.len(), p(&mut all, 0.5), p(&mut all, 0.99))
    };
    let (n0, p50_0, p99_0) = summary(&without);
    let (n1, p50_1, p99_1) = summary(&with);
    println!(
        "  without group points: {n0} writes, p50 {:.2} ms, p99 {:.2} ms",
        ms(p50_0),
        ms(p99_0)
    );
    println!(
        "  with a group point every {EVERY:?}: {n1} writes, p50 {:.2} ms, p99 {:.2} ms",
        ms(p50_1),
        ms(p99_1)
    );
    println!(
        "  p99 added: {:.2} ms (target <= 1 ms); p99 with/without: {:.2}x",
        ms(p99_1) - ms(p99_0),
        ms(p99_1) / ms(p99_0).max(1e-9)
    );
    if !cuts.is_empty() {
        let max = *cuts.iter().max().unwrap();
        println!(
            "  cutting one group point of {VMS} VMs (`standby point --group g`): median {:.1} ms, max {:.1} ms ({} cut, {} listed)",
            ms(p(&mut cuts, 0.5)),
            ms(max),
            cuts.len(),
            listed
        );
    }
}
