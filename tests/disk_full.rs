//! A full disk under the vault (the hardening issue's bug 3), through the binary: the vault
//! sits on a small loop-mounted ext4, the source image outside it, and qemu-img writes more
//! random data through `standby agent` than the vault's filesystem has room for. Every
//! client write must succeed and read back; `status` must be critical and name the cause
//! while the disk is full; once space returns (a filler file is removed) the agent must
//! reopen its log and replica on its own, resync, turn healthy, and a test failover of
//! `latest` must equal what the client wrote, bit for bit.
//!
//! Sizes: the replica lives on the same filesystem and must end up holding all the data,
//! so the data is larger than the room left beside the filler but smaller than the whole
//! filesystem. The log is capped (64 MiB) only so that its segments stay small enough to
//! trim; the cap is above the free space, so the log fails with ENOSPC before it is full.

mod common;

use common::free_port;
use serde_json::Value;
use standby_engine::vault::Sha256Hex;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FS_MIB: u64 = 256;
const DISK_MIB: usize = 128;
const DATA_MIB: usize = 100;
/// Room the filler leaves on the vault's filesystem: far less than the data.
const LEFT_MIB: u64 = 40;

/// The loop mount (and the agent): unmounted and stopped even if the test panics.
struct Mounted {
    dir: PathBuf,
    agent: Option<Child>,
    /// Other processes of the test (cache service, processor).
    others: Vec<Child>,
    _tmp: tempfile::TempDir,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for mut a in self.agent.take().into_iter().chain(self.others.drain(..)) {
            let _ = a.kill();
            let _ = a.wait();
        }
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn standby(vault: &Path, args: &[&str]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_standby"))
        .args(args)
        .env("STANDBY_VAULT", vault))
}

fn status(vault: &Path) -> Value {
    let st: Value = serde_json::from_str(&standby(vault, &["status", "--json"])).unwrap();
    st["vms"][0].clone()
}

fn avail_mib(dir: &Path) -> u64 {
    let out = run(Command::new("df").args(["-B1M", "--output=avail"]).arg(dir));
    out.lines().last().unwrap().trim().parse().unwrap()
}

/// Random-looking bytes (xorshift), so that nothing compresses them away.
fn data(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; DATA_MIB << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    for c in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// The vault on its small filesystem, a VM with one disk outside it, the filesystem
/// filled but for `LEFT_MIB`.
fn setup() -> (Mounted, PathBuf, PathBuf) {
    let (guard, root) = small_fs();
    let mnt = guard.dir.clone();
    let vault = mnt.join("vault");
    let source = root.join("os.raw");
    standby(&vault, &["init", vault.to_str().unwrap()]);
    standby(
        &vault,
        &[
            "protect",
            "vm",
            "--disk",
            &format!("os=new:{DISK_MIB}MiB:{}", source.display()),
            "--cache-capacity",
            "64MiB",
        ],
    );
    fill(&mnt);
    (guard, vault, root)
}

/// A small ext4 filesystem, loop-mounted at ROOT/mnt (ROOT a fresh temporary directory).
fn small_fs() -> (Mounted, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let img = root.join("small.img");
    let mnt = root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("truncate")
        .args(["-s", &format!("{FS_MIB}M")])
        .arg(&img));
    run(Command::new("mkfs.ext4").arg("-q").arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let guard = Mounted {
        dir: mnt,
        agent: None,
        others: Vec::new(),
        _tmp: tmp,
    };
    (guard, root)
}

/// Fill the filesystem at `mnt` but for `LEFT_MIB` (with `mnt/filler`).
fn fill(mnt: &Path) {
    let fill = avail_mib(mnt) - LEFT_MIB;
    std::fs::write(mnt.join("filler"), vec![0xa5u8; (fill as usize) << 20]).unwrap();
}

/// Start the agent; returns the NBD URL of its disk.
fn start_agent(guard: &mut Mounted, vault: &Path) -> String {
    let port = free_port();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_standby"))
        .args(["agent", "vm", "--listen", &format!("127.0.0.1:{port}")])
        .env("STANDBY_VAULT", vault)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(agent.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("serving NBD"), "{first}");
    guard.agent = Some(agent);
    format!("nbd://127.0.0.1:{port}/os")
}

/// Poll until health is critical naming the log's ENOSPC (60 s at most).
fn wait_critical(vault: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(vault);
        let reasons: Vec<String> = st["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let named = reasons.iter().any(|r| {
            r.contains("the change log failed")
                && r.contains("No space left on device")
                && r.contains("dirty bitmap")
        });
        if st["health"] == "critical" && named {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stays {} with reasons {reasons:?}",
            st["health"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Poll until the VM is healthy, protected and done resyncing (180 s at most).
fn wait_healthy(vault: &Path) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = status(vault);
        if st["health"] == "healthy" && st["resync_bytes"].is_null() && st["state"] == "protected" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after space returned: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `standby test-failover vm --point latest --out OUT --json`: its report.
fn test_failover_latest(vault: &Path, out: &Path) -> Value {
    serde_json::from_str(&standby(
        vault,
        &[
            "test-failover",
            "vm",
            "--point",
            "latest",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    ))
    .unwrap()
}

/// Test-fail over `latest` and check it is `want`, bit for bit.
fn failover_equals(vault: &Path, out: &Path, want: &[u8]) {
    let report = test_failover_latest(vault, out);
    let mut h = Sha256Hex::new();
    h.update(want);
    assert_eq!(report["disks"][0]["sha256"], h.hex());
    let got = std::fs::read(out.join("os.raw")).unwrap();
    assert!(
        got == want,
        "the failed-over disk differs from what was written"
    );
}

#[test]
fn a_full_vault_disk_never_fails_the_vm_and_heals_once_space_returns() {
    let (mut guard, vault, root) = setup();
    let mnt = guard.dir.clone();
    let filler = mnt.join("filler");
    let bytes = data(0);
    let input = root.join("data.bin");
    std::fs::write(&input, &bytes).unwrap();

    let url = start_agent(&mut guard, &vault);

    // Every client write succeeds although the vault's disk fills up under them...
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(&url));
    assert_eq!(avail_mib(&mnt), 0, "the vault's filesystem filled up");
    // ...and reads see every one of them (the rest of the disk reads as zeros).
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&input)
        .arg(&url));

    // While the disk is full, health is critical and names the cause.
    wait_critical(&vault);
    let text = standby(&vault, &["status"]);
    assert!(text.contains("health critical"), "{text}");
    assert!(text.contains("No space left on device"), "{text}");

    // Space returns: the agent reopens what failed, resyncs, and turns healthy on its own.
    std::fs::remove_file(&filler).unwrap();
    wait_healthy(&vault);

    // Nothing acknowledged was lost: latest is exactly what the client wrote.
    let mut want = bytes;
    want.resize(DISK_MIB << 20, 0);
    failover_equals(&vault, &root.join("failover"), &want);

    // The agent stops cleanly.
    let mut agent = guard.agent.take().unwrap();
    run(Command::new("kill").args(["-INT", &agent.id().to_string()]));
    let st = agent.wait().unwrap();
    assert!(st.success(), "clean stop after the recovery, got {st}");
}

/// The agent is killed (kill -9) while the vault's disk is full, after the VM overwrote
/// what it had written through the log: the writes exist only in the source image. Its
/// restart must not replay the log over them, and must resync every block.
#[test]
fn an_agent_killed_while_the_vault_disk_is_full_keeps_the_vm_writes_on_restart() {
    let (mut guard, vault, root) = setup();
    let mnt = guard.dir.clone();
    let url = start_agent(&mut guard, &vault);
    let old = root.join("old.bin");
    std::fs::write(&old, data(0)).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&old)
        .arg(&url));
    wait_critical(&vault);
    // Everything again, other bytes, while the log is failed.
    let bytes = data(1);
    let new = root.join("new.bin");
    std::fs::write(&new, &bytes).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&new)
        .arg(&url));
    let mut agent = guard.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();

    // Space returns; the restarted agent serves what the VM wrote last and heals.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let url = start_agent(&mut guard, &vault);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&new)
        .arg(&url));
    wait_healthy(&vault);
    let mut want = bytes;
    want.resize(DISK_MIB << 20, 0);
    failover_equals(&vault, &root.join("failover"), &want);
    let mut agent = guard.agent.take().unwrap();
    run(Command::new("kill").args(["-INT", &agent.id().to_string()]));
    assert!(agent.wait().unwrap().success());
}

/// Start `standby ARGS` in the background, its output in `log`, and wait until the log
/// shows `ready` (60 s at most; not at all if it is empty).
fn spawn(vault: &Path, args: &[&str], log: &Path, ready: &str) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let before = std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(ready)
        .count();
    let child = Command::new(env!("CARGO_BIN_EXE_standby"))
        .args(args)
        .env("STANDBY_VAULT", vault)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    if !ready.is_empty() {
        wait_log(log, ready, before + 1);
    }
    child
}

fn wait_log(log: &Path, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no '{needle}' (x{times}) in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The same for a source-site agent whose journal is on the small filesystem, with the
/// cache service down while the disk fills: every write succeeds, the agent names the
/// journal's failure, and once space returns (and the cache service is back) it reopens
/// the journal, resyncs, and the target's `latest` is what the client wrote.
#[test]
fn a_full_journal_disk_never_fails_the_vm_and_the_source_agent_heals() {
    let (mut guard, root) = small_fs();
    let mnt = guard.dir.clone();
    let vault = root.join("vault");
    let creds = root.join("creds");
    standby(&vault, &["init", vault.to_str().unwrap()]);
    standby(
        &vault,
        &["link", "export", "--out", creds.to_str().unwrap()],
    );
    let disk = root.join("os.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((DISK_MIB as u64) << 20)
        .unwrap();
    let cache_addr = format!("127.0.0.1:{}", free_port());
    let cache_args = [
        "cache",
        "serve",
        "--dir",
        root.join("cache").to_str().unwrap(),
        "--listen",
        &cache_addr,
        "--creds",
        creds.to_str().unwrap(),
    ]
    .map(str::to_string);
    let cache_args: Vec<&str> = cache_args.iter().map(String::as_str).collect();
    let cache_log = root.join("cache.log");
    let cache = spawn(&vault, &cache_args, &cache_log, "cache service on");
    let nbd = format!("127.0.0.1:{}", free_port());
    let agent_log = root.join("agent.log");
    let agent = spawn(
        &vault,
        &[
            "agent",
            "vm",
            "--cache",
            &cache_addr,
            "--creds",
            creds.to_str().unwrap(),
            "--journal",
            mnt.join("journal").to_str().unwrap(),
            "--disk",
            &format!("os={}", disk.display()),
            "--listen",
            &nbd,
        ],
        &agent_log,
        "serving NBD",
    );
    guard.agent = Some(agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_standby"))
            .args(["protect", "vm", "--cache", &cache_addr])
            .env("STANDBY_VAULT", &vault)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "protect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let processor = spawn(
        &vault,
        &[
            "process",
            "--cache",
            &cache_addr,
            "--follow",
            "--every",
            "200ms",
        ],
        &root.join("process.log"),
        "",
    );
    guard.others.push(processor);
    // The cache service goes away: nothing trims the journal, whose disk then fills.
    let mut cache = cache;
    cache.kill().unwrap();
    cache.wait().unwrap();
    fill(&mnt);

    let bytes = data(2);
    let input = root.join("data.bin");
    std::fs::write(&input, &bytes).unwrap();
    let url = format!("nbd://{nbd}/os");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(&url));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&input)
        .arg(&url));
    wait_log(&agent_log, "the journal failed", 1);
    let text = std::fs::read_to_string(&agent_log).unwrap();
    assert!(text.contains("No space left on device"), "{text}");

    // Space returns and the cache service is back: the agent reopens its journal on its
    // own, resyncs, and the target catches up with everything.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let cache = spawn(&vault, &cache_args, &cache_log, "cache service on");
    guard.others.push(cache);
    wait_log(&agent_log, "the journal is reopened", 1);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = status(&vault);
        let r = &st["remote"];
        let text = std::fs::read_to_string(&agent_log).unwrap();
        let after = text.rsplit("the journal failed").next().unwrap_or("");
        if after.contains("resync finished")
            && r["link"] == "connected"
            && r["behind_records"] == 0
            && r["agent_journal_bytes"] == 0
            && r["agent_connected"] == true
            && r["resync_required"] == false
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target never caught up: {st:#}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut want = bytes;
    want.resize(DISK_MIB << 20, 0);
    // "Resync finished" is the agent's journal holding every block again; the status the
    // follower publishes each second may predate the last of them reaching the target.
    // So wait until the target's latest is what the client wrote (it must get there).
    let out = root.join("failover");
    let mut h = Sha256Hex::new();
    h.update(&want);
    let want_sha = h.hex();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = test_failover_latest(&vault, &out);
        if report["disks"][0]["sha256"] == want_sha.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target's latest never became what the client wrote: {report:#}"
        );
        standby(&vault, &["test-failover-cleanup", "vm"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(std::fs::read(out.join("os.raw")).unwrap() == want);
}

/// The cache service's directory on the small filesystem, the processor away while it
/// fills: the service refuses the agent's batches (the agent keeps them in its journal and
/// every client write succeeds), reopens its log once space returns, and the target's
/// `latest` is what the client wrote.
#[test]
fn a_full_cache_service_disk_refuses_batches_and_recovers_its_log() {
    let (mut guard, root) = small_fs();
    let mnt = guard.dir.clone();
    let vault = root.join("vault");
    let creds = root.join("creds");
    standby(&vault, &["init", vault.to_str().unwrap()]);
    standby(
        &vault,
        &["link", "export", "--out", creds.to_str().unwrap()],
    );
    let disk = root.join("os.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((DISK_MIB as u64) << 20)
        .unwrap();
    let cache_addr = format!("127.0.0.1:{}", free_port());
    let cache_log = root.join("cache.log");
    let cache = spawn(
        &vault,
        &[
            "cache",
            "serve",
            "--dir",
            mnt.join("cache").to_str().unwrap(),
            "--listen",
            &cache_addr,
            "--creds",
            creds.to_str().unwrap(),
        ],
        &cache_log,
        "cache service on",
    );
    guard.others.push(cache);
    let nbd = format!("127.0.0.1:{}", free_port());
    let agent = spawn(
        &vault,
        &[
            "agent",
            "vm",
            "--cache",
            &cache_addr,
            "--creds",
            creds.to_str().unwrap(),
            "--journal",
            root.join("journal").to_str().unwrap(),
            "--disk",
            &format!("os={}", disk.display()),
            "--listen",
            &nbd,
        ],
        &root.join("agent.log"),
        "serving NBD",
    );
    guard.agent = Some(agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_standby"))
            .args(["protect", "vm", "--cache", &cache_addr])
            .env("STANDBY_VAULT", &vault)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "protect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // No processor yet: nothing trims the cache service's log, whose disk fills.
    fill(&mnt);
    let bytes = data(3);
    let input = root.join("data.bin");
    std::fs::write(&input, &bytes).unwrap();
    let url = format!("nbd://{nbd}/os");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(&url));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&input)
        .arg(&url));
    wait_log(&cache_log, "No space left on device", 1);

    // Space returns; the service reopens its log, the agent ships what its journal kept.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let processor = spawn(
        &vault,
        &[
            "process",
            "--cache",
            &cache_addr,
            "--follow",
            "--every",
            "200ms",
        ],
        &root.join("process.log"),
        "",
    );
    guard.others.push(processor);
    wait_log(&cache_log, "the log is reopened after it failed", 1);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = status(&vault);
        let r = &st["remote"];
        if r["link"] == "connected"
            && r["behind_records"] == 0
            && r["agent_journal_bytes"] == 0
            && r["agent_connected"] == true
            && r["resync_required"] == false
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target never caught up: {st:#}\n{}",
            std::fs::read_to_string(&cache_log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut want = bytes;
    want.resize(DISK_MIB << 20, 0);
    failover_equals(&vault, &root.join("failover"), &want);
}
