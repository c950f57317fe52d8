//! The change log in a container (engine/src/link/objlog.rs), against Azurite and radosgw
//! through the fault proxy: the agent's shipper turns its journal into segment objects and
//! the target's puller turns them back into a staging log, with 503s, dropped uploads and
//! downloads, and a kill of the proxy (the store vanishing mid-shipping) and a restart of
//! the shipper along the way. Every record arrives once, in order, bit-exact against a
//! model of what was appended; the journal is trimmed only up to what the store holds; the
//! puller's trim marker and deletions leave nothing it holds durably in the store.

mod common;

use common::faultproxy::{FaultProxy, Faults};
use common::objstores::{servers, Bucket};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::link::objlog::{self, ObjShipper};
use standby_engine::link::wire::DiskInfo;
use standby_engine::objstore::{Store, StoreUrl};
use standby_engine::record::{Entry, Op};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 64 << 20;

/// A Store on `url` whose endpoints are the proxies'. The Store reads its configuration
/// from the environment at connect time only: the tests of this file connect under a lock.
fn connect(url: &str, vars: &[(String, String)]) -> Store {
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    Store::connect(&StoreUrl::parse(url).unwrap()).unwrap()
}

fn disks() -> Vec<DiskInfo> {
    vec![DiskInfo {
        name: "os".into(),
        size_bytes: DISK_BYTES,
    }]
}

/// Append `n` writes (of 8..72 KiB, incompressible, at varying offsets) to `journal`,
/// recording each in `model`; returns the last seq, durable.
fn append(journal: &Cache, model: &mut Vec<(u64, Vec<u8>)>, n: usize) -> u64 {
    let mut x = 0x9e37_79b9u64 ^ model.len() as u64;
    let mut last = 0;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 8192 + (x % 64) as usize * 1024;
        let offset = (x >> 20) % (DISK_BYTES - len as u64) / 512 * 512;
        let data: Vec<u8> = (0..len)
            .map(|i| (x.wrapping_add(i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8)
            .collect();
        last = journal
            .append(&Entry::Write {
                disk: 0,
                offset,
                data: &data,
            })
            .unwrap();
        model.push((offset, data));
    }
    journal.wait_durable(last).unwrap();
    last
}

fn flow(bucket: &Bucket, scheme: &str) {
    let s = servers();
    let (az, s3) = (
        FaultProxy::start(&s.azure_addr()),
        FaultProxy::start(&s.s3_addr()),
    );
    let mut proxy = if scheme == "az" { az } else { s3 };
    let vars = if scheme == "az" {
        s.vars_via(&proxy.addr(), &s.s3_addr())
    } else {
        s.vars_via(&s.azure_addr(), &proxy.addr())
    };
    let url = if scheme == "az" {
        bucket.az_url("site")
    } else {
        bucket.s3_url("site")
    };
    let store = connect(&url, &vars);
    let tmp = tempfile::tempdir().unwrap();
    let (journal, _) = Cache::open(tmp.path().join("journal"), CacheConfig::default()).unwrap();
    let journal = Arc::new(journal);
    let mut model = Vec::new();

    proxy.set(Faults {
        error_per_mille: 100,
        drop_request_per_mille: 50,
        drop_response_per_mille: 50,
        ..Faults::default()
    });
    let shipper = ObjShipper::start(journal.clone(), connect(&url, &vars), "vm".into(), |_| {});
    let half = append(&journal, &mut model, 150);
    // The store vanishes mid-shipping (as a killed proxy process would) and comes back.
    std::thread::sleep(Duration::from_millis(300));
    proxy.kill();
    let more = append(&journal, &mut model, 50);
    assert!(
        journal.stats().checkpoint <= objlog::stored_end(&connect(&url, &s.vars), "vm").unwrap(),
        "the journal was trimmed past what the store holds"
    );
    std::thread::sleep(Duration::from_millis(500));
    proxy.restart();
    assert!(
        shipper.wait_acked(more, Duration::from_secs(120)),
        "shipping stalled"
    );
    assert!(more > half);
    // A new shipper (the agent restarted) resumes after what the store holds.
    drop(shipper);
    let last = append(&journal, &mut model, 100);
    let shipper = ObjShipper::start(journal.clone(), connect(&url, &vars), "vm".into(), |_| {});
    assert!(
        shipper.wait_acked(last, Duration::from_secs(120)),
        "shipping stalled"
    );
    drop(shipper);
    assert_eq!(
        journal.stats().checkpoint,
        last,
        "the journal keeps what is stored"
    );
    let c = proxy.counts();
    assert!(c.errors_injected > 0 && c.drops_injected > 0, "{c:?}");

    // The target pulls through faults too; a failed pass is simply run again (as the
    // processor's loop does), and resumes after its staging log's end.
    let (staging, _) = Cache::open(tmp.path().join("staging"), CacheConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut errors = 0;
    loop {
        match objlog::pull_pass(&store, "vm", &staging, &disks()) {
            Ok(r) if r.durable_seq == last => break,
            Ok(_) => {}
            Err(_) => errors += 1,
        }
        assert!(
            Instant::now() < deadline,
            "pulling stalled ({errors} failed passes)"
        );
    }
    proxy.clear();
    // Once more without faults: the marker is written and the store emptied of segments.
    let r = objlog::pull_pass(&store, "vm", &staging, &disks()).unwrap();
    assert_eq!((r.records, r.durable_seq), (0, last));
    assert_eq!(objlog::read_trim(&store, "vm").unwrap(), last);
    assert!(objlog::segments(&store, "vm").unwrap().is_empty());

    // Every record once, in order, bit-exact.
    let mut reader = staging.reader(1).unwrap();
    let mut i = 0usize;
    while let Some(rec) = reader.next_record().unwrap() {
        let Some((offset, data)) = model.get(i) else {
            panic!("more records than were appended")
        };
        assert_eq!(rec.seq, i as u64 + 1);
        match rec.op {
            Op::Write {
                disk: 0,
                offset: o,
                data: d,
            } => assert!(o == *offset && d == *data, "record {} differs", rec.seq),
            op => panic!("record {} is {op:?}", rec.seq),
        }
        i += 1;
    }
    assert_eq!(i, model.len());
}

#[test]
fn journal_to_objects_to_staging_through_faults_azure() {
    let b = servers().fresh_bucket();
    flow(&b, "az");
}

#[test]
fn journal_to_objects_to_staging_through_faults_s3() {
    let b = servers().fresh_bucket();
    flow(&b, "s3");
}

#[test]
fn a_damaged_segment_is_refused_with_its_name() {
    let s = servers();
    let b = s.fresh_bucket();
    let url = b.s3_url("dmg");
    let store = connect(&url, &s.vars);
    let key = objlog::segment_key("vm", 1, 1);
    store
        .put(&key, vec![7u8; 64], &standby_engine::objstore::Cond::Any)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (staging, _) = Cache::open(tmp.path().join("staging"), CacheConfig::default()).unwrap();
    let e = objlog::pull_pass(&store, "vm", &staging, &disks()).unwrap_err();
    assert_eq!(
        staging.next_seq(),
        1,
        "nothing applied from a damaged segment"
    );
    assert!(e.to_string().contains(&key), "names the object: {e}");
}
