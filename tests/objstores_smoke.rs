//! The object-store fixture works: `tests/fixtures/objstores.sh` brings up Azurite and
//! radosgw, and the environment it exports is all the `object_store` crate needs to PUT,
//! GET (whole and ranged), list and DELETE in a fresh container and bucket of each. Each
//! test takes its own bucket, and every test of the binary shares one pair of servers.

mod common;

use common::objstores::{servers, Bucket};
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client of Azurite for `bucket`, configured only from the fixture's exports.
fn azure(bucket: &Bucket) -> Arc<dyn ObjectStore> {
    let mut b = object_store::azure::MicrosoftAzureBuilder::new();
    for (k, v) in &servers().vars {
        if let Ok(key) = k.to_ascii_lowercase().parse() {
            b = b.with_config(key, v);
        }
    }
    Arc::new(b.with_container_name(&bucket.name).build().unwrap())
}

/// A client of radosgw for `bucket`, configured only from the fixture's exports.
fn s3(bucket: &Bucket) -> Arc<dyn ObjectStore> {
    let mut b = object_store::aws::AmazonS3Builder::new();
    for (k, v) in &servers().vars {
        if let Ok(key) = k.to_ascii_lowercase().parse() {
            b = b.with_config(key, v);
        }
    }
    Arc::new(b.with_bucket_name(&bucket.name).build().unwrap())
}

/// Bytes that differ at every offset (a shifted or truncated read cannot match).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn round_trip(store: Arc<dyn ObjectStore>, seed: u32) {
    let rt = runtime();
    rt.block_on(async {
        let big = pattern(5 << 20, seed);
        let small = pattern(1000, seed + 1);
        let a = Path::from("vm/seg/00000001");
        let b = Path::from("vm/seg/00000002");
        store.put(&a, PutPayload::from(big.clone())).await.unwrap();
        store
            .put(&b, PutPayload::from(small.clone()))
            .await
            .unwrap();

        let got = store.get(&a).await.unwrap().bytes().await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got[..] == big[..], "whole GET differs");
        let range = store.get_range(&a, 1_000_003..3_000_001).await.unwrap();
        assert!(range[..] == big[1_000_003..3_000_001], "ranged GET differs");
        let got = store.get(&b).await.unwrap().bytes().await.unwrap();
        assert!(got[..] == small[..]);

        let listed = store
            .list_with_delimiter(Some(&Path::from("vm/seg")))
            .await
            .unwrap();
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .map(|m| m.location.to_string())
            .collect();
        names.sort();
        assert_eq!(names, vec!["vm/seg/00000001", "vm/seg/00000002"]);

        store.delete(&a).await.unwrap();
        match store.get(&a).await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => panic!("GET after DELETE: {:?}", other.map(|r| r.meta)),
        }
    });
}

#[test]
fn azurite_put_get_list_delete() {
    let bucket = servers().fresh_bucket();
    round_trip(azure(&bucket), 1);
}

#[test]
fn radosgw_put_get_list_delete() {
    let bucket = servers().fresh_bucket();
    round_trip(s3(&bucket), 2);
}

#[test]
fn fresh_buckets_are_apart() {
    let (one, two) = (servers().fresh_bucket(), servers().fresh_bucket());
    assert_ne!(one.name, two.name);
    let rt = runtime();
    rt.block_on(async {
        for (x, y) in [(azure(&one), azure(&two)), (s3(&one), s3(&two))] {
            x.put(&Path::from("k"), PutPayload::from_static(b"one"))
                .await
                .unwrap();
            assert!(matches!(
                y.get(&Path::from("k")).await,
                Err(object_store::Error::NotFound { .. })
            ));
        }
    });
}
