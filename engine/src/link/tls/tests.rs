//! Tests of the link credentials and streams.

use super::*;
use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::thread;

fn vault(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    create(&dir).unwrap();
    dir
}

/// Connect a client with `client` credentials to a server with `server` credentials;
/// both results.
fn connect(server: &Credentials, client: &Credentials) -> (Result<Stream>, Result<Stream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server.server_config().unwrap();
    let srv = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Stream::accept_tls(sock, config)
    });
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let c = Stream::connect_tls(sock, client);
    (srv.join().unwrap(), c)
}

fn link_err(r: Result<Stream>) -> String {
    match r {
        Err(Error::Link(m)) => m.to_string(),
        other => panic!("expected a link error, got {other:?}"),
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn create_then_load_every_role() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let mut keys = Vec::new();
    for role in Role::ALL {
        let c = Credentials::load(&dir, role).unwrap();
        assert_eq!(c.role(), role);
        keys.push(*c.link_key());
        assert_eq!(mode(&dir.join(role.key_file())), 0o600);
    }
    assert!(keys.iter().all(|k| k == &keys[0]));
    assert_ne!(keys[0], [0u8; 32]);
    for secret in [CA_KEY, LINK_KEY] {
        assert_eq!(mode(&dir.join(secret)), 0o600);
    }
    let text = fs::read_to_string(dir.join(LINK_KEY)).unwrap();
    assert_eq!(text.len(), 65);
    assert_eq!(text, format!("{}\n", to_hex(&keys[0])));
    assert!(matches!(create(&dir), Err(Error::Conflict(_))));
    // Configs match roles.
    let cache = Credentials::load(&dir, Role::Cache).unwrap();
    cache.server_config().unwrap();
    assert!(cache.client_config().is_err());
    let agent = Credentials::load(&dir, Role::Agent).unwrap();
    agent.client_config().unwrap();
    assert!(agent.server_config().is_err());
}

#[test]
fn load_names_the_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    fs::write(dir.join(LINK_KEY), "abcd\n").unwrap();
    match Credentials::load(&dir, Role::Agent) {
        Err(Error::Invalid(m)) => {
            assert!(m.contains("link.key: expected 64 hex characters"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    fs::write(dir.join(LINK_KEY), format!("{}\n", "g".repeat(64))).unwrap();
    assert!(matches!(
        Credentials::load(&dir, Role::Agent),
        Err(Error::Invalid(_))
    ));
    fs::write(dir.join(LINK_KEY), "AB".repeat(32)).unwrap();
    assert_eq!(
        Credentials::load(&dir, Role::Agent).unwrap().link_key(),
        &[0xab; 32]
    );

    fs::remove_file(dir.join("agent.pem")).unwrap();
    match Credentials::load(&dir, Role::Agent) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("agent.pem")),
        other => panic!("{other:?}"),
    }
    fs::write(dir.join("agent.pem"), "not a certificate\n").unwrap();
    match Credentials::load(&dir, Role::Agent) {
        Err(Error::Invalid(m)) => assert!(m.contains("agent.pem"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The processor's certificate with the agent's key.
    fs::copy(dir.join("processor.pem"), dir.join("agent.pem")).unwrap();
    match Credentials::load(&dir, Role::Agent) {
        Err(Error::Invalid(m)) => assert!(m.contains("is not the key of"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn export_source_copies_exactly_what_the_source_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let out = tmp.path().join("export/source");
    export_source(&dir, &out).unwrap();
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = SOURCE_FILES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
    assert!(!out.join(CA_KEY).exists());
    for name in SOURCE_FILES {
        assert_eq!(
            fs::read(out.join(name)).unwrap(),
            fs::read(dir.join(name)).unwrap()
        );
        let want_mode = if is_secret(name) { 0o600 } else { 0o644 };
        assert_eq!(mode(&out.join(name)), want_mode, "{name}");
    }
    Credentials::load(&out, Role::Cache).unwrap();
    Credentials::load(&out, Role::Agent).unwrap();
    assert!(Credentials::load(&out, Role::Processor).is_err());
    // Without the CA key, the source site cannot issue certificates.
    assert!(issue(
        &out,
        Role::Agent,
        OffsetDateTime::now_utc(),
        OffsetDateTime::now_utc() + time::Duration::days(1),
        &out
    )
    .is_err());
}

/// Pseudo-random bytes, so a reordered or repeated chunk would be noticed.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Echo 8 MiB through a TLS link, with both ends' halves on separate threads; with
/// `key_updates`, the client updates keys every MiB or so while the server is echoing
/// (its reader sees the request, its writer sends the answer).
fn duplex_round_trip(key_updates: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let cache = Credentials::load(&dir, Role::Cache).unwrap();
    let agent = Credentials::load(&dir, Role::Agent).unwrap();
    let (srv, cli) = connect(&cache, &agent);
    let (srv, cli) = (srv.unwrap(), cli.unwrap());
    assert!(srv.is_tls() && cli.is_tls());
    let binding = cli.channel_binding().unwrap();
    assert_eq!(srv.channel_binding(), Some(binding));

    // Server: echo, with its reader and writer on two threads.
    let (mut sr, mut sw) = srv.split();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let echo_reader = thread::spawn(move || {
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = sr.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            tx.send(buf[..n].to_vec()).unwrap();
        }
    });
    let echo_writer = thread::spawn(move || {
        for chunk in rx {
            sw.write_all(&chunk).unwrap();
            sw.flush().unwrap();
        }
        sw.finish().unwrap();
    });

    // Client: one thread writes 8 MiB in uneven pieces while this one reads it back.
    let data = Arc::new(pattern(8 << 20));
    let (mut cr, mut cw) = cli.split();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        let mut at = 0;
        let mut step = 1;
        let mut next_update = 1 << 20;
        while at < sent.len() {
            let n = step.min(sent.len() - at);
            cw.write_all(&sent[at..at + n]).unwrap();
            if step % 3 == 0 {
                cw.flush().unwrap();
            }
            at += n;
            step = (step * 7 + 13) % 700_000 + 1;
            if key_updates && at >= next_update {
                cw.request_key_update().unwrap();
                next_update += 1 << 20;
            }
        }
        cw.finish().unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = cr.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap();
    echo_reader.join().unwrap();
    echo_writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == *data, "echoed bytes differ");
}

#[test]
fn tls_duplex_round_trip() {
    duplex_round_trip(false);
}

#[test]
fn tls_duplex_round_trip_with_key_updates() {
    duplex_round_trip(true);
}

#[test]
fn corrupt_record_fails_both_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let cache = Credentials::load(&dir, Role::Cache).unwrap();
    let agent = Credentials::load(&dir, Role::Agent).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = cache.server_config().unwrap();
    let srv = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (mut r, _w) = Stream::accept_tls(sock, config).unwrap().split();
        // The bad record fails this read, and its alert goes out through the reader.
        let e = r.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    });
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = sock.try_clone().unwrap();
    let (mut r, _w) = Stream::connect_tls(sock, &agent).unwrap().split();
    // An application-data record whose tag cannot verify.
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    record.extend_from_slice(&[0x5a; 0x40]);
    raw.write_all(&record).unwrap();
    let e = r.read(&mut [0u8; 16]).unwrap_err();
    assert!(
        e.to_string().contains("the cache service aborted TLS"),
        "{e}"
    );
    srv.join().unwrap();
}

#[test]
fn plain_stream_round_trip_and_shutdown_wakes_reader() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut s = Stream::plain(sock);
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        s.flush().unwrap();
        // Wait until the client shuts down.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    });
    let s = Stream::plain(TcpStream::connect(addr).unwrap());
    assert!(!s.is_tls());
    assert_eq!(s.channel_binding(), None);
    assert_eq!(s.peer_addr(), Some(addr));
    let (mut r, mut w) = s.split();
    w.write_all(b"hello").unwrap();
    w.flush().unwrap();
    let mut buf = [0u8; 5];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    let blocked = thread::spawn(move || r.read(&mut [0u8; 8]).map_err(|e| e.kind()));
    thread::sleep(Duration::from_millis(50));
    w.shutdown();
    assert_eq!(blocked.join().unwrap(), Ok(0));
    srv.join().unwrap();
}

#[test]
fn foreign_client_certificate_is_refused_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = vault(tmp.path(), "ours");
    let theirs = vault(tmp.path(), "theirs");
    let cache = Credentials::load(&ours, Role::Cache).unwrap();

    // Another vault's agent: it trusts another CA, so it refuses our server first.
    let foreign = Credentials::load(&theirs, Role::Agent).unwrap();
    let (srv, cli) = connect(&cache, &foreign);
    let c = link_err(cli);
    assert!(c.contains("not signed by this vault's CA"), "{c}");
    let s = link_err(srv);
    assert!(s.contains("refused our certificate"), "{s}");

    // Our CA, but another vault's agent certificate: our server refuses it.
    let mixed = tmp.path().join("mixed");
    fs::create_dir(&mixed).unwrap();
    for (from, name) in [
        (&ours, CA_CERT),
        (&ours, LINK_KEY),
        (&theirs, "agent.pem"),
        (&theirs, "agent.key"),
    ] {
        fs::copy(from.join(name), mixed.join(name)).unwrap();
    }
    let mixed = Credentials::load(&mixed, Role::Agent).unwrap();
    let (srv, cli) = connect(&cache, &mixed);
    let s = link_err(srv);
    assert!(
        s.contains("client certificate not signed by this vault's CA"),
        "{s}"
    );
    let c = link_err(cli);
    assert!(c.contains("refused our certificate"), "{c}");
}

#[test]
fn foreign_server_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = vault(tmp.path(), "ours");
    let theirs = vault(tmp.path(), "theirs");
    let foreign = Credentials::load(&theirs, Role::Cache).unwrap();
    let agent = Credentials::load(&ours, Role::Agent).unwrap();
    let (srv, cli) = connect(&foreign, &agent);
    let c = link_err(cli);
    assert!(c.contains("not signed by this vault's CA"), "{c}");
    let s = link_err(srv);
    assert!(s.contains("refused our certificate"), "{s}");
}

#[test]
fn expired_client_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let old = tmp.path().join("old");
    let now = OffsetDateTime::now_utc();
    issue(
        &dir,
        Role::Agent,
        now - time::Duration::days(10),
        now - time::Duration::days(1),
        &old,
    )
    .unwrap();
    fs::copy(dir.join(CA_CERT), old.join(CA_CERT)).unwrap();
    fs::copy(dir.join(LINK_KEY), old.join(LINK_KEY)).unwrap();
    let cache = Credentials::load(&dir, Role::Cache).unwrap();
    let expired = Credentials::load(&old, Role::Agent).unwrap();
    let (srv, cli) = connect(&cache, &expired);
    let s = link_err(srv);
    assert!(s.contains("client certificate has expired"), "{s}");
    let c = link_err(cli);
    assert!(c.contains("expired"), "{c}");
}

#[test]
fn issued_certificate_rotates_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let before = fs::read(dir.join("processor.pem")).unwrap();
    let now = OffsetDateTime::now_utc();
    issue(
        &dir,
        Role::Processor,
        now - time::Duration::hours(1),
        now + time::Duration::days(30),
        &dir,
    )
    .unwrap();
    assert_ne!(fs::read(dir.join("processor.pem")).unwrap(), before);
    assert_eq!(mode(&dir.join("processor.key")), 0o600);
    let cache = Credentials::load(&dir, Role::Cache).unwrap();
    let processor = Credentials::load(&dir, Role::Processor).unwrap();
    let (srv, cli) = connect(&cache, &processor);
    let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
    cli.write_all(b"ping").unwrap();
    cli.flush().unwrap();
    let mut buf = [0u8; 4];
    srv.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    assert!(issue(&dir, Role::Agent, now, now, &dir).is_err());
}

#[test]
fn cache_certificate_cannot_act_as_client() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    // Dress the cache service's certificate up as the agent's.
    let fake = tmp.path().join("fake");
    fs::create_dir(&fake).unwrap();
    for (from, to) in [
        (CA_CERT, CA_CERT),
        (LINK_KEY, LINK_KEY),
        ("cache.pem", "agent.pem"),
        ("cache.key", "agent.key"),
    ] {
        fs::copy(dir.join(from), fake.join(to)).unwrap();
    }
    let cache = Credentials::load(&dir, Role::Cache).unwrap();
    let fake = Credentials::load(&fake, Role::Agent).unwrap();
    let (srv, cli) = connect(&cache, &fake);
    let s = link_err(srv);
    assert!(s.contains("not a client certificate"), "{s}");
    link_err(cli);
}

#[test]
fn plaintext_peer_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let agent = Credentials::load(&dir, Role::Agent).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A plaintext server answers in plaintext and hangs up.
    let srv = thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        assert!(peek_is_tls(&sock, Duration::from_secs(10)).unwrap());
        sock.write_all(b"STBYLINK plaintext only\n").unwrap();
        let _ = sock.shutdown(Shutdown::Write);
        let _ = sock.read_to_end(&mut Vec::new());
    });
    let sock = TcpStream::connect(addr).unwrap();
    let c = link_err(Stream::connect_tls(sock, &agent));
    assert!(c.contains("did not answer with TLS"), "{c}");
    srv.join().unwrap();
}

#[test]
fn peek_tells_tls_from_plaintext() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut plain = TcpStream::connect(addr).unwrap();
    let (plain_srv, _) = listener.accept().unwrap();
    plain.write_all(b"STBYLINK").unwrap();
    assert!(!peek_is_tls(&plain_srv, Duration::from_secs(10)).unwrap());
    // Peeking does not consume.
    let mut buf = [0u8; 8];
    (&plain_srv).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"STBYLINK");
    drop(plain);
    assert!(!peek_is_tls(&plain_srv, Duration::from_secs(10)).unwrap());

    let tmp = tempfile::tempdir().unwrap();
    let dir = vault(tmp.path(), "creds");
    let agent = Credentials::load(&dir, Role::Agent).unwrap();
    let client = thread::spawn(move || {
        let sock = TcpStream::connect(addr).unwrap();
        let _ = Stream::connect_tls(sock, &agent);
    });
    let (tls_srv, _) = listener.accept().unwrap();
    assert!(peek_is_tls(&tls_srv, Duration::from_secs(10)).unwrap());
    drop(tls_srv);
    client.join().unwrap();

    // Nothing sent: times out.
    let _idle = TcpStream::connect(addr).unwrap();
    let (idle_srv, _) = listener.accept().unwrap();
    assert!(peek_is_tls(&idle_srv, Duration::from_millis(20)).is_err());
}
