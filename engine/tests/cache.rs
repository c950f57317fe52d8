//! Behaviour of the change log: round trips, damage detection, torn tails, power cuts at
//! every sync point, kill -9 of a writer process, concurrent writers, capacity and trim.

use standby_engine::cache::{Ack, Cache, CacheConfig, RecoveryMode};
use standby_engine::record::{self, Consistency, Entry, Marker, Op, Record};
use standby_engine::vfs::{SimFs, Vfs};
use standby_engine::Error;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// Deterministic contents for record `i`: compressible for even `i`, noise for odd.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|j| {
            if i.is_multiple_of(2) {
                (i as usize + j / 64) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// The op record `i` carries in the generated workloads.
fn op_for(i: u64) -> Op {
    match i % 7 {
        3 => Op::Zero {
            disk: (i % 3) as u16,
            offset: i * 4096,
            len: 8192 * (1 + i % 5),
            trim: i.is_multiple_of(2),
        },
        5 => Op::Marker(Marker {
            consistency: if i.is_multiple_of(2) {
                Consistency::App
            } else {
                Consistency::Crash
            },
            name: (i % 4 == 1).then(|| format!("point-{i}")),
            group: None,
            kind: record::MarkerKind::Point,
        }),
        _ => Op::Write {
            disk: (i % 3) as u16,
            offset: (i % 1000) * 4096,
            data: payload(i, 512 * (1 + (i as usize * 7) % 24)),
        },
    }
}

fn small_segments() -> CacheConfig {
    CacheConfig {
        segment_max_bytes: 16 << 10,
        ..CacheConfig::default()
    }
}

fn read_all(cache: &Cache) -> Vec<Record> {
    let first = cache.stats().first_seq;
    cache.reader(first).unwrap().map(|r| r.unwrap()).collect()
}

fn ops(records: &[Record]) -> Vec<Op> {
    records.iter().map(|r| r.op.clone()).collect()
}

#[test]
fn every_record_kind_round_trips_through_the_log_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let expected: Vec<Op> = (1..=300).map(op_for).collect();
    {
        let (cache, report) = Cache::open(dir.path(), small_segments()).unwrap();
        assert_eq!(report.records, 0);
        for op in &expected {
            cache.append(&op.as_entry()).unwrap();
        }
        cache.sync().unwrap();
        let got = read_all(&cache);
        assert_eq!(ops(&got), expected);
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=300).collect::<Vec<_>>()
        );
        assert!(got.windows(2).all(|w| w[0].time_us <= w[1].time_us));
        let stats = cache.stats();
        assert!(stats.segments > 3, "small segments roll: {stats:?}");
        assert_eq!(stats.durable_seq, 300);
        assert!(stats.compression_ratio > 1.0);
        cache.close().unwrap();
    }
    let (cache, report) = Cache::open(dir.path(), small_segments()).unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.truncated.clone()),
        (1, 300, None)
    );
    assert_eq!(ops(&read_all(&cache)), expected);
    // Appending continues the sequence.
    assert_eq!(
        cache
            .append_wait(&op_for(301).as_entry(), Ack::Durable)
            .unwrap(),
        301
    );
    // A reader can start anywhere.
    let from_200: Vec<u64> = cache.reader(200).unwrap().map(|r| r.unwrap().seq).collect();
    assert_eq!(from_200, (200..=301).collect::<Vec<_>>());
}

#[test]
fn unaligned_writes_are_refused_and_take_no_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
    let data = vec![1u8; 1000];
    let err = cache
        .append(&Entry::Write {
            disk: 0,
            offset: 0,
            data: &data,
        })
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let err = cache
        .append(&Entry::Write {
            disk: 0,
            offset: 7,
            data: &data[..512],
        })
        .unwrap_err();
    assert!(err.to_string().contains("multiples of 512"), "{err}");
    assert_eq!(
        cache
            .append(&Entry::Write {
                disk: 0,
                offset: 512,
                data: &data[..512]
            })
            .unwrap(),
        1
    );
}

fn only_segment(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_torn_tail_cut_at_every_byte_of_the_last_record_recovers_the_records_before_it() {
    let src = tempfile::tempdir().unwrap();
    let n = 12u64;
    {
        let (cache, _) = Cache::open(src.path(), CacheConfig::default()).unwrap();
        for i in 1..=n {
            cache.append(&op_for(i).as_entry()).unwrap();
        }
        cache.close().unwrap();
    }
    let seg = only_segment(src.path());
    assert_eq!(seg.len(), 1);
    let bytes = std::fs::read(&seg[0]).unwrap();
    let last_frame = record::encode(&op_for(n).as_entry(), 1, n, 0, true)
        .unwrap()
        .len();
    let expected: Vec<Op> = (1..n).map(op_for).collect();
    for cut in 1..=last_frame {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(seg[0].file_name().unwrap());
        std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
        let (cache, report) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
        if cut == last_frame {
            // Cut exactly at a record boundary: a clean end, nothing to repair.
            assert_eq!(report.truncated, None);
            assert_eq!(ops(&read_all(&cache)), expected);
            continue;
        }
        let (_, offset, removed, _) = report.truncated.clone().expect("a torn tail is reported");
        assert_eq!(offset as usize, bytes.len() - last_frame, "cut {cut}");
        assert_eq!(removed as usize, last_frame - cut);
        assert_eq!(ops(&read_all(&cache)), expected, "cut {cut}");
        // The log continues right after the surviving records.
        assert_eq!(
            cache
                .append_wait(&op_for(n).as_entry(), Ack::Durable)
                .unwrap(),
            n
        );
        drop(cache);
        let (cache, report) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
        assert_eq!(report.truncated, None);
        assert_eq!(read_all(&cache).len() as u64, n);
    }
    // The strict recovery mode refuses a torn tail instead of cutting it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(seg[0].file_name().unwrap()),
        &bytes[..bytes.len() - 3],
    )
    .unwrap();
    let strict = CacheConfig {
        recovery: RecoveryMode::Absolute,
        ..CacheConfig::default()
    };
    assert!(Cache::open(dir.path(), strict)
        .map(|_| ())
        .unwrap_err()
        .is_corruption());
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
        for i in 1..=5 {
            cache.append(&op_for(i).as_entry()).unwrap();
        }
        cache.close().unwrap();
    }
    let seg = &only_segment(dir.path())[0];
    let mut bytes = std::fs::read(seg).unwrap();
    // Not zeros: zeros past the last record are space the writer prepared (the log's end).
    bytes.extend_from_slice(&[0xa5u8; 4096]);
    std::fs::write(seg, &bytes).unwrap();
    let (cache, report) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
    assert_eq!(report.truncated.unwrap().2, 4096);
    assert_eq!(read_all(&cache).len(), 5);
}

#[test]
fn a_flipped_byte_in_an_older_segment_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _) = Cache::open(dir.path(), small_segments()).unwrap();
        for i in 1..=100 {
            cache.append(&op_for(i).as_entry()).unwrap();
        }
        cache.close().unwrap();
    }
    let segs = only_segment(dir.path());
    assert!(segs.len() >= 3);
    let victim = &segs[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = 40 + 100;
    bytes[at] ^= 0x20;
    std::fs::write(victim, &bytes).unwrap();
    match Cache::open(dir.path(), small_segments()).map(|_| ()) {
        Err(Error::Corrupt { path, offset, .. }) => {
            assert_eq!(&path, victim);
            assert!(offset as usize <= at);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("damage went unnoticed"),
    }
}

#[test]
fn a_reader_reports_damage_that_appears_after_open_and_yields_no_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
    for i in 1..=20 {
        cache.append(&op_for(i).as_entry()).unwrap();
    }
    cache.sync().unwrap();
    let seg = &only_segment(dir.path())[0];
    let mut bytes = std::fs::read(seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(seg, &bytes).unwrap();
    let mut good = 0;
    let mut reader = cache.reader(1).unwrap();
    let err = loop {
        match reader.next_record() {
            Ok(Some(rec)) => {
                assert_eq!(rec.op, op_for(rec.seq));
                good += 1;
            }
            Ok(None) => panic!("damage went unnoticed"),
            Err(e) => break e,
        }
    };
    assert!(good < 20);
    match err {
        Error::Corrupt { path, offset, .. } => {
            assert_eq!(&path, seg);
            assert!(offset as usize <= at);
        }
        e => panic!("unexpected error {e}"),
    }
}

/// Run a deterministic workload against a SimFs whose power is cut at the `cut`th sync.
/// Returns the sequence numbers acknowledged durable. Mixes durable waits, written waits
/// and bare appends, with small segments so rolls happen.
fn workload_until_power_cut(fs: &SimFs, cut: u64) -> (u64, bool) {
    let config = CacheConfig {
        segment_max_bytes: 8 << 10,
        auto_sync: None,
        ..CacheConfig::default()
    };
    let dir = Path::new("/vault/cache");
    let (cache, _) = Cache::open_with(Arc::new(fs.clone()), dir, config).unwrap();
    fs.fail_at_sync(cut);
    let mut durable = 0;
    for i in 1..=60u64 {
        let ack = match i % 4 {
            0 => Ack::Durable,
            1 => Ack::Written,
            _ => Ack::Queued,
        };
        match cache.append_wait(&op_for(i).as_entry(), ack) {
            Ok(seq) => {
                assert_eq!(seq, i);
                if ack == Ack::Durable {
                    durable = seq;
                }
            }
            Err(e) => {
                assert!(matches!(e, Error::Poisoned(_)), "{e}");
                // Once failed, the log refuses everything until reopened.
                assert!(cache.append(&op_for(i).as_entry()).is_err());
                return (durable, true);
            }
        }
    }
    match cache.sync() {
        Ok(s) => (s, false),
        Err(_) => (durable, true),
    }
}

#[test]
fn a_power_cut_at_every_sync_point_loses_no_record_reported_durable() {
    let mut cut = 1;
    loop {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/vault/cache")).unwrap();
        let (durable, was_cut) = workload_until_power_cut(&fs, cut);
        for torn in [0usize, 1, 45, 4096, usize::MAX] {
            let after = fs.crash(torn);
            let (cache, _) =
                Cache::open_with(Arc::new(after), "/vault/cache", CacheConfig::default())
                    .unwrap_or_else(|e| {
                        panic!("cut at sync {cut}, torn {torn}: reopen failed: {e}")
                    });
            let got = read_all(&cache);
            assert!(
                got.len() as u64 >= durable,
                "cut at sync {cut}: {} records survive, {durable} were durable",
                got.len()
            );
            for (i, rec) in got.iter().enumerate() {
                assert_eq!(rec.seq, i as u64 + 1);
                assert_eq!(
                    rec.op,
                    op_for(rec.seq),
                    "cut {cut}: record {} differs",
                    rec.seq
                );
            }
            // And the log is usable again right after.
            let next = got.len() as u64 + 1;
            assert_eq!(
                cache
                    .append_wait(&op_for(next).as_entry(), Ack::Durable)
                    .unwrap(),
                next
            );
        }
        if !was_cut {
            assert!(cut > 10, "the workload syncs more than a few times");
            break;
        }
        cut += 1;
    }
}

#[test]
fn a_crash_of_the_process_alone_keeps_every_record_written() {
    let fs = SimFs::new();
    let dir = Path::new("/c");
    fs.create_dir_all(dir).unwrap();
    let config = CacheConfig {
        segment_max_bytes: 8 << 10,
        auto_sync: None,
        ..CacheConfig::default()
    };
    let (cache, _) = Cache::open_with(Arc::new(fs.clone()), dir, config.clone()).unwrap();
    for i in 1..=50 {
        cache
            .append_wait(&op_for(i).as_entry(), Ack::Written)
            .unwrap();
    }
    let image = fs.process_crash();
    drop(cache);
    let (cache, report) = Cache::open_with(Arc::new(image), dir, config).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(
        ops(&read_all(&cache)),
        (1..=50).map(op_for).collect::<Vec<_>>()
    );
}

#[test]
fn many_writers_keep_one_total_order_with_no_gap_and_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig {
        segment_max_bytes: 256 << 10,
        ..CacheConfig::default()
    };
    let (cache, _) = Cache::open(dir.path(), config).unwrap();
    let cache = Arc::new(cache);
    let writers = 16u16;
    let per = 400u64;
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for k in 0..per {
                    let mut data = vec![0u8; 1024];
                    data[..8].copy_from_slice(&k.to_le_bytes());
                    let ack = if k % 10 == 9 {
                        Ack::Durable
                    } else {
                        Ack::Written
                    };
                    let seq = cache
                        .append_wait(
                            &Entry::Write {
                                disk: w,
                                offset: k * 1024,
                                data: &data,
                            },
                            ack,
                        )
                        .unwrap();
                    seqs.push(seq);
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<u64> = Vec::new();
    for h in handles {
        let seqs = h.join().unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one writer's records keep their order"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=writers as u64 * per).collect::<Vec<_>>());
    cache.sync().unwrap();
    let got = read_all(&cache);
    assert_eq!(got.len() as u64, writers as u64 * per);
    let mut next_k = vec![0u64; writers as usize];
    for (i, rec) in got.iter().enumerate() {
        assert_eq!(rec.seq, i as u64 + 1);
        let Op::Write { disk, offset, data } = &rec.op else {
            panic!("unexpected {rec:?}")
        };
        let k = u64::from_le_bytes(data[..8].try_into().unwrap());
        assert_eq!(k, next_k[*disk as usize], "writer {disk} out of order");
        assert_eq!(*offset, k * 1024);
        next_k[*disk as usize] += 1;
    }
    let stats = cache.stats();
    assert!(
        stats.syncs < stats.appended_records / 10 + 50,
        "fdatasyncs are group-committed: {stats:?}"
    );
}

#[test]
fn the_capacity_limit_fails_appends_fast_and_trimming_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 256 << 10;
    let config = CacheConfig {
        segment_max_bytes: 32 << 10,
        capacity_bytes: Some(cap),
        ..CacheConfig::default()
    };
    let (cache, _) = Cache::open(dir.path(), config.clone()).unwrap();
    let data = payload(1, 4096);
    let mut last = 0;
    let err = loop {
        match cache.append(&Entry::Write {
            disk: 0,
            offset: 0,
            data: &data,
        }) {
            Ok(seq) => last = seq,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::CacheFull { .. }), "{err}");
    assert!(err.to_string().starts_with("cache full"));
    assert!(last > 40);
    cache.sync().unwrap();
    let on_disk: u64 = only_segment(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        on_disk <= cap,
        "{on_disk} bytes on disk exceed the {cap} byte limit"
    );
    assert_eq!(cache.stats().stored_bytes, on_disk);
    // The processor catches up: whole segments below the checkpoint go, appends resume.
    let before = only_segment(dir.path()).len();
    let deleted = cache.set_checkpoint(last - 1).unwrap();
    assert!(deleted > 0 && only_segment(dir.path()).len() == before - deleted);
    assert!(cache
        .append(&Entry::Write {
            disk: 0,
            offset: 0,
            data: &data
        })
        .is_ok());
    // Trimmed records are gone; the rest are still readable, in order, after a reopen.
    let first = cache.stats().first_seq;
    assert!(first > 1);
    assert!(matches!(
        cache.reader(1).map(|_| ()),
        Err(Error::NotFound(_))
    ));
    cache.close().unwrap();
    drop(cache);
    let (cache, report) = Cache::open(dir.path(), config).unwrap();
    assert_eq!(report.first_seq, first);
    assert_eq!(report.last_seq, last + 1);
    assert_eq!(cache.stats().checkpoint, last - 1);
    let got = read_all(&cache);
    assert_eq!(got.first().unwrap().seq, first);
    assert_eq!(got.last().unwrap().seq, last + 1);
}

#[test]
fn a_checkpoint_past_the_durable_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
    cache.append(&op_for(1).as_entry()).unwrap();
    assert!(matches!(cache.set_checkpoint(5), Err(Error::Invalid(_))));
}

#[test]
fn a_failed_sync_poisons_the_log_until_it_is_reopened() {
    let fs = SimFs::new();
    fs.create_dir_all(Path::new("/p")).unwrap();
    let (cache, _) = Cache::open_with(Arc::new(fs.clone()), "/p", CacheConfig::default()).unwrap();
    cache
        .append_wait(&op_for(1).as_entry(), Ack::Durable)
        .unwrap();
    fs.fail_at_sync(1);
    let err = cache
        .append_wait(&op_for(2).as_entry(), Ack::Durable)
        .unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)), "{err}");
    // The latch keeps the failure itself, typed: an I/O error on a segment, not damage.
    let latched = cache.failure().expect("the log names its failure");
    assert!(matches!(latched, Error::Io { .. }), "{latched:?}");
    assert_eq!(err.io_kind(), Some(std::io::ErrorKind::Other), "{err}");
    match cache.append(&op_for(3).as_entry()) {
        Err(Error::Poisoned(why)) => assert!(matches!(*why, Error::Io { .. }), "{why:?}"),
        other => panic!("{other:?}"),
    }
    let reopened = Cache::open_with(Arc::new(fs.crash(0)), "/p", CacheConfig::default());
    let (cache, _) = reopened.map_err(|e| e.to_string()).unwrap();
    assert_eq!(read_all(&cache).len(), 1);
}

const CHILD_DIR: &str = "STANDBY_TEST_CHILD_DIR";

/// Not a test on its own: the body of the child process killed by the next test.
#[test]
#[ignore]
fn child_appends_and_reports_written() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let config = CacheConfig {
        segment_max_bytes: 256 << 10,
        ..CacheConfig::default()
    };
    let (cache, _) = Cache::open(&dir, config).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 1.. {
        let seq = cache
            .append_wait(&op_for(i).as_entry(), Ack::Written)
            .unwrap();
        assert_eq!(seq, i);
        use std::io::Write;
        writeln!(out, "written {seq}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_of_the_writing_process_loses_no_record_reported_written() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_appends_and_reports_written",
                "--include-ignored",
                "--nocapture",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reported = 0u64;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("written ") {
                reported = n.parse().unwrap();
                if reported >= 2000 + round * 500 {
                    break;
                }
            }
        }
        // SIGKILL: no destructor, no final sync.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(reported > 0, "the child reported progress");
        let (cache, _) = Cache::open(dir.path(), CacheConfig::default()).unwrap();
        let got = read_all(&cache);
        assert!(
            got.len() as u64 >= reported,
            "round {round}: {reported} reported written, {} survive",
            got.len()
        );
        for rec in &got {
            assert_eq!(rec.op, op_for(rec.seq));
        }
        // Start the next round from a clean log so the child's numbering holds.
        drop(cache);
        for p in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(p.unwrap().path()).unwrap();
        }
    }
}

#[test]
fn a_full_log_whose_only_segment_is_below_the_checkpoint_still_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    // One big segment: the whole log is its tail, which appends alone never roll.
    let config = CacheConfig {
        segment_max_bytes: 64 << 20,
        capacity_bytes: Some(64 << 10),
        ..CacheConfig::default()
    };
    let (cache, _) = Cache::open(dir.path(), config.clone()).unwrap();
    let data = payload(1, 4096);
    let mut last = 0;
    while let Ok(seq) = cache.append(&Entry::Write {
        disk: 0,
        offset: 0,
        data: &data,
    }) {
        last = seq;
    }
    cache.sync().unwrap();
    assert_eq!(
        cache.set_checkpoint(last).unwrap(),
        1,
        "the old tail is deleted"
    );
    let seq = cache
        .append_wait(
            &Entry::Write {
                disk: 0,
                offset: 0,
                data: &data,
            },
            Ack::Durable,
        )
        .unwrap();
    assert_eq!(seq, last + 1);
    drop(cache);
    let (cache, report) = Cache::open(dir.path(), config).unwrap();
    assert_eq!((report.first_seq, report.last_seq), (last + 1, last + 1));
    assert_eq!(read_all(&cache).len(), 1);
}

#[test]
fn a_checkpoint_that_rolls_the_tail_is_durable_when_it_returns() {
    // Regression: the roll's new segment was created by the writer thread after
    // set_checkpoint returned, so a pass's syncs (and a crash test's cut) depended on timing.
    for _ in 0..20 {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/p")).unwrap();
        let (cache, _) =
            Cache::open_with(Arc::new(fs.clone()), "/p", CacheConfig::default()).unwrap();
        let mut last = 0;
        for i in 0..10 {
            last = cache.append(&op_for(i * 7).as_entry()).unwrap();
        }
        cache.sync().unwrap();
        assert_eq!(
            cache.set_checkpoint(last).unwrap(),
            1,
            "the old tail is deleted"
        );
        let after = fs.crash(0);
        let names = after.list(Path::new("/p")).unwrap();
        let segments: Vec<_> = names
            .iter()
            .filter(|n| standby_engine::segment::parse_file_name(n).is_some())
            .collect();
        assert_eq!(segments.len(), 1, "the new tail is durable: {names:?}");
        drop(cache);
        let (cache, report) = Cache::open_with(Arc::new(after), "/p", CacheConfig::default())
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(report.first_seq, last + 1);
        assert!(read_all(&cache).is_empty());
    }
}

/// Commits one at a time (4 KiB, each waited durable) into a log whose segments hold
/// `segment_max` bytes, on `fs`; returns once the writer has zero-filled space past the
/// tail (it does so while idle between commits).
fn commits_until_prepared(fs: &SimFs, dir: &Path, segment_max: u64, count: u64) -> Cache {
    let config = CacheConfig {
        segment_max_bytes: segment_max,
        ..CacheConfig::write_path(None)
    };
    let (cache, _) = Cache::open_with(Arc::new(fs.clone()), dir, config).unwrap();
    let commit = |i: u64| Op::Write {
        disk: 0,
        offset: i * 4096,
        data: payload(i | 1, 4096),
    };
    for i in 1..=count {
        cache
            .append_wait(&commit(i).as_entry(), Ack::Durable)
            .unwrap();
    }
    // The writer prepares while idle: wait for it (a condition, not a timing).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stats = cache.stats();
        assert_eq!(stats.durable_seq, count);
        let files: u64 = segment_lens(fs, dir).1.iter().sum();
        if files > stats.stored_bytes {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no space was prepared past the tail after {count} commits"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cache
}

/// Number of segments and each one's file length.
fn segment_lens(fs: &SimFs, dir: &Path) -> (u64, Vec<u64>) {
    let mut names: Vec<String> = fs
        .list(dir)
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    let lens: Vec<u64> = names
        .iter()
        .map(|n| fs.open(&dir.join(n)).unwrap().len().unwrap())
        .collect();
    (names.len() as u64, lens)
}

#[test]
fn zeros_prepared_past_the_tail_for_commits_end_the_log_after_a_crash_or_a_close() {
    let dir = Path::new("/vault/cache");
    for crash in ["process", "power", "close"] {
        let fs = SimFs::new();
        fs.create_dir_all(dir).unwrap();
        let cache = commits_until_prepared(&fs, dir, 64 << 20, 40);
        let records_end = cache.stats().stored_bytes;
        let image = match crash {
            "process" => fs.process_crash(),
            "power" => fs.crash(0),
            _ => {
                cache.close().unwrap();
                // A closed log ends at its last record: no zeros are left behind.
                assert_eq!(segment_lens(&fs, dir).1, vec![records_end], "{crash}");
                fs.clone()
            }
        };
        drop(cache);
        // Strict recovery too: zeros past the last record are no torn tail.
        let strict = CacheConfig {
            recovery: RecoveryMode::Absolute,
            ..CacheConfig::default()
        };
        let (cache, report) = Cache::open_with(Arc::new(image.clone()), dir, strict)
            .unwrap_or_else(|e| panic!("{crash}: reopen failed: {e}"));
        assert_eq!((report.last_seq, report.truncated), (40, None), "{crash}");
        assert_eq!(read_all(&cache).len(), 40, "{crash}");
        assert_eq!(segment_lens(&image, dir).1, vec![records_end], "{crash}");
        // And appending goes on where the records end.
        assert_eq!(
            cache
                .append_wait(&op_for(41).as_entry(), Ack::Durable)
                .unwrap(),
            41
        );
    }
}

#[test]
fn a_sealed_segment_ends_at_its_last_record_when_space_was_prepared_in_it() {
    let fs = SimFs::new();
    let dir = Path::new("/vault/cache");
    fs.create_dir_all(dir).unwrap();
    // Segments of 256 KiB: the writer prepares up to their end, and 200 commits roll a few.
    let cache = commits_until_prepared(&fs, dir, 256 << 10, 200);
    let (segments, lens) = segment_lens(&fs, dir);
    assert!(segments >= 3, "{lens:?}");
    for (i, len) in lens.iter().enumerate().take(lens.len() - 1) {
        let f = fs
            .open(&dir.join(format!("{:016x}.log", i as u64 + 1)))
            .unwrap();
        let mut crc = [0u8; 4];
        f.read_full_at(&mut crc, len - 4).unwrap();
        assert_ne!(
            crc,
            [0; 4],
            "sealed segment {} ends in zeros ({lens:?})",
            i + 1
        );
    }
    drop(cache);
    let strict = CacheConfig {
        recovery: RecoveryMode::Absolute,
        ..CacheConfig::default()
    };
    let (cache, report) = Cache::open_with(Arc::new(fs.process_crash()), dir, strict).unwrap();
    assert_eq!((report.last_seq, report.truncated), (200, None));
    assert_eq!(read_all(&cache).len(), 200);
}
