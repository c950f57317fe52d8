//! `nbd`: the agent's and the mount's NBD servers against `qemu-nbd`, driven by one NBD
//! client (`benches/users/client.rs`, which the `users` bench shares) over loopback TCP, both sides in the same run, each
//! Standby iteration right after a qemu-nbd one.
//!
//! Writes go through the agent's block device (the write tap over a freshly protected
//! 256 MiB VM disk, with the background drain `standby agent` runs: `drain(false)` every
//! 5 ms, `drain(true)` every second) and, for the floor, through
//! `qemu-nbd --cache=writeback -f raw -t` serving a fresh sparse raw file of the same size.
//! Cases: 256 MiB of sequential 64 KiB and 1 MiB writes, and 64 MiB of 4 KiB writes at
//! random 4 KiB-aligned offsets; incompressible data. 16 requests in flight; every 16 MiB
//! and at the end the client waits for its writes, sends FLUSH and waits for it (what a
//! guest does at a barrier). The clock runs from the first request to the last FLUSH's
//! reply: from then on the protocol promises every write durable, on both sides.
//!
//! Reads go through the mount's block device (a read-only view of a point) and, for the
//! floor, through `qemu-nbd -r` serving that point's materialized raw image. The point is
//! the middle one of a 256 MiB disk written fully (realistic contents) then changed by ten
//! rounds of random 64 KiB writes (about 1% of the disk each), a point after each. The
//! whole export is read in order, 64 KiB and 1 MiB requests, 16 in flight. Both sides
//! read warm files (the replica and the raw image were just written).
//!
//! Before timing, each case checks that both servers end with the same bytes (writes) or
//! return the same bytes (reads).
//!
//! `STANDBY_NBD_DIAG=all cargo bench --bench nbd` runs diagnostics instead (see
//! [`diagnose`]): both servers at 1 and 16 requests in flight, the NBD server over a plain
//! file, and the agent's and the view's devices called directly, with write latencies.

#[allow(dead_code)] // this bench drives pipelined patterns only
#[path = "users/client.rs"]
mod client;
mod common;

use client::{drive, ops, Op, Pattern, Xorshift, EXPORT};
use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use standby_engine::agent::{Agent, AgentDisk, SourceDisk};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::mount::MountDisk;
use standby_engine::nbd::{BlockDevice, DevError, DevResult, ExportList, Server, ServerConfig};
use standby_engine::record::Consistency;
use standby_engine::vault::{DiskSource, LockWait, NoProgress, PointSpec, ProtectRequest, Vault};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 256 << 20;
const SEQ_BYTES: u64 = 256 << 20;
const RANDOM_BYTES: u64 = 64 << 20;
const FLUSH_EVERY: u64 = 16 << 20;
const QUEUE_DEPTH: usize = 16;
const POOL_BYTES: usize = 64 << 20;
/// Rounds of random 64 KiB writes after the full write of the read case's disk.
const ROUNDS: u64 = 10;

// ---------------------------------------------------------------------------------------
// The servers.

/// A qemu-nbd child process serving `file` as `EXPORT` on a loopback port; killed on drop.
struct QemuNbd {
    child: Child,
    addr: SocketAddr,
}

impl QemuNbd {
    fn start(file: &Path, read_only: bool) -> QemuNbd {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["--cache=writeback", "-f", "raw", "-t", "-b", "127.0.0.1"])
            .args(["-x", EXPORT, "-p", &port.to_string()]);
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd (Debian's qemu-utils) must be installed");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("qemu-nbd status") {
                panic!("qemu-nbd exited early: {st}");
            }
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuNbd { child, addr }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `standby agent` does in the background: durable writes applied to the source image
/// every 5 ms, the image synced every second.
struct Drainer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drainer {
    fn start(agent: Arc<Agent>) -> Drainer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("agent-drain".into())
            .spawn(move || {
                let mut last_sync = Instant::now();
                while !s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    let persist = last_sync.elapsed() >= Duration::from_secs(1);
                    agent.drain(persist).expect("drain");
                    if persist {
                        last_sync = Instant::now();
                    }
                }
            })
            .expect("drain thread");
        Drainer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(dev: Arc<dyn BlockDevice>) -> Server {
    Server::start(
        "127.0.0.1:0",
        Arc::new(ExportList(vec![(EXPORT.into(), dev)])),
        ServerConfig::default(),
    )
    .expect("NBD server")
}

fn protect(root: &Path, image: &Path) -> Vault {
    Vault::init(root).expect("vault init");
    let mut vault = Vault::open(root, "bench", LockWait::Block).expect("vault");
    vault
        .protect(
            &ProtectRequest {
                vm: "vm".into(),
                disks: vec![(
                    EXPORT.into(),
                    Some(DiskSource::New(image.to_path_buf(), DISK_BYTES)),
                )],
                ..Default::default()
            },
            &mut NoProgress,
        )
        .expect("protect");
    vault
}

fn file_crc(path: &Path) -> u32 {
    let mut f = std::fs::File::open(path).expect("image");
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read image");
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// One run of `pattern` through a freshly protected VM's agent; with `check`, the CRC of
/// the source image after the agent closed.
fn standby_write(pattern: Pattern, pool: &[u8], depth: usize, check: bool) -> (Duration, u32) {
    let dir = common::scratch();
    let image = dir.path().join("os.raw");
    let vault = protect(&dir.path().join("vault"), &image);
    let (agent, guard) = vault.agent("vm").expect("agent").into_parts();
    let agent = Arc::new(agent);
    let disk = AgentDisk::new(agent.clone(), 0).expect("agent disk");
    let drainer = Drainer::start(agent.clone());
    let mut server = serve(Arc::new(disk));
    let (took, _) = drive(server.local_addr(), DISK_BYTES, pattern, pool, depth, false);
    server.stop();
    drop(server);
    drop(drainer);
    let agent = Arc::try_unwrap(agent)
        .ok()
        .expect("the agent is still shared");
    agent.close().expect("agent close");
    drop(guard);
    let crc = if check { file_crc(&image) } else { 0 };
    (took, crc)
}

/// One run of `pattern` through qemu-nbd serving a fresh sparse raw file.
fn qemu_write(pattern: Pattern, pool: &[u8], depth: usize, check: bool) -> (Duration, u32) {
    let dir = common::scratch();
    let image = dir.path().join("os.raw");
    let f = std::fs::File::create(&image).expect("raw file");
    f.set_len(DISK_BYTES).expect("raw size");
    f.sync_all().expect("raw sync");
    let q = QemuNbd::start(&image, false);
    let (took, _) = drive(q.addr, DISK_BYTES, pattern, pool, depth, false);
    drop(q);
    let crc = if check { file_crc(&image) } else { 0 };
    (took, crc)
}

// ---------------------------------------------------------------------------------------
// The benchmarks.

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g
}

/// With `STANDBY_NBD_DIAG` set, only the diagnostics run.
fn diagnostics_only() -> bool {
    std::env::var_os("STANDBY_NBD_DIAG").is_some()
}

fn writes(c: &mut Criterion) {
    if diagnostics_only() {
        return;
    }
    let pool = common::noise(POOL_BYTES);
    let cases = [
        (
            "write/standby-agent/seq-64k",
            "floor/qemu-nbd/seq-64k",
            Pattern::SeqWrite {
                req: 64 << 10,
                total: SEQ_BYTES,
                flush_every: FLUSH_EVERY,
            },
        ),
        (
            "write/standby-agent/seq-1m",
            "floor/qemu-nbd/seq-1m",
            Pattern::SeqWrite {
                req: 1 << 20,
                total: SEQ_BYTES,
                flush_every: FLUSH_EVERY,
            },
        ),
        (
            "write/standby-agent/random-4k",
            "floor/qemu-nbd/random-4k",
            Pattern::RandomWrite {
                req: 4096,
                total: RANDOM_BYTES,
                disk: DISK_BYTES,
                flush_every: FLUSH_EVERY,
            },
        ),
    ];
    let mut g = group(c, "nbd-write");
    for (case, floor, pattern) in cases {
        let bytes = match pattern {
            Pattern::SeqWrite { total, .. } | Pattern::RandomWrite { total, .. } => total,
            Pattern::SeqRead { .. } => DISK_BYTES,
        };
        // Both servers must end with the same image.
        let (_, s) = standby_write(pattern, &pool, QUEUE_DEPTH, true);
        let (_, q) = qemu_write(pattern, &pool, QUEUE_DEPTH, true);
        assert_eq!(
            s, q,
            "{case}: the agent's source image differs from qemu-nbd's"
        );
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(case, |b| {
            b.iter_custom(|iters| {
                common::paired(
                    case,
                    floor,
                    bytes,
                    iters,
                    || standby_write(pattern, &pool, QUEUE_DEPTH, false).0,
                    || qemu_write(pattern, &pool, QUEUE_DEPTH, false).0,
                )
            })
        });
    }
    g.finish();
    let rows: Vec<Ratio<'_>> = cases
        .iter()
        .map(|(case, floor, _)| Ratio {
            case,
            floor,
            target: 0.7,
        })
        .collect();
    print_ratios("nbd writes (agent vs qemu-nbd --cache=writeback)", &rows);
    print_iops(&cases.map(|(c, f, p)| (c, f, p)));
}

fn print_iops(cases: &[(&str, &str, Pattern)]) {
    for (case, floor, p) in cases {
        let req = match p {
            Pattern::SeqWrite { req, .. }
            | Pattern::RandomWrite { req, .. }
            | Pattern::SeqRead { req, .. } => *req as f64,
        };
        if let (Some(c), Some(f)) = (common::median_rate(case), common::median_rate(floor)) {
            println!(
                "{case}: {:.0} requests/s; {floor}: {:.0} requests/s",
                c / req,
                f / req
            );
        }
    }
    println!();
}

/// The read case's vault: a 256 MiB disk written fully, then `ROUNDS` rounds of random
/// 64 KiB writes, a point after each; returns the middle point's id.
fn build_points(root: &Path, image: &Path) -> (Vault, u64) {
    let mut vault = protect(root, image);
    let base = common::disk_like(DISK_BYTES as usize);
    let noise = common::noise(POOL_BYTES);
    let mut ids = Vec::new();
    for round in 0..=ROUNDS {
        let agent = vault.agent("vm").expect("agent");
        if round == 0 {
            for (i, chunk) in base.chunks(1 << 20).enumerate() {
                agent
                    .write(0, (i as u64) << 20, chunk, false)
                    .expect("write");
            }
        } else {
            let mut rng = Xorshift(0x2545_f491_4f6c_dd1d ^ round.wrapping_mul(0x9e37_79b9));
            let slots = DISK_BYTES / (64 << 10);
            for _ in 0..(DISK_BYTES / 100) / (64 << 10) {
                let slot = rng.next() % slots;
                let at = (rng.next() % ((POOL_BYTES as u64 - (64 << 10)) / 4096)) as usize * 4096;
                agent
                    .write(0, slot * (64 << 10), &noise[at..at + (64 << 10)], false)
                    .expect("write");
            }
        }
        agent.close().expect("agent close");
        let pt = vault
            .cut_point("vm", Consistency::Crash, None)
            .expect("cut point");
        ids.push(pt.id);
    }
    let middle = ids[ids.len() / 2];
    (vault, middle)
}

fn reads(c: &mut Criterion) {
    if diagnostics_only() {
        return;
    }
    let dir = common::scratch();
    let (vault, id) = build_points(&dir.path().join("vault"), &dir.path().join("os.raw"));
    let mount = vault.mount("vm", PointSpec::Id(id)).expect("mount");
    let raw = dir.path().join("point.raw");
    mount.view.materialize(0, &raw).expect("materialize");
    let disk = MountDisk::read_only(mount.view.clone(), 0).expect("mount disk");
    let server = serve(Arc::new(disk));
    let qemu = QemuNbd::start(&raw, true);
    let cases = [
        (
            "read/standby-mount/seq-64k",
            "floor/qemu-nbd-raw/seq-64k",
            Pattern::SeqRead {
                req: 64 << 10,
                disk: DISK_BYTES,
            },
        ),
        (
            "read/standby-mount/seq-1m",
            "floor/qemu-nbd-raw/seq-1m",
            Pattern::SeqRead {
                req: 1 << 20,
                disk: DISK_BYTES,
            },
        ),
    ];
    let mut g = group(c, "nbd-read");
    g.throughput(Throughput::Bytes(DISK_BYTES));
    for (case, floor, pattern) in cases {
        // Both servers must serve the point's bytes.
        let (_, s) = drive(
            server.local_addr(),
            DISK_BYTES,
            pattern,
            &[],
            QUEUE_DEPTH,
            true,
        );
        let (_, q) = drive(qemu.addr, DISK_BYTES, pattern, &[], QUEUE_DEPTH, true);
        assert_eq!(s, q, "{case}: the mount serves other bytes than qemu-nbd");
        g.bench_function(case, |b| {
            b.iter_custom(|iters| {
                common::paired(
                    case,
                    floor,
                    DISK_BYTES,
                    iters,
                    || {
                        drive(
                            server.local_addr(),
                            DISK_BYTES,
                            pattern,
                            &[],
                            QUEUE_DEPTH,
                            false,
                        )
                        .0
                    },
                    || drive(qemu.addr, DISK_BYTES, pattern, &[], QUEUE_DEPTH, false).0,
                )
            })
        });
    }
    g.finish();
    let rows: Vec<Ratio<'_>> = cases
        .iter()
        .map(|(case, floor, _)| Ratio {
            case,
            floor,
            target: 0.8,
        })
        .collect();
    print_ratios(
        "nbd reads of a point (mount vs qemu-nbd on its raw image)",
        &rows,
    );
    print_iops(&cases);
    drop(qemu);
    drop(server);
    drop(mount);
}

// ---------------------------------------------------------------------------------------
// Diagnostics (STANDBY_NBD_DIAG=1): where the time goes, outside criterion. The same
// patterns at 1 and 16 requests in flight against both servers; the same NBD server over
// a plain raw file (the server without the agent or the replica); and the agent's and the
// view's block devices called directly, without NBD.

/// A plain raw file as a block device.
struct FileDev {
    f: std::fs::File,
    size: u64,
}

impl BlockDevice for FileDev {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.f
            .read_exact_at(buf, offset)
            .map_err(|e| DevError::io(e.to_string()))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        self.f
            .write_all_at(data, offset)
            .map_err(|e| DevError::io(e.to_string()))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> DevResult<()> {
        self.f.sync_data().map_err(|e| DevError::io(e.to_string()))
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> DevResult<()> {
        Err(DevError::invalid("not in this benchmark"))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> DevResult<()> {
        Err(DevError::invalid("not in this benchmark"))
    }
}

fn file_dev(path: &Path) -> FileDev {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("raw file");
    let size = f.metadata().expect("raw file").len();
    FileDev { f, size }
}

fn fresh_raw(path: &Path) {
    let f = std::fs::File::create(path).expect("raw file");
    f.set_len(DISK_BYTES).expect("raw size");
    f.sync_all().expect("raw sync");
}

/// `pattern` through the NBD server over a fresh plain raw file.
fn file_server_write(pattern: Pattern, pool: &[u8], depth: usize) -> Duration {
    let dir = common::scratch();
    let image = dir.path().join("os.raw");
    fresh_raw(&image);
    let server = serve(Arc::new(file_dev(&image)));
    drive(server.local_addr(), DISK_BYTES, pattern, pool, depth, false).0
}

/// Latencies of single requests, for the stall report.
#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn summary(mut self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        self.0.sort();
        let at = |q: f64| self.0[((self.0.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        let stalled: Duration = self.0.iter().filter(|d| d.as_millis() >= 1).sum();
        let total: Duration = self.0.iter().sum();
        format!(
            "writes: p50 {:.0} us, p99 {:.0} us, max {:.0} us; {:.0}% of write time in writes >= 1 ms",
            at(0.5),
            at(0.99),
            at(1.0),
            100.0 * stalled.as_secs_f64() / total.as_secs_f64().max(1e-9)
        )
    }
}

/// `pattern` through a fresh agent's block device called directly (no NBD), one request at
/// a time, FLUSH as the server does it; the log opened with `config` (the vault opens it
/// with the default). Also the writes' latencies.
fn agent_direct(pattern: Pattern, pool: &[u8], config: CacheConfig) -> (Duration, Latencies) {
    let dir = common::scratch();
    let image = dir.path().join("os.raw");
    fresh_raw(&image);
    let (cache, _) = Cache::open(dir.path().join("cache"), config).expect("log");
    let agent = Agent::open(
        Arc::new(cache),
        vec![SourceDisk {
            name: EXPORT.into(),
            path: image,
            size_bytes: DISK_BYTES,
        }],
    )
    .expect("agent");
    let agent = Arc::new(agent);
    let disk = AgentDisk::new(agent.clone(), 0).expect("agent disk");
    let drainer = Drainer::start(agent.clone());
    let mut lat = Latencies::default();
    let start = Instant::now();
    for op in ops(pattern, pool) {
        match op {
            Op::Write(offset, data) => {
                let t = Instant::now();
                disk.write(offset, data, false).expect("write");
                lat.0.push(t.elapsed());
            }
            Op::Flush => disk.flush().expect("flush"),
            Op::Read(..) => unreachable!(),
        }
    }
    let took = start.elapsed();
    drop(drainer);
    drop(disk);
    Arc::try_unwrap(agent)
        .ok()
        .expect("the agent is still shared")
        .close()
        .expect("agent close");
    (took, lat)
}

fn median_of(n: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..n).map(|_| f()).collect();
    v.sort();
    v[n / 2]
}

fn diag_line(what: &str, bytes: u64, req: u32, took: Duration) {
    let s = took.as_secs_f64();
    println!(
        "  {what:<44} {:>8.1} MB/s {:>8.0} req/s {:>7.1} us/req",
        bytes as f64 / s / 1e6,
        (bytes / req as u64) as f64 / s,
        s * 1e6 / (bytes / req as u64) as f64
    );
}

/// `STANDBY_NBD_DIAG=all` (or a comma list of `seq-64k`, `seq-1m`, `random-4k`, `reads`),
/// `STANDBY_NBD_DIAG_N` runs each (default 3).
fn diagnose(_c: &mut Criterion) {
    let Ok(which) = std::env::var("STANDBY_NBD_DIAG") else {
        return;
    };
    let wanted = |name: &str| which == "all" || which.split(',').any(|w| w == name);
    let n: usize = std::env::var("STANDBY_NBD_DIAG_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let pool = common::noise(POOL_BYTES);
    println!("\n== nbd diagnostics (median of {n}) ==");
    for (name, pattern) in [
        (
            "seq-64k",
            Pattern::SeqWrite {
                req: 64 << 10,
                total: SEQ_BYTES,
                flush_every: FLUSH_EVERY,
            },
        ),
        (
            "seq-1m",
            Pattern::SeqWrite {
                req: 1 << 20,
                total: SEQ_BYTES,
                flush_every: FLUSH_EVERY,
            },
        ),
        (
            "random-4k",
            Pattern::RandomWrite {
                req: 4096,
                total: RANDOM_BYTES,
                disk: DISK_BYTES,
                flush_every: FLUSH_EVERY,
            },
        ),
    ] {
        if !wanted(name) {
            continue;
        }
        let (req, bytes) = match pattern {
            Pattern::SeqWrite { req, total, .. } | Pattern::RandomWrite { req, total, .. } => {
                (req, total)
            }
            Pattern::SeqRead { req, .. } => (req, DISK_BYTES),
        };
        println!("write {name}:");
        for depth in [1, QUEUE_DEPTH] {
            let q = median_of(n, || qemu_write(pattern, &pool, depth, false).0);
            diag_line(&format!("qemu-nbd, {depth} in flight"), bytes, req, q);
            let s = median_of(n, || standby_write(pattern, &pool, depth, false).0);
            diag_line(&format!("agent over NBD, {depth} in flight"), bytes, req, s);
        }
        let f = median_of(n, || file_server_write(pattern, &pool, QUEUE_DEPTH));
        diag_line("NBD server over a plain file, 16 in flight", bytes, req, f);
        for (what, config) in [
            ("agent device directly (no NBD)", CacheConfig::default()),
            (
                "  same, log without compression",
                CacheConfig {
                    compress: false,
                    ..CacheConfig::default()
                },
            ),
            (
                "  same, log synced only on FLUSH",
                CacheConfig {
                    auto_sync: None,
                    ..CacheConfig::default()
                },
            ),
        ] {
            let mut last = Latencies::default();
            let d = median_of(n, || {
                let (took, lat) = agent_direct(pattern, &pool, config.clone());
                last = lat;
                took
            });
            diag_line(what, bytes, req, d);
            println!("      (last run) {}", last.summary());
        }
    }
    if !wanted("reads") {
        return;
    }
    let dir = common::scratch();
    let (vault, id) = build_points(&dir.path().join("vault"), &dir.path().join("os.raw"));
    let mount = vault.mount("vm", PointSpec::Id(id)).expect("mount");
    let raw = dir.path().join("point.raw");
    mount.view.materialize(0, &raw).expect("materialize");
    let disk = MountDisk::read_only(mount.view.clone(), 0).expect("mount disk");
    let server = serve(Arc::new(disk));
    let plain = serve(Arc::new(file_dev(&raw)));
    let qemu = QemuNbd::start(&raw, true);
    for req in [64u32 << 10, 1 << 20] {
        let pattern = Pattern::SeqRead {
            req,
            disk: DISK_BYTES,
        };
        println!("read seq-{}k:", req >> 10);
        for depth in [1, QUEUE_DEPTH] {
            let q = median_of(n, || {
                drive(qemu.addr, DISK_BYTES, pattern, &[], depth, false).0
            });
            diag_line(&format!("qemu-nbd, {depth} in flight"), DISK_BYTES, req, q);
            let s = median_of(n, || {
                drive(server.local_addr(), DISK_BYTES, pattern, &[], depth, false).0
            });
            diag_line(
                &format!("mount over NBD, {depth} in flight"),
                DISK_BYTES,
                req,
                s,
            );
        }
        let f = median_of(n, || {
            drive(
                plain.local_addr(),
                DISK_BYTES,
                pattern,
                &[],
                QUEUE_DEPTH,
                false,
            )
            .0
        });
        diag_line(
            "NBD server over the raw image, 16 in flight",
            DISK_BYTES,
            req,
            f,
        );
        let mut buf = vec![0u8; req as usize];
        let v = median_of(n, || {
            let start = Instant::now();
            for i in 0..DISK_BYTES / req as u64 {
                mount
                    .view
                    .read(0, i * req as u64, &mut buf)
                    .expect("view read");
            }
            start.elapsed()
        });
        diag_line("view read directly (no NBD)", DISK_BYTES, req, v);
    }
    println!();
}

criterion_group!(benches, writes, reads, diagnose);
criterion_main!(benches);
