//! Two sites as separate processes with separate directories: the cache service and the
//! agent at the source site (127.0.0.2), the processor at the target site (127.0.0.3 when
//! it goes through a relay). qemu-io writes through the agent; every part is killed with
//! SIGKILL in the middle of a burst and restarted; the link is cut long enough that the
//! agent's journal fills and it falls back to its dirty bitmap; one run goes through relays
//! that add 40 ms of round trip and drop connections at random moments. Then every
//! recovery point is failed over and compared with a model of what qemu-io wrote: each
//! must be a prefix of the acknowledged writes (nothing applied twice or out of order), and
//! the latest must hold every acknowledged write.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DISK: usize = 32 << 20;
const SLOT: usize = 64 << 10;
const SLOTS: usize = DISK / SLOT;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_standby")
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A long-running `standby` process whose output goes to a log file; killed when dropped.
struct Proc {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(name: &str, args: &[String], log: &Path, vault: &Path) -> Proc {
        let mut p = Proc {
            name: name.into(),
            args: args.to_vec(),
            log: log.to_path_buf(),
            child: None,
        };
        p.spawn(vault);
        p
    }

    fn spawn(&mut self, vault: &Path) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin())
            .args(&self.args)
            .env("STANDBY_VAULT", vault)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGINT and wait for a clean exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is
            // our own child's, not yet reaped, so it names no other process.
            unsafe {
                libc_kill(c.id() as i32, 2);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    assert!(
                        st.success(),
                        "{} exited with {st}: {}",
                        self.name,
                        self.text()
                    );
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("{} did not stop: {}", self.name, self.text());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log holds `needle` `times` times (60 s at most).
    fn wait_for(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "{}: no '{needle}' (x{times}) in:\n{}",
                self.name,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// One write of the model: 64 KiB at a slot, filled with one byte.
#[derive(Clone, Copy)]
struct W {
    slot: usize,
    pattern: u8,
    /// Not acknowledged, but maybe applied (in flight when the agent was killed).
    in_doubt: bool,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Sites {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    vault: PathBuf,
    creds: PathBuf,
    disk: PathBuf,
    cache_addr: String,
    nbd: String,
    writes: Vec<W>,
    rng: Rng,
}

impl Sites {
    fn new(seed: u64) -> Sites {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let s = Sites {
            vault: root.join("target-site/vault"),
            creds: root.join("source-site/creds"),
            disk: root.join("source-site/web01-os.raw"),
            cache_addr: format!("127.0.0.2:{}", free_port("127.0.0.2")),
            nbd: format!("127.0.0.2:{}", free_port("127.0.0.2")),
            root,
            _tmp: tmp,
            writes: Vec::new(),
            rng: Rng(seed),
        };
        std::fs::create_dir_all(s.root.join("source-site")).unwrap();
        std::fs::create_dir_all(s.root.join("target-site")).unwrap();
        s.ok(&["init", s.vault.to_str().unwrap()]);
        s.ok(&["link", "export", "--out", s.creds.to_str().unwrap()]);
        s.ok(&["policy", "set", "fast", "--crash-interval", "1s"]);
        std::fs::File::create(&s.disk)
            .unwrap()
            .set_len(DISK as u64)
            .unwrap();
        s
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(bin())
            .args(args)
            .env("STANDBY_VAULT", &self.vault)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "standby {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cache_service(&self, listen: &str) -> Proc {
        self.cache_service_with(listen, &[])
    }

    fn cache_service_with(&self, listen: &str, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = [
            "cache",
            "serve",
            "--dir",
            self.root.join("source-site/cache").to_str().unwrap(),
            "--listen",
            listen,
            "--creds",
            self.creds.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = Proc::start(
            "cache service",
            &args,
            &self.root.join("source-site/cache.log"),
            &self.vault,
        );
        p.wait_for("cache service on", 1);
        p
    }

    fn agent(&self, cache: &str, journal_capacity: &str) -> Proc {
        let args: Vec<String> = [
            "agent",
            "web01",
            "--cache",
            cache,
            "--creds",
            self.creds.to_str().unwrap(),
            "--journal",
            self.root.join("source-site/journal").to_str().unwrap(),
            "--journal-capacity",
            journal_capacity,
            "--disk",
            &format!("os={}", self.disk.display()),
            "--listen",
            &self.nbd,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.root.join("source-site/agent.log");
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("serving NBD")
            .count();
        let p = Proc::start("agent", &args, &log, &self.vault);
        p.wait_for("serving NBD", before + 1);
        p
    }

    fn processor(&self, cache: &str) -> Proc {
        let args: Vec<String> = ["process", "--cache", cache, "--follow", "--every", "200ms"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Proc::start(
            "processor",
            &args,
            &self.root.join("target-site/process.log"),
            &self.vault,
        )
    }

    /// Protect once the agent has declared the VM to the cache service.
    fn protect(&self, cache: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(bin())
                .args(["protect", "web01", "--cache", cache, "--policy", "fast"])
                .env("STANDBY_VAULT", &self.vault)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "protect: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Plan `n` writes: random slots, a pattern that differs from the slot's last one.
    fn plan(&mut self, n: usize) -> Vec<W> {
        (0..n)
            .map(|i| {
                let slot = (self.rng.next() % SLOTS as u64) as usize;
                let pattern = ((self.writes.len() + i) % 251 + 1) as u8;
                W {
                    slot,
                    pattern,
                    in_doubt: false,
                }
            })
            .collect()
    }

    /// Run a burst with qemu-io through the agent, optionally calling `meanwhile` after
    /// `after` (e.g. to kill something). Acknowledged writes join the model; the first
    /// unacknowledged one joins it as in doubt; the rest were never sent.
    fn burst(&mut self, n: usize, meanwhile: Option<(Duration, &mut dyn FnMut())>) -> usize {
        let plan = self.plan(n);
        let cmds: Vec<String> = plan
            .iter()
            .map(|w| format!("write -P {} {} {}", w.pattern, w.slot * SLOT, SLOT))
            .collect();
        let url = format!("nbd://{}/os", self.nbd);
        let child = {
            let mut c = Command::new("qemu-io");
            c.args(["-f", "raw"]);
            for cmd in &cmds {
                c.args(["-c", cmd]);
            }
            c.arg(&url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let meanwhile_set = meanwhile.is_some();
        if let Some((after, f)) = meanwhile {
            std::thread::sleep(after);
            f();
        }
        let killing = meanwhile_set;
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let acked = text.lines().filter(|l| l.starts_with("wrote ")).count();
        if acked < n && !killing {
            let errors: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("wrote ") && !l.contains("ops;"))
                .collect();
            panic!(
                "{} of {n} writes failed: {errors:?} {}\nagent log:\n{}",
                n - acked,
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.root.join("source-site/agent.log"))
                    .unwrap_or_default()
            );
        }
        for (i, w) in plan.iter().enumerate() {
            if i < acked {
                self.writes.push(*w);
            } else if i == acked {
                self.writes.push(W {
                    in_doubt: true,
                    ..*w
                });
            }
        }
        acked
    }

    /// The last lines of every part's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for f in [
            "source-site/cache.log",
            "source-site/agent.log",
            "target-site/process.log",
        ] {
            let text = std::fs::read_to_string(self.root.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out += &format!("== {f}\n{}\n", tail.join("\n"));
        }
        out
    }

    fn status(&self) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["status", "web01", "--json"])).unwrap();
        v["vms"][0].clone()
    }

    /// Stop the agent cleanly with everything its journal holds shipped: a stop waits a
    /// while for the cache service's acknowledgements and otherwise leaves the rest in the
    /// journal for the next run (and says so), so run it again until a stop finds nothing
    /// left (a large resync can outlast one stop's wait on a loaded machine).
    fn stop_agent_shipped(&self, agent: &mut Proc) {
        const LEFT: &str = "has not acknowledged everything";
        for _ in 0..10 {
            let before = agent.text().matches(LEFT).count();
            agent.stop();
            if agent.text().matches(LEFT).count() == before {
                return;
            }
            let runs = agent.text().matches("serving NBD").count();
            agent.spawn(&self.vault);
            agent.wait_for("serving NBD", runs + 1);
        }
        panic!(
            "the agent never shipped its whole journal:\n{}",
            agent.text()
        );
    }

    /// Wait until the target holds every record the source has, the link is up and the
    /// agent replicates normally (90 s at most).
    fn wait_caught_up(&self) {
        self.wait_status(Duration::from_secs(90), |st| {
            let r = &st["remote"];
            r["link"] == "connected"
                && r["behind_records"] == 0
                && r["agent_journal_bytes"] == 0
                && r["agent_connected"] == true
                && r["resync_required"] == false
                && st["rpo_seconds"].as_f64().is_some_and(|x| x < 5.0)
        });
    }

    /// The same once the agent has stopped (cleanly, everything shipped; 60 s at most).
    fn wait_caught_up_without_agent(&self) {
        // Only a report made after the agent stopped counts: the follower publishes every
        // second what the cache service last told it, which may predate the agent's last
        // records. (Called right after the agent stopped.)
        let stopped = std::time::SystemTime::now();
        self.wait_status(Duration::from_secs(60), |st| {
            let age = st["remote"]["report_age_seconds"]
                .as_f64()
                .unwrap_or(f64::MAX);
            let reported = std::time::SystemTime::now()
                .checked_sub(Duration::from_secs_f64(age.min(1e6)))
                .unwrap_or(std::time::UNIX_EPOCH);
            reported > stopped + Duration::from_millis(1500)
                && st["remote"]["behind_records"] == 0
                && st["remote"]["link"] == "connected"
        });
    }

    fn wait_status(&self, within: Duration, done: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let st = self.status();
            if done(&st) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the target never caught up: {st:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fail over every point (test failover) and check each is a prefix of the writes;
    /// then fail over `latest` and check it holds every acknowledged write.
    fn check_every_point(&self) {
        let pts: Value = serde_json::from_str(&self.ok(&["points", "web01", "--json"])).unwrap();
        let points = pts["points"].as_array().unwrap().clone();
        assert!(points.len() >= 3, "too few points: {pts:#}");
        let out = self.root.join("target-site/check");
        let mut last_k = 0usize;
        for p in &points {
            let id = p["id"].as_u64().unwrap().to_string();
            self.ok(&[
                "test-failover",
                "web01",
                "--point",
                &id,
                "--out",
                out.to_str().unwrap(),
            ]);
            let img = std::fs::read(out.join("os.raw")).unwrap();
            let k = prefix_of(&img, &self.writes).unwrap_or_else(|| {
                panic!("point {id} is no prefix of the acknowledged writes: {p:#}")
            });
            assert!(k >= last_k, "point {id} goes back in time ({k} < {last_k})");
            last_k = k;
            self.ok(&["test-failover-cleanup", "web01"]);
        }
        self.ok(&[
            "failover",
            "web01",
            "--point",
            "latest",
            "--out",
            out.to_str().unwrap(),
        ]);
        let img = std::fs::read(out.join("os.raw")).unwrap();
        let certain = self
            .writes
            .iter()
            .rposition(|w| !w.in_doubt)
            .map_or(0, |i| i + 1);
        let k = prefix_of(&img, &self.writes).expect("latest is no prefix of the writes");
        assert!(
            k >= certain,
            "latest holds {k} writes, {certain} were acknowledged"
        );
    }
}

/// The longest k such that `img` is the disk after the first k writes (in-doubt writes may
/// or may not be there), if any.
fn prefix_of(img: &[u8], writes: &[W]) -> Option<usize> {
    assert_eq!(img.len(), DISK);
    let mut have = Vec::with_capacity(SLOTS);
    for s in 0..SLOTS {
        let b = &img[s * SLOT..(s + 1) * SLOT];
        if b.iter().any(|&x| x != b[0]) {
            return None; // torn: half of one write and half of another
        }
        have.push(b[0]);
    }
    // allowed[s]: the values slot s may hold after the first k writes.
    let mut allowed: Vec<Vec<u8>> = vec![vec![0]; SLOTS];
    let fits = |allowed: &Vec<Vec<u8>>| (0..SLOTS).all(|s| allowed[s].contains(&have[s]));
    let mut best = fits(&allowed).then_some(0);
    for (i, w) in writes.iter().enumerate() {
        if w.in_doubt {
            allowed[w.slot].push(w.pattern);
        } else {
            allowed[w.slot] = vec![w.pattern];
        }
        if allowed[w.slot].contains(&have[w.slot]) && fits(&allowed) {
            best = Some(i + 1);
        }
    }
    best
}

#[test]
fn every_part_killed_mid_burst_and_a_cut_link_lose_nothing() {
    let mut s = Sites::new(0x5eed_0001);
    let cache_addr = s.cache_addr.clone();
    let mut cache = s.cache_service(&cache_addr);
    // The journal stores writes as they came (no compression on the write path): 40 MiB
    // holds the 400-write bursts (25 MiB) whole, and the 1,500-write one (94 MiB) not.
    let mut agent = s.agent(&cache_addr, "40MiB");
    s.protect(&cache_addr);
    let mut processor = s.processor(&cache_addr);

    assert_eq!(s.burst(200, None), 200);

    // kill -9 the processor in the middle of a burst, then restart it.
    let acked = s.burst(
        400,
        Some((Duration::from_millis(150), &mut || {
            processor.kill9();
        })),
    );
    assert_eq!(acked, 400, "the agent never depends on the processor");
    processor.spawn(&s.vault);

    // kill -9 the cache service in the middle of a burst, then restart it.
    let acked = s.burst(
        400,
        Some((Duration::from_millis(150), &mut || {
            cache.kill9();
        })),
    );
    assert_eq!(
        acked, 400,
        "the agent journals while the cache service is down"
    );
    cache.spawn(&s.vault);

    // kill -9 the agent in the middle of a burst, then restart it: writes acknowledged
    // before the kill are in its journal.
    let acked = s.burst(
        2000,
        Some((Duration::from_millis(300), &mut || {
            agent.kill9();
        })),
    );
    assert!(acked < 2000, "the burst outlived the agent?");
    let mut agent = s.agent(&cache_addr, "40MiB");
    assert_eq!(s.burst(100, None), 100);
    s.wait_caught_up();

    // Cut the link for long enough that the journal fills: the agent tracks the writes in
    // its dirty bitmap, then resyncs them once the link is back.
    // Earlier phases may have filled the journal too (the cache service was down): wait
    // until no resync is under way (the first run's initial copy logs a finish only).
    let counts = |a: &Proc| {
        let text = a.text();
        (
            text.matches("tracking writes in the dirty bitmap").count(),
            text.matches("resync finished").count(),
        )
    };
    // No resync under way: the agent's last resync event is a finish (a resync starts on
    // a full journal, and after a restart that lost the bitmap: how many ran depends on
    // the timing of the earlier phases).
    let settled = |a: &Proc| {
        let text = a.text();
        let started = [
            "tracking writes in the dirty bitmap",
            "shipping every allocated block",
        ]
        .iter()
        .filter_map(|m| text.rfind(m))
        .max();
        match (text.rfind("resync finished"), started) {
            (Some(f), Some(s)) => f > s,
            (Some(_), None) => true,
            _ => false,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled(&agent) {
        assert!(
            Instant::now() < deadline,
            "a resync never ended:\n{}",
            agent.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (tracked, resynced) = counts(&agent);
    cache.kill9();
    assert_eq!(
        s.burst(1500, None),
        1500,
        "writes go on while the link is down"
    );
    agent.wait_for("tracking writes in the dirty bitmap", tracked + 1);
    cache.spawn(&s.vault);
    agent.wait_for("resync finished", resynced + 1);
    assert_eq!(s.burst(100, None), 100);
    s.wait_caught_up();

    s.stop_agent_shipped(&mut agent);
    s.wait_caught_up_without_agent();
    processor.stop();
    cache.stop();
    s.check_every_point();
}

/// A TCP relay that delays every byte by `one_way` in each direction and drops every
/// connection at random moments (every `drop_every` ± half).
struct Relay {
    addr: String,
    stop: Arc<AtomicBool>,
    drops: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(
        listen_ip: &str,
        to: &str,
        one_way: Duration,
        drop_every: Duration,
        seed: u64,
    ) -> Relay {
        let listener = TcpListener::bind(format!("{listen_ip}:0")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let drops = Arc::new(Mutex::new(0u64));
        let to = to.to_string();
        let thread = {
            let (stop, drops) = (stop.clone(), drops.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed);
                let live: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
                let mut next_drop = Instant::now() + jitter(&mut rng, drop_every);
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            if let Ok(server) = TcpStream::connect(&to) {
                                let _ = client.set_nodelay(true);
                                let _ = server.set_nodelay(true);
                                live.lock().unwrap().push(client.try_clone().unwrap());
                                live.lock().unwrap().push(server.try_clone().unwrap());
                                pipe(
                                    client.try_clone().unwrap(),
                                    server.try_clone().unwrap(),
                                    one_way,
                                );
                                pipe(server, client, one_way);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                    if Instant::now() >= next_drop {
                        let mut l = live.lock().unwrap();
                        if !l.is_empty() {
                            *drops.lock().unwrap() += 1;
                        }
                        for s in l.drain(..) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        next_drop = Instant::now() + jitter(&mut rng, drop_every);
                    }
                }
                for s in live.lock().unwrap().drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            })
        };
        Relay {
            addr,
            stop,
            drops,
            thread: Some(thread),
        }
    }

    fn drops(&self) -> u64 {
        *self.drops.lock().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn jitter(rng: &mut Rng, every: Duration) -> Duration {
    let ms = every.as_millis() as u64;
    Duration::from_millis(ms / 2 + rng.next() % ms.max(1))
}

/// Copy `from` to `to`, each chunk delivered `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        for (at, chunk) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

#[test]
fn through_a_slow_relay_that_drops_connections() {
    let mut s = Sites::new(0x5eed_0002);
    let cache_addr = s.cache_addr.clone();
    let mut cache = s.cache_service(&cache_addr);
    // Both links cross the relay: 20 ms each way (40 ms round trip), dropped every ~2 s.
    let to_source = Relay::start(
        "127.0.0.2",
        &cache_addr,
        Duration::from_millis(20),
        Duration::from_secs(2),
        7,
    );
    let to_target = Relay::start(
        "127.0.0.3",
        &cache_addr,
        Duration::from_millis(20),
        Duration::from_secs(2),
        11,
    );
    let mut agent = s.agent(&to_source.addr, "64MiB");
    s.protect(&to_target.addr);
    let mut processor = s.processor(&to_target.addr);
    for i in 0..8 {
        assert_eq!(s.burst(250, None), 250);
        if i == 3 {
            // An app-consistent marker written at the source site becomes a point here.
            let journal = s.root.join("source-site/journal");
            let out = s.ok(&[
                "point",
                "web01",
                "--app-consistent",
                "--name",
                "before-upgrade",
                "--journal",
                journal.to_str().unwrap(),
            ]);
            assert!(out.contains("app-consistent marker"), "{out}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    s.wait_caught_up();
    let pts: Value = serde_json::from_str(&s.ok(&["points", "web01", "--json"])).unwrap();
    let app = pts["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "before-upgrade")
        .unwrap_or_else(|| panic!("no point from the marker: {pts:#}"));
    assert_eq!(app["kind"], "app-consistent", "{app:#}");
    assert!(
        to_source.drops() > 0 && to_target.drops() > 0,
        "the relays never dropped a connection"
    );
    s.stop_agent_shipped(&mut agent);
    s.wait_caught_up_without_agent();
    processor.stop();
    cache.stop();
    s.check_every_point();
}

#[test]
fn a_full_cache_pushes_back_to_the_agents_bitmap_until_the_processor_drains_it() {
    let mut s = Sites::new(0x5eed_0003);
    let cache_addr = s.cache_addr.clone();
    // A small cache and no processor: the cache fills, then the agent's journal, then the
    // agent tracks writes in its dirty bitmap.
    let cap = 256u64 << 10;
    let mut cache = s.cache_service_with(&cache_addr, &["--capacity", "256KiB"]);
    let mut agent = s.agent(&cache_addr, "128KiB");
    s.protect(&cache_addr);
    assert_eq!(
        s.burst(3000, None),
        3000,
        "writes go on while the cache is full"
    );
    agent.wait_for("tracking writes in the dirty bitmap", 1);
    cache.wait_for("cache full", 1);
    let log_dir = s.root.join("source-site/cache/vms/web01/log");
    let used: u64 = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(used <= cap, "the cache grew to {used} bytes past its {cap}");
    // The target sees the source's state once it follows: resync required, cache fill.
    let mut processor = s.processor(&cache_addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = s.status();
        if st["state"] == "resync-required" || st["remote"]["resync_required"] == true {
            break;
        }
        // The processor may drain the cache and the agent finish its resync between two
        // looks: then the agent's log says it happened.
        if agent
            .text()
            .contains("resync finished; replicating through the journal again\n")
            && agent.text().matches("resync finished").count() >= 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the resync: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.wait_for("resync finished", 2);
    assert_eq!(s.burst(100, None), 100);
    s.wait_caught_up();
    s.stop_agent_shipped(&mut agent);
    s.wait_caught_up_without_agent();
    processor.stop();
    cache.stop();
    s.check_every_point();
}

/// Run `standby` against the vault at `vault`, expecting success.
fn standby_ok(vault: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("STANDBY_VAULT", vault)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "standby {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dr_commands_go_through_the_follower_and_never_drop_the_link() {
    let mut s = Sites::new(0x5eed_0004);
    // Only this test cuts points (none by the clock), so it knows when one can be cut.
    s.ok(&["policy", "set", "fast", "--crash-interval", "1h"]);
    let cache_addr = s.cache_addr.clone();
    let mut cache = s.cache_service(&cache_addr);
    let mut agent = s.agent(&cache_addr, "256MiB");
    s.protect(&cache_addr);
    let mut processor = s.processor(&cache_addr);
    assert_eq!(s.burst(100, None), 100);
    s.wait_caught_up();
    let sessions = |p: &Proc| p.text().matches("pulling from the cache service").count();
    let before = sessions(&processor);

    // While qemu-io writes through the agent, every DR command of the VM runs at the
    // target: the follower answers them.
    let (vault, root) = (s.vault.clone(), s.root.clone());
    let drills = std::thread::spawn(move || {
        // A crash point of a remote VM is cut where processing stands: wait until the
        // target has applied writes past the last point, so there is one to cut.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st: Value =
                serde_json::from_str(&standby_ok(&vault, &["status", "web01", "--json"])).unwrap();
            let vm = &st["vms"][0];
            let last_seq = vm["last_point"]["seq"].as_u64().unwrap_or(0);
            if vm["applied_seq"].as_u64().unwrap_or(0) > last_seq {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no write reached the target: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = standby_ok(&vault, &["point", "web01", "--name", "drill"]);
        assert!(out.contains("cut point"), "{out}");
        let pts: Value =
            serde_json::from_str(&standby_ok(&vault, &["points", "web01", "--json"])).unwrap();
        let id = pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "drill")
            .expect("the point is listed")["id"]
            .as_u64()
            .unwrap()
            .to_string();
        standby_ok(&vault, &["status", "web01", "--json"]);
        standby_ok(&vault, &["verify", "web01"]);
        let tf = root.join("target-site/drill");
        standby_ok(
            &vault,
            &[
                "test-failover",
                "web01",
                "--point",
                &id,
                "--out",
                tf.to_str().unwrap(),
            ],
        );
        let tf_img = std::fs::read(tf.join("os.raw")).unwrap();
        let maddr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
        let mut mount = Command::new(bin())
            .args(["mount", "web01", "--point", &id, "--listen", &maddr])
            .env("STANDBY_VAULT", &vault)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        mount
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        let copy = root.join("target-site/mounted.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(format!("nbd://{maddr}/os"))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
        let st = Command::new("kill")
            .args(["-INT", &mount.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(mount.wait().unwrap().success());
        standby_ok(&vault, &["test-failover-cleanup", "web01"]);
        (tf_img, std::fs::read(&copy).unwrap())
    });
    let mut bursts = 0;
    while !drills.is_finished() {
        assert_eq!(s.burst(50, None), 50, "the VM's writes go on");
        bursts += 1;
    }
    let (tf_img, mounted) = drills.join().unwrap();
    assert!(bursts > 0);
    assert!(
        tf_img == mounted,
        "the mount and the test failover of one point differ"
    );
    assert!(
        prefix_of(&tf_img, &s.writes).is_some(),
        "the drill point is no prefix of the acknowledged writes"
    );
    assert_eq!(
        sessions(&processor),
        before,
        "the follower dropped the link for a DR command:\n{}",
        s.logs()
    );
    assert_eq!(s.status()["remote"]["link"], "connected");
    s.wait_caught_up();
    s.stop_agent_shipped(&mut agent);
    s.wait_caught_up_without_agent();
    processor.stop();
    cache.stop();
}
