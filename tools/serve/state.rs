//! What the dashboard keeps between requests: the last hour of every VM's RPO and the
//! events seen between successive status samples (both in memory, bounded), and the
//! actions it runs in the background with their progress.

use crate::cmd::{failover, report};
use serde_json::{json, Value};
use standby_engine::vault::{PointSpec, Progress};
use standby_engine::Error;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How much RPO history the chart shows.
pub const HISTORY: Duration = Duration::from_secs(3600);
/// Events kept (oldest dropped first).
pub const EVENTS_MAX: usize = 500;
/// How long a status call made for the dashboard waits for a VM a short-lived command
/// holds: the sampler or a request never queues behind it for long.
const STATUS_WAIT: Duration = Duration::from_secs(2);

pub struct State {
    pub root: PathBuf,
    pub token: Option<String>,
    /// The CSRF token of this run: embedded in the page, required on every POST.
    pub csrf: String,
    pub sample_every: Duration,
    /// How long an action waits for a VM another command holds (`--wait`).
    pub action_wait: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per VM: (µs since the epoch, RPO seconds or none), oldest first.
    rpo: BTreeMap<String, VecDeque<(u64, Option<f64>)>>,
    /// The previous sample of each VM: its status document, or the error it gave.
    last: BTreeMap<String, Result<Value, String>>,
    events: VecDeque<Value>,
    next_event: u64,
    /// The newest action of each VM (running or finished).
    jobs: BTreeMap<String, Job>,
}

#[derive(Clone)]
pub struct Job {
    pub action: &'static str,
    pub state: &'static str,
    pub started_us: u64,
    pub finished_us: Option<u64>,
    pub point: Option<String>,
    pub progress: Arc<Mutex<JobProgress>>,
    pub result: Option<Value>,
    pub error: Option<String>,
}

#[derive(Default, Clone)]
pub struct JobProgress {
    pub label: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// The engine's progress reports, kept for `GET …/test-failover`.
struct Reporter(Arc<Mutex<JobProgress>>);

impl Progress for Reporter {
    fn begin(&mut self, label: &str, total_bytes: u64) {
        let mut p = lock(&self.0);
        p.label = label.to_string();
        p.done_bytes = 0;
        p.total_bytes = total_bytes;
    }
    fn advance(&mut self, bytes: u64) {
        lock(&self.0).done_bytes += bytes;
    }
}

/// A poisoned lock only means a panicking thread held it: the data is still what it was.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn random_hex(n: usize) -> Result<String, Error> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    let path = "/dev/urandom";
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io(path, e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Job {
    pub fn to_json(&self) -> Value {
        let p = lock(&self.progress).clone();
        json!({
            "action": self.action,
            "state": self.state,
            "point": self.point,
            "started": crate::output::rfc3339(self.started_us),
            "finished": self.finished_us.map(crate::output::rfc3339),
            "progress": {"label": p.label, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes},
            "result": self.result,
            "error": self.error,
        })
    }
}

impl State {
    pub fn new(
        root: PathBuf,
        token: Option<String>,
        sample_every: Duration,
        action_wait: Duration,
    ) -> Result<State, Error> {
        Ok(State {
            root,
            token,
            csrf: random_hex(16)?,
            sample_every,
            action_wait,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Every VM's status document (what `status --json` lists). Where `status --json` would
    /// fail as a whole (one VM held by a long failover, say), each VM is asked on its own
    /// and one that fails is `{"vm", "health": "unknown", "error"}`: the others still show.
    pub fn status_all(&self) -> Result<Vec<Value>, Error> {
        match report::status_docs(&self.root, None, STATUS_WAIT) {
            Ok(docs) => Ok(docs),
            Err(Error::NotFound(m)) => Err(Error::NotFound(m)),
            Err(_) => Ok(self
                .vm_names()?
                .iter()
                .map(|n| {
                    self.status_one(n).unwrap_or_else(|e| {
                        json!({"vm": n, "health": "unknown", "error": crate::output::one_line(&e)})
                    })
                })
                .collect()),
        }
    }

    /// One VM's status document; `Error::NotFound` for a VM the vault does not have.
    pub fn status_one(&self, vm: &str) -> Result<Value, Error> {
        let mut docs = report::status_docs(&self.root, Some(vm.to_string()), STATUS_WAIT)?;
        docs.pop()
            .ok_or_else(|| Error::NotFound(format!("no VM named '{vm}'")))
    }

    /// One VM's points document (what `points --json` prints).
    pub fn points(&self, vm: &str) -> Result<Value, Error> {
        let (points, damage) = report::points_report(&self.root, vm, STATUS_WAIT)?;
        Ok(json!({"vm": vm, "points": crate::output::points_json(&points, &damage)}))
    }

    /// The names of the vault's VMs, from its catalog.
    pub fn vm_names(&self) -> Result<Vec<String>, Error> {
        let v = standby_engine::vault::Vault::open(
            &self.root,
            &crate::cmd::who("serve"),
            standby_engine::vault::LockWait::Fail,
        )?;
        Ok(v.catalog().vms.keys().cloned().collect())
    }

    pub fn rpo_history(&self, vm: &str) -> Value {
        let g = lock(&self.inner);
        let samples: Vec<Value> = g
            .rpo
            .get(vm)
            .map(|r| {
                r.iter()
                    .map(|(t, rpo)| json!({"time": crate::output::rfc3339(*t), "time_us": t, "rpo_seconds": rpo}))
                    .collect()
            })
            .unwrap_or_default();
        json!({"vm": vm, "sample_every_seconds": self.sample_every.as_secs_f64(), "samples": samples})
    }

    pub fn events(&self) -> Value {
        let g = lock(&self.inner);
        json!({"events": g.events.iter().collect::<Vec<_>>()})
    }

    pub fn job(&self, vm: &str) -> Option<Value> {
        lock(&self.inner).jobs.get(vm).map(Job::to_json)
    }

    fn event(g: &mut Inner, vm: &str, kind: &str, message: String) {
        g.next_event += 1;
        let t = now_us();
        g.events.push_back(json!({
            "id": g.next_event,
            "time": crate::output::rfc3339(t),
            "vm": vm,
            "kind": kind,
            "message": message,
        }));
        while g.events.len() > EVENTS_MAX {
            g.events.pop_front();
        }
    }

    /// Sample every VM's status each `sample_every` until `stop` is set.
    pub fn sample_until(&self, stop: &AtomicBool) {
        let tick = Duration::from_millis(100);
        while !stop.load(Ordering::SeqCst) {
            self.sample();
            let mut slept = Duration::ZERO;
            while slept < self.sample_every && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(tick.min(self.sample_every - slept));
                slept += tick;
            }
        }
    }

    /// One sample: each VM's status on its own (one VM's error spoils no other's), the
    /// RPO appended to its history, and what changed since the previous sample as events.
    pub fn sample(&self) {
        let names = match self.vm_names() {
            Ok(n) => n,
            Err(e) => {
                let mut g = lock(&self.inner);
                let msg = crate::output::one_line(&e);
                if g.events
                    .back()
                    .map(|e| e["message"] != json!(msg))
                    .unwrap_or(true)
                {
                    Self::event(&mut g, "", "error", msg);
                }
                return;
            }
        };
        let samples: Vec<(String, Result<Value, String>)> = names
            .iter()
            .map(|n| {
                let r = self.status_one(n).map_err(|e| crate::output::one_line(&e));
                (n.clone(), r)
            })
            .collect();
        let t = now_us();
        let horizon = t.saturating_sub(HISTORY.as_micros() as u64);
        let mut g = lock(&self.inner);
        let gone: Vec<String> = g
            .last
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        for vm in gone {
            g.last.remove(&vm);
            g.rpo.remove(&vm);
            Self::event(&mut g, &vm, "vm", format!("{vm} is no longer in the vault"));
        }
        for (vm, now) in samples {
            let prev = g.last.get(&vm).cloned();
            for (kind, msg) in changes(&vm, prev.as_ref(), &now) {
                Self::event(&mut g, &vm, kind, msg);
            }
            let rpo = now.as_ref().ok().and_then(|d| d["rpo_seconds"].as_f64());
            let ring = g.rpo.entry(vm.clone()).or_default();
            ring.push_back((t, rpo));
            while ring.front().is_some_and(|(at, _)| *at < horizon) {
                ring.pop_front();
            }
            g.last.insert(vm, now);
        }
    }

    /// Start an action on `vm` in the background, unless one runs. Returns the job.
    fn start(
        self: &Arc<Self>,
        vm: &str,
        action: &'static str,
        point: Option<String>,
        work: impl FnOnce(&State, &mut dyn Progress) -> Result<Value, Error> + Send + 'static,
    ) -> Result<Value, Error> {
        let progress = Arc::new(Mutex::new(JobProgress::default()));
        {
            let mut g = lock(&self.inner);
            if let Some(j) = g.jobs.get(vm) {
                if j.state == "running" {
                    return Err(Error::Conflict(format!(
                        "a {} of VM '{vm}' is already running",
                        j.action.replace('-', " ")
                    )));
                }
            }
            let job = Job {
                action,
                state: "running",
                started_us: now_us(),
                finished_us: None,
                point: point.clone(),
                progress: progress.clone(),
                result: None,
                error: None,
            };
            g.jobs.insert(vm.to_string(), job);
            let what = match &point {
                Some(p) => format!("{action} of {vm} to {p} started"),
                None => format!("{action} of {vm} started"),
            };
            Self::event(&mut g, vm, "action", what);
        }
        let me = self.clone();
        let name = vm.to_string();
        std::thread::spawn(move || {
            let mut rep = Reporter(progress);
            let r = work(&me, &mut rep);
            let mut g = lock(&me.inner);
            let (kind, msg) = match &r {
                Ok(_) => ("action", format!("{action} of {name} succeeded")),
                Err(e) => (
                    "error",
                    format!("{action} of {name} failed: {}", crate::output::one_line(e)),
                ),
            };
            if let Some(j) = g.jobs.get_mut(&name) {
                j.finished_us = Some(now_us());
                match r {
                    Ok(v) => {
                        j.state = "succeeded";
                        j.result = Some(v);
                    }
                    Err(e) => {
                        j.state = "failed";
                        j.error = Some(crate::output::one_line(&e));
                    }
                }
            }
            Self::event(&mut g, &name, kind, msg);
        });
        Ok(self.job(vm).unwrap_or(Value::Null))
    }

    /// A test failover of `vm` to `point`, as `standby test-failover` runs it.
    pub fn start_test_failover(
        self: &Arc<Self>,
        vm: &str,
        point: PointSpec,
        spelled: String,
        network: Option<String>,
    ) -> Result<Value, Error> {
        let name = vm.to_string();
        self.start(vm, "test-failover", Some(spelled), move |s, progress| {
            let r = failover::test_failover(
                &s.root,
                &name,
                point,
                None,
                network.as_deref(),
                s.action_wait,
                progress,
            )?;
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            v["domain_xml"] = json!(r.dir.join(crate::libvirt::DOMAIN_FILE));
            Ok(v)
        })
    }

    /// The cleanup of `vm`'s test failover, as `standby test-failover-cleanup` runs it.
    pub fn start_cleanup(self: &Arc<Self>, vm: &str) -> Result<Value, Error> {
        let name = vm.to_string();
        self.start(vm, "test-failover-cleanup", None, move |s, _| {
            let dir = failover::test_failover_cleanup(&s.root, &name)?;
            Ok(json!({"removed": dir}))
        })
    }

    /// Whether any action still runs (the server lets it finish before it exits).
    pub fn busy(&self) -> bool {
        lock(&self.inner)
            .jobs
            .values()
            .any(|j| j.state == "running")
    }
}

/// What changed for `vm` between two samples, as (kind, message) events.
fn changes(
    vm: &str,
    prev: Option<&Result<Value, String>>,
    now: &Result<Value, String>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let d = match (prev, now) {
        (_, Err(e)) => {
            if prev != Some(now) {
                out.push(("error", format!("status of {vm}: {e}")));
            }
            return out;
        }
        (None, Ok(d)) | (Some(Err(_)), Ok(d)) => {
            out.push((
                "vm",
                format!(
                    "{vm}: {}, health {}, {} point(s)",
                    s(&d["state"]),
                    s(&d["health"]),
                    d["points"]
                ),
            ));
            return out;
        }
        (Some(Ok(p)), Ok(d)) => (p, d),
    };
    let (p, d) = d;
    let (old_id, new_id) = (
        p["last_point"]["id"].as_u64(),
        d["last_point"]["id"].as_u64(),
    );
    if new_id.is_some() && new_id != old_id {
        let lp = &d["last_point"];
        let first = old_id.map_or(0, |o| o + 1);
        let id = new_id.unwrap_or(0);
        let which = if old_id.is_some() && id > first {
            format!("points {first}–{id} cut")
        } else {
            format!("point {id} cut")
        };
        out.push((
            "point",
            format!(
                "{vm}: {which} ({}, seq {}{})",
                s(&lp["kind"]),
                lp["seq"],
                lp["name"]
                    .as_str()
                    .map(|n| format!(", name {n}"))
                    .unwrap_or_default()
            ),
        ));
    }
    if p["health"] != d["health"] {
        let reasons: Vec<&str> = d["reasons"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        out.push((
            "health",
            format!(
                "{vm}: health {} → {}{}",
                s(&p["health"]),
                s(&d["health"]),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reasons.join("; "))
                }
            ),
        ));
    }
    if p["remote"]["link"] != d["remote"]["link"] && d["remote"]["link"].is_string() {
        let down = d["remote"]["link"] != json!("connected");
        out.push((
            if down { "error" } else { "link" },
            format!(
                "{vm}: link to {} {}{}",
                s(&d["remote"]["cache"]),
                s(&d["remote"]["link"]),
                d["remote"]["link_error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ));
    }
    for damage in d["damage"].as_array().into_iter().flatten() {
        let known = p["damage"]
            .as_array()
            .is_some_and(|old| old.contains(damage));
        if !known {
            out.push(("error", format!("{vm}: damage: {}", s(damage))));
        }
    }
    if p["state"] != d["state"] {
        out.push((
            "state",
            format!("{vm}: state {} → {}", s(&p["state"]), s(&d["state"])),
        ));
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(health: &str, point: u64) -> Result<Value, String> {
        Ok(
            json!({"state": "protected", "health": health, "reasons": ["rpo 20m over 15m"],
                  "points": point, "last_point": {"id": point, "seq": point * 10, "kind": "crash-consistent", "name": null}}),
        )
    }

    #[test]
    fn events_from_successive_samples() {
        let first = changes("vm", None, &doc("healthy", 1));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, "vm");
        assert!(changes("vm", Some(&doc("healthy", 1)), &doc("healthy", 1)).is_empty());
        let c = changes("vm", Some(&doc("healthy", 1)), &doc("critical", 3));
        assert_eq!(
            c[0],
            (
                "point",
                "vm: points 2–3 cut (crash-consistent, seq 30)".into()
            )
        );
        assert_eq!(
            c[1],
            (
                "health",
                "vm: health healthy → critical (rpo 20m over 15m)".into()
            )
        );
        let mut a = doc("healthy", 1).unwrap();
        a["remote"] = json!({"cache": "10.0.0.2:7500", "link": "connected", "link_error": null});
        let mut b = a.clone();
        b["remote"]["link"] = json!("disconnected");
        b["remote"]["link_error"] = json!("connection refused");
        b["damage"] = json!(["layer 3 at byte 10: crc mismatch"]);
        let c = changes("vm", Some(&Ok(a.clone())), &Ok(b.clone()));
        assert_eq!(
            c,
            vec![
                (
                    "error",
                    "vm: link to 10.0.0.2:7500 disconnected: connection refused".into()
                ),
                (
                    "error",
                    "vm: damage: layer 3 at byte 10: crc mismatch".into()
                ),
            ]
        );
        // Known damage is not news; the link coming back is.
        let c = changes("vm", Some(&Ok(b)), &Ok(a));
        assert_eq!(
            c,
            vec![("link", "vm: link to 10.0.0.2:7500 connected".into())]
        );
        let e: Result<Value, String> = Err("boom".into());
        assert_eq!(changes("vm", Some(&doc("healthy", 1)), &e).len(), 1);
        assert!(changes("vm", Some(&e), &e).is_empty());
    }
}
