//! A failback stopped half-way (here: its progress callback panics after the first block
//! it wrote into the original images) leaves the vault knowing: the point stays pinned,
//! the agent and processing refuse the VM, and the next `failback` finishes the job.

use standby_engine::vault::{
    DiskSource, LockWait, NoProgress, PointSpec, Progress, ProtectRequest, Vault,
};
use std::path::{Path, PathBuf};

const DISK: usize = 4 << 20;
const BLOCK: usize = 64 << 10;

struct StopAfterFirstWrite;
impl Progress for StopAfterFirstWrite {
    fn advance(&mut self, _bytes: u64) {
        panic!("stopped in the middle of the failback");
    }
}

fn write(vault: &Path, model: &mut [u8], blocks: &[usize], fill: u8) {
    let v = Vault::open(vault, "test", LockWait::Block).unwrap();
    let agent = v.agent("vm").unwrap();
    for &b in blocks {
        let data = vec![fill; 4096];
        agent.write(0, (b * BLOCK) as u64, &data, false).unwrap();
        model[b * BLOCK..b * BLOCK + 4096].copy_from_slice(&data);
    }
    agent.close().unwrap();
}

/// A vault whose VM "vm" (one disk, `orig`, its first half 3s) was protected and failed
/// over to `fo`: the vault's root, `orig`, `fo`, the model of the disk, the open vault.
fn failed_over(dir: &Path) -> (PathBuf, PathBuf, PathBuf, Vec<u8>, Vault) {
    let root = dir.join("vault");
    Vault::init(&root).unwrap();
    let orig: PathBuf = dir.join("os.raw");
    let mut model = vec![0u8; DISK];
    model[..DISK / 2].fill(3);
    std::fs::write(&orig, &model).unwrap();
    let mut v = Vault::open(&root, "test", LockWait::Block).unwrap();
    v.protect(
        &ProtectRequest {
            vm: "vm".into(),
            disks: vec![("os".into(), Some(DiskSource::Existing(orig.clone())))],
            policy: None,
            source: Default::default(),
            target: Default::default(),
            network_mapping: vec![],
            cache_capacity_bytes: None,
        },
        &mut NoProgress,
    )
    .unwrap();
    let fo = dir.join("recovery");
    v.failover(
        "vm",
        PointSpec::Latest,
        Some(&fo),
        false,
        None,
        &mut NoProgress,
    )
    .unwrap();
    (root, orig, fo, model, v)
}

#[test]
fn a_stopped_failback_is_finished_by_the_next_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, orig, _, mut model, mut v) = failed_over(tmp.path());
    v.reprotect("vm", &mut NoProgress).unwrap();
    // Reverse direction: writes far apart, so the failback has several ranges to write.
    write(&root, &mut model, &[1, 9, 20, 33, 50], 0x5a);

    let mut v = Vault::open(&root, "test", LockWait::Block).unwrap();
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v.failback("vm", PointSpec::Latest, &mut StopAfterFirstWrite)
    }));
    assert!(stopped.is_err(), "the failback was to stop half-way");
    let half = std::fs::read(&orig).unwrap();
    assert!(half != model, "the original image was to be half-written");

    // The vault knows: the point is pinned, nothing replicates or serves meanwhile.
    let mut v = Vault::open(&root, "test", LockWait::Block).unwrap();
    let fb = v.catalog().vm("vm").unwrap().failback.clone();
    assert!(fb.is_some(), "the failback under way is recorded");
    let err = v
        .agent("vm")
        .err()
        .expect("the agent must refuse")
        .to_string();
    assert!(err.contains("failback"), "{err}");
    let err = v
        .process("vm")
        .expect_err("processing must refuse")
        .to_string();
    assert!(err.contains("failback"), "{err}");

    // The next failback finishes the same point, whatever it is asked for.
    let r = v
        .failback("vm", PointSpec::LatestProcessed, &mut NoProgress)
        .unwrap();
    assert!(r.resumed);
    assert_eq!(r.point.id, fb.unwrap().point_id);
    assert!(
        std::fs::read(&orig).unwrap() == model,
        "the original image holds the point"
    );
    let rec = v.catalog().vm("vm").unwrap();
    assert!(rec.failback.is_none());
    assert_eq!(rec.state.as_str(), "failed-over");
    // And the cycle goes on: back in the original direction, nothing left to ship.
    let r = v.reprotect("vm", &mut NoProgress).unwrap();
    assert_eq!(r.shipped_bytes, 0);
}

#[test]
fn a_stopped_reprotect_is_redone_by_the_next_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, _, fo, mut model, mut v) = failed_over(tmp.path());
    // The VM runs at the recovery site.
    let rec = fo.join("os.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&rec).unwrap();
    for b in [2usize, 30, 61] {
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x77; 1000], (b * BLOCK) as u64).unwrap();
        model[b * BLOCK..b * BLOCK + 1000].fill(0x77);
    }
    drop(f);
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v.reprotect("vm", &mut StopAfterFirstWrite)
    }));
    assert!(stopped.is_err(), "the reprotect was to stop half-way");
    let mut v = Vault::open(&root, "test", LockWait::Block).unwrap();
    assert_eq!(
        v.catalog().vm("vm").unwrap().state.as_str(),
        "failed-over",
        "a stopped reprotect changed nothing the catalog says"
    );
    let r = v.reprotect("vm", &mut NoProgress).unwrap();
    // What the stopped run shipped is in the replica already: nothing left to ship.
    assert_eq!(r.shipped_bytes, 0);
    let view = v.mount("vm", PointSpec::Id(r.point.id)).unwrap();
    let mut got = vec![0u8; DISK];
    view.view.read(0, 0, &mut got).unwrap();
    assert!(
        got == model,
        "the reprotect point holds the recovery site's disk"
    );
}
