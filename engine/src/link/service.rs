//! The cache service (`standby cache serve`): the source site's change log, one per VM,
//! fed by agents and drained by processors over the link.
//!
//! Layout under its directory: `lock` (one service per directory), and per VM
//! `vms/VM/disks.json` (the disks the agent declared) and `vms/VM/log/` (the change log).
//!
//! - An agent's records are checked whole, appended with the sequence numbers the agent
//!   gave them (a record the log already holds is skipped, so a resend after a reconnect
//!   is harmless; a gap is refused), and acknowledged only once durable.
//! - A processor is sent every durable record from the sequence number it asks for; its
//!   checkpoints (what is durable at the target) let the log trim.
//! - One agent and one processor per VM at a time: a newer connection supersedes an older
//!   one (a killed peer's socket may linger), after the older one has stopped.

use super::tls::{self, Stream};
use super::wire::{
    self, AgentState, DiskInfo, Msg, PeerRole, SourceState, HEADER_BYTES, WIRE_BINDING,
};
use super::{auth, Security, IDLE_TIMEOUT};
use crate::backoff::Backoff;
use crate::cache::{Cache, CacheConfig};
use crate::error::{Error, LinkError, Result};
use crate::util::lock::{self, LockWait, VaultLock};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records are sent to a processor in messages of about this size.
const BATCH_BYTES: usize = 4 << 20;
/// How often a processor hears the source's state.
const STATE_EVERY: Duration = Duration::from_secs(1);

pub struct ServiceConfig {
    pub dir: PathBuf,
    /// Limit on each VM's log (`None`: no limit).
    pub capacity_bytes: Option<u64>,
    pub security: Security,
}

type Log = Box<dyn Fn(&str) + Send + Sync>;

/// The running service's shared state.
pub struct CacheService {
    dir: PathBuf,
    capacity_bytes: Option<u64>,
    security: Security,
    tls: Option<Arc<rustls::ServerConfig>>,
    vms: Mutex<HashMap<String, Arc<VmLog>>>,
    log: Log,
    /// Failed connections logged lately, by peer and message: a misconfigured peer that
    /// retries every few seconds gets one line a minute, with a count.
    refusals: Mutex<HashMap<String, (Instant, u64)>>,
    _lock: VaultLock,
}

/// One VM as the service sees it, for monitoring ([`CacheService::vm_reports`]).
#[derive(Debug, Clone)]
pub struct VmReport {
    pub name: String,
    pub state: SourceState,
    /// The target's last checkpoint: every record up to it is durable in the vault.
    pub target_seq: u64,
    pub processor_connected: bool,
}

/// One VM's log and who is connected to it.
struct VmLog {
    name: String,
    /// The VM's log; reopened (recovery runs) after a failure latched it, see
    /// [`CacheService::heal`].
    cache: RwLock<Arc<Cache>>,
    /// Its directory, and when to try reopening it again after a failure.
    log_dir: PathBuf,
    reopen: Mutex<Backoff>,
    disks: Vec<DiskInfo>,
    agent: Slot,
    processor: Slot,
    agent_state: Mutex<(AgentState, u64)>,
    agent_connected: AtomicBool,
    /// The target's last checkpoint.
    target_seq: AtomicU64,
    /// Set once the target site fenced the VM (it failed over there): why.
    fenced: Mutex<Option<String>>,
    dir: PathBuf,
    /// Group point barriers on their way to the VM's agent ([`super::relay`]).
    relay: super::relay::Relay,
}

/// Serializes the sessions of one role on one VM; the socket lets a newer one end it.
#[derive(Default)]
struct Slot {
    run: Mutex<()>,
    current: Mutex<Option<(u64, TcpStream)>>,
    next_id: AtomicU64,
}

impl VmLog {
    fn log(&self) -> Arc<Cache> {
        self.cache.read().clone()
    }
}

impl Slot {
    /// End the session in the slot (if any) and wait to run alone.
    fn take(&self, sock: &TcpStream) -> Result<(u64, parking_lot::MutexGuard<'_, ()>)> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mine = sock.try_clone().map_err(wire::io_err)?;
        if let Some((_, old)) = self.current.lock().replace((id, mine)) {
            let _ = old.shutdown(Shutdown::Both);
        }
        let guard = self.run.lock();
        Ok((id, guard))
    }

    fn release(&self, id: u64) {
        let mut cur = self.current.lock();
        if cur.as_ref().is_some_and(|(i, _)| *i == id) {
            *cur = None;
        }
    }
}

impl CacheService {
    /// Open the service's directory (taking its lock) and every VM log in it.
    pub fn open(
        config: ServiceConfig,
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<Arc<CacheService>> {
        std::fs::create_dir_all(config.dir.join("vms")).map_err(|e| Error::io(&config.dir, e))?;
        let lock = lock::acquire(&config.dir, "standby cache serve", LockWait::Fail)?;
        let tls = if config.security.insecure_loopback {
            None
        } else {
            Some(config.security.creds.server_config()?)
        };
        let svc = CacheService {
            dir: config.dir,
            capacity_bytes: config.capacity_bytes,
            security: config.security,
            tls,
            vms: Mutex::new(HashMap::new()),
            log: Box::new(log),
            refusals: Mutex::new(HashMap::new()),
            _lock: lock,
        };
        let vms_dir = svc.dir.join("vms");
        let mut names: Vec<String> = std::fs::read_dir(&vms_dir)
            .map_err(|e| Error::io(&vms_dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("disks.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            svc.vm(&name, None)?;
        }
        Ok(Arc::new(svc))
    }

    /// Names of the VMs whose logs this service holds.
    pub fn vm_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vms.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Each VM's state as a processor hears it (what `status` shows of the cache side),
    /// with the target's checkpoint and whether a processor is connected now: for
    /// monitoring.
    pub fn vm_reports(&self) -> Vec<VmReport> {
        let vms: Vec<Arc<VmLog>> = self.vms.lock().values().cloned().collect();
        let mut out: Vec<VmReport> = vms
            .iter()
            .map(|v| VmReport {
                name: v.name.clone(),
                state: self.source_state(v),
                target_seq: v.target_seq.load(Ordering::SeqCst),
                processor_connected: v.processor.current.lock().is_some(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The log of `vm`: opened if known, created if an agent declares it (`disks`).
    fn vm(&self, name: &str, declared: Option<&[DiskInfo]>) -> Result<Arc<VmLog>> {
        let mut vms = self.vms.lock();
        if let Some(v) = vms.get(name) {
            if let Some(d) = declared {
                if d != v.disks.as_slice() {
                    return Err(Error::Conflict(format!(
                        "VM '{name}' declares disks {} but the cache holds {}: a VM's disks cannot change while it is replicated",
                        describe(d),
                        describe(&v.disks)
                    )));
                }
            }
            let v = v.clone();
            drop(vms);
            self.heal(&v);
            return Ok(v);
        }
        let dir = self.dir.join("vms").join(name);
        let layout = dir.join("disks.json");
        let disks = if layout.exists() {
            let disks = read_disks(&layout)?;
            if let Some(d) = declared {
                if d != disks.as_slice() {
                    return Err(Error::Conflict(format!(
                        "VM '{name}' declares disks {} but the cache holds {}",
                        describe(d),
                        describe(&disks)
                    )));
                }
            }
            disks
        } else {
            let Some(d) = declared else {
                return Err(Error::NotFound(format!(
                    "the cache service holds no VM '{name}' (has its agent connected yet?)"
                )));
            };
            if d.is_empty() {
                return Err(Error::Invalid(format!("VM '{name}' declares no disks")));
            }
            for disk in d {
                crate::util::names::check_name("disk", &disk.name)?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            crate::fsutil::replace_atomic(
                &crate::vfs::RealFs,
                &dir,
                "disks.json",
                write_disks(d).as_bytes(),
            )?;
            let parent = self.dir.join("vms");
            crate::vfs::Vfs::sync_dir(&crate::vfs::RealFs, &parent)
                .map_err(|e| Error::io(&parent, e))?;
            d.to_vec()
        };
        let (cache, report) = Cache::open(
            dir.join("log"),
            CacheConfig::with_capacity(self.capacity_bytes),
        )?;
        if let Some((file, offset, bytes, why)) = &report.truncated {
            (self.log)(&format!(
                "{name}: cut a torn tail of {bytes} bytes at byte {offset} of {} ({why})",
                file.display()
            ));
        }
        let cache = Arc::new(cache);
        let v = Arc::new(VmLog {
            name: name.to_string(),
            target_seq: AtomicU64::new(cache.stats().checkpoint),
            cache: RwLock::new(cache),
            log_dir: dir.join("log"),
            reopen: Mutex::new(Backoff::new()),
            disks,
            agent: Slot::default(),
            processor: Slot::default(),
            agent_state: Mutex::new((AgentState::default(), 0)),
            agent_connected: AtomicBool::new(false),
            fenced: Mutex::new(super::fence::read(&crate::vfs::RealFs, &dir)?),
            dir: dir.clone(),
            relay: Default::default(),
        });
        vms.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// A failure (its disk is full, an I/O error) latched the VM's log, which refuses the
    /// agent's batches from then on (the agent keeps them in its journal): reopen it
    /// (recovery runs), at a peer's next connection, with backoff.
    fn heal(&self, v: &VmLog) {
        let mut backoff = v.reopen.lock();
        let Some(why) = v.log().failure() else {
            backoff.reset();
            return;
        };
        if !backoff.ready() {
            return;
        }
        backoff.failed();
        let old = v.log();
        let _ = old.close(); // stops its writer: a log's files have one writer
        match Cache::open(&v.log_dir, CacheConfig::with_capacity(self.capacity_bytes)) {
            Ok((cache, _)) => {
                *v.cache.write() = Arc::new(cache);
                (self.log)(&format!(
                    "{}: the log is reopened after it failed ({why})",
                    v.name
                ));
            }
            Err(e) => self.log_quietly(&format!(
                "{}: the log failed ({why}) and cannot be reopened yet: {e}",
                v.name
            )),
        }
    }

    /// Accept connections until `stop` is set; each runs on its own thread.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, stop: &AtomicBool) -> Result<()> {
        let local = listener.local_addr().map_err(wire::io_err)?;
        super::check_plain_allowed(&local, &self.security)?;
        listener.set_nonblocking(true).map_err(wire::io_err)?;
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((sock, peer)) => {
                    let svc = self.clone();
                    let _ = sock.set_nonblocking(false);
                    std::thread::Builder::new()
                        .name("standby-cache-conn".into())
                        .spawn(move || {
                            if let Err(e) = svc.connection(sock) {
                                svc.log_refusal(peer.ip(), &e.to_string());
                            }
                        })
                        .map_err(|e| {
                            Error::Link(LinkError::Local(format!("cannot start a thread: {e}")))
                        })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    (self.log)(&format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100))
                }
            }
        }
        Ok(())
    }

    fn log_refusal(&self, ip: std::net::IpAddr, msg: &str) {
        self.log_quietly(&format!("{ip}: {msg}"));
    }

    /// Log `line`, but a line logged less than a minute ago only counts (a peer retrying a
    /// refused or failing link every few seconds gets one line a minute).
    fn log_quietly(&self, line: &str) {
        const QUIET: Duration = Duration::from_secs(60);
        let mut seen = self.refusals.lock();
        seen.retain(|_, (t, _)| t.elapsed() < QUIET * 10);
        match seen.get_mut(line) {
            Some((t, n)) if t.elapsed() < QUIET => *n += 1,
            Some((t, n)) => {
                (self.log)(&format!("{line} (and {n} more times in the last minute)"));
                *t = Instant::now();
                *n = 0;
            }
            None => {
                (self.log)(line);
                seen.insert(line.to_string(), (Instant::now(), 0));
            }
        }
    }

    /// Close every VM log cleanly (what is written is made durable).
    pub fn close(&self) -> Result<()> {
        for v in self.vms.lock().values() {
            v.log().close()?;
        }
        Ok(())
    }

    fn connection(&self, sock: TcpStream) -> Result<()> {
        let _ = sock.set_nodelay(true);
        sock.set_read_timeout(Some(super::CONNECT_TIMEOUT))
            .map_err(wire::io_err)?;
        sock.set_write_timeout(Some(IDLE_TIMEOUT))
            .map_err(wire::io_err)?;
        let opts = sock.try_clone().map_err(wire::io_err)?;
        let first_is_tls = tls::peek_is_tls(&sock, super::CONNECT_TIMEOUT).map_err(wire::io_err)?;
        let stream = match (&self.tls, first_is_tls) {
            (Some(cfg), true) => Stream::accept_tls(sock, cfg.clone())?,
            (Some(_), false) => {
                let mut s = sock;
                let _ = s.write_all(
                    &Msg::Error {
                        message: "this cache service requires TLS; plaintext is refused (use --insecure-loopback on both sides, loopback only)".into(),
                    }
                    .encode(),
                );
                let _ = s.shutdown(Shutdown::Write);
                // Let the peer read the refusal before the socket closes under it.
                let _ = std::io::Read::read(&mut s, &mut [0u8; 256]);
                return Err(Error::Link(LinkError::RefusedPeer {
                    why: "refused a plaintext peer on the TLS port".into(),
                }));
            }
            (None, true) => {
                return Err(Error::Link(LinkError::RefusedPeer {
                    why:
                        "refused a TLS peer: this service runs with --insecure-loopback (plaintext)"
                            .into(),
                }));
            }
            (None, false) => Stream::plain(sock),
        };
        let binding = stream.channel_binding();
        let cert_role = stream.peer_role();
        let is_tls = stream.is_tls();
        let (mut r, mut w) = stream.split();
        let (role, vm) = auth::server(&mut r, &mut w, self.security.key(), binding)?;
        // On TLS the certificate says who the peer may be: the source site's agent
        // certificate cannot open a processor session (and trim the log), nor the reverse.
        let allowed = match role {
            PeerRole::Agent => tls::Role::Agent,
            PeerRole::Processor | PeerRole::Coordinator => tls::Role::Processor,
        };
        if is_tls && cert_role != Some(allowed) {
            return Err(auth::refuse(
                &mut w,
                LinkError::RefusedPeer {
                    why: format!(
                        "the {} certificate may not open a {} link",
                        cert_role.map(|r| r.as_str()).unwrap_or("foreign"),
                        role.as_str()
                    ),
                },
            ));
        }
        opts.set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(wire::io_err)?;
        let mut buf = Vec::new();
        let open = auth::expect(&mut r, &mut buf, "the open message")?;
        let (open, features) = match open {
            Msg::OpenAgentFeatures { disks, features } => (Msg::OpenAgent { disks }, features),
            m => (m, 0),
        };
        match (role, open) {
            (PeerRole::Coordinator, Msg::GroupStep(step)) => {
                let v = match self.vm(&vm, None) {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(auth::refuse(
                            &mut w,
                            LinkError::RefusedPeer { why: e.to_string() },
                        ))
                    }
                };
                super::relay::coordinator_session(&v.relay, &v.name, step, r, w)
            }
            (PeerRole::Agent, Msg::OpenAgent { disks }) => {
                let v = match self.vm(&vm, Some(&disks)) {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(auth::refuse(
                            &mut w,
                            LinkError::RefusedPeer { why: e.to_string() },
                        ))
                    }
                };
                if let Some(reason) = v.fenced.lock().clone() {
                    return Err(auth::refuse(&mut w, fenced(&reason)));
                }
                self.agent_session(&v, &opts, features, r, w)
            }
            (PeerRole::Processor, Msg::Fence { reason }) => {
                let v = match self.vm(&vm, None) {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(auth::refuse(
                            &mut w,
                            LinkError::RefusedPeer { why: e.to_string() },
                        ))
                    }
                };
                // Durable before the answer: a restarted service still refuses the agent.
                super::fence::write(&crate::vfs::RealFs, &v.dir, &reason)?;
                *v.fenced.lock() = Some(reason.clone());
                // The old source's session ends now; its reconnects are refused.
                if let Some((_, sock)) = v.agent.current.lock().as_ref() {
                    let _ = sock.shutdown(Shutdown::Both);
                }
                (self.log)(&format!(
                    "{}: fenced by the target site: {reason}; its agent is refused from now on",
                    v.name
                ));
                let st = v.log().stats();
                wire::write_msg(
                    &mut w,
                    &Msg::Ready {
                        next_seq: st.next_seq,
                        first_seq: st.first_seq,
                        disks: v.disks.clone(),
                    },
                )
            }
            (
                PeerRole::Processor,
                Msg::Seed {
                    next_seq,
                    disks,
                    hashes,
                },
            ) => {
                let seed = super::seed::Seed {
                    next_seq,
                    disks,
                    hashes,
                };
                match self.reseed(&vm, &seed) {
                    Ok(v) => {
                        let st = v.log().stats();
                        wire::write_msg(
                            &mut w,
                            &Msg::Ready {
                                next_seq: st.next_seq,
                                first_seq: st.first_seq,
                                disks: v.disks.clone(),
                            },
                        )
                    }
                    Err(e) => Err(auth::refuse(
                        &mut w,
                        LinkError::RefusedPeer { why: e.to_string() },
                    )),
                }
            }
            (PeerRole::Agent, Msg::AskSeed { disks }) => {
                let found = self
                    .vm(&vm, Some(&disks))
                    .and_then(|v| super::seed::read(&crate::vfs::RealFs, &v.dir));
                match found {
                    Ok(Some(seed)) => wire::write_msg(
                        &mut w,
                        &Msg::Seed {
                            next_seq: seed.next_seq,
                            disks: seed.disks,
                            hashes: seed.hashes,
                        },
                    ),
                    Ok(None) => Err(auth::refuse(
                        &mut w,
                        LinkError::RefusedPeer {
                            why: format!(
                                "the cache service holds no seed for VM '{vm}' (run `standby reprotect {vm} --cache …` at the target site first)"
                            ),
                        },
                    )),
                    Err(e) => Err(auth::refuse(
                        &mut w,
                        LinkError::RefusedPeer { why: e.to_string() },
                    )),
                }
            }
            (PeerRole::Processor, Msg::OpenProcessor { from_seq }) => {
                let v = match self.vm(&vm, None) {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(auth::refuse(
                            &mut w,
                            LinkError::RefusedPeer { why: e.to_string() },
                        ))
                    }
                };
                self.processor_session(&v, &opts, from_seq, r, w)
            }
            (role, m) => Err(auth::refuse(
                &mut w,
                LinkError::RefusedPeer {
                    why: format!(
                        "an {} may not open with a {} message",
                        role.as_str(),
                        m.name()
                    ),
                },
            )),
        }
    }

    /// A two-site reprotect: the VM's log here starts anew at `seed.next_seq` with the
    /// seed's disks (whatever it held is dropped, its fence lifted: the vault that fenced
    /// it now makes this site the VM's source), and the seed is kept for the agent.
    fn reseed(&self, name: &str, seed: &super::seed::Seed) -> Result<Arc<VmLog>> {
        crate::util::names::check_name("VM", name)?;
        if seed.disks.is_empty() || seed.next_seq == 0 {
            return Err(Error::Invalid(format!(
                "the seed of VM '{name}' names no disks"
            )));
        }
        for d in &seed.disks {
            crate::util::names::check_name("disk", &d.name)?;
        }
        let old = self.vms.lock().remove(name);
        if let Some(v) = old {
            // Its sessions end now; their log is closed under them.
            for slot in [&v.agent, &v.processor] {
                if let Some((_, sock)) = slot.current.lock().as_ref() {
                    let _ = sock.shutdown(Shutdown::Both);
                }
            }
            let _agent = v.agent.run.lock();
            let _processor = v.processor.run.lock();
            v.log().close()?;
        }
        let dir = self.dir.join("vms").join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir).map_err(|e| Error::io(&log_dir, e))?;
        // The log's first record is `next_seq`: a fresh log starts after its checkpoint.
        let log = Cache::create_after(
            Arc::new(crate::vfs::RealFs),
            &log_dir,
            CacheConfig::with_capacity(self.capacity_bytes),
            seed.next_seq - 1,
        )?;
        log.close()?;
        super::seed::write(&crate::vfs::RealFs, &dir, seed)?;
        crate::fsutil::replace_atomic(
            &crate::vfs::RealFs,
            &dir,
            "disks.json",
            write_disks(&seed.disks).as_bytes(),
        )?;
        let parent = self.dir.join("vms");
        crate::vfs::Vfs::sync_dir(&crate::vfs::RealFs, &parent)
            .map_err(|e| Error::io(&parent, e))?;
        (self.log)(&format!(
            "{name}: seeded by the target site (reprotect): the log starts at record {}, the agent's first run ships the blocks that differ",
            seed.next_seq
        ));
        self.vm(name, None)
    }

    fn agent_session(
        &self,
        v: &Arc<VmLog>,
        sock: &TcpStream,
        features: u64,
        mut r: tls::ReadHalf,
        w: tls::WriteHalf,
    ) -> Result<()> {
        let (id, _run) = v.agent.take(sock)?;
        let w = Arc::new(Mutex::new(w));
        v.relay.attach(id, features, w.clone());
        let result = (|| {
            let st = v.log().stats();
            wire::write_msg(
                &mut *w.lock(),
                &Msg::Ready {
                    next_seq: st.next_seq,
                    first_seq: st.first_seq,
                    disks: v.disks.clone(),
                },
            )?;
            (self.log)(&format!(
                "{}: agent connected; log expects record {}",
                v.name, st.next_seq
            ));
            v.agent_connected.store(true, Ordering::SeqCst);
            // Acknowledgements go out as records become durable, while more arrive.
            let (tx, rx) = crossbeam_channel::unbounded::<u64>();
            let acker = {
                let (cache, w) = (v.log(), w.clone());
                std::thread::spawn(move || -> Result<()> {
                    while let Ok(mut seq) = rx.recv() {
                        // Coalesce to the newest: a keepalive may name an older position.
                        while let Ok(s) = rx.try_recv() {
                            seq = seq.max(s);
                        }
                        cache.wait_durable(seq)?;
                        wire::write_msg(&mut *w.lock(), &Msg::Ack { durable_seq: seq })?;
                    }
                    Ok(())
                })
            };
            let mut buf = Vec::new();
            let outcome = loop {
                if acker.is_finished() {
                    break Ok(()); // it failed: its error is reported below
                }
                let msg = match wire::read_msg(&mut r, &mut buf) {
                    Ok(Some(m)) => m,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
                if let Some(reason) = v.fenced.lock().clone() {
                    break Err(Error::Link(fenced(&reason)));
                }
                match msg {
                    Msg::Records(payload) => match self.append_batch(v, &payload) {
                        Ok(Some(last)) => {
                            let _ = tx.send(last);
                        }
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    },
                    Msg::GroupAnswer(a) if features & wire::features::GROUP_BARRIER != 0 => {
                        v.relay.answered(a);
                    }
                    Msg::AgentState(a) => {
                        *v.agent_state.lock() = (a, crate::now_us());
                        // Answer it (the agent's state comes every second): an idle link
                        // stays alive, and the agent hears where the log is durable.
                        let _ = tx.send(v.log().durable_seq());
                    }
                    Msg::Error { message } => {
                        break Err(Error::Link(LinkError::ClosedBy {
                            peer: "the agent",
                            why: message,
                        }))
                    }
                    m => {
                        break Err(Error::Link(LinkError::Protocol {
                            what: format!("an agent may not send a {} message", m.name()),
                        }))
                    }
                }
            };
            drop(tx);
            let acked = acker.join().unwrap_or(Ok(()));
            if let Err(e) = &outcome {
                let _ = wire::write_msg(
                    &mut *w.lock(),
                    &Msg::Error {
                        message: e.to_string(),
                    },
                );
            }
            outcome.and(acked)
        })();
        v.agent_connected.store(false, Ordering::SeqCst);
        v.relay.detach(id);
        v.agent.release(id);
        let _ = sock.shutdown(Shutdown::Both);
        match &result {
            Ok(()) => (self.log)(&format!("{}: agent disconnected", v.name)),
            Err(e) => self.log_quietly(&format!("{}: agent disconnected: {e}", v.name)),
        }
        Ok(())
    }

    /// Append a checked batch; returns the last sequence number it covers.
    fn append_batch(&self, v: &VmLog, payload: &[u8]) -> Result<Option<u64>> {
        let frames = wire::check_records(payload, &v.disks)?;
        let mut last = None;
        for (i, (at, h)) in frames.iter().enumerate() {
            let end = frames.get(i + 1).map(|(a, _)| *a).unwrap_or(payload.len());
            let next = v.log().next_seq();
            if h.seq >= next {
                v.log().append_frame(&payload[*at..end], WIRE_BINDING)?;
            }
            last = Some(h.seq);
        }
        Ok(last)
    }

    fn source_state(&self, v: &VmLog) -> SourceState {
        let st = v.log().stats();
        let (agent, seen) = v.agent_state.lock().clone();
        let target = v.target_seq.load(Ordering::SeqCst);
        SourceState {
            durable_seq: st.durable_seq,
            first_seq: st.first_seq,
            used_bytes: st.stored_bytes,
            backlog_bytes: v.log().backlog(target).1,
            capacity_bytes: st.capacity_bytes.unwrap_or(0),
            last_time_us: v.log().last_time_us(),
            agent_connected: v.agent_connected.load(Ordering::SeqCst),
            agent_seen_us: seen,
            agent,
        }
    }

    fn processor_session(
        &self,
        v: &Arc<VmLog>,
        sock: &TcpStream,
        from_seq: u64,
        mut r: tls::ReadHalf,
        mut w: tls::WriteHalf,
    ) -> Result<()> {
        let st = v.log().stats();
        let ready = Msg::Ready {
            next_seq: st.next_seq,
            first_seq: st.first_seq,
            disks: v.disks.clone(),
        };
        if from_seq == 0 {
            // A description only (`protect --cache`).
            return wire::write_msg(&mut w, &ready);
        }
        let (id, _run) = v.processor.take(sock)?;
        let result = (|| {
            let st = v.log().stats();
            if from_seq < st.first_seq {
                return Err(auth::refuse(
                    &mut w,
                    LinkError::Diverged { why: format!(
                        "the cache no longer holds record {from_seq} of '{}' (its oldest is {}): the target must resync",
                        v.name, st.first_seq
                    ) },
                ));
            }
            if from_seq > st.next_seq {
                return Err(auth::refuse(
                    &mut w,
                    LinkError::Diverged { why: format!(
                        "the target asks for record {from_seq} of '{}' but the cache ends at {}: the cache lost records",
                        v.name,
                        st.next_seq - 1
                    ) },
                ));
            }
            wire::write_msg(&mut w, &ready)?;
            (self.log)(&format!(
                "{}: processor connected from record {from_seq}",
                v.name
            ));
            let done = Arc::new(AtomicBool::new(false));
            let receiver = {
                let (v, done) = (v.clone(), done.clone());
                std::thread::spawn(move || -> Result<()> {
                    let mut buf = Vec::new();
                    let out = loop {
                        match wire::read_msg(&mut r, &mut buf) {
                            Ok(Some(Msg::Checkpoint { seq })) => {
                                let seq = seq.min(v.log().durable_seq());
                                v.target_seq.fetch_max(seq, Ordering::SeqCst);
                                if let Err(e) = v.log().set_checkpoint(seq) {
                                    break Err(e);
                                }
                            }
                            Ok(None) => break Ok(()),
                            Ok(Some(Msg::Error { message })) => {
                                break Err(Error::Link(LinkError::ClosedBy {
                                    peer: "the processor",
                                    why: message,
                                }))
                            }
                            Ok(Some(m)) => {
                                break Err(Error::Link(LinkError::Protocol {
                                    what: format!(
                                        "a processor may not send a {} message",
                                        m.name()
                                    ),
                                }))
                            }
                            Err(e) => break Err(e),
                        }
                    };
                    done.store(true, Ordering::SeqCst);
                    out
                })
            };
            let sent = self.send_records(v, from_seq, &mut w, &done);
            done.store(true, Ordering::SeqCst);
            let _ = sock.shutdown(Shutdown::Both);
            let received = receiver.join().unwrap_or(Ok(()));
            sent.and(received)
        })();
        v.processor.release(id);
        (self.log)(&format!(
            "{}: processor disconnected{}",
            v.name,
            match &result {
                Ok(()) => String::new(),
                Err(e) => format!(": {e}"),
            }
        ));
        Ok(())
    }

    fn send_records(
        &self,
        v: &VmLog,
        from_seq: u64,
        w: &mut tls::WriteHalf,
        done: &AtomicBool,
    ) -> Result<()> {
        let mut reader = v.log().reader(from_seq)?;
        let mut batch = vec![0u8; HEADER_BYTES];
        let mut last_state: Option<Instant> = None;
        while !done.load(Ordering::SeqCst) {
            while batch.len() < BATCH_BYTES {
                if reader.next_frame(&mut batch, WIRE_BINDING)?.is_none() {
                    break;
                }
            }
            if batch.len() > HEADER_BYTES {
                wire::seal_records(&mut batch);
                w.write_all(&batch).map_err(wire::io_err)?;
                w.flush().map_err(wire::io_err)?;
                batch.truncate(HEADER_BYTES);
            }
            if last_state.is_none_or(|t| t.elapsed() >= STATE_EVERY) {
                wire::write_msg(w, &Msg::SourceState(self.source_state(v)))?;
                last_state = Some(Instant::now());
            }
            if batch.len() == HEADER_BYTES {
                v.log().wait_durable_beyond(
                    reader.next_seq().saturating_sub(1),
                    Duration::from_millis(200),
                )?;
            }
        }
        Ok(())
    }
}

/// Why a fenced VM's agent is refused.
fn fenced(reason: &str) -> LinkError {
    LinkError::RefusedPeer {
        why: format!(
            "{reason}; the cache service refuses the old source's writes (the copies would diverge)"
        ),
    }
}

fn describe(d: &[DiskInfo]) -> String {
    let v: Vec<String> = d
        .iter()
        .map(|d| format!("{}:{}", d.name, d.size_bytes))
        .collect();
    format!("[{}]", v.join(", "))
}

fn write_disks(d: &[DiskInfo]) -> String {
    let v: Vec<serde_json::Value> = d
        .iter()
        .map(|d| serde_json::json!({"name": d.name, "size_bytes": d.size_bytes}))
        .collect();
    serde_json::json!({ "disks": v }).to_string()
}

fn read_disks(path: &Path) -> Result<Vec<DiskInfo>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = || {
        Error::corrupt(
            path,
            0,
            "expected {\"disks\": [{\"name\", \"size_bytes\"}, ...]}",
        )
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
    v["disks"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|d| {
            Ok(DiskInfo {
                name: d["name"].as_str().ok_or_else(bad)?.to_string(),
                size_bytes: d["size_bytes"].as_u64().ok_or_else(bad)?,
            })
        })
        .collect()
}
