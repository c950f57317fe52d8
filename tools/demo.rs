//! `standby demo`: the embedded default, end to end on a throw-away vault. It protects a
//! two-disk VM, drives a realistic write workload through the agent API (with
//! app-consistent markers), processes it, shows status and points, fails over to an older
//! point, and proves the failover disks are bit-exact to what the VM held at that moment.

use crate::output::{self, bytes};
use crate::progress::Bar;
use standby_engine::record::{Consistency, Marker};
use standby_engine::vault::Sha256Hex;
use standby_engine::vault::{DiskSource, LockWait, PointSpec, ProtectRequest, Vault};
use standby_engine::Error;
use std::path::PathBuf;
use std::time::Instant;

const OS_BYTES: u64 = 256 << 20;
const DATA_BYTES: u64 = 128 << 20;
const ROUNDS: usize = 4;
const WRITES_PER_ROUND: usize = 600;

/// Deterministic pseudo-random numbers (xorshift64*), so every demo run is the same.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Realistic disk bytes: files under /usr/lib (text mixed with noise if unreadable).
fn content(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut dirs = vec![PathBuf::from("/usr/lib")];
    while out.len() < len {
        let Some(d) = dirs.pop() else { break };
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(p),
                Ok(t) if t.is_file() => {
                    if let Ok(b) = std::fs::read(&p) {
                        out.extend_from_slice(&b[..b.len().min(len - out.len())]);
                        if out.len() >= len {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    while out.len() < len {
        if rng.below(2) == 0 {
            out.extend_from_slice(b"standby keeps every acknowledged write; ");
        } else {
            out.extend_from_slice(&rng.next().to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn step(n: usize, what: &str) {
    println!();
    println!("[{n}] {what}");
}

pub fn run(dir: Option<PathBuf>) -> Result<(), Error> {
    let started = Instant::now();
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("standby-demo-{}", std::process::id())),
    };
    let vault_dir = dir.join("vault");
    let src_dir = dir.join("source");
    std::fs::create_dir_all(&src_dir).map_err(|e| Error::io(&src_dir, e))?;
    println!("Standby demo in {}", dir.display());

    step(
        1,
        "create a vault and a policy (crash points every 1 s, 1 h any-moment window)",
    );
    Vault::init(&vault_dir)?;
    let mut vault = Vault::open(&vault_dir, "standby demo", LockWait::Fail)?;
    let mut policy = vault.catalog().policy("default")?;
    policy.crash_interval = std::time::Duration::from_secs(1);
    vault.set_policy("demo", &policy)?;
    println!("    vault {}", vault_dir.display());

    step(2, "a VM 'web01' with two disks: os (256 MiB, 64 MiB of system files) and data (128 MiB, empty)");
    let data = content(96 << 20);
    let os = src_dir.join("web01-os.raw");
    {
        let f = std::fs::File::create(&os).map_err(|e| Error::io(&os, e))?;
        f.set_len(OS_BYTES).map_err(|e| Error::io(&os, e))?;
        use std::os::unix::fs::FileExt;
        f.write_all_at(&data[..64 << 20], 0)
            .map_err(|e| Error::io(&os, e))?;
        f.sync_all().map_err(|e| Error::io(&os, e))?;
    }
    let req = ProtectRequest {
        vm: "web01".into(),
        disks: vec![
            ("os".into(), Some(DiskSource::Existing(os.clone()))),
            (
                "data".into(),
                Some(DiskSource::New(src_dir.join("web01-data.raw"), DATA_BYTES)),
            ),
        ],
        policy: Some("demo".into()),
        source: standby_engine::vault::PlacementOverrides {
            resource_group: Some("prod".into()),
            network: Some("prod-net".into()),
            subnet: Some("web".into()),
            availability_set: Some("web-set".into()),
        },
        ..Default::default()
    };
    let t = Instant::now();
    let r = vault.protect(&req, &mut Bar::new())?;
    println!(
        "    initial replication shipped {} of {} allocated in {:.1} s; initial point {}",
        bytes(r.shipped_bytes),
        bytes(r.scanned_bytes),
        t.elapsed().as_secs_f64(),
        r.initial_point.id
    );

    step(3, &format!("the VM writes through the agent: {ROUNDS} rounds of {WRITES_PER_ROUND} writes (4-64 KiB) and trims, each ending in an app-consistent point"));
    let mut rng = Rng(42);
    let mut expected: Option<(String, Vec<String>)> = None;
    let target_round = 1;
    let mut written = 0u64;
    for round in 0..ROUNDS {
        let agent = vault.agent("web01")?;
        for _ in 0..WRITES_PER_ROUND {
            let disk = rng.below(2) as u16;
            let size = if disk == 0 { OS_BYTES } else { DATA_BYTES };
            let len = 4096 * (1 + rng.below(16));
            let offset = rng.below((size - len) / 4096) * 4096;
            if rng.below(20) == 0 {
                agent.zero(disk, offset, len, true, false)?;
            } else {
                let from = rng.below(data.len() as u64 - len) as usize / 512 * 512;
                agent.write(disk, offset, &data[from..from + len as usize], false)?;
                written += len;
            }
        }
        let name = format!("round-{}", round + 1);
        if round == target_round {
            // What the VM holds right now, as the VM reads it.
            let mut sums = Vec::new();
            for (i, size) in [OS_BYTES, DATA_BYTES].into_iter().enumerate() {
                sums.push(sha256_through(&agent, i as u16, size)?);
            }
            expected = Some((name.clone(), sums));
        }
        agent.marker(&Marker {
            consistency: Consistency::App,
            name: Some(name.clone()),
            group: None,
            kind: standby_engine::record::MarkerKind::Point,
        })?;
        agent.close()?;
        let pass = vault.process("web01")?;
        println!(
            "    {name}: processed {} records ({}), {} new point(s)",
            pass.applied,
            bytes(pass.applied_bytes),
            pass.points.len()
        );
        if round + 1 < ROUNDS {
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }
    println!("    the VM wrote {} in all", bytes(written));

    step(4, "status and points");
    output::status(&[vault.status("web01")?], false);
    println!();
    output::points("web01", &vault.points_with_bytes("web01")?, &[], false);

    let (name, sums) = expected.ok_or_else(|| Error::Invalid("no round was recorded".into()))?;
    let point = vault
        .points("web01")?
        .into_iter()
        .find(|p| p.name.as_deref() == Some(name.as_str()))
        .ok_or_else(|| Error::NotFound(format!("point {name} is missing")))?;
    step(
        5,
        &format!(
            "fail over to the older app-consistent point {} ('{name}')",
            point.id
        ),
    );
    let t = Instant::now();
    let report = vault.failover(
        "web01",
        PointSpec::Id(point.id),
        None,
        false,
        None,
        &mut Bar::new(),
    )?;
    output::failover(&report);
    println!("    materialized in {:.2} s", t.elapsed().as_secs_f64());

    step(
        6,
        "prove the failover disks are bit-exact to what the VM held at that moment",
    );
    let mut ok = true;
    for (d, want) in report.disks.iter().zip(&sums) {
        let same = &d.sha256 == want;
        ok &= same;
        println!(
            "    {:<5} {}  {}",
            d.name,
            if same { "identical" } else { "DIFFERENT" },
            want
        );
    }
    if !ok {
        return Err(Error::Invalid(
            "the failover disks differ from what the VM held".into(),
        ));
    }
    drop(vault);
    println!();
    println!(
        "Demo passed in {:.1} s. The vault stays for you to explore:",
        started.elapsed().as_secs_f64()
    );
    println!("    export STANDBY_VAULT={}", vault_dir.display());
    println!("    standby status; standby points web01; standby failover web01 --point latest; standby failover-commit web01");
    Ok(())
}

fn sha256_through(
    agent: &standby_engine::agent::Agent,
    disk: u16,
    size: u64,
) -> Result<String, Error> {
    let mut h = Sha256Hex::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        agent.read(disk, at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.hex())
}
