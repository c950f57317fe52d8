//! The split deployment: `standby cache serve` (source site), `standby agent VM --cache`
//! (source site, in the VM's write path), and the link commands. The target site's side
//! (`protect --cache`, `process --follow`) lives with the other vault commands.

use crate::output;
use standby_engine::agent::{Agent, SourceDisk};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::link::service::{CacheService, ServiceConfig};
use standby_engine::link::ship::{Shipper, ShipperConfig};
use standby_engine::link::tls::{Credentials, Role};
use standby_engine::link::wire::{AgentState, DiskInfo};
use standby_engine::link::Security;
use standby_engine::record::{Consistency, Marker};
use standby_engine::vault::lock::{self, LockWait};
use standby_engine::Error;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{serve_disks, stop_flag, DRAIN_EVERY, RESYNC_STEP_BYTES, SOURCE_SYNC_EVERY};

/// Set (and synced) before the agent first writes around its journal; removed when the
/// resync that follows is done. Its presence at start-up means the dirty bitmap was lost.
const RESYNC_FLAG: &str = "resync.required";
/// Set once the agent's first run has begun its initial copy.
const INITIALIZED: &str = "initialized";
/// The running agent's control socket, in its journal directory.
const SOCKET: &str = "agent.sock";

/// `standby point VM --journal DIR`: ask the running agent to write a marker; returns its
/// sequence number once it is durable in the journal.
pub fn marker(journal: &Path, vm: &str, app: bool, name: Option<&str>) -> Result<u64, Error> {
    let sock = journal.join(SOCKET);
    let req = serde_json::json!({"op": "point", "vm": vm, "app": app, "name": name});
    match crate::agent::ask(&sock, &req) {
        Some(reply) => Ok(reply?["seq"].as_u64().unwrap_or(0)),
        None => Err(Error::NotFound(format!(
            "no agent is running with its journal in {} (no {})",
            journal.display(),
            sock.display()
        ))),
    }
}

/// Answer one control request: `{"op":"point","vm":..,"app":bool,"name":..}`.
fn control(conn: std::os::unix::net::UnixStream, agent: &Agent, vm: &str) {
    use std::io::{BufRead, BufReader};
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let reply = match BufReader::new(&conn).read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(req) if req["op"] == "point" && req["vm"] == vm => {
                let marker = Marker {
                    consistency: if req["app"].as_bool() == Some(true) {
                        Consistency::App
                    } else {
                        Consistency::Crash
                    },
                    name: req["name"].as_str().map(str::to_string),
                    group: None,
                    kind: standby_engine::record::MarkerKind::Point,
                };
                match agent.marker(&marker) {
                    Ok(seq) => serde_json::json!({"ok": true, "seq": seq}),
                    Err(e) => serde_json::json!({"ok": false, "error": output::one_line(&e)}),
                }
            }
            Ok(req) if req["op"] == "point" => serde_json::json!({
                "ok": false,
                "error": format!("this agent serves VM '{vm}', not {}", req["vm"]),
            }),
            Ok(_) => serde_json::json!({"ok": false, "error": "unknown control request"}),
            Err(e) => {
                serde_json::json!({"ok": false, "error": format!("malformed control request: {e}")})
            }
        },
        Err(e) => {
            serde_json::json!({"ok": false, "error": format!("cannot read the control request: {e}")})
        }
    };
    let mut w = &conn;
    let _ = writeln!(w, "{reply}");
}

fn security(creds: &Path, role: Role, insecure_loopback: bool) -> Result<Security, Error> {
    Ok(Security {
        creds: Arc::new(Credentials::load(creds, role)?),
        insecure_loopback,
    })
}

fn log(line: &str) {
    eprintln!("standby: {line}");
}

pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub creds: PathBuf,
    pub insecure_loopback: bool,
    pub capacity: Option<u64>,
}

/// `standby cache serve`.
pub fn serve(o: ServeOptions) -> Result<(), Error> {
    let security = security(&o.creds, Role::Cache, o.insecure_loopback)?;
    let addr = standby_engine::link::resolve(&o.listen, &security)?;
    let svc = CacheService::open(
        ServiceConfig {
            dir: o.dir.clone(),
            capacity_bytes: o.capacity,
            security,
        },
        log,
    )?;
    let listener = TcpListener::bind(addr)
        .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", o.listen)))?;
    let stop = stop_flag()?;
    println!(
        "cache service on {} ({}), directory {}, pid {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        if o.insecure_loopback {
            "plain TCP, loopback only"
        } else {
            "TLS"
        },
        o.dir.display(),
        std::process::id()
    );
    let names = svc.vm_names();
    if !names.is_empty() {
        println!("  holding the logs of {}", names.join(", "));
    }
    let _ = std::io::stdout().flush();
    svc.serve(listener, &stop)?;
    svc.close()?;
    eprintln!("standby: cache service stopped cleanly");
    Ok(())
}

pub struct AgentOptions {
    pub vm: String,
    pub cache: String,
    pub creds: PathBuf,
    pub insecure_loopback: bool,
    pub journal: PathBuf,
    pub journal_capacity: Option<u64>,
    pub disks: Vec<(String, PathBuf)>,
    pub listen: String,
}

/// `standby agent VM --cache ADDR`: serve the VM's disks over NBD through the write tap,
/// journal every write locally, ship the journal to the cache service.
pub fn agent(o: AgentOptions) -> Result<(), Error> {
    standby_engine::vault::check_name("VM", &o.vm)?;
    if o.disks.is_empty() {
        return Err(Error::Invalid(
            "the agent needs at least one --disk NAME=PATH".into(),
        ));
    }
    let security = security(&o.creds, Role::Agent, o.insecure_loopback)?;
    standby_engine::link::resolve(&o.cache, &security)?;
    std::fs::create_dir_all(&o.journal).map_err(|e| Error::io(&o.journal, e))?;
    let _lock = lock::acquire(&o.journal, &format!("agent {}", o.vm), LockWait::Fail)?;
    let mut disks = Vec::new();
    for (name, path) in &o.disks {
        standby_engine::vault::check_name("disk", name)?;
        if disks.iter().any(|d: &SourceDisk| &d.name == name) {
            return Err(Error::Invalid(format!("disk '{name}' is named twice")));
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() || meta.len() == 0 || meta.len() % 512 != 0 {
            return Err(Error::Invalid(format!(
                "{} is not a raw image whose size is a non-zero multiple of 512 bytes",
                path.display()
            )));
        }
        disks.push(SourceDisk {
            name: name.clone(),
            path: std::path::absolute(path).map_err(|e| Error::io(path, e))?,
            size_bytes: meta.len(),
        });
    }
    let infos: Vec<DiskInfo> = disks
        .iter()
        .map(|d| DiskInfo {
            name: d.name.clone(),
            size_bytes: d.size_bytes,
        })
        .collect();
    let (journal, report) = Cache::open(
        o.journal.join("log"),
        CacheConfig::with_capacity(o.journal_capacity),
    )?;
    if let Some((file, offset, n, why)) = &report.truncated {
        log(&format!(
            "journal: cut a torn tail of {n} bytes at byte {offset} of {} ({why})",
            file.display()
        ));
    }
    let journal = Arc::new(journal);
    let agent = Arc::new(Agent::open(journal.clone(), disks)?);
    let flag = o.journal.join(RESYNC_FLAG);
    {
        let flag = flag.clone();
        agent.on_bitmap(move || set_flag(&flag));
    }
    let first_run = !o.journal.join(INITIALIZED).exists();
    if first_run {
        log(&format!(
            "{}: first run: shipping every allocated block (initial replication)",
            o.vm
        ));
        agent.require_full_resync()?;
        set_flag(&o.journal.join(INITIALIZED))?;
    } else if flag.exists() {
        log(&format!(
            "{}: the dirty bitmap of an earlier run was lost with it; shipping every allocated block again",
            o.vm
        ));
        agent.require_full_resync()?;
    }
    let mut server = serve_disks(&agent, &o.listen)?;
    let addr = server.local_addr();
    let stop = stop_flag()?;
    let shipper = {
        let (agent, journal) = (agent.clone(), journal.clone());
        Shipper::start(
            journal.clone(),
            ShipperConfig {
                addr: o.cache.clone(),
                security,
                vm: o.vm.clone(),
                disks: infos,
            },
            move || {
                let st = journal.stats();
                AgentState {
                    resync_bytes: agent.resync_pending().unwrap_or(0),
                    bitmap_mode: agent.resync_pending().is_some(),
                    journal_bytes: st.stored_bytes,
                    journal_seq: st.next_seq - 1,
                }
            },
            log,
        )
    };
    println!(
        "agent for {} serving NBD on {addr}, shipping to {} (pid {})",
        o.vm,
        o.cache,
        std::process::id()
    );
    for d in agent.disks() {
        println!("  nbd://{addr}/{}", d.name);
    }
    let _ = std::io::stdout().flush();
    let sock_path = o.journal.join(SOCKET);
    let _ = std::fs::remove_file(&sock_path); // stale: we hold the journal's lock
    let listener =
        std::os::unix::net::UnixListener::bind(&sock_path).map_err(|e| Error::io(&sock_path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(&sock_path, e))?;
    let worker = {
        let (agent, flag, stop, vm) = (agent.clone(), flag.clone(), stop.clone(), o.vm.clone());
        std::thread::spawn(move || {
            let r = background(&agent, &flag, &stop, &vm);
            stop.store(true, Ordering::SeqCst);
            r
        })
    };
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => control(conn, &agent, &o.vm),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = std::fs::remove_file(&sock_path);
    let result = worker.join().unwrap_or(Ok(()));
    // Clean shutdown: no new requests, everything durable and in the source images, and
    // shipped if the cache service can be reached soon.
    server.stop();
    agent.flush()?;
    let last = journal.durable_seq();
    if !shipper.wait_acked(last, Duration::from_secs(10)) {
        log(&format!(
            "{}: the cache service has not acknowledged everything; the journal keeps it for the next run",
            o.vm
        ));
    }
    shipper.stop();
    let agent = Arc::try_unwrap(agent)
        .map_err(|_| Error::Invalid("agent still in use at shutdown".into()))?;
    agent.close()?;
    eprintln!("standby: agent for {} stopped cleanly", o.vm);
    result
}

/// Create `path` durably (file and directory synced).
fn set_flag(path: &Path) -> Result<(), Error> {
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn background(agent: &Agent, flag: &Path, stop: &AtomicBool, vm: &str) -> Result<(), Error> {
    let mut last_sync = Instant::now();
    let mut resyncing = agent.resync_pending().is_some();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(DRAIN_EVERY);
        if let Some(bytes) = agent.resync_pending() {
            if !resyncing {
                log(&format!(
                    "{vm}: the journal is full (the cache service is unreachable or full); tracking writes in the dirty bitmap ({bytes} bytes so far)"
                ));
                resyncing = true;
            }
            if agent.resync_step(RESYNC_STEP_BYTES)? {
                // Everything is in the journal again: the flag can go.
                std::fs::remove_file(flag).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(Error::io(flag, e))
                    }
                })?;
                sync_parent(flag)?;
                resyncing = false;
                log(&format!(
                    "{vm}: resync finished; replicating through the journal again"
                ));
            }
        }
        let persist = last_sync.elapsed() >= SOURCE_SYNC_EVERY;
        if let Err(e) = agent.drain(persist) {
            log(&format!("agent: {}", output::one_line(&e)));
            return Err(e);
        }
        if persist {
            last_sync = Instant::now();
        }
    }
    Ok(())
}
