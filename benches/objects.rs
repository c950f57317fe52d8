//! `objects`: a vault in object storage, against Azurite (`az://`) and Ceph's radosgw
//! (`s3://`) on loopback, both started by `tests/fixtures/objstores.sh`. Everything Standby
//! does here goes through the built `standby` binary, as a user would run it:
//!
//! - **process**: `standby process VM` applying DATA bytes of incompressible writes from
//!   the vault's change log into the replica (both in the store), against the floor of the
//!   same server's own PUT of the same bytes in 8 MiB objects (the engine's blocking client,
//!   `Store::put_many`, in this process; target ≥ 0.7);
//! - **failover**: `standby test-failover VM --point latest --out DIR` materializing the
//!   disk (read back from the store), against the floor of GETting the floor's objects
//!   (target ≥ 0.7). Test failover, not failover: it is the same materialization and can
//!   be repeated on one vault (a cleanup between runs, untimed);
//! - **requests**: every command talks to the server through a pass-through fault proxy
//!   (tests/common/faultproxy.rs) that counts requests by method: printed per GiB
//!   replicated (the agent's shipping and the processing) and per failover — what a cloud
//!   bill charges for;
//! - **point cut**: the wall time of `standby point VM` as the number of points grows
//!   (first, middle, last of POINTS cuts; target: flat).
//!
//! Each sample builds its own vault under a fresh prefix (untimed): `init`, `protect` of a
//! sparse source image, `agent`, then nbdcopy writes DATA bytes of noise through NBD and the
//! agent is stopped, leaving them all in the log. DATA is `STANDBY_BENCH_OBJECTS_MB`
//! (default 256). The machine this runs on is shared: figures are indicative until
//! measured on a quiet one; the run must work everywhere.

mod common;
#[path = "../tests/common/faultproxy.rs"]
#[allow(dead_code)]
mod faultproxy;
#[path = "../tests/common/objstores.rs"]
#[allow(dead_code)]
mod objstores;

use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use faultproxy::{Counts, FaultProxy};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OBJECT_BYTES: usize = 8 << 20;
const POINTS: usize = 20;

fn data_bytes() -> usize {
    std::env::var("STANDBY_BENCH_OBJECTS_MB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

/// Requests counted per case (summed over samples) and the bytes they moved.
static REQUESTS: Mutex<BTreeMap<String, (u64, u64, u64)>> = Mutex::new(BTreeMap::new());
static FAILED: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
static POINT_TIMES: Mutex<BTreeMap<String, Vec<Vec<Duration>>>> = Mutex::new(BTreeMap::new());

fn note_requests(case: &str, c: &Counts, bytes: u64) {
    let mut r = REQUESTS.lock();
    let e = r.entry(case.to_string()).or_insert((0, 0, 0));
    e.0 += c.requests();
    e.1 += bytes;
    e.2 += 1;
}

/// One store under test: its URL scheme, a bucket, a counting proxy in front of its server
/// and the environment that sends `standby` through the proxy.
struct Target {
    scheme: &'static str,
    bucket: objstores::Bucket,
    proxy: FaultProxy,
    vars: Vec<(String, String)>,
    n: std::cell::Cell<u32>,
}

impl Target {
    fn new(scheme: &'static str) -> Target {
        let s = objstores::servers();
        let upstream = match scheme {
            "az" => s.azure_addr(),
            _ => s.s3_addr(),
        };
        let proxy = FaultProxy::start(&upstream);
        let vars = match scheme {
            "az" => s.vars_via(&proxy.addr(), &s.s3_addr()),
            _ => s.vars_via(&s.azure_addr(), &proxy.addr()),
        };
        Target {
            scheme,
            bucket: s.fresh_bucket(),
            proxy,
            vars,
            n: std::cell::Cell::new(0),
        }
    }

    fn url(&self, prefix: &str) -> String {
        match self.scheme {
            "az" => self.bucket.az_url(prefix),
            _ => self.bucket.s3_url(prefix),
        }
    }

    /// The engine's blocking client on `prefix`, straight to the server (the floor). The
    /// client reads the process environment, which holds the servers' own addresses.
    fn store(&self, prefix: &str) -> standby_engine::objstore::Store {
        let u = standby_engine::objstore::StoreUrl::parse(&self.url(prefix)).unwrap();
        standby_engine::objstore::Store::connect(&u).unwrap()
    }
}

/// A vault under a fresh prefix with DATA bytes in its log, ready to process.
struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    url: String,
    vars: Vec<(String, String)>,
}

impl Site {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_standby"));
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.args(args)
            .env("STANDBY_VAULT", &self.url)
            .env("STANDBY_STATE_DIR", self.root.join("state"))
            .current_dir(&self.root);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "standby {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn timed(&self, args: &[&str]) -> Duration {
        let t = Instant::now();
        self.ok(args);
        t.elapsed()
    }

    /// init, protect a sparse image of `bytes`, and put `data` through the agent's NBD
    /// export into the log (nothing processed: the agent's pass interval is an hour).
    /// Returns the site and the requests the agent's shipping took.
    fn build(t: &Target, data_file: &Path, bytes: usize) -> (Site, Counts) {
        let tmp = tempfile::tempdir().unwrap();
        let n = t.n.get();
        t.n.set(n + 1);
        let site = Site {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
            url: t.url(&format!("bench{n}")),
            vars: t.vars.clone(),
        };
        site.ok(&["init", &site.url]);
        let src = site.root.join("os.raw");
        std::fs::File::create(&src)
            .unwrap()
            .set_len(bytes as u64)
            .unwrap();
        site.ok(&["protect", "vm", "--disk", &format!("os={}", src.display())]);
        let addr = format!("127.0.0.1:{}", free_port());
        t.proxy.reset_counts();
        let mut agent = site.spawn(&["agent", "vm", "--listen", &addr, "--process-every", "1h"]);
        let copy = Command::new("nbdcopy")
            .arg(data_file)
            .arg(format!("nbd://{addr}/os"))
            .output()
            .unwrap();
        assert!(
            copy.status.success(),
            "nbdcopy: {}",
            String::from_utf8_lossy(&copy.stderr)
        );
        let _ = Command::new("kill")
            .args(["-INT", &agent.id().to_string()])
            .status();
        let st = agent.wait().unwrap();
        assert!(st.success(), "agent stopped with {st}");
        (site, t.proxy.counts())
    }

    fn spawn(&self, args: &[&str]) -> Child {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "standby {args:?} ended before serving");
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        child
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn put_floor(t: &Target, prefix: &str, data: &[u8]) -> Duration {
    let store = t.store(prefix);
    let objects: Vec<(String, Vec<u8>)> = data
        .chunks(OBJECT_BYTES)
        .enumerate()
        .map(|(i, c)| (format!("floor/{i:08}"), c.to_vec()))
        .collect();
    let start = Instant::now();
    store.put_many(objects).unwrap();
    start.elapsed()
}

fn get_floor(t: &Target, prefix: &str, data: &[u8]) -> Duration {
    let store = t.store(prefix);
    let n = data.len().div_ceil(OBJECT_BYTES);
    let start = Instant::now();
    let mut got = 0usize;
    // As many GETs in flight as the floor's PUTs had (put_many keeps 4).
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let store = &store;
                s.spawn(move || {
                    let mut bytes = 0usize;
                    for i in (w..n).step_by(4) {
                        bytes += store.get(&format!("floor/{i:08}")).unwrap().0.len();
                    }
                    bytes
                })
            })
            .collect();
        for h in handles {
            got += h.join().unwrap();
        }
    });
    let took = start.elapsed();
    assert_eq!(got, data.len());
    took
}

fn bench(c: &mut Criterion) {
    // The floor's client reads the servers' addresses from this process's environment
    // (set before any thread that could read it starts).
    let servers = objstores::servers();
    for (k, v) in &servers.vars {
        std::env::set_var(k, v);
    }
    let bytes = data_bytes();
    let data = common::noise(bytes);
    let scratch = common::scratch();
    let data_file = scratch.path().join("data.raw");
    std::fs::write(&data_file, &data).unwrap();
    let targets = [Target::new("az"), Target::new("s3")];

    let mut g = c.benchmark_group("objects");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(30));
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut rows: Vec<(String, String)> = Vec::new();
    for t in &targets {
        let mb = bytes >> 20;
        let process_case = format!("process/{}/{mb}MiB", t.scheme);
        let process_floor = format!("floor/{}/put-{mb}MiB-in-8MiB-objects", t.scheme);
        let failover_case = format!("test-failover/{}/{mb}MiB", t.scheme);
        let failover_floor = format!("floor/{}/get-{mb}MiB-in-8MiB-objects", t.scheme);
        g.bench_function(&process_case, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if FAILED.lock().contains_key(t.scheme) {
                        return Duration::from_nanos(1);
                    }
                    // A failure of the store or of Standby against it is reported at the
                    // end (loudly) and the other store is still measured.
                    let sample = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let (site, shipped) = Site::build(t, &data_file, bytes);
                        note_requests(&format!("ship/{}", t.scheme), &shipped, bytes as u64);
                        let floor = put_floor(t, &format!("floor{}", t.n.get()), &data);
                        t.proxy.reset_counts();
                        let took = site.timed(&["process", "vm"]);
                        note_requests(&process_case, &t.proxy.counts(), bytes as u64);
                        common::record(&process_floor, bytes as u64, floor);
                        common::record(&process_case, bytes as u64, took);
                        let fo_floor = get_floor(t, &format!("floor{}", t.n.get()), &data);
                        let out = site.root.join("tf");
                        t.proxy.reset_counts();
                        let fo = site.timed(&[
                            "test-failover",
                            "vm",
                            "--point",
                            "latest",
                            "--out",
                            out.to_str().unwrap(),
                        ]);
                        note_requests(&failover_case, &t.proxy.counts(), bytes as u64);
                        assert!(
                            std::fs::read(out.join("os.raw")).unwrap() == data,
                            "the test failover's disk differs from what was written"
                        );
                        common::record(&failover_floor, bytes as u64, fo_floor);
                        common::record(&failover_case, bytes as u64, fo);
                        site.ok(&["test-failover-cleanup", "vm"]);

                        // Point cuts as the number of points grows.
                        let mut times = Vec::with_capacity(POINTS);
                        for p in 0..POINTS {
                            times.push(site.timed(&["point", "vm", "--name", &format!("p{p}")]));
                        }
                        POINT_TIMES
                            .lock()
                            .entry(t.scheme.to_string())
                            .or_default()
                            .push(times);
                        took
                    }));
                    match sample {
                        Ok(took) => total += took,
                        Err(e) => {
                            let why = e
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            FAILED.lock().insert(t.scheme.to_string(), why);
                            return total.max(Duration::from_nanos(1));
                        }
                    }
                }
                total
            })
        });
        rows.push((process_case, process_floor));
        rows.push((failover_case, failover_floor));
    }
    g.finish();

    let ratios: Vec<Ratio<'_>> = rows
        .iter()
        .map(|(c, f)| Ratio {
            case: c,
            floor: f,
            target: 0.7,
        })
        .collect();
    print_ratios("objects", &ratios);
    for (scheme, why) in FAILED.lock().iter() {
        println!("*** {scheme}: NOT MEASURED, a run failed: {why}");
    }

    println!("== objects: requests (counted through a pass-through proxy) ==");
    for (case, (reqs, moved, runs)) in REQUESTS.lock().iter() {
        let gib = *moved as f64 / (1u64 << 30) as f64;
        println!(
            "{case:<44} {:>10.0} requests/GiB {:>10.1} requests/run ({runs} runs)",
            *reqs as f64 / gib.max(1e-12),
            *reqs as f64 / (*runs).max(1) as f64
        );
    }
    println!();
    println!("== objects: `standby point` wall time as points accumulate (target: flat) ==");
    for (scheme, runs) in POINT_TIMES.lock().iter() {
        let at = |k: usize| {
            let mut v: Vec<f64> = runs.iter().map(|r| r[k].as_secs_f64()).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            v[v.len() / 2]
        };
        let (first, mid, last) = (at(0), at(POINTS / 2), at(POINTS - 1));
        println!(
            "{scheme}: point 1 {:.0} ms, point {} {:.0} ms, point {POINTS} {:.0} ms; last/first {:.2}",
            first * 1e3,
            POINTS / 2 + 1,
            mid * 1e3,
            last * 1e3,
            last / first.max(1e-9)
        );
    }
    println!();
}

criterion_group!(benches, bench);
criterion_main!(benches);
