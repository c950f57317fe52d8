//! The source site's agent: serves a VM's disks over NBD through the write tap over a local
//! journal, ships the journal to the cache service, and answers `marker` requests (points
//! cut at the source) on a control socket in the journal directory.
//!
//! State files in the journal directory, written through the Vfs ([`super::flag`]):
//! `resync.required` is durable before the first write bypasses the journal (the dirty
//! bitmap lives in memory: if the process dies, every allocated block is shipped again on
//! the next start); `initialized` once the first run's initial copy began; the slot
//! `source.ahead` (set in place, so even on a full disk) while the source images may hold
//! writes the journal lacks: a restart then replays nothing and resyncs every block.
//!
//! A journal that fails (its disk is full, an I/O error) is answered like a full one: the
//! writes go to the source images, marked in the dirty bitmap; the drain loop reopens the
//! journal with backoff, restarts the shipper over it, and the resync follows.

use super::control::{ControlServer, Handler, Reply, Request};
use super::{flag, Backoff, ClientActivity, Event, Events, DRAIN_EVERY, RESYNC_STEP_BYTES};
use crate::agent::{Agent, SourceDisk};
use crate::cache::{Cache, CacheConfig};
use crate::error::{Error, Result};
use crate::link::ship::{Shipper, ShipperConfig};
use crate::link::wire::{AgentState, DiskInfo};
use crate::link::Security;
use crate::nbd::Server;
use crate::record::{Consistency, Marker};
use crate::util::lock::{self, LockWait, VaultLock};
use crate::vfs::{RealFs, Vfs};
use parking_lot::{Mutex, RwLock};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Set before the agent first writes around its journal; cleared when the resync that
/// follows is done.
pub const RESYNC_FLAG: &str = "resync.required";
/// A slot ([`flag::slot`]) set while the source images may be ahead of the journal.
pub const SOURCE_AHEAD: &str = "source.ahead";
/// Set once the agent's first run has begun its initial copy.
pub const INITIALIZED: &str = "initialized";
/// Set from a seeded first run (a two-site reprotect) until its resync is done: a restart
/// meanwhile resyncs every block of the disks, holes too (the target's replica may hold
/// data where the image has none).
pub const SEED_PENDING: &str = "seed.pending";
/// The running agent's control socket, in its journal directory.
pub const SOCKET: &str = "agent.sock";

/// Settings of a source-site agent.
pub struct SourceOptions {
    pub vm: String,
    /// The cache service's address.
    pub cache: String,
    pub security: Security,
    pub journal: PathBuf,
    pub journal_capacity: Option<u64>,
    /// Source disks: name and raw image.
    pub disks: Vec<(String, PathBuf)>,
    pub listen: String,
    pub events: Events,
    /// The first run takes its seed from the cache service (left there by a two-site
    /// `reprotect`): the journal continues the vault's numbering and only the blocks whose
    /// hashes differ from the target's replica are shipped.
    pub seeded: bool,
}

/// A running source-site agent.
pub struct SourceAgent {
    vm: String,
    agent: Arc<Agent>,
    server: Server,
    /// The shipper of the journal in use (restarted over the journal when it is reopened
    /// after a failure).
    shipper: Arc<Mutex<Option<Shipper>>>,
    control: Option<ControlServer>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<()>>>,
    events: Events,
    /// Closed (set) before the tap is taken apart at shutdown: a [`SourceProbe`] reads
    /// only under its read lock, so it never holds the tap when shutdown needs it alone.
    probe_gate: Arc<RwLock<bool>>,
    _lock: VaultLock,
}

/// A source-site agent's figures for monitoring, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct SourceReport {
    /// The link to the cache service is up.
    pub connected: bool,
    /// Records and bytes in the journal the cache service has not acknowledged durable.
    pub unacked_records: u64,
    pub unacked_bytes: u64,
    /// The journal's size on disk and its limit.
    pub journal_bytes: u64,
    pub journal_capacity_bytes: Option<u64>,
    /// Bytes of dirty blocks still to ship, while the agent tracks writes in its bitmap.
    pub resync_pending_bytes: Option<u64>,
}

/// Reads a running source-site agent's figures from another thread without keeping the
/// agent alive: once it has begun to shut down, [`SourceProbe::report`] says `None`.
#[derive(Clone)]
pub struct SourceProbe {
    agent: Weak<Agent>,
    shipper: Weak<Mutex<Option<Shipper>>>,
    gate: Arc<RwLock<bool>>,
}

impl SourceProbe {
    pub fn report(&self) -> Option<SourceReport> {
        let closed = self.gate.read();
        if *closed {
            return None;
        }
        let agent = self.agent.upgrade()?;
        let journal = agent.cache();
        let st = journal.stats();
        let (unacked_records, unacked_bytes) = journal.backlog(st.checkpoint);
        let connected = self.shipper.upgrade().is_some_and(|s| {
            s.lock()
                .as_ref()
                .is_some_and(|s| s.status.connected.load(Ordering::SeqCst))
        });
        Some(SourceReport {
            connected,
            unacked_records,
            unacked_bytes,
            journal_bytes: st.stored_bytes,
            journal_capacity_bytes: st.capacity_bytes,
            resync_pending_bytes: agent.resync_pending(),
        })
    }
}

struct Markers {
    agent: Arc<Agent>,
}

impl Handler for Markers {
    fn handle(&self, req: Request, answer: &mut dyn FnMut(Result<Reply>), _: &UnixStream) {
        answer(match req {
            Request::Marker { app, name } => {
                let marker = Marker {
                    consistency: if app {
                        Consistency::App
                    } else {
                        Consistency::Crash
                    },
                    name,
                    group: None,
                    kind: crate::record::MarkerKind::Point,
                };
                self.agent
                    .marker(&marker)
                    .map(|seq| Reply::Point { point: None, seq })
            }
            _ => Err(Error::Invalid(
                "a source-site agent answers marker requests only; ask the target's vault for the rest".into(),
            )),
        })
    }
}

impl SourceAgent {
    pub fn start(o: SourceOptions) -> Result<SourceAgent> {
        Self::start_with(Arc::new(RealFs), o)
    }

    /// Start with the given filesystem for the agent's state files.
    pub fn start_with(vfs: Arc<dyn Vfs>, o: SourceOptions) -> Result<SourceAgent> {
        crate::util::names::check_name("VM", &o.vm)?;
        if o.disks.is_empty() {
            return Err(Error::Invalid(
                "the agent needs at least one --disk NAME=PATH".into(),
            ));
        }
        crate::link::resolve(&o.cache, &o.security)?;
        std::fs::create_dir_all(&o.journal).map_err(|e| Error::io(&o.journal, e))?;
        let lock = lock::acquire(&o.journal, &format!("agent {}", o.vm), LockWait::Fail)?;
        let mut disks = Vec::new();
        for (name, path) in &o.disks {
            crate::util::names::check_name("disk", name)?;
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
        let first_run = !flag::is_set(&*vfs, &o.journal, INITIALIZED)?;
        let seed = match o.seeded && first_run {
            true => Some(fetch_seed(&o, &infos)?),
            false => None,
        };
        let (journal, report) = open_journal(&vfs, &o, seed.as_ref())?;
        if let Some((file, offset, n, why)) = &report.truncated {
            (o.events)(Event::Notice(format!(
                "journal: cut a torn tail of {n} bytes at byte {offset} of {} ({why})",
                file.display()
            )));
        }
        let journal = Arc::new(journal);
        // Set while the source images may hold writes the journal lacks (it failed): a
        // restart must not replay the journal over them, and must resync every block.
        let ahead = flag::slot::get(&*vfs, &o.journal, SOURCE_AHEAD)?;
        let agent = Arc::new(Agent::open_with(journal.clone(), disks, !ahead)?);
        flag::slot::prepare(&*vfs, &o.journal, SOURCE_AHEAD)?;
        {
            let (vfs, dir) = (vfs.clone(), o.journal.clone());
            agent.on_bitmap(move |entering| {
                // The slot flips in place (works on a full disk); the flag file may not
                // be creatable then, and the write goes on all the same if the journal
                // failed: the slot says what a restart needs.
                flag::slot::put(&*vfs, &dir, SOURCE_AHEAD, entering)?;
                match entering {
                    true => flag::set(&*vfs, &dir, RESYNC_FLAG),
                    false => Ok(()), // cleared by the drain loop
                }
            });
        }
        if let Some(seed) = &seed {
            let mut marks = Vec::new();
            let (mut changed, mut compared) = (0, 0);
            for (i, (image, hashes)) in agent.source_images()?.iter().zip(&seed.hashes).enumerate()
            {
                let d = crate::delta::compare_with_hashes(image, hashes)?;
                changed += d.changed_bytes();
                compared += d.compared_bytes;
                marks.extend(d.changed.iter().map(|&(off, len)| (i as u16, off, len)));
            }
            (o.events)(Event::Notice(format!(
                "{}: seeded first run (reprotect): {changed} bytes of blocks differ from the target's replica ({compared} bytes compared by hash), shipping those",
                o.vm
            )));
            flag::set(&*vfs, &o.journal, SEED_PENDING)?;
            agent.require_resync_of(&marks)?;
            flag::set(&*vfs, &o.journal, INITIALIZED)?;
        } else if flag::is_set(&*vfs, &o.journal, SEED_PENDING)? {
            (o.events)(Event::Notice(format!(
                "{}: the seeded resync of an earlier run did not finish; shipping every block again",
                o.vm
            )));
            let whole: Vec<(u16, u64, u64)> = (0..infos.len())
                .map(|i| (i as u16, 0, infos[i].size_bytes))
                .collect();
            agent.require_resync_of(&whole)?;
        } else if first_run {
            (o.events)(Event::Notice(format!(
                "{}: first run: shipping every allocated block (initial replication)",
                o.vm
            )));
            agent.require_full_resync()?;
            flag::set(&*vfs, &o.journal, INITIALIZED)?;
        } else if ahead || flag::is_set(&*vfs, &o.journal, RESYNC_FLAG)? {
            (o.events)(Event::Notice(format!(
                "{}: the dirty bitmap of an earlier run was lost with it; shipping every allocated block again",
                o.vm
            )));
            agent.require_full_resync()?;
        }
        let server = super::serve_disks(&agent, &o.listen)?;
        let make_shipper: Arc<dyn Fn(Arc<Cache>) -> Shipper + Send + Sync> = {
            let (agent, events) = (agent.clone(), o.events.clone());
            let (addr, security, vm) = (o.cache.clone(), o.security.clone(), o.vm.clone());
            Arc::new(move |journal: Arc<Cache>| {
                let (agent, events) = (agent.clone(), events.clone());
                // The hold of a group point's barrier the cache service relays: the same
                // tap as the client's writes, so it holds their acknowledgements.
                let barrier: crate::link::ship::Barrier = {
                    let (agent, vm) = (Arc::downgrade(&agent), vm.clone());
                    Arc::new(move |step| match agent.upgrade() {
                        Some(a) => super::group::answer_step(&a, &vm, step),
                        None => crate::link::wire::GroupAnswer {
                            tag: step.tag,
                            error: format!("the agent of VM '{vm}' is stopping"),
                            value: 0,
                        },
                    })
                };
                Shipper::start(
                    journal,
                    ShipperConfig {
                        addr: addr.clone(),
                        security: security.clone(),
                        vm: vm.clone(),
                        disks: infos.clone(),
                        barrier: Some(barrier),
                    },
                    move || {
                        let st = agent.cache().stats();
                        AgentState {
                            resync_bytes: agent.resync_pending().unwrap_or(0),
                            bitmap_mode: agent.resync_pending().is_some(),
                            // Beyond the checkpoint: what the cache service has not
                            // acknowledged as durable (the journal keeps a little more
                            // until its segments are trimmed).
                            journal_bytes: agent.cache().backlog(st.checkpoint).1,
                            journal_seq: st.next_seq - 1,
                        }
                    },
                    move |line: &str| events(Event::Notice(line.to_string())),
                )
            })
        };
        let shipper = Arc::new(Mutex::new(Some(make_shipper(journal.clone()))));
        // Reopen the failed journal (recovery runs), swap it into the tap and ship it.
        let reopen: Box<dyn Fn() -> Result<()> + Send> = {
            let (agent, shipper, vfs) = (agent.clone(), shipper.clone(), vfs.clone());
            let (dir, capacity) = (o.journal.join("log"), o.journal_capacity);
            Box::new(move || {
                if let Some(s) = shipper.lock().take() {
                    s.stop();
                }
                // The failed journal's writer stops first: a log's files have one writer.
                let _ = agent.cache().close();
                let (journal, _) =
                    Cache::open_with(vfs.clone(), &dir, CacheConfig::write_path(capacity))?;
                let journal = Arc::new(journal);
                agent.reopen_log(journal.clone())?;
                *shipper.lock() = Some(make_shipper(journal));
                Ok(())
            })
        };
        let control = ControlServer::start(
            &o.journal.join(SOCKET),
            &o.vm,
            Arc::new(Markers {
                agent: agent.clone(),
            }),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (agent, stop, vm, events) =
                (agent.clone(), stop.clone(), o.vm.clone(), o.events.clone());
            let (vfs, dir) = (vfs.clone(), o.journal.clone());
            std::thread::Builder::new()
                .name("standby-drain".into())
                .spawn(move || {
                    let r = drain_loop(&agent, &*vfs, &dir, &stop, &vm, &events, &*reopen);
                    stop.store(true, Ordering::SeqCst);
                    r
                })
                .map_err(|e| Error::io("drain thread", e))?
        };
        Ok(SourceAgent {
            vm: o.vm,
            agent,
            server,
            shipper,
            control: Some(control),
            stop,
            worker: Some(worker),
            events: o.events,
            probe_gate: Arc::new(RwLock::new(false)),
            _lock: lock,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn disks(&self) -> Vec<String> {
        self.agent.disks().map(|d| d.name.clone()).collect()
    }

    /// The latency and bytes of the client's requests, per disk.
    pub fn write_stats(&self) -> Arc<crate::util::latency::WriteStats> {
        self.agent.write_stats()
    }

    /// A reader of this agent's link and journal figures, for another thread.
    pub fn probe(&self) -> SourceProbe {
        SourceProbe {
            agent: Arc::downgrade(&self.agent),
            shipper: Arc::downgrade(&self.shipper),
            gate: self.probe_gate.clone(),
        }
    }

    /// Run until `stop` is set (or the write path fails), then stop cleanly: no new
    /// requests, everything durable and in the source images, and shipped if the cache
    /// service can be reached soon.
    pub fn run_until(mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.control.take();
        self.stop.store(true, Ordering::SeqCst);
        let result = match self.worker.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Invalid("the drain thread panicked".into())),
            None => Ok(()),
        };
        self.server.stop();
        self.agent.flush()?;
        let last = self.agent.cache().durable_seq();
        let shipper = self.shipper.lock().take();
        if let Some(shipper) = shipper {
            if !shipper.wait_acked(last, Duration::from_secs(10)) {
                (self.events)(Event::Notice(format!(
                    "{}: the cache service has not acknowledged everything; the journal keeps it for the next run",
                    self.vm
                )));
            }
            shipper.stop();
        }
        let SourceAgent {
            agent, probe_gate, ..
        } = self;
        *probe_gate.write() = true;
        let agent = Arc::try_unwrap(agent)
            .map_err(|_| Error::Invalid("agent still in use at shutdown".into()))?;
        agent.close()?;
        result
    }
}

/// Ask the agent running with its journal in `journal` to write a marker; returns its
/// sequence number once it is durable in the journal.
pub fn marker(journal: &Path, vm: &str, app: bool, name: Option<&str>) -> Result<u64> {
    let sock = journal.join(SOCKET);
    let req = Request::Marker {
        app,
        name: name.map(str::to_string),
    };
    match super::control::ask_once(&sock, vm, &req) {
        Some(Ok(Reply::Point { seq, .. })) => Ok(seq),
        Some(Ok(other)) => Err(Error::Conflict(format!(
            "unexpected reply from the agent: {other:?}"
        ))),
        Some(Err(e)) => Err(e),
        None => Err(Error::NotFound(format!(
            "no agent is running with its journal in {} (no {})",
            journal.display(),
            sock.display()
        ))),
    }
}

/// The seed a two-site reprotect left at the cache service, for these disks.
fn fetch_seed(o: &SourceOptions, infos: &[DiskInfo]) -> Result<crate::link::seed::Seed> {
    let seed = crate::link::seed::fetch(&o.cache, &o.security, &o.vm, infos).map_err(|e| {
        Error::Conflict(format!(
            "{}: --seeded: the seed cannot be had from the cache service at {}: {e}",
            o.vm, o.cache
        ))
    })?;
    if seed.disks != infos || seed.hashes.len() != infos.len() {
        return Err(Error::Conflict(format!(
            "{}: the seed at the cache service is for disks {:?}, the agent serves {:?}",
            o.vm, seed.disks, infos
        )));
    }
    Ok(seed)
}

/// The agent's journal; on a seeded first run a new one that continues the vault's
/// numbering (or the one an interrupted first run created, if it does).
fn open_journal(
    vfs: &Arc<dyn Vfs>,
    o: &SourceOptions,
    seed: Option<&crate::link::seed::Seed>,
) -> Result<(Cache, crate::cache::RecoveryReport)> {
    let dir = o.journal.join("log");
    let config = CacheConfig::write_path(o.journal_capacity);
    let Some(seed) = seed else {
        return Cache::open_with(vfs.clone(), &dir, config);
    };
    let empty = !vfs.exists(&dir) || vfs.list(&dir).map_err(|e| Error::io(&dir, e))?.is_empty();
    if empty {
        let j = Cache::create_after(vfs.clone(), &dir, config, seed.next_seq - 1)?;
        return Ok((j, Default::default()));
    }
    let (j, report) = Cache::open_with(vfs.clone(), &dir, config)?;
    if j.next_seq() != seed.next_seq {
        let next = j.next_seq();
        j.close()?;
        return Err(Error::Conflict(format!(
            "the journal in {} was used before (it is at record {next}, the seed starts at {}): give a new --journal directory for the reprotected VM",
            o.journal.display(),
            seed.next_seq
        )));
    }
    Ok((j, report))
}

/// Applies durable writes to the source images; while the journal cannot take writes,
/// ships the dirty bitmap once it can; after the journal failed (its disk is full, an I/O
/// error), reopens it with backoff.
fn drain_loop(
    agent: &Agent,
    vfs: &dyn Vfs,
    dir: &Path,
    stop: &AtomicBool,
    vm: &str,
    events: &Events,
    reopen: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let mut last_sync = Instant::now();
    let mut activity = ClientActivity::new(agent);
    let mut resyncing = agent.resync_pending().is_some();
    let mut failure_told: Option<String> = None;
    let mut backoff = Backoff::new();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(DRAIN_EVERY);
        if let Some(cause) = agent.log_failure() {
            if failure_told.as_deref() != Some(&cause) {
                events(Event::Trouble(format!(
                    "{vm}: the journal failed: {cause}; tracking writes in the dirty bitmap, reopening it with backoff"
                )));
                failure_told = Some(cause);
            }
            if backoff.ready() {
                backoff.failed();
                if reopen().is_ok() {
                    events(Event::Notice(format!(
                        "{vm}: the journal is reopened; resyncing the blocks written meanwhile"
                    )));
                }
            }
            continue;
        }
        if let Some(bytes) = agent.resync_pending() {
            if !resyncing {
                events(Event::Notice(format!(
                    "{vm}: the journal is full (the cache service is unreachable or full); tracking writes in the dirty bitmap ({bytes} bytes so far)"
                )));
                resyncing = true;
            }
            let done = agent.resync_step(RESYNC_STEP_BYTES)?;
            if !done && agent.resync_shipped_bytes() > 0 {
                crate::util::testhook::pause(crate::util::testhook::SEED_RESYNC);
            }
            if done {
                // Everything is in the journal again: the flag can go.
                flag::clear(vfs, dir, RESYNC_FLAG)?;
                flag::clear(vfs, dir, SEED_PENDING)?;
                resyncing = false;
                failure_told = None;
                backoff.reset();
                events(Event::Notice(format!(
                    "{vm}: resync finished; replicating through the journal again"
                )));
            }
        }
        if agent.log_failure().is_some() {
            continue;
        }
        let persist = activity.source_sync_due(agent, last_sync.elapsed());
        match agent.drain(persist) {
            Ok(()) => {}
            // The journal's own trouble: the source images take the writes directly
            // until it is reopened.
            Err(e) if agent.is_log_error(&e) => agent.log_failed(&e)?,
            Err(e) => {
                events(Event::Trouble(format!("{vm}: agent: {e}")));
                return Err(e);
            }
        }
        if persist {
            last_sync = Instant::now();
        }
    }
    Ok(())
}
