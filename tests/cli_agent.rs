//! End to end through the built `standby` binary with an agent running (or killed): the
//! names a point may not take, the RPO and health `status` reports for an idle VM, a VM
//! whose agent is gone and a replica `verify` found damaged, and source images that two
//! VMs or two agents may not share.

mod common;

use common::{free_port, interrupt, Env};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

impl Env {
    /// A vault with VM `vm` protected, its one disk `os` a new 4 MiB image.
    fn new() -> Env {
        Env::with(|root| format!("os=new:4MiB:{}", root.join("os.raw").display()))
    }

    /// A vault with VM `vm` protected with the one disk `disk(root)` says.
    fn with(disk: impl FnOnce(&std::path::Path) -> String) -> Env {
        let env = Env::empty();
        env.ok(&["init", env.vault.to_str().unwrap()]);
        let disk = disk(&env.root);
        env.ok(&["protect", "vm", "--disk", &disk]);
        env
    }

    /// Run and require failure with exit status 1 and one line on stderr; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "standby {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }

    /// `status --json` of the one VM.
    fn status(&self) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["status", "vm", "--json"])).unwrap();
        v["vms"][0].clone()
    }

    /// Start the VM's agent (processing as `process_every` says) and wait until it serves;
    /// returns it and its NBD address.
    fn agent(&self, process_every: &str) -> (Child, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = self
            .cmd(&[
                "agent",
                "vm",
                "--listen",
                &addr,
                "--process-every",
                process_every,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("serving NBD"), "{first}");
        (child, addr)
    }
}

/// Run qemu-io commands against an NBD export; they must all succeed.
fn qemu_io(url: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(url).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn point_names(env: &Env) -> Vec<String> {
    let v: Value = serde_json::from_str(&env.ok(&["points", "vm", "--json"])).unwrap();
    let list = v["points"]
        .as_array()
        .or(v.as_array())
        .cloned()
        .unwrap_or_default();
    list.iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_point_cannot_take_the_name_of_the_agent_s_resync_markers() {
    let env = Env::new();
    let reserved = ["standby:resync-begin", "standby:resync-end"];
    // No agent running: the vault refuses the name.
    for name in reserved {
        let err = env.fails(&["point", "vm", "--name", name]);
        assert!(err.contains("reserved"), "{err}");
        assert!(!err.contains("invalid request: invalid request"), "{err}");
    }
    // Through the running agent: refused the same way, with the error said once.
    let (mut agent, _) = env.agent("1h");
    for name in reserved {
        let err = env.fails(&["point", "vm", "--name", name]);
        assert!(err.contains("reserved"), "{err}");
        assert!(!err.contains("invalid request: invalid request"), "{err}");
    }
    // Nothing opened a resync window: points are cut as before.
    let out = env.ok(&["point", "vm", "--name", "after"]);
    assert!(out.contains("cut point"), "{out}");
    assert_eq!(env.status()["state"], "protected");
    interrupt(&mut agent);
    let names = point_names(&env);
    assert!(names.iter().any(|n| n == "after"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("standby:")),
        "{names:?}"
    );
}

#[test]
fn an_idle_vm_whose_writes_are_all_durable_has_an_rpo_of_zero() {
    let env = Env::new();
    // Processing waits an hour: the write stays in the log, durable but not applied.
    let (mut agent, addr) = env.agent("1h");
    qemu_io(&format!("nbd://{addr}/os"), &["write -P 7 0 64k", "flush"]);
    let st = env.status();
    assert_eq!(st["agent_pid"].as_u64(), Some(agent.id() as u64), "{st}");
    assert!(st["backlog_records"].as_u64().unwrap() > 0, "{st}");
    // Everything the VM wrote is durable in the vault: nothing would be lost.
    assert_eq!(st["rpo_seconds"].as_f64(), Some(0.0), "{st}");
    assert_eq!(st["health"], "healthy", "{st}");
    interrupt(&mut agent);
}

fn reasons(st: &Value) -> Vec<String> {
    st["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_vm_whose_agent_is_not_running_is_not_healthy() {
    let env = Env::new();
    let st = env.status();
    assert_eq!(st["health"], "warning", "{st}");
    assert!(
        reasons(&st)
            .iter()
            .any(|r| r == "agent not running (never seen)")
            || reasons(&st)
                .iter()
                .any(|r| r.starts_with("agent not running (last seen ")),
        "{st}"
    );
    // An idle agent killed with kill -9: its writes are all durable in the vault, so the
    // RPO stays 0, and status says the agent is gone.
    let (mut agent, addr) = env.agent("1h");
    qemu_io(&format!("nbd://{addr}/os"), &["write -P 9 0 64k", "flush"]);
    agent.kill().unwrap();
    agent.wait().unwrap();
    let st = env.status();
    assert_eq!(st["health"], "warning", "{st}");
    assert_eq!(st["rpo_seconds"].as_f64(), Some(0.0), "{st}");
    let r = reasons(&st);
    assert!(
        r.iter()
            .any(|r| r.starts_with("agent not running (last seen 20")),
        "{st}"
    );
    // Running again: healthy.
    let (mut agent, _) = env.agent("1h");
    let st = env.status();
    assert_eq!(st["health"], "healthy", "{st}");
    interrupt(&mut agent);
}

#[test]
fn damage_a_verify_found_keeps_status_critical_until_a_clean_verify() {
    let env = Env::with(|root| {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(root.join("os.raw"), bytes).unwrap();
        "os=os.raw".to_string()
    });
    assert!(env.ok(&["verify", "vm"]).contains("sound"));
    let data_dir = env.vault.join("vms/vm/replica/data");
    let biggest = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let good = std::fs::read(&biggest).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 3] ^= 0x40;
    std::fs::write(&biggest, &bad).unwrap();
    assert_eq!(env.run(&["verify", "vm"]).status.code(), Some(1));
    let file = biggest.file_name().unwrap().to_str().unwrap().to_string();
    // Every later status says so, in its own process.
    for _ in 0..2 {
        let st = env.status();
        assert_eq!(st["health"], "critical", "{st}");
        assert!(
            reasons(&st)
                .iter()
                .any(|r| r.starts_with("verify found damage") && r.contains(&file)),
            "{st}"
        );
    }
    // Also through a running agent.
    let (mut agent, _) = env.agent("1h");
    assert_eq!(env.status()["health"], "critical");
    interrupt(&mut agent);
    // Repaired, and a clean verify clears it.
    std::fs::write(&biggest, &good).unwrap();
    assert!(env.ok(&["verify", "vm"]).contains("sound"));
    let st = env.status();
    assert_ne!(st["health"], "critical", "{st}");
    assert!(!reasons(&st).iter().any(|r| r.contains("damage")), "{st}");
}

#[test]
fn protect_refuses_an_image_another_vm_already_protects() {
    let env = Env::with(|root| {
        std::fs::File::create(root.join("os.raw"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        "os=os.raw".to_string()
    });
    std::fs::create_dir(env.root.join("sub")).unwrap();
    std::os::unix::fs::symlink(env.root.join("os.raw"), env.root.join("sub/link.raw")).unwrap();
    std::fs::hard_link(env.root.join("os.raw"), env.root.join("sub/hard.raw")).unwrap();
    for other in ["sub/../os.raw", "sub/link.raw", "sub/hard.raw"] {
        let err = env.fails(&["protect", "vm2", "--disk", &format!("os={other}")]);
        assert!(err.contains("disk 'os' of VM 'vm'"), "{other}: {err}");
    }
    // One VM's two disks cannot be one image either.
    std::fs::File::create(env.root.join("two.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::hard_link(env.root.join("two.raw"), env.root.join("sub/two.raw")).unwrap();
    let err = env.fails(&[
        "protect",
        "vm3",
        "--disk",
        "a=two.raw",
        "--disk",
        "b=sub/two.raw",
    ]);
    assert!(err.contains("same image"), "{err}");
    let v: Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(v["vms"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn an_agent_refuses_an_image_another_process_holds_and_names_it() {
    let env = Env::new();
    let image = env.root.join("os.raw");
    // Another process holds the image, as a second agent would (one process, so that
    // killing it releases the lock).
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\n\
             f = open(sys.argv[1], 'rb+')\n\
             fcntl.flock(f, fcntl.LOCK_EX)\n\
             print('locked', flush=True)\n\
             time.sleep(600)",
            image.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut agent = env
        .cmd(&["agent", "vm", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It must give up on its own; one that serves anyway is stopped and the test fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = agent.kill();
            let _ = holder.kill();
            panic!("the agent served an image another process holds");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut err).unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("locked by pid {} (", holder.id())) && err.contains("python3"),
        "{err}"
    );
    // Once the holder is gone the agent serves it.
    let (mut agent, _) = env.agent("1h");
    interrupt(&mut agent);
}
