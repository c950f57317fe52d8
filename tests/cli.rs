//! End to end through the built `standby` binary: protect a two-disk VM, write through the
//! agent API, cut points, process, fail over to every kind of point and to moments inside
//! the any-moment window, compare every disk's sha256 with what the VM held, test failover,
//! change of point, commit; and every operator mistake gets one clear line and exit 1
//! (2 for usage).

mod common;

use common::{sha, Env};
use serde_json::Value;
use standby_engine::record::{Consistency, Marker};
use standby_engine::vault::{LockWait, Vault};
use std::path::{Path, PathBuf};
use std::process::Command;

const OS_BYTES: usize = 8 << 20;
const DATA_BYTES: usize = 4 << 20;

impl Env {
    /// Run and require failure with `code`; returns the one-line stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "standby {args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        err
    }
}

/// The VM as the test believes it is: one Vec per disk.
struct Model {
    disks: Vec<Vec<u8>>,
    rng: u64,
}

impl Model {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn sums(&self) -> Vec<String> {
        self.disks.iter().map(|d| sha(d)).collect()
    }

    /// `n` random writes (and a few trims) through the agent; returns the last seq.
    fn churn(&mut self, vault: &Path, n: usize) -> u64 {
        let v = Vault::open(vault, "test", LockWait::Block).unwrap();
        let agent = v.agent("vm1").unwrap();
        let mut last = 0;
        for _ in 0..n {
            let disk = (self.next() % 2) as usize;
            let len = 512 * (1 + self.next() % 64) as usize;
            let off = (self.next() % ((self.disks[disk].len() - len) as u64 / 512)) as usize * 512;
            if self.next().is_multiple_of(10) {
                last = agent
                    .zero(disk as u16, off as u64, len as u64, true, false)
                    .unwrap();
                self.disks[disk][off..off + len].fill(0);
            } else {
                let fill = self.next();
                let data: Vec<u8> = (0..len)
                    .map(|i| (fill >> (i % 8 * 8)) as u8 ^ (i / 512) as u8)
                    .collect();
                last = agent.write(disk as u16, off as u64, &data, false).unwrap();
                self.disks[disk][off..off + len].copy_from_slice(&data);
            }
        }
        agent.close().unwrap();
        last
    }

    fn marker(&self, vault: &Path, app: bool, name: &str) -> u64 {
        let v = Vault::open(vault, "test", LockWait::Block).unwrap();
        let agent = v.agent("vm1").unwrap();
        let m = Marker {
            consistency: if app {
                Consistency::App
            } else {
                Consistency::Crash
            },
            name: Some(name.to_string()),
            group: None,
            kind: standby_engine::record::MarkerKind::Point,
        };
        let seq = agent.marker(&m).unwrap();
        agent.close().unwrap();
        seq
    }
}

fn failover_sums(env: &Env, args: &[&str]) -> Vec<String> {
    env.ok(args);
    let dir = args
        .iter()
        .position(|a| *a == "--out")
        .map(|i| PathBuf::from(args[i + 1]))
        .unwrap_or_else(|| {
            env.vault
                .join(if args[0] == "test-failover" {
                    "test-failover"
                } else {
                    "failover"
                })
                .join("prod-asr/vm1")
        });
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vm.json")).unwrap()).unwrap();
    let mut sums = Vec::new();
    for (i, name) in ["os", "data"].iter().enumerate() {
        let d = &manifest["disks"][i];
        assert_eq!(d["name"], *name);
        let bytes = std::fs::read(dir.join(format!("{name}.raw"))).unwrap();
        // vm.json's digest is the image's.
        assert_eq!(d["sha256"].as_str().unwrap(), sha(&bytes));
        sums.push(sha(&bytes));
    }
    sums
}

fn setup(env: &Env) -> Model {
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let mut os = vec![0u8; OS_BYTES];
    for (i, b) in os[..1 << 20].iter_mut().enumerate() {
        *b = (i * 7 / 512) as u8;
    }
    std::fs::write(env.root.join("os.raw"), &os).unwrap();
    let out = env.ok(&[
        "protect",
        "vm1",
        "--disk",
        "os=os.raw",
        "--disk",
        &format!("data=new:{}MiB", DATA_BYTES >> 20),
        "--resource-group",
        "prod",
        "--network",
        "prod-net",
        "--subnet",
        "web",
        "--availability-set",
        "web-set",
        "--network-mapping",
        "mgmt=mgmt-dr",
    ]);
    assert!(out.contains("protected vm1"), "{out}");
    assert!(
        out.contains("prod-asr") && out.contains("prod-net-asr") && out.contains("web-set-asr"),
        "{out}"
    );
    Model {
        disks: vec![os, vec![0u8; DATA_BYTES]],
        rng: 0x1234_5678_9abc_def1,
    }
}

#[test]
fn protect_write_point_process_and_fail_over_to_every_kind_of_point() {
    let env = Env::empty();
    let mut m = setup(&env);
    let initial = m.sums();
    let points = env.json(&["points", "vm1", "--json"]);
    assert_eq!(points["points"][0]["kind"], "initial");
    assert_eq!(points["points"].as_array().unwrap().len(), 1);

    // Round 1 ends in an app-consistent point cut through the agent.
    m.churn(&env.vault, 300);
    m.marker(&env.vault, true, "app-1");
    let app1 = m.sums();
    // Round 2 ends in a crash-consistent point cut by the command.
    m.churn(&env.vault, 300);
    let out = env.ok(&["point", "vm1", "--name", "crash-2"]);
    assert!(out.contains("crash-consistent"), "{out}");
    let crash2 = m.sums();
    // Round 3: a moment inside the window, then more writes, then an app point by command.
    let mid_seq = m.churn(&env.vault, 200);
    let mid = m.sums();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let t = std::time::SystemTime::now();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    m.churn(&env.vault, 200);
    env.ok(&["point", "vm1", "--app-consistent", "--name", "app-3"]);
    let app3 = m.sums();
    // Round 4: pending, never processed before the `latest` failover.
    m.churn(&env.vault, 100);
    let latest = m.sums();

    let pts = env.json(&["points", "vm1", "--json"]);
    let pts = pts["points"].as_array().unwrap().clone();
    let kinds: Vec<&str> = pts.iter().map(|p| p["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "initial",
            "app-consistent",
            "crash-consistent",
            "app-consistent"
        ]
    );
    for p in &pts {
        for field in ["id", "seq", "time", "kind", "name", "bytes"] {
            assert!(p.get(field).is_some(), "points --json lacks {field}: {p}");
        }
    }
    let id = |i: usize| pts[i]["id"].as_u64().unwrap().to_string();

    let st = env.json(&["status", "vm1", "--json"]);
    let vm = &st["vms"][0];
    assert_eq!(vm["state"], "protected");
    assert!(
        vm["backlog_records"].as_u64().unwrap() > 0,
        "round 4 is pending: {vm}"
    );
    for field in [
        "health",
        "rpo_seconds",
        "backlog_bytes",
        "last_point",
        "disks",
    ] {
        assert!(vm.get(field).is_some(), "status --json lacks {field}");
    }

    // Test failover while replication keeps running, then its cleanup.
    let sums = failover_sums(
        &env,
        &["test-failover", "vm1", "--point", "latest-app-consistent"],
    );
    assert_eq!(sums, app3);
    let st = env.json(&["status", "vm1", "--json"]);
    assert_eq!(st["vms"][0]["state"], "test-failover");
    assert_eq!(
        st["vms"][0]["test_failover"]["network"],
        "prod-net-asr-test"
    );
    env.ok(&["test-failover-cleanup", "vm1"]);
    assert!(!env.vault.join("test-failover/prod-asr/vm1").exists());

    // Every point by id, by seq and by time, through test failovers into chosen dirs.
    let out = env.root.join("tf");
    let outs = out.to_str().unwrap();
    for (spec, want) in [
        (id(0), &initial),
        (id(1), &app1),
        (id(2), &crash2),
        (format!("seq:{mid_seq}"), &mid),
        (
            format!("time:{}", humantime::format_rfc3339_seconds(t)),
            &mid,
        ),
        ("latest-processed".to_string(), &app3),
    ] {
        let sums = failover_sums(
            &env,
            &["test-failover", "vm1", "--point", &spec, "--out", outs],
        );
        assert_eq!(&sums, want, "point {spec}");
        env.ok(&["test-failover-cleanup", "vm1"]);
    }

    // The real failover to `latest` processes round 4 first; then a change of point.
    let sums = failover_sums(&env, &["failover", "vm1", "--point", "latest"]);
    assert_eq!(sums, latest);
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(env.vault.join("failover/prod-asr/vm1/vm.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["target"]["resource_group"], "prod-asr");
    assert_eq!(manifest["target"]["network"], "prod-net-asr");
    assert_eq!(manifest["target"]["subnet"], "web");
    assert_eq!(manifest["target"]["availability_set"], "web-set-asr");
    assert_eq!(manifest["network_mapping"]["mgmt"], "mgmt-dr");
    let st = env.json(&["status", "vm1", "--json"]);
    assert_eq!(st["vms"][0]["state"], "failed-over");
    let sums = failover_sums(&env, &["failover", "vm1", "--point", &id(1)]);
    assert_eq!(sums, app1);
    env.ok(&["failover-commit", "vm1"]);
    let err = env.fails(&["failover", "vm1", "--point", "latest"], 1);
    assert!(err.contains("committed"), "{err}");
    // The failed-over disks stay; the points are gone.
    assert!(env.vault.join("failover/prod-asr/vm1/os.raw").exists());
    assert!(!env.vault.join("vms/vm1").exists());
    env.fails(&["points", "vm1"], 1);
}

#[test]
fn mistakes_get_one_clear_line_and_a_non_zero_exit() {
    let env = Env::empty();
    // Not a vault yet.
    let err = env.fails(&["status"], 1);
    assert!(err.contains("not a Standby vault"), "{err}");
    let _m = setup(&env);
    assert_eq!(env.fails(&["status", "nope"], 1).lines().count(), 1);
    assert!(env
        .fails(&["status", "nope"], 1)
        .contains("unknown VM 'nope'"));
    assert!(env
        .fails(&["failover", "nope", "--point", "latest"], 1)
        .contains("unknown VM"));
    let err = env.fails(&["failover", "vm1", "--point", "999"], 1);
    assert!(err.contains("no recovery point 999"), "{err}");
    let err = env.fails(
        &["failover", "vm1", "--point", "time:2001-01-01T00:00:00Z"],
        1,
    );
    assert!(err.contains("outside the any-moment window"), "{err}");
    let err = env.fails(&["protect", "vm1", "--disk", "os=os.raw"], 1);
    assert!(err.contains("already protected"), "{err}");
    env.ok(&["test-failover", "vm1", "--point", "latest-processed"]);
    let err = env.fails(&["test-failover", "vm1", "--point", "latest-processed"], 1);
    assert!(err.contains("already up"), "{err}");
    env.ok(&["test-failover-cleanup", "vm1"]);
    let err = env.fails(&["test-failover-cleanup", "vm1"], 1);
    assert!(err.contains("no test failover"), "{err}");
    // Usage errors exit 2, with one line that says what is wrong and the usage.
    for args in [
        &["failover", "vm1"][..],
        &["failover", "vm1", "--point", "time:yesterday"],
        &["test-failover", "vm1", "--target-netwrk", "x"],
        &["status", "--wait", "soon"],
        &["no-such-command"],
    ] {
        let err = env.fails(args, 2);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("standby: "), "{args:?}: {err}");
    }
    let err = env.fails(&["failover", "vm1"], 2);
    assert!(err.contains("--point") && err.contains("usage: "), "{err}");
    // A bare word is a point's name: an unknown one is a plain error.
    let err = env.fails(&["failover", "vm1", "--point", "yesterday"], 1);
    assert!(err.contains("no recovery point named 'yesterday'"), "{err}");
    env.fails(&["protect", "vm2", "--disk", "nonsense"], 2);
    env.fails(&["policy", "set", "p", "--crash-interval", "soon"], 2);
    let err = env.fails(&["policy", "set", "p", "--crash-interval", "100ms"], 1);
    assert!(err.contains("at least 1 second"), "{err}");
    let err = env.fails(&["protect", "vm2", "--disk", "os=missing.raw"], 1);
    assert!(err.contains("missing.raw"), "{err}");
    let err = env.fails(&["init", env.vault.to_str().unwrap()], 1);
    assert!(err.contains("already a Standby vault"), "{err}");
    std::fs::create_dir_all(env.root.join("foreign")).unwrap();
    std::fs::write(env.root.join("foreign/file"), b"x").unwrap();
    let err = env.fails(&["init", env.root.join("foreign").to_str().unwrap()], 1);
    assert!(err.contains("non-empty"), "{err}");
    // A failover after the commit.
    env.ok(&["failover", "vm1", "--point", "latest-processed"]);
    env.ok(&["failover-commit", "vm1"]);
    let err = env.fails(&["failover", "vm1", "--point", "latest-processed"], 1);
    assert!(err.contains("committed"), "{err}");
    // A corrupt vault file names the file and refuses to go on.
    let catalog = env.vault.join("catalog");
    let mut bytes = std::fs::read(&catalog).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    std::fs::write(&catalog, &bytes).unwrap();
    let err = env.fails(&["status"], 1);
    assert!(err.contains("catalog") && err.contains("corrupt"), "{err}");
}

#[test]
fn a_second_command_waits_for_the_lock_and_says_who_holds_it() {
    let env = Env::empty();
    let _m = setup(&env);
    let v = Vault::open(&env.vault, "the lock test", LockWait::Fail).unwrap();
    let held = v.agent("vm1").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_standby"))
        .args(["points", "vm1", "--json"])
        .env("STANDBY_VAULT", &env.vault)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    held.close().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("waiting for the lock") && err.contains("the lock test"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["points"].as_array().unwrap().len(), 1);
}

#[test]
fn help_is_complete_with_examples() {
    let env = Env::empty();
    let top = env.ok(&["--help"]);
    for cmd in [
        "init",
        "policy",
        "protect",
        "process",
        "point",
        "points",
        "status",
        "failover",
        "failover-commit",
        "test-failover",
        "test-failover-cleanup",
        "verify",
        "demo",
    ] {
        assert!(top.contains(cmd), "--help lacks {cmd}");
    }
    assert!(top.contains("Examples"));
    for cmd in [
        "protect", "failover", "process", "points", "status", "verify",
    ] {
        assert!(
            env.ok(&[cmd, "--help"]).contains("Example"),
            "{cmd} --help lacks examples"
        );
    }
}

#[test]
fn verify_names_damage_and_the_points_it_affects() {
    let env = Env::empty();
    let mut m = setup(&env);
    m.churn(&env.vault, 100);
    env.ok(&["point", "vm1", "--app-consistent"]);
    let out = env.ok(&["verify", "vm1"]);
    assert!(out.contains("sound"), "{out}");
    let data_dir = env.vault.join("vms/vm1/replica/data");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let f = &files[0];
    let mut bytes = std::fs::read(f).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(f, &bytes).unwrap();
    let out = env.run(&["verify", "vm1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sound"], false);
    let damage = &v["damage"][0];
    assert!(
        damage["file"].as_str().unwrap().contains("data"),
        "{damage}"
    );
    assert!(!damage["points"].as_array().unwrap().is_empty(), "{damage}");
}
