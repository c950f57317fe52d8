//! Consistency groups over two sites, end to end through the CLI: at the source site a
//! cache service (or two) and one `standby agent VM --cache` process per member; at the
//! target the vault, `process --cache ADDR --follow` per cache service, and the group
//! coordinator (`standby point --group G`, or the group's policy in the follower of its
//! first member), whose barrier reaches the agents through their cache services. A causal
//! workload writes across the members through libnbd; every group point is test-failed-over
//! and checked bit-exact per member and causally consistent; a member's agent killed -9
//! during a group point fails it for all, the others go on, and the group goes on once the
//! agent is back.

mod common;

use common::causal::{check_causal, Causal};
use common::{interrupt, Env};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Each member's disk (small: the chain fills a few hundred KiB of it).
const DISK: usize = 8 << 20;
const IP: &str = "127.0.0.2";

fn free_port() -> u16 {
    TcpListener::bind(format!("{IP}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A long-running `standby` process whose output goes to a log file.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn start(env: &Env, args: &[&str], log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = env
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no '{needle}' (x{times}) in:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().unwrap().id().to_string()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A clean stop (SIGINT), which must succeed.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            common::interrupt(&mut c);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Both sites on one machine: the source site (127.0.0.2) with its cache services and
/// agents, the target's vault.
struct Sites {
    env: Env,
    creds: PathBuf,
    caches: Vec<(String, Proc)>,
    processors: Vec<Proc>,
    /// Per VM: its agent, NBD address and cache service.
    agents: Vec<(String, Proc, String, String)>,
}

impl Sites {
    /// A vault and `caches` cache services, each followed by a processor at the target.
    fn new(caches: usize) -> Sites {
        let env = Env::empty();
        env.ok(&["init", env.vault.to_str().unwrap()]);
        let creds = env.root.join("creds");
        env.ok(&["link", "export", "--out", creds.to_str().unwrap()]);
        let mut s = Sites {
            env,
            creds,
            caches: Vec::new(),
            processors: Vec::new(),
            agents: Vec::new(),
        };
        for i in 0..caches {
            let addr = format!("{IP}:{}", free_port());
            let dir = s.env.root.join(format!("cache{i}"));
            let p = Proc::start(
                &s.env,
                &[
                    "cache",
                    "serve",
                    "--dir",
                    dir.to_str().unwrap(),
                    "--listen",
                    &addr,
                    "--creds",
                    s.creds.to_str().unwrap(),
                ],
                &s.env.root.join(format!("cache{i}.log")),
            );
            p.wait_for("cache service on", 1);
            let f = Proc::start(
                &s.env,
                &["process", "--cache", &addr, "--follow", "--every", "200ms"],
                &s.env.root.join(format!("process{i}.log")),
            );
            s.caches.push((addr, p));
            s.processors.push(f);
        }
        s
    }

    /// Start VM `vm`'s agent at the source site, shipping to cache service `cache`, and
    /// (the first time) protect it at the target once the agent has declared it.
    fn agent(&mut self, vm: &str, cache: usize) {
        let addr = self.caches[cache].0.clone();
        let disk = self.env.root.join(format!("{vm}-os.raw"));
        if !disk.exists() {
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(DISK as u64)
                .unwrap();
        }
        let nbd = format!("{IP}:{}", free_port());
        let log = self.env.root.join(format!("agent-{vm}.log"));
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("serving NBD")
            .count();
        let journal = self.env.root.join(format!("journal-{vm}"));
        let p = Proc::start(
            &self.env,
            &[
                "agent",
                vm,
                "--cache",
                &addr,
                "--creds",
                self.creds.to_str().unwrap(),
                "--journal",
                journal.to_str().unwrap(),
                "--disk",
                &format!("os={}", disk.display()),
                "--listen",
                &nbd,
            ],
            &log,
        );
        p.wait_for("serving NBD", before + 1);
        let first = !self.agents.iter().any(|(v, ..)| v == vm);
        self.agents.retain(|(v, ..)| v != vm);
        self.agents.push((vm.to_string(), p, nbd, addr.clone()));
        if first {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = self.env.run(&["protect", vm, "--cache", &addr]);
                if out.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "protect {vm}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            // The first run's initial replication (a resync window) must be over before
            // the VM's markers cut points.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let st = self.env.json(&["status", vm, "--json"]);
                let r = &st["vms"][0]["remote"];
                if r["link"] == "connected"
                    && r["agent_connected"] == true
                    && r["resync_required"] == false
                {
                    break;
                }
                assert!(Instant::now() < deadline, "{vm} never caught up: {st}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn proc_of(&mut self, vm: &str) -> &mut Proc {
        &mut self.agents.iter_mut().find(|(v, ..)| v == vm).unwrap().1
    }

    fn uris(&self, vms: &[&str]) -> Vec<String> {
        vms.iter()
            .map(|vm| {
                let (_, _, nbd, _) = self.agents.iter().find(|(v, ..)| v == vm).unwrap();
                format!("nbd://{nbd}/os")
            })
            .collect()
    }

    fn group_points(&self, g: &str) -> Vec<Value> {
        self.env.json(&["points", "--group", g, "--json"])["points"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Test-fail-over group point `id` of `g` and check it against the chain over `vms`.
    fn check_point(&self, g: &str, id: u64, vms: &[&str]) -> usize {
        let out = self.env.root.join(format!("tf-{g}-{id}"));
        self.env.ok(&[
            "test-failover",
            "--group",
            g,
            "--point",
            &id.to_string(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let gj: Value =
            serde_json::from_slice(&std::fs::read(out.join("group.json")).unwrap()).unwrap();
        assert_eq!(gj["group_point"]["id"], id, "{gj}");
        let total = check_causal(&out, vms, DISK);
        self.env.ok(&["test-failover-cleanup", "--group", g]);
        total
    }

    /// Mount every member point of group point `p` (`standby mount VM --point ID`, one
    /// member at a time, while the sites run), copy each over NBD with qemu-img, and check
    /// the copies against the chain over `vms`, as a group test failover would.
    fn check_mounted(&self, p: &Value, vms: &[&str]) -> usize {
        let out = self.env.root.join(format!("mnt-{}", p["id"]));
        for m in p["members"].as_array().unwrap() {
            let vm = m["vm"].as_str().unwrap();
            let id = m["point"].to_string();
            let addr = format!("127.0.0.1:{}", free_port());
            let mut mount = self
                .env
                .cmd(&["mount", vm, "--point", &id, "--listen", &addr])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut first = String::new();
            BufReader::new(mount.stdout.as_mut().unwrap())
                .read_line(&mut first)
                .unwrap();
            assert!(first.contains(&addr), "mount {vm} {id}: {first}");
            std::fs::create_dir_all(out.join(vm)).unwrap();
            let st = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(format!("nbd://{addr}/os"))
                .arg(out.join(vm).join("os.raw"))
                .status()
                .unwrap();
            interrupt(&mut mount);
            assert!(
                st.success(),
                "qemu-img convert from the mount of {vm} failed"
            );
        }
        check_causal(&out, vms, DISK)
    }

    fn stop_all(mut self) {
        for (_, p, ..) in &mut self.agents {
            p.stop();
        }
        for p in &mut self.processors {
            p.stop();
        }
        for (_, p) in &mut self.caches {
            p.stop();
        }
    }
}

/// Members on one cache service: group points on demand (one app-consistent with hooks)
/// under the causal load, each failed over causally consistent; then a real group
/// failover of the remote members.
#[test]
fn remote_members_on_one_cache_service_cut_causally_consistent_group_points() {
    let vms = ["a", "b", "c"];
    let mut s = Sites::new(1);
    for vm in vms {
        s.agent(vm, 0);
    }
    s.env.ok(&[
        "group", "create", "g", "--vm", "a", "--vm", "b", "--vm", "c",
    ]);
    let writer = Causal::start(&s.env.root, &s.uris(&vms), DISK, "w");
    let hooks = s.env.root.join("hooks");
    let (q, t) = (
        format!("echo quiesce $STANDBY_VM >> {}", hooks.display()),
        format!("echo thaw $STANDBY_VM >> {}", hooks.display()),
    );
    for i in 0..3 {
        writer.advance(150);
        let mut args = vec!["point", "--group", "g"];
        if i == 1 {
            args.extend(["--app-consistent", "--name", "mid"]);
            args.extend(["--quiesce-command", &q, "--thaw-command", &t]);
        }
        let out = s.env.ok(&args);
        assert!(out.starts_with("cut group point"), "{out}");
    }
    assert_eq!(
        std::fs::read_to_string(&hooks).unwrap(),
        "quiesce a\nquiesce b\nquiesce c\nthaw a\nthaw b\nthaw c\n"
    );
    writer.advance(150);
    let points = s.group_points("g");
    assert_eq!(points.len(), 3, "{points:?}");
    assert_eq!(points[1]["kind"], "app-consistent", "{points:?}");
    let mut totals = Vec::new();
    for p in &points {
        assert_eq!(p["members"].as_array().unwrap().len(), 3, "{p}");
        totals.push(s.check_point("g", p["id"].as_u64().unwrap(), &vms));
        // Mounted, the group point's member points read the same bytes.
        assert_eq!(s.check_mounted(p, &vms), *totals.last().unwrap(), "{p}");
    }
    assert!(
        totals.windows(2).all(|w| w[0] < w[1]),
        "each group point was cut under load: {totals:?}"
    );
    let acked = writer.finish();
    assert!(totals[2] <= acked);
    // Each member point is an ordinary point of its VM too, its marker naming the group
    // point.
    let ps = s.env.json(&["points", "b", "--json"]);
    let want = points[2]["members"][1]["point"].clone();
    assert!(
        ps["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == want),
        "{ps}"
    );
    // The group's real failover: the followers let go of the remote members.
    let out = s.env.root.join("final");
    let r = s.env.json(&[
        "failover",
        "--group",
        "g",
        "--point",
        "latest-group-app-consistent",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["group_point"]["id"], points[1]["id"], "{r}");
    assert_eq!(check_causal(&out, &vms, DISK), totals[1]);
    s.stop_all();
}

/// Members on two cache services, group points cut by the group's policy (the follower
/// of its first member coordinates) under the causal load.
#[test]
fn a_groups_policy_cuts_group_points_across_two_cache_services() {
    let vms = ["a", "b", "c", "d"];
    let mut s = Sites::new(2);
    for (i, vm) in vms.iter().enumerate() {
        s.agent(vm, i % 2);
    }
    s.env
        .ok(&["policy", "set", "fast", "--crash-interval", "1s"]);
    s.env.ok(&[
        "group", "create", "g", "--vm", "a", "--vm", "b", "--vm", "c", "--vm", "d", "--policy",
        "fast",
    ]);
    let writer = Causal::start(&s.env.root, &s.uris(&vms), DISK, "w");
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.group_points("g").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the policy cut no group points:\n{}",
            s.processors[0].text()
        );
        writer.advance(50);
    }
    let points = s.group_points("g");
    for p in &points[..3] {
        assert_eq!(p["kind"], "crash-consistent", "{p}");
        assert_eq!(p["members"].as_array().unwrap().len(), 4, "{p}");
        s.check_point("g", p["id"].as_u64().unwrap(), &vms);
    }
    writer.finish();
    let st = s.env.json(&["status", "--json"]);
    assert_eq!(st["groups"][0]["group"], "g", "{st}");
    s.stop_all();
}

/// kill -9 of one member's agent during a group point: cut for none, the other members'
/// writes go on (nobody holds past the bound), and the group goes on once it is back.
#[test]
fn a_remote_members_agent_killed_during_a_group_point_fails_it_for_all() {
    let vms = ["a", "b", "c"];
    let mut s = Sites::new(1);
    for vm in vms {
        s.agent(vm, 0);
    }
    s.env.ok(&[
        "group", "create", "g", "--vm", "a", "--vm", "b", "--vm", "c",
    ]);
    s.env.ok(&["point", "--group", "g"]);
    // The chain runs over a and b: c is the member that dies.
    let writer = Causal::start(&s.env.root, &s.uris(&["a", "b"]), DISK, "w");
    writer.advance(100);
    let c_pid = s.proc_of("c").pid();
    assert!(Command::new("kill")
        .args(["-STOP", &c_pid])
        .status()
        .unwrap()
        .success());
    let coordinator = s
        .env
        .cmd(&["point", "--group", "g"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.proc_of("c").kill9();
    let out = coordinator.wait_with_output().unwrap();
    assert!(!out.status.success(), "a group point without c must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("member c"), "{err}");
    assert!(err.contains("no group point was listed"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Nobody is left holding: a and b go on.
    writer.advance(200);
    assert_eq!(
        s.group_points("g").len(),
        1,
        "the failed point is not listed"
    );
    // Back, c's agent resumes from its journal; the group goes on.
    s.agent("c", 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        writer.advance(50);
        let out = s.env.run(&["point", "--group", "g"]);
        if out.status.success() {
            break;
        }
        // Until c's agent has reconnected to the cache service, its member refuses.
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("member c"), "{err}");
        assert!(Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let points = s.group_points("g");
    assert_eq!(points.len(), 2, "{points:?}");
    assert_eq!(points[1]["members"].as_array().unwrap().len(), 3);
    let out = s.env.root.join("tf");
    s.env.ok(&[
        "test-failover",
        "--group",
        "g",
        "--point",
        &points[1]["id"].to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    check_causal(&out, &["a", "b"], DISK);
    s.env.ok(&["test-failover-cleanup", "--group", "g"]);
    writer.finish();
    s.stop_all();
}
