//! The site-to-site link refuses every peer it should, says why on both sides, and writes
//! nothing for a refused peer: a wrong link key, a certificate from another vault, an
//! expired certificate, plaintext against TLS and TLS against plaintext,
//! `--insecure-loopback` off loopback, and malformed frames after a good handshake. Then a
//! correct agent still replicates through the very service that refused all of those.
//!
//! Every service runs as a real `standby` process on its own 127.0.0.2 port; its stderr goes
//! to a file that the test polls (10 s at most per expected line). Every child is killed
//! when its guard drops, so a failing assertion never leaves a process behind.

use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::link::tls::{issue, Credentials, Role};
use standby_engine::link::wire::{
    self, DiskInfo, Msg, PeerRole, HEADER_BYTES, MAGIC, WIRE_BINDING,
};
use standby_engine::link::{connect, Link, Security};
use standby_engine::record::{self, Entry, Op};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long an expected line may take to appear.
const WAIT: Duration = Duration::from_secs(10);
/// Size of the test VM's one disk.
const DISK_BYTES: u64 = 1 << 20;
const VM: &str = "vm1";
/// Every file `link export` writes.
const SOURCE_FILES: [&str; 6] = [
    "ca.pem",
    "cache.pem",
    "cache.key",
    "agent.pem",
    "agent.key",
    "link.key",
];

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_standby")
}

/// A free port on 127.0.0.2 (bound and released: good enough for a test).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn text(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A running `standby` child; killed (SIGKILL) and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
        let out = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        let child = Command::new(bin())
            .args(args)
            .current_dir(dir)
            .env_remove("STANDBY_VAULT")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Proc {
            name: name.to_string(),
            child,
            out,
            err,
        }
    }

    fn stdout(&self) -> String {
        text(&self.out)
    }

    fn stderr(&self) -> String {
        text(&self.err)
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for `needle` on stdout (the service is up); fails early if the process exits.
    fn wait_stdout(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stdout();
            if s.contains(needle) {
                return s;
            }
            assert!(
                self.running(),
                "{} exited before printing {needle:?}: stdout {s:?}, stderr {:?}",
                self.name,
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "{} printed no {needle:?} in {WAIT:?}: stdout {s:?}, stderr {:?}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes of stderr so far: pass to `wait_line` to look only at what comes next.
    fn mark(&self) -> usize {
        fs::metadata(&self.err)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// Wait for a stderr line, written after byte `from`, that starts with "standby: " and
    /// contains every one of `needles`; returns it.
    fn wait_line(&self, from: usize, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let all = self.stderr();
            let fresh = all.get(from..).unwrap_or("");
            if let Some(line) = fresh
                .lines()
                .find(|l| l.starts_with("standby: ") && needles.iter().all(|n| l.contains(n)))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no stderr line with {needles:?} within {WAIT:?}; its stderr since the mark:\n{fresh}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT (what Ctrl-C sends), then wait for the exit (20 s at most).
    fn interrupt(&mut self) -> ExitStatus {
        let st = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -INT {}", self.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 20 s of SIGINT; stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Run a short-lived command (20 s at most): (status, stdout, stderr).
fn run(dir: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(
        dir,
        &format!("run-{}", args.join("_").replace('/', "_")),
        args,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "standby {args:?} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, p.stdout(), p.stderr())
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (status, out, err) = run(dir, args);
    assert!(status.success(), "standby {args:?}: {err}");
    out
}

/// A scratch directory with vaults, exported credentials and a source disk.
struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        Site {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `standby init NAME` and `link export --out NAME-creds`; returns the exported dir.
    fn vault(&self, name: &str) -> PathBuf {
        let vault = self.path(name);
        ok(&self.root, &["init", vault.to_str().unwrap()]);
        let creds = self.path(&format!("{name}-creds"));
        ok(
            &self.root,
            &[
                "--vault",
                vault.to_str().unwrap(),
                "link",
                "export",
                "--out",
                creds.to_str().unwrap(),
            ],
        );
        for f in SOURCE_FILES {
            assert!(creds.join(f).is_file(), "link export wrote no {f}");
        }
        creds
    }

    /// A copy of `base` named `name`, with `files` taken from `other` instead.
    fn mix(&self, name: &str, base: &Path, other: &Path, files: &[&str]) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        for f in SOURCE_FILES {
            let from = if files.contains(&f) { other } else { base };
            fs::copy(from.join(f), dir.join(f)).unwrap();
        }
        for f in files {
            assert_ne!(
                fs::read(base.join(f)).unwrap(),
                fs::read(dir.join(f)).unwrap(),
                "{f} should differ from the base credentials"
            );
        }
        dir
    }

    /// The source disk (sparse, so the agent's initial copy ships nothing).
    fn disk(&self) -> PathBuf {
        let p = self.path("os.raw");
        if !p.exists() {
            fs::File::create(&p).unwrap().set_len(DISK_BYTES).unwrap();
        }
        p
    }

    /// `standby cache serve` on a fresh port; waits until it serves.
    fn serve(&self, name: &str, creds: &Path, extra: &[&str]) -> Service {
        let addr = free_addr();
        let dir = self.path(&format!("{name}-dir"));
        let mut args = vec![
            "cache",
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            &addr,
            "--creds",
            creds.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&self.root, name, &args);
        proc.wait_stdout("cache service on");
        Service { proc, addr, dir }
    }

    /// `standby agent VM --cache ADDR` serving NBD on a fresh 127.0.0.2 port.
    fn agent(&self, name: &str, cache: &str, creds: &Path, extra: &[&str]) -> Proc {
        let journal = self.path(&format!("{name}-journal"));
        let disk = format!("os={}", self.disk().display());
        let listen = free_addr();
        let mut args = vec![
            "agent",
            VM,
            "--cache",
            cache,
            "--creds",
            creds.to_str().unwrap(),
            "--journal",
            journal.to_str().unwrap(),
            "--disk",
            &disk,
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(&self.root, name, &args);
        p.wait_stdout("serving NBD");
        p
    }
}

struct Service {
    proc: Proc,
    addr: String,
    dir: PathBuf,
}

impl Service {
    fn vm_dir(&self) -> PathBuf {
        self.dir.join("vms").join(VM)
    }

    /// Nothing of the VM exists in the service's directory.
    fn assert_nothing_written(&self, what: &str) {
        let vms: Vec<_> = fs::read_dir(self.dir.join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            vms.is_empty(),
            "{what}: the cache service created {vms:?} for a refused peer"
        );
    }

    /// Stop the service cleanly and open the VM's log: its records.
    fn stop_and_read_log(&mut self) -> (u64, Vec<record::Record>) {
        let status = self.proc.interrupt();
        assert!(
            status.success(),
            "cache service stop: {status}; stderr:\n{}",
            self.proc.stderr()
        );
        let (cache, _) =
            Cache::open(self.vm_dir().join("log"), CacheConfig::with_capacity(None)).unwrap();
        let st = cache.stats();
        let mut recs = Vec::new();
        let mut reader = cache.reader(st.first_seq).unwrap();
        while let Some(r) = reader.next_record().unwrap() {
            recs.push(r);
        }
        cache.close().unwrap();
        (st.next_seq, recs)
    }
}

/// Start an agent with `creds` (and `flags`) against `svc`; both sides must log a line with
/// the given words, both must keep running (the agent retries, the service serves on), and
/// the service must write nothing. The agent is killed afterwards.
fn expect_refusal(
    site: &Site,
    svc: &mut Service,
    name: &str,
    creds: &Path,
    flags: &[&str],
    agent_says: &[&str],
    service_says: &[&str],
) -> (String, String) {
    let mark = svc.proc.mark();
    let mut agent = site.agent(name, &svc.addr, creds, flags);
    let a = agent.wait_line(0, agent_says);
    let s = svc.proc.wait_line(mark, service_says);
    assert!(
        agent.running(),
        "{name}: the agent died: {}",
        agent.stderr()
    );
    assert!(
        svc.proc.running(),
        "{name}: the cache service died: {}",
        svc.proc.stderr()
    );
    assert!(
        !agent.stderr().contains("connected to the cache service"),
        "{name}: the agent says it connected:\n{}",
        agent.stderr()
    );
    assert!(
        !svc.proc.stderr()[mark..].contains("agent connected"),
        "{name}: the service says an agent connected:\n{}",
        svc.proc.stderr()
    );
    drop(agent);
    (a, s)
}

// ---------------------------------------------------------------------------------------
// 1. Wrong link key.

#[test]
fn agent_with_another_vaults_link_key_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let b = site.vault("b");
    let wrong = site.mix("wrong-key", &a, &b, &["link.key"]);
    assert_eq!(
        fs::read_to_string(wrong.join("link.key")).unwrap().len(),
        65
    );
    let mut svc = site.serve("svc", &a, &[]);
    expect_refusal(
        &site,
        &mut svc,
        "agent",
        &wrong,
        &[],
        &["wrong link key"],
        &["wrong link key"],
    );
    svc.assert_nothing_written("agent with a wrong link key");
}

#[test]
fn cache_service_with_another_vaults_link_key_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let b = site.vault("b");
    let wrong = site.mix("wrong-key", &a, &b, &["link.key"]);
    let mut svc = site.serve("svc", &wrong, &[]);
    expect_refusal(
        &site,
        &mut svc,
        "agent",
        &a,
        &[],
        &["wrong link key"],
        &["wrong link key"],
    );
    svc.assert_nothing_written("cache service with a wrong link key");
}

#[test]
fn wrong_link_key_is_refused_on_plain_loopback_too() {
    let site = Site::new();
    let a = site.vault("a");
    let b = site.vault("b");
    let wrong = site.mix("wrong-key", &a, &b, &["link.key"]);
    let mut svc = site.serve("svc", &a, &["--insecure-loopback"]);
    expect_refusal(
        &site,
        &mut svc,
        "agent",
        &wrong,
        &["--insecure-loopback"],
        &["wrong link key"],
        &["wrong link key"],
    );
    svc.assert_nothing_written("plaintext agent with a wrong link key");
}

// ---------------------------------------------------------------------------------------
// 2. A certificate from another vault.

#[test]
fn agent_certificate_from_another_vault_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let b = site.vault("b");
    // Same link key as the service: only the certificate is wrong.
    let foreign = site.mix("foreign-cert", &a, &b, &["agent.pem", "agent.key"]);
    let mut svc = site.serve("svc", &a, &[]);
    let (agent, service) = expect_refusal(
        &site,
        &mut svc,
        "agent",
        &foreign,
        &[],
        &["refused our certificate"],
        &["client certificate", "CA"],
    );
    assert!(agent.contains("CA"), "{agent}");
    assert!(service.contains("another vault"), "{service}");
    svc.assert_nothing_written("agent with a foreign certificate");
}

#[test]
fn cache_service_certificate_from_another_vault_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let b = site.vault("b");
    let foreign = site.mix("foreign-cert", &a, &b, &["cache.pem", "cache.key"]);
    let mut svc = site.serve("svc", &foreign, &[]);
    let (agent, _) = expect_refusal(
        &site,
        &mut svc,
        "agent",
        &a,
        &[],
        &[
            "cache service's certificate",
            "not signed by this vault's CA",
        ],
        &["refused our certificate", "CA"],
    );
    assert!(agent.contains("foreign"), "{agent}");
    svc.assert_nothing_written("cache service with a foreign certificate");
}

// ---------------------------------------------------------------------------------------
// 3. An expired certificate.

#[test]
fn expired_agent_certificate_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let expired = site.path("expired");
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    // Signed by the right CA, valid from ten days ago until yesterday. (`issue` takes
    // `time::OffsetDateTime`; `time` is no dependency here, but it converts from SystemTime.)
    issue(
        &site.path("a").join("link"),
        Role::Agent,
        (now - day * 10).into(),
        (now - day).into(),
        &expired,
    )
    .unwrap();
    for f in ["ca.pem", "cache.pem", "cache.key", "link.key"] {
        fs::copy(a.join(f), expired.join(f)).unwrap();
    }
    // It loads fine: only the validity period is wrong.
    Credentials::load(&expired, Role::Agent).unwrap();
    let mut svc = site.serve("svc", &a, &[]);
    let (agent, _) = expect_refusal(
        &site,
        &mut svc,
        "agent",
        &expired,
        &[],
        &["refused our certificate"],
        &["client certificate has expired"],
    );
    assert!(agent.contains("expired"), "{agent}");
    svc.assert_nothing_written("agent with an expired certificate");
}

// ---------------------------------------------------------------------------------------
// 4. Plaintext against TLS, TLS against plaintext.

#[test]
fn plaintext_agent_on_a_tls_service_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let mut svc = site.serve("svc", &a, &[]);
    expect_refusal(
        &site,
        &mut svc,
        "agent",
        &a,
        &["--insecure-loopback"],
        &["requires TLS"],
        &["refused a plaintext peer"],
    );
    svc.assert_nothing_written("plaintext agent");
}

#[test]
fn tls_agent_on_a_plaintext_service_is_refused_and_nothing_is_written() {
    let site = Site::new();
    let a = site.vault("a");
    let mut svc = site.serve("svc", &a, &["--insecure-loopback"]);
    expect_refusal(
        &site,
        &mut svc,
        "agent",
        &a,
        &[],
        &["did not answer with TLS", "--insecure-loopback"],
        &["refused a TLS peer", "--insecure-loopback"],
    );
    svc.assert_nothing_written("TLS agent on a plaintext service");
}

// ---------------------------------------------------------------------------------------
// 5. --insecure-loopback off loopback.

/// The command must exit non-zero at once with one `standby: ` line naming the rule.
fn refused_at_start(site: &Site, args: &[&str]) {
    let (status, out, err) = run(&site.root, args);
    assert_eq!(
        status.code(),
        Some(1),
        "standby {args:?}: {status}; stderr {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "standby {args:?}: one line expected: {err:?}"
    );
    let line = lines[0];
    assert!(line.starts_with("standby: "), "{line}");
    assert!(
        line.contains("--insecure-loopback") && line.contains("127.0.0.0/8"),
        "{line}"
    );
    assert!(
        !out.contains("cache service on") && !out.contains("serving NBD"),
        "standby {args:?} started serving: {out}"
    );
}

#[test]
fn insecure_loopback_off_loopback_is_refused_at_start() {
    let site = Site::new();
    let a = site.vault("a");
    let dir = site.path("cache-dir");
    refused_at_start(
        &site,
        &[
            "cache",
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
            "--creds",
            a.to_str().unwrap(),
            "--insecure-loopback",
        ],
    );
    assert!(!dir.exists(), "the refused service created its directory");
    let disk = format!("os={}", site.disk().display());
    let journal = site.path("journal");
    refused_at_start(
        &site,
        &[
            "agent",
            VM,
            "--cache",
            "192.0.2.1:7500",
            "--creds",
            a.to_str().unwrap(),
            "--journal",
            journal.to_str().unwrap(),
            "--disk",
            &disk,
            "--listen",
            "127.0.0.2:0",
            "--insecure-loopback",
        ],
    );
}

// ---------------------------------------------------------------------------------------
// 6. Malformed frames after a good handshake.

fn security(creds: &Path) -> Security {
    Security {
        creds: Arc::new(Credentials::load(creds, Role::Agent).unwrap()),
        insecure_loopback: false,
    }
}

fn disks() -> Vec<DiskInfo> {
    vec![DiskInfo {
        name: "os".into(),
        size_bytes: DISK_BYTES,
    }]
}

/// A connected agent link past its open message (the service said ready from record 1).
fn open_agent(svc: &Service, sec: &Security) -> Link {
    let mut link = connect(&svc.addr, sec, PeerRole::Agent, VM).unwrap();
    link.reader.set_read_timeout(Some(WAIT)).unwrap();
    wire::write_msg(&mut link.writer, &Msg::OpenAgent { disks: disks() }).unwrap();
    let mut buf = Vec::new();
    match wire::read_msg(&mut link.reader, &mut buf).unwrap() {
        Some(Msg::Ready {
            next_seq, disks: d, ..
        }) => {
            assert_eq!(next_seq, 1, "the log holds records already");
            assert_eq!(d, disks());
        }
        other => panic!("expected ready, got {other:?}"),
    }
    link
}

/// Send `bytes` raw on an open link; the service must answer with an error message that
/// contains `says`, then close. Returns the message.
fn expect_error(svc: &Service, sec: &Security, bytes: &[u8], says: &str) -> String {
    let mut link = open_agent(svc, sec);
    link.writer.write_all(bytes).unwrap();
    link.writer.flush().unwrap();
    let mut buf = Vec::new();
    let message = match wire::read_msg(&mut link.reader, &mut buf) {
        Ok(Some(Msg::Error { message })) => message,
        Ok(Some(Msg::Ack { durable_seq })) => {
            panic!("the service acknowledged record {durable_seq} of a malformed batch")
        }
        other => panic!("expected an error message ({says}), got {other:?}"),
    };
    assert!(message.contains(says), "expected {says:?} in {message:?}");
    // Then it closes: end of stream (or a reset), never another message or a hang.
    match wire::read_msg(&mut link.reader, &mut buf) {
        Ok(None) => {}
        Err(e) => assert!(
            !e.to_string().contains("timed out"),
            "the service kept the link open after its error: {e}"
        ),
        Ok(Some(m)) => panic!("message after the error: {m:?}"),
    }
    message
}

/// One valid record frame on the wire.
fn frame(entry: &Entry<'_>, seq: u64) -> Vec<u8> {
    record::encode(entry, WIRE_BINDING, seq, standby_engine::now_us(), false).unwrap()
}

fn records(payload: Vec<u8>) -> Vec<u8> {
    Msg::Records(payload).encode()
}

/// Throw malformed frames at `svc` for VM; it must refuse each and append nothing.
fn malformed_frames_are_refused(svc: &Service, creds: &Path) {
    let sec = security(creds);
    let data = vec![0x11u8; 4096];
    let write = |offset: u64| Entry::Write {
        disk: 0,
        offset,
        data: &data,
    };

    // A records message whose payload is garbage.
    expect_error(svc, &sec, &records(vec![0xa5; 300]), "malformed");

    // A valid header with a bad crc.
    let mut bad_crc = records(frame(&write(0), 1));
    bad_crc[12] ^= 0xff;
    assert_eq!(bad_crc[0..4], MAGIC);
    expect_error(svc, &sec, &bad_crc, "checksum");

    // Raw garbage under a valid header: the crc sealed another payload.
    let mut raw = vec![0u8; HEADER_BYTES];
    raw.extend_from_slice(&[0x5c; 64]);
    wire::seal_records(&mut raw);
    raw[HEADER_BYTES..].copy_from_slice(&[0xc3; 64]);
    expect_error(svc, &sec, &raw, "checksum");

    // A good record followed by a damaged one: the batch is refused whole.
    let mut batch = frame(&write(0), 1);
    let mut second = frame(&write(4096), 2);
    let n = second.len();
    second[n - 10] ^= 0x01;
    batch.extend_from_slice(&second);
    expect_error(svc, &sec, &records(batch), "malformed");

    // A record for a disk the VM does not have, and one past the end of its disk.
    let other_disk = Entry::Write {
        disk: 3,
        offset: 0,
        data: &data,
    };
    expect_error(svc, &sec, &records(frame(&other_disk, 1)), "disk 3");
    expect_error(
        svc,
        &sec,
        &records(frame(&write(DISK_BYTES), 1)),
        "past the end",
    );

    // A record bound to a log segment instead of the wire.
    let rebound = record::encode(&write(0), 7, 1, standby_engine::now_us(), false).unwrap();
    expect_error(svc, &sec, &records(rebound), "malformed");

    // A gap: record 5 when the log expects record 1.
    expect_error(svc, &sec, &records(frame(&write(0), 5)), "expects 1");

    // A message an agent may not send.
    expect_error(
        svc,
        &sec,
        &Msg::Checkpoint { seq: 1 }.encode(),
        "may not send",
    );
}

#[test]
fn malformed_frames_are_refused_and_the_log_holds_no_record() {
    let site = Site::new();
    let a = site.vault("a");
    let mut svc = site.serve("svc", &a, &[]);
    let mark = svc.proc.mark();
    malformed_frames_are_refused(&svc, &a);
    svc.proc
        .wait_line(mark, &[VM, "agent disconnected", "checksum mismatch"]);
    assert!(
        svc.proc.running(),
        "the service died: {}",
        svc.proc.stderr()
    );
    // The well-formed open declared the VM; its log holds nothing.
    assert!(svc.vm_dir().join("disks.json").is_file());
    let (next_seq, recs) = svc.stop_and_read_log();
    assert_eq!(next_seq, 1, "records reached the log: {recs:?}");
    assert!(recs.is_empty(), "{recs:?}");
}

// ---------------------------------------------------------------------------------------
// 7. After all that, a correct agent replicates through the same service.

#[test]
fn a_correct_agent_still_replicates_after_every_refusal() {
    let site = Site::new();
    let a = site.vault("a");
    let b = site.vault("b");
    let mut svc = site.serve("svc", &a, &[]);

    let wrong_key = site.mix("wrong-key", &a, &b, &["link.key"]);
    expect_refusal(
        &site,
        &mut svc,
        "wrong-key",
        &wrong_key,
        &[],
        &["wrong link key"],
        &["wrong link key"],
    );
    let foreign = site.mix("foreign-cert", &a, &b, &["agent.pem", "agent.key"]);
    expect_refusal(
        &site,
        &mut svc,
        "foreign",
        &foreign,
        &[],
        &["refused our certificate"],
        &["not signed by this vault's CA"],
    );
    let expired = site.path("expired");
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    issue(
        &site.path("a").join("link"),
        Role::Agent,
        (now - day * 3).into(),
        (now - day).into(),
        &expired,
    )
    .unwrap();
    for f in ["ca.pem", "cache.pem", "cache.key", "link.key"] {
        fs::copy(a.join(f), expired.join(f)).unwrap();
    }
    expect_refusal(
        &site,
        &mut svc,
        "expired",
        &expired,
        &[],
        &["refused our certificate"],
        &["client certificate has expired"],
    );
    expect_refusal(
        &site,
        &mut svc,
        "plaintext",
        &a,
        &["--insecure-loopback"],
        &["requires TLS"],
        &["refused a plaintext peer"],
    );
    svc.assert_nothing_written("after the refused agents");
    malformed_frames_are_refused(&svc, &a);

    // The real agent: connects, its writes are acknowledged and reach the service's log.
    let mark = svc.proc.mark();
    let mut agent = site.agent("agent", &svc.addr, &a, &[]);
    agent.wait_line(
        0,
        &["connected to the cache service", "shipping from record 1"],
    );
    svc.proc
        .wait_line(mark, &[VM, "agent connected", "expects record 1"]);
    let out = agent.stdout();
    let url = out
        .split_whitespace()
        .find(|w| w.starts_with("nbd://") && w.ends_with("/os"))
        .unwrap_or_else(|| panic!("no NBD address in {out:?}"))
        .to_string();
    let qemu = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 64k", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&qemu.stdout),
        String::from_utf8_lossy(&qemu.stderr)
    );
    assert!(
        qemu.status.success() && said.contains("wrote 65536/65536"),
        "qemu-io: {said}"
    );
    // A clean stop waits for the service's acknowledgement of everything journaled.
    let status = agent.interrupt();
    assert!(status.success(), "agent stop: {status}\n{}", agent.stderr());
    let said = agent.stderr();
    assert!(!said.contains("has not acknowledged"), "{said}");
    assert!(said.contains("stopped cleanly"), "{said}");

    let (next_seq, recs) = svc.stop_and_read_log();
    assert!(next_seq > 1, "the service's log holds no record");
    let mut model = vec![0u8; 64 << 10];
    for r in &recs {
        match &r.op {
            Op::Write {
                disk: 0,
                offset,
                data,
            } => {
                for (i, b) in data.iter().enumerate() {
                    if let Some(m) = model.get_mut(*offset as usize + i) {
                        *m = *b;
                    }
                }
            }
            Op::Zero {
                disk: 0,
                offset,
                len,
                ..
            } => {
                for i in *offset..*offset + *len {
                    if let Some(m) = model.get_mut(i as usize) {
                        *m = 0;
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        model.iter().all(|b| *b == 0x5a),
        "the log's records do not hold the 64 KiB of 0x5a qemu-io wrote ({} records)",
        recs.len()
    );
}

// ---------------------------------------------------------------------------------------
// 8. A certificate opens only its own role's link.

#[test]
fn the_agents_certificate_cannot_open_a_processor_link() {
    let site = Site::new();
    let a = site.vault("a");
    let svc = site.serve("svc", &a, &[]);
    let sec = security(&a);
    drop(open_agent(&svc, &sec)); // the VM exists now
    let mut link = connect(&svc.addr, &sec, PeerRole::Processor, VM).unwrap();
    link.reader.set_read_timeout(Some(WAIT)).unwrap();
    wire::write_msg(&mut link.writer, &Msg::OpenProcessor { from_seq: 1 }).unwrap();
    let mut buf = Vec::new();
    let err = match wire::read_msg(&mut link.reader, &mut buf) {
        Ok(Some(Msg::Error { message })) => message,
        Err(e) => e.to_string(),
        other => panic!("an agent certificate opened a processor link: {other:?}"),
    };
    assert!(err.contains("agent certificate may not open"), "{err}");
}

// ---------------------------------------------------------------------------------------
// 9. The split-brain guard of two sites: once the VM failed over at the target site, the
// source site's cache service refuses the old source's agent (and says which failover),
// and keeps refusing it after a restart.

#[test]
fn after_a_failover_the_cache_service_refuses_the_old_source_s_writes() {
    let site = Site::new();
    let a = site.vault("a");
    let vault = site.path("a");
    let v = vault.to_str().unwrap();
    let mut svc = site.serve("svc", &a, &[]);
    let mut agent = site.agent("agent", &svc.addr, &a, &[]);
    agent.wait_line(0, &["connected to the cache service"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, _, err) = run(
            &site.root,
            &["--vault", v, "protect", VM, "--cache", &svc.addr],
        );
        if st.success() {
            break;
        }
        assert!(Instant::now() < deadline, "protect: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut follower = Proc::spawn(
        &site.root,
        "follower",
        &[
            "--vault", v, "process", "--cache", &svc.addr, "--follow", "--every", "200ms",
        ],
    );
    follower.wait_stdout("following the cache service");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, _, err) = run(&site.root, &["--vault", v, "point", VM]);
        if st.success() {
            break;
        }
        assert!(Instant::now() < deadline, "point: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = site.path("recovered");
    ok(
        &site.root,
        &[
            "--vault",
            v,
            "failover",
            VM,
            "--point",
            "latest",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    follower.wait_line(0, &[VM, "now refuses the old source's writes"]);
    svc.proc
        .wait_line(0, &[VM, "fenced by the target site", "was failed over"]);
    let said = agent.wait_line(0, &["was failed over", "refuses the old source's writes"]);
    assert!(
        said.contains("(seq "),
        "the refusal names the failover: {said}"
    );
    assert!(
        svc.vm_dir().join("fenced").is_file(),
        "the fence is durable in the service's directory"
    );
    // The vault knows the source site has it: the follower is not started again for it.
    let opened =
        standby_engine::vault::Vault::open(&vault, "test", standby_engine::vault::LockWait::Block)
            .unwrap();
    let rec = opened.catalog().vm(VM).unwrap();
    assert!(rec.failover.as_ref().unwrap().fenced_us.is_some());
    assert!(opened.remote_vms().is_empty());
    drop(follower);

    // A restarted service still refuses it.
    let status = svc.proc.interrupt();
    assert!(status.success(), "{}", svc.proc.stderr());
    let mut again = Proc::spawn(
        &site.root,
        "svc2",
        &[
            "cache",
            "serve",
            "--dir",
            svc.dir.to_str().unwrap(),
            "--listen",
            &svc.addr,
            "--creds",
            a.to_str().unwrap(),
        ],
    );
    again.wait_stdout("cache service on");
    // The agent reconnects and is refused again (it says so once; the service logs it).
    again.wait_line(
        0,
        &[VM, "was failed over", "refuses the old source's writes"],
    );
    assert!(
        !again.stderr().contains("agent connected"),
        "the restarted service let the old source in:\n{}",
        again.stderr()
    );
    assert!(agent.running(), "the agent retries: {}", agent.stderr());
}
