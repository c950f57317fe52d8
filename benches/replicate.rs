//! `replicate`: the whole link, end to end, in one process on loopback: an agent's journal
//! (a change log) → the shipper, over TLS → the cache service (its own log) → the target's
//! puller, over TLS → the staging log. Every part has its own directory on the real disk.
//!
//! - Throughput: 256 MiB of incompressible 64 KiB writes from 4 writer threads (each write
//!   waits until written, as the agent acknowledges it; each writer waits for durability
//!   after every `FLUSH_BYTES / WRITERS` of its own bytes, like a guest flushing every
//!   1 MiB), timed from the first write until the staging log at the target holds the last
//!   record durable. Measured back to back with two floors: the same bytes over a plain TCP
//!   socket on loopback (1 MiB writes, the reader discards them), and the same bytes over
//!   plain TCP into a file with one fdatasync per 4 MiB ("tcp+fdatasync floor"); and,
//!   to show what TLS itself costs, against the same pipeline run with `--insecure-loopback`.
//!   Target: at least 0.6 of the plain TCP floor. Note that on one machine the case makes
//!   every byte durable three times on the same disk (journal, cache service, staging log)
//!   while the floors write it at most once: a stage line printed before the ratios shows
//!   where a run's time went.
//! - RPO at 50 MB/s (with the target's processor applying into a replica meanwhile, a pass
//!   every second): one writer paced at 50 MB/s of 64 KiB writes for 20 s (flushing every
//!   1 MiB); every 100 ms, RPO = now − the source acceptance time of the newest record
//!   durable at the target (0 when the target holds everything appended so far). Median and
//!   max are printed with the achieved write rate.

mod common;

use common::{print_ratios, Ratio};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use parking_lot::Mutex;
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::link::pull::{self, PullStatus};
use standby_engine::link::service::{CacheService, ServiceConfig};
use standby_engine::link::ship::{Shipper, ShipperConfig};
use standby_engine::link::tls::{self, Credentials, Role};
use standby_engine::link::wire::{AgentState, DiskInfo, PeerRole};
use standby_engine::link::{self, Security};
use standby_engine::policy::Policy;
use standby_engine::process::Processor;
use standby_engine::record::Entry;
use standby_engine::replica::{DiskSpec, Replica, ReplicaConfig};
use standby_engine::vfs::RealFs;
use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TOTAL_BYTES: usize = 256 << 20;
const WRITE_BYTES: usize = 64 << 10;
const WRITERS: usize = 4;
/// A guest flush per this many bytes written (over all writers).
const FLUSH_BYTES: usize = 1 << 20;
const FLOOR_WRITE_BYTES: usize = 1 << 20;
const FLOOR_SYNC_BYTES: usize = 4 << 20;
const RPO_RATE_BYTES_PER_SEC: f64 = 50e6;
const RPO_RUN: Duration = Duration::from_secs(20);
const RPO_SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A pipeline that has not delivered by then is stuck: fail loudly with its log.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
const VM: &str = "bench-vm";
const DISK_BYTES: u64 = TOTAL_BYTES as u64;

/// The three roles' credentials of one vault.
struct Creds {
    agent: Security,
    cache: Security,
    processor: Security,
}

impl Creds {
    fn create(dir: &Path) -> Creds {
        tls::create(dir).expect("create link credentials");
        let load = |role| Security {
            creds: Arc::new(Credentials::load(dir, role).expect("load credentials")),
            insecure_loopback: false,
        };
        Creds {
            agent: load(Role::Agent),
            cache: load(Role::Cache),
            processor: load(Role::Processor),
        }
    }
}

fn disks() -> Vec<DiskInfo> {
    vec![DiskInfo {
        name: "d0".into(),
        size_bytes: DISK_BYTES,
    }]
}

type Log = Arc<Mutex<Vec<String>>>;

fn logger(log: &Log, who: &'static str) -> impl Fn(&str) + Send + Sync + 'static {
    let log = log.clone();
    move |line: &str| log.lock().push(format!("{who}: {line}"))
}

/// Journal → shipper (TLS) → cache service → puller (TLS) → staging log, all connected.
struct Pipeline {
    journal: Arc<Cache>,
    staging: Arc<Cache>,
    shipper: Option<Shipper>,
    svc: Arc<CacheService>,
    serve_stop: Arc<AtomicBool>,
    serve: Option<JoinHandle<()>>,
    pull_stop: Arc<AtomicBool>,
    pull: Option<JoinHandle<standby_engine::Result<()>>>,
    status: Arc<Mutex<PullStatus>>,
    log: Log,
    // Last: removed once everything above is closed.
    _dir: tempfile::TempDir,
}

impl Pipeline {
    fn start(creds: &Creds) -> Pipeline {
        let dir = common::scratch();
        let log: Log = Arc::default();
        let svc = CacheService::open(
            ServiceConfig {
                dir: dir.path().join("service"),
                capacity_bytes: None,
                security: creds.cache.clone(),
            },
            logger(&log, "service"),
        )
        .expect("open the cache service");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serve_stop = Arc::new(AtomicBool::new(false));
        let serve = {
            let (svc, stop, log) = (svc.clone(), serve_stop.clone(), log.clone());
            std::thread::spawn(move || {
                if let Err(e) = svc.serve(listener, &stop) {
                    log.lock().push(format!("serve: {e}"));
                }
            })
        };
        let (journal, _) =
            Cache::open(dir.path().join("journal"), CacheConfig::default()).expect("journal");
        let journal = Arc::new(journal);
        let shipper = Shipper::start(
            journal.clone(),
            ShipperConfig {
                addr: addr.clone(),
                security: creds.agent.clone(),
                vm: VM.into(),
                disks: disks(),
                barrier: None,
            },
            AgentState::default,
            logger(&log, "shipper"),
        );
        // The service knows the VM once the agent has connected.
        let until = Instant::now() + Duration::from_secs(30);
        while !shipper.status.connected.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < until,
                "the shipper did not connect: {:?}",
                log.lock()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let (staging, _) =
            Cache::open(dir.path().join("staging"), CacheConfig::default()).expect("staging");
        let staging = Arc::new(staging);
        let l = link::connect(&addr, &creds.processor, PeerRole::Processor, VM)
            .expect("connect the processor");
        let status: Arc<Mutex<PullStatus>> = Arc::default();
        let pull_stop = Arc::new(AtomicBool::new(false));
        let pull = {
            let (staging, status, stop) = (staging.clone(), status.clone(), pull_stop.clone());
            std::thread::spawn(move || {
                pull::session(&staging, l.reader, l.writer, &disks(), &status, &stop)
            })
        };
        Pipeline {
            journal,
            staging,
            shipper: Some(shipper),
            svc,
            serve_stop,
            serve: Some(serve),
            pull_stop,
            pull: Some(pull),
            status,
            log,
            _dir: dir,
        }
    }

    /// Newest record durable at the target, and its acceptance time at the source (µs).
    fn target(&self) -> (u64, u64) {
        let st = self.status.lock();
        (st.durable_seq, st.durable_time_us)
    }

    /// Wait until the staging log holds every record up to `seq` durable.
    fn wait_target(&mut self, seq: u64) {
        let until = Instant::now() + STALL_TIMEOUT;
        while self.target().0 < seq {
            if self.pull.as_ref().is_some_and(|p| p.is_finished()) {
                let r = self.pull.take().unwrap().join();
                panic!(
                    "the puller ended ({r:?}) at {:?} of {seq}; log: {:#?}",
                    self.target(),
                    self.log.lock()
                );
            }
            if Instant::now() >= until {
                panic!(
                    "the target holds {:?} of {seq} after {STALL_TIMEOUT:?}; shipper acked {}; log: {:#?}",
                    self.target(),
                    self.shipper.as_ref().map_or(0, |s| s.status.acked_seq.load(Ordering::SeqCst)),
                    self.log.lock()
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn finish(mut self) {
        // The puller notices `stop` at its next message (a state message every second).
        self.pull_stop.store(true, Ordering::SeqCst);
        if let Some(p) = self.pull.take() {
            let _ = p.join();
        }
        if let Some(s) = self.shipper.take() {
            s.stop();
        }
        self.serve_stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.serve.take() {
            let _ = s.join();
        }
        self.journal.close().unwrap();
        self.staging.close().unwrap();
        let _ = self.svc.close();
    }
}

fn write_entry(journal: &Cache, data: &[u8], i: usize) -> u64 {
    let at = (i * WRITE_BYTES) % data.len();
    let seq = journal
        .append(&Entry::Write {
            disk: 0,
            offset: at as u64,
            data: &data[at..at + WRITE_BYTES],
        })
        .expect("append");
    journal.wait_written(seq).expect("written");
    seq
}

/// The case: every write through the pipeline until it is durable at the target.
fn replicate(creds: &Creds, data: &Arc<Vec<u8>>) -> Duration {
    let mut p = Pipeline::start(creds);
    let records = data.len() / WRITE_BYTES;
    let per_writer_flush = (FLUSH_BYTES / WRITERS).max(WRITE_BYTES);
    let start = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (journal, data) = (p.journal.clone(), data.clone());
            std::thread::spawn(move || {
                let (mut since, mut last) = (0, 0);
                for i in (w..records).step_by(WRITERS) {
                    last = write_entry(&journal, &data, i);
                    since += WRITE_BYTES;
                    if since >= per_writer_flush {
                        journal.wait_durable(last).expect("flush");
                        since = 0;
                    }
                }
                journal.wait_durable(last).expect("flush");
            })
        })
        .collect();
    // When the cache service acknowledged the last record durable (µs since start).
    let service_us = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (status, service_us) = (
            p.shipper.as_ref().unwrap().status.clone(),
            service_us.clone(),
        );
        std::thread::spawn(move || {
            while status.acked_seq.load(Ordering::SeqCst) < records as u64 {
                if start.elapsed() > STALL_TIMEOUT {
                    return;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            service_us.store(start.elapsed().as_micros() as u64, Ordering::SeqCst);
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    let journal_durable = start.elapsed();
    let last = p.journal.next_seq() - 1;
    assert_eq!(last, records as u64);
    p.wait_target(last);
    let took = start.elapsed();
    watcher.join().unwrap();
    STAGES.lock().push([
        journal_durable.as_secs_f64(),
        service_us.load(Ordering::SeqCst) as f64 / 1e6,
        took.as_secs_f64(),
    ]);
    p.finish();
    took
}

/// Per case run: seconds from the first write until the writers were done (all durable in
/// the journal), until the shipper's status reported the last record acknowledged durable
/// by the cache service, and until the target held it durable.
static STAGES: Mutex<Vec<[f64; 3]>> = Mutex::new(Vec::new());

fn print_stages() {
    let runs = STAGES.lock().clone();
    if runs.is_empty() {
        return;
    }
    let med = |k: usize| {
        let mut v: Vec<f64> = runs.iter().map(|r| r[k]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    };
    println!(
        "stages of the case (median of {} runs, seconds from the first write): journal durable {:.2}, shipper status acked {:.2}, target durable {:.2}",
        runs.len(),
        med(0),
        med(1),
        med(2)
    );
    println!();
}

/// The floors: `data` over a plain loopback TCP socket in 1 MiB writes; the receiver
/// discards it, or (`sink`) writes it to a file with one fdatasync per 4 MiB.
fn tcp_floor(data: &[u8], sink: Option<PathBuf>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut file = sink.map(|p| File::create(p).unwrap());
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; FLOOR_WRITE_BYTES];
        let (mut got, mut since) = (0usize, 0usize);
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
            if let Some(f) = &mut file {
                f.write_all(&buf[..n]).unwrap();
                since += n;
                if since >= FLOOR_SYNC_BYTES {
                    f.sync_data().unwrap();
                    since = 0;
                }
            }
        }
        if let Some(f) = &file {
            f.sync_data().unwrap();
        }
        got
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let start = Instant::now();
    for chunk in data.chunks(FLOOR_WRITE_BYTES) {
        s.write_all(chunk).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    let took = start.elapsed();
    assert_eq!(got, data.len());
    took
}

struct RpoReport {
    samples_s: Vec<f64>,
    written_bytes: u64,
    writing: Duration,
    /// From the last write until the target held it durable.
    drain: Duration,
}

/// One paced writer at `RPO_RATE_BYTES_PER_SEC` for `RPO_RUN`, sampled every 100 ms.
fn rpo(creds: &Creds, data: &Arc<Vec<u8>>) -> RpoReport {
    let mut p = Pipeline::start(creds);
    // As in production, the target's processor applies the staging log into the replica
    // meanwhile (a pass every second), competing for the same disk and cores.
    let replica_dir = common::scratch();
    let processing = Arc::new(AtomicBool::new(true));
    let processor = {
        let replica = Replica::create(
            Arc::new(RealFs),
            replica_dir.path().join("replica"),
            &[DiskSpec {
                name: "d0".into(),
                size_bytes: DISK_BYTES,
            }],
            ReplicaConfig::default(),
        )
        .expect("replica");
        let mut processor =
            Processor::new(p.staging.clone(), replica, Policy::default()).expect("processor");
        let on = processing.clone();
        std::thread::spawn(move || {
            while on.load(Ordering::SeqCst) {
                processor.run_pass().expect("process");
                std::thread::sleep(Duration::from_secs(1));
            }
            processor.run_pass().expect("process")
        })
    };
    let appended = Arc::new(AtomicU64::new(0));
    let first_us = Arc::new(AtomicU64::new(0));
    let writer = {
        let (journal, data) = (p.journal.clone(), data.clone());
        let (appended, first_us) = (appended.clone(), first_us.clone());
        let status = p.status.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            first_us.store(standby_engine::now_us(), Ordering::SeqCst);
            let (mut i, mut since, mut last) = (0usize, 0usize, 0u64);
            while start.elapsed() < RPO_RUN {
                let due = start
                    + Duration::from_secs_f64((i * WRITE_BYTES) as f64 / RPO_RATE_BYTES_PER_SEC);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                last = write_entry(&journal, &data, i);
                appended.store(last, Ordering::SeqCst);
                since += WRITE_BYTES;
                if since >= FLUSH_BYTES {
                    journal.wait_durable(last).expect("flush");
                    since = 0;
                }
                i += 1;
            }
            journal.wait_durable(last).expect("flush");
            let writing = start.elapsed();
            let ended = Instant::now();
            while status.lock().durable_seq < last && ended.elapsed() < STALL_TIMEOUT {
                std::thread::sleep(Duration::from_micros(200));
            }
            ((i * WRITE_BYTES) as u64, writing, last, ended.elapsed())
        })
    };
    let mut samples_s = Vec::new();
    let mut next = Instant::now() + RPO_SAMPLE_EVERY;
    while !writer.is_finished() {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += RPO_SAMPLE_EVERY;
        let a = appended.load(Ordering::SeqCst);
        let (seq, time_us) = p.target();
        let rpo_us = if seq >= a {
            0
        } else if seq == 0 {
            standby_engine::now_us().saturating_sub(first_us.load(Ordering::SeqCst))
        } else {
            standby_engine::now_us().saturating_sub(time_us)
        };
        samples_s.push(rpo_us as f64 / 1e6);
    }
    let (written_bytes, writing, last, drain) = writer.join().unwrap();
    p.wait_target(last);
    processing.store(false, Ordering::SeqCst);
    let applied = processor.join().unwrap();
    assert_eq!(applied.durable_seq, last, "the replica did not catch up");
    p.finish();
    RpoReport {
        samples_s,
        written_bytes,
        writing,
        drain,
    }
}

fn insecure(s: &Security) -> Security {
    Security {
        creds: s.creds.clone(),
        insecure_loopback: true,
    }
}

fn bench(c: &mut Criterion) {
    let creds_dir = common::scratch();
    let creds = Creds::create(&creds_dir.path().join("link"));
    let data = Arc::new(common::noise(TOTAL_BYTES));

    // The same pipeline with --insecure-loopback: what TLS itself costs.
    let plain = Creds {
        agent: insecure(&creds.agent),
        cache: insecure(&creds.cache),
        processor: insecure(&creds.processor),
    };
    let case = "tls/64k/4w";
    let case_vs_sync = "tls/64k/4w (vs tcp+fdatasync)";
    let case_vs_plain = "tls/64k/4w (vs the same on plain TCP)";
    let floor_plain = "the same pipeline on plain TCP";
    let last_plain = Cell::new(Duration::ZERO);
    let floor = "tcp floor (1 MiB writes, discard)";
    let floor_sync = "tcp+fdatasync floor (fdatasync/4 MiB)";
    let mut g = c.benchmark_group("replicate");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(TOTAL_BYTES as u64));
    let last_sync_floor = Cell::new(Duration::ZERO);
    g.bench_function(case, |b| {
        b.iter_custom(|iters| {
            common::paired(
                case,
                floor,
                TOTAL_BYTES as u64,
                iters,
                || {
                    let took = replicate(&creds, &data);
                    // The stricter floor ran just before this case, in the same pair.
                    common::paired(
                        case_vs_sync,
                        floor_sync,
                        TOTAL_BYTES as u64,
                        1,
                        || took,
                        || last_sync_floor.get(),
                    );
                    common::paired(
                        case_vs_plain,
                        floor_plain,
                        TOTAL_BYTES as u64,
                        1,
                        || took,
                        || last_plain.get(),
                    );
                    took
                },
                || {
                    let dir = common::scratch();
                    last_plain.set(replicate(&plain, &data));
                    last_sync_floor.set(tcp_floor(&data, Some(dir.path().join("floor.raw"))));
                    tcp_floor(&data, None)
                },
            )
        })
    });
    g.finish();
    print_stages();
    print_ratios(
        "replicate (TLS end to end, durable at the target)",
        &[
            Ratio {
                case,
                floor,
                target: 0.6,
            },
            Ratio {
                case: case_vs_sync,
                floor: floor_sync,
                target: 0.0,
            },
            Ratio {
                case: case_vs_plain,
                floor: floor_plain,
                target: 0.0,
            },
        ],
    );

    let r = rpo(&creds, &data);
    let mut s = r.samples_s.clone();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let (median, max) = (
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN),
        s.last().copied().unwrap_or(f64::NAN),
    );
    let p99 = s
        .get((s.len() * 99 / 100).min(s.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN);
    let zero = s.iter().filter(|x| **x == 0.0).count();
    println!(
        "== replicate RPO at {:.0} MB/s of 64 KiB writes (flush every 1 MiB), TLS, {} samples every {:?} ==",
        RPO_RATE_BYTES_PER_SEC / 1e6,
        s.len(),
        RPO_SAMPLE_EVERY
    );
    println!(
        "achieved write rate {:.1} MB/s ({:.0} MiB in {:.1?}); RPO median {:.3} s, p99 {:.3} s, max {:.3} s; {} of {} samples at 0; target caught up {:.1?} after the last write",
        r.written_bytes as f64 / r.writing.as_secs_f64() / 1e6,
        r.written_bytes as f64 / (1 << 20) as f64,
        r.writing,
        median,
        p99,
        max,
        zero,
        s.len(),
        r.drain,
    );
    println!();
}

criterion_group!(benches, bench);
criterion_main!(benches);
