//! `protect` through the I/O seam: the vault on a [`SimFs`] loses power at every sync a
//! protect makes (with and without a torn tail), and must open afterwards with either no
//! VM or a complete one — protected, its `initial` point the source image bit for bit, its
//! log and replica verifying clean. Where the cut left no VM, protecting it again works.
//!
//! Only the vault goes through the seam: the source image is a real file (the VM's disk,
//! read with `SEEK_DATA`), and the vault's locks are flocks on the real directory.

use standby_engine::replica::{Replica, ReplicaConfig};
use standby_engine::vault::{DiskSource, LockWait, NoProgress, ProtectRequest, Vault, VmState};
use standby_engine::vfs::SimFs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const DISK: usize = 256 << 10;

fn request(src: &Path) -> ProtectRequest {
    ProtectRequest {
        vm: "vm1".into(),
        disks: vec![("os".into(), Some(DiskSource::Existing(src.to_path_buf())))],
        policy: None,
        source: Default::default(),
        target: Default::default(),
        network_mapping: vec![],
        cache_capacity_bytes: None,
    }
}

/// A source image: data in its first half (non-zero blocks), a hole after.
fn source_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; DISK];
    for (i, b) in data[..DISK / 2].iter_mut().enumerate() {
        *b = 1 + (i / 512 % 251) as u8;
    }
    let path = dir.join("os.raw");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn open(fs: &SimFs, root: &Path) -> Vault {
    Vault::open_with(Arc::new(fs.clone()), root, "test", LockWait::Fail).unwrap()
}

/// Whether the VM is there; if it is, it is complete.
fn check(fs: &SimFs, root: &Path, want: &[u8], what: &str) -> bool {
    let v = open(fs, root);
    let Some(rec) = v.catalog().vms.get("vm1") else {
        return false;
    };
    assert_eq!(rec.state, VmState::Protected, "{what}");
    assert_eq!(rec.disks.len(), 1, "{what}");
    let points = v.points("vm1").unwrap();
    assert_eq!(points.len(), 1, "{what}: {points:?}");
    assert_eq!(points[0].name.as_deref(), Some("initial"), "{what}");
    let (report, _) = v.verify("vm1", None).unwrap();
    assert!(report.is_clean(), "{what}: {report:?}");
    let (replica, _) = Replica::open(
        Arc::new(fs.clone()),
        root.join("vms/vm1/replica"),
        ReplicaConfig::default(),
    )
    .unwrap();
    let mut got = vec![0u8; DISK];
    replica
        .view_point(points[0].id)
        .unwrap()
        .read(0, 0, &mut got)
        .unwrap();
    assert!(
        got == want,
        "{what}: the initial point differs from the source"
    );
    true
}

#[test]
fn a_power_cut_at_any_sync_of_protect_leaves_no_vm_or_a_complete_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, want) = source_image(tmp.path());
    let root = tmp.path().join("vault");
    let base = SimFs::new();
    Vault::init_with(&base, &root).unwrap();

    // How many syncs a whole protect makes.
    let fs = base.crash(0);
    let before = fs.sync_count();
    open(&fs, &root)
        .protect(&request(&src), &mut NoProgress)
        .unwrap();
    let syncs = fs.sync_count() - before;
    assert!(check(&fs, &root, &want, "uncut"));
    assert!(syncs > 5, "{syncs} syncs");

    let (mut absent, mut complete) = (0, 0);
    for cut in 1..=syncs {
        for torn in [0usize, 3000] {
            let what = format!("cut at sync {cut} of {syncs}, torn {torn}");
            let fs = base.crash(0);
            let mut v = open(&fs, &root);
            fs.fail_at_sync(cut);
            assert!(
                v.protect(&request(&src), &mut NoProgress).is_err(),
                "{what}"
            );
            drop(v);
            let after = fs.crash(torn);
            if check(&after, &root, &want, &what) {
                complete += 1;
            } else {
                absent += 1;
                // What the cut left behind is overwritten by the next protect.
                open(&after, &root)
                    .protect(&request(&src), &mut NoProgress)
                    .unwrap_or_else(|e| panic!("{what}: protect again: {e}"));
                assert!(check(&after, &root, &want, &what), "{what}: again");
            }
        }
    }
    // The catalog names the VM in protect's last write (its directory sync is the last
    // sync), so every cut leaves no VM: none is ever left half-protected.
    assert_eq!((absent, complete), (2 * syncs, 0));
}
