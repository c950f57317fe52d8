//! The way back and the end of protection, end to end through the built `standby` binary:
//! `diff` between points against a model of the disks (every changed 64 KiB block and
//! nothing else), `unprotect` (the name is freed, the points stay readable under the name
//! it reports, until deleted), `policy assign`, and the split-brain guard (a failed-over
//! VM's old source is not served).

mod common;

use common::{sha, Env};
use serde_json::Value;
use standby_engine::vault::{LockWait, Vault};
use std::path::Path;

const BLOCK: usize = 64 << 10;
const OS_BYTES: usize = 4 << 20;
const DATA_BYTES: usize = 2 << 20 | 4096; // ends in a short block

impl Env {
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "standby {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }
}

/// The VM's disks as the test wrote them.
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

    /// `n` writes through the VM's write tap; `same` of them rewrite bytes a disk already
    /// holds (which change the replica's extent maps but no byte).
    fn churn(&mut self, vault: &Path, vm: &str, n: usize, same: usize) {
        let v = Vault::open(vault, "test", LockWait::Block).unwrap();
        let agent = v.agent(vm).unwrap();
        for i in 0..n + same {
            let disk = (self.next() % 2) as usize;
            let len = 512 * (1 + self.next() % 200) as usize;
            let off = (self.next() % ((self.disks[disk].len() - len) as u64 / 512)) as usize * 512;
            let data: Vec<u8> = if i < n {
                let fill = self.next();
                (0..len)
                    .map(|k| (fill >> (k % 8 * 8)) as u8 ^ k as u8)
                    .collect()
            } else {
                self.disks[disk][off..off + len].to_vec()
            };
            agent.write(disk as u16, off as u64, &data, false).unwrap();
            self.disks[disk][off..off + len].copy_from_slice(&data);
        }
        agent.close().unwrap();
    }
}

/// The changed blocks between two copies of a disk, merged: `(offset, len)`.
fn changed(a: &[u8], b: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, (x, y)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        if x != y {
            let off = (i * BLOCK) as u64;
            match out.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += x.len() as u64,
                _ => out.push((off, x.len() as u64)),
            }
        }
    }
    out
}

fn ranges(d: &Value) -> Vec<(u64, u64)> {
    d["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["len"].as_u64().unwrap()))
        .collect()
}

fn setup(env: &Env, vm: &str) -> Model {
    env.ok(&["init", env.vault.to_str().unwrap()]);
    protect(env, vm, "a")
}

fn protect(env: &Env, vm: &str, tag: &str) -> Model {
    let os = env.root.join(format!("{vm}-{tag}-os.raw"));
    let data = env.root.join(format!("{vm}-{tag}-data.raw"));
    let mut m = Model {
        disks: vec![vec![0; OS_BYTES], vec![0; DATA_BYTES]],
        rng: 0x9e37_79b9_7f4a_7c15 ^ tag.len() as u64,
    };
    // Some data before protection, so the initial point is not empty.
    for (d, path) in [&os, &data].iter().enumerate() {
        for k in (0..m.disks[d].len()).step_by(3 * BLOCK) {
            m.disks[d][k] = 7 + d as u8;
        }
        std::fs::write(path, &m.disks[d]).unwrap();
    }
    env.ok(&[
        "protect",
        vm,
        "--disk",
        &format!("os={}", os.display()),
        "--disk",
        &format!("data={}", data.display()),
    ]);
    m
}

fn point(env: &Env, vm: &str) -> u64 {
    let out = env.ok(&["point", vm]);
    // "cut point N of VM at seq S ..."
    out.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn failover_sums(env: &Env, vm: &str, point: &str, out: &str, test: bool) -> Vec<String> {
    let dir = env.root.join(out);
    let cmd = if test { "test-failover" } else { "failover" };
    env.ok(&[cmd, vm, "--point", point, "--out", dir.to_str().unwrap()]);
    ["os", "data"]
        .iter()
        .map(|d| sha(&std::fs::read(dir.join(format!("{d}.raw"))).unwrap()))
        .collect()
}

#[test]
fn diff_reports_every_changed_block_and_nothing_else() {
    let env = Env::empty();
    let mut m = setup(&env, "vm");
    let p0 = m.disks.clone();
    let a = point(&env, "vm");
    m.churn(&env.vault, "vm", 40, 10);
    let b = point(&env, "vm");
    let p1 = m.disks.clone();
    // Rewrites of identical bytes only: the extent maps differ, no byte does.
    m.churn(&env.vault, "vm", 0, 15);
    let c = point(&env, "vm");

    let d = env.json(&["diff", "vm", &a.to_string(), &b.to_string(), "--json"]);
    let mut total = 0;
    for (i, disk) in d["disks"].as_array().unwrap().iter().enumerate() {
        let want = changed(&p0[i], &p1[i]);
        assert_eq!(ranges(disk), want, "disk {i}");
        total += want.iter().map(|r| r.1).sum::<u64>();
        assert_eq!(
            disk["changed_bytes"].as_u64().unwrap(),
            want.iter().map(|r| r.1).sum::<u64>()
        );
    }
    assert_eq!(d["changed_bytes"].as_u64().unwrap(), total);
    assert!(total > 0);
    // Only what the writes touched was hashed (both sides), never the whole disks.
    assert!(
        d["compared_bytes"].as_u64().unwrap() <= 2 * (50 * 2 * BLOCK as u64 + 2 * BLOCK as u64),
        "{d}"
    );
    assert_eq!(d["from"]["point"]["id"].as_u64(), Some(a));
    assert_eq!(d["to"]["point"]["id"].as_u64(), Some(b));

    // Identical rewrites are no change; the hash fallback found that out.
    let d = env.json(&["diff", "vm", &b.to_string(), &c.to_string(), "--json"]);
    assert_eq!(d["changed_bytes"].as_u64(), Some(0), "{d}");
    assert!(d["compared_bytes"].as_u64().unwrap() > 0);
    // A point against itself costs nothing at all.
    let d = env.json(&["diff", "vm", &b.to_string(), &b.to_string(), "--json"]);
    assert_eq!(d["changed_bytes"].as_u64(), Some(0));
    assert_eq!(d["compared_bytes"].as_u64(), Some(0));

    // Against latest (which processes what is pending first), both directions.
    m.churn(&env.vault, "vm", 5, 0);
    let d = env.json(&["diff", "vm", &a.to_string(), "latest", "--json"]);
    for (i, disk) in d["disks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ranges(disk), changed(&p0[i], &m.disks[i]), "disk {i}");
    }
    let human = env.ok(&["diff", "vm", "latest-processed", &a.to_string()]);
    assert!(human.contains("total: "), "{human}");

    let err = env.fails(&["diff", "vm", "999", "latest"]);
    assert!(err.contains("999"), "{err}");
    let err = env.fails(&["diff", "nosuch", "1", "latest"]);
    assert!(err.contains("unknown VM 'nosuch'"), "{err}");
}

#[test]
fn unprotect_frees_the_name_and_keeps_the_points_readable_until_deleted() {
    let env = Env::empty();
    let mut m = setup(&env, "web01");
    m.churn(&env.vault, "web01", 20, 0);
    let p = point(&env, "web01");
    let kept_sums: Vec<String> = m.disks.iter().map(|d| sha(d)).collect();

    let out = env.ok(&["unprotect", "web01"]);
    assert!(out.contains("web01.unprotected-1"), "{out}");
    // The name is free: a new VM of that name, with new images, protects and replicates.
    let mut m2 = protect(&env, "web01", "b");
    m2.churn(&env.vault, "web01", 10, 0);
    let new_sums: Vec<String> = m2.disks.iter().map(|d| sha(d)).collect();
    assert_eq!(
        failover_sums(&env, "web01", "latest", "tf-new", true),
        new_sums
    );
    env.ok(&["test-failover-cleanup", "web01"]);

    // The old points: listed, failed over (test and real), under the name reported.
    let old = "web01.unprotected-1";
    let pts = env.json(&["points", old, "--json"]);
    assert!(pts.to_string().contains(&format!("\"id\":{p}")), "{pts}");
    assert_eq!(
        failover_sums(&env, old, &p.to_string(), "tf-old", true),
        kept_sums
    );
    env.ok(&["test-failover-cleanup", old]);
    let st = env.json(&["status", old, "--json"]);
    assert_eq!(st["vms"][0]["state"], "unprotected", "{st}");
    // Nothing replicates into it any more.
    let err = env.fails(&["agent", old, "--listen", "127.0.0.1:0"]);
    assert!(err.contains("unprotected"), "{err}");
    let err = env.fails(&["unprotect", old]);
    assert!(err.contains("--delete-points"), "{err}");
    assert_eq!(
        failover_sums(&env, old, &p.to_string(), "fo-old", false),
        kept_sums
    );

    // Deleted: gone, and the new VM is untouched.
    env.ok(&["unprotect", old, "--delete-points"]);
    let err = env.fails(&["points", old]);
    assert!(err.contains("unknown VM"), "{err}");
    assert_eq!(
        failover_sums(&env, "web01", "latest", "tf-new2", true),
        new_sums
    );
    env.ok(&["test-failover-cleanup", "web01"]);

    // A committed failover's name is freed too (it had no points left).
    env.ok(&["failover", "web01", "--point", "latest"]);
    env.ok(&["failover-commit", "web01"]);
    let out = env.ok(&["unprotect", "web01"]);
    assert!(out.contains("no points left"), "{out}");
    protect(&env, "web01", "c");
    env.ok(&["unprotect", "web01", "--delete-points"]);
    assert!(!env.vault.join("vms").join("web01").exists());
}

#[test]
fn a_policy_is_assigned_to_a_vm_and_unknown_ones_are_refused() {
    let env = Env::empty();
    setup(&env, "vm");
    env.ok(&["policy", "set", "gold", "--retention", "2h"]);
    let err = env.fails(&["policy", "assign", "vm", "nosuch"]);
    assert!(err.contains("unknown policy 'nosuch'"), "{err}");
    let err = env.fails(&["policy", "assign", "nosuch", "gold"]);
    assert!(err.contains("unknown VM 'nosuch'"), "{err}");
    env.ok(&["policy", "assign", "vm", "gold"]);
    let v = Vault::open(&env.vault, "test", LockWait::Block).unwrap();
    assert_eq!(v.catalog().vm("vm").unwrap().policy, "gold");
    assert_eq!(v.vm_policy("vm").unwrap().retention.as_secs(), 7200);
}

#[test]
fn a_failed_over_vm_s_old_source_is_not_served() {
    let env = Env::empty();
    let mut m = setup(&env, "vm");
    m.churn(&env.vault, "vm", 5, 0);
    let p = point(&env, "vm");
    env.ok(&["failover", "vm", "--point", &p.to_string()]);
    let err = env.fails(&["agent", "vm", "--listen", "127.0.0.1:0"]);
    assert!(
        err.contains("was failed over to point") && err.contains("not served"),
        "{err}"
    );
    env.ok(&["failover-commit", "vm"]);
    let err = env.fails(&["agent", "vm", "--listen", "127.0.0.1:0"]);
    assert!(
        err.contains("was failed over") && err.contains("committed"),
        "{err}"
    );
}

/// Every retained point of `vm` must read as the model's state when it was cut; points
/// the test has not seen yet are the model's current state (`now`).
fn check_points(
    env: &Env,
    vm: &str,
    seen: &mut std::collections::BTreeMap<u64, Vec<Vec<u8>>>,
    now: &[Vec<u8>],
    what: &str,
) {
    let v = Vault::open(&env.vault, "test", LockWait::Block).unwrap();
    let ids: Vec<u64> = v.points(vm).unwrap().iter().map(|p| p.id).collect();
    for id in ids {
        let want = seen.entry(id).or_insert_with(|| now.to_vec()).clone();
        let m = v
            .mount(vm, standby_engine::vault::PointSpec::Id(id))
            .unwrap();
        for (i, disk) in want.iter().enumerate() {
            let mut got = vec![0u8; disk.len()];
            m.view.read(i as u16, 0, &mut got).unwrap();
            assert!(&got == disk, "{what}: point {id}, disk {i} differs");
        }
    }
}

fn images(paths: &[std::path::PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Write straight into images (the VM running at a site with no agent in its path).
fn write_images(m: &mut Model, paths: &[std::path::PathBuf], n: usize) {
    for _ in 0..n {
        let disk = (m.next() % 2) as usize;
        let len = 512 * (1 + m.next() % 300) as usize;
        let off = (m.next() % ((m.disks[disk].len() - len) as u64 / 512)) as usize * 512;
        let fill = m.next() as u8 | 1;
        let data = vec![fill; len];
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths[disk])
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, off as u64).unwrap();
        m.disks[disk][off..off + len].copy_from_slice(&data);
    }
}

fn changed_total(a: &[Vec<u8>], b: &[Vec<u8>]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| changed(x, y).iter().map(|r| r.1).sum::<u64>())
        .sum()
}

#[test]
fn the_whole_cycle_against_a_model_ships_only_deltas() {
    let env = Env::empty();
    let mut m = setup(&env, "vm");
    let mut seen = std::collections::BTreeMap::new();
    let orig: Vec<std::path::PathBuf> = ["os", "data"]
        .iter()
        .map(|d| env.root.join(format!("vm-a-{d}.raw")))
        .collect();
    check_points(&env, "vm", &mut seen, &m.disks, "protect");

    // Writes, a point, more writes (processed into another point).
    m.churn(&env.vault, "vm", 30, 0);
    let p1 = point(&env, "vm");
    let at_p1 = m.disks.clone();
    check_points(&env, "vm", &mut seen, &m.disks, "p1");
    m.churn(&env.vault, "vm", 20, 0);
    point(&env, "vm");
    let at_p2 = m.disks.clone();
    check_points(&env, "vm", &mut seen, &m.disks, "p2");
    assert_eq!(
        images(&orig),
        m.disks,
        "the original images hold every write"
    );

    // Fail over to the older point: the replica holds writes past it (the old source's).
    let fo = env.root.join("recovery");
    env.ok(&[
        "failover",
        "vm",
        "--point",
        &p1.to_string(),
        "--out",
        fo.to_str().unwrap(),
    ]);
    let rec: Vec<std::path::PathBuf> = ["os", "data"]
        .iter()
        .map(|d| fo.join(format!("{d}.raw")))
        .collect();
    assert_eq!(images(&rec), at_p1);
    m.disks = at_p1.clone();
    // The VM runs at the recovery site (no agent yet): writes straight into its disks.
    write_images(&mut m, &rec, 25);
    let err = env.fails(&["failback", "vm"]);
    assert!(err.contains("reprotect"), "{err}");

    let r = env.json(&["reprotect", "vm", "--json"]);
    assert_eq!(r["direction"], "reverse", "{r}");
    assert_eq!(
        r["shipped_bytes"].as_u64().unwrap(),
        changed_total(&at_p2, &m.disks),
        "reprotect ships exactly the blocks that differ: {r}"
    );
    assert_eq!(
        r["reverted_bytes"].as_u64().unwrap(),
        changed_total(&at_p1, &at_p2),
        "the old source's writes after the failover point are counted: {r}"
    );
    let per_disk: u64 = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["shipped_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(per_disk, r["shipped_bytes"].as_u64().unwrap());
    assert!(r["compared_bytes"].as_u64().unwrap() > 0);
    check_points(&env, "vm", &mut seen, &m.disks, "reprotect");
    let st = env.json(&["status", "vm", "--json"]);
    assert_eq!(st["vms"][0]["state"], "protected", "{st}");
    let err = env.fails(&["reprotect", "vm"]);
    assert!(err.contains("not failed over"), "{err}");

    // Protected in the reverse direction: the agent serves the recovery site's disks.
    m.churn(&env.vault, "vm", 30, 0);
    assert_eq!(images(&rec), m.disks);
    point(&env, "vm");
    check_points(&env, "vm", &mut seen, &m.disks, "reverse writes");
    m.churn(&env.vault, "vm", 10, 0); // pending: failback processes it first

    // Never while the VM runs: failback and unprotect refuse a running agent at once.
    {
        use std::io::BufRead;
        let addr = format!("127.0.0.1:{}", common::free_port());
        let mut agent = env
            .cmd(&["agent", "vm", "--listen", &addr, "--process-every", "1h"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(agent.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("serving NBD"), "{first}");
        let err = env.fails(&["failback", "vm"]);
        assert!(err.contains("stop its agent first"), "{err}");
        let err = env.fails(&["unprotect", "vm"]);
        assert!(err.contains("stop its agent first"), "{err}");
        common::interrupt(&mut agent);
    }

    // The planned return into the original images, in place, only what differs.
    let before = images(&orig);
    let fb = env.json(&["failback", "vm", "--json"]);
    assert_eq!(
        fb["shipped_bytes"].as_u64().unwrap(),
        changed_total(&before, &m.disks),
        "failback writes exactly the blocks that differ: {fb}"
    );
    assert_eq!(fb["resumed"], false);
    assert_eq!(images(&orig), m.disks, "the original images hold latest");
    check_points(&env, "vm", &mut seen, &m.disks, "failback");
    let err = env.fails(&["agent", "vm", "--listen", "127.0.0.1:0"]);
    assert!(err.contains("was failed over"), "{err}");

    // Back in the original direction: nothing differs, nothing is shipped.
    let r = env.json(&["reprotect", "vm", "--json"]);
    assert_eq!(r["direction"], "original", "{r}");
    assert_eq!(r["shipped_bytes"].as_u64(), Some(0), "{r}");
    assert_eq!(r["reverted_bytes"].as_u64(), Some(0), "{r}");
    m.churn(&env.vault, "vm", 20, 0);
    assert_eq!(
        images(&orig),
        m.disks,
        "the agent serves the original images again"
    );
    point(&env, "vm");
    check_points(&env, "vm", &mut seen, &m.disks, "original direction again");
    let human = env.ok(&["diff", "vm", "latest-processed", "latest"]);
    assert!(human.contains("total: 0 B changed"), "{human}");
}

#[test]
fn a_reprotect_after_a_committed_failover_seeds_from_the_original_images() {
    let env = Env::empty();
    let mut m = setup(&env, "vm");
    m.churn(&env.vault, "vm", 30, 0);
    let fo = env.root.join("recovery");
    env.ok(&[
        "failover",
        "vm",
        "--point",
        "latest",
        "--out",
        fo.to_str().unwrap(),
    ]);
    env.ok(&["failover-commit", "vm"]);
    let rec: Vec<std::path::PathBuf> = ["os", "data"]
        .iter()
        .map(|d| fo.join(format!("{d}.raw")))
        .collect();
    let at_failover = m.disks.clone();
    write_images(&mut m, &rec, 10);
    let r = env.json(&["reprotect", "vm", "--json"]);
    assert!(r["seeded_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        r["shipped_bytes"].as_u64().unwrap(),
        changed_total(&at_failover, &m.disks),
        "{r}"
    );
    let mut seen = std::collections::BTreeMap::new();
    check_points(&env, "vm", &mut seen, &m.disks, "seeded reprotect");
}

#[test]
fn diff_is_answered_by_a_running_agent_without_waiting_for_it() {
    use std::io::BufRead;
    let env = Env::empty();
    let mut m = setup(&env, "vm");
    let p0 = m.disks.clone();
    let a = point(&env, "vm");
    m.churn(&env.vault, "vm", 20, 0);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut agent = env
        .cmd(&["agent", "vm", "--listen", &addr, "--process-every", "1h"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(agent.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("serving NBD"), "{first}");
    // `latest` through the agent: it processes what is pending and cuts the point.
    let d = env.json(&[
        "--wait",
        "1s",
        "diff",
        "vm",
        &a.to_string(),
        "latest",
        "--json",
    ]);
    for (i, disk) in d["disks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ranges(disk), changed(&p0[i], &m.disks[i]), "disk {i}");
    }
    common::interrupt(&mut agent);
}
