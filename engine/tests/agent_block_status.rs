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

/// On a fragmented image an answer covers a prefix (a bounded number of the image's data
/// ranges), and a client that asks again from the end of each answer, as qemu does, still
/// sees every range, with the pending changes painted over them.
#[test]
fn block_status_of_a_fragmented_image_answers_prefixes_that_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("os.raw");
    let size = 32 * M;
    let block = 64 * K;
    let blocks = size / block;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    // Every other block holds data: 256 data ranges.
    let mut model: Vec<bool> = (0..blocks).map(|b| b % 2 == 0).collect();
    for b in (0..blocks).step_by(2) {
        f.write_all_at(&vec![9u8; block as usize], b * block)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let (cache, _) = Cache::open(tmp.path().join("cache"), CacheConfig::default()).unwrap();
    let agent = Agent::open(
        Arc::new(cache),
        vec![SourceDisk {
            name: "os".into(),
            path: path.clone(),
            size_bytes: size,
        }],
    )
    .unwrap();
    // Pending, not drained: a write into a late hole and a trim of an early data block.
    agent
        .write(0, 401 * block, &vec![1u8; block as usize], false)
        .unwrap();
    model[401] = true;
    agent.zero(0, 10 * block, block, true, false).unwrap();
    model[10] = false;
    let mut seen: Vec<bool> = Vec::new();
    let mut at = 0u64;
    let mut answers = 0;
    while at < size {
        let runs = agent.block_status(0, at, size - at).unwrap();
        let covered: u64 = runs.iter().map(|r| r.0).sum();
        assert!(
            covered > 0 && at + covered <= size,
            "answer at {at}: {runs:?}"
        );
        for (n, zero) in runs {
            assert_eq!(n % block, 0, "runs end on the image's block boundaries");
            seen.extend(std::iter::repeat_n(!zero, (n / block) as usize));
        }
        at += covered;
        answers += 1;
    }
    assert_eq!(seen, model);
    assert!(
        answers > 1,
        "the first answer covered the whole fragmented image"
    );
    agent.close().unwrap();
}
