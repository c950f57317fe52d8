//! The end and the changes of a VM's protection: `unprotect` (replication ends, the name
//! is free; the points stay readable under the name it reports until deleted) and
//! `policy assign`.
//!
//! Crash safety: unprotecting without deleting is one catalog write (the VM's record moves
//! to a new name and keeps its directory, so no file moves). Deleting writes the catalog
//! first and removes the directory after: a crash in between leaves an orphan directory
//! that no record names, which the next protect that picks that directory clears.

use super::{check_name, UnprotectedRecord, Vault};
use crate::error::{Error, IoContext, Result};
use crate::now_us;

/// What `unprotect` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnprotectReport {
    pub vm: String,
    /// The name the points stay readable under (none when they were deleted or there were
    /// none: a committed failover had deleted them).
    pub points_kept_as: Option<String>,
    pub points_deleted: bool,
}

impl Vault {
    /// End the protection of `vm` and free its name. Without `delete_points` its points
    /// stay readable under a new name (`VM.unprotected-N`); with it they are deleted. An
    /// already unprotected VM (by its new name) can only be deleted.
    pub fn unprotect(&mut self, vm: &str, delete_points: bool) -> Result<UnprotectReport> {
        let rec = self.catalog.vm(vm)?.clone();
        if rec.test_failover.is_some() {
            return Err(Error::Conflict(format!(
                "a test failover of VM '{vm}' is up; run `standby test-failover-cleanup {vm}` first"
            )));
        }
        if rec.unprotected.is_some() && !delete_points {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is already unprotected; `standby unprotect {vm} --delete-points` deletes its points"
            )));
        }
        let vm_dir = self.vm_dir(vm);
        let has_data = self.vfs.exists(&vm_dir);
        // Nobody may be using it: a running agent holds the VM's lock for its whole life.
        let lock = if has_data {
            match self.try_lock_vm(vm) {
                Err(Error::Locked(holder)) => {
                    return Err(Error::Conflict(format!(
                        "VM '{vm}' is in use by {holder}: stop its agent first (unprotect refuses while the VM runs)"
                    )))
                }
                other => Some(other?),
            }
        } else {
            None
        };
        if delete_points || !has_data || rec.committed {
            self.update(|c| {
                c.vms.remove(vm);
                Ok(())
            })?;
            drop(lock);
            if has_data {
                self.vfs.remove_dir_all(&vm_dir).at(&vm_dir)?;
            }
            return Ok(UnprotectReport {
                vm: vm.to_string(),
                points_kept_as: None,
                points_deleted: has_data,
            });
        }
        let kept = self.update(|c| {
            let mut rec = c.vms.remove(vm).ok_or_else(|| {
                Error::NotFound(format!("unknown VM '{vm}' (unprotected meanwhile?)"))
            })?;
            let kept = (1u64..)
                .map(|n| format!("{vm}.unprotected-{n}"))
                .find(|n| !c.vms.contains_key(n))
                .unwrap_or_default();
            rec.dir = Some(rec.dir_name().to_string());
            rec.unprotected = Some(UnprotectedRecord {
                name: vm.to_string(),
                time_us: now_us(),
            });
            rec.name = kept.clone();
            c.vms.insert(kept.clone(), rec);
            Ok(kept)
        })?;
        drop(lock);
        Ok(UnprotectReport {
            vm: vm.to_string(),
            points_kept_as: Some(kept),
            points_deleted: false,
        })
    }

    /// Make `vm` follow `policy` (which must exist): cadence and retention apply from the
    /// next processing pass on (a running agent reads it there too).
    pub fn assign_policy(&mut self, vm: &str, policy: &str) -> Result<()> {
        check_name("policy", policy)?;
        self.catalog.policy(policy)?;
        let rec = self.catalog.vm(vm)?;
        self.refuse_retired(vm, rec)?;
        self.update(|c| {
            c.policy(policy)?; // still there under the lock
            let rec = c.vm_mut(vm)?;
            rec.policy = policy.to_string();
            Ok(())
        })
    }

    /// Refuse a VM whose replication has ended (committed failover, unprotected) or is
    /// held by a failback under way: its points can be read, nothing replicates into it.
    pub(crate) fn refuse_retired(&self, vm: &str, rec: &super::VmRecord) -> Result<()> {
        if let Some(u) = &rec.unprotected {
            return Err(Error::Conflict(format!(
                "VM '{vm}' was unprotected ({} at {}): its points are kept for reading only",
                u.name,
                super::spec::rfc3339(u.time_us)
            )));
        }
        if rec.committed {
            return Err(Error::Conflict(format!(
                "VM '{vm}' was failed over and the failover committed: replication has ended"
            )));
        }
        if let Some(fb) = &rec.failback {
            return Err(Error::Conflict(format!(
                "a failback of VM '{vm}' to point {} is under way: run `standby failback {vm}` to finish it",
                fb.point_id
            )));
        }
        Ok(())
    }
}
