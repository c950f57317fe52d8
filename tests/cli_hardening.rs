//! Hardening through the built `standby` binary: every option of every command parses,
//! output into a closed pipe ends quietly, new disks land inside the vault, hooks always
//! thaw, failover manifests say what was chosen, point specs say exactly what is wrong.

mod common;

use common::Env;
use serde_json::Value;
use std::process::{Output, Stdio};

impl Env {
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "standby {args:?}: {err}");
        no_panic(&err);
        err
    }

    fn path(&self, rel: &str) -> String {
        self.root.join(rel).to_string_lossy().into_owned()
    }
}

fn no_panic(stderr: &str) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

/// The names listed under `Commands:` in a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside && !line.starts_with(' ') {
            break;
        }
        if inside && line.starts_with("  ") && !line.starts_with("   ") {
            let name = line.split_whitespace().next().unwrap_or("");
            if name != "help" {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// The long options listed in a help text (without --help and --version).
fn long_options(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix("-h, ").unwrap_or(t);
            let t = t.strip_prefix("-V, ").unwrap_or(t);
            let opt = t.strip_prefix("--")?;
            let name: String = opt
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty() && name != "help" && name != "version").then_some(name)
        })
        .collect()
}

/// One valid invocation per option of every command (with a vault that does not exist, so
/// nothing runs for long). The test below checks that this table covers every option the
/// help texts list, so a new option without an entry here fails it.
fn invocations(env: &Env) -> Vec<(&'static str, Vec<String>)> {
    let nowhere = env.path("absent");
    let v = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("init", v(&["init", &env.path("fresh")])),
        (
            "policy set",
            v(&[
                "policy",
                "set",
                "x",
                "--crash-interval",
                "1m",
                "--app-interval",
                "1h",
                "--retention",
                "72h",
                "--any-moment-window",
                "1h",
                "--thin-after",
                "2h",
                "--rpo-threshold",
                "15m",
            ]),
        ),
        (
            "policy set",
            v(&["policy", "set", "x", "--app-interval", "off"]),
        ),
        ("policy list", v(&["policy", "list", "--json"])),
        (
            "protect",
            v(&[
                "protect",
                "vm1",
                "--disk",
                "os=/nonexistent.raw",
                "--disk",
                "data=new:1MiB",
                "--policy",
                "default",
                "--resource-group",
                "rg",
                "--network",
                "net",
                "--subnet",
                "sub",
                "--availability-set",
                "set",
                "--target-resource-group",
                "trg",
                "--target-network",
                "tnet",
                "--target-subnet",
                "tsub",
                "--target-availability-set",
                "tset",
                "--network-mapping",
                "net=tnet",
                "--cache-capacity",
                "4GiB",
            ]),
        ),
        (
            "protect",
            v(&[
                "protect",
                "vm1",
                "--cache",
                "127.0.0.1:1",
                "--insecure-loopback",
            ]),
        ),
        (
            "process",
            v(&[
                "process",
                "vm1",
                "--follow",
                "--every",
                "2s",
                "--cache",
                "127.0.0.1:1",
                "--metrics",
                "127.0.0.1:0",
            ]),
        ),
        (
            "agent",
            v(&[
                "agent",
                "vm1",
                "--listen",
                "127.0.0.1:0",
                "--process-every",
                "2s",
                "--metrics",
                "127.0.0.1:0",
            ]),
        ),
        (
            "agent",
            v(&[
                "agent",
                "vm1",
                "--cache",
                "127.0.0.1:1",
                "--creds",
                &nowhere,
                "--journal",
                &nowhere,
                "--journal-capacity",
                "64MiB",
                "--disk",
                "os=/nonexistent.raw",
                "--insecure-loopback",
                "--seeded",
            ]),
        ),
        (
            "cache serve",
            v(&[
                "cache",
                "serve",
                "--dir",
                &nowhere,
                "--listen",
                "127.0.0.1:0",
                "--creds",
                &nowhere,
                "--insecure-loopback",
                "--capacity",
                "1GiB",
                "--metrics",
                "127.0.0.1:0",
            ]),
        ),
        ("link export", v(&["link", "export", "--out", &nowhere])),
        ("link init", v(&["link", "init"])),
        (
            "mount",
            v(&[
                "mount",
                "vm1",
                "--point",
                "latest",
                "--listen",
                "127.0.0.1:0",
                "--writable",
            ]),
        ),
        (
            "point",
            v(&[
                "point",
                "vm1",
                "--app-consistent",
                "--name",
                "n",
                "--quiesce-command",
                "true",
                "--thaw-command",
                "true",
            ]),
        ),
        ("point", v(&["point", "vm1", "--journal", &nowhere])),
        ("points", v(&["points", "vm1", "--json"])),
        ("status", v(&["status", "vm1", "--json", "--check"])),
        (
            "failover",
            v(&[
                "failover", "vm1", "--point", "seq:5", "--out", &nowhere, "--json", "--wait", "2s",
            ]),
        ),
        ("failover-commit", v(&["failover-commit", "vm1"])),
        (
            "test-failover",
            v(&[
                "test-failover",
                "vm1",
                "--point",
                "time:2026-11-26T10:00:00Z",
                "--out",
                &nowhere,
                "--network",
                "iso",
                "--json",
            ]),
        ),
        (
            "test-failover-cleanup",
            v(&["test-failover-cleanup", "vm1"]),
        ),
        (
            "verify",
            v(&["verify", "vm1", "--point", "latest-processed", "--json"]),
        ),
        (
            "protect",
            v(&[
                "protect",
                "vm1",
                "--libvirt-domain",
                &nowhere,
                "--agent-listen",
                "127.0.0.1:10809",
            ]),
        ),
        (
            "serve",
            v(&[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--token",
                "t",
                "--sample-every",
                "1s",
                "--metrics",
                "127.0.0.1:0",
            ]),
        ),
        ("policy assign", v(&["policy", "assign", "vm1", "gold"])),
        (
            "disk add",
            v(&["disk", "add", "vm1", "logs=new:1MiB", "--json"]),
        ),
        (
            "disk resize",
            v(&["disk", "resize", "vm1", "os", "2GiB", "--json"]),
        ),
        ("diff", v(&["diff", "vm1", "1", "latest", "--json"])),
        ("unprotect", v(&["unprotect", "vm1", "--delete-points"])),
        ("reprotect", v(&["reprotect", "vm1", "--json"])),
        (
            "reprotect",
            v(&[
                "reprotect",
                "vm1",
                "--cache",
                "127.0.0.1:1",
                "--seed",
                "os=/nonexistent.raw",
                "--policy",
                "gold",
                "--insecure-loopback",
            ]),
        ),
        (
            "failback",
            v(&["failback", "vm1", "--point", "latest", "--json"]),
        ),
        (
            "point",
            v(&["point", "--group", "g", "--app-consistent", "--name", "n"]),
        ),
        ("points", v(&["points", "--group", "g", "--json"])),
        (
            "failover",
            v(&["failover", "--group", "g", "--point", "latest-group"]),
        ),
        ("failover-commit", v(&["failover-commit", "--group", "g"])),
        (
            "test-failover",
            v(&["test-failover", "--group", "g", "--point", "3"]),
        ),
        (
            "test-failover-cleanup",
            v(&["test-failover-cleanup", "--group", "g"]),
        ),
        (
            "group create",
            v(&["group", "create", "g", "--vm", "vm1", "--policy", "p"]),
        ),
        ("group add", v(&["group", "add", "g", "vm1"])),
        ("group remove", v(&["group", "remove", "g", "vm1"])),
        ("group delete", v(&["group", "delete", "g"])),
        ("group list", v(&["group", "list", "--json"])),
        // A file as the demo's directory: it stops at once.
        (
            "demo",
            v(&[
                "demo",
                "--dir",
                &env.path("absent/demo"),
                "--vault",
                &nowhere,
            ]),
        ),
    ]
}

#[test]
fn every_option_of_every_command_parses() {
    let env = Env::empty();
    std::fs::write(env.root.join("absent"), b"not a directory").unwrap();
    let top = env.ok(&["--help"]);
    let mut paths: Vec<Vec<String>> = Vec::new();
    for c in subcommands(&top) {
        let help = env.ok(&[&c, "--help"]);
        let subs = subcommands(&help);
        if subs.is_empty() {
            paths.push(vec![c]);
        } else {
            for s in subs {
                paths.push(vec![c.clone(), s]);
            }
        }
    }
    assert!(paths.len() > 15, "{paths:?}");
    let table = invocations(&env);
    let mut env_missing = Vec::new();
    for path in &paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = env.ok(&args);
        let key = path.join(" ");
        let covered: Vec<&Vec<String>> = table
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, a)| a)
            .collect();
        if covered.is_empty() {
            env_missing.push(format!("{key} (no invocation)"));
        }
        for opt in long_options(&help) {
            let flag = format!("--{opt}");
            // --vault and --wait are global: one invocation covers them for every command.
            if opt != "vault" && opt != "wait" && !covered.iter().any(|a| a.contains(&flag)) {
                env_missing.push(format!("{key} {flag}"));
            }
        }
    }
    assert!(
        env_missing.is_empty(),
        "options without an invocation in this test: {env_missing:?}"
    );
    for (key, args) in &table {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env
            .cmd(&args)
            .env("STANDBY_VAULT", env.root.join("absent"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        no_panic(&err);
        assert!(
            matches!(out.status.code(), Some(0) | Some(1)),
            "standby {key}: {args:?} -> {:?}: {err}",
            out.status
        );
    }
}

#[test]
fn policy_set_app_interval_takes_a_duration_or_off() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let out = env.ok(&["policy", "set", "x", "--app-interval", "2h"]);
    assert!(out.contains("app-consistent 2h"), "{out}");
    let out = env.ok(&["policy", "set", "x", "--app-interval", "off"]);
    assert!(out.contains("app-consistent off"), "{out}");
    let list = env.json(&["policy", "list", "--json"]);
    let x = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "x")
        .unwrap();
    assert!(x["app_interval_seconds"].is_null(), "{x}");
    let err = env.fails(&["policy", "set", "x", "--app-interval", "sometimes"], 2);
    assert!(err.contains("sometimes"), "{err}");
}

/// Run with stdout into a pipe whose reader is already gone, so every write fails.
fn into_closed_pipe(env: &Env, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    env.cmd(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let env = Env::empty();
    let vault = env.vault.to_str().unwrap().to_string();
    let other = env.path("other-vault");
    env.ok(&["init", &vault]);
    env.ok(&["protect", "vm1", "--disk", "os=new:1MiB"]);
    env.ok(&["point", "vm1", "--name", "a"]);
    for args in [
        vec!["init", other.as_str()],
        vec!["policy", "set", "gold", "--retention", "48h"],
        vec!["policy", "list"],
        vec!["policy", "list", "--json"],
        vec!["point", "vm1", "--name", "b"],
        vec!["points", "vm1"],
        vec!["points", "vm1", "--json"],
        vec!["status"],
        vec!["status", "vm1", "--json"],
        vec!["process"],
        vec!["verify", "vm1"],
        vec!["verify", "vm1", "--json"],
        vec!["test-failover", "vm1", "--point", "latest-processed"],
        vec!["test-failover-cleanup", "vm1"],
        vec!["--help"],
        vec!["status", "--help"],
    ] {
        let out = into_closed_pipe(&env, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        no_panic(&err);
        assert_eq!(out.status.code(), Some(0), "standby {args:?}: {err}");
        assert!(err.is_empty(), "standby {args:?}: {err}");
    }
    // The commands did their work even though nobody read what they said.
    let points = env.json(&["points", "vm1", "--json"]);
    let names: Vec<&str> = points["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(names.contains(&"b"), "{names:?}");
    assert!(std::path::Path::new(&other).join("catalog").exists());
}

#[test]
fn an_empty_standby_vault_counts_as_unset() {
    let env = Env::empty();
    let out = env
        .cmd(&["status"])
        .env("STANDBY_VAULT", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    no_panic(&err);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no vault given"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // And a set one still works, as does --vault over it.
    env.ok(&["init", env.vault.to_str().unwrap()]);
    env.ok(&["status"]);
    let out = env
        .cmd(&["--vault", env.vault.to_str().unwrap(), "status"])
        .env("STANDBY_VAULT", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn new_disks_are_created_inside_the_vault_per_vm() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let mut created = Vec::new();
    for vm in ["vm1", "vm2"] {
        let out = env.ok(&["protect", vm, "--disk", "data=new:1MiB"]);
        let path = env.vault.join("sources").join(vm).join("data.raw");
        assert!(
            out.contains(&format!("created disk data: {}", path.display())),
            "{out}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let st = env.json(&["status", vm, "--json"]);
        assert_eq!(
            st["vms"][0]["disks"][0]["source"].as_str(),
            Some(path.to_str().unwrap())
        );
        created.push(path);
    }
    assert_ne!(created[0], created[1]);
    // Nothing lands in the current directory any more.
    assert!(!env.root.join("data.raw").exists());
    // An explicit path after the size is honoured.
    let at = env.root.join("images/logs.raw");
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    let spec = format!("logs=new:2MiB:{}", at.display());
    let out = env.ok(&["protect", "vm3", "--disk", &spec]);
    assert!(
        out.contains(&format!("created disk logs: {}", at.display())),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&at).unwrap().len(), 2 << 20);
    // A disk of an existing image is not reported as created.
    let existing = env.root.join("images/existing.raw");
    std::fs::File::create(&existing)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = env.ok(&[
        "protect",
        "vm4",
        "--disk",
        &format!("os={}", existing.display()),
    ]);
    assert!(!out.contains("created disk"), "{out}");
}

/// A protect that is refused creates no image: the same command, corrected, then succeeds
/// (found by hand: a --target-network contradicting --network-mapping left
/// VAULT/sources/VM/NAME.raw behind, and the retry failed "already exists").
#[test]
fn a_refused_protect_leaves_no_new_disk_behind() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let at = env.root.join("logs.raw");
    let logs = format!("logs=new:1MiB:{}", at.display());
    let mut args = vec![
        "protect",
        "vm1",
        "--disk",
        "data=new:1MiB",
        "--disk",
        &logs,
        "--network",
        "prod-net",
        "--network-mapping",
        "prod-net=dr-net",
    ];
    let mut bad = args.clone();
    bad.extend(["--target-network", "other"]);
    let err = env.fails(&bad, 1);
    assert!(err.contains("contradicts"), "{err}");
    assert!(!env.vault.join("sources/vm1/data.raw").exists());
    assert!(!at.exists());
    args.extend(["--target-network", "dr-net"]);
    let out = env.ok(&args);
    assert!(out.contains("created disk data"), "{out}");
    assert!(out.contains("created disk logs"), "{out}");
}

/// A VM with one small disk, protected in a fresh vault.
fn protected() -> Env {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    env.ok(&["protect", "vm1", "--disk", "os=new:1MiB"]);
    env
}

fn point_names(env: &Env) -> Vec<String> {
    let v = env.json(&["points", "vm1", "--json"]);
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn thaw_runs_after_a_failed_quiesce_and_after_a_failed_cut() {
    let env = protected();
    let thawed = env.root.join("thawed");
    let thaw = format!("touch {}", thawed.display());
    let point = |name: &str, quiesce: &str, thaw: &str| {
        env.run(&[
            "point",
            "vm1",
            "--app-consistent",
            "--name",
            name,
            "--quiesce-command",
            quiesce,
            "--thaw-command",
            thaw,
        ])
    };
    let line = |out: &Output| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        no_panic(&err);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };

    // The quiesce fails: nothing is cut, the guest is thawed, the line says both.
    let err = line(&point("frozen", "exit 3", &thaw));
    assert!(thawed.exists(), "the thaw command did not run: {err}");
    assert!(err.contains("the quiesce command failed"), "{err}");
    assert!(err.contains("nothing was cut"), "{err}");
    assert!(err.contains("the thaw command ran and succeeded"), "{err}");
    assert!(!point_names(&env).contains(&"frozen".to_string()));

    // The quiesce works but the cut fails (a name past the limit): thawed all the same.
    std::fs::remove_file(&thawed).unwrap();
    let long = "n".repeat(2000);
    let err = line(&point(&long, "true", &thaw));
    assert!(thawed.exists(), "the thaw command did not run: {err}");
    assert!(
        err.contains("too long") || err.contains("longer than"),
        "{err}"
    );
    assert!(err.contains("the thaw command ran and succeeded"), "{err}");

    // Both fail: the line names both.
    let err = line(&point("x", "exit 3", "exit 4"));
    assert!(err.contains("the quiesce command failed"), "{err}");
    assert!(err.contains("the thaw command failed"), "{err}");

    // The cut works and only the thaw fails: the point exists and the line says so.
    let err = line(&point("kept", "true", "exit 4"));
    assert!(err.contains("cut point"), "{err}");
    assert!(err.contains("but the thaw command failed"), "{err}");
    assert!(point_names(&env).contains(&"kept".to_string()));

    // And all well: exit 0, thawed.
    std::fs::remove_file(&thawed).unwrap();
    let out = point("fine", "true", &thaw);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(thawed.exists());
    assert!(point_names(&env).contains(&"fine".to_string()));
}

fn manifest(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("vm.json")).unwrap()).unwrap()
}

/// Write one block through the VM's write tap; returns its seq.
fn write_block(env: &Env, fill: u8) -> u64 {
    use standby_engine::vault::{LockWait, Vault};
    let v = Vault::open(&env.vault, "test", LockWait::Block).unwrap();
    let agent = v.agent("vm1").unwrap();
    let seq = agent.write(0, 0, &[fill; 4096], false).unwrap();
    agent.close().unwrap();
    seq
}

#[test]
fn a_test_failover_maps_every_network_to_its_isolated_twin() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let protect = |vm: &str, extra: &[&str]| {
        let mut args = vec![
            "protect",
            vm,
            "--disk",
            "os=new:1MiB",
            "--network",
            "prod-net",
        ];
        args.extend_from_slice(extra);
        env.run(&args)
    };
    // --target-network contradicting the mapping of the source network is refused.
    let out = protect(
        "bad",
        &[
            "--target-network",
            "other-net",
            "--network-mapping",
            "prod-net=dr-net",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("contradicts"), "{err}");
    assert!(
        err.contains("other-net") && err.contains("prod-net=dr-net"),
        "{err}"
    );
    let st = env.json(&["status", "--json"]);
    assert!(st["vms"].as_array().unwrap().is_empty(), "{st}");
    // Agreeing ones are fine, and the mapping alone sets the target network.
    let out = protect(
        "same",
        &[
            "--target-network",
            "dr-net",
            "--network-mapping",
            "prod-net=dr-net",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = protect(
        "vm1",
        &[
            "--network-mapping",
            "prod-net=dr-net",
            "--network-mapping",
            "mgmt=mgmt-dr",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = env.json(&["status", "vm1", "--json"]);
    assert_eq!(st["vms"][0]["target"]["network"], "dr-net");

    let tf = env.root.join("tf");
    let tfs = tf.to_str().unwrap();
    env.ok(&[
        "test-failover",
        "vm1",
        "--point",
        "latest-processed",
        "--out",
        tfs,
    ]);
    let m = manifest(&tf);
    assert_eq!(m["target"]["network"], "dr-net-test");
    assert_eq!(m["network_mapping"]["prod-net"], "dr-net-test");
    assert_eq!(m["network_mapping"]["mgmt"], "mgmt-dr-test");
    env.ok(&["test-failover-cleanup", "vm1"]);
    env.ok(&[
        "test-failover",
        "vm1",
        "--point",
        "latest-processed",
        "--out",
        tfs,
        "--network",
        "iso",
    ]);
    let m = manifest(&tf);
    assert_eq!(m["target"]["network"], "iso");
    assert_eq!(m["network_mapping"]["prod-net"], "iso");
    assert_eq!(m["network_mapping"]["mgmt"], "iso");
    env.ok(&["test-failover-cleanup", "vm1"]);
    // A real failover keeps the production mapping.
    let fo = env.root.join("fo");
    env.ok(&[
        "failover",
        "vm1",
        "--point",
        "latest-processed",
        "--out",
        fo.to_str().unwrap(),
    ]);
    let m = manifest(&fo);
    assert_eq!(m["target"]["network"], "dr-net");
    assert_eq!(m["network_mapping"]["prod-net"], "dr-net");
    assert_eq!(m["network_mapping"]["mgmt"], "mgmt-dr");
}

fn has_micros(t: &str) -> bool {
    // 2026-11-26T09:30:00.123456Z
    let frac = t
        .strip_suffix('Z')
        .and_then(|t| t.rsplit_once('.'))
        .map(|(_, f)| f);
    frac.is_some_and(|f| f.len() == 6 && f.chars().all(|c| c.is_ascii_digit()))
}

#[test]
fn a_failover_manifest_says_what_seq_or_time_chose() {
    let env = protected();
    let initial = env.json(&["points", "vm1", "--json"])["points"][0].clone();
    let write_seq = write_block(&env, 7);
    env.ok(&["point", "vm1", "--name", "after"]);
    let out = env.root.join("tf");
    let outs = out.to_str().unwrap();
    let tf = |spec: &str| {
        env.ok(&["test-failover", "vm1", "--point", spec, "--out", outs]);
        let m = manifest(&out);
        env.ok(&["test-failover-cleanup", "vm1"]);
        m
    };
    // seq: of a point: the manifest names the point.
    let m = tf(&format!("seq:{}", initial["seq"]));
    assert_eq!(m["requested"], format!("seq:{}", initial["seq"]));
    assert_eq!(m["point"]["id"], initial["id"]);
    assert_eq!(m["seq"], initial["seq"]);
    // seq: of a write: no point, but what was asked and what was chosen, to the µs.
    let spec = format!("seq:{write_seq}");
    let m = tf(&spec);
    assert_eq!(m["requested"], spec);
    assert!(m["point"].is_null(), "{m}");
    assert_eq!(m["seq"], write_seq);
    let t = m["time"].as_str().unwrap().to_string();
    assert!(has_micros(&t), "{t}");
    // time: with microseconds is taken at its word and echoed back.
    let spec = format!("time:{t}");
    let m = tf(&spec);
    assert_eq!(m["requested"], spec);
    assert!(m["seq"].as_u64().unwrap() >= write_seq, "{m}");
    assert!(has_micros(m["time"].as_str().unwrap()), "{m}");
    // A point's own time carries its microseconds too.
    let m = tf("latest-processed");
    assert_eq!(m["requested"], "latest-processed");
    assert!(has_micros(m["point"]["time"].as_str().unwrap()), "{m}");
    assert_eq!(m["point"]["name"], "after");
}

#[test]
fn a_point_past_the_newest_write_says_exactly_what_is_wrong() {
    let env = protected();
    let newest = env.json(&["points", "vm1", "--json"])["points"][0]["seq"]
        .as_u64()
        .unwrap();
    let err = env.fails(&["test-failover", "vm1", "--point", "seq:9999"], 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "seq 9999 is past the newest write of VM 'vm1' (seq {newest})"
        )),
        "{err}"
    );
    let err = env.fails(
        &[
            "test-failover",
            "vm1",
            "--point",
            "time:2099-01-01T00:00:00Z",
        ],
        1,
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("time 2099-01-01T00:00:00.000000Z is in the future"),
        "{err}"
    );
    assert!(
        err.contains(&format!("the newest write of VM 'vm1' is seq {newest} at ")),
        "{err}"
    );
    // A write in the log but not yet in the replica: say so, and what to run.
    let logged = write_block(&env, 9);
    let err = env.fails(
        &["test-failover", "vm1", "--point", &format!("seq:{logged}")],
        1,
    );
    assert!(err.contains("logged but not processed yet"), "{err}");
    assert!(err.contains("standby process vm1"), "{err}");
    let err = env.fails(&["mount", "vm1", "--point", "seq:9999"], 1);
    assert!(
        err.contains(&format!(
            "seq 9999 is past the newest write of VM 'vm1' (seq {logged})"
        )),
        "{err}"
    );
    // Once processed it is a fine moment.
    env.ok(&["process", "vm1"]);
    let out = env.root.join("tf");
    env.ok(&[
        "test-failover",
        "vm1",
        "--point",
        &format!("seq:{logged}"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(manifest(&out)["seq"], logged);
}

#[test]
fn a_point_can_be_chosen_by_its_name_and_the_newest_of_a_name_wins() {
    let env = protected();
    let cut = |name: &str| -> u64 {
        let out = env.ok(&["point", "vm1", "--name", name]);
        // "cut point ID of vm1 at seq ..."
        out.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    write_block(&env, 1);
    let first = cut("nightly");
    write_block(&env, 2);
    let other = cut("before-upgrade");
    write_block(&env, 3);
    let second = cut("nightly");
    assert!(first < second);
    let out = env.root.join("tf");
    let outs = out.to_str().unwrap();
    // vm.json's `requested` is the spec in its plain form.
    for (spec, want, requested) in [
        ("nightly", second, "nightly"),
        ("name:nightly", second, "nightly"),
        ("before-upgrade", other, "before-upgrade"),
        ("initial", 1, "initial"),
    ] {
        env.ok(&["test-failover", "vm1", "--point", spec, "--out", outs]);
        let m = manifest(&out);
        assert_eq!(m["point"]["id"], want, "{spec}: {m}");
        assert_eq!(m["requested"], requested, "{spec}: {m}");
        env.ok(&["test-failover-cleanup", "vm1"]);
    }
    let v = env.json(&["verify", "vm1", "--point", "before-upgrade", "--json"]);
    assert_eq!(v["point"], other);
    let err = env.fails(&["test-failover", "vm1", "--point", "nope"], 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no recovery point named 'nope'"), "{err}");
    // A malformed form is still a usage error.
    env.fails(&["test-failover", "vm1", "--point", "seq:x"], 2);
}
