//! The embedded agent: one process serves a local VM's disks over NBD through the write
//! tap, keeps the source images caught up, processes the log into the replica as the
//! policy says, and owns the VM for control requests (points, status, verify, test
//! failover, mount), all over one local vault.
//!
//! Threads, so that none waits on another: the NBD connections (the client's writes wait
//! only for the log), the drain (durable writes into the source images, every few
//! milliseconds, and the resync of a dirty bitmap), the processor (log → replica; it
//! yields while the client writes, for at most [`MAX_PROCESSING_DELAY`], so the VM's I/O
//! comes first and the replica stays close behind), and the control socket (a thread per
//! request, working from published views).

use super::control::ControlServer;
use super::owner::VmOwner;
use super::{Event, Events, DRAIN_EVERY, RESYNC_STEP_BYTES, SOURCE_SYNC_EVERY};
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

/// The processor runs only once the client has written nothing for this long...
const IDLE_BEFORE_PROCESSING: Duration = Duration::from_millis(50);
/// ...or once a pass has been put off this long (bounds how far the replica lags).
pub const MAX_PROCESSING_DELAY: Duration = Duration::from_secs(2);

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
        let handle = vault.agent(vm)?;
        let processor = Arc::new(Mutex::new(vault.processor_for(vm, &handle)?));
        let (agent, lock) = handle.into_parts();
        let agent = Arc::new(agent);
        if vault.catalog().vm(vm)?.state == VmState::ResyncRequired {
            // The dirty bitmap of an earlier run was lost with it: resync every block.
            (opts.events)(Event::Notice(format!(
                "{vm} needs a resync; shipping every allocated block again"
            )));
            agent.require_full_resync()?;
        }
        let server = super::serve_disks(&agent, &opts.listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let owner = Arc::new(VmOwner {
            root: root.to_path_buf(),
            who: who.to_string(),
            vm: vm.to_string(),
            cache: agent.cache().clone(),
            processor: processor.clone(),
            agent: Some(agent.clone()),
            events: opts.events.clone(),
        });
        let control = ControlServer::start(&vault.agent_socket(vm), vm, owner)?;
        let mut threads = Vec::new();
        {
            let (agent, stop, events, root, who, vm) = (
                agent.clone(),
                stop.clone(),
                opts.events.clone(),
                root.to_path_buf(),
                who.to_string(),
                vm.to_string(),
            );
            let t = std::thread::Builder::new()
                .name("standby-drain".into())
                .spawn(move || {
                    let r = drain_loop(&agent, &stop, &events, &root, &who, &vm);
                    stop.store(true, Ordering::SeqCst);
                    r
                })
                .map_err(|e| Error::io("drain thread", e))?;
            threads.push(("drain", t));
        }
        {
            let (tap, processor, stop, events, vm, every) = (
                agent.clone(),
                processor.clone(),
                stop.clone(),
                opts.events.clone(),
                vm.to_string(),
                opts.process_every,
            );
            let t = std::thread::Builder::new()
                .name("standby-process".into())
                .spawn(move || process_loop(&tap, &processor, &stop, &events, &vm, every))
                .map_err(|e| Error::io("processor thread", e))?;
            threads.push(("processor", t));
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

    /// The vault this agent works on, and its VM.
    pub fn vault_root(&self) -> (&Path, &str, &str) {
        (&self.root, &self.vm, &self.who)
    }
}

fn drain_loop(
    agent: &Agent,
    stop: &AtomicBool,
    events: &Events,
    root: &Path,
    who: &str,
    vm: &str,
) -> Result<()> {
    let set_resync = |reason: Option<String>| -> Result<()> {
        Vault::open(root, who, LockWait::Block)?.set_resync(vm, reason)
    };
    let mut last_sync = Instant::now();
    let mut flagged = Vault::open(root, who, LockWait::Block)?
        .catalog()
        .vm(vm)
        .map(|r| r.state == VmState::ResyncRequired)
        .unwrap_or(false);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(DRAIN_EVERY);
        // The log was full: say so, and ship the dirty blocks as soon as it takes them.
        if let Some(bytes) = agent.resync_pending() {
            if !flagged {
                events(Event::Notice(format!(
                    "{vm}: the change log is full; tracking writes in the dirty bitmap"
                )));
                set_resync(Some(format!(
                    "the change log was full; {bytes} bytes of blocks to resync"
                )))?;
                flagged = true;
            }
            if agent.resync_step(RESYNC_STEP_BYTES)? {
                set_resync(None)?;
                flagged = false;
                events(Event::Notice(format!(
                    "{vm}: resync finished; replicating through the log again"
                )));
            }
        } else if flagged {
            set_resync(None)?;
            flagged = false;
        }
        let persist = last_sync.elapsed() >= SOURCE_SYNC_EVERY;
        if let Err(e) = agent.drain(persist) {
            events(Event::Trouble(format!("{vm}: agent: {e}")));
            return Err(e);
        }
        if persist {
            last_sync = Instant::now();
        }
    }
    Ok(())
}

fn process_loop(
    agent: &Agent,
    processor: &Mutex<Processor>,
    stop: &AtomicBool,
    events: &Events,
    vm: &str,
    every: Duration,
) -> Result<()> {
    let mut last_pass = Instant::now();
    let mut seen_ops = agent.client_ops();
    let mut last_write = Instant::now();
    let mut deferred_since: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
        let ops = agent.client_ops();
        if ops != seen_ops {
            seen_ops = ops;
            last_write = Instant::now();
        }
        // A resync waits for the log to be freed: process at once, whatever the cadence.
        let resyncing = agent.resync_pending().is_some();
        if !resyncing && last_pass.elapsed() < every {
            continue;
        }
        // The client's I/O first: put the pass off while it writes, but not for long.
        if !resyncing
            && last_write.elapsed() < IDLE_BEFORE_PROCESSING
            && deferred_since.get_or_insert_with(Instant::now).elapsed() < MAX_PROCESSING_DELAY
        {
            continue;
        }
        deferred_since = None;
        last_pass = Instant::now();
        match processor.lock().run_pass() {
            Ok(r) => {
                last_error = None;
                for pt in r.points {
                    events(Event::Point {
                        vm: vm.to_string(),
                        point: pt,
                    });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    events(Event::Trouble(format!("{vm}: processing: {msg}")));
                    last_error = Some(msg);
                }
            }
        }
    }
    Ok(())
}
