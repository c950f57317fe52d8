//! A group point's marker under the barrier's hold (docs/groups.md): the agent answers the
//! cut once the marker is written and makes it durable at the release, after the hold ended.
//! A write that arrives under the hold goes into the log behind the marker and is
//! acknowledged only after the release; once the release answered, a power cut keeps the
//! marker; a marker the log cannot make durable fails the release, so no group point lists it.

use standby_engine::agent::{Agent, SourceDisk};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::record::{Consistency, Marker, MarkerKind, Op};
use standby_engine::vfs::{SimFs, Vfs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const DISK: u64 = 1 << 20;

fn marker(id: &str) -> Marker {
    Marker {
        consistency: Consistency::Crash,
        name: None,
        group: Some(id.to_string()),
        kind: MarkerKind::Point,
    }
}

fn open(sim: &SimFs, tmp: &Path) -> Agent {
    let vfs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let dir = PathBuf::from("/vault/log");
    vfs.create_dir_all(&dir).unwrap();
    let source = tmp.join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let log = Cache::open_with(vfs, &dir, CacheConfig::write_path(None))
        .unwrap()
        .0;
    Agent::open(
        Arc::new(log),
        vec![SourceDisk {
            name: "os".into(),
            path: source,
            size_bytes: DISK,
        }],
    )
    .unwrap()
}

/// The records a power cut at this moment leaves in the log: (seq, group id of a marker).
fn after_power_cut(sim: &SimFs) -> Vec<(u64, Option<String>)> {
    let vfs: Arc<dyn Vfs> = Arc::new(sim.crash(0));
    let (log, _) = Cache::open_with(vfs, Path::new("/vault/log"), CacheConfig::default()).unwrap();
    let mut out = Vec::new();
    let mut r = log.reader(1).unwrap();
    while let Some(rec) = r.next_record().unwrap() {
        let group = match &rec.op {
            Op::Marker(m) => m.group.clone(),
            _ => None,
        };
        out.push((rec.seq, group));
    }
    out
}

#[test]
fn a_write_under_the_hold_waits_for_the_release_and_the_released_marker_survives_a_power_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimFs::new();
    let agent = Arc::new(open(&sim, tmp.path()));
    agent.write(0, 0, &[1u8; 4096], true).unwrap();

    assert!(agent.ack_hold().hold("g/1", Duration::from_secs(10)));
    let seq = agent.group_marker("g/1", &marker("g/1")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let agent = agent.clone();
        std::thread::spawn(move || {
            // Not FUA: its own durability does not carry the marker's.
            let s = agent.write(0, 4096, &[2u8; 4096], false).unwrap();
            tx.send(s).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write under the hold was acknowledged before the release"
    );
    assert!(agent.group_release("g/1").unwrap(), "the hold lasted");
    let records = after_power_cut(&sim);
    assert!(
        records.contains(&(seq, Some("g/1".to_string()))),
        "the marker is durable once the release answered: {records:?}"
    );
    let behind = rx.recv().unwrap();
    writer.join().unwrap();
    assert!(
        behind > seq,
        "the held write is behind the marker in the log"
    );
    assert!(!agent.group_release("g/1").unwrap(), "released once");
}

#[test]
fn a_marker_the_log_cannot_make_durable_fails_the_release() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimFs::new();
    let agent = open(&sim, tmp.path());
    agent.write(0, 0, &[1u8; 4096], true).unwrap();
    assert!(agent.ack_hold().hold("g/2", Duration::from_secs(10)));
    let seq = agent.group_marker("g/2", &marker("g/2")).unwrap();
    sim.fail_at_sync(1);
    assert!(
        agent.group_release("g/2").is_err(),
        "a release whose marker is not durable must fail the group point"
    );
    assert!(
        !after_power_cut(&sim).iter().any(|(s, _)| *s == seq),
        "the marker was not durable"
    );
    // The hold ended all the same: the VM's writes are not held.
    assert!(!agent.ack_hold().holding("g/2"));
}
