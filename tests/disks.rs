//! A protected VM's disks over its life, end to end through the built `standby` binary:
//! `disk add` (a new disk joins the VM's consistency; only its allocated blocks are
//! copied) and `disk resize` (a disk grows; nothing is copied). Every older point stays
//! readable with the disks and sizes it had, bit-exact to a model (test failover of every
//! point, mount, `points --json`, verify); the embedded agent serves the new disk set and
//! size after a restart, after a kill -9 too; refusals are one line. The compatibility
//! fixture `tests/fixtures/vault-v1-disks` (a replica manifest with the disk history) is
//! read back bit-exact.

mod common;

use common::{sha, Env};
use serde_json::{json, Value};
use standby_engine::vault::{LockWait, Vault};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

const MIB: usize = 1 << 20;

impl Env {
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "standby {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).to_str().unwrap().to_string()
    }
}

/// The VM's disks as the test wrote them: (name, bytes), in the VM's disk order.
struct Model {
    disks: Vec<(String, Vec<u8>)>,
    rng: u64,
}

/// What a point must hold: each disk's name, size and sha256.
type Expected = Vec<(String, u64, String)>;

impl Model {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn expected(&self) -> Expected {
        self.disks
            .iter()
            .map(|(n, d)| (n.clone(), d.len() as u64, sha(d)))
            .collect()
    }

    /// `n` writes through the VM's write tap, on every disk, some near each disk's end
    /// (past an old size once the disk grew).
    fn churn(&mut self, vault: &Path, vm: &str, n: usize) {
        let v = Vault::open(vault, "test", LockWait::Block).unwrap();
        let agent = v.agent(vm).unwrap();
        for i in 0..n {
            let disk = (self.next() % self.disks.len() as u64) as usize;
            let size = self.disks[disk].1.len();
            let len = 512 * (1 + self.next() % 64) as usize;
            let off = if i % 4 == 0 {
                size - len
            } else {
                (self.next() % ((size - len) as u64 / 512)) as usize * 512
            };
            let fill = self.next();
            let data: Vec<u8> = (0..len)
                .map(|k| (fill >> (k % 8 * 8)) as u8 ^ k as u8)
                .collect();
            agent.write(disk as u16, off as u64, &data, false).unwrap();
            self.disks[disk].1[off..off + len].copy_from_slice(&data);
        }
        agent.close().unwrap();
    }
}

/// An image with some data in it (every third 64 KiB block starts with `tag`).
fn image(path: &Path, bytes: usize, tag: u8) -> Vec<u8> {
    let mut d = vec![0u8; bytes];
    for k in (0..bytes).step_by(3 << 16) {
        d[k..k + 512].fill(tag);
    }
    std::fs::write(path, &d).unwrap();
    d
}

fn point(env: &Env, vm: &str, name: &str) -> u64 {
    let out = env.ok(&["point", vm, "--name", name]);
    // "cut point N of VM at seq S ..."
    out.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Test-fail-over `point` into `dir` and read back each disk (vm.json checked too).
fn materialized(env: &Env, vm: &str, point: &str) -> Expected {
    let dir = env.root.join(format!("tf-{point}"));
    env.ok(&[
        "test-failover",
        vm,
        "--point",
        point,
        "--out",
        dir.to_str().unwrap(),
    ]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vm.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for d in manifest["disks"].as_array().unwrap() {
        let name = d["name"].as_str().unwrap().to_string();
        let bytes = std::fs::read(dir.join(format!("{name}.raw"))).unwrap();
        assert_eq!(d["size_bytes"].as_u64(), Some(bytes.len() as u64), "{d}");
        assert_eq!(d["sha256"].as_str(), Some(sha(&bytes).as_str()), "{d}");
        out.push((name, bytes.len() as u64, sha(&bytes)));
    }
    let names: Vec<&str> = out.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("raw".as_ref()))
            .count(),
        names.len(),
        "only the point's disks are materialized ({names:?})"
    );
    env.ok(&["test-failover-cleanup", vm]);
    out
}

/// Every point still held, test-failed-over: its disks, sizes and bytes as recorded, and
/// `points --json` lists the same disks and sizes for it.
fn check_points(env: &Env, vm: &str, seen: &BTreeMap<u64, Expected>, step: &str) {
    let pts = env.json(&["points", vm, "--json"]);
    for (id, want) in seen {
        assert_eq!(
            &materialized(env, vm, &id.to_string()),
            want,
            "{step}: point {id}"
        );
        let p = pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"].as_u64() == Some(*id))
            .unwrap_or_else(|| panic!("{step}: point {id} listed: {pts}"));
        if let Some(disks) = p["disks"].as_array() {
            let listed: Vec<(String, u64)> = disks
                .iter()
                .map(|d| {
                    (
                        d["name"].as_str().unwrap().to_string(),
                        d["size_bytes"].as_u64().unwrap(),
                    )
                })
                .collect();
            let expected: Vec<(String, u64)> =
                want.iter().map(|(n, s, _)| (n.clone(), *s)).collect();
            assert_eq!(listed, expected, "{step}: points --json of point {id}");
        } else {
            assert!(pts["disk_changes"].is_null(), "{pts}");
        }
    }
    env.ok(&["verify", vm]);
}

/// The newest point's id.
fn newest(env: &Env, vm: &str) -> u64 {
    let pts = env.json(&["points", vm, "--json"]);
    pts["points"].as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap()
}

#[test]
fn disks_added_and_grown_keep_every_older_point_bit_exact() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    env.ok(&[
        "policy",
        "set",
        "keep",
        "--retention",
        "100years",
        "--thin-after",
        "100years",
        "--crash-interval",
        "100years",
    ]);
    let os = image(&env.root.join("os.raw"), MIB, 3);
    env.ok(&[
        "protect",
        "vm",
        "--policy",
        "keep",
        "--disk",
        &format!("os={}", env.path("os.raw")),
    ]);
    let mut m = Model {
        disks: vec![("os".into(), os)],
        rng: 0x2545_f491_4f6c_dd1d,
    };
    let mut seen: BTreeMap<u64, Expected> = BTreeMap::new();
    seen.insert(1, m.expected());
    m.churn(&env.vault, "vm", 40);
    seen.insert(point(&env, "vm", "before-add"), m.expected());

    // A disk with data joins: only its allocated blocks are shipped, and the point cut at
    // its end is the first to have it.
    let data = image(&env.root.join("data.raw"), 2 * MIB, 9);
    let allocated = data
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count()
        * 4096;
    let r = env.json(&[
        "disk",
        "add",
        "vm",
        &format!("data={}", env.path("data.raw")),
        "--json",
    ]);
    assert_eq!(r["shipped_bytes"].as_u64(), Some(allocated as u64), "{r}");
    assert_eq!(r["point"]["name"], "disk-add", "{r}");
    m.disks.push(("data".into(), data));
    seen.insert(r["point"]["id"].as_u64().unwrap(), m.expected());
    check_points(&env, "vm", &seen, "after the add");
    m.churn(&env.vault, "vm", 60);
    seen.insert(point(&env, "vm", "two-disks"), m.expected());

    // Grow os (the source image too): older points keep 1 MiB, nothing is shipped.
    let r = env.json(&["disk", "resize", "vm", "os", "3MiB", "--json"]);
    assert_eq!(r["old_size_bytes"].as_u64(), Some(MIB as u64), "{r}");
    assert_eq!(r["source_grown"], true, "{r}");
    assert_eq!(
        std::fs::metadata(env.root.join("os.raw")).unwrap().len(),
        3 * MIB as u64
    );
    m.disks[0].1.resize(3 * MIB, 0);
    seen.insert(r["point"]["id"].as_u64().unwrap(), m.expected());
    m.churn(&env.vault, "vm", 60); // writes past the old end of os too
    seen.insert(point(&env, "vm", "grown"), m.expected());
    // Pending writes, then an empty new disk and a second growth of os.
    m.churn(&env.vault, "vm", 20);
    let r = env.json(&["disk", "add", "vm", "logs=new:512KiB", "--json"]);
    assert_eq!(r["created"], true, "{r}");
    assert_eq!(r["shipped_bytes"].as_u64(), Some(0), "{r}");
    m.disks.push(("logs".into(), vec![0; 512 << 10]));
    seen.insert(r["point"]["id"].as_u64().unwrap(), m.expected());
    truncate(&env.root.join("os.raw"), 4 * MIB as u64); // grown beforehand: fine too
    let r = env.json(&["disk", "resize", "vm", "os", "4MiB", "--json"]);
    assert_eq!(r["source_grown"], false, "{r}");
    m.disks[0].1.resize(4 * MIB, 0);
    seen.insert(r["point"]["id"].as_u64().unwrap(), m.expected());
    m.churn(&env.vault, "vm", 60);
    seen.insert(point(&env, "vm", "three-disks"), m.expected());
    check_points(&env, "vm", &seen, "after every change");

    // diff compares states of one disk set and size, and says so otherwise.
    let ids: Vec<String> = seen.keys().map(|k| k.to_string()).collect();
    let err = env.fails(&["diff", "vm", &ids[1], &ids[2]]); // before and at the add
    assert!(
        err.contains("disk 'data' is not in the state at seq"),
        "{err}"
    );
    let err = env.fails(&["diff", "vm", &ids[0], "latest"]);
    assert!(err.contains("only points of one size compare"), "{err}");
    let d = env.json(&["diff", "vm", "three-disks", "latest", "--json"]);
    assert_eq!(d["changed_bytes"].as_u64(), Some(0), "{d}");

    // The same size again changes nothing; the text of points says what changed when.
    let out = env.ok(&["disk", "resize", "vm", "os", "4MiB"]);
    assert!(out.contains("nothing changed"), "{out}");
    let text = env.ok(&["points", "vm"]);
    assert!(
        text.contains("disk 'data' was added at seq")
            && text.contains("disk 'logs' was added at seq")
            && text.contains("disk 'os' grew from 1.0 MiB to 3.0 MiB at seq")
            && text.contains("disk 'os' grew from 3.0 MiB to 4.0 MiB at seq"),
        "{text}"
    );

    // A mount of the point before the add serves only the disk it had, at its size then.
    {
        let addr = format!("127.0.0.1:{}", common::free_port());
        let before_add = seen.keys().nth(1).unwrap().to_string();
        let mut mount = env
            .cmd(&["mount", "vm", "--point", &before_add, "--listen", &addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(mount.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", &format!("nbd://{addr}/os")])
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(MIB as u64), "{info}");
        let data = std::process::Command::new("qemu-img")
            .args(["info", &format!("nbd://{addr}/data")])
            .output()
            .unwrap();
        assert!(
            !data.status.success(),
            "no data disk in the point before the add"
        );
        common::interrupt(&mut mount);
    }

    // A real failover of latest gives the source images, each at its size now.
    let dir = env.root.join("recovered");
    let fo = env.ok(&[
        "failover",
        "vm",
        "--point",
        "latest",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(!fo.contains("is not in this point"), "{fo}");
    for (name, bytes) in &m.disks {
        assert_eq!(
            &std::fs::read(dir.join(format!("{name}.raw"))).unwrap(),
            bytes,
            "{name}"
        );
    }
    let sources = [
        env.root.join("os.raw"),
        env.root.join("data.raw"),
        env.vault.join("sources/vm/logs.raw"),
    ];
    for ((_, bytes), src) in m.disks.iter().zip(&sources) {
        assert_eq!(&std::fs::read(src).unwrap(), bytes, "{}", src.display());
    }
}

fn truncate(p: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// `standby agent VM` on a free port; returns it and its address once it serves.
fn agent(env: &Env, vm: &str) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut child = env
        .cmd(&["agent", vm, "--listen", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    if !first.contains("serving NBD") {
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        panic!("agent did not start: {first}{err}");
    }
    (child, addr)
}

#[test]
fn a_disk_added_under_load_and_a_grown_one_are_served_after_a_restart_and_a_kill() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let os_path = env.root.join("os.raw");
    let mut os = image(&os_path, 2 * MIB, 5);
    env.ok(&[
        "protect",
        "vm",
        "--disk",
        &format!("os={}", os_path.display()),
    ]);

    // Writes through NBD, then kill -9: acknowledged writes may be in the log only.
    let (mut a, addr) = agent(&env, "vm");
    let url = format!("nbd://{addr}/os");
    common::qemu_io(&url, &["write -P 0x61 64k 128k", "flush"]);
    os[64 << 10..192 << 10].fill(0x61);
    let err = env.fails(&["disk", "resize", "vm", "os", "3MiB"]);
    assert!(err.contains("stop its agent first"), "{err}");
    a.kill().unwrap();
    a.wait().unwrap();

    // The documented flow: grow the source image, resize, start the agent again.
    truncate(&os_path, 3 * MIB as u64);
    let before = env.fails(&["agent", "vm", "--listen", "127.0.0.1:0"]);
    assert!(
        before.contains("the vault expects") && before.contains("standby disk resize VM os"),
        "{before}"
    );
    env.ok(&["disk", "resize", "vm", "os", "3MiB"]);
    os.resize(3 * MIB, 0);
    let resized = newest(&env, "vm");
    let (mut a, addr) = agent(&env, "vm");
    let url = format!("nbd://{addr}/os");
    common::qemu_io(&url, &["write -P 0x62 2944k 128k", "flush"]); // past the old end
    os[2944 << 10..3072 << 10].fill(0x62);
    common::qemu_io(&url, &["read -P 0x61 64k 128k", "read -P 0x62 2944k 128k"]);

    // A disk with data joins under load: the running agent copies it beside the VM's
    // writes, which go on; each of those is acknowledged before the next is sent, so the
    // disk-add point holds one of the states between them.
    let data_path = env.root.join("data.raw");
    let mut data: Vec<u8> = (0..16 * MIB).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(&data_path, &data).unwrap();
    let load = {
        let (url, mut m) = (url.clone(), os.clone());
        std::thread::spawn(move || {
            let mut states = vec![sha(&m)];
            for i in 0..16u8 {
                let off = (i as usize * 160) << 10;
                common::qemu_io(&url, &[format!("write -P {} {off} 64k", 0x70 + i)]);
                m[off..off + (64 << 10)].fill(0x70 + i);
                states.push(sha(&m));
            }
            (m, states)
        })
    };
    let r = env.json(&[
        "disk",
        "add",
        "vm",
        &format!("data={}", data_path.display()),
        "--json",
    ]);
    let (after, states) = load.join().unwrap();
    os = after;
    let added = r["point"]["id"].as_u64().unwrap();
    let at_add = materialized(&env, "vm", &added.to_string());
    assert_eq!(at_add.len(), 2, "{at_add:?}");
    assert_eq!(at_add[1], ("data".into(), 16 * MIB as u64, sha(&data)));
    assert_eq!(r["shipped_bytes"].as_u64(), Some(16 * MIB as u64), "{r}");
    assert!(
        states.contains(&at_add[0].2),
        "the disk-add point's os is a state the VM had"
    );
    let err = env.fails(&["disk", "resize", "vm", "data", "32MiB"]);
    assert!(err.contains("stop its agent first"), "{err}");
    common::interrupt(&mut a);

    // Restarted, the agent serves both disks.
    let (mut a, addr) = agent(&env, "vm");
    common::qemu_io(
        &format!("nbd://{addr}/data"),
        &["write -P 0x63 0 64k", "write -P 0x64 960k 64k", "flush"],
    );
    data[..64 << 10].fill(0x63);
    data[960 << 10..1024 << 10].fill(0x64);
    common::qemu_io(
        &format!("nbd://{addr}/os"),
        &["write -P 0x65 0 4k", "flush"],
    );
    os[..4096].fill(0x65);
    let last = point(&env, "vm", "both");
    // Killed again: the restart replays what the log holds, then serves both disks.
    a.kill().unwrap();
    a.wait().unwrap();
    let (mut a, _) = agent(&env, "vm");
    common::interrupt(&mut a);

    let want = |disks: &[(&str, &[u8])]| -> Expected {
        disks
            .iter()
            .map(|(n, d)| (n.to_string(), d.len() as u64, sha(d)))
            .collect()
    };
    assert_eq!(
        materialized(&env, "vm", &last.to_string()),
        want(&[("os", &os), ("data", &data)])
    );
    let at_resize = materialized(&env, "vm", &resized.to_string());
    assert_eq!(at_resize.len(), 1, "{at_resize:?}");
    assert_eq!(at_resize[0].1, 3 * MIB as u64);
    let initial = materialized(&env, "vm", "1");
    assert_eq!(initial.len(), 1);
    assert_eq!(
        initial[0].1,
        2 * MIB as u64,
        "the initial point keeps 2 MiB"
    );
    let dir = env.root.join("fo");
    let out = env.ok(&[
        "failover",
        "vm",
        "--point",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.contains("disk 'data' is not in this point"),
        "failover says which disks the point lacks: {out}"
    );
    env.ok(&["verify", "vm"]);
}

#[test]
fn bad_disk_requests_are_refused_with_one_line() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    image(&env.root.join("os.raw"), MIB, 1);
    image(&env.root.join("other.raw"), MIB, 2);
    env.ok(&[
        "protect",
        "vm",
        "--disk",
        &format!("os={}", env.path("os.raw")),
    ]);
    env.ok(&[
        "protect",
        "vm2",
        "--disk",
        &format!("os={}", env.path("other.raw")),
    ]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["disk", "add", "nope", "data=new:1MiB"],
            "unknown VM 'nope'",
        ),
        (
            &["disk", "resize", "nope", "os", "2MiB"],
            "unknown VM 'nope'",
        ),
        (
            &["disk", "resize", "vm", "nope", "2MiB"],
            "has no disk 'nope' (its disks: os)",
        ),
        (
            &["disk", "resize", "vm", "os", "512KiB"],
            "shrinking it to 524288 is refused",
        ),
        (
            &["disk", "resize", "vm", "os", "1000"],
            "non-zero multiple of 512",
        ),
        (&["disk", "resize", "vm", "os", "128TiB"], "at most 64 TiB"),
        (
            &["disk", "add", "vm", "data=new:0"],
            "non-zero multiple of 512",
        ),
        (
            &["disk", "add", "vm", "os=new:1MiB"],
            "already has a disk 'os'",
        ),
        (
            &["disk", "add", "vm", "bad/name=new:1MiB"],
            "disk name 'bad/name'",
        ),
        (
            &["disk", "add", "vm", "x=/no/such/image.raw"],
            "/no/such/image.raw",
        ),
        (
            &["disk", "add", "vm", "x=other.raw"],
            "already the source of disk 'os' of VM 'vm2'",
        ),
        (
            &["disk", "add", "vm", "x=os.raw"],
            "already the source of disk 'os' of VM 'vm'",
        ),
        (
            &["disk", "add", "vm", "x=new:1MiB:os.raw"],
            "already exists",
        ),
    ];
    for (args, want) in cases {
        let err = env.fails(args);
        assert!(err.contains(want), "standby {args:?}: {err}");
    }
    // A source image larger than the size asked for is not cut.
    truncate(&env.root.join("os.raw"), 4 * MIB as u64);
    let err = env.fails(&["disk", "resize", "vm", "os", "2MiB"]);
    assert!(err.contains("resize to at least its size"), "{err}");
    // Usage errors: exit 2, one line.
    for args in [
        &["disk", "resize", "vm", "os", "lots"][..],
        &["disk", "add", "vm", "noequals"][..],
        &["disk", "add", "vm"][..],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .trim_end()
                .lines()
                .count(),
            1
        );
    }
    // Nothing of that changed the VM: one disk, one point.
    let pts = env.json(&["points", "vm", "--json"]);
    assert_eq!(pts["points"].as_array().unwrap().len(), 1, "{pts}");
    assert!(pts["disk_changes"].is_null(), "{pts}");
    assert!(!env.vault.join("sources/vm/data.raw").exists());
}

const FIXTURE: &str = "tests/fixtures/vault-v1-disks";

/// A vault written by the build that introduced the disk history (the replica manifest's
/// incompatible bit 0): every point fails over with its disks, sizes and bytes as recorded.
#[test]
fn a_vault_with_added_and_grown_disks_opens_bit_exact() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap())
            .unwrap();
    let env = Env::empty();
    copy_tree(&fixture.join("vault"), &env.vault);
    let manifest = std::fs::read(env.vault.join("vms/vm/replica/manifest")).unwrap();
    assert_eq!(
        manifest[12], 1,
        "the fixture's manifest has the disk history bit"
    );
    let mut seen = BTreeMap::new();
    for p in expected["points"].as_array().unwrap() {
        let disks: Expected = p["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap().to_string(),
                    d["size_bytes"].as_u64().unwrap(),
                    d["sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        seen.insert(p["id"].as_u64().unwrap(), disks);
    }
    check_points(&env, "vm", &seen, "fixture");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Writes `tests/fixtures/vault-v1-disks/` from the current build (run on purpose).
#[test]
#[ignore = "writes the compatibility fixture; run on purpose"]
fn generate_vault_v1_disks_fixture() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    env.ok(&[
        "policy",
        "set",
        "keep",
        "--retention",
        "100years",
        "--thin-after",
        "100years",
        "--crash-interval",
        "100years",
    ]);
    let os = image(&env.root.join("os.raw"), 256 << 10, 4);
    env.ok(&[
        "protect",
        "vm",
        "--policy",
        "keep",
        "--disk",
        &format!("os={}", env.path("os.raw")),
    ]);
    let mut m = Model {
        disks: vec![("os".into(), os)],
        rng: 0xd15c_5eed,
    };
    let mut points: Vec<(u64, Expected)> = vec![(1, m.expected())];
    m.churn(&env.vault, "vm", 3);
    env.ok(&["disk", "add", "vm", "data=new:128KiB"]);
    m.disks.push(("data".into(), vec![0; 128 << 10]));
    points.push((newest(&env, "vm"), m.expected()));
    m.churn(&env.vault, "vm", 3);
    env.ok(&["disk", "resize", "vm", "os", "512KiB"]);
    m.disks[0].1.resize(512 << 10, 0);
    points.push((newest(&env, "vm"), m.expected()));
    m.churn(&env.vault, "vm", 3);
    points.push((point(&env, "vm", "last"), m.expected()));
    let expected = json!({
        "made_by": "cargo test --test disks -- --ignored generate_vault_v1_disks_fixture",
        "points": points.iter().map(|(id, disks)| json!({
            "id": id,
            "disks": disks.iter().map(|(n, s, h)| json!({"name": n, "size_bytes": s, "sha256": h})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let out: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    if out.exists() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::remove_dir_all(env.vault.join("sources")).unwrap();
    std::fs::remove_dir_all(env.vault.join("link")).ok();
    copy_tree(&env.vault, &out.join("vault"));
    for lock in ["vault/lock", "vault/vms/vm/lock"] {
        std::fs::remove_file(out.join(lock)).ok();
    }
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
    std::fs::write(
        out.join("README.md"),
        "# Compatibility fixture: the replica manifest's disk history\n\n\
         A tiny vault whose VM `vm` had a disk added (`data`, at point 2) and its `os` disk\n\
         grown from 256 KiB to 512 KiB (point 3) after protect, so its replica manifest sets\n\
         incompatible feature bit 0 (`DISK_HISTORY`, see `docs/format.md`). `tests/disks.rs`\n\
         fails over every point and checks its disks, sizes and sha256 against\n\
         `expected.json`.\n\n\
         Left out: the source images, the link credentials and the lock files.\n\n\
         ## How it was made\n\n\
         ```\n\
         cargo test --test disks -- --ignored generate_vault_v1_disks_fixture\n\
         ```\n",
    )
    .unwrap();
}
