//! The cache service's relay of group point barriers (docs/groups.md, two sites): the
//! target's group coordinator opens a link per member VM (role `Coordinator`) and sends
//! each barrier step as a `GroupStep`; the service passes it on to that VM's agent over
//! the agent's own link (the agent connects out, so this is the one way to reach it) and
//! relays the agent's `GroupAnswer` back.
//!
//! Invariants: a step goes only to an agent that declared
//! [`super::wire::features::GROUP_BARRIER`] (an older agent is never sent a message it
//! does not know: the coordinator hears why instead); a step the agent does not answer
//! within the wait, or an agent that disconnects meanwhile, is answered with an error, so
//! the coordinator fails the group point. The hold itself lives in the agent and lapses
//! there on its own, whatever happens to the service or the coordinator.

use super::tls::{ReadHalf, WriteHalf};
use super::wire::{self, features, GroupAnswer, GroupStep, Msg};
use crate::error::{Error, LinkError, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the service waits for the agent's answer to one step (the coordinator's own
/// bound is shorter; this only frees the relay's thread).
const AGENT_ANSWER: Duration = Duration::from_secs(5);

/// One VM's relay: its agent's link while one is connected, and the steps in flight.
#[derive(Default)]
pub(super) struct Relay {
    agent: Mutex<Option<AgentEnd>>,
    pending: Mutex<HashMap<u64, crossbeam_channel::Sender<GroupAnswer>>>,
    next_tag: AtomicU64,
}

struct AgentEnd {
    session: u64,
    features: u64,
    w: Arc<Mutex<WriteHalf>>,
}

impl Relay {
    /// The agent's session `session` is up, speaking `features`, writing through `w`.
    pub(super) fn attach(&self, session: u64, features: u64, w: Arc<Mutex<WriteHalf>>) {
        *self.agent.lock() = Some(AgentEnd {
            session,
            features,
            w,
        });
    }

    /// The agent's session ended: steps in flight are answered with an error at once.
    pub(super) fn detach(&self, session: u64) {
        let mut a = self.agent.lock();
        if a.as_ref().is_some_and(|e| e.session == session) {
            *a = None;
            self.pending.lock().clear();
        }
    }

    /// An answer from the agent: to the step that waits for it (a late one is dropped).
    pub(super) fn answered(&self, a: GroupAnswer) {
        if let Some(tx) = self.pending.lock().remove(&a.tag) {
            let _ = tx.send(a);
        }
    }

    /// Pass `step` on to the VM's agent and wait for its answer (tagged as the
    /// coordinator tagged the step).
    fn ask(&self, vm: &str, step: &GroupStep) -> GroupAnswer {
        let fail = |why: String| GroupAnswer {
            tag: step.tag,
            error: why,
            value: 0,
        };
        let tag = self.next_tag.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let w = {
            let a = self.agent.lock();
            let Some(end) = a.as_ref() else {
                return fail(format!(
                    "VM '{vm}''s agent is not connected to the cache service"
                ));
            };
            if end.features & features::GROUP_BARRIER == 0 {
                return fail(format!(
                    "VM '{vm}''s agent connected without declaring group points (an older build: upgrade it; or it took this service for an older one: its log says so)"
                ));
            }
            self.pending.lock().insert(tag, tx);
            end.w.clone()
        };
        let relayed = Msg::GroupStep(GroupStep {
            tag,
            ..step.clone()
        });
        if let Err(e) = wire::write_msg(&mut *w.lock(), &relayed) {
            self.pending.lock().remove(&tag);
            return fail(format!("cannot reach VM '{vm}''s agent: {e}"));
        }
        match rx.recv_timeout(AGENT_ANSWER) {
            Ok(a) => GroupAnswer { tag: step.tag, ..a },
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                self.pending.lock().remove(&tag);
                fail(format!(
                    "VM '{vm}''s agent did not answer within {} ms",
                    AGENT_ANSWER.as_millis()
                ))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => fail(format!(
                "VM '{vm}''s agent disconnected from the cache service during the barrier"
            )),
        }
    }
}

/// A coordinator's session for one VM: relay each step (the first already read) and
/// answer it, until the coordinator closes the link.
pub(super) fn coordinator_session(
    relay: &Relay,
    vm: &str,
    first: GroupStep,
    mut r: ReadHalf,
    mut w: WriteHalf,
) -> Result<()> {
    let mut step = first;
    let mut buf = Vec::new();
    loop {
        let answer = relay.ask(vm, &step);
        wire::write_msg(&mut w, &Msg::GroupAnswer(answer))?;
        step = match wire::read_msg(&mut r, &mut buf)? {
            None => return Ok(()),
            Some(Msg::GroupStep(s)) => s,
            Some(Msg::Error { message }) => {
                return Err(Error::Link(LinkError::ClosedBy {
                    peer: "the group coordinator",
                    why: message,
                }))
            }
            Some(m) => {
                return Err(Error::Link(LinkError::Protocol {
                    what: format!("a group coordinator may not send a {} message", m.name()),
                }))
            }
        };
    }
}
