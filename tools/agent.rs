//! `standby agent VM`: the mobility agent of the embedded default. It serves each disk of
//! the VM over NBD through the engine's write tap, keeps the source images caught up,
//! processes the log into the replica as the policy says (all parts in one process over
//! the local vault), and answers control requests (`point`, `status`, `points`) on a Unix
//! socket in the VM's directory, so those commands go through it while it runs.
//!
//! Control protocol: one JSON request per connection, one JSON reply line:
//! `{"op":"point","app":true,"name":"x"}`, `{"op":"status"}`, `{"op":"points"}`;
//! replies are `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use crate::output;
use serde_json::{json, Value};
use standby_engine::agent::{Agent, AgentDisk};
use standby_engine::nbd::{BlockDevice, ExportList, Server, ServerConfig};
use standby_engine::process::Processor;
use standby_engine::record::{Consistency, Marker};
use standby_engine::vault::{Vault, VmState};
use standby_engine::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often durable writes are applied to the source images (page cache only).
pub(crate) const DRAIN_EVERY: Duration = Duration::from_millis(5);
/// Most bytes of dirty blocks shipped per background round.
pub(crate) const RESYNC_STEP_BYTES: u64 = 32 << 20;
/// How often the source images are synced and the log told how far they are.
pub(crate) const SOURCE_SYNC_EVERY: Duration = Duration::from_secs(1);

pub struct Options {
    pub listen: String,
    pub process_every: Duration,
}

pub fn run(vault: Vault, vm: &str, opts: Options) -> Result<(), Error> {
    let handle = vault.agent(vm)?;
    let processor = Arc::new(Mutex::new(vault.processor_for(vm, &handle)?));
    let (agent, guard) = handle.into_parts();
    let agent = Arc::new(agent);
    let mut server = serve_disks(&agent, &opts.listen)?;
    let addr = server.local_addr();
    let stop = stop_flag()?;
    let sock_path = vault.agent_socket(vm);
    let _ = std::fs::remove_file(&sock_path); // stale: we hold the VM's lock
    let listener = UnixListener::bind(&sock_path).map_err(|e| Error::io(&sock_path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(&sock_path, e))?;
    println!(
        "agent for {vm} serving NBD on {addr} (pid {})",
        std::process::id()
    );
    for d in agent.disks() {
        println!("  nbd://{addr}/{}", d.name);
    }
    let _ = std::io::stdout().flush();

    if vault.catalog().vm(vm)?.state == VmState::ResyncRequired {
        // The dirty bitmap of an earlier run was lost with it: resync every allocated block.
        eprintln!("standby: {vm} needs a resync; shipping every allocated block again");
        agent.require_full_resync()?;
    }
    let vault = Arc::new(Mutex::new(vault));
    let worker = {
        let (agent, processor, stop, vault, vm) = (
            agent.clone(),
            processor.clone(),
            stop.clone(),
            vault.clone(),
            vm.to_string(),
        );
        std::thread::spawn(move || {
            background(&agent, &processor, &stop, &vault, &vm, opts.process_every)
        })
    };
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => control(conn, &vault, vm, &agent, &processor),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
        if worker.is_finished() {
            break;
        }
    }
    // Clean shutdown: no new requests, everything durable, the last changes processed.
    server.stop();
    let _ = std::fs::remove_file(&sock_path);
    stop.store(true, Ordering::SeqCst);
    let background_result = worker.join().unwrap_or(Ok(()));
    agent.flush()?;
    {
        let mut p = processor
            .lock()
            .map_err(|_| Error::Invalid("processor poisoned".into()))?;
        p.run_pass()?;
    }
    drop(processor);
    let agent = Arc::try_unwrap(agent)
        .map_err(|_| Error::Invalid("agent still in use at shutdown".into()))?;
    agent.close()?;
    drop(guard);
    eprintln!("standby: agent for {vm} stopped cleanly");
    background_result
}

/// Serve each disk of `agent` over NBD on `listen`, through the write tap.
pub(crate) fn serve_disks(agent: &Arc<Agent>, listen: &str) -> Result<Server, Error> {
    let mut exports: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for (i, d) in agent.disks().enumerate() {
        exports.push((
            d.name.clone(),
            Arc::new(AgentDisk::new(agent.clone(), i as u16)?),
        ));
    }
    Server::start(
        listen,
        Arc::new(ExportList(exports)),
        ServerConfig::default(),
    )
    .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))
}

/// A flag set by Ctrl-C or SIGTERM.
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .map_err(|e| Error::Invalid(format!("cannot install the signal handler: {e}")))?;
    Ok(stop)
}

fn background(
    agent: &standby_engine::agent::Agent,
    processor: &Mutex<Processor>,
    stop: &AtomicBool,
    vault: &Mutex<Vault>,
    vm: &str,
    process_every: Duration,
) -> Result<(), Error> {
    let mut last_sync = Instant::now();
    let mut last_pass = Instant::now();
    let mut flagged = vault
        .lock()
        .map(|v| {
            v.catalog()
                .vm(vm)
                .map(|r| r.state == VmState::ResyncRequired)
                .unwrap_or(false)
        })
        .unwrap_or(false);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(DRAIN_EVERY);
        // The log was full: say so, and ship the dirty blocks as soon as it takes them.
        if let Some(bytes) = agent.resync_pending() {
            let mut v = vault
                .lock()
                .map_err(|_| Error::Invalid("vault poisoned".into()))?;
            if !flagged {
                eprintln!(
                    "standby: {vm}: the change log is full; tracking writes in the dirty bitmap"
                );
                v.set_resync(
                    vm,
                    Some(format!(
                        "the change log was full; {bytes} bytes of blocks to resync"
                    )),
                )?;
                flagged = true;
            }
            drop(v);
            if agent.resync_step(RESYNC_STEP_BYTES)? {
                vault
                    .lock()
                    .map_err(|_| Error::Invalid("vault poisoned".into()))?
                    .set_resync(vm, None)?;
                flagged = false;
                eprintln!("standby: {vm}: resync finished; replicating through the log again");
            }
        } else if flagged {
            vault
                .lock()
                .map_err(|_| Error::Invalid("vault poisoned".into()))?
                .set_resync(vm, None)?;
            flagged = false;
        }
        let persist = last_sync.elapsed() >= SOURCE_SYNC_EVERY;
        if let Err(e) = agent.drain(persist) {
            eprintln!("standby: agent: {}", output::one_line(&e));
            stop.store(true, Ordering::SeqCst);
            return Err(e);
        }
        if persist {
            last_sync = Instant::now();
        }
        if last_pass.elapsed() >= process_every {
            last_pass = Instant::now();
            let mut p = processor
                .lock()
                .map_err(|_| Error::Invalid("processor poisoned".into()))?;
            match p.run_pass() {
                Ok(r) if !r.points.is_empty() => {
                    for pt in &r.points {
                        eprintln!(
                            "standby: {vm}: point {} ({}) at seq {}",
                            pt.id,
                            output::kind(pt.kind),
                            pt.seq
                        );
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("standby: {vm}: processing: {}", output::one_line(&e)),
            }
        }
    }
    Ok(())
}

fn control(
    conn: UnixStream,
    vault: &Mutex<Vault>,
    vm: &str,
    agent: &standby_engine::agent::Agent,
    processor: &Mutex<Processor>,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    let reply = match reader.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, vault, vm, agent, processor)
                .unwrap_or_else(|e| json!({"ok": false, "error": output::one_line(&e)})),
            Err(e) => json!({"ok": false, "error": format!("malformed control request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("cannot read the control request: {e}")}),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{reply}");
}

fn handle(
    req: &Value,
    vault: &Mutex<Vault>,
    vm: &str,
    agent: &standby_engine::agent::Agent,
    processor: &Mutex<Processor>,
) -> Result<Value, Error> {
    let lock = || {
        processor
            .lock()
            .map_err(|_| Error::Invalid("processor poisoned".into()))
    };
    match req["op"].as_str() {
        Some("point") => {
            let m = Marker {
                consistency: if req["app"].as_bool() == Some(true) {
                    Consistency::App
                } else {
                    Consistency::Crash
                },
                name: req["name"].as_str().map(str::to_string),
                group: None,
                kind: standby_engine::record::MarkerKind::Point,
            };
            let seq = agent.marker(&m)?;
            let mut p = lock()?;
            let report = p.run_pass()?;
            let pt = report
                .points
                .into_iter()
                .find(|pt| pt.seq == seq)
                .or_else(|| p.replica().points().into_iter().find(|pt| pt.seq == seq))
                .ok_or_else(|| Error::Invalid(format!("the marker at seq {seq} cut no point")))?;
            Ok(json!({"ok": true, "point": output::point_json(&pt, None)}))
        }
        Some("status") => {
            let p = lock()?;
            let v_guard = vault
                .lock()
                .map_err(|_| Error::Invalid("vault poisoned".into()))?;
            let st = v_guard.status_of(vm, agent.cache(), p.replica())?;
            let mut v = output::status_json(&st);
            v["agent_pid"] = json!(std::process::id());
            v["resync_bytes"] = json!(agent.resync_pending());
            Ok(json!({"ok": true, "status": v}))
        }
        Some("points") => {
            let p = lock()?;
            let pts: Vec<Value> = p
                .replica()
                .points_with_bytes()
                .iter()
                .map(|(pt, b)| output::point_json(pt, Some(*b)))
                .collect();
            Ok(json!({"ok": true, "points": pts}))
        }
        _ => Err(Error::Invalid(format!("unknown control request {req}"))),
    }
}

/// Send a control request to the running agent of a VM, if there is one.
pub fn ask(socket: &Path, req: &Value) -> Option<Result<Value, Error>> {
    let conn = UnixStream::connect(socket).ok()?;
    Some((|| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(600)));
        let mut w = &conn;
        writeln!(w, "{req}").map_err(|e| Error::io(socket, e))?;
        let mut line = String::new();
        BufReader::new(&conn)
            .read_line(&mut line)
            .map_err(|e| Error::io(socket, e))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| Error::Invalid(format!("bad reply from the agent: {e}")))?;
        if v["ok"].as_bool() == Some(true) {
            Ok(v)
        } else {
            Err(Error::Agent(
                v["error"]
                    .as_str()
                    .unwrap_or("the agent refused")
                    .to_string(),
            ))
        }
    })())
}
