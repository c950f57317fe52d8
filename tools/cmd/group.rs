//! `group create|add|remove|delete|list`, and the `--group G` forms of `point`, `points`,
//! `failover`, `test-failover`, `test-failover-cleanup` and `failover-commit`
//! (docs/groups.md).

use super::point::{run_hook, with_hooks};
use super::{open_vault, vault, wait, who};
use crate::cli::{FailoverArgs, GroupCmd, PointArgs};
use crate::{output, owner, progress};
use serde_json::{json, Value};
use standby_engine::runtime::control::{Reply, Request};
use standby_engine::vault::group::{Group, GroupPoint, GroupSpec};
use standby_engine::vault::{FailoverReport, PointSpec};
use standby_engine::Error;
use std::process::ExitCode;

pub(crate) fn run(c: GroupCmd) -> Result<(), Error> {
    let root = vault()?;
    let mut v = open_vault(&root, &who("group"))?;
    match c {
        GroupCmd::Create { name, vms, policy } => {
            v.group_create(&name, &vms, policy.as_deref())?;
            println!("created consistency group {name} of {}", vms.join(", "));
        }
        GroupCmd::Add { name, vm } => {
            v.group_add(&name, &vm)?;
            println!("added {vm} to consistency group {name}");
        }
        GroupCmd::Remove { name, vm } => {
            v.group_remove(&name, &vm)?;
            println!("removed {vm} from consistency group {name}");
        }
        GroupCmd::Delete { name } => {
            v.group_delete(&name)?;
            println!("deleted consistency group {name}");
        }
        GroupCmd::List { json } => {
            let groups = v.groups()?;
            let docs: Vec<Value> = groups
                .groups
                .iter()
                .map(|(n, g)| group_json(n, g))
                .collect();
            if json {
                output::print_json(&json!({ "groups": docs }));
            } else if docs.is_empty() {
                println!("no consistency groups (see `standby group create --help`)");
            } else {
                for (n, g) in &groups.groups {
                    println!(
                        "{n}  members {}  policy {}  last group point {}",
                        g.members.join(", "),
                        g.policy.as_deref().unwrap_or("none"),
                        g.points
                            .last()
                            .map(|p| format!("{} ({})", p.id, output::rfc3339(p.time_us)))
                            .unwrap_or_else(|| "none".into())
                    );
                }
            }
        }
    }
    Ok(())
}

fn group_json(name: &str, g: &Group) -> Value {
    json!({
        "group": name,
        "members": g.members,
        "policy": g.policy,
        "points": g.points.len(),
        "last_point": g.points.last().map(point_json),
    })
}

fn point_json(p: &GroupPoint) -> Value {
    json!({
        "id": p.id,
        "time": output::rfc3339(p.time_us),
        "time_us": p.time_us,
        "kind": if p.app_consistent { "app-consistent" } else { "crash-consistent" },
        "name": p.name,
        "members": p.members.iter().map(|m| json!({"vm": m.vm, "point": m.point, "seq": m.seq})).collect::<Vec<_>>(),
    })
}

/// `standby point --group G`: quiesce every member, cut one group point, thaw every member.
pub(crate) fn point(a: PointArgs) -> Result<ExitCode, Error> {
    let Some(group) = a.group else {
        return Err(Error::Invalid("no --group given".into()));
    };
    let root = vault()?;
    let members = open_vault(&root, &who("point"))?
        .groups()?
        .group(&group)?
        .members
        .clone();
    let hook = |what: &str, cmd: &str, vm: &str| {
        let cmd = format!("STANDBY_VM='{vm}' ; export STANDBY_VM ; {cmd}");
        run_hook(what, &cmd).map_err(|e| format!("member {vm}: {e}"))
    };
    // Quiesce all (stopping at the first failure), cut, then thaw every member whose
    // quiesce was attempted — also after a failure, so no guest stays frozen.
    let mut attempted = Vec::new();
    let mut quiesced: Result<(), String> = Ok(());
    if let Some(q) = a.quiesce_command.as_deref() {
        for vm in &members {
            attempted.push(vm.clone());
            if let Err(e) = hook("quiesce", q, vm) {
                quiesced = Err(e);
                break;
            }
        }
    }
    let thaw_all = || -> Option<String> {
        let t = a.thaw_command.as_deref()?;
        let errs: Vec<String> = members
            .iter()
            .filter(|vm| a.quiesce_command.is_none() || attempted.contains(vm))
            .filter_map(|vm| hook("thaw", t, vm).err())
            .collect();
        (!errs.is_empty()).then(|| errs.join("; "))
    };
    let cut = match quiesced {
        Err(q) => Err(format!("{q}; nothing was cut")),
        Ok(()) => with_hooks(
            None,
            None,
            || {
                standby_engine::runtime::group::cut_group_point(
                    &root,
                    &who("point"),
                    &group,
                    a.app_consistent,
                    a.name.as_deref(),
                )
            },
            |_| String::new(),
        ),
    };
    let thawed = thaw_all();
    match (cut, thawed) {
        (Ok(p), None) => {
            println!(
                "cut group point {} of {group} ({}, {}): {}",
                p.id,
                if p.app_consistent {
                    "app-consistent"
                } else {
                    "crash-consistent"
                },
                output::rfc3339(p.time_us),
                p.members
                    .iter()
                    .map(|m| format!("{} point {} at seq {}", m.vm, m.point, m.seq))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        (Ok(p), Some(t)) => {
            eprintln!("standby: cut group point {} of {group}, but {t}", p.id);
            Ok(ExitCode::from(1))
        }
        (Err(e), t) => {
            eprintln!(
                "standby: {e}{}",
                t.map(|t| format!("; {t} too")).unwrap_or_default()
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `standby points --group G`.
pub(crate) fn points(group: &str, as_json: bool) -> Result<(), Error> {
    let v = open_vault(&vault()?, &who("points"))?;
    let groups = v.groups()?;
    let g = groups.group(group)?;
    if as_json {
        output::print_json(&json!({
            "group": group,
            "members": g.members,
            "points": g.points.iter().map(point_json).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    if g.points.is_empty() {
        println!("consistency group {group} has no group points yet (see `standby point --group {group}`)");
    }
    for p in &g.points {
        println!(
            "{}  {}  {}{}  {}",
            p.id,
            output::rfc3339(p.time_us),
            if p.app_consistent {
                "app-consistent"
            } else {
                "crash-consistent"
            },
            p.name
                .as_deref()
                .map(|n| format!("  {n}"))
                .unwrap_or_default(),
            p.members
                .iter()
                .map(|m| format!("{}:{}@{}", m.vm, m.point, m.seq))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// The group point a failover's POINT names (parsed as a VM's point spec by clap).
fn group_spec(p: &PointSpec) -> Result<GroupSpec, Error> {
    Ok(match p {
        PointSpec::Name(n) if n == "latest-group" => GroupSpec::LatestGroup,
        PointSpec::Name(n) if n == "latest-group-app-consistent" => GroupSpec::LatestGroupApp,
        PointSpec::Id(n) => GroupSpec::Id(*n),
        PointSpec::Time(t) => GroupSpec::Time(*t),
        _ => {
            return Err(Error::Invalid(
                "with --group, --point is latest-group, latest-group-app-consistent, a group point id or time:RFC3339".into(),
            ))
        }
    })
}

/// `standby failover --group G` / `test-failover --group G`: every member at one group
/// point, one vm.json per member, one group.json naming them all.
pub(crate) fn failover(f: FailoverArgs, test: bool, network: Option<String>) -> Result<(), Error> {
    let Some(group) = f.group.clone() else {
        return Err(Error::Invalid("no --group given".into()));
    };
    let what = if test { "test-failover" } else { "failover" };
    let spec = group_spec(&f.point)?;
    let root = vault()?;
    let v = open_vault(&root, &who(what))?;
    let groups = v.groups()?;
    let gp = groups.group(&group)?.point(&group, &spec)?.clone();
    let out = f
        .out
        .as_ref()
        .map(|o| std::path::absolute(o).unwrap_or_else(|_| o.clone()));
    if !test {
        // A failover needs every member's VM to itself: refuse before the first member
        // rather than leave the group half failed over. A remote member's owner here is
        // its follower, which lets go of it for the failover (its agent is at the source
        // site, fenced by the failover as for one VM).
        for m in &gp.members {
            if v.catalog().vm(&m.vm).is_ok_and(|r| r.remote.is_some()) {
                continue;
            }
            let sock = v.agent_socket(&m.vm);
            if standby_engine::runtime::control::ask_once(&sock, &m.vm, &Request::Status).is_some()
            {
                return Err(Error::Conflict(format!(
                    "member {} of group {group} has a running agent; stop it (and every member's) before the failover",
                    m.vm
                )));
            }
        }
    }
    drop(v);
    // Every member point must still be there (retention prunes members' points one VM at
    // a time): refuse before the first member rather than fail halfway.
    for m in &gp.members {
        let ids: Vec<u64> = owner::run(
            &root,
            &who(what),
            &m.vm,
            &Request::Points,
            wait(),
            |v| v.points(&m.vm).map(|ps| ps.iter().map(|p| p.id).collect()),
            |reply, _| match reply {
                Reply::Points { points, .. } => Ok(points.iter().map(|(p, _)| p.id).collect()),
                other => Err(owner::unexpected(&other)),
            },
        )?;
        if !ids.contains(&m.point) {
            return Err(Error::NotFound(format!(
                "group point {} of {group} is no longer whole: point {} of member {} was pruned",
                gp.id, m.point, m.vm
            )));
        }
    }
    let mut reports: Vec<FailoverReport> = Vec::new();
    for m in &gp.members {
        let member_out = out.as_ref().map(|o| o.join(&m.vm));
        let point = PointSpec::Id(m.point);
        let r = if test {
            let req = Request::TestFailover {
                point: point.clone(),
                out: member_out.clone(),
                network: network.clone(),
            };
            owner::run(
                &root,
                &who(what),
                &m.vm,
                &req,
                wait(),
                |v| {
                    let mut bar = progress::Bar::new();
                    v.failover(
                        &m.vm,
                        point.clone(),
                        member_out.as_deref(),
                        true,
                        network.as_deref(),
                        &mut bar,
                    )
                },
                |reply, _| match reply {
                    Reply::TestFailover { report } => Ok(report),
                    other => Err(owner::unexpected(&other)),
                },
            )
        } else {
            let mut v = open_vault(&root, &who(what))?;
            let mut bar = progress::Bar::new();
            v.failover(&m.vm, point, member_out.as_deref(), false, None, &mut bar)
        };
        match r {
            Ok(r) => reports.push(r),
            Err(e) => {
                return Err(Error::Conflict(format!(
                    "{what} of group {group}: member {} failed: {}{}",
                    m.vm,
                    output::one_line(&e),
                    if reports.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (members {} are already done)",
                            reports
                                .iter()
                                .map(|r| r.vm.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                )))
            }
        }
    }
    let v = open_vault(&root, &who(what))?;
    let dir = v.group_failover_dir(&group, test, out.as_deref());
    let doc = json!({
        "group": group,
        "test": test,
        "group_point": point_json(&gp),
        "members": reports.iter().map(|r| json!({
            "vm": r.vm,
            "point": r.point.as_ref().map(|p| p.id),
            "seq": r.seq,
            "dir": r.dir,
            "manifest": r.manifest,
        })).collect::<Vec<_>>(),
    });
    let manifest = v.write_group_manifest(&dir, &doc)?;
    if test {
        let mut v = open_vault(&root, &who(what))?;
        v.group_set_test_failover(
            &group,
            Some(standby_engine::vault::group::GroupTestFailover {
                dir: dir.clone(),
                members: reports.iter().map(|r| r.vm.clone()).collect(),
            }),
        )?;
    }
    if f.json {
        let mut d = doc.clone();
        d["group_manifest"] = json!(manifest);
        d["reports"] = serde_json::to_value(&reports).unwrap_or_default();
        output::print_json(&d);
    } else {
        for r in &reports {
            output::failover(r);
        }
        println!(
            "{what} of group {group} to group point {}: {} members, {}",
            gp.id,
            reports.len(),
            manifest.display()
        );
    }
    Ok(())
}

pub(crate) fn commit(group: &str) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("failover-commit"))?;
    let members = v.groups()?.group(group)?.members.clone();
    for vm in &members {
        v.failover_commit(vm)?;
    }
    println!(
        "failover of group {group} committed ({}); its members' recovery points are deleted",
        members.join(", ")
    );
    Ok(())
}

pub(crate) fn test_cleanup(group: &str) -> Result<(), Error> {
    let mut v = open_vault(&vault()?, &who("test-failover-cleanup"))?;
    let Some(t) = v.groups()?.group(group)?.test_failover.clone() else {
        return Err(Error::Conflict(format!(
            "group {group} has no test failover to clean up"
        )));
    };
    let members = t.members;
    let mut done = Vec::new();
    for vm in &members {
        match v.test_failover_cleanup(vm) {
            Ok(_) => done.push(vm.clone()),
            Err(Error::Conflict(_)) => {} // this member had no test failover
            Err(e) => return Err(e),
        }
    }
    v.remove_group_manifest(&t.dir)?;
    v.group_set_test_failover(group, None)?;
    println!(
        "removed the test failover of group {group} ({})",
        done.join(", ")
    );
    Ok(())
}

/// The groups for `status`: members, the last group point, and health (the worst of the
/// members' that this status shows).
pub(crate) fn status_json(
    v: &standby_engine::vault::Vault,
    docs: &[Value],
) -> Result<Vec<Value>, Error> {
    let rank = |h: &str| match h {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    };
    let groups = v.groups()?;
    Ok(groups
        .groups
        .iter()
        .filter(|(_, g)| {
            g.members
                .iter()
                .any(|m| docs.iter().any(|d| d["vm"] == json!(m)))
        })
        .map(|(n, g)| {
            let health = g
                .members
                .iter()
                .filter_map(|m| docs.iter().find(|d| d["vm"] == json!(m)))
                .filter_map(|d| d["health"].as_str())
                .max_by_key(|h| rank(h))
                .unwrap_or("healthy")
                .to_string();
            let mut d = group_json(n, g);
            d["health"] = json!(health);
            d
        })
        .collect())
}

pub(crate) fn print_status(groups: &[Value]) {
    for g in groups {
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        let members: Vec<String> = g["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        println!(
            "group {}  health {}  members {}",
            s(&g["group"]),
            s(&g["health"]),
            members.join(", ")
        );
        match g["last_point"].as_object() {
            Some(p) => println!(
                "  last group point {} ({}, {})",
                p["id"],
                s(&p["kind"]),
                s(&p["time"])
            ),
            None => println!("  no group point yet"),
        }
    }
}
