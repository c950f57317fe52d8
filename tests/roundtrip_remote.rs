//! The way back across two sites, as separate processes with separate directories: site A
//! (where the VM first runs: its image, a cache service, the agent) and site B (the vault
//! that pulls, then where the VM fails over to). The whole cycle — protect → writes →
//! failover → writes at B → reprotect → writes → failback → reprotect → writes — against
//! an exact model: every byte of the disk, and every retained point of both vaults, is
//! checked at every step. The agent, the follower and the cache service are killed with
//! SIGKILL in the middle of reprotect's delta sync, and the cache service, the follower and
//! the failback itself in the middle of failback; the kills land at named steps of a test
//! hook (`STANDBY_TEST_PAUSE`), never after a sleep.

mod common;

use serde_json::Value;
use standby_engine::vault::{LockWait, PointSpec, Vault};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK: u64 = 48 << 20;
const BLOCK: u64 = 64 << 10;
/// Bigger than one resync step (32 MiB): the seeded sync is paused half way.
const BIG_RUN: u64 = 40 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_standby")
}

/// A long-running `standby` process logging to a file; killed (SIGKILL) when dropped.
struct Proc {
    name: String,
    args: Vec<String>,
    vault: PathBuf,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(name: &str, vault: &Path, args: &[&str], log: &Path) -> Proc {
        Self::start_with(name, vault, args, log, &[])
    }

    fn start_with(
        name: &str,
        vault: &Path,
        args: &[&str],
        log: &Path,
        envs: &[(&str, &str)],
    ) -> Proc {
        let mut p = Proc {
            name: name.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            vault: vault.to_path_buf(),
            envs: envs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            log: log.to_path_buf(),
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = Command::new(bin());
        c.args(&self.args)
            .env("STANDBY_VAULT", &self.vault)
            .env_remove("STANDBY_TEST_PAUSE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        self.child = Some(c.spawn().unwrap());
    }

    /// Start again after a kill, without the test hook.
    fn restart(&mut self) {
        self.envs.clear();
        self.spawn();
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
            common::interrupt(&mut c);
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log holds `needle` `times` times.
    fn wait_for(&self, needle: &str, times: usize) {
        wait_until(
            &format!("'{needle}' x{times} in {}'s log", self.name),
            || self.text().matches(needle).count() >= times,
        );
        let _ = &self.name;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Poll `cond` (a state the processes reach, never a time) for at most two minutes.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(vault: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env("STANDBY_VAULT", vault)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn ok(vault: &Path, args: &[&str]) -> String {
    let out = run(vault, args);
    assert!(
        out.status.success(),
        "standby {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(vault: &Path, args: &[&str]) -> String {
    let out = run(vault, args);
    assert!(!out.status.success(), "standby {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err
        .trim()
        .lines()
        .filter(|l| !l.contains("waiting for the lock"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    err
}

fn json(vault: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&ok(vault, args)).unwrap()
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

/// Write `n` random runs through the agent serving NBD at `nbd` (acknowledged, so into the
/// model).
fn nbd_writes(model: &mut [u8], rng: &mut Rng, nbd: &str, n: usize) {
    let mut cmds = Vec::new();
    for _ in 0..n {
        let len = 4096 * (1 + rng.next() % 40);
        let off = (rng.next() % ((DISK - len) / 4096)) * 4096;
        let fill = (rng.next() as u8) | 1;
        cmds.push(format!("write -P {fill} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(fill);
    }
    cmds.push("flush".into());
    common::qemu_io(&format!("nbd://{nbd}/os"), &cmds);
}

/// Write straight into an image (the VM running with no agent in its path).
fn file_write(model: &mut [u8], image: &Path, off: u64, len: u64, fill: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&vec![fill; len as usize], off).unwrap();
    f.sync_data().unwrap();
    model[off as usize..(off + len) as usize].fill(fill);
}

/// Write `len` bytes of noise straight into an image (nothing a compressor can shrink, so
/// bytes on the link tell what was shipped).
fn file_noise(model: &mut [u8], image: &Path, off: u64, len: u64, rng: &mut Rng) {
    let data: Vec<u8> = (0..len / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&data, off).unwrap();
    f.sync_data().unwrap();
    model[off as usize..(off + len) as usize].copy_from_slice(&data);
}

/// What the running follower of `vault` has pulled over the link in its life, once it has
/// everything up to `seq`.
fn pulled_bytes(vault: &Path, seq: u64) -> u64 {
    let dir = vault.join("vms/web01");
    let mut bytes = 0;
    wait_until("the follower's status", || {
        let doc =
            standby_engine::vault::remote::status_file::read(&standby_engine::vfs::RealFs, &dir)
                .unwrap();
        match doc {
            Some(d) if d.link.durable_seq >= seq => {
                bytes = d.link.bytes;
                true
            }
            _ => false,
        }
    });
    bytes
}

/// Bytes of the 64 KiB blocks where `a` and `b` differ.
fn changed_blocks(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.len() as u64)
        .sum()
}

/// `(id, seq)` of the VM's points, through `standby points` (answered by a running
/// follower without taking the VM from it).
fn points(vault: &Path, vm: &str) -> Vec<(u64, u64)> {
    json(vault, &["points", vm, "--json"])["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_u64().unwrap(), p["seq"].as_u64().unwrap()))
        .collect()
}

/// Every retained point of `vm` in `vault` reads as the model's state it was cut at;
/// points not seen yet are the model's current state.
fn check_points(vault: &Path, seen: &mut BTreeMap<u64, Vec<u8>>, now: &[u8], what: &str) {
    let v = Vault::open(vault, "test", LockWait::Block).unwrap();
    let ids: Vec<u64> = v.points("web01").unwrap().iter().map(|p| p.id).collect();
    assert!(!ids.is_empty(), "{what}: no points");
    for id in ids {
        let want = seen.entry(id).or_insert_with(|| now.to_vec()).clone();
        let m = v.mount("web01", PointSpec::Id(id)).unwrap();
        let mut got = vec![0u8; want.len()];
        m.view.read(0, 0, &mut got).unwrap();
        assert!(got == want, "{what}: point {id} differs from the model");
    }
}

/// Cut a point at the source site through the agent's journal (retried while the agent's
/// resync keeps the journal from taking a marker), and wait until the vault has it.
fn source_point(vault: &Path, journal: &Path) -> u64 {
    let mut seq = None;
    wait_until("a marker through the journal", || {
        let out = run(
            vault,
            &["point", "web01", "--journal", journal.to_str().unwrap()],
        );
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            // "wrote a … marker for VM at seq N; …"
            seq = text
                .split("at seq ")
                .nth(1)
                .and_then(|s| s.split(';').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            assert!(seq.is_some(), "{text}");
        }
        seq.is_some()
    });
    let seq = seq.unwrap();
    wait_until("the marker's point at the vault", || {
        std::thread::sleep(Duration::from_millis(200));
        points(vault, "web01").iter().any(|&(_, s)| s == seq)
    });
    points(vault, "web01")
        .iter()
        .find(|&&(_, s)| s == seq)
        .unwrap()
        .0
}

fn wait_paused(file: &Path, step: &str) {
    wait_until(&format!("the pause at {step}"), || {
        std::fs::read_to_string(file).is_ok_and(|s| s == step)
    });
}

#[test]
fn the_whole_two_site_cycle_against_a_model_with_kills_mid_sync_and_mid_failback() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();

    let (a, b) = (root.join("site-a"), root.join("site-b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (vault_a, vault_b) = (a.join("vault"), b.join("vault"));
    let image_a = a.join("web01-os.raw");
    std::fs::File::create(&image_a)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let port = |_: ()| common::free_port();
    let (cache_a, cache_b) = (
        format!("127.0.0.1:{}", port(())),
        format!("127.0.0.1:{}", port(())),
    );
    let (nbd_a, nbd_b) = (
        format!("127.0.0.1:{}", port(())),
        format!("127.0.0.1:{}", port(())),
    );
    let pause = root.join("paused");
    let pause_s = pause.to_str().unwrap().to_string();
    let mut rng = Rng(0x5eed_2026);
    let mut model = vec![0u8; DISK as usize];
    let (mut seen_a, mut seen_b) = (BTreeMap::new(), BTreeMap::new());
    // Noise the later writes leave alone (at both ends of the disk): a sync that shipped
    // unchanged blocks would show on the link, compression or not.
    file_noise(&mut model, &image_a, 0, 4 << 20, &mut rng);
    file_noise(&mut model, &image_a, DISK - (4 << 20), 4 << 20, &mut rng);

    // Site B's vault protects the VM running at site A.
    ok(&vault_b, &["init", vault_b.to_str().unwrap()]);
    let creds_b = a.join("creds-from-b");
    ok(
        &vault_b,
        &["link", "export", "--out", creds_b.to_str().unwrap()],
    );
    ok(
        &vault_b,
        &["policy", "set", "manual", "--crash-interval", "24h"],
    );
    let cache_a_dir = a.join("cache");
    let mut svc_a = Proc::start(
        "cache service A",
        &vault_b,
        &[
            "cache",
            "serve",
            "--dir",
            cache_a_dir.to_str().unwrap(),
            "--listen",
            &cache_a,
            "--creds",
            creds_b.to_str().unwrap(),
        ],
        &a.join("cache.log"),
    );
    svc_a.wait_for("cache service on", 1);
    let journal_a = a.join("journal");
    let agent_a_args = |journal: &Path| -> Vec<String> {
        [
            "agent",
            "web01",
            "--cache",
            &cache_a,
            "--creds",
            creds_b.to_str().unwrap(),
            "--journal",
            journal.to_str().unwrap(),
            "--disk",
            &format!("os={}", image_a.display()),
            "--listen",
            &nbd_a,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args: Vec<String> = agent_a_args(&journal_a);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut agent_a = Proc::start("agent A", &vault_b, &args, &a.join("agent.log"));
    agent_a.wait_for("serving NBD", 1);
    wait_until("protect --cache", || {
        run(
            &vault_b,
            &[
                "protect", "web01", "--cache", &cache_a, "--policy", "manual",
            ],
        )
        .status
        .success()
    });
    let mut follow_b = Proc::start(
        "follower B",
        &vault_b,
        &["process", "--follow", "--every", "200ms"],
        &b.join("process.log"),
    );
    // The initial replication's point (`resync`) holds the image as it was.
    wait_until("the initial point", || {
        std::thread::sleep(Duration::from_millis(200));
        !points(&vault_b, "web01").is_empty()
    });
    check_points(&vault_b, &mut seen_b, &model, "initial replication");
    nbd_writes(&mut model, &mut rng, &nbd_a, 40);
    let p1 = source_point(&vault_b, &journal_a);
    let at_p1 = model.clone();
    check_points(&vault_b, &mut seen_b, &model, "protect + writes");
    // The old source takes writes past the failover point: a reprotect reverts them.
    nbd_writes(&mut model, &mut rng, &nbd_a, 10);
    source_point(&vault_b, &journal_a);
    check_points(&vault_b, &mut seen_b, &model, "writes past p1");
    agent_a.stop();
    assert_eq!(std::fs::read(&image_a).unwrap(), model);
    let at_a = model.clone();

    // Failover at B to p1; the follower fences cache service A.
    let fo = b.join("failover");
    ok(
        &vault_b,
        &[
            "failover",
            "web01",
            "--point",
            &p1.to_string(),
            "--out",
            fo.to_str().unwrap(),
        ],
    );
    let image_b = fo.join("os.raw");
    model = at_p1.clone();
    assert_eq!(std::fs::read(&image_b).unwrap(), model);
    follow_b.wait_for("now refuses the old source's writes", 1);
    // The VM runs at B, unprotected: a big run (more than one resync step) and some more.
    file_noise(&mut model, &image_b, 4 << 20, BIG_RUN, &mut rng);
    for _ in 0..5 {
        let off = (rng.next() % (DISK / 4096 - 4)) * 4096;
        file_write(&mut model, &image_b, off, 8192, rng.next() as u8 | 1);
    }
    let err = fails(&vault_b, &["reprotect", "web01"]);
    assert!(err.contains("--cache"), "{err}");

    // Reprotect: site A's new vault pulls from a cache service at B; seeded from A's image.
    ok(&vault_a, &["init", vault_a.to_str().unwrap()]);
    let creds_a = b.join("creds-from-a");
    ok(
        &vault_a,
        &["link", "export", "--out", creds_a.to_str().unwrap()],
    );
    ok(
        &vault_a,
        &["policy", "set", "manual", "--crash-interval", "24h"],
    );
    let cache_b_dir = b.join("cache");
    let mut svc_b = Proc::start(
        "cache service B",
        &vault_a,
        &[
            "cache",
            "serve",
            "--dir",
            cache_b_dir.to_str().unwrap(),
            "--listen",
            &cache_b,
            "--creds",
            creds_a.to_str().unwrap(),
        ],
        &b.join("cache.log"),
    );
    svc_b.wait_for("cache service on", 1);
    let err = fails(&vault_a, &["reprotect", "web01", "--cache", &cache_b]);
    assert!(err.contains("--seed"), "{err}");
    let r = json(
        &vault_a,
        &[
            "reprotect",
            "web01",
            "--cache",
            &cache_b,
            "--seed",
            &format!("os={}", image_a.display()),
            "--policy",
            "manual",
            "--json",
        ],
    );
    assert_eq!(r["direction"], "reverse", "{r}");
    assert_eq!(r["hash_bytes"].as_u64(), Some(DISK / BLOCK * 16), "{r}");
    // Per disk and in total: the replica bytes read to hash its blocks (holes cost nothing).
    let per_disk: Vec<u64> = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["compared_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(per_disk.len(), 1, "{r}");
    assert!(per_disk[0] > 0 && per_disk[0] <= DISK, "{r}");
    assert_eq!(
        r["compared_bytes"].as_u64(),
        Some(per_disk.iter().sum()),
        "{r}"
    );
    // The replica at A is A's image (seeded locally), and so is its first point... none yet.
    let mut follow_a = Proc::start(
        "follower A",
        &vault_a,
        &["process", "--follow", "--every", "200ms"],
        &a.join("process.log"),
    );
    // The agent at B: its seeded first run ships only what differs from A's image; it is
    // held half way through that sync, and then everything is killed.
    let journal_b = b.join("journal");
    let agent_b_args: Vec<String> = [
        "agent",
        "web01",
        "--cache",
        &cache_b,
        "--creds",
        creds_a.to_str().unwrap(),
        "--journal",
        journal_b.to_str().unwrap(),
        "--seeded",
        "--disk",
        &format!("os={}", image_b.display()),
        "--listen",
        &nbd_b,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args: Vec<&str> = agent_b_args.iter().map(|s| s.as_str()).collect();
    let mut agent_b = Proc::start_with(
        "agent B",
        &vault_a,
        &args,
        &b.join("agent.log"),
        &[
            ("STANDBY_TEST_PAUSE", "seed-resync"),
            ("STANDBY_TEST_PAUSE_FILE", &pause_s),
        ],
    );
    wait_paused(&pause, "seed-resync");
    let want = changed_blocks(&at_a, &model);
    assert!(
        agent_b
            .text()
            .contains(&format!("{want} bytes of blocks differ")),
        "the seeded first run finds exactly the blocks that differ ({want}): {}",
        agent_b.text()
    );
    assert!(want < DISK, "not the whole disk");
    agent_b.kill9();
    follow_a.kill9();
    svc_b.kill9();
    std::fs::remove_file(&pause).unwrap();
    svc_b.restart();
    svc_b.wait_for("cache service on", 2);
    follow_a.restart();
    agent_b.restart();
    agent_b.wait_for("serving NBD", 2);
    assert!(
        agent_b
            .text()
            .contains("seeded resync of an earlier run did not finish"),
        "{}",
        agent_b.text()
    );
    source_point(&vault_a, &journal_b);
    check_points(&vault_a, &mut seen_a, &model, "reprotect after kills");

    // Protected in the reverse direction: writes through the agent at B.
    nbd_writes(&mut model, &mut rng, &nbd_b, 30);
    source_point(&vault_a, &journal_b);
    check_points(&vault_a, &mut seen_a, &model, "reverse writes");
    // Acknowledged, in no point yet: failback latest keeps them.
    nbd_writes(&mut model, &mut rng, &nbd_b, 10);
    let err = fails(&vault_a, &["failback", "web01"]);
    assert!(err.contains("stop it first"), "{err}");
    agent_b.stop();

    // Failback, held after fencing (cache service B and the follower are killed and
    // restarted), then held after its first block (it is killed, and so is the follower).
    let before = std::fs::read(&image_a).unwrap();
    let mut failback = Proc::start_with(
        "failback",
        &vault_a,
        &["failback", "web01", "--json"],
        &a.join("failback-1.log"),
        &[
            ("STANDBY_TEST_PAUSE", "failback-pull"),
            ("STANDBY_TEST_PAUSE_FILE", &pause_s),
        ],
    );
    wait_paused(&pause, "failback-pull");
    svc_b.kill9();
    follow_a.kill9();
    svc_b.restart();
    svc_b.wait_for("cache service on", 3);
    follow_a.restart();
    std::fs::remove_file(&pause).unwrap();
    let status = failback.child.as_mut().unwrap().wait().unwrap();
    assert!(status.success(), "{}", failback.text());
    failback.child = None;
    let fb: Value = serde_json::from_str(
        failback
            .text()
            .lines()
            .filter(|l| !l.starts_with("standby:"))
            .collect::<String>()
            .as_str(),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", failback.text()));
    assert_eq!(fb["resumed"], false);
    assert_eq!(
        fb["shipped_bytes"].as_u64(),
        Some(changed_blocks(&before, &model)),
        "failback writes exactly the blocks that differ: {fb}"
    );
    let disks = fb["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{fb}");
    for k in ["shipped_bytes", "compared_bytes"] {
        let sum: u64 = disks.iter().map(|d| d[k].as_u64().unwrap()).sum();
        assert_eq!(fb[k].as_u64(), Some(sum), "{k} per disk and in total: {fb}");
    }
    assert!(
        fb["compared_bytes"].as_u64().unwrap() >= fb["shipped_bytes"].as_u64().unwrap(),
        "a block is shipped only after it was compared: {fb}"
    );
    assert_eq!(
        std::fs::read(&image_a).unwrap(),
        model,
        "nothing acknowledged lost"
    );
    check_points(&vault_a, &mut seen_a, &model, "failback");
    follow_a.stop();
    follow_b.stop();
    let err = fails(&vault_a, &["failback", "web01"]);
    assert!(err.contains("failed over already"), "{err}");
    let err = fails(&vault_a, &["reprotect", "web01", "--cache", &cache_b]);
    assert!(err.contains("failed back to this site"), "{err}");

    // Reprotect again, at B's vault: back in the original direction, A's cache service
    // (its fence lifted by the seed), a new journal for A's agent.
    let r = json(
        &vault_b,
        &["reprotect", "web01", "--cache", &cache_a, "--json"],
    );
    assert_eq!(r["direction"], "original", "{r}");
    assert_eq!(r["seeded_bytes"].as_u64(), Some(0), "{r}");
    let journal_a2 = a.join("journal-2");
    let mut args: Vec<String> = agent_a_args(&journal_a2);
    args.push("--seeded".into());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut agent_a = Proc::start("agent A", &vault_b, &args, &a.join("agent.log"));
    agent_a.wait_for("serving NBD", 2);
    // B's replica is as it was before the failover (all A had): what differs from A now
    // is shipped, and nothing more crosses the link (a new follower counts from zero).
    let want = changed_blocks(&at_a, &model);
    assert!(
        agent_a
            .text()
            .contains(&format!("{want} bytes of blocks differ")),
        "({want}) {}",
        agent_a.text()
    );
    let mut follow_b = Proc::start(
        "follower B",
        &vault_b,
        &["process", "--follow", "--every", "200ms"],
        &b.join("process-2.log"),
    );
    let id = source_point(&vault_b, &journal_a2);
    let seq = points(&vault_b, "web01")
        .iter()
        .find(|p| p.0 == id)
        .unwrap()
        .1;
    let pulled = pulled_bytes(&vault_b, seq);
    eprintln!("second reprotect: {pulled} bytes on the link for {want} bytes of changed blocks");
    assert!(
        want > BIG_RUN && pulled <= want + want / 64 + (64 << 10),
        "the link carried {pulled} bytes for {want} bytes of changed blocks"
    );
    check_points(&vault_b, &mut seen_b, &model, "original direction again");
    nbd_writes(&mut model, &mut rng, &nbd_a, 30);
    source_point(&vault_b, &journal_a2);
    check_points(&vault_b, &mut seen_b, &model, "original direction, writes");
    assert_eq!(std::fs::read(&image_a).unwrap(), model);
    agent_a.stop();
    follow_b.stop();
    svc_a.stop();
    svc_b.stop();
}

#[test]
fn a_failback_killed_mid_write_is_finished_by_the_next_one() {
    // The short version of the cycle above: protected at A from B, failed over to B,
    // reprotected at A's vault, then a failback killed after its first block.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b) = (root.join("site-a"), root.join("site-b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (vault_a, vault_b) = (a.join("vault"), b.join("vault"));
    let image_a = a.join("os.raw");
    std::fs::File::create(&image_a)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let (cache_a, cache_b, nbd) = (
        format!("127.0.0.1:{}", common::free_port()),
        format!("127.0.0.1:{}", common::free_port()),
        format!("127.0.0.1:{}", common::free_port()),
    );
    let pause = root.join("paused");
    let pause_s = pause.to_str().unwrap().to_string();
    let mut rng = Rng(77);
    let mut model = vec![0u8; DISK as usize];

    ok(&vault_b, &["init", vault_b.to_str().unwrap()]);
    let creds_b = a.join("creds");
    ok(
        &vault_b,
        &["link", "export", "--out", creds_b.to_str().unwrap()],
    );
    let mut svc_a = Proc::start(
        "cache service A",
        &vault_b,
        &[
            "cache",
            "serve",
            "--dir",
            a.join("cache").to_str().unwrap(),
            "--listen",
            &cache_a,
            "--creds",
            creds_b.to_str().unwrap(),
        ],
        &a.join("cache.log"),
    );
    svc_a.wait_for("cache service on", 1);
    let mut agent = Proc::start(
        "agent A",
        &vault_b,
        &[
            "agent",
            "web01",
            "--cache",
            &cache_a,
            "--creds",
            creds_b.to_str().unwrap(),
            "--journal",
            a.join("journal").to_str().unwrap(),
            "--disk",
            &format!("os={}", image_a.display()),
            "--listen",
            &nbd,
        ],
        &a.join("agent.log"),
    );
    agent.wait_for("serving NBD", 1);
    wait_until("protect --cache", || {
        run(&vault_b, &["protect", "web01", "--cache", &cache_a])
            .status
            .success()
    });
    let mut follow_b = Proc::start(
        "follower B",
        &vault_b,
        &["process", "--follow", "--every", "200ms"],
        &b.join("process.log"),
    );
    nbd_writes(&mut model, &mut rng, &nbd, 30);
    let p = source_point(&vault_b, &a.join("journal"));
    agent.stop();
    let fo = b.join("failover");
    ok(
        &vault_b,
        &[
            "failover",
            "web01",
            "--point",
            &p.to_string(),
            "--out",
            fo.to_str().unwrap(),
        ],
    );
    follow_b.wait_for("now refuses the old source's writes", 1);
    follow_b.stop();
    svc_a.stop();
    let image_b = fo.join("os.raw");
    // Many scattered blocks change at B: the failback has many to write.
    for i in 0..64u64 {
        let off = (i * 11 * BLOCK + 4096) % (DISK - 8192);
        file_write(&mut model, &image_b, off, 8192, i as u8 | 1);
    }

    ok(&vault_a, &["init", vault_a.to_str().unwrap()]);
    let creds_a = b.join("creds");
    ok(
        &vault_a,
        &["link", "export", "--out", creds_a.to_str().unwrap()],
    );
    let mut svc_b = Proc::start(
        "cache service B",
        &vault_a,
        &[
            "cache",
            "serve",
            "--dir",
            b.join("cache").to_str().unwrap(),
            "--listen",
            &cache_b,
            "--creds",
            creds_a.to_str().unwrap(),
        ],
        &b.join("cache.log"),
    );
    svc_b.wait_for("cache service on", 1);
    ok(
        &vault_a,
        &[
            "reprotect",
            "web01",
            "--cache",
            &cache_b,
            "--seed",
            &format!("os={}", image_a.display()),
        ],
    );
    let mut follow_a = Proc::start(
        "follower A",
        &vault_a,
        &["process", "--follow", "--every", "200ms"],
        &a.join("process.log"),
    );
    let journal_b = b.join("journal");
    let mut agent = Proc::start(
        "agent B",
        &vault_a,
        &[
            "agent",
            "web01",
            "--cache",
            &cache_b,
            "--creds",
            creds_a.to_str().unwrap(),
            "--journal",
            journal_b.to_str().unwrap(),
            "--seeded",
            "--disk",
            &format!("os={}", image_b.display()),
            "--listen",
            &nbd,
        ],
        &b.join("agent.log"),
    );
    agent.wait_for("serving NBD", 1);
    source_point(&vault_a, &journal_b);
    agent.stop();

    let before = std::fs::read(&image_a).unwrap();
    let mut failback = Proc::start_with(
        "failback",
        &vault_a,
        &["failback", "web01", "--json"],
        &a.join("failback-1.log"),
        &[
            ("STANDBY_TEST_PAUSE", "failback-write"),
            ("STANDBY_TEST_PAUSE_FILE", &pause_s),
        ],
    );
    wait_paused(&pause, "failback-write");
    failback.kill9();
    follow_a.kill9();
    std::fs::remove_file(&pause).unwrap();
    let half = std::fs::read(&image_a).unwrap();
    assert!(
        half != before && half != model,
        "killed half way through the writes"
    );
    let fb = json(&vault_a, &["failback", "web01", "--json"]);
    assert_eq!(fb["resumed"], true, "{fb}");
    assert!(fb["shipped_bytes"].as_u64().unwrap() <= changed_blocks(&before, &model));
    assert_eq!(
        std::fs::read(&image_a).unwrap(),
        model,
        "the failback finished the job"
    );
    let mut seen = BTreeMap::new();
    check_points(&vault_a, &mut seen, &model, "after the resumed failback");
    svc_b.stop();
}
