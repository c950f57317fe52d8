//! Replication status of a VM: state, health with reasons, RPO, backlog, points, disks.
//!
//! RPO is now minus the time of the newest write that can be recovered from the target
//! store; when nothing is waiting in the log (everything written has been applied), the
//! VM's present state is recoverable and the RPO is 0.

use super::{now_us, Vault, VmRecord, VmState};
use crate::cache::Cache;
use crate::error::Result;
use crate::replica::{PointInfo, PointKind, Replica};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

#[derive(Debug, Clone)]
pub struct DiskStatus {
    pub name: String,
    pub source: String,
    pub size_bytes: u64,
    /// Bytes holding data in the replica's latest state.
    pub replicated_bytes: u64,
}

#[derive(Debug, Clone)]
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
    pub fn status(&self, vm: &str) -> Result<VmStatus> {
        let rec = self.catalog.vm(vm)?;
        if rec.committed {
            return self.base_status(vm);
        }
        let _lock = self.try_lock_vm(vm)?;
        let replica = self.open_replica(vm)?;
        let cache = self.open_cache(vm)?;
        let st = self.status_of(vm, &cache, &replica);
        cache.close()?;
        st
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
        let threshold = st.rpo_threshold_seconds;
        let cstats = cache.stats();
        let (records, bytes) = cache.backlog(replica.applied_seq());
        st.backlog_records = records;
        st.backlog_bytes = bytes;
        st.cache_bytes = cstats.stored_bytes;
        st.last_point = replica.latest_point();
        st.points = replica.points().len();
        let latest = replica.view_latest()?;
        for (i, d) in rec.disks.iter().enumerate() {
            st.disks.push(super::DiskStatus {
                name: d.name.clone(),
                source: d.source.clone(),
                size_bytes: d.size_bytes,
                replicated_bytes: latest.allocated_bytes(i as u16)?,
            });
        }
        drop(latest);
        let now = now_us();
        let rpo = if records == 0 {
            0.0
        } else {
            let newest = replica
                .applied_time_us()
                .max(st.last_point.as_ref().map_or(0, |p| p.time_us));
            now.saturating_sub(newest) as f64 / 1e6
        };
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
        Ok(st)
    }
}
