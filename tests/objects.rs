//! A vault in object storage, against real servers started by the fixture
//! (`tests/fixtures/objstores.sh`): Azurite for `az://` and Ceph's radosgw for `s3://`.
//! Through the built `standby` binary: init, protect, an embedded agent taking writes over
//! NBD, process, points, status, verify, mount (read back with qemu-img), test-failover and
//! failover, each compared bit for bit with a model of the disk; two processors contending
//! for one VM's lease; a conditional replace that loses to another writer; and the one-line
//! refusals of bad credentials, a missing container, an unknown scheme and an unreachable
//! endpoint.
//!
//! The servers must be installed (`.ci/run` installs them); a machine without them skips
//! these tests with a loud message rather than failing them.

mod common;

use common::objstores::{self, ObjStores};
use common::{free_port, interrupt, qemu_io, ReapOnPanic};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The servers, or None (with a loud message) where they are not installed.
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

/// One "machine": a working directory with its own state directory (the vault's local
/// side: locks, link credentials), running `standby` against `url`.
struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    url: String,
    vars: Vec<(String, String)>,
}

impl Site {
    fn new(s: &ObjStores, url: &str) -> Site {
        let tmp = tempfile::tempdir().unwrap();
        Site {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
            url: url.to_string(),
            vars: s.vars.clone(),
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
            // Short enough for a takeover test, long enough that a holder renewing every
            // third of it on a loaded 2-core CI machine never lets it lapse (at 3 s a
            // renewal late by 2 s lost the live holder its lease).
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

    /// Run, require exit 1 and one line on stderr naming `url`; returns the line.
    fn fails(&self, args: &[&str], url: &str) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "standby {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(url), "names {url}: {err}");
        err
    }

    /// Start a long-running command and wait for its first line on stdout.
    fn spawn(&self, args: &[&str]) -> (Child, String) {
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
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("standby {args:?} ended before serving: {err}");
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        (child, line)
    }
}

const DISK_BYTES: usize = 16 << 20;

/// A source image with some data and holes, and its model.
fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut model = vec![0u8; DISK_BYTES];
    for (i, b) in model[1 << 20..3 << 20].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let path = dir.join("os.raw");
    std::fs::write(&path, &model).unwrap();
    (path, model)
}

fn write(model: &mut [u8], addr: &str, byte: u8, off: usize, len: usize) {
    qemu_io(
        &format!("nbd://{addr}/os"),
        &[format!("write -P {byte} {off} {len}"), "flush".to_string()],
    );
    model[off..off + len].fill(byte);
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// The whole flow on one store URL.
fn flow(s: &ObjStores, url: &str) {
    let site = Site::new(s, url);
    let out = site.ok(&["init", url]);
    assert!(out.contains(url), "{out}");
    let (src, mut model) = source(&site.root);
    site.ok(&[
        "protect",
        "web01",
        "--disk",
        &format!("os={}", src.display()),
    ]);
    let initial = model.clone();

    // Writes through the embedded agent; it processes the log into the replica.
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut agent, _) = site.spawn(&[
        "agent",
        "web01",
        "--listen",
        &addr,
        "--process-every",
        "200ms",
    ]);
    write(&mut model, &addr, 0xab, 5 << 20, 3 << 20);
    write(&mut model, &addr, 0xcd, 12 << 20, 1 << 20);
    let cut = site.ok(&["point", "web01", "--name", "after-writes"]);
    assert!(cut.contains("cut point"), "{cut}");
    let at_point = model.clone();
    write(&mut model, &addr, 0xef, 0, 64 << 10);
    interrupt(&mut agent);

    // The rest of the log, processed by a processor of its own.
    site.ok(&["process", "web01"]);
    let points = site.ok(&["points", "web01"]);
    assert!(points.contains("after-writes"), "{points}");
    let status = site.ok(&["status", "web01"]);
    assert!(status.contains("web01"), "{status}");
    let verify = site.ok(&["verify", "web01"]);
    assert!(verify.contains("sound"), "{verify}");

    // Mount the named point; qemu-img reads it all through NBD.
    let maddr = format!("127.0.0.1:{}", free_port());
    let (mut mount, _) = site.spawn(&[
        "mount",
        "web01",
        "--point",
        "after-writes",
        "--listen",
        &maddr,
    ]);
    let img = site.root.join("mounted.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://{maddr}/os"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    interrupt(&mut mount);
    assert!(
        read_file(&img) == at_point,
        "mounted point differs from the model"
    );

    // Test failover of the initial point, bit-exact, then its cleanup.
    let tf = site.root.join("tf");
    site.ok(&[
        "test-failover",
        "web01",
        "--point",
        "initial",
        "--out",
        tf.to_str().unwrap(),
    ]);
    assert!(
        read_file(&tf.join("os.raw")) == initial,
        "test failover differs"
    );
    site.ok(&["test-failover-cleanup", "web01"]);

    // Failover of the latest state, bit-exact.
    let fo = site.root.join("fo");
    site.ok(&[
        "failover",
        "web01",
        "--point",
        "latest",
        "--out",
        fo.to_str().unwrap(),
    ]);
    assert!(read_file(&fo.join("os.raw")) == model, "failover differs");
}

#[test]
fn azure_vault_end_to_end() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    flow(s, &b.az_url("site-a/v1"));
}

#[test]
fn s3_vault_end_to_end() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    flow(s, &b.s3_url("site-a/v1"));
}

/// The lease object's text (its frame is a state file; the holder is plain text in it).
fn lease_text(s: &ObjStores, url: &str, vm: &str) -> String {
    with_env(s, || {
        let u = standby_engine::objstore::StoreUrl::parse(url).unwrap();
        let store = standby_engine::objstore::Store::connect(&u).unwrap();
        match store.get(&format!("vms/{vm}/lease")) {
            Ok((b, _)) => String::from_utf8_lossy(&b).to_string(),
            Err(standby_engine::objstore::StoreError::NotFound) => String::new(),
            Err(e) => panic!("reading the lease: {e:?}"),
        }
    })
}

/// Run `f` with the servers' variables in this process's environment (the Store reads
/// them). Tests of this file that do so hold this lock.
fn with_env<T>(s: &ObjStores, f: impl FnOnce() -> T) -> T {
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in &s.vars {
        std::env::set_var(k, v);
    }
    f()
}

fn contend(s: &ObjStores, url: &str) {
    let a = Site::new(s, url);
    a.ok(&["init", url]);
    let (src, _) = source(&a.root);
    a.ok(&[
        "protect",
        "web01",
        "--disk",
        &format!("os={}", src.display()),
    ]);
    // Two machines: their own state directories, so no local lock stands between them.
    let b = Site::new(s, url);
    let mut first = a
        .cmd(&["process", "web01", "--follow", "--every", "200ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reap = ReapOnPanic(vec![first.id()]);
    // The first's lines, as they come: it says when it holds the VM between passes.
    let said = {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let err = BufReader::new(first.stderr.take().unwrap());
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        rx
    };
    let holds = |rx: &std::sync::mpsc::Receiver<String>| loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.contains("holding the VM's lease between passes") => break,
            Ok(_) => {}
            Err(e) => panic!("the first processor never said it holds the VM: {e}"),
        }
    };
    holds(&said);
    assert!(lease_text(s, url, "web01").contains(&format!("pid {} ", first.id())));
    // A command on the first's machine gets the VM between its passes (the first lets go of
    // the lease when it sees the command waiting), and the first takes it back afterwards.
    let cut = a.ok(&["point", "web01", "--name", "between-passes"]);
    assert!(cut.contains("cut point"), "{cut}");
    holds(&said);
    assert!(lease_text(s, url, "web01").contains(&format!("pid {} ", first.id())));
    let mut second = b
        .cmd(&[
            "process", "web01", "--follow", "--every", "200ms", "--wait", "forever",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    reap.0.push(second.id());
    // The second waits, told who holds the VM; the lease still names the first.
    let mut err = BufReader::new(second.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains("waiting") && line.contains(&format!("pid {}", first.id())),
        "{line}"
    );
    // The first keeps the VM across its passes (one every 200 ms): a few passes later the
    // lease still names it.
    std::thread::sleep(Duration::from_millis(1500));
    let lease = lease_text(s, url, "web01");
    assert!(lease.contains(&format!("pid {} ", first.id())), "{lease}");
    assert!(!lease.contains(&format!("pid {} ", second.id())), "{lease}");
    // The first dies without a word; its lease expires and the second takes over.
    first.kill().unwrap();
    first.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lease_text(s, url, "web01").contains(&format!("pid {} ", second.id())) {
        assert!(
            Instant::now() < deadline,
            "the second processor never took over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    interrupt(&mut second);
}

#[test]
fn two_processors_contend_for_one_lease_azure() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    contend(s, &b.az_url("lease"));
}

#[test]
fn two_processors_contend_for_one_lease_s3() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    contend(s, &b.s3_url("lease"));
}

/// Two writers replace one small file, each from the version it read: the second loses
/// with a conflict and the object keeps the first one's bytes.
fn conflict(s: &ObjStores, url: &str) {
    use standby_engine::fsutil::replace_atomic;
    use standby_engine::objstore::{ObjFs, Store, StoreUrl};
    use standby_engine::vfs::Vfs;
    with_env(s, || {
        let u = StoreUrl::parse(url).unwrap();
        let roots = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = ObjFs::new(Store::connect(&u).unwrap(), roots[0].path().to_path_buf());
        let b = ObjFs::new(Store::connect(&u).unwrap(), roots[1].path().to_path_buf());
        let (ra, rb) = (roots[0].path(), roots[1].path());
        a.create_dir_all(ra).unwrap();
        replace_atomic(&a, ra, "catalog", b"version 1").unwrap();
        // Both read version 1.
        let read = |fs: &ObjFs, root: &Path| {
            let f = fs.open(&root.join("catalog")).unwrap();
            let mut buf = vec![0u8; f.len().unwrap() as usize];
            f.read_full_at(&mut buf, 0).unwrap();
            buf
        };
        assert_eq!(read(&a, ra), b"version 1");
        assert_eq!(read(&b, rb), b"version 1");
        replace_atomic(&a, ra, "catalog", b"version 2 by a").unwrap();
        let e = replace_atomic(&b, rb, "catalog", b"version 2 by b").unwrap_err();
        assert!(e.to_string().contains("changed by another writer"), "{e}");
        assert_eq!(read(&b, rb), b"version 2 by a");
        // Having read it again, b's replace goes through.
        replace_atomic(&b, rb, "catalog", b"version 3 by b").unwrap();
        assert_eq!(read(&a, ra), b"version 3 by b");
        // A create where another created first loses too.
        let (fa, fb) = (ra.join("vms"), rb.join("vms"));
        a.create_dir_all(&fa).unwrap();
        assert!(!b.exists(&fb.join("catalog")));
        replace_atomic(&a, &fa, "catalog", b"a").unwrap();
        assert!(replace_atomic(&b, &fb, "catalog", b"b").is_err());
        assert_eq!(read(&a, &fa), b"a");
    });
}

#[test]
fn a_conditional_replace_loses_to_another_writer_azure() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    conflict(s, &b.az_url("cond"));
}

#[test]
fn a_conditional_replace_loses_to_another_writer_s3() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    conflict(s, &b.s3_url("cond"));
}

/// A file larger than one chunk, with holes, truncated and grown, read back through a
/// second filesystem (another process's view) equal to the model.
#[test]
fn chunked_files_round_trip_through_a_second_view() {
    use standby_engine::objstore::{ObjFs, Store, StoreUrl, CHUNK_BYTES};
    use standby_engine::vfs::Vfs;
    let Some(s) = stores() else { return };
    let bucket = s.fresh_bucket();
    let url = bucket.az_url("chunks");
    with_env(s, || {
        let u = StoreUrl::parse(&url).unwrap();
        let tmp = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = ObjFs::new(Store::connect(&u).unwrap(), tmp[0].path().to_path_buf());
        let dir = tmp[0].path().join("vms/x");
        a.create_dir_all(&dir).unwrap();
        let f = a.create_new(&dir.join("data")).unwrap();
        let c = CHUNK_BYTES as usize;
        let mut model = vec![0u8; 2 * c + 4096];
        for (i, b) in model[c - 10..c + 10].iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        model[2 * c + 100] = 9;
        f.write_all_at(&model[c - 10..c + 10], (c - 10) as u64)
            .unwrap();
        f.write_all_at(&[9], (2 * c + 100) as u64).unwrap();
        f.set_len(model.len() as u64).unwrap();
        f.sync_data().unwrap();
        a.sync_dir(&dir).unwrap();
        let b = ObjFs::new(Store::connect(&u).unwrap(), tmp[1].path().to_path_buf());
        let bdir = tmp[1].path().join("vms/x");
        let g = b.open(&bdir.join("data")).unwrap();
        assert_eq!(g.len().unwrap(), model.len() as u64);
        let mut back = vec![1u8; model.len()];
        g.read_full_at(&mut back, 0).unwrap();
        assert!(back == model, "second view differs");
        assert_eq!(b.list(&bdir).unwrap(), vec!["data".to_string()]);
        // Shrink to inside the first chunk: the other chunks go.
        f.set_len(100).unwrap();
        f.sync_data().unwrap();
        let g = b.open(&bdir.join("data")).unwrap();
        assert_eq!(g.len().unwrap(), 100);
        b.remove(&bdir.join("data")).unwrap();
        assert!(!a.exists(&dir.join("data")) || a.open(&dir.join("data")).is_err());
        assert!(b.list(&bdir).unwrap().is_empty());
    });
}

/// Bad input: each a one-line refusal naming the URL and what to do, exit 1, quickly.
#[test]
fn bad_credentials_missing_containers_unknown_schemes_and_dead_endpoints_are_one_line() {
    let Some(s) = stores() else { return };
    let b = s.fresh_bucket();
    let good = Site::new(s, &b.az_url("v"));
    good.ok(&["init", &b.az_url("v")]);
    let sgood = Site::new(s, &b.s3_url("v"));
    sgood.ok(&["init", &b.s3_url("v")]);

    let with = |url: &str, k: &str, v: &str| {
        let mut site = Site::new(s, url);
        site.vars.retain(|(key, _)| key != k);
        site.vars.push((k.to_string(), v.to_string()));
        site
    };
    // Wrong credentials.
    let e = with(
        &b.az_url("v"),
        "AZURE_STORAGE_ACCOUNT_KEY",
        "d3Jvbmcga2V5IGZvciB0ZXN0aW5nIG9ubHk=",
    )
    .fails(&["status"], &b.az_url("v"));
    assert!(e.contains("credentials"), "{e}");
    let e = with(
        &b.s3_url("v"),
        "AWS_SECRET_ACCESS_KEY",
        "wrongsecretwrongsecretwrongsecret00000",
    )
    .fails(&["status"], &b.s3_url("v"));
    assert!(e.contains("credentials"), "{e}");
    // A container or bucket that does not exist.
    for url in ["az://no-such-container-x/v", "s3://no-such-bucket-x/v"] {
        let e = Site::new(s, url).fails(&["status"], url);
        assert!(e.contains("does not exist"), "{e}");
        let e = Site::new(s, url).fails(&["init", url], url);
        assert!(e.contains("does not exist"), "{e}");
    }
    // A scheme Standby does not know.
    let e = Site::new(s, "gs://b/v").fails(&["init", "gs://b/v"], "gs://b/v");
    assert!(e.contains("unknown store scheme"), "{e}");
    // Nothing listens at the endpoint.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut site = with(&b.az_url("v"), "AZURITE_BLOB_STORAGE_URL", &dead);
    site.vars.retain(|(k, _)| k != "AZURE_STORAGE_ENDPOINT");
    site.vars.push((
        "AZURE_STORAGE_ENDPOINT".into(),
        format!("{dead}/devstoreaccount1"),
    ));
    let e = site.fails(&["status"], &b.az_url("v"));
    assert!(e.contains("unreachable"), "{e}");
    let e = with(&b.s3_url("v"), "AWS_ENDPOINT", &dead).fails(&["status"], &b.s3_url("v"));
    assert!(e.contains("unreachable"), "{e}");
    // An initialised prefix refuses a second init.
    let e = good.fails(&["init", &b.az_url("v")], &b.az_url("v"));
    assert!(e.contains("already"), "{e}");
}
