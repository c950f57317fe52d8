//! The agent's shipper: streams the agent's local journal (a change log) to the cache
//! service, and trims the journal as the cache service acknowledges records durable.
//!
//! The journal is what makes the agent safe against a link that breaks or a cache service
//! that dies: every acknowledged write is in it (written, or durable after a flush) before
//! it reaches the source image. On every (re)connect the cache service says which record
//! it expects next, and the shipper resends from there; the cache service skips what it
//! already holds. When the link stays down long enough to fill the journal, the agent falls
//! back to its dirty bitmap (see `agent.rs`) and resyncs once the journal drains.

use super::wire::{
    self, AgentState, DiskInfo, GroupAnswer, GroupStep, Msg, PeerRole, HEADER_BYTES, WIRE_BINDING,
};
use super::{auth, Security};
use crate::cache::Cache;
use crate::error::{Error, LinkError, Result};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Records are shipped in messages of about this size.
const BATCH_BYTES: usize = 1 << 20;
/// Bytes shipped but not yet acknowledged durable, at most.
const WINDOW_BYTES: u64 = 32 << 20;
const STATE_EVERY: Duration = Duration::from_secs(1);

/// Where the link stands, for status.
#[derive(Debug, Default)]
pub struct ShipStatus {
    pub connected: AtomicBool,
    /// Every journal record up to here is durable in the cache.
    pub acked_seq: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// The agent's side of a group point's barrier: answers one step the cache service relays.
pub type Barrier = Arc<dyn Fn(&GroupStep) -> GroupAnswer + Send + Sync>;

pub struct ShipperConfig {
    pub addr: String,
    pub security: Security,
    pub vm: String,
    pub disks: Vec<DiskInfo>,
    /// Answers group barrier steps (declared to the service as
    /// [`wire::features::GROUP_BARRIER`]); `None`: the agent declares no feature.
    pub barrier: Option<Barrier>,
}

pub struct Shipper {
    pub status: Arc<ShipStatus>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Shipper {
    /// Start shipping `journal` in the background. `agent_state` is asked for what to report.
    pub fn start(
        journal: Arc<Cache>,
        config: ShipperConfig,
        agent_state: impl Fn() -> AgentState + Send + Sync + 'static,
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> Shipper {
        let status = Arc::new(ShipStatus::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (status, stop) = (status.clone(), stop.clone());
            std::thread::Builder::new()
                .name("standby-shipper".into())
                .spawn(move || run(&journal, &config, &agent_state, &log, &status, &stop))
                .expect("start the shipper thread")
        };
        Shipper {
            status,
            stop,
            thread: Some(thread),
        }
    }

    /// Stop (after the batch in flight); dropping the shipper does the same.
    pub fn stop(self) {
        drop(self);
    }

    /// Wait until every journal record up to `seq` is durable in the cache, or `timeout`.
    pub fn wait_acked(&self, seq: u64, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while self.status.acked_seq.load(Ordering::SeqCst) < seq {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How far a session got, for the fallback to the old open message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    /// The open message is sent; no answer yet.
    Opened,
    Ready,
}

fn run(
    journal: &Arc<Cache>,
    config: &ShipperConfig,
    agent_state: &(dyn Fn() -> AgentState + Send + Sync),
    log: &(dyn Fn(&str) + Send + Sync),
    status: &Arc<ShipStatus>,
    stop: &AtomicBool,
) {
    let mut backoff = Duration::from_millis(100);
    let mut last_logged: Option<String> = None;
    // An older cache service does not know `OpenAgentFeatures` and closes the link once it
    // reads it, without a refusal message. After two attempts in a row ended so (one
    // could be a network that dropped at that moment), the next attempt opens the old way
    // (without features); the one after that tries the new way again. A failure before
    // the open (unreachable, a wrong key) or a refusal the service explains says nothing
    // about its version.
    let mut closed_at_open = 0u32;
    let mut plain_open = false;
    let mut told_plain = false;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let mut stage = Stage::Connecting;
        let with_features = config.barrier.is_some() && !plain_open;
        let result = session(
            journal,
            config,
            agent_state,
            log,
            status,
            stop,
            with_features,
            &mut stage,
        );
        let closed_at_the_open = stage == Stage::Opened
            && !matches!(
                result,
                Err(Error::Link(LinkError::Refused { .. }))
                    | Err(Error::Link(LinkError::ClosedBy { .. }))
            );
        closed_at_open = match (with_features, closed_at_the_open) {
            (true, true) => closed_at_open + 1,
            _ if stage == Stage::Connecting => closed_at_open,
            _ => 0,
        };
        plain_open = closed_at_open >= 2;
        if plain_open && !told_plain {
            told_plain = true;
            log("the cache service closed the link at the open message (an older build?): connecting without features (no group points) next");
        }
        status.connected.store(false, Ordering::SeqCst);
        if let Err(e) = result {
            let msg = e.to_string();
            if last_logged.as_deref() != Some(&msg) {
                log(&format!("link to the cache service: {msg}"));
                last_logged = Some(msg.clone());
            }
            *status.last_error.lock() = Some(msg);
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(100);
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[allow(clippy::too_many_arguments)]
fn session(
    journal: &Arc<Cache>,
    config: &ShipperConfig,
    agent_state: &(dyn Fn() -> AgentState + Send + Sync),
    log: &(dyn Fn(&str) + Send + Sync),
    status: &Arc<ShipStatus>,
    stop: &AtomicBool,
    with_features: bool,
    stage: &mut Stage,
) -> Result<()> {
    let link = super::connect(&config.addr, &config.security, PeerRole::Agent, &config.vm)?;
    let (mut r, mut w) = (link.reader, link.writer);
    let disks = config.disks.clone();
    wire::write_msg(
        &mut w,
        &if with_features {
            Msg::OpenAgentFeatures {
                disks,
                features: wire::features::ALL,
            }
        } else {
            Msg::OpenAgent { disks }
        },
    )?;
    *stage = Stage::Opened;
    let mut buf = Vec::new();
    let next = match auth::expect(&mut r, &mut buf, "the cache service's answer")? {
        Msg::Ready { next_seq, .. } => next_seq,
        m => {
            return Err(auth::refuse(
                &mut w,
                LinkError::Unexpected {
                    wanted: "ready",
                    got: m.name(),
                },
            ))
        }
    };
    *stage = Stage::Ready;
    let jnext = journal.next_seq();
    if next > jnext {
        return Err(auth::refuse(
            &mut w,
            LinkError::Diverged { why: format!(
                "the cache holds records of '{}' up to {} but this agent's journal ends at {}: the journal was lost or belongs to another VM",
                config.vm,
                next - 1,
                jnext - 1
            ) },
        ));
    }
    let jfirst = journal.stats().first_seq;
    if next < jfirst {
        return Err(auth::refuse(
            &mut w,
            LinkError::Diverged { why: format!(
                "the cache expects record {next} of '{}' but the journal starts at {jfirst}: the cache lost records",
                config.vm
            ) },
        ));
    }
    status.connected.store(true, Ordering::SeqCst);
    *status.last_error.lock() = None;
    log(&format!(
        "connected to the cache service at {}; shipping from record {next}",
        config.addr
    ));
    if next > 1 {
        acked(journal, status, next - 1)?;
    }
    // The sender and the barrier's answers (from the receiver) share the writer.
    let w = Arc::new(Mutex::new(w));
    let done = Arc::new(AtomicBool::new(false));
    let failure: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let receiver = {
        let (journal, done, failure, status) = (
            journal.clone(),
            done.clone(),
            failure.clone(),
            status.clone(),
        );
        let (w, barrier) = (w.clone(), config.barrier.clone());
        // What the cache service has acknowledged, shared with the sender.
        let acked_cell = Arc::new(AtomicU64::new(next.saturating_sub(1)));
        let cell = acked_cell.clone();
        let t = std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                match wire::read_msg(&mut r, &mut buf) {
                    Ok(Some(Msg::Ack { durable_seq })) => {
                        cell.fetch_max(durable_seq, Ordering::SeqCst);
                        status.acked_seq.fetch_max(durable_seq, Ordering::SeqCst);
                        if let Err(e) =
                            journal.set_checkpoint(durable_seq.min(journal.durable_seq()))
                        {
                            *failure.lock() = Some(e);
                            break;
                        }
                    }
                    Ok(Some(Msg::GroupStep(step))) if barrier.is_some() => {
                        let answer = barrier.as_ref().map(|b| b(&step));
                        if let Some(a) = answer {
                            if let Err(e) = wire::write_msg(&mut *w.lock(), &Msg::GroupAnswer(a)) {
                                *failure.lock() = Some(e);
                                break;
                            }
                        }
                    }
                    Ok(Some(Msg::Error { message })) => {
                        *failure.lock() = Some(Error::Link(LinkError::ClosedBy {
                            peer: "the cache service",
                            why: message,
                        }));
                        break;
                    }
                    Ok(Some(m)) => {
                        *failure.lock() = Some(Error::Link(LinkError::Protocol {
                            what: format!("the cache service may not send a {} message", m.name()),
                        }));
                        break;
                    }
                    Ok(None) => {
                        *failure.lock() = Some(Error::Link(LinkError::Closed {
                            peer: "the cache service",
                        }));
                        break;
                    }
                    Err(e) => {
                        *failure.lock() = Some(e);
                        break;
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        (t, acked_cell)
    };
    let (thread, acked_cell) = receiver;
    let sent = send_loop(
        journal,
        &w,
        agent_state,
        status,
        stop,
        &done,
        next,
        &acked_cell,
    );
    if sent.is_ok() && stop.load(Ordering::SeqCst) {
        // A clean stop: give the last acknowledgements a moment to arrive.
        let last = journal.durable_seq();
        let until = Instant::now() + Duration::from_secs(5);
        while acked_cell.load(Ordering::SeqCst) < last
            && !done.load(Ordering::SeqCst)
            && Instant::now() < until
        {
            status
                .acked_seq
                .store(acked_cell.load(Ordering::SeqCst), Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    w.lock().shutdown();
    let _ = thread.join();
    status
        .acked_seq
        .fetch_max(acked_cell.load(Ordering::SeqCst), Ordering::SeqCst);
    sent?;
    let failed = failure.lock().take();
    match failed {
        Some(e) if !stop.load(Ordering::SeqCst) => Err(e),
        _ => Ok(()),
    }
}

fn acked(journal: &Cache, status: &ShipStatus, seq: u64) -> Result<()> {
    status.acked_seq.fetch_max(seq, Ordering::SeqCst);
    journal.set_checkpoint(seq.min(journal.durable_seq()))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn send_loop(
    journal: &Cache,
    w: &Mutex<super::tls::WriteHalf>,
    agent_state: &(dyn Fn() -> AgentState + Send + Sync),
    status: &ShipStatus,
    stop: &AtomicBool,
    done: &AtomicBool,
    from: u64,
    acked_cell: &AtomicU64,
) -> Result<()> {
    let mut reader = journal.reader(from)?;
    let mut batch = vec![0u8; HEADER_BYTES];
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut inflight_bytes = 0u64;
    let mut last_state: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
        let acked = acked_cell.load(Ordering::SeqCst);
        status.acked_seq.fetch_max(acked, Ordering::SeqCst);
        while inflight.front().is_some_and(|(s, _)| *s <= acked) {
            inflight_bytes -= inflight.pop_front().expect("front exists").1;
        }
        if last_state.is_none_or(|t| t.elapsed() >= STATE_EVERY) {
            wire::write_msg(&mut *w.lock(), &Msg::AgentState(agent_state()))?;
            last_state = Some(Instant::now());
        }
        if inflight_bytes >= WINDOW_BYTES {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut last = None;
        while batch.len() < BATCH_BYTES {
            match reader.next_frame(&mut batch, WIRE_BINDING)? {
                Some(h) => last = Some(h.seq),
                None => break,
            }
        }
        if let Some(seq) = last {
            let bytes = (batch.len() - HEADER_BYTES) as u64;
            wire::seal_records(&mut batch);
            {
                let mut w = w.lock();
                w.write_all(&batch).map_err(wire::io_err)?;
                w.flush().map_err(wire::io_err)?;
            }
            batch.truncate(HEADER_BYTES);
            inflight.push_back((seq, bytes));
            inflight_bytes += bytes;
            continue;
        }
        // Caught up with the durable end. Records written but not yet durable (the agent
        // acknowledges writes once written) become durable with the journal's own syncs
        // (every 16 MiB or 200 ms, or the client's FLUSH): wait for the next one, and
        // sync only if none came meanwhile. Syncing at once whenever the shipper caught
        // up cost an fdatasync per batch during a copy, and the disk's bandwidth with it.
        let durable = journal.durable_seq();
        if journal.wait_durable_beyond(durable, Duration::from_millis(100))? == durable
            && journal.next_seq() > durable + 1
        {
            journal.sync()?;
        }
    }
    Ok(())
}
