//! The cache service's relay of group barrier steps, in process: a coordinator's step
//! reaches the VM's agent (its shipper's barrier handler) and the answer comes back under
//! the coordinator's tag; an agent that declared no features is never sent a step (the
//! coordinator hears why); an agent whose service closes the link at the new open message
//! (an older build) opens the old way on its next attempt and replicates.

use parking_lot::Mutex;
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::link::service::{CacheService, ServiceConfig};
use standby_engine::link::ship::{Barrier, Shipper, ShipperConfig};
use standby_engine::link::tls::{self, Credentials, Role, Stream};
use standby_engine::link::wire::{
    self, AgentState, BarrierStep, DiskInfo, GroupAnswer, GroupStep, Msg, PeerRole,
};
use standby_engine::link::{self, auth, Security};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first test runs on TLS (the certificates' roles are checked), the second plain.
fn security(dir: &Path, role: Role) -> Security {
    Security {
        creds: Arc::new(Credentials::load(dir, role).unwrap()),
        insecure_loopback: dir.join("plain").exists(),
    }
}

fn disks() -> Vec<DiskInfo> {
    vec![DiskInfo {
        name: "os".into(),
        size_bytes: 1 << 20,
    }]
}

fn shipper(dir: &Path, addr: &str, vm: &str, barrier: Option<Barrier>) -> (Shipper, Arc<Cache>) {
    let (journal, _) =
        Cache::open(dir.join(format!("journal-{vm}")), CacheConfig::default()).unwrap();
    let journal = Arc::new(journal);
    let s = Shipper::start(
        journal.clone(),
        ShipperConfig {
            addr: addr.into(),
            security: security(&dir.join("creds"), Role::Agent),
            vm: vm.into(),
            disks: disks(),
            barrier,
        },
        AgentState::default,
        |_| {},
    );
    (s, journal)
}

fn wait_connected(s: &Shipper) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.status.connected.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the agent never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn step(tag: u64, step: BarrierStep) -> GroupStep {
    GroupStep {
        tag,
        step,
        group_point: "g/1".into(),
        hold_ms: 5000,
        app: false,
        name: "n".into(),
    }
}

/// Ask one step over a coordinator link; the answer.
fn ask(l: &mut link::Link, s: GroupStep) -> GroupAnswer {
    wire::write_msg(&mut l.writer, &Msg::GroupStep(s)).unwrap();
    match auth::expect(&mut l.reader, &mut Vec::new(), "an answer").unwrap() {
        Msg::GroupAnswer(a) => a,
        m => panic!("{}", m.name()),
    }
}

#[test]
fn the_service_relays_steps_to_an_agent_that_speaks_them_and_only_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tls::create(&dir.join("creds")).unwrap();
    let svc = CacheService::open(
        ServiceConfig {
            dir: dir.join("service"),
            capacity_bytes: None,
            security: security(&dir.join("creds"), Role::Cache),
        },
        |_| {},
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let serve = {
        let (svc, stop) = (svc.clone(), stop.clone());
        std::thread::spawn(move || svc.serve(listener, &stop).unwrap())
    };
    // The new agent answers with what it was asked, so the relay's path shows.
    let seen: Arc<Mutex<Vec<(BarrierStep, String, String)>>> = Arc::default();
    let barrier: Barrier = {
        let seen = seen.clone();
        Arc::new(move |s: &GroupStep| {
            seen.lock()
                .push((s.step, s.group_point.clone(), s.name.clone()));
            GroupAnswer {
                tag: s.tag,
                error: if s.step == BarrierStep::Release {
                    "its hold lapsed".into()
                } else {
                    String::new()
                },
                value: 40 + s.step as u64,
            }
        })
    };
    let (new, _j1) = shipper(dir, &addr, "new", Some(barrier));
    let (old, _j2) = shipper(dir, &addr, "old", None);
    wait_connected(&new);
    wait_connected(&old);
    let coord = security(&dir.join("creds"), Role::Processor);
    let mut l = link::connect(&addr, &coord, PeerRole::Coordinator, "new").unwrap();
    let a = ask(&mut l, step(7, BarrierStep::Hold));
    assert_eq!((a.tag, a.error.as_str(), a.value), (7, "", 41));
    let a = ask(&mut l, step(8, BarrierStep::Cut));
    assert_eq!((a.tag, a.value), (8, 42));
    let a = ask(&mut l, step(9, BarrierStep::Release));
    assert_eq!((a.tag, a.error.as_str()), (9, "its hold lapsed"));
    assert_eq!(
        *seen.lock(),
        vec![
            (BarrierStep::Hold, "g/1".to_string(), "n".to_string()),
            (BarrierStep::Cut, "g/1".to_string(), "n".to_string()),
            (BarrierStep::Release, "g/1".to_string(), "n".to_string()),
        ]
    );
    drop(l);
    // An agent without the feature is never sent a step.
    let mut l = link::connect(&addr, &coord, PeerRole::Coordinator, "old").unwrap();
    let a = ask(&mut l, step(1, BarrierStep::Hold));
    assert!(a.error.contains("without declaring group points"), "{a:?}");
    assert!(
        old.status.connected.load(Ordering::SeqCst),
        "its link stays up"
    );
    drop(l);
    // A VM the service does not hold is refused at the open.
    let mut l = link::connect(&addr, &coord, PeerRole::Coordinator, "nope").unwrap();
    wire::write_msg(&mut l.writer, &Msg::GroupStep(step(1, BarrierStep::Hold))).unwrap();
    let e = auth::expect(&mut l.reader, &mut Vec::new(), "an answer").unwrap_err();
    assert!(e.to_string().contains("holds no VM 'nope'"), "{e}");
    // The agent's certificate may not coordinate (it would hold other VMs' writes).
    let agent_cert = security(&dir.join("creds"), Role::Agent);
    let e = link::connect(&addr, &agent_cert, PeerRole::Coordinator, "new")
        .and_then(|mut l| {
            wire::write_msg(&mut l.writer, &Msg::GroupStep(step(1, BarrierStep::Hold)))?;
            auth::expect(&mut l.reader, &mut Vec::new(), "an answer")
        })
        .unwrap_err();
    assert!(e.to_string().contains("may not open"), "{e}");
    // Once the agent is gone, a step is answered with why.
    new.stop();
    let mut l = link::connect(&addr, &coord, PeerRole::Coordinator, "new").unwrap();
    let a = ask(&mut l, step(2, BarrierStep::Hold));
    assert!(a.error.contains("not connected"), "{a:?}");
    drop(l);
    old.stop();
    stop.store(true, Ordering::SeqCst);
    serve.join().unwrap();
}

/// A stand-in for an older cache service: it closes the link when the open message is one
/// it would not know (`open-agent-features`), and answers `open-agent` with ready. The
/// agent opens the old way after two such closes in a row.
#[test]
fn an_agent_opens_the_old_way_after_an_older_service_closed_at_the_new_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tls::create(&dir.join("creds")).unwrap();
    std::fs::write(dir.join("creds").join("plain"), b"").unwrap();
    let key = security(&dir.join("creds"), Role::Cache);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opens: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    {
        let opens = opens.clone();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let (mut r, mut w) = Stream::plain(sock).split();
                if auth::server(&mut r, &mut w, key.key(), None).is_err() {
                    continue;
                }
                match wire::read_msg(&mut r, &mut Vec::new()) {
                    Ok(Some(Msg::OpenAgentFeatures { .. })) => {
                        opens.lock().push("open-agent-features");
                        // An older build fails to decode it and drops the connection.
                    }
                    Ok(Some(Msg::OpenAgent { disks })) => {
                        opens.lock().push("open-agent");
                        wire::write_msg(
                            &mut w,
                            &Msg::Ready {
                                next_seq: 1,
                                first_seq: 1,
                                disks,
                            },
                        )
                        .unwrap();
                        // Keep the session open while the agent sends its state.
                        while let Ok(Some(_)) = wire::read_msg(&mut r, &mut Vec::new()) {}
                    }
                    _ => {}
                }
            }
        });
    }
    let barrier: Barrier = Arc::new(|s: &GroupStep| GroupAnswer {
        tag: s.tag,
        error: String::new(),
        value: 0,
    });
    let (s, _j) = shipper(dir, &addr, "vm", Some(barrier));
    wait_connected(&s);
    // Twice (a network could drop one at that moment), then the old way.
    assert_eq!(
        *opens.lock(),
        vec!["open-agent-features", "open-agent-features", "open-agent"]
    );
    s.stop();
}
