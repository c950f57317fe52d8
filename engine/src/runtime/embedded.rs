//! The embedded agent: one process serves a local VM's disks over NBD through the write
//! tap, keeps the source images caught up, processes the log into the replica as the
//! policy says, and owns the VM for control requests (points, status, verify, test
//! failover, mount), all over one local vault.
//!
//! Threads, so that none waits on another: the NBD connections (the client's writes wait
//! only for the log), the drain (durable writes into the source images, every few
//! milliseconds, synced every second while the client is idle, and the resync of a dirty
//! bitmap), the processor (log → replica, at nice 10; it yields while the client writes,
//! for at most [`MAX_PROCESSING_DELAY`], so the VM's I/O comes first and the replica stays
//! close behind), and the control socket (a thread per
//! request, working from published views).

use super::control::ControlServer;
use super::flag::slot;
use super::owner::VmOwner;
use super::{Backoff, ClientActivity, Event, Events, DRAIN_EVERY, RESYNC_STEP_BYTES};
use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::nbd::Server;
use crate::process::Processor;
use crate::util::lock::VaultLock;
use crate::vault::{LockWait, Vault, VmState};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The slot (in the VM's directory) set while the source images may be ahead of the log.
pub const SOURCE_AHEAD: &str = "source.ahead";

/// The processor runs only once the client has written nothing for
/// [`super::CLIENT_IDLE`], or once a pass has been put off this long (bounds how far the
/// replica lags).
pub const MAX_PROCESSING_DELAY: Duration = Duration::from_secs(2);

/// How often a running agent looks up its VM's policy in the catalog.
const POLICY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Settings of an embedded agent.
pub struct EmbeddedOptions {
    /// Where to serve NBD.
    pub listen: String,
    /// How often the log is processed into the replica (at most).
    pub process_every: Duration,
    pub events: Events,
}

/// A running embedded agent.
pub struct EmbeddedAgent {
    vm: String,
    root: PathBuf,
    who: String,
    agent: Arc<Agent>,
    processor: Arc<Mutex<Processor>>,
    server: Server,
    control: Option<ControlServer>,
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<Result<()>>)>,
    events: Events,
    _lock: VaultLock,
}

impl EmbeddedAgent {
    /// Open the VM (taking its lock: one agent per VM), serve its disks and start the
    /// background work.
    pub fn start(root: &Path, who: &str, vm: &str, opts: EmbeddedOptions) -> Result<EmbeddedAgent> {
        let vault = Vault::open(root, who, LockWait::Fail)?;
        let (vfs, vm_dir) = (vault.vfs.clone(), vault.vm_dir(vm));
        // Set while the source images may hold writes the log lacks: a restart must not
        // replay the log over them (and must resync every block).
        let ahead = slot::get(&*vfs, &vm_dir, SOURCE_AHEAD)?;
        let handle = vault.agent_with(vm, !ahead)?;
        slot::prepare(&*vfs, &vm_dir, SOURCE_AHEAD)?;
        let processor = Arc::new(Mutex::new(vault.processor_for(vm, &handle)?));
        let (agent, lock) = handle.into_parts();
        let agent = Arc::new(agent);
        // Before the first write goes to the source images alone, the slot is set (in
        // place: that works on a full disk), so a restart resyncs every block (the bitmap
        // dies with the process) and replays nothing over the source images. It is
        // cleared once the resync is durable and the source hold covers it. The catalog's
        // `resync-required` (what status shows) is recorded by the drain thread, off the
        // write path (it takes the vault's lock; on a full disk it keeps trying).
        let recorded = Arc::new(AtomicBool::new(false));
        {
            let (vfs, vm_dir) = (vfs.clone(), vm_dir.clone());
            agent.on_bitmap(move |entering| slot::put(&*vfs, &vm_dir, SOURCE_AHEAD, entering));
        }
        if ahead || vault.catalog().vm(vm)?.state == VmState::ResyncRequired {
            // The dirty bitmap of an earlier run was lost with it: the delta engine finds
            // the blocks of the source images that differ from the replica (once the log
            // is applied), and only those are shipped. If the replica cannot be read for
            // it, every allocated block is shipped.
            match delta_resync(&agent, &processor) {
                Ok((changed, compared)) => (opts.events)(Event::Notice(format!(
                    "{vm} needs a resync; {changed} bytes of blocks differ from the replica ({compared} bytes compared by hash), shipping those"
                ))),
                Err(e) => {
                    (opts.events)(Event::Notice(format!(
                        "{vm} needs a resync; the replica cannot be compared ({e}): shipping every allocated block again"
                    )));
                    agent.require_full_resync()?;
                }
            }
        }
        let server = super::serve_disks(&agent, &opts.listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let owner = Arc::new(VmOwner {
            root: root.to_path_buf(),
            who: who.to_string(),
            vm: vm.to_string(),
            processor: processor.clone(),
            agent: Some(agent.clone()),
            events: opts.events.clone(),
            processing_failure: Default::default(),
        });
        let control = ControlServer::start(&vault.agent_socket(vm), vm, owner.clone())?;
        let mut threads = Vec::new();
        {
            let (agent, processor, stop, events, root, who, vm) = (
                agent.clone(),
                processor.clone(),
                stop.clone(),
                opts.events.clone(),
                root.to_path_buf(),
                who.to_string(),
                vm.to_string(),
            );
            let t = std::thread::Builder::new()
                .name("standby-drain".into())
                .spawn(move || {
                    let r = drain_loop(
                        &agent, &processor, &recorded, &stop, &events, &root, &who, &vm,
                    );
                    stop.store(true, Ordering::SeqCst);
                    r
                })
                .map_err(|e| Error::io("drain thread", e))?;
            threads.push(("drain", t));
        }
        {
            let (tap, owner, stop, events, root, who, every) = (
                agent.clone(),
                owner.clone(),
                stop.clone(),
                opts.events.clone(),
                root.to_path_buf(),
                who.to_string(),
                opts.process_every,
            );
            let t = std::thread::Builder::new()
                .name("standby-process".into())
                .spawn(move || process_loop(&tap, &owner, &stop, &events, &root, &who, every))
                .map_err(|e| Error::io("processor thread", e))?;
            threads.push(("processor", t));
        }
        {
            // A consistency group's policy: its first member's agent cuts its group points.
            let (stop, events, root, who, vm) = (
                stop.clone(),
                opts.events.clone(),
                root.to_path_buf(),
                who.to_string(),
                vm.to_string(),
            );
            let t = std::thread::Builder::new()
                .name("standby-group".into())
                .spawn(move || {
                    let never = std::sync::atomic::AtomicBool::new(false);
                    super::group::policy_loop(&root, &who, &vm, &stop, &never, &events)
                })
                .map_err(|e| Error::io("group thread", e))?;
            threads.push(("group", t));
        }
        Ok(EmbeddedAgent {
            vm: vm.to_string(),
            root: root.to_path_buf(),
            who: who.to_string(),
            agent,
            processor,
            server,
            control: Some(control),
            stop,
            threads,
            events: opts.events,
            _lock: lock,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn disks(&self) -> Vec<String> {
        self.agent.disks().map(|d| d.name.clone()).collect()
    }

    /// The latency and bytes of the client's requests, per disk (in the VM's disk order).
    pub fn write_stats(&self) -> Arc<crate::util::latency::WriteStats> {
        self.agent.write_stats()
    }

    /// Run until `stop` is set (or the write path fails), then stop cleanly: no new
    /// requests, everything durable and in the source images, the last changes processed.
    pub fn run_until(mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server.stop();
        self.control.take();
        self.stop.store(true, Ordering::SeqCst);
        let mut first_err = None;
        for (what, t) in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Invalid(format!("the {what} thread panicked")));
                }
            }
        }
        self.agent.flush()?;
        // The last changes processed; a replica that refuses them (damage) keeps them in
        // the log, which is closed cleanly all the same.
        match self.processor.lock().run_pass() {
            Ok(report) => {
                for pt in report.points {
                    (self.events)(Event::Point {
                        vm: self.vm.clone(),
                        point: pt,
                    });
                }
            }
            Err(e) => (self.events)(Event::Trouble(format!(
                "{}: processing at shutdown: {e}",
                self.vm
            ))),
        }
        let EmbeddedAgent {
            agent, processor, ..
        } = self;
        drop(processor);
        let agent = Arc::try_unwrap(agent)
            .map_err(|_| Error::Invalid("agent still in use at shutdown".into()))?;
        agent.close()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Bytes of source blocks resyncs shipped into the log since the agent started.
    pub fn resync_shipped_bytes(&self) -> u64 {
        self.agent.resync_shipped_bytes()
    }

    /// Bytes of blocks still waiting for a resync, if one is under way.
    pub fn resync_pending(&self) -> Option<u64> {
        self.agent.resync_pending()
    }

    /// The vault this agent works on, and its VM.
    pub fn vault_root(&self) -> (&Path, &str, &str) {
        (&self.root, &self.vm, &self.who)
    }
}

/// Apply everything the log holds into the replica, compare the source images with the
/// replica's latest state block by block, and mark the blocks that differ for the resync.
/// Returns the bytes of changed blocks and the bytes hashed.
fn delta_resync(agent: &Agent, processor: &Mutex<Processor>) -> Result<(u64, u64)> {
    let mut p = processor.lock();
    p.run_pass()?;
    let view = p.replica().view_latest()?;
    drop(p);
    let mut marks = Vec::new();
    let (mut changed, mut compared) = (0, 0);
    for (i, image) in agent.source_images()?.iter().enumerate() {
        let d = crate::delta::compare(
            image,
            &crate::delta::ViewDisk {
                view: &view,
                disk: i as u16,
            },
        )?;
        changed += d.changed_bytes();
        compared += d.compared_bytes;
        marks.extend(d.changed.iter().map(|&(o, l)| (i as u16, o, l)));
    }
    agent.require_resync_of(&marks)?;
    Ok((changed, compared))
}

/// Record in the catalog that a resync is owed (or no longer).
fn record_resync(root: &Path, who: &str, vm: &str, owed: bool) -> Result<()> {
    let reason = owed.then(|| {
        "the change log could not take writes; the blocks written meanwhile are resynced".into()
    });
    Vault::open(root, who, LockWait::Block)?.set_resync(vm, reason)
}

/// Reopen the VM's failed log (recovery runs) and hand it to the tap and the processor.
fn reopen_log(
    agent: &Agent,
    processor: &Mutex<Processor>,
    root: &Path,
    who: &str,
    vm: &str,
) -> Result<()> {
    let vault = Vault::open(root, who, LockWait::Block)?;
    // No processing pass runs from here until the processor has the new log: a pass still
    // on the old one would trim it — delete segment files the reopened log has recovered
    // and appends to (a later read of them fails with "No such file", for good).
    let mut processor = processor.lock();
    // The failed log's writer stops first: a log's files have one writer.
    let _ = agent.cache().close();
    let log = vault.open_cache(vm)?;
    agent.reopen_log(log.clone())?;
    processor.set_cache(log);
    Ok(())
}

/// Applies durable writes to the source images; while the log cannot take writes, ships
/// the dirty bitmap once it can; after the log failed, reopens it with backoff.
#[allow(clippy::too_many_arguments)]
fn drain_loop(
    agent: &Agent,
    processor: &Mutex<Processor>,
    recorded: &AtomicBool,
    stop: &AtomicBool,
    events: &Events,
    root: &Path,
    who: &str,
    vm: &str,
) -> Result<()> {
    let mut last_sync = Instant::now();
    let mut activity = ClientActivity::new(agent);
    if Vault::open(root, who, LockWait::Block)?
        .catalog()
        .vm(vm)
        .map(|r| r.state == VmState::ResyncRequired)
        .unwrap_or(false)
    {
        recorded.store(true, Ordering::SeqCst);
    }
    let mut announced = false;
    let mut failure_told: Option<String> = None;
    let mut backoff = Backoff::new();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(DRAIN_EVERY);
        if let Some(cause) = agent.log_failure() {
            if failure_told.as_deref() != Some(&cause) {
                events(Event::Trouble(format!(
                    "{vm}: the change log failed: {cause}; tracking writes in the dirty bitmap, reopening it with backoff"
                )));
                failure_told = Some(cause);
            }
            if backoff.ready() {
                // Each try waits longer, whether it fails now or the reopened log fails
                // again (its disk still full); a finished resync resets the wait.
                backoff.failed();
                if !recorded.load(Ordering::SeqCst) && record_resync(root, who, vm, true).is_ok() {
                    recorded.store(true, Ordering::SeqCst);
                }
                if reopen_log(agent, processor, root, who, vm).is_ok() {
                    events(Event::Notice(format!(
                        "{vm}: the change log is reopened; resyncing the blocks written meanwhile"
                    )));
                }
            }
            continue;
        }
        // The log could not take writes: say so, and ship the dirty blocks as soon as it
        // takes them.
        if let Some(bytes) = agent.resync_pending() {
            if !announced {
                events(Event::Notice(format!(
                    "{vm}: the change log cannot take writes; tracking them in the dirty bitmap ({bytes} bytes of blocks so far)"
                )));
                announced = true;
            }
            if !recorded.load(Ordering::SeqCst) && record_resync(root, who, vm, true).is_ok() {
                recorded.store(true, Ordering::SeqCst);
            }
            if agent.resync_step(RESYNC_STEP_BYTES)? {
                announced = false;
                failure_told = None;
                backoff.reset();
                events(Event::Notice(format!(
                    "{vm}: resync finished; replicating through the log again"
                )));
            }
        }
        if agent.resync_pending().is_none()
            && recorded.load(Ordering::SeqCst)
            && record_resync(root, who, vm, false).is_ok()
        {
            recorded.store(false, Ordering::SeqCst);
        }
        if agent.log_failure().is_some() {
            continue;
        }
        let persist = activity.source_sync_due(agent, last_sync.elapsed());
        match agent.drain(persist) {
            Ok(()) => {}
            // The log's own trouble (its disk is full): the source images take the
            // writes directly until it is reopened.
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

/// True for the failures a store's owner answers by reopening it later: I/O errors (a
/// full disk) and the latched error they leave.
fn reopen_cures(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Poisoned(_))
}

fn process_loop(
    agent: &Agent,
    owner: &VmOwner,
    stop: &AtomicBool,
    events: &Events,
    root: &Path,
    who: &str,
    every: Duration,
) -> Result<()> {
    let (processor, vm) = (&owner.processor, owner.vm.as_str());
    // Behind the write path in the CPU's queue too: on a busy machine the client's I/O
    // (and the drain) get the cycles first.
    super::lower_thread_priority();
    let mut last_pass = Instant::now();
    let mut activity = ClientActivity::new(agent);
    let mut deferred_since: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    let mut backoff = Backoff::new();
    let mut policy_checked = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
        let busy = activity.busy(agent);
        // After a failure, the next pass waits for the backoff.
        if !backoff.ready() {
            continue;
        }
        // A resync waits for the log to be freed: process at once, whatever the cadence.
        let resyncing = agent.resync_pending().is_some();
        if !resyncing && last_error.is_none() && last_pass.elapsed() < every {
            continue;
        }
        // The client's I/O first: put the pass off while it writes, but not for long.
        if !resyncing
            && busy
            && deferred_since.get_or_insert_with(Instant::now).elapsed() < MAX_PROCESSING_DELAY
        {
            continue;
        }
        deferred_since = None;
        last_pass = Instant::now();
        let result = (|| {
            // The VM's policy as the catalog has it now (`policy set`, `policy assign`):
            // cadence and retention follow it from the next pass on (looked up once a
            // second at most: a resync runs passes back to back).
            if policy_checked.elapsed() >= POLICY_CHECK_EVERY {
                policy_checked = Instant::now();
                let policy = Vault::open(root, who, LockWait::Block)?.vm_policy(vm)?;
                let mut p = processor.lock();
                if *p.policy() != policy {
                    p.set_policy(policy)?;
                }
            }
            let mut p = processor.lock();
            if p.replica().failure().is_some() {
                // A failure latched the replica: reopen it (recovery runs) and go on.
                let replica = Vault::open(root, who, LockWait::Block)?.open_replica(vm)?;
                p.reopen(replica)?;
            }
            p.run_pass()
        })();
        match result {
            Ok(r) => {
                if last_error.take().is_some() {
                    events(Event::Notice(format!("{vm}: processing works again")));
                }
                *owner.processing_failure.lock() = None;
                backoff.reset();
                for pt in r.points {
                    events(Event::Point {
                        vm: vm.to_string(),
                        point: pt,
                    });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if reopen_cures(&e) {
                    *owner.processing_failure.lock() = Some(msg.clone());
                }
                backoff.failed();
                if last_error.as_deref() != Some(&msg) {
                    events(Event::Trouble(format!("{vm}: processing: {msg}")));
                    last_error = Some(msg);
                }
            }
        }
    }
    Ok(())
}
