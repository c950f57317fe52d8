//! Nothing waits on the VM: while `standby agent` serves a VM and a real client (qemu-io)
//! keeps writing through it, `point`, `points`, `status`, `verify`, `test-failover` and
//! `mount` of the same VM complete, the writes go on, and the test failover and the mount
//! are bit-exact to the point. A command that needs the VM exclusively (`failover`) waits
//! for the agent only as long as `--wait` says, names it when it gives up, and proceeds as
//! soon as the agent has stopped.

mod common;

use common::{free_port, interrupt, qemu_io, sha, Env};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const OS: usize = 8 << 20;
const DATA: usize = 8 << 20;
/// The background writer's block: block i of `data` gets pattern i % 250 + 1.
const BLOCK: usize = 64 << 10;

impl Env {
    fn new() -> Env {
        let env = Env::empty();
        env.ok(&["init", env.vault.to_str().unwrap()]);
        let (os, data) = (
            root_disk(&env.root, "os", OS),
            root_disk(&env.root, "data", DATA),
        );
        env.ok(&["protect", "vm", "--disk", &os, "--disk", &data]);
        env
    }

    /// Start a long-running command; returns it once it printed its first line.
    fn serve(&self, args: &[&str]) -> (Child, String) {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let mut rest = String::new();
        // The export lines follow at once.
        out.read_line(&mut rest).unwrap();
        std::thread::spawn(move || for _ in out.lines() {});
        (child, first + &rest)
    }
}

fn root_disk(root: &Path, name: &str, size: usize) -> String {
    let p = root.join(format!("{name}.raw"));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size as u64).unwrap();
    format!("{name}={}", p.display())
}

/// How many leading blocks of `data` hold the writer's patterns; the rest must be zero,
/// so the image is a prefix of the writer's acknowledged sequence.
fn written_prefix(data: &[u8]) -> usize {
    let blocks = data.len() / BLOCK;
    let mut k = 0;
    while k < blocks && data[k * BLOCK] == (k % 250 + 1) as u8 {
        k += 1;
    }
    for b in 0..blocks {
        let want = if b < k { (b % 250 + 1) as u8 } else { 0 };
        assert!(
            data[b * BLOCK..(b + 1) * BLOCK].iter().all(|&x| x == want),
            "block {b} of data is neither the writer's pattern nor zero: not a prefix"
        );
    }
    k
}

/// Writes block after block of `data` through the agent until told to stop; counts the
/// acknowledged ones.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(addr: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let url = format!("nbd://{addr}/data");
                let mut b = 0usize;
                while !stop.load(Ordering::SeqCst) && b < DATA / BLOCK {
                    let cmd = format!("write -P {} {} {}", b % 250 + 1, b * BLOCK, BLOCK);
                    qemu_io(&url, &[&cmd]);
                    b += 1;
                    acked.store(b as u64, Ordering::SeqCst);
                }
            })
        };
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.acked()
    }
}

fn addr_of(banner: &str) -> String {
    banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nbd://"))
        .and_then(|u| u.split('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no nbd:// address in {banner:?}"))
}

#[test]
fn dr_commands_run_while_the_agent_serves_writes_and_are_bit_exact() {
    let env = Env::new();
    let port = free_port().to_string();
    let (mut agent, banner) = env.serve(&["agent", "vm", "--listen", &format!("127.0.0.1:{port}")]);
    let addr = addr_of(&banner);
    // The os disk: written once, known exactly.
    let mut os = vec![0u8; OS];
    qemu_io(
        &format!("nbd://{addr}/os"),
        &["write -P 0x5a 1M 2M", "write -P 0x17 5M 64k", "flush"],
    );
    os[1 << 20..3 << 20].fill(0x5a);
    os[5 << 20..(5 << 20) + (64 << 10)].fill(0x17);

    let writer = Writer::start(addr.clone());
    while writer.acked() < 3 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = writer.acked();

    // A point through the running agent: it holds every write acknowledged before it.
    let p: Value = {
        let out = env.ok(&["point", "vm", "--name", "drill"]);
        assert!(out.contains("cut point"), "{out}");
        let pts: Value = serde_json::from_str(&env.ok(&["points", "vm", "--json"])).unwrap();
        pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "drill")
            .cloned()
            .expect("the point is listed")
    };
    let id = p["id"].as_u64().unwrap().to_string();
    let st: Value = serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
    assert_eq!(st["vms"][0]["state"], "protected", "{st}");
    assert!(st["vms"][0]["agent_pid"].as_u64().is_some(), "{st}");
    let v = env.run(&["verify", "vm"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    // A test failover of that point, materialized while the writes go on.
    let tf: Value =
        serde_json::from_str(&env.ok(&["test-failover", "vm", "--point", &id, "--json"])).unwrap();
    let dir = PathBuf::from(tf["dir"].as_str().unwrap());
    let tf_os = std::fs::read(dir.join("os.raw")).unwrap();
    let tf_data = std::fs::read(dir.join("data.raw")).unwrap();
    assert_eq!(sha(&tf_os), sha(&os), "the test failover's os disk");
    let k = written_prefix(&tf_data);
    assert!(
        k as u64 >= before,
        "the point lacks writes acknowledged before it ({k} < {before})"
    );

    // The same point mounted while the writes go on: the same bytes.
    let mport = free_port().to_string();
    let (mut mount, mbanner) = env.serve(&[
        "mount",
        "vm",
        "--point",
        &id,
        "--listen",
        &format!("127.0.0.1:{mport}"),
    ]);
    let maddr = addr_of(&mbanner);
    let copy = env.root.join("mounted-data.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://{maddr}/data"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(sha(&std::fs::read(&copy).unwrap()), sha(&tf_data));
    interrupt(&mut mount);

    // The writes went on through all of it.
    let during = writer.acked();
    assert!(
        during > before,
        "the VM's writes stopped while the DR commands ran"
    );
    env.ok(&["test-failover-cleanup", "vm"]);
    let total = writer.finish();

    // A failover needs the VM exclusively: it gives up naming the agent...
    let f = env.run(&["failover", "vm", "--point", "latest", "--wait", "1s"]);
    assert_eq!(f.status.code(), Some(1));
    let err = String::from_utf8_lossy(&f.stderr);
    assert!(err.contains("standby agent vm"), "{err}");
    assert_eq!(
        err.trim().lines().count(),
        2,
        "waiting line + one error: {err}"
    );
    // A waiter stopped with Ctrl-C ends at once, and does not go on to fail over later.
    let mut stopped = env
        .cmd(&["failover", "vm", "--point", "latest", "--wait", "forever"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    BufReader::new(stopped.stderr.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert!(said.contains("waiting for the lock"), "{said}");
    let st = Command::new("kill")
        .args(["-INT", &stopped.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let asked = std::time::Instant::now();
    let ended = loop {
        if let Some(st) = stopped.try_wait().unwrap() {
            break st;
        }
        // A liveness bound, not a timing: a waiter that ignores Ctrl-C never ends.
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(30),
            "a lock waiter ignored Ctrl-C"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!ended.success(), "an interrupted failover reported success");
    // ...and one that waits proceeds as soon as the agent stops.
    let waiter = env
        .cmd(&["failover", "vm", "--point", "latest", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    interrupt(&mut agent);
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fo: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fdir = PathBuf::from(fo["dir"].as_str().unwrap());
    assert_eq!(sha(&std::fs::read(fdir.join("os.raw")).unwrap()), sha(&os));
    let k = written_prefix(&std::fs::read(fdir.join("data.raw")).unwrap());
    assert_eq!(k as u64, total, "latest holds every acknowledged write");
}
