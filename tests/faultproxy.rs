//! The fault proxy (tests/common/faultproxy.rs) does what it says: pass-through is
//! byte-exact over kept-alive connections and counts requests; injected errors, drops in
//! either direction, delays, a pause and a kill/restart on the same port each show on the
//! wire as a client sees them. Against a small HTTP server of the test's own (tiny_http)
//! for exact accounting, and against radosgw and Azurite with the `object_store` client,
//! whose retries must carry every PUT and GET through 503s and dropped connections with
//! not one wrong byte.

mod common;

use common::faultproxy::{FaultProxy, Faults};
use common::objstores::servers;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A key-value HTTP server: PUT stores the body, GET returns it (404 if absent).
/// Returns its address and how many requests it saw.
fn upstream() -> (String, Arc<Mutex<u64>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap().to_string();
    let seen = Arc::new(Mutex::new(0u64));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut kv: HashMap<String, Vec<u8>> = HashMap::new();
        for mut req in server.incoming_requests() {
            *seen2.lock().unwrap() += 1;
            let url = req.url().to_string();
            let resp = match req.method() {
                tiny_http::Method::Put => {
                    let mut body = Vec::new();
                    let whole = req.as_reader().read_to_end(&mut body).is_ok()
                        && Some(body.len()) == req.body_length();
                    if !whole {
                        continue; // a truncated upload stores nothing
                    }
                    kv.insert(url, body);
                    tiny_http::Response::from_data(Vec::new()).with_status_code(201)
                }
                // Large bodies chunked only when the client kept the connection alive (ureq
                // in the pass-through test: the proxy's chunked path), else by length.
                _ => match kv.get(&url) {
                    Some(b) if url.starts_with("/chunked") => {
                        tiny_http::Response::from_data(b.clone())
                    }
                    Some(b) => {
                        tiny_http::Response::from_data(b.clone()).with_chunked_threshold(usize::MAX)
                    }
                    None => tiny_http::Response::from_data(Vec::new()).with_status_code(404),
                },
            };
            let _ = req.respond(resp);
        }
    });
    (addr, seen)
}

/// One request on a fresh connection: status and body, or the I/O error a client sees.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let body = out[split + 4..].to_vec();
    if std::env::var_os("FAULTPROXY_DEBUG").is_some() {
        eprintln!("{head:?} +{} bytes", body.len());
    }
    if body.len() != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((status, body))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
        .collect()
}

#[test]
fn pass_through_is_exact_and_counted_over_kept_alive_connections() {
    let (up, seen) = upstream();
    let proxy = FaultProxy::start(&up);
    let agent = ureq::AgentBuilder::new().build();
    let big = pattern(3 << 20, 7);
    for i in 0..5 {
        let r = agent
            .put(&format!("{}/chunked{i}", proxy.url()))
            .send_bytes(&big)
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    for i in 0..5 {
        let r = agent
            .get(&format!("{}/chunked{i}", proxy.url()))
            .call()
            .unwrap();
        let mut got = Vec::new();
        r.into_reader().read_to_end(&mut got).unwrap();
        assert!(got == big, "GET obj{i} through the proxy differs");
    }
    let c = proxy.counts();
    assert_eq!((c.method("PUT"), c.method("GET"), c.requests()), (5, 5, 10));
    assert_eq!(*seen.lock().unwrap(), 10);
    assert!(c.bytes_up >= 5 * big.len() as u64 && c.bytes_down >= 5 * big.len() as u64);
    assert_eq!((c.errors_injected, c.drops_injected), (0, 0));
}

#[test]
fn injected_errors_never_reach_the_server() {
    let (up, seen) = upstream();
    let proxy = FaultProxy::start(&up);
    proxy.set(Faults {
        error_per_mille: 1000,
        error_status: 500,
        ..Faults::default()
    });
    assert_eq!(http(&proxy.addr(), "PUT", "/a", b"x").unwrap().0, 500);
    proxy.set(Faults {
        error_per_mille: 300,
        ..Faults::default()
    });
    let mut errors = 0;
    for i in 0..200 {
        match http(&proxy.addr(), "PUT", &format!("/k{i}"), b"abc")
            .unwrap()
            .0
        {
            503 => errors += 1,
            201 => {}
            s => panic!("status {s}"),
        }
    }
    // The seeded pick is deterministic, but all that matters is "some, not all".
    assert!((20..120).contains(&errors), "{errors} of 200 answered 503");
    assert_eq!(*seen.lock().unwrap(), 200 - errors);
    assert_eq!(proxy.counts().errors_injected, errors + 1);
}

#[test]
fn drops_cut_the_body_in_either_direction() {
    let (up, _) = upstream();
    let proxy = FaultProxy::start(&up);
    let body = pattern(1 << 20, 3);
    assert_eq!(http(&proxy.addr(), "PUT", "/whole", &body).unwrap().0, 201);

    // A response cut halfway: the client sees fewer bytes than Content-Length promised.
    proxy.set(Faults {
        drop_response_per_mille: 1000,
        ..Faults::default()
    });
    let e = http(&proxy.addr(), "GET", "/whole", b"").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);

    // A request cut halfway: the server never stores it.
    proxy.set(Faults {
        drop_request_per_mille: 1000,
        ..Faults::default()
    });
    assert!(http(&proxy.addr(), "PUT", "/cut", &body).is_err());
    proxy.clear();
    assert_eq!(http(&proxy.addr(), "GET", "/cut", b"").unwrap().0, 404);
    let (status, got) = http(&proxy.addr(), "GET", "/whole", b"").unwrap();
    assert!(status == 200 && got == body);
    assert_eq!(proxy.counts().drops_injected, 2);
}

#[test]
fn delay_holds_each_response() {
    let (up, _) = upstream();
    let proxy = FaultProxy::start(&up);
    proxy.set(Faults {
        delay: Duration::from_millis(300),
        ..Faults::default()
    });
    let t = Instant::now();
    assert_eq!(http(&proxy.addr(), "GET", "/none", b"").unwrap().0, 404);
    // A lower bound only: the delay is a sleep the proxy must have taken.
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn pause_holds_requests_until_resumed() {
    let (up, seen) = upstream();
    let proxy = FaultProxy::start(&up);
    proxy.pause();
    let addr = proxy.addr();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(http(&addr, "PUT", "/p", b"paused").map(|r| r.0));
    });
    // While paused nothing is answered and the server sees nothing.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    assert_eq!(*seen.lock().unwrap(), 0);
    proxy.resume();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap(),
        201
    );
    assert_eq!(*seen.lock().unwrap(), 1);
}

#[test]
fn kill_closes_everything_and_restart_listens_on_the_same_port() {
    let (up, _) = upstream();
    let mut proxy = FaultProxy::start(&up);
    let addr = proxy.addr();
    // A request in flight when the proxy dies: the client sees its connection end.
    proxy.set(Faults {
        delay: Duration::from_secs(30),
        ..Faults::default()
    });
    let a = addr.clone();
    let inflight = std::thread::spawn(move || http(&a, "GET", "/x", b""));
    std::thread::sleep(Duration::from_millis(200));
    proxy.kill();
    assert!(inflight.join().unwrap().is_err());
    assert!(
        TcpStream::connect(&addr).is_err(),
        "nothing listens after a kill"
    );
    proxy.clear();
    proxy.restart();
    assert_eq!(proxy.addr(), addr);
    assert_eq!(http(&addr, "PUT", "/after", b"1").unwrap().0, 201);
    assert_eq!(
        http(&addr, "GET", "/after", b"").unwrap(),
        (200, b"1".to_vec())
    );
}

/// The object_store client through the proxy to real servers, with 503s and drops both
/// ways on a quarter of the requests: its retries carry every request, bit-exact.
#[test]
fn object_store_retries_through_faults_against_radosgw_and_azurite() {
    use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutPayload};
    let s = servers();
    let bucket = s.fresh_bucket();
    let az = FaultProxy::start(&s.azure_addr());
    let s3 = FaultProxy::start(&s.s3_addr());
    let vars = s.vars_via(&az.addr(), &s3.addr());
    let retry = object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            base: 2.0,
        },
        max_retries: 30,
        retry_timeout: Duration::from_secs(120),
    };
    let mut azb = object_store::azure::MicrosoftAzureBuilder::new();
    let mut s3b = object_store::aws::AmazonS3Builder::new();
    for (k, v) in &vars {
        if let Ok(key) = k.to_ascii_lowercase().parse() {
            azb = azb.with_config(key, v);
        }
        if let Ok(key) = k.to_ascii_lowercase().parse() {
            s3b = s3b.with_config(key, v);
        }
    }
    let stores: Vec<(Box<dyn ObjectStore>, &FaultProxy)> = vec![
        (
            Box::new(
                azb.with_container_name(&bucket.name)
                    .with_retry(retry.clone())
                    .build()
                    .unwrap(),
            ),
            &az,
        ),
        (
            Box::new(
                s3b.with_bucket_name(&bucket.name)
                    .with_retry(retry)
                    .build()
                    .unwrap(),
            ),
            &s3,
        ),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (store, proxy) in &stores {
        proxy.set(Faults {
            error_per_mille: 100,
            drop_request_per_mille: 75,
            drop_response_per_mille: 75,
            ..Faults::default()
        });
        rt.block_on(async {
            for i in 0..12u8 {
                let data = pattern(256 << 10, i);
                let p = Path::from(format!("f/{i}"));
                store.put(&p, PutPayload::from(data.clone())).await.unwrap();
                let got = store.get(&p).await.unwrap().bytes().await.unwrap();
                assert!(got[..] == data[..], "object {i} differs after faults");
            }
        });
        let c = proxy.counts();
        assert!(
            c.errors_injected + c.drops_injected > 0,
            "no fault was injected: {c:?}"
        );
    }
}
