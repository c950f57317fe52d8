//! Consistency groups end to end: real `standby agent` processes (one per VM, embedded),
//! a real NBD client (libnbd, from Python) driving a causal workload across them, group
//! points cut on demand while it writes, every group point failed over (test failover)
//! and checked bit-exact per member against a model and causally consistent; a member
//! agent stopped and killed -9 during a group point (cut for none, the others go on);
//! members joining and leaving under load.

mod common;

use common::Env;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::causal::{self, Causal};

/// Each VM's disk.
const DISK: usize = 32 << 20;

/// A causal writer across the given agents.
fn causal_over(env: &Env, agents: &[&Agent], tag: &str) -> Causal {
    let uris: Vec<String> = agents
        .iter()
        .map(|a| format!("nbd://{}/os", a.addr))
        .collect();
    Causal::start(&env.root, &uris, DISK, tag)
}

fn check_causal(out: &Path, vms: &[&str]) -> usize {
    causal::check_causal(out, vms, DISK)
}

struct Agent {
    child: Child,
    addr: String,
}

impl Env {
    fn group_vault(vms: &[&str]) -> Env {
        Env::group_vault_sized(vms, DISK)
    }

    fn group_vault_sized(vms: &[&str], disk: usize) -> Env {
        let env = Env::empty();
        env.ok(&["init", env.vault.to_str().unwrap()]);
        for vm in vms {
            env.ok(&[
                "protect",
                vm,
                "--disk",
                &format!("os=new:{}MiB", disk >> 20),
            ]);
        }
        env
    }

    fn agent(&self, vm: &str) -> Agent {
        let mut child = self
            .cmd(&["agent", vm, "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let addr = first
            .split_whitespace()
            .skip_while(|w| *w != "on")
            .nth(1)
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        std::thread::spawn(move || for _ in out.lines() {});
        Agent { child, addr }
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "standby {args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    fn group_points(&self, g: &str) -> Vec<Value> {
        self.json(&["points", "--group", g, "--json"])["points"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test failover of group point `id` of `g` into `out`: each member's image, by VM.
fn test_failover(env: &Env, g: &str, id: u64, out: &Path) -> Value {
    let r = env.json(&[
        "test-failover",
        "--group",
        g,
        "--point",
        &id.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("group.json")).unwrap()).unwrap();
    assert_eq!(manifest["group_point"]["id"], id, "{manifest}");
    r
}

#[test]
fn group_points_under_a_causal_load_fail_over_bit_exact_and_causally_consistent() {
    let vms = ["a", "b", "c"];
    let env = Env::group_vault(&vms);
    env.ok(&[
        "group", "create", "g", "--vm", "a", "--vm", "b", "--vm", "c",
    ]);
    let agents: Vec<Agent> = vms.iter().map(|v| env.agent(v)).collect();
    let writer = causal_over(&env, &agents.iter().collect::<Vec<_>>(), "w");
    let hooks = env.root.join("hooks");
    let (q, t) = (
        format!("echo quiesce $STANDBY_VM >> {}", hooks.display()),
        format!("echo thaw $STANDBY_VM >> {}", hooks.display()),
    );
    for i in 0..4 {
        writer.advance(200);
        let mut args = vec!["point", "--group", "g"];
        if i == 1 {
            args.extend(["--app-consistent", "--name", "mid"]);
            args.extend(["--quiesce-command", &q, "--thaw-command", &t]);
        }
        let out = env.ok(&args);
        assert!(out.starts_with("cut group point"), "{out}");
    }
    assert_eq!(
        std::fs::read_to_string(&hooks).unwrap(),
        "quiesce a\nquiesce b\nquiesce c\nthaw a\nthaw b\nthaw c\n",
        "quiesce all, the point, thaw all"
    );
    writer.advance(200);
    let points = env.group_points("g");
    assert_eq!(points.len(), 4, "{points:?}");
    assert_eq!(points[1]["kind"], "app-consistent");
    assert_eq!(points[1]["name"], "mid");
    let mut totals = Vec::new();
    for p in &points {
        let id = p["id"].as_u64().unwrap();
        let members = p["members"].as_array().unwrap();
        assert_eq!(members.len(), 3, "{p}");
        let out = env.root.join(format!("tf-{id}"));
        test_failover(&env, "g", id, &out);
        totals.push(check_causal(&out, &vms));
        env.ok(&["test-failover-cleanup", "--group", "g"]);
        assert!(!out.join("a").exists(), "the cleanup removed the disks");
    }
    let acked = writer.finish();
    assert!(
        totals.windows(2).all(|w| w[0] < w[1]),
        "each group point was cut under load, later than the one before: {totals:?}"
    );
    assert!(totals[3] <= acked, "{totals:?} {acked}");
    let st = env.json(&["status", "--json"]);
    assert_eq!(st["groups"][0]["group"], "g", "{st}");
    assert_eq!(st["groups"][0]["last_point"]["id"], points[3]["id"], "{st}");
    assert_eq!(st["groups"][0]["health"], "healthy", "{st}");

    // A group failover needs the members to itself; then every member at one group point.
    let e = env.fails(&["failover", "--group", "g", "--point", "latest-group"]);
    assert!(e.contains("running agent"), "{e}");
    for mut a in agents {
        common::interrupt(&mut a.child);
    }
    // (Drop kills only what is still running.)
    let out = env.root.join("final");
    let r = env.json(&[
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
    assert_eq!(check_causal(&out, &vms), totals[1]);
    for vm in vms {
        assert!(out.join(vm).join("vm.json").exists());
    }
    let gj: Value =
        serde_json::from_slice(&std::fs::read(out.join("group.json")).unwrap()).unwrap();
    assert_eq!(gj["members"].as_array().unwrap().len(), 3, "{gj}");
    env.ok(&["failover-commit", "--group", "g"]);
    let st = env.json(&["status", "--json"]);
    for v in st["vms"].as_array().unwrap() {
        assert_eq!(v["state"], "failed-over", "{v}");
    }
}

#[test]
fn a_member_killed_during_a_group_point_fails_it_for_all_and_the_others_go_on() {
    let vms = ["a", "b", "c"];
    let env = Env::group_vault(&vms);
    env.ok(&[
        "group", "create", "g", "--vm", "a", "--vm", "b", "--vm", "c",
    ]);
    let mut agents: Vec<Agent> = vms.iter().map(|v| env.agent(v)).collect();
    env.ok(&["point", "--group", "g"]);
    // A writer on a and b only: c is the member that dies.
    let writer = causal_over(&env, &[&agents[0], &agents[1]], "w");
    writer.advance(100);
    // c stops answering, then is killed while the coordinator waits for it.
    let c_pid = agents[2].child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &c_pid])
        .status()
        .unwrap()
        .success());
    let coordinator = env
        .cmd(&["point", "--group", "g"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    agents[2].child.kill().unwrap(); // SIGKILL
    agents[2].child.wait().unwrap();
    let out = coordinator.wait_with_output().unwrap();
    assert!(!out.status.success(), "a group point without c must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("member c"), "{err}");
    assert!(err.contains("no group point was listed"), "{err}");
    // Nobody is left holding: the writes on a and b go on.
    writer.advance(200);
    assert_eq!(
        env.group_points("g").len(),
        1,
        "the failed group point is not listed"
    );
    // The group goes on once c is back.
    let c = env.agent("c");
    agents[2] = c;
    writer.advance(100);
    env.ok(&["point", "--group", "g"]);
    let points = env.group_points("g");
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["members"].as_array().unwrap().len(), 3);
    // Group point ids are never reused: the failed one took 2.
    assert_eq!(points[1]["id"], 3, "{points:?}");
    let out = env.root.join("tf");
    test_failover(&env, "g", 3, &out);
    // a and b carry the chain; the check covers them as a two-member chain.
    check_causal(&out, &["a", "b"]);
    writer.finish();
    for mut a in agents {
        common::interrupt(&mut a.child);
    }
    // (Drop kills only what is still running.)
}

#[test]
fn members_join_and_leave_under_load() {
    let vms = ["a", "b", "c"];
    let env = Env::group_vault(&vms);
    env.ok(&["group", "create", "g", "--vm", "a", "--vm", "b"]);
    let agents: Vec<Agent> = vms.iter().map(|v| env.agent(v)).collect();
    let writer = causal_over(&env, &agents.iter().collect::<Vec<_>>(), "w");
    writer.advance(100);
    env.ok(&["point", "--group", "g"]);
    env.ok(&["group", "add", "g", "c"]);
    writer.advance(100);
    env.ok(&["point", "--group", "g"]);
    env.ok(&["group", "remove", "g", "a"]);
    writer.advance(100);
    env.ok(&["point", "--group", "g"]);
    let members = |p: &Value| -> Vec<String> {
        p["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["vm"].as_str().unwrap().to_string())
            .collect()
    };
    let points = env.group_points("g");
    assert_eq!(members(&points[0]), ["a", "b"]);
    assert_eq!(members(&points[1]), ["a", "b", "c"]);
    assert_eq!(members(&points[2]), ["b", "c"]);
    // The group point cut with all three is causally consistent across all three.
    let out = env.root.join("tf");
    test_failover(&env, "g", points[1]["id"].as_u64().unwrap(), &out);
    check_causal(&out, &vms);
    env.ok(&["test-failover-cleanup", "--group", "g"]);
    // A group point whose member left still fails over (a kept its points).
    let out = env.root.join("tf0");
    test_failover(&env, "g", points[0]["id"].as_u64().unwrap(), &out);
    assert!(out.join("a").join("vm.json").exists());
    writer.finish();
    for mut a in agents {
        common::interrupt(&mut a.child);
    }
    // (Drop kills only what is still running.)
}

/// A group of 16 VMs (small disks), each its own agent process, under one causal chain
/// across all 16: two join and two leave while it writes; the group point of all 16 is
/// causally consistent across all of them, the others across their members.
#[test]
fn a_group_of_16_vms_with_members_joining_and_leaving_under_load() {
    const SMALL: usize = 2 << 20;
    let names: Vec<String> = (0..16).map(|i| format!("vm{i:02}")).collect();
    let vms: Vec<&str> = names.iter().map(String::as_str).collect();
    let env = Env::group_vault_sized(&vms, SMALL);
    let mut create = vec!["group", "create", "g"];
    for vm in &vms[..14] {
        create.extend(["--vm", vm]);
    }
    env.ok(&create);
    let agents: Vec<Agent> = vms.iter().map(|v| env.agent(v)).collect();
    let uris: Vec<String> = agents
        .iter()
        .map(|a| format!("nbd://{}/os", a.addr))
        .collect();
    let writer = Causal::start(&env.root, &uris, SMALL, "w");
    writer.advance(160);
    env.ok(&["point", "--group", "g"]);
    env.ok(&["group", "add", "g", "vm14"]);
    writer.advance(50);
    env.ok(&["group", "add", "g", "vm15"]);
    writer.advance(160);
    env.ok(&["point", "--group", "g"]);
    env.ok(&["group", "remove", "g", "vm00"]);
    writer.advance(50);
    env.ok(&["group", "remove", "g", "vm01"]);
    writer.advance(160);
    env.ok(&["point", "--group", "g"]);
    let points = env.group_points("g");
    assert_eq!(points.len(), 3, "{points:?}");
    let members = |p: &Value| -> Vec<String> {
        p["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["vm"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(members(&points[0]), names[..14].to_vec());
    assert_eq!(members(&points[1]), names);
    assert_eq!(members(&points[2]), names[2..].to_vec());
    let out = env.root.join("tf-all");
    test_failover(&env, "g", points[1]["id"].as_u64().unwrap(), &out);
    let total = causal::check_causal(&out, &vms, SMALL);
    assert!(total > 0);
    env.ok(&["test-failover-cleanup", "--group", "g"]);
    for (p, m) in [(&points[0], &vms[..14]), (&points[2], &vms[2..])] {
        let id = p["id"].as_u64().unwrap();
        let out = env.root.join(format!("tf-{id}"));
        test_failover(&env, "g", id, &out);
        causal::check_causal_subset(&out, &vms, m, SMALL);
        env.ok(&["test-failover-cleanup", "--group", "g"]);
    }
    writer.finish();
    for mut a in agents {
        common::interrupt(&mut a.child);
    }
}

#[test]
fn group_commands_refuse_bad_input_in_one_line() {
    let env = Env::group_vault(&["a", "b"]);
    let e = env.fails(&["group", "create", "g", "--vm", "a", "--vm", "nope"]);
    assert!(e.contains("nope"), "{e}");
    env.ok(&["group", "create", "g", "--vm", "a"]);
    let e = env.fails(&["group", "create", "h", "--vm", "a"]);
    assert!(e.contains("already in consistency group 'g'"), "{e}");
    let e = env.fails(&["group", "create", "g", "--vm", "b"]);
    assert!(e.contains("already exists"), "{e}");
    let e = env.fails(&["group", "add", "nope", "b"]);
    assert!(e.contains("no consistency group 'nope'"), "{e}");
    let e = env.fails(&["group", "remove", "g", "b"]);
    assert!(e.contains("not in consistency group"), "{e}");
    let e = env.fails(&["group", "create", "x", "--vm", "b", "--policy", "nope"]);
    assert!(e.contains("nope"), "{e}");
    let e = env.fails(&["point", "--group", "nope"]);
    assert!(e.contains("no consistency group"), "{e}");
    // No agent runs: the group point fails, and nothing is listed.
    let e = env.fails(&["point", "--group", "g"]);
    assert!(e.contains("no running agent"), "{e}");
    assert!(env.group_points("g").is_empty());
    let e = env.fails(&["failover", "--group", "g", "--point", "latest"]);
    assert!(e.contains("latest-group"), "{e}");
    let e = env.fails(&["failover", "--group", "g", "--point", "latest-group"]);
    assert!(e.contains("no group point"), "{e}");
    let e = env.fails(&["test-failover-cleanup", "--group", "g"]);
    assert!(e.contains("no test failover"), "{e}");
    let e = env.fails(&["points"]);
    assert!(e.contains("name a VM"), "{e}");
    env.ok(&["group", "add", "g", "b"]);
    let l = env.json(&["group", "list", "--json"]);
    assert_eq!(
        l["groups"][0]["members"],
        serde_json::json!(["a", "b"]),
        "{l}"
    );
    env.ok(&["group", "delete", "g"]);
    let e = env.fails(&["group", "delete", "g"]);
    assert!(e.contains("no consistency group"), "{e}");
    assert!(env.ok(&["group", "list"]).contains("no consistency groups"));
}

#[test]
fn the_groups_policy_cuts_group_points_on_its_own_under_load() {
    let vms = ["a", "b"];
    let env = Env::group_vault(&vms);
    env.ok(&["policy", "set", "fast", "--crash-interval", "1s"]);
    env.ok(&[
        "group", "create", "g", "--vm", "a", "--vm", "b", "--policy", "fast",
    ]);
    let agents: Vec<Agent> = vms.iter().map(|v| env.agent(v)).collect();
    let writer = causal_over(&env, &agents.iter().collect::<Vec<_>>(), "w");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while env.group_points("g").len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the policy cut no group points"
        );
        writer.advance(50);
    }
    let points = env.group_points("g");
    for p in &points[..3] {
        assert_eq!(p["kind"], "crash-consistent", "{p}");
        let id = p["id"].as_u64().unwrap();
        let out = env.root.join(format!("tf-{id}"));
        test_failover(&env, "g", id, &out);
        check_causal(&out, &vms);
        env.ok(&["test-failover-cleanup", "--group", "g"]);
    }
    writer.finish();
    for mut a in agents {
        common::interrupt(&mut a.child);
    }
}

/// The groups file of the first build with groups (tests/fixtures/groups-v1) reads the same.
#[test]
fn the_first_groups_file_still_reads() {
    let env = Env::group_vault(&[]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/groups-v1");
    std::fs::copy(fixture.join("groups"), env.vault.join("groups")).unwrap();
    let want: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("points.json")).unwrap()).unwrap();
    assert_eq!(env.json(&["points", "--group", "g", "--json"]), want);
    let l = env.json(&["group", "list", "--json"]);
    assert_eq!(l["groups"][0]["last_point"]["id"], 3, "{l}");
    // A flipped byte is reported as damage, never read as groups.
    let mut b = std::fs::read(fixture.join("groups")).unwrap();
    b[40] ^= 1;
    std::fs::write(env.vault.join("groups"), &b).unwrap();
    let e = env.fails(&["group", "list"]);
    assert!(e.contains("groups"), "{e}");
}
