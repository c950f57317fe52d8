//! The resync after an agent was killed while it tracked writes in its dirty bitmap (the
//! bitmap died with it): the delta engine compares the source images with the replica
//! and only the blocks that differ are shipped, never every allocated block.

use standby_engine::delta::BLOCK_BYTES;
use standby_engine::runtime::flag::slot;
use standby_engine::runtime::{EmbeddedAgent, EmbeddedOptions};
use standby_engine::vault::{DiskSource, LockWait, NoProgress, PointSpec, ProtectRequest, Vault};
use standby_engine::vfs::RealFs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DISK: usize = 8 << 20;
const DATA: usize = 6 << 20;

#[test]
fn a_resync_after_the_bitmap_was_lost_ships_only_the_blocks_that_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("vault");
    Vault::init(&root).unwrap();
    let src = tmp.path().join("os.raw");
    let mut model = vec![0u8; DISK];
    for (i, b) in model[..DATA].iter_mut().enumerate() {
        *b = 1 + (i / 512 % 251) as u8;
    }
    std::fs::write(&src, &model).unwrap();
    let mut v = Vault::open(&root, "test", LockWait::Block).unwrap();
    v.protect(
        &ProtectRequest {
            vm: "vm1".into(),
            disks: vec![("os".into(), Some(DiskSource::Existing(src.clone())))],
            policy: None,
            source: Default::default(),
            target: Default::default(),
            network_mapping: vec![],
            cache_capacity_bytes: None,
        },
        &mut NoProgress,
    )
    .unwrap();

    // What bitmap mode does: writes reach the source image alone, the slot says so. Then
    // the agent is gone (its bitmap with it). Blocks changed: a partial write, a write
    // across a block boundary (two blocks), zeros over data, data in the hole, and a
    // write of the bytes the block already held (no change at all).
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let block = BLOCK_BYTES as usize;
    let same = model[40 * block..41 * block].to_vec();
    let mut put = |off: usize, data: &[u8]| {
        f.write_all_at(data, off as u64).unwrap();
        model[off..off + data.len()].copy_from_slice(data);
    };
    put(3 * block + 100, &[0xaa; 1000]);
    put(10 * block - 512, &[0xbb; 1024]);
    put(20 * block, &vec![0u8; block]);
    put(DATA + 5 * block, &[0xcc; 4096]);
    put(40 * block, &same);
    f.sync_all().unwrap();
    drop(f);
    let changed_blocks = 5u64;
    slot::prepare(&RealFs, &root.join("vms/vm1"), "source.ahead").unwrap();
    slot::put(&RealFs, &root.join("vms/vm1"), "source.ahead", true).unwrap();

    let agent = EmbeddedAgent::start(
        &root,
        "test",
        "vm1",
        EmbeddedOptions {
            listen: "127.0.0.1:0".into(),
            process_every: Duration::from_millis(50),
            events: Arc::new(|_| {}),
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.resync_pending().is_some() {
        assert!(Instant::now() < deadline, "the resync never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    let shipped = agent.resync_shipped_bytes();
    agent.run_until(&AtomicBool::new(true)).unwrap();
    assert_eq!(
        shipped,
        changed_blocks * BLOCK_BYTES,
        "shipped {shipped} bytes for {changed_blocks} changed blocks (a full resync ships {DATA})"
    );

    // The replica holds exactly the source image.
    let mut v = Vault::open(&root, "test", LockWait::Block).unwrap();
    let out = tmp.path().join("tf");
    v.failover(
        "vm1",
        PointSpec::Latest,
        Some(&out),
        true,
        None,
        &mut NoProgress,
    )
    .unwrap();
    let got = std::fs::read(out.join("os.raw")).unwrap();
    assert!(got == model, "the replica differs from the source image");
    assert_eq!(
        v.catalog().vm("vm1").unwrap().state.as_str(),
        "test-failover",
        "the resync is over"
    );
}
