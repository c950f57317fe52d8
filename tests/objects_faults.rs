//! Faults through the built `standby` binary on a vault in object storage, against the real
//! servers of `tests/fixtures/objstores.sh` (Azurite for `az://`, radosgw for `s3://`) seen
//! through the fault-injecting proxy of `tests/common/faultproxy.rs`.
//!
//! - The store cut off (the proxy killed: its port stops listening and every open
//!   connection closes at once) and restored in the middle of `protect`, of the embedded
//!   agent's shipping while a client writes through NBD, of `process --follow`, and of
//!   `failover`: afterwards nothing acknowledged is lost (every byte of the failover and of
//!   a point checked against a model), `verify` says sound, the work resumed; `status` while
//!   the store is unreachable says so in one line naming the URL and exits non-zero.
//! - Injected 500/503s, slow responses and dropped connections during a whole protect →
//!   writes → process → point → failover flow: retried, bit-exact.
//!
//! Azurite is never killed (it keeps acknowledged data in memory and writes it out only
//! every few seconds); cutting off the proxy in front of it is the crash the client sees.

mod common;

use common::faultproxy::{FaultProxy, Faults};
use common::objstores::{self, ObjStores};
use common::{free_port, interrupt, ReapOnPanic};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn stores() -> Option<&'static ObjStores> {
    let have = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("azurite-blob") || !have("radosgw") {
        eprintln!(
            "\n\n*** SKIPPED: azurite-blob or radosgw is not installed here; .ci/run installs them (see tests/fixtures/objstores.sh) ***\n\n"
        );
        return None;
    }
    Some(objstores::servers())
}

/// A machine running `standby` against `url`, reaching the store through `proxy`.
struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    url: String,
    vars: Vec<(String, String)>,
}

impl Site {
    fn new(s: &ObjStores, url: &str, proxy: &FaultProxy) -> Site {
        let tmp = tempfile::tempdir().unwrap();
        Site {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
            url: url.to_string(),
            vars: s.vars_via(&proxy.addr(), &proxy.addr()),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_standby"));
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.args(args)
            .env("STANDBY_VAULT", &self.url)
            .env("STANDBY_STATE_DIR", self.root.join("state"))
            .env("STANDBY_LEASE_SECS", "12")
            .env_remove("RUST_BACKTRACE")
            .current_dir(&self.root);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "standby {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A failure must be one line on stderr naming the vault's URL, exit 1, no panic.
    fn check_failure(&self, args: &[&str], out: &Output) -> String {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "standby {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(&self.url), "names {}: {err}", self.url);
        err
    }

    /// Run `args` while `cut` cuts the store off and restores it; returns whether the
    /// command succeeded (a failure checked to be one clean line).
    fn run_across(&self, args: &[&str], cut: impl FnOnce()) -> bool {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let reap = ReapOnPanic(vec![child.id()]);
        cut();
        let out = child.wait_with_output().unwrap();
        drop(reap);
        if out.status.success() {
            return true;
        }
        let err = self.check_failure(args, &out);
        eprintln!("standby {args:?} across the cut: {err}");
        false
    }

    /// Start a long-running command and wait for its first line on stdout.
    fn spawn(&self, args: &[&str]) -> Child {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        if line.is_empty() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("standby {args:?} ended before serving: {err}");
        }
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        // Drain stderr too (backoff messages while the store is away).
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = err.read_to_end(&mut sink);
        });
        child
    }
}

const DISK_BYTES: usize = 16 << 20;

fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut model = vec![0u8; DISK_BYTES];
    for (i, b) in model[1 << 20..6 << 20].iter_mut().enumerate() {
        *b = (i * 13 % 251) as u8;
    }
    let path = dir.join("os.raw");
    std::fs::write(&path, &model).unwrap();
    (path, model)
}

/// One write and flush through NBD; true once both were acknowledged.
fn try_write(addr: &str, byte: u8, off: usize, len: usize) -> bool {
    write_said(addr, byte, off, len).is_ok()
}

/// One write and flush through NBD; what qemu-io said if either was refused.
fn write_said(addr: &str, byte: u8, off: usize, len: usize) -> Result<(), String> {
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", &format!("write -P {byte} {off} {len}")])
        .args(["-c", "flush"])
        .arg(format!("nbd://{addr}/os"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("fail") {
        Ok(())
    } else {
        Err(text)
    }
}

fn write(model: &mut [u8], addr: &str, byte: u8, off: usize, len: usize) {
    if let Err(said) = write_said(addr, byte, off, len) {
        panic!("write of {len} at {off} refused: {said}");
    }
    model[off..off + len].fill(byte);
}

/// Kill the proxy once it has forwarded `after` more requests (or the command is plainly
/// past them), keep the store away `away`, then restore it.
fn cut_after(proxy: &mut FaultProxy, after: u64, away: Duration) {
    let base = proxy.counts().requests();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.counts().requests() < base + after && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    proxy.kill();
    std::thread::sleep(away);
    proxy.restart();
}

fn same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first differing byte at {i}");
    }
}

fn cut_offs(s: &ObjStores, url: &str, upstream: &str) {
    let mut proxy = FaultProxy::start(upstream);
    let site = Site::new(s, url, &proxy);
    site.ok(&["init", url]);
    let (src, mut model) = source(&site.root);
    let disk = format!("os={}", src.display());

    // 1. Protect (initial replication), cut off in the middle.
    let protect = ["protect", "web01", "--disk", disk.as_str()];
    let done = site.run_across(&protect, || {
        cut_after(&mut proxy, 4, Duration::from_millis(1500))
    });
    if !done {
        // Run again once the store is back: it completes (or resumes) the replication.
        site.ok(&protect);
    }
    let verify = site.ok(&["verify", "web01"]);
    assert!(verify.contains("sound"), "after a cut protect: {verify}");
    let initial = model.clone();

    // 2. The embedded agent shipping while a client writes, the store cut off meanwhile.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut agent = site.spawn(&[
        "agent",
        "web01",
        "--listen",
        &addr,
        "--process-every",
        "200ms",
    ]);
    let mut reap = ReapOnPanic(vec![agent.id()]);
    write(&mut model, &addr, 0xa1, 2 << 20, 2 << 20);
    proxy.kill();
    // Writes while the store is away: each one the agent acknowledges must survive.
    let writer = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for (i, off) in [(0u8, 8usize << 20), (1, 10 << 20), (2, 1 << 20)] {
                let byte = 0xb0 + i;
                if try_write(&addr, byte, off, 512 << 10) {
                    acked.push((byte, off));
                }
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    // Status while the store is unreachable: one line naming the URL, non-zero.
    let out = site.run(&["status", "web01"]);
    let e = site.check_failure(&["status", "web01"], &out);
    assert!(e.contains("unreachable"), "{e}");
    std::thread::sleep(Duration::from_millis(700));
    proxy.restart();
    for (byte, off) in writer.join().unwrap() {
        model[off..off + (512 << 10)].fill(byte);
    }
    write(&mut model, &addr, 0xc2, 12 << 20, 1 << 20);
    // Writes the log could not take while the store was away are tracked as dirty blocks
    // and resynced once it is back (docs/objects.md); a point waits for that resync.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = site.run(&["status", "web01"]);
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        if out.status.success() && !text.contains("resync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resync never finished: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let cut = site.ok(&["point", "web01", "--name", "after-cut"]);
    assert!(cut.contains("cut point"), "{cut}");
    let at_point = model.clone();
    write(&mut model, &addr, 0xd3, 0, 64 << 10);
    interrupt(&mut agent);
    reap.0.clear();

    // 3. process --follow keeps running across a cut and resumes.
    let mut follow = site
        .cmd(&["process", "web01", "--follow", "--every", "200ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ferr = {
        let mut e = follow.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = e.read_to_string(&mut text);
            text
        })
    };
    reap.0.push(follow.id());
    cut_after(&mut proxy, 2, Duration::from_secs(3));
    if let Some(st) = follow.try_wait().unwrap() {
        panic!(
            "process --follow gave up while the store was away ({st}): {}",
            ferr.join().unwrap()
        );
    }
    // It is back at work: it takes passes again (requests flow through the proxy).
    let before = proxy.counts().requests();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.counts().requests() < before + 4 {
        if Instant::now() >= deadline {
            let _ = follow.kill();
            let st = follow.wait().unwrap();
            panic!(
                "process --follow never resumed ({st}): {}",
                ferr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    interrupt(&mut follow);
    reap.0.clear();
    let said = ferr.join().unwrap();
    // A pass that met the cut says so once, naming the store, and that it retries (a cut
    // that fell between passes leaves nothing to say).
    if said.contains("unreachable") {
        assert!(
            said.contains(&site.url) && said.contains("retrying with backoff"),
            "process --follow says the store went away and that it retries: {said}"
        );
    }
    site.ok(&["process", "web01"]);
    let verify = site.ok(&["verify", "web01"]);
    assert!(verify.contains("sound"), "after a cut process: {verify}");

    // The point survived, bit-exact, and so did the initial one.
    let tf = site.root.join("tf");
    let tfa = ["test-failover", "web01", "--point", "after-cut", "--out"];
    site.ok(&[&tfa[..], &[tf.to_str().unwrap()]].concat());
    same(
        &std::fs::read(tf.join("os.raw")).unwrap(),
        &at_point,
        "point",
    );
    site.ok(&["test-failover-cleanup", "web01"]);

    // 4. Failover cut off in the middle; run again if it failed; bit-exact.
    let fo = site.root.join("fo");
    let args = [
        "failover",
        "web01",
        "--point",
        "latest",
        "--out",
        fo.to_str().unwrap(),
    ];
    let done = site.run_across(&args, || {
        cut_after(&mut proxy, 3, Duration::from_millis(1500))
    });
    if !done {
        site.ok(&args);
    }
    same(
        &std::fs::read(fo.join("os.raw")).unwrap(),
        &model,
        "failover",
    );
    let verify = site.ok(&["verify", "web01"]);
    assert!(verify.contains("sound"), "after a cut failover: {verify}");
    assert_ne!(initial, model);
}

#[test]
fn cut_off_and_restored_azure() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    cut_offs(s, &b.az_url("cut"), &s.azure_addr());
}

#[test]
fn cut_off_and_restored_s3() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    cut_offs(s, &b.s3_url("cut"), &s.s3_addr());
}

/// The whole flow with errors, slowness and drops injected on every kind of request.
fn faulty_flow(s: &ObjStores, url: &str, upstream: &str) {
    let proxy = FaultProxy::start(upstream);
    proxy.seed(14);
    proxy.set(Faults {
        error_per_mille: 60,
        error_status: 503,
        drop_request_per_mille: 15,
        drop_response_per_mille: 15,
        delay: Duration::from_millis(3),
    });
    let site = Site::new(s, url, &proxy);
    site.ok(&["init", url]);
    let (src, mut model) = source(&site.root);
    site.ok(&[
        "protect",
        "web01",
        "--disk",
        &format!("os={}", src.display()),
    ]);
    let initial = model.clone();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut agent = site.spawn(&[
        "agent",
        "web01",
        "--listen",
        &addr,
        "--process-every",
        "200ms",
    ]);
    let reap = ReapOnPanic(vec![agent.id()]);
    write(&mut model, &addr, 0x5a, 3 << 20, 3 << 20);
    // 500s this time.
    proxy.set(Faults {
        error_per_mille: 60,
        error_status: 500,
        drop_request_per_mille: 15,
        drop_response_per_mille: 15,
        delay: Duration::from_millis(3),
    });
    write(&mut model, &addr, 0x6b, 9 << 20, 2 << 20);
    site.ok(&["point", "web01", "--name", "p1"]);
    let at_point = model.clone();
    write(&mut model, &addr, 0x7c, 15 << 20, 1 << 20);
    interrupt(&mut agent);
    drop(reap);
    site.ok(&["process", "web01"]);
    let verify = site.ok(&["verify", "web01"]);
    assert!(verify.contains("sound"), "{verify}");
    for (point, want) in [("initial", &initial), ("p1", &at_point)] {
        let tf = site.root.join(format!("tf-{point}"));
        site.ok(&[
            "test-failover",
            "web01",
            "--point",
            point,
            "--out",
            tf.to_str().unwrap(),
        ]);
        same(&std::fs::read(tf.join("os.raw")).unwrap(), want, point);
        site.ok(&["test-failover-cleanup", "web01"]);
    }
    let fo = site.root.join("fo");
    site.ok(&[
        "failover",
        "web01",
        "--point",
        "latest",
        "--out",
        fo.to_str().unwrap(),
    ]);
    same(
        &std::fs::read(fo.join("os.raw")).unwrap(),
        &model,
        "failover",
    );
    let c = proxy.counts();
    assert!(c.errors_injected > 0, "no error injected: {c:?}");
    assert!(c.drops_injected > 0, "no drop injected: {c:?}");
}

#[test]
fn injected_errors_slowness_and_drops_azure() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    faulty_flow(s, &b.az_url("faulty"), &s.azure_addr());
}

#[test]
fn injected_errors_slowness_and_drops_s3() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    faulty_flow(s, &b.s3_url("faulty"), &s.s3_addr());
}
