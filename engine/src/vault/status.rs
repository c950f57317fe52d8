//! Replication status of a VM: state, health with reasons, RPO, backlog, points, disks.
//!
//! RPO is now minus the source time of the newest write that can be recovered from the
//! vault: every record durable in the VM's log is (failover `latest` applies it first).
//! When everything the source acknowledged is durable there, the VM's present state is
//! recoverable and the RPO is 0, however long ago the last write was or however far the
//! processor is behind: an idle VM's RPO does not grow.

use super::{now_us, Vault, VmRecord, VmState};
use crate::cache::Cache;
use crate::error::Result;
use crate::replica::{PointInfo, PointKind, Replica};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    Healthy,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub source: String,
    pub size_bytes: u64,
    /// Bytes holding data in the replica's latest state (when a damaged layer makes that
    /// unreadable: in the newest point still readable; 0 if none is).
    pub replicated_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    pub record: VmRecord,
    pub health: Health,
    pub reasons: Vec<String>,
    pub rpo_seconds: Option<f64>,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    pub last_point: Option<PointInfo>,
    pub points: usize,
    pub cache_bytes: u64,
    pub disks: Vec<DiskStatus>,
    pub rpo_threshold_seconds: u64,
    /// Where the replica has applied to, and the time of that record at the source.
    #[serde(default)]
    pub applied_seq: u64,
    #[serde(default)]
    pub applied_time_us: u64,
    /// For a VM replicated from a remote source site: the link and the source's state.
    #[serde(default)]
    pub remote: Option<RemoteStatus>,
    /// Damage found opening the replica, one line each (file, offset, what failed, which
    /// points it spoils); any makes the health critical.
    #[serde(default)]
    pub damage: Vec<String>,
}

/// A remote VM's link and source site, as `process --follow` last saw them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteStatus {
    /// The cache service's address.
    pub cache: String,
    /// "connected", "disconnected" (with `error`), or "not followed" (no `process --follow`
    /// has reported for a while).
    pub link: String,
    /// When the link went up or down (µs since the epoch).
    pub since_us: u64,
    pub error: Option<String>,
    /// How far the processor is behind the cache service: records, bytes, seconds.
    pub behind_records: u64,
    pub behind_bytes: u64,
    pub behind_seconds: f64,
    /// The cache service's fill level (capacity 0: no limit).
    pub cache_used_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub agent_connected: bool,
    /// The agent tracks writes in its dirty bitmap, or still has blocks to resync.
    pub resync_required: bool,
    pub resync_bytes: u64,
    /// Bytes in the agent's journal not yet in the cache service.
    pub agent_journal_bytes: u64,
    /// Age of this report (seconds).
    pub age_seconds: f64,
}

pub fn kind_str(k: PointKind) -> &'static str {
    match k {
        PointKind::Initial => "initial",
        PointKind::CrashConsistent => "crash-consistent",
        PointKind::AppConsistent => "app-consistent",
    }
}

impl Vault {
    /// Status of one VM. If a running agent owns the VM this fails at once with
    /// `Error::Locked` naming it (ask the agent instead: it has the live figures).
    /// Otherwise no agent is running, and a VM still protected here says so.
    pub fn status(&self, vm: &str) -> Result<VmStatus> {
        let rec = self.catalog.vm(vm)?;
        if rec.committed {
            return self.base_status(vm);
        }
        if let Some(remote) = rec.remote.as_ref().filter(|_| rec.unprotected.is_none()) {
            return self.remote_status(vm, &remote.cache);
        }
        let _lock = self.try_lock_vm(vm)?;
        let (mut st, newest_write_us) = self.local_status_with_newest(vm)?;
        if st.record.state != VmState::FailedOver && st.record.unprotected.is_none() {
            // The agent holds the VM's lock for as long as it runs: we got it, so none is.
            // Last seen: its newest write, or when it last started (its control socket).
            let started_us = std::fs::metadata(self.agent_socket(vm))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_micros() as u64);
            let seen = newest_write_us.max(started_us);
            st.health = st.health.max(Health::Warning);
            st.reasons.push(if seen == 0 {
                "agent not running (never seen)".to_string()
            } else {
                format!(
                    "agent not running (last seen {})",
                    super::spec::rfc3339(seen)
                )
            });
        }
        Ok(st)
    }

    fn local_status(&self, vm: &str) -> Result<VmStatus> {
        Ok(self.local_status_with_newest(vm)?.0)
    }

    /// The status, and the source time of the newest record in the VM's log or replica.
    fn local_status_with_newest(&self, vm: &str) -> Result<(VmStatus, u64)> {
        let replica = match self.open_replica(vm) {
            Ok(r) => r,
            Err(e) if is_damage(&e) => {
                return Ok((self.unopenable_status(vm, "replica", &e)?, 0));
            }
            Err(e) => return Err(e),
        };
        let cache = match self.open_cache(vm) {
            Ok(c) => c,
            Err(e) if is_damage(&e) => {
                return Ok((self.unopenable_status(vm, "change log", &e)?, 0));
            }
            Err(e) => return Err(e),
        };
        let st = self.status_of(vm, &cache, &replica);
        let stats = cache.stats();
        let newest = durable_record_time(&cache, stats.next_seq.saturating_sub(1), stats.first_seq);
        cache.close()?;
        let st = st?;
        let newest = newest?
            .max(st.applied_time_us)
            .max(st.last_point.as_ref().map_or(0, |p| p.time_us));
        Ok((st, newest))
    }

    /// A remote VM: the vault's own view (or, while `process --follow` holds the VM, the
    /// one it last published) and the link and source state it reported.
    fn remote_status(&self, vm: &str, cache_addr: &str) -> Result<VmStatus> {
        let doc = super::remote::status_file::read(&*self.vfs, &self.vm_dir(vm))?;
        let mut st = match self.try_lock_vm(vm) {
            Ok(_lock) => self.local_status(vm)?,
            Err(crate::Error::Locked(_)) => match doc.as_ref().and_then(|d| d.status.clone()) {
                Some(mut p) => {
                    p.record = self.catalog.vm(vm)?.clone();
                    p
                }
                None => self.base_status(vm)?,
            },
            Err(e) => return Err(e),
        };
        let now = now_us();
        let written = doc.as_ref().map_or(0, |d| d.written_us);
        let link = doc.map(|d| d.link).unwrap_or_default();
        let src = link.source.clone().unwrap_or_default();
        let age = now.saturating_sub(written) as f64 / 1e6;
        // A follower publishes every second, connected or retrying.
        let live = written > 0 && age < 5.0;
        let mut r = RemoteStatus {
            cache: cache_addr.to_string(),
            link: if !live {
                "not followed".into()
            } else if link.connected {
                "connected".into()
            } else {
                "disconnected".into()
            },
            since_us: link.since_us,
            error: link.last_error.clone(),
            cache_used_bytes: src.used_bytes,
            cache_capacity_bytes: src.capacity_bytes,
            agent_connected: src.agent_connected,
            resync_bytes: src.agent_resync_bytes,
            agent_journal_bytes: src.agent_journal_bytes,
            age_seconds: age,
            ..Default::default()
        };
        r.resync_required = src.agent_bitmap_mode || r.resync_bytes > 0;
        let src_durable = src.durable_seq;
        r.behind_records = src_durable.saturating_sub(st.applied_seq);
        r.behind_bytes = src.backlog_bytes + st.backlog_bytes;
        r.behind_seconds = if r.behind_records > 0 {
            src.last_time_us.saturating_sub(st.applied_time_us) as f64 / 1e6
        } else {
            0.0
        };
        // RPO: now minus the newest write recoverable here (durable in the staging log).
        // Caught up with everything the source had when it last reported: that moment.
        let target_durable = link.durable_seq.max(st.applied_seq);
        let journal_seq = src.agent_journal_seq;
        let source_at = link.source_at_us;
        let rpo_from =
            if link.source.is_some() && target_durable >= src_durable && journal_seq <= src_durable
            {
                source_at
            } else {
                link.durable_time_us
                    .max(st.applied_time_us)
                    .max(st.record.created_us)
            };
        let rpo = now.saturating_sub(rpo_from) as f64 / 1e6;
        if matches!(st.record.state, VmState::FailedOver) || st.record.committed {
            return Ok(st);
        }
        st.reasons.clear();
        st.health = Health::Healthy;
        if r.resync_required && st.record.state == VmState::Protected {
            st.record.state = VmState::ResyncRequired;
            st.record.resync_reason = Some(format!(
                "the agent tracked writes in its dirty bitmap; {} bytes of blocks to resync",
                r.resync_bytes
            ));
        }
        judge(&mut st, rpo);
        mark_damage(&mut st);
        self.note_damage(vm, &mut st);
        match r.link.as_str() {
            "connected" => {}
            "disconnected" => {
                st.health = st.health.max(Health::Warning);
                st.reasons.push(format!(
                    "link to the cache service at {cache_addr} is down{}",
                    r.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            _ => {
                st.health = st.health.max(Health::Warning);
                st.reasons.push(format!(
                    "no `standby process --follow` is pulling from {cache_addr}"
                ));
            }
        }
        if !r.agent_connected && live {
            st.reasons
                .push("the agent is not connected to the cache service".into());
        }
        if r.cache_capacity_bytes > 0 && r.cache_used_bytes * 10 >= r.cache_capacity_bytes * 8 {
            st.health = st.health.max(Health::Warning);
            st.reasons.push(format!(
                "the cache service is {}% full",
                r.cache_used_bytes * 100 / r.cache_capacity_bytes
            ));
        }
        st.remote = Some(r);
        Ok(st)
    }

    fn base_status(&self, vm: &str) -> Result<VmStatus> {
        let rec = self.catalog.vm(vm)?.clone();
        let threshold = self.vm_policy(vm)?.rpo_threshold.as_secs();
        let mut st = VmStatus {
            health: Health::Healthy,
            reasons: Vec::new(),
            rpo_seconds: None,
            backlog_records: 0,
            backlog_bytes: 0,
            last_point: None,
            points: 0,
            cache_bytes: 0,
            disks: Vec::new(),
            rpo_threshold_seconds: threshold,
            record: rec.clone(),
            applied_seq: 0,
            applied_time_us: 0,
            remote: None,
            damage: Vec::new(),
        };
        if rec.committed {
            st.reasons
                .push("failover committed: replication has ended".into());
        }
        Ok(st)
    }

    /// Status of a VM from its open log and replica (for the process that owns them).
    pub fn status_of(&self, vm: &str, cache: &Cache, replica: &Replica) -> Result<VmStatus> {
        let mut st = self.base_status(vm)?;
        let rec = st.record.clone();
        let cstats = cache.stats();
        let (records, bytes) = cache.backlog(replica.applied_seq());
        st.backlog_records = records;
        st.backlog_bytes = bytes;
        st.cache_bytes = cstats.stored_bytes;
        st.last_point = replica.latest_point();
        st.applied_seq = replica.applied_seq();
        st.applied_time_us = replica.applied_time_us();
        st.points = replica.points().len();
        let latest = latest_if_readable(replica)?;
        for (i, d) in rec.disks.iter().enumerate() {
            st.disks.push(super::DiskStatus {
                name: d.name.clone(),
                source: d.source.clone(),
                size_bytes: d.size_bytes,
                replicated_bytes: match &latest {
                    Some(v) => v.allocated_bytes(i as u16)?,
                    None => 0,
                },
            });
        }
        drop(latest);
        let now = now_us();
        let appended = cstats.next_seq.saturating_sub(1);
        let rpo = if cstats.durable_seq >= appended {
            0.0
        } else {
            // Acknowledged but not yet durable (a sync in flight, or a failing log): the
            // newest recoverable write is the newest durable record.
            let newest = durable_record_time(cache, cstats.durable_seq, cstats.first_seq)?
                .max(replica.applied_time_us())
                .max(st.last_point.as_ref().map_or(0, |p| p.time_us));
            now.saturating_sub(newest) as f64 / 1e6
        };
        judge(&mut st, rpo);
        st.damage = replica.damage().iter().map(damage_line).collect();
        // The log's record of how far the source images hold it: the agent refuses to
        // start without it, so damage to it is the VM's damage.
        if let Err(e) = cache.source_seq() {
            if is_damage(&e) {
                st.damage.push(format!(
                    "the change log's source position cannot be read (the agent will not start): {}",
                    e.to_string().replace('\n', " ")
                ));
            }
        }
        mark_damage(&mut st);
        self.note_damage(vm, &mut st);
        Ok(st)
    }

    /// A VM whose replica (its manifest) or change log is too damaged to open: critical,
    /// with the one-line error; the vault's other VMs are not affected.
    fn unopenable_status(&self, vm: &str, what: &str, e: &crate::Error) -> Result<VmStatus> {
        let mut st = self.base_status(vm)?;
        st.damage = vec![format!(
            "the {what} cannot be opened: {}",
            e.to_string().replace('\n', " ")
        )];
        mark_damage(&mut st);
        self.note_damage(vm, &mut st);
        Ok(st)
    }

    /// Damage the last verify found and no verify has cleared since: critical.
    fn note_damage(&self, vm: &str, st: &mut VmStatus) {
        let reason = match super::damage::load(&*self.vfs, &self.vm_dir(vm)) {
            Ok(None) => return,
            Ok(Some(d)) => {
                let more = match d.count {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                };
                format!(
                    "verify found damage at {}: {}{more}; `standby verify {vm}` again once it is repaired",
                    super::spec::rfc3339(d.found_us),
                    d.text
                )
            }
            Err(e) => format!("the record of damage a verify found is unreadable: {e}"),
        };
        st.health = Health::Critical;
        st.reasons.push(reason);
    }
}

/// Damage in stored bytes (as opposed to an I/O or usage error).
fn is_damage(e: &crate::Error) -> bool {
    matches!(
        e,
        crate::Error::Corrupt { .. } | crate::Error::Unsupported { .. }
    )
}

/// The latest state; when a damaged layer makes it unreadable, the newest point that is
/// still readable (what a failover can recover), if any.
fn latest_if_readable(replica: &Replica) -> Result<Option<crate::replica::View>> {
    if replica.damage().is_empty() {
        return Ok(Some(replica.view_latest()?));
    }
    let unreadable = replica.unreadable_points();
    match replica
        .points()
        .iter()
        .rev()
        .find(|p| !unreadable.contains(&p.id))
    {
        Some(p) => Ok(Some(replica.view_point(p.id)?)),
        None => Ok(None),
    }
}

fn damage_line(d: &crate::replica::Damage) -> String {
    let pts: Vec<String> = d.points.iter().map(u64::to_string).collect();
    format!(
        "damaged: {} at byte {}: {}; points [{}]{} cannot be recovered",
        d.path.display(),
        d.offset,
        d.what,
        pts.join(", "),
        if d.latest {
            " and the latest state"
        } else {
            ""
        }
    )
}

/// Damage makes the health critical and leads the reasons.
fn mark_damage(st: &mut VmStatus) {
    if st.damage.is_empty() {
        return;
    }
    st.health = Health::Critical;
    let mut reasons = st.damage.clone();
    reasons.append(&mut st.reasons);
    st.reasons = reasons;
}

/// Source time of the log's record `seq` (0 if the log no longer holds it).
fn durable_record_time(cache: &Cache, seq: u64, first_seq: u64) -> Result<u64> {
    if seq == 0 || seq < first_seq {
        return Ok(0);
    }
    match cache.reader(seq) {
        Ok(mut r) => Ok(r.next_record()?.map_or(0, |r| r.time_us)),
        // Trimmed meanwhile: the replica has it, and its times are counted instead.
        Err(crate::Error::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Health and reasons from the RPO and the VM's state.
fn judge(st: &mut VmStatus, rpo: f64) {
    let rec = st.record.clone();
    let threshold = st.rpo_threshold_seconds;
    let (records, bytes) = (st.backlog_records, st.backlog_bytes);
    if let Some(u) = &rec.unprotected {
        st.reasons.push(format!(
            "unprotected (was '{}'): no longer replicated; its points are kept for reading",
            u.name
        ));
        return;
    }
    match rec.state {
        VmState::FailedOver => st.reasons.push("failed over: no longer replicated".into()),
        _ => {
            st.rpo_seconds = Some(rpo);
            if rpo > threshold as f64 {
                st.health = Health::Critical;
                st.reasons.push(format!(
                    "RPO {rpo:.0} s exceeds the policy's threshold of {threshold} s"
                ));
            } else if rpo > threshold as f64 / 2.0 {
                st.health = Health::Warning;
                st.reasons.push(format!(
                    "RPO {rpo:.0} s is past half the threshold of {threshold} s"
                ));
            }
            if rec.state == VmState::ResyncRequired {
                st.health = st.health.max(Health::Warning);
                st.reasons.push(format!(
                    "resync required: {}",
                    rec.resync_reason
                        .clone()
                        .unwrap_or_else(|| "changes were tracked in the dirty bitmap".into())
                ));
            }
            if st.last_point.is_none() {
                st.health = st.health.max(Health::Warning);
                st.reasons.push("no recovery point yet".into());
            }
            if records > 0 {
                st.reasons.push(format!(
                    "{records} records ({bytes} bytes) waiting to be processed"
                ));
            }
        }
    }
}
