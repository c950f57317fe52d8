//! Damage containment end to end through the built `standby` binary: one flipped byte in a
//! layer index of VM `a` in a vault with VMs `a` and `b`. `b` is unaffected; `a` is
//! critical naming the file; `points` still lists every point and marks the spoiled ones;
//! `verify` reports the damage (text and JSON, exit 1); a point older than the damaged
//! layer still fails over and mounts bit-exact, a point that reads it is refused in one
//! line naming the file; processing stops for `a` only.

mod common;

use common::{free_port, sha, Env};
use serde_json::Value;
use standby_engine::vault::{LockWait, Vault};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const DISK_BYTES: usize = 4 << 20;

impl Env {
    /// Run and require exit 1 with one line on stderr (no panic); returns that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "standby {args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        err
    }

    /// Start a long-running command; returns once it printed its first line (listening).
    fn serve(&self, args: &[&str]) -> Child {
        let mut child = Command::new(env!("CARGO_BIN_EXE_standby"))
            .args(args)
            .env("STANDBY_VAULT", &self.vault)
            .current_dir(&self.root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("127.0.0.1"), "{args:?}: {first}");
        child
    }

    /// Write `fill` over `len` bytes at `offset` of a VM's only disk, through its agent.
    fn write(&self, vm: &str, offset: usize, len: usize, fill: u8, model: &mut [u8]) {
        let v = Vault::open(&self.vault, "test", LockWait::Block).unwrap();
        let agent = v.agent(vm).unwrap();
        let data: Vec<u8> = (0..len).map(|i| fill ^ (i / 512) as u8).collect();
        agent.write(0, offset as u64, &data, false).unwrap();
        model[offset..offset + len].copy_from_slice(&data);
        agent.close().unwrap();
    }

    /// sha256 of the disk a (test) failover wrote into `dir`, checked against vm.json.
    fn failed_over_sum(&self, dir: &Path) -> String {
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("vm.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("os.raw")).unwrap();
        assert_eq!(
            manifest["disks"][0]["sha256"].as_str().unwrap(),
            sha(&bytes)
        );
        sha(&bytes)
    }
}

/// A vault with VMs `a` and `b`, each with one disk of `fill` bytes, protected.
fn two_vms(fill: u8) -> Env {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    for vm in ["a", "b"] {
        std::fs::write(env.root.join(format!("{vm}.raw")), vec![fill; DISK_BYTES]).unwrap();
        env.ok(&["protect", vm, "--disk", &format!("os={vm}.raw")]);
    }
    env
}

/// `vm` is critical in `st`, its first reason naming `file`.
fn critical_naming(st: &Value, vm: &str, file: &Path) {
    let s = status_of(st, vm);
    assert_eq!(s["health"], "critical", "{s}");
    assert!(
        s["reasons"][0]
            .as_str()
            .unwrap()
            .contains(file.to_str().unwrap()),
        "{s}"
    );
}

fn status_of<'a>(st: &'a Value, vm: &str) -> &'a Value {
    st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["vm"] == vm)
        .unwrap_or_else(|| panic!("{vm} missing from status: {st}"))
}

#[test]
fn a_damaged_layer_index_spoils_only_its_points_and_only_its_vm() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let mut models = Vec::new();
    for vm in ["a", "b"] {
        let mut disk = vec![0u8; DISK_BYTES];
        disk[..1 << 20].fill(vm.as_bytes()[0]);
        std::fs::write(env.root.join(format!("{vm}.raw")), &disk).unwrap();
        env.ok(&["protect", vm, "--disk", &format!("os={vm}.raw")]);
        models.push(disk);
    }
    // a: the initial point, then three more, each after its own writes.
    let mut sums = vec![sha(&models[0])];
    for round in 1..=3u8 {
        let at = round as usize * (1 << 20);
        env.write("a", at, 256 << 10, round, &mut models[0]);
        env.ok(&["point", "a"]);
        sums.push(sha(&models[0]));
    }
    env.write("b", 0, 64 << 10, 7, &mut models[1]);
    env.ok(&["point", "b"]);
    let pts = env.json(&["points", "a", "--json"]);
    let ids: Vec<u64> = pts["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "{pts}");
    // Before the damage: the point before the victim layer, materialized.
    let before = env.root.join("before");
    let p2 = ids[1].to_string();
    env.ok(&[
        "test-failover",
        "a",
        "--point",
        &p2,
        "--out",
        before.to_str().unwrap(),
    ]);
    let sum_before = env.failed_over_sum(&before);
    assert_eq!(sum_before, sums[1]);
    env.ok(&["test-failover-cleanup", "a"]);

    // Flip one byte in the entries of the third point's layer index.
    let layers = env.vault.join("vms/a/replica/layers");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    let victim = files[2].clone();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[64 + 17] ^= 0x08;
    std::fs::write(&victim, &bytes).unwrap();
    let spoiled = &ids[2..];

    // status: b as before, a critical naming the file.
    let st = env.json(&["status", "--json"]);
    let b = status_of(&st, "b");
    // b is as it was: no agent runs (warning), but no damage of a's touches it.
    assert_eq!(b["health"], "warning", "{b}");
    assert_eq!(b["damage"], serde_json::json!([]), "{b}");
    assert_eq!(b["points"], 2, "{b}");
    let a = status_of(&st, "a");
    assert_eq!(a["health"], "critical", "{a}");
    let first = a["reasons"][0].as_str().unwrap();
    assert!(first.contains(&name) && first.contains("at byte 64"), "{a}");
    assert!(a["damage"][0].as_str().unwrap().contains(&name), "{a}");
    // What a failover can still recover: the newest readable point, p2.
    assert_eq!(
        a["disks"][0]["replicated_bytes"],
        (1 << 20) + (256 << 10),
        "{a}"
    );
    let text = env.ok(&["status"]);
    assert!(
        text.contains(&name) && text.contains("health critical"),
        "{text}"
    );

    // points: all listed, the spoiled ones marked.
    let pts = env.json(&["points", "a", "--json"]);
    let pts = pts["points"].as_array().unwrap();
    assert_eq!(pts.len(), 4);
    for p in pts {
        let id = p["id"].as_u64().unwrap();
        if spoiled.contains(&id) {
            assert_eq!(p["readable"], false, "{p}");
            assert!(p["damage"].as_str().unwrap().contains(&name), "{p}");
        } else {
            assert_eq!(p["readable"], true, "{p}");
        }
    }
    let text = env.ok(&["points", "a"]);
    assert_eq!(text.matches("unreadable").count(), 2, "{text}");
    assert!(text.contains(&name), "{text}");

    // verify: the damage, as text and JSON, exit 1; b is sound.
    let out = env.run(&["verify", "a"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DAMAGED") && text.contains(&name), "{text}");
    let out = env.run(&["verify", "a", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sound"], false);
    let d = &v["damage"][0];
    assert!(d["file"].as_str().unwrap().ends_with(&name), "{d}");
    assert_eq!(d["offset"], 64, "{d}");
    let dpts: Vec<u64> = d["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(dpts, spoiled, "{d}");
    assert_eq!(d["latest"], true, "{d}");
    env.ok(&["verify", "b"]);

    // Processing stops for a only; b's writes are still processed.
    env.write("b", 1 << 20, 64 << 10, 9, &mut models[1]);
    let err = env.fails(&["process"]);
    assert!(err.contains("a:") && err.contains(&name), "{err}");
    let st = env.json(&["status", "b", "--json"]);
    assert_eq!(status_of(&st, "b")["backlog_records"], 0, "{st}");

    // Failover to a point that reads the damaged layer: refused in one line naming it.
    for spec in [ids[2].to_string(), ids[3].to_string(), "latest".into()] {
        let err = env.fails(&["failover", "a", "--point", &spec]);
        assert!(err.contains(&name), "{spec}: {err}");
    }
    // Mounting: the same. The older point, copied by qemu-img over NBD, is bit-exact.
    let addr = format!("127.0.0.1:{}", free_port());
    let p3 = ids[2].to_string();
    let err = env.fails(&["mount", "a", "--point", &p3, "--listen", &addr]);
    assert!(err.contains(&name), "{err}");
    let mut mount = env.serve(&["mount", "a", "--point", &p2, "--listen", &addr]);
    let copy = env.root.join("copy.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://{addr}/os"))
        .arg(&copy)
        .status()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-INT", &mount.id().to_string()])
        .status();
    let _ = mount.wait();
    assert!(st.success(), "qemu-img convert from the mount failed");
    assert_eq!(sha(&std::fs::read(&copy).unwrap()), sum_before);
    // To the point before it: bit-exact with what it was before the damage.
    let out = env.root.join("after");
    env.ok(&[
        "failover",
        "a",
        "--point",
        &p2,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(env.failed_over_sum(&out), sum_before);
}

/// The manifest is the root of every point: no containment inside the VM, but its commands
/// fail in one line naming the file, its status is critical, and the other VM is unaffected.
#[test]
fn a_damaged_manifest_fails_its_vm_in_one_line_and_leaves_the_other_be() {
    let env = two_vms(3u8);
    let manifest = env.vault.join("vms/a/replica/manifest");
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[40] ^= 0x01;
    std::fs::write(&manifest, &bytes).unwrap();
    let file = manifest.to_str().unwrap();

    let st = env.json(&["status", "--json"]);
    // b is as it was: no agent runs (warning), but no damage of a's touches it.
    assert_eq!(status_of(&st, "b")["health"], "warning", "{st}");
    assert_eq!(status_of(&st, "b")["damage"], serde_json::json!([]), "{st}");
    let a = status_of(&st, "a");
    assert_eq!(a["health"], "critical", "{a}");
    assert!(a["reasons"][0].as_str().unwrap().contains(file), "{a}");
    for args in [
        &["points", "a"][..],
        &["verify", "a"],
        &["failover", "a", "--point", "1"],
    ] {
        let err = env.fails(args);
        assert!(err.contains(file), "{args:?}: {err}");
    }
    env.ok(&["verify", "b"]);
    let err = env.fails(&["process"]);
    assert!(err.contains(file), "{err}");
}

/// A change log too damaged to open makes its VM's status critical naming the file; the
/// other VM's status is unaffected.
#[test]
fn a_damaged_change_log_makes_only_its_vm_critical() {
    let env = two_vms(5u8);
    let dir = env.vault.join("vms/a/cache");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    let seg = &segs[0];
    let mut bytes = std::fs::read(seg).unwrap();
    bytes[10] ^= 0x01; // inside the segment header
    std::fs::write(seg, &bytes).unwrap();
    let st = env.json(&["status", "--json"]);
    // b is as it was: no agent runs (warning), but no damage of a's touches it.
    assert_eq!(status_of(&st, "b")["health"], "warning", "{st}");
    assert_eq!(status_of(&st, "b")["damage"], serde_json::json!([]), "{st}");
    critical_naming(&st, "a", seg);
}

/// A damaged `source.seq` (how far the source images hold the log): the agent refuses to
/// start on it, so `status` says so, critical and naming the file, instead of "agent not
/// running"; the vault's other VM is unaffected.
#[test]
fn a_damaged_source_position_makes_its_vm_critical() {
    let env = two_vms(5u8);
    let file = env.vault.join("vms/a/cache/source.seq");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..3]).unwrap();
    let st = env.json(&["status", "--json"]);
    assert_eq!(status_of(&st, "b")["damage"], serde_json::json!([]), "{st}");
    critical_naming(&st, "a", &file);
    let port = free_port();
    let err = env.fails(&["agent", "a", "--listen", &format!("127.0.0.1:{port}")]);
    assert!(err.contains("source.seq"), "{err}");
}
