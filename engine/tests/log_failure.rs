//! The write tap when its log's disk fills up (a `SimFs` that refuses to grow files): the
//! client's writes still succeed and read back, going to the source image with their
//! blocks marked; the failure is named; reopening the log fails while the disk is still
//! full and works once it has room; the resync then ships every block, so that the log
//! holds exactly what the client wrote.

use standby_engine::agent::{Agent, SourceDisk};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::record::Op;
use standby_engine::vfs::{SimFs, Vfs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const DISK: usize = 4 << 20;

fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn open_log(vfs: &Arc<dyn Vfs>, dir: &Path) -> standby_engine::Result<Arc<Cache>> {
    let config = CacheConfig {
        segment_max_bytes: 256 << 10,
        ..CacheConfig::write_path(None)
    };
    Ok(Arc::new(Cache::open_with(vfs.clone(), dir, config)?.0))
}

/// Write `i` (somewhere in the disk, overlapping others), through the tap and the model.
fn write(agent: &Agent, model: &mut [u8], i: u64) {
    let len = 512 * (1 + (i as usize * 7) % 64);
    let offset = (i.wrapping_mul(7919) % ((DISK - len) as u64 / 512)) * 512;
    let data = payload(i, len);
    agent
        .write(0, offset, &data, i.is_multiple_of(5))
        .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
    model[offset as usize..offset as usize + len].copy_from_slice(&data);
}

#[test]
fn a_full_log_disk_never_fails_a_write_and_reopening_resyncs_every_block() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK as u64)
        .unwrap();
    let sim = SimFs::new();
    let vfs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let dir = PathBuf::from("/vault/log");
    vfs.create_dir_all(&dir).unwrap();
    let agent = Agent::open(
        open_log(&vfs, &dir).unwrap(),
        vec![SourceDisk {
            name: "os".into(),
            path: source.clone(),
            size_bytes: DISK as u64,
        }],
    )
    .unwrap();
    let mut model = vec![0u8; DISK];
    for i in 0..40 {
        write(&agent, &mut model, i);
    }
    agent.drain(true).unwrap();
    assert!(agent.log_failure().is_none());

    // The disk fills up: every write still succeeds, and reads see them all.
    sim.set_full(true);
    for i in 40..400 {
        write(&agent, &mut model, i);
    }
    agent.make_durable().unwrap();
    let cause = agent.log_failure().expect("the log's failure is named");
    assert!(cause.contains("No space left on device"), "{cause}");
    // The log latched the failure typed: a full disk, which a caller tells from damage.
    let latched = agent
        .cache()
        .failure()
        .expect("the log latched its failure");
    assert_eq!(
        latched.io_kind(),
        Some(std::io::ErrorKind::StorageFull),
        "{latched:?}"
    );
    assert!(agent.resync_pending().is_some_and(|b| b > 0));
    let mut back = vec![0u8; DISK];
    agent.read(0, 0, &mut back).unwrap();
    assert!(back == model, "reads see every acknowledged write");
    // The source image holds them (the log may never): it is on its own disk.
    assert!(std::fs::read(&source).unwrap() == model);

    // Reopening while the disk is still full fails, and changes nothing.
    let _ = agent.cache().close();
    let refused = open_log(&vfs, &dir).and_then(|log| agent.reopen_log(log));
    assert!(
        refused.is_err(),
        "the log cannot record the source's progress"
    );
    assert!(agent.log_failure().is_some());
    write(&agent, &mut model, 400);

    // Room for a moment: the log reopens, then fails again in the middle of the resync.
    // What it took of the resync was never written: those blocks are dirty again.
    sim.set_full(false);
    agent.reopen_log(open_log(&vfs, &dir).unwrap()).unwrap();
    sim.set_full(true);
    assert!(!agent.resync_step(1 << 20).unwrap());
    write(&agent, &mut model, 401);
    agent.make_durable().unwrap();
    assert!(agent.log_failure().is_some());
    let _ = agent.cache().close();

    // Room again: the reopened log (recovery ran) takes the resync of every dirty block.
    sim.set_full(false);
    let log = open_log(&vfs, &dir).unwrap();
    agent.reopen_log(log.clone()).unwrap();
    assert!(agent.log_failure().is_none());
    let mut rounds = 0;
    while !agent.resync_step(1 << 20).unwrap() {
        rounds += 1;
        assert!(rounds < 100, "the resync never ends");
    }
    assert!(agent.resync_pending().is_none());
    for i in 402..420 {
        write(&agent, &mut model, i);
    }
    agent.flush().unwrap();

    // The log now holds exactly what the client wrote: replayed over zeros, it is the model.
    let mut replayed = vec![0u8; DISK];
    let mut reader = log.reader(1).unwrap();
    while let Some(rec) = reader.next_record().unwrap() {
        match rec.op {
            Op::Write { offset, data, .. } => {
                replayed[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
            }
            Op::Zero { offset, len, .. } => {
                replayed[offset as usize..(offset + len) as usize].fill(0)
            }
            Op::Marker(_) => {}
        }
    }
    assert!(replayed == model, "the log misses acknowledged writes");
    assert!(std::fs::read(&source).unwrap() == model);
    agent.close().unwrap();
}

/// After the log failed and the VM went on writing to the source image, a restart must not
/// replay the log over those newer writes: `open_with(.., false)` (what the runtime does
/// while its `source.ahead` slot is set) keeps them, and records the source hold.
#[test]
fn a_restart_after_the_log_failed_does_not_replay_it_over_newer_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK as u64)
        .unwrap();
    let disks = || {
        vec![SourceDisk {
            name: "os".into(),
            path: source.clone(),
            size_bytes: DISK as u64,
        }]
    };
    let sim = SimFs::new();
    let vfs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let dir = PathBuf::from("/vault/log");
    vfs.create_dir_all(&dir).unwrap();
    let agent = Agent::open(open_log(&vfs, &dir).unwrap(), disks()).unwrap();
    let old = payload(1, 64 << 10);
    agent.write(0, 0, &old, true).unwrap();
    sim.set_full(true);
    let new = payload(2, 64 << 10);
    agent.write(0, 0, &new, true).unwrap();
    assert!(agent.log_failure().is_some());
    drop(agent); // killed: nothing recorded

    sim.set_full(false);
    let vfs: Arc<dyn Vfs> = Arc::new(sim.process_crash());
    let log = open_log(&vfs, &dir).unwrap();
    assert!(
        log.durable_seq() >= 1,
        "the old write is durable in the log"
    );
    let agent = Agent::open_with(log.clone(), disks(), false).unwrap();
    let mut back = vec![0u8; new.len()];
    agent.read(0, 0, &mut back).unwrap();
    assert!(
        back == new,
        "the restart replayed the log over a newer write"
    );
    assert_eq!(log.source_seq().unwrap(), Some(log.durable_seq()));
    agent.close().unwrap();
}
