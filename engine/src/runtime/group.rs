//! The group point barrier (docs/groups.md): the coordinator (`standby point --group G`)
//! asks every member's owner to hold its client's acknowledgements, then to write the
//! marker carrying the group point's id, then to release; the group point is listed in the
//! vault's group catalog only once every member's marker is durable, every hold lasted
//! until its release and every member point is cut — last, so a listed group point is
//! whole.
//!
//! Bounds: a member that does not answer a step within [`MEMBER_ANSWER`] fails the group
//! point for all (the others are released at once); every hold lapses on its own after
//! [`HOLD_FOR`], so a coordinator that dies never leaves a member holding writes.
//!
//! Members are local (their embedded agent answers on its control socket) or remote (two
//! sites): a remote member's barrier steps go over the link to its cache service, which
//! relays them to the VM's agent at the source site, where the hold is (`link::service`);
//! its marker travels in the log like any record, and the member point is cut when the
//! target's follower has applied it (the settle step, on the follower's control socket).
//! Members of one group may ship to one cache service or several.

use super::control::{ask_within, Reply, Request};
use super::owner::VmOwner;
use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::link::wire::{self, BarrierStep, GroupAnswer, GroupStep, Msg, PeerRole};
use crate::record::{Consistency, Marker, MarkerKind};
use crate::vault::group::{GroupPoint, MemberPoint};
use crate::vault::{LockWait, Vault};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the coordinator waits for a member's answer to one barrier step.
pub const MEMBER_ANSWER: Duration = Duration::from_secs(2);
/// How long a member holds acknowledgements at most: the three steps' bound, and some.
pub const HOLD_FOR: Duration = Duration::from_secs(5);
/// How long a member may take to process up to its marker once the barrier is over
/// (nothing waits on it: the writes flow again).
pub const SETTLE_WITHIN: Duration = Duration::from_secs(120);

/// Step 1 on a member's agent: hold its client's acknowledgements.
fn agent_hold(agent: &Agent, vm: &str, group_point: &str, hold_ms: u64) -> Result<()> {
    if !agent
        .ack_hold()
        .hold(group_point, Duration::from_millis(hold_ms))
    {
        return Err(Error::Conflict(format!(
            "VM '{vm}' is in another group point's barrier"
        )));
    }
    Ok(())
}

/// Step 2: under the hold, the marker carrying the group point's id, durable; its seq.
fn agent_cut(
    agent: &Agent,
    vm: &str,
    group_point: &str,
    app: bool,
    name: Option<String>,
) -> Result<u64> {
    if let Some(n) = &name {
        crate::record::check_point_name(n).map_err(Error::Invalid)?;
    }
    if !agent.ack_hold().holding(group_point) {
        return Err(Error::Conflict(format!(
            "VM '{vm}' no longer holds for group point {group_point} (its hold lapsed)"
        )));
    }
    agent.group_marker(
        group_point,
        &Marker {
            consistency: if app {
                Consistency::App
            } else {
                Consistency::Crash
            },
            name,
            group: Some(group_point.to_string()),
            kind: MarkerKind::Point,
        },
    )
}

/// A source-site agent's answer to a barrier step the cache service relayed.
pub(crate) fn answer_step(agent: &Agent, vm: &str, s: &GroupStep) -> GroupAnswer {
    let r = match s.step {
        BarrierStep::Hold => agent_hold(agent, vm, &s.group_point, s.hold_ms).map(|()| 0),
        BarrierStep::Cut => {
            let name = (!s.name.is_empty()).then(|| s.name.clone());
            agent_cut(agent, vm, &s.group_point, s.app, name)
        }
        BarrierStep::Release => agent.group_release(&s.group_point).map(|b| b as u64),
    };
    match r {
        Ok(value) => GroupAnswer {
            tag: s.tag,
            error: String::new(),
            value,
        },
        Err(e) => GroupAnswer {
            tag: s.tag,
            error: e.to_string().replace('\n', " "),
            value: 0,
        },
    }
}

/// A member owner's side of the barrier (local members), and the settle step (all).
pub(super) fn handle(owner: &VmOwner, req: Request) -> Result<Reply> {
    let agent = || {
        owner.agent.as_ref().ok_or_else(|| {
            Error::Conflict(format!(
                "VM '{}' is replicated from a remote site: its barrier goes through its cache service",
                owner.vm
            ))
        })
    };
    match req {
        Request::GroupHold {
            group_point,
            hold_ms,
        } => {
            agent_hold(agent()?, &owner.vm, &group_point, hold_ms)?;
            Ok(Reply::GroupHeld)
        }
        Request::GroupCut {
            group_point,
            app,
            name,
            hold_ms,
        } => {
            let agent = agent()?;
            if let Some(ms) = hold_ms {
                agent_hold(agent, &owner.vm, &group_point, ms)?;
            }
            match agent_cut(agent, &owner.vm, &group_point, app, name) {
                Ok(seq) => Ok(Reply::GroupMarker { seq }),
                Err(e) => {
                    if hold_ms.is_some() {
                        // The hold this request took: the coordinator's release may not come.
                        agent.ack_hold().release(&group_point);
                    }
                    Err(e)
                }
            }
        }
        Request::GroupRelease { group_point } => Ok(Reply::GroupReleased {
            intact: agent()?.group_release(&group_point)?,
        }),
        Request::GroupSettle { seq } => settle(owner, seq),
        _ => Err(Error::Invalid("not a group barrier request".into())),
    }
}

/// Process up to the marker at `seq` and return its point. A remote member's marker may
/// still be on its way from the cache service: its follower passes until it has applied
/// that far (bounded).
fn settle(owner: &VmOwner, seq: u64) -> Result<Reply> {
    let until = Instant::now() + SETTLE_WITHIN / 2;
    loop {
        let mut p = owner.processor.lock();
        let report = p.run_pass()?;
        for pt in &report.points {
            (owner.events)(super::Event::Point {
                vm: owner.vm.clone(),
                point: pt.clone(),
            });
        }
        let found = report
            .points
            .into_iter()
            .find(|pt| pt.seq == seq)
            .or_else(|| p.replica().point_at_seq(seq));
        if let Some(point) = found {
            return Ok(Reply::Point {
                seq,
                point: Some(point),
            });
        }
        if p.replica().applied_seq() >= seq || owner.agent.is_some() {
            return Err(Error::Conflict(format!(
                "the marker of VM '{}' at seq {seq} cut no point (is it in a resync window?)",
                owner.vm
            )));
        }
        drop(p);
        if Instant::now() >= until {
            return Err(Error::Conflict(format!(
                "the marker of VM '{}' at seq {seq} did not reach the vault within {} s",
                owner.vm,
                (SETTLE_WITHIN / 2).as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One step of the barrier, as the coordinator asks it of every member.
#[derive(Clone)]
enum Step {
    /// Hold the client's acknowledgements, then write the marker (steps 1 and 2 of
    /// docs/groups.md at once: one member's hold begins just before its own marker, which
    /// is all the proof asks).
    HoldCut {
        app: bool,
        name: Option<String>,
    },
    Release,
}

/// A member as the coordinator reaches it.
enum Member {
    /// Its embedded agent's control socket.
    Local { vm: String, sock: PathBuf },
    /// Its agent at the source site, through the cache service (one link per member,
    /// open for the whole barrier).
    Remote {
        vm: String,
        cache: String,
        link: crate::link::Link,
        tag: u64,
    },
}

impl Member {
    fn vm(&self) -> &str {
        match self {
            Member::Local { vm, .. } | Member::Remote { vm, .. } => vm,
        }
    }

    fn ask(&mut self, gid: &str, step: &Step, timeout: Duration) -> Result<Reply> {
        match self {
            Member::Local { vm, sock } => {
                let req = match step.clone() {
                    Step::HoldCut { app, name } => Request::GroupCut {
                        group_point: gid.to_string(),
                        app,
                        name,
                        hold_ms: Some(HOLD_FOR.as_millis() as u64),
                    },
                    Step::Release => Request::GroupRelease {
                        group_point: gid.to_string(),
                    },
                };
                match ask_within(sock, vm, &req, Some(timeout)) {
                    None => Err(Error::Conflict(format!(
                        "VM '{vm}' has no running agent (group points go through every member's agent)"
                    ))),
                    Some(r) => r.map(|(reply, _)| reply).map_err(|e| match e {
                        Error::Io { .. } => Error::Conflict(format!(
                            "VM '{vm}' did not answer within {} ms ({e})",
                            timeout.as_millis()
                        )),
                        other => other,
                    }),
                }
            }
            Member::Remote {
                vm,
                cache,
                link,
                tag,
            } => {
                let late = |e: Error| {
                    match e {
                    Error::Link(crate::error::LinkError::TimedOut) => Error::Conflict(format!(
                        "VM '{vm}' did not answer within {} ms (through the cache service at {cache})",
                        timeout.as_millis()
                    )),
                    e => Error::Conflict(format!(
                        "VM '{vm}': the cache service at {cache}: {}",
                        e.to_string().replace('\n', " ")
                    )),
                }
                };
                let mut remote = |s: BarrierStep, app: bool, name: String| -> Result<u64> {
                    *tag += 1;
                    let msg = Msg::GroupStep(GroupStep {
                        tag: *tag,
                        step: s,
                        group_point: gid.to_string(),
                        hold_ms: HOLD_FOR.as_millis() as u64,
                        app,
                        name,
                    });
                    wire::write_msg(&mut link.writer, &msg).map_err(late)?;
                    let mut buf = Vec::new();
                    let a = loop {
                        match crate::link::auth::expect(&mut link.reader, &mut buf, "its answer")
                            .map_err(late)?
                        {
                            Msg::GroupAnswer(a) if a.tag == *tag => break a,
                            Msg::GroupAnswer(_) => continue, // a late answer to an earlier step
                            m => {
                                return Err(late(Error::Link(
                                    crate::error::LinkError::Unexpected {
                                        wanted: "a group answer",
                                        got: m.name(),
                                    },
                                )))
                            }
                        }
                    };
                    if !a.error.is_empty() {
                        return Err(Error::Conflict(a.error));
                    }
                    Ok(a.value)
                };
                // The link's steps stay three (what every cache service and agent speaks).
                match step.clone() {
                    Step::HoldCut { app, name } => {
                        remote(BarrierStep::Hold, false, String::new())?;
                        let seq = remote(BarrierStep::Cut, app, name.unwrap_or_default())?;
                        Ok(Reply::GroupMarker { seq })
                    }
                    Step::Release => Ok(Reply::GroupReleased {
                        intact: remote(BarrierStep::Release, false, String::new())? == 1,
                    }),
                }
            }
        }
    }
}

/// Reach every member: local ones by their control socket, remote ones over a link to
/// their cache service (opened at once, in parallel, before any hold).
fn reach(vault: &Vault, vms: &[String]) -> Vec<Result<Member>> {
    std::thread::scope(|s| {
        let ts: Vec<_> = vms
            .iter()
            .map(|vm| {
                s.spawn(move || -> Result<Member> {
                    let rec = vault.catalog().vm(vm)?;
                    match &rec.remote {
                        None => Ok(Member::Local {
                            vm: vm.clone(),
                            sock: vault.agent_socket(vm),
                        }),
                        Some(remote) => {
                            let security = vault.link_security(remote.insecure_loopback)?;
                            let link = crate::link::connect_timed(
                                &remote.cache,
                                &security,
                                PeerRole::Coordinator,
                                vm,
                                MEMBER_ANSWER,
                            )
                            .map_err(|e| {
                                Error::Conflict(format!(
                                    "VM '{vm}': cannot reach its cache service at {}: {}",
                                    remote.cache,
                                    e.to_string().replace('\n', " ")
                                ))
                            })?;
                            Ok(Member::Remote {
                                vm: vm.clone(),
                                cache: remote.cache.clone(),
                                link,
                                tag: 0,
                            })
                        }
                    }
                })
            })
            .collect();
        ts.into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a barrier thread panicked".into())))
            })
            .collect()
    })
}

/// Ask every member the same step at once; each answer (or why there is none) by member.
fn all(members: &mut [Member], gid: &str, step: Step, timeout: Duration) -> Vec<Result<Reply>> {
    std::thread::scope(|s| {
        let asks: Vec<_> = members
            .iter_mut()
            .map(|m| {
                let step = step.clone();
                s.spawn(move || m.ask(gid, &step, timeout))
            })
            .collect();
        asks.into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a barrier thread panicked".into())))
            })
            .collect()
    })
}

fn first_failure(members: &[Member], rs: &[Result<Reply>]) -> Option<String> {
    members.iter().zip(rs).find_map(|(m, r)| {
        r.as_ref()
            .err()
            .map(|e| format!("member {}: {}", m.vm(), e.to_string().replace('\n', " ")))
    })
}

/// Cut one group point of `group` now: the barrier across its members, then every member
/// point, then the group catalog. Fails as a whole (nothing listed) if any member fails.
pub fn cut_group_point(
    root: &Path,
    who: &str,
    group: &str,
    app: bool,
    name: Option<&str>,
) -> Result<GroupPoint> {
    if let Some(n) = name {
        crate::record::check_point_name(n).map_err(Error::Invalid)?;
    }
    let mut vault = Vault::open(root, who, LockWait::Block)?;
    let (id, vms) = vault.group_reserve_point(group)?;
    let gid = GroupPoint::marker_id(group, id);
    let fail = |why: String| {
        Error::Conflict(format!(
            "group point {gid} failed ({why}); no group point was listed"
        ))
    };
    let mut members = Vec::new();
    for (vm, m) in vms.iter().zip(reach(&vault, &vms)) {
        match m {
            Ok(m) => members.push(m),
            Err(e) => {
                return Err(fail(format!(
                    "member {vm}: {}",
                    e.to_string().replace('\n', " ")
                )))
            }
        }
    }
    let cut = all(
        &mut members,
        &gid,
        Step::HoldCut {
            app,
            name: name.map(str::to_string),
        },
        MEMBER_ANSWER,
    );
    // Every marker is written and every member holds: what was acknowledged until now is in
    // the group point, nothing after it is acknowledged yet.
    let time_us = crate::now_us();
    let released = all(&mut members, &gid, Step::Release, MEMBER_ANSWER);
    if let Some(why) = first_failure(&members, &cut) {
        return Err(fail(why));
    }
    if let Some(why) = first_failure(&members, &released) {
        return Err(fail(why));
    }
    for (m, r) in members.iter().zip(&released) {
        if !matches!(r, Ok(Reply::GroupReleased { intact: true })) {
            return Err(fail(format!(
                "member {}'s hold lapsed before the release",
                m.vm()
            )));
        }
    }
    let seqs: Vec<u64> = cut
        .iter()
        .map(|r| match r {
            Ok(Reply::GroupMarker { seq }) => Ok(*seq),
            _ => Err(fail("a member answered the cut with something else".into())),
        })
        .collect::<Result<_>>()?;
    // The links are done with; the settle step asks each member's owner at the target.
    let owners: Vec<(String, PathBuf)> = members
        .iter()
        .map(|m| (m.vm().to_string(), vault.agent_socket(m.vm())))
        .collect();
    drop(members);
    let settled = std::thread::scope(|s| {
        let ts: Vec<_> = owners
            .iter()
            .zip(&seqs)
            .map(|((vm, sock), seq)| {
                s.spawn(move || {
                    ask_within(
                        sock,
                        vm,
                        &Request::GroupSettle { seq: *seq },
                        Some(SETTLE_WITHIN),
                    )
                    .unwrap_or_else(|| {
                        Err(Error::Conflict(format!(
                            "VM '{vm}' has no running owner at this site to cut its point (its agent, or `standby process --follow` for a remote VM)"
                        )))
                    })
                    .map(|(r, _)| r)
                })
            })
            .collect();
        ts.into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a thread panicked".into())))
            })
            .collect::<Vec<_>>()
    });
    let mut points = Vec::new();
    for ((vm, _), r) in owners.iter().zip(settled) {
        match r {
            Ok(Reply::Point {
                point: Some(p),
                seq,
            }) => points.push(MemberPoint {
                vm: vm.clone(),
                point: p.id,
                seq,
            }),
            Ok(_) => return Err(fail(format!("member {vm} answered with no point"))),
            Err(e) => {
                return Err(fail(format!(
                    "member {vm}: {}",
                    e.to_string().replace('\n', " ")
                )))
            }
        }
    }
    let gp = GroupPoint {
        id,
        time_us,
        app_consistent: app,
        name: name.map(str::to_string),
        members: points,
    };
    vault.group_record_point(group, gp.clone())?;
    Ok(gp)
}

/// How often a member's agent looks whether its group's policy owes a group point.
pub const POLICY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Cut the group points a group's policy asks for: run by every member's owner (its
/// embedded agent, or the follower of a remote VM) until either flag is set, acted on
/// only by the group's first member (one coordinator per group, whichever
/// members come and go). A group point is due once the policy's crash interval has passed
/// since the last one (or the last attempt); a failed one is reported and tried again an
/// interval later.
pub(crate) fn policy_loop(
    root: &Path,
    who: &str,
    vm: &str,
    stop: &std::sync::atomic::AtomicBool,
    also_stop: &std::sync::atomic::AtomicBool,
    events: &super::Events,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    let mut last_try: Option<std::time::Instant> = None;
    let mut last_trouble: Option<String> = None;
    let mut next_check = std::time::Instant::now();
    while !stop.load(Ordering::SeqCst) && !also_stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if std::time::Instant::now() < next_check {
            continue;
        }
        next_check = std::time::Instant::now() + POLICY_CHECK_EVERY;
        let due = (|| -> Result<Option<String>> {
            let vault = Vault::open(root, who, LockWait::Fail)?;
            let groups = vault.groups()?;
            let Some(name) = groups.group_of(vm) else {
                return Ok(None);
            };
            let g = groups.group(name)?;
            if g.members.first().map(String::as_str) != Some(vm) {
                return Ok(None);
            }
            let Some(policy) = &g.policy else {
                return Ok(None);
            };
            let every = vault.catalog().policy(policy)?.crash_interval;
            let since_last = g
                .points
                .last()
                .map(|p| Duration::from_micros(crate::now_us().saturating_sub(p.time_us)));
            let tried = last_try.map(|t| t.elapsed());
            let due = since_last.is_none_or(|d| d >= every) && tried.is_none_or(|d| d >= every);
            Ok(due.then(|| name.to_string()))
        })();
        let group = match due {
            Ok(Some(g)) => g,
            Ok(None) | Err(_) => continue, // a busy or changing vault: look again later
        };
        last_try = Some(std::time::Instant::now());
        match cut_group_point(root, who, &group, false, None) {
            Ok(gp) => {
                last_trouble = None;
                events(super::Event::Notice(format!(
                    "group point {} of {group} cut ({} members)",
                    gp.id,
                    gp.members.len()
                )));
            }
            Err(e) => {
                let msg = e.to_string();
                if last_trouble.as_deref() != Some(&msg) {
                    events(super::Event::Trouble(format!("{group}: {msg}")));
                    last_trouble = Some(msg);
                }
            }
        }
    }
    Ok(())
}
