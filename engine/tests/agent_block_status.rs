//! The agent's block status: the source image's holes, with the changes not yet applied to
//! it painted over them (a pending write is data, a pending zero or trim a hole), the same
//! before and after the pending set drains into the image.

use standby_engine::agent::{Agent, SourceDisk};
use standby_engine::cache::{Cache, CacheConfig};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const K: u64 = 1024;
const M: u64 = 1024 * K;

#[test]
fn block_status_reports_source_holes_and_pending_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("os.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(16 * M).unwrap();
    // Data in the image already: [1M, 2M) and [8M, 9M).
    f.write_all_at(&vec![7u8; M as usize], M).unwrap();
    f.write_all_at(&vec![8u8; M as usize], 8 * M).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (cache, _) = Cache::open(tmp.path().join("cache"), CacheConfig::default()).unwrap();
    let agent = Agent::open(
        Arc::new(cache),
        vec![SourceDisk {
            name: "os".into(),
            path: path.clone(),
            size_bytes: 16 * M,
        }],
    )
    .unwrap();
    // Pending (not drained): a write into a hole, a zero over half of the first data
    // range, a write then a trim over the same range (the later one wins), and a trim
    // then a write (data again).
    agent
        .write(0, 4 * M, &vec![1u8; 64 * K as usize], false)
        .unwrap();
    agent.zero(0, M + 512 * K, 512 * K, false, false).unwrap();
    agent
        .write(0, 12 * M, &vec![2u8; 128 * K as usize], false)
        .unwrap();
    agent.zero(0, 12 * M, 128 * K, true, false).unwrap();
    agent.zero(0, 8 * M, 64 * K, true, false).unwrap();
    agent
        .write(0, 8 * M, &vec![3u8; 64 * K as usize], false)
        .unwrap();
    let want = vec![
        (M, true),
        (512 * K, false),
        (512 * K, true),
        (2 * M, true),
        (64 * K, false),
        (4 * M - 64 * K, true),
        (M, false),
        (7 * M, true),
    ];
    // Adjacent runs of one kind are merged.
    let merge = |v: Vec<(u64, bool)>| {
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (n, z) in v {
            match out.last_mut() {
                Some(l) if l.1 == z => l.0 += n,
                _ => out.push((n, z)),
            }
        }
        out
    };
    let want = merge(want);
    assert_eq!(agent.block_status(0, 0, 16 * M).unwrap(), want, "pending");
    // A window inside: clipped to it.
    assert_eq!(
        agent.block_status(0, M + 256 * K, 512 * K).unwrap(),
        vec![(256 * K, false), (256 * K, true)]
    );
    assert!(agent.block_status(0, 16 * M - 512, 1024).is_err());
    agent.flush().unwrap();
    assert_eq!(agent.block_status(0, 0, 16 * M).unwrap(), want, "drained");
    agent.close().unwrap();
}
