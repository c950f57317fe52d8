//! How the CLI shows things: tables with units for people, one JSON document for scripts.
//! The JSON field names are a contract (add fields, never rename them).

use serde_json::{json, Value};
use standby_engine::policy::Policy;
use standby_engine::replica::{Damage, PointInfo, PointKind, VerifyReport};
use standby_engine::vault::{Catalog, FailoverReport, VmStatus};
use standby_engine::Error;

/// Write one line to stdout (the crate's `println!`). When the reader has gone away (a
/// closed pipe, `| head`), the command ends at once with exit status 0, as a filter's
/// producer should, without a word; any other write error is one line and exit 1.
pub fn line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("standby: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

pub fn rfc3339(us: u64) -> String {
    standby_engine::vault::spec::rfc3339(us)
}

pub fn kind(k: PointKind) -> &'static str {
    match k {
        PointKind::Initial => "initial",
        PointKind::CrashConsistent => "crash-consistent",
        PointKind::AppConsistent => "app-consistent",
    }
}

/// Bytes with a binary unit: 512 B, 4.0 KiB, 1.5 GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn secs(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// An error as one line (no backtrace, no chain of causes on separate lines).
pub fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}

pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
    );
}

pub fn policy_line(p: &Policy) -> String {
    format!(
        "crash points every {}, app-consistent {}, retention {}, thinning after {}, any-moment window {}, RPO threshold {}",
        secs(p.crash_interval),
        p.app_interval.map(secs).unwrap_or_else(|| "off".into()),
        secs(p.retention),
        secs(p.thin_after),
        secs(p.any_moment_window),
        secs(p.rpo_threshold)
    )
}

pub fn policies(c: &Catalog, as_json: bool) {
    if as_json {
        let v: Vec<Value> = c
            .policies
            .iter()
            .map(|(name, r)| {
                json!({
                    "name": name,
                    "crash_interval_seconds": r.crash_interval_s,
                    "app_interval_seconds": r.app_interval_s,
                    "retention_seconds": r.retention_s,
                    "thin_after_seconds": r.thin_after_s,
                    "any_moment_window_seconds": r.any_moment_window_s,
                    "rpo_threshold_seconds": r.rpo_threshold_s,
                })
            })
            .collect();
        print_json(&json!({ "policies": v }));
        return;
    }
    for name in c.policies.keys() {
        if let Ok(p) = c.policy(name) {
            println!("{name:<12} {}", policy_line(&p));
        }
    }
}

pub fn point_json(p: &PointInfo, bytes: Option<u64>) -> Value {
    let mut v = json!({
        "id": p.id,
        "seq": p.seq,
        "time": rfc3339(p.time_us),
        "kind": kind(p.kind),
        "name": p.name,
    });
    if let Some(b) = bytes {
        v["bytes"] = json!(b);
    }
    if let Some(g) = &p.group {
        v["group"] = json!(g);
    }
    v
}

/// One line naming a piece of damage: file, offset, what failed.
fn damage_where(d: &Damage) -> String {
    format!("{} at byte {}: {}", d.path.display(), d.offset, d.what)
}

/// Points with their bytes; a point that reads damaged bytes (`damage`) is marked
/// unreadable, naming the damage.
pub fn points(vm: &str, points: &[(PointInfo, u64)], damage: &[Damage], as_json: bool) {
    let docs = points_json(points, damage);
    point_docs(vm, &docs, as_json);
    if !as_json {
        for d in damage {
            let pts: Vec<String> = d.points.iter().map(|p| p.to_string()).collect();
            println!(
                "damaged: {}; points [{}] cannot be recovered (see `standby verify {vm}`)",
                damage_where(d),
                pts.join(", ")
            );
        }
    }
}

/// The documents `points --json` lists: each point with its bytes, and whether damage
/// makes it unreadable.
pub fn points_json(points: &[(PointInfo, u64)], damage: &[Damage]) -> Vec<Value> {
    points
        .iter()
        .map(|(p, b)| {
            let mut v = point_json(p, Some(*b));
            if let Some(d) = damage.iter().find(|d| d.points.contains(&p.id)) {
                v["readable"] = json!(false);
                v["damage"] = json!(damage_where(d));
            } else if !damage.is_empty() {
                v["readable"] = json!(true);
            }
            v
        })
        .collect()
}

/// Print point documents (built here, or received from a running agent).
pub fn point_docs(vm: &str, docs: &[Value], as_json: bool) {
    if as_json {
        print_json(&json!({ "vm": vm, "points": docs }));
        return;
    }
    if docs.is_empty() {
        println!("{vm} has no recovery points");
        return;
    }
    println!(
        "{:>6} {:>12}  {:<20}  {:<16}  {:>10}  NAME",
        "ID", "SEQ", "TIME", "KIND", "BYTES"
    );
    for p in docs {
        println!(
            "{:>6} {:>12}  {:<20}  {:<16}  {:>10}  {}",
            p["id"].as_u64().unwrap_or(0),
            p["seq"].as_u64().unwrap_or(0),
            p["time"].as_str().unwrap_or(""),
            p["kind"].as_str().unwrap_or(""),
            bytes(p["bytes"].as_u64().unwrap_or(0)),
            p["name"].as_str().unwrap_or("").to_string()
                + if p["readable"] == json!(false) {
                    "  [unreadable: damaged]"
                } else {
                    ""
                }
        );
    }
}

pub fn status(all: &[VmStatus], as_json: bool) {
    let docs: Vec<Value> = all.iter().map(status_json).collect();
    status_docs(&docs, as_json);
}

/// Print status documents (built here, or received from a running agent).
pub fn status_docs(docs: &[Value], as_json: bool) {
    if as_json {
        print_json(&json!({ "vms": docs }));
        return;
    }
    if docs.is_empty() {
        println!("no VMs are protected in this vault (see `standby protect --help`)");
        return;
    }
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    for d in docs {
        println!(
            "{}  state {}  health {}",
            s(&d["vm"]),
            s(&d["state"]),
            s(&d["health"])
        );
        if let Some(pid) = d["agent_pid"].as_u64() {
            println!("  agent running (pid {pid})");
        }
        for reason in d["reasons"].as_array().into_iter().flatten() {
            println!("  - {}", s(reason));
        }
        if let Some(rpo) = d["rpo_seconds"].as_f64() {
            println!(
                "  RPO {rpo:.1} s (threshold {} s)",
                n(&d["rpo_threshold_seconds"])
            );
        }
        println!(
            "  backlog {} records, {}; cache {}",
            n(&d["backlog_records"]),
            bytes(n(&d["backlog_bytes"])),
            bytes(n(&d["cache_bytes"]))
        );
        let m = &d["remote"];
        if m.is_object() {
            println!(
                "  link to the cache service at {}: {}{}",
                s(&m["cache"]),
                s(&m["link"]),
                m["link_since"]
                    .as_str()
                    .map(|t| format!(" since {t}"))
                    .unwrap_or_default()
            );
            println!(
                "  behind the cache: {} records, {}, {:.1} s; cache {}{}",
                n(&m["behind_records"]),
                bytes(n(&m["behind_bytes"])),
                m["behind_seconds"].as_f64().unwrap_or(0.0),
                bytes(n(&m["cache_used_bytes"])),
                match n(&m["cache_capacity_bytes"]) {
                    0 => String::new(),
                    c => format!(
                        " of {} ({}%)",
                        bytes(c),
                        n(&m["cache_used_bytes"]) * 100 / c
                    ),
                }
            );
            if n(&m["agent_journal_bytes"]) > 0 || m["agent_connected"].as_bool() == Some(false) {
                println!(
                    "  agent: {}, journal {}",
                    if m["agent_connected"].as_bool() == Some(true) {
                        "connected to the cache service"
                    } else {
                        "not connected to the cache service"
                    },
                    bytes(n(&m["agent_journal_bytes"]))
                );
            }
            if m["resync_required"].as_bool() == Some(true) {
                println!(
                    "  resync-required: {} of dirty blocks to resync",
                    bytes(n(&m["resync_bytes"]))
                );
            }
        }
        let p = &d["last_point"];
        if p.is_object() {
            println!(
                "  last point {} ({}, {}), {} point(s) retained",
                n(&p["id"]),
                s(&p["kind"]),
                s(&p["time"]),
                n(&d["points"])
            );
        } else {
            println!("  no recovery point");
        }
        let t = &d["target"];
        println!(
            "  target: resource group {}, network {}, subnet {}{}",
            s(&t["resource_group"]),
            s(&t["network"]),
            s(&t["subnet"]),
            t["availability_set"]
                .as_str()
                .map(|a| format!(", availability set {a}"))
                .unwrap_or_default()
        );
        for disk in d["disks"].as_array().into_iter().flatten() {
            println!(
                "  disk {:<10} {:>10} replicated of {:>10}  {}",
                s(&disk["name"]),
                bytes(n(&disk["replicated_bytes"])),
                bytes(n(&disk["size_bytes"])),
                s(&disk["source"])
            );
        }
        if d["failover"].is_object() {
            println!(
                "  failover at seq {} in {}",
                n(&d["failover"]["seq"]),
                s(&d["failover"]["dir"])
            );
        }
        if d["test_failover"].is_object() {
            let f = &d["test_failover"];
            println!(
                "  test failover at seq {} in {} (network {})",
                n(&f["seq"]),
                s(&f["dir"]),
                s(&f["network"])
            );
        }
    }
}

pub fn status_json(s: &VmStatus) -> Value {
    let r = &s.record;
    json!({
        "vm": r.name,
        "state": if r.unprotected.is_some() { "unprotected" } else { r.state.as_str() },
        "health": s.health.as_str(),
        "reasons": s.reasons,
        "rpo_seconds": s.rpo_seconds,
        "rpo_threshold_seconds": s.rpo_threshold_seconds,
        "backlog_records": s.backlog_records,
        "backlog_bytes": s.backlog_bytes,
        "cache_bytes": s.cache_bytes,
        "applied_seq": s.applied_seq,
        "points": s.points,
        "last_point": s.last_point.as_ref().map(|p| point_json(p, None)),
        "policy": r.policy,
        "committed": r.committed,
        "source": {
            "resource_group": r.source.resource_group,
            "network": r.source.network,
            "subnet": r.source.subnet,
            "availability_set": r.source.availability_set,
        },
        "target": {
            "resource_group": r.target.resource_group,
            "network": r.target.network,
            "subnet": r.target.subnet,
            "availability_set": r.target.availability_set,
        },
        "network_mapping": r.network_mapping,
        "damage": s.damage,
        "disks": s.disks.iter().map(|d| json!({
            "name": d.name,
            "source": d.source,
            "size_bytes": d.size_bytes,
            "replicated_bytes": d.replicated_bytes,
        })).collect::<Vec<_>>(),
        "failover": r.failover.as_ref().map(|f| json!({"seq": f.seq, "point": f.point_id, "dir": f.dir, "network": f.network})),
        "test_failover": r.test_failover.as_ref().map(|f| json!({"seq": f.seq, "point": f.point_id, "dir": f.dir, "network": f.network})),
        "remote": s.remote.as_ref().map(|m| json!({
            "cache": m.cache,
            "link": m.link,
            "link_since": (m.since_us > 0).then(|| rfc3339(m.since_us)),
            "link_error": m.error,
            "behind_records": m.behind_records,
            "behind_bytes": m.behind_bytes,
            "behind_seconds": m.behind_seconds,
            "cache_used_bytes": m.cache_used_bytes,
            "cache_capacity_bytes": m.cache_capacity_bytes,
            "agent_connected": m.agent_connected,
            "resync_required": m.resync_required,
            "resync_bytes": m.resync_bytes,
            "agent_journal_bytes": m.agent_journal_bytes,
            "report_age_seconds": m.age_seconds,
        })),
    })
}

pub fn failover(r: &FailoverReport) {
    let what = if r.test { "test failover" } else { "failover" };
    match &r.point {
        Some(p) => println!(
            "{what} of {} to point {} ({}, seq {}, {})",
            r.vm,
            p.id,
            kind(p.kind),
            p.seq,
            rfc3339(p.time_us)
        ),
        None => println!(
            "{what} of {} to seq {} ({})",
            r.vm,
            r.seq,
            rfc3339(r.time_us)
        ),
    }
    println!(
        "  resource group {}, network {}, subnet {}{}",
        r.resource_group,
        r.network,
        r.subnet,
        r.availability_set
            .as_ref()
            .map(|a| format!(", availability set {a}"))
            .unwrap_or_default()
    );
    for d in &r.disks {
        println!(
            "  {}  {} ({} allocated)  sha256 {}",
            d.path.display(),
            bytes(d.size_bytes),
            bytes(d.allocated_bytes),
            d.sha256
        );
    }
    println!("  manifest {}", r.manifest.display());
}

pub fn verify(vm: &str, r: &VerifyReport, point: Option<&PointInfo>, as_json: bool) {
    if as_json {
        print_json(&json!({
            "vm": vm,
            "point": point.map(|p| p.id),
            "sound": r.is_clean(),
            "indexes_checked": r.indexes_checked,
            "frames_checked": r.frames_checked,
            "frame_bytes_checked": r.frame_bytes_checked,
            "damage": r.damage.iter().map(|d| json!({
                "file": d.path.to_string_lossy(),
                "offset": d.offset,
                "what": d.what,
                "points": d.points,
                "latest": d.latest,
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    if r.is_clean() {
        println!(
            "{vm}: sound ({} indexes, {} frames, {} checked)",
            r.indexes_checked,
            r.frames_checked,
            bytes(r.frame_bytes_checked)
        );
        return;
    }
    println!("{vm}: DAMAGED ({} piece(s))", r.damage.len());
    for d in &r.damage {
        let pts: Vec<String> = d.points.iter().map(|p| p.to_string()).collect();
        println!(
            "  {} at byte {}: {}; affects points [{}]{}",
            d.path.display(),
            d.offset,
            d.what,
            pts.join(", "),
            if d.latest {
                " and the latest state"
            } else {
                ""
            }
        );
    }
}
