//! The target site's puller: receives a VM's records from the cache service into the
//! vault's own copy of the change log (the staging log the processor applies), and tells
//! the cache service what is durable here so its log can trim.
//!
//! A record counts as recoverable at the target once it is durable in the staging log:
//! `failover latest` applies it even if the source site is gone by then. On every
//! (re)connect the puller asks for the record after the staging log's last, so nothing is
//! pulled twice and nothing is skipped.

use super::auth;
use super::tls::{ReadHalf, WriteHalf};
use super::wire::{self, DiskInfo, Msg, SourceState};
use crate::cache::Cache;
use crate::error::{Error, LinkError, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Who is at the other end of a pull, in errors.
const CACHE: &str = "the cache service";

/// What the puller knows, for status.
#[derive(Debug, Clone, Default)]
pub struct PullStatus {
    pub connected: bool,
    /// When the link last went up or down (µs since the epoch).
    pub since_us: u64,
    pub last_error: Option<String>,
    /// The source's state as last reported, and when it arrived (µs).
    pub source: Option<SourceState>,
    pub source_at_us: u64,
    /// Newest record durable in the staging log, and the time it was accepted at the source.
    pub durable_seq: u64,
    pub durable_time_us: u64,
    /// Records and bytes received in this process's life.
    pub records: u64,
    pub bytes: u64,
}

/// Tell the cache service that the VM failed over here (`reason` names the failover): it
/// refuses the old source's agent from then on. Returns once the service has it durably.
pub fn fence(mut r: ReadHalf, mut w: WriteHalf, reason: &str) -> Result<()> {
    wire::write_msg(
        &mut w,
        &Msg::Fence {
            reason: reason.to_string(),
        },
    )?;
    let mut buf = Vec::new();
    match auth::expect(&mut r, &mut buf, "the cache service's answer to the fence")? {
        Msg::Ready { .. } => Ok(()),
        m => Err(auth::refuse(
            &mut w,
            LinkError::Unexpected {
                wanted: "ready",
                got: m.name(),
            },
        )),
    }
}

/// Run one session over an authenticated link until it ends or `stop` is set (checked at
/// every message; the source reports its state every second). `expected` are the VM's
/// disks as the vault knows them.
pub fn session(
    staging: &Arc<Cache>,
    mut r: ReadHalf,
    w: WriteHalf,
    expected: &[DiskInfo],
    status: &Arc<Mutex<PullStatus>>,
    stop: &AtomicBool,
) -> Result<()> {
    let w = Arc::new(Mutex::new(w));
    let from = staging.next_seq();
    wire::write_msg(&mut *w.lock(), &Msg::OpenProcessor { from_seq: from })?;
    let mut buf = Vec::new();
    match auth::expect(&mut r, &mut buf, "the cache service's answer")? {
        Msg::Ready { disks, .. } if disks == expected => {}
        Msg::Ready { disks, .. } => {
            return Err(auth::refuse(
                &mut *w.lock(),
                LinkError::Diverged { why: format!(
                    "the cache describes disks {disks:?}, the vault protects {expected:?}: not the same VM"
                ) },
            ))
        }
        m => {
            return Err(auth::refuse(
                &mut *w.lock(),
                LinkError::Unexpected { wanted: "ready", got: m.name() },
            ))
        }
    }
    {
        let mut st = status.lock();
        st.connected = true;
        st.since_us = crate::now_us();
        st.last_error = None;
    }
    // Checkpoints go back as records become durable here, while more arrive.
    let (tx, rx) = crossbeam_channel::unbounded::<(u64, u64)>();
    let acker = {
        let (staging, w, status) = (staging.clone(), w.clone(), status.clone());
        std::thread::spawn(move || -> Result<()> {
            while let Ok(mut last) = rx.recv() {
                // Coalesce to the newest: a keepalive repeats an older position.
                while let Ok(x) = rx.try_recv() {
                    if x.0 >= last.0 {
                        last = x;
                    }
                }
                staging.wait_durable(last.0)?;
                {
                    let mut st = status.lock();
                    if last.0 >= st.durable_seq {
                        st.durable_seq = last.0;
                        st.durable_time_us = last.1;
                    }
                }
                wire::write_msg(&mut *w.lock(), &Msg::Checkpoint { seq: last.0 })?;
            }
            Ok(())
        })
    };
    let outcome = (|| -> Result<()> {
        // An acknowledger that failed ends the session (its error is reported below).
        while !stop.load(Ordering::SeqCst) && !acker.is_finished() {
            let msg = match wire::read_msg(&mut r, &mut buf)? {
                Some(m) => m,
                None => return Err(Error::Link(LinkError::Closed { peer: CACHE })),
            };
            match msg {
                Msg::Records(payload) => {
                    let frames = wire::check_records(&payload, expected)?;
                    let mut last = None;
                    for (i, (at, h)) in frames.iter().enumerate() {
                        let end = frames.get(i + 1).map(|(a, _)| *a).unwrap_or(payload.len());
                        if h.seq >= staging.next_seq() {
                            staging.append_frame(&payload[*at..end], wire::WIRE_BINDING)?;
                        }
                        last = Some((h.seq, h.time_us));
                    }
                    let mut st = status.lock();
                    st.records += frames.len() as u64;
                    st.bytes += payload.len() as u64;
                    drop(st);
                    if let Some(l) = last {
                        let _ = tx.send(l);
                    }
                }
                Msg::SourceState(s) => {
                    let mut st = status.lock();
                    st.source = Some(s);
                    st.source_at_us = crate::now_us();
                    // Answer it (it comes every second) with the checkpoint again: an idle
                    // link stays alive.
                    let _ = tx.send((st.durable_seq, st.durable_time_us));
                }
                Msg::Error { message } => {
                    return Err(Error::Link(LinkError::ClosedBy {
                        peer: CACHE,
                        why: message,
                    }))
                }
                m => {
                    return Err(Error::Link(LinkError::Protocol {
                        what: format!("the cache service may not send a {} message", m.name()),
                    }))
                }
            }
        }
        Ok(())
    })();
    drop(tx);
    let acked = acker.join().unwrap_or(Ok(()));
    if let Err(e) = &outcome {
        // A peer that closed the link hears nothing more from us.
        if !matches!(
            e,
            Error::Link(LinkError::Closed { .. } | LinkError::ClosedBy { .. })
        ) {
            let _ = wire::write_msg(
                &mut *w.lock(),
                &Msg::Error {
                    message: e.to_string(),
                },
            );
        }
    }
    w.lock().shutdown();
    {
        let mut st = status.lock();
        st.connected = false;
        st.since_us = crate::now_us();
    }
    outcome.and(acked)
}
