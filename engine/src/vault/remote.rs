//! Remote VMs: protected from a source site whose agent ships to a cache service there.
//!
//! - `protect_remote` registers the VM with the disks its agent declared to the cache
//!   service (the agent's first run ships every allocated block: the initial replication).
//! - the follower (`crate::runtime::follow`) pulls the VM's records into the vault's
//!   staging log and processes them; every second it writes `vms/VM/status.json` (the live
//!   status) for `standby status`.

use super::{catalog, placements, ProtectRequest, RemoteSource, Vault, VmRecord, VmState};
use crate::cache::{Cache, CacheConfig};
use crate::error::{Error, Result};
use crate::link::pull::PullStatus;
use crate::link::tls::{Credentials, Role};
use crate::link::wire::{self, DiskInfo, Msg, PeerRole};
use crate::link::{self, auth, Security};
use crate::replica::{DiskSpec, Replica, ReplicaConfig};
use std::path::Path;
use std::sync::Arc;

pub mod status_file;

/// The file `follow` keeps the live status of a remote VM in.
pub use status_file::STATUS_FILE;

impl Vault {
    /// How this vault's processor connects to a cache service.
    pub fn link_security(&self, insecure_loopback: bool) -> Result<Security> {
        let dir = self.root.join(super::LINK_DIR);
        if !dir.join("ca.pem").exists() {
            return Err(Error::NotFound(format!(
                "{} holds no link credentials: this vault predates site-to-site replication; create them with `standby link init`",
                self.root.display()
            )));
        }
        Ok(Security {
            creds: Arc::new(Credentials::load(&dir, Role::Processor)?),
            insecure_loopback,
        })
    }

    /// Create the link credentials of a vault made before they existed.
    pub fn link_init(&self) -> Result<()> {
        crate::link::tls::create(&self.root.join(super::LINK_DIR))
    }

    /// Write what the source site needs (CA certificate, the cache service's and agent's
    /// certificates and keys, the link key) into `out`.
    pub fn link_export(&self, out: &Path) -> Result<()> {
        let dir = self.root.join(super::LINK_DIR);
        if !dir.join("ca.pem").exists() {
            return Err(Error::NotFound(format!(
                "{} holds no link credentials: this vault predates site-to-site replication; create them with `standby link init`",
                self.root.display()
            )));
        }
        crate::link::tls::export_source(&dir, out)
    }

    /// Ask a cache service which disks it holds for `vm` (its agent declared them).
    pub fn describe_remote(
        &self,
        addr: &str,
        insecure_loopback: bool,
        vm: &str,
    ) -> Result<Vec<DiskInfo>> {
        let security = self.link_security(insecure_loopback)?;
        let l = link::connect(addr, &security, PeerRole::Processor, vm)?;
        let (mut r, mut w) = (l.reader, l.writer);
        wire::write_msg(&mut w, &Msg::OpenProcessor { from_seq: 0 })?;
        let mut buf = Vec::new();
        match auth::expect(&mut r, &mut buf, "the description")? {
            Msg::Ready { disks, .. } => Ok(disks),
            m => Err(Error::Link(crate::error::LinkError::Unexpected {
                wanted: "ready",
                got: m.name(),
            })),
        }
    }

    /// Protect a VM whose agent ships to the cache service at `addr`. Its disks are those
    /// the agent declared there (connect the agent first). Returns the disks.
    pub fn protect_remote(
        &mut self,
        req: &ProtectRequest,
        addr: &str,
        insecure_loopback: bool,
    ) -> Result<Vec<DiskInfo>> {
        let policy_name = self.check_new_vm(req)?;
        if !req.disks.is_empty() {
            return Err(Error::Invalid(
                "a remote VM's disks are those its agent declares; drop --disk".into(),
            ));
        }
        let disks = self.describe_remote(addr, insecure_loopback, &req.vm)?;
        let (source, target, network_mapping) = placements(req)?;
        let record = VmRecord {
            name: req.vm.clone(),
            disks: disks
                .iter()
                .map(|d| catalog::DiskRecord {
                    name: d.name.clone(),
                    source: format!("remote:{addr}"),
                    size_bytes: d.size_bytes,
                })
                .collect(),
            policy: policy_name,
            source,
            target,
            network_mapping,
            state: VmState::Protected,
            created_us: crate::now_us(),
            failover: None,
            committed: false,
            test_failover: None,
            resync_reason: None,
            cache_capacity_bytes: req.cache_capacity_bytes,
            remote: Some(RemoteSource {
                cache: addr.to_string(),
                insecure_loopback,
            }),
            dir: self.new_vm_dir_name(&req.vm),
            unprotected: None,
            other_site_disks: None,
            failback: None,
            reversed: false,
        };
        let vm_dir = self.root.join("vms").join(record.dir_name());
        let _vm_lock = self.fresh_vm_dir(&vm_dir)?;
        let specs: Vec<DiskSpec> = disks
            .iter()
            .map(|d| DiskSpec {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        Replica::create(
            self.vfs.clone(),
            vm_dir.join("replica"),
            &specs,
            ReplicaConfig::default(),
        )?;
        let (cache, _) = Cache::open_with(
            self.vfs.clone(),
            vm_dir.join("cache"),
            CacheConfig::with_capacity(None),
        )?;
        cache.close()?;
        let name = req.vm.clone();
        self.update(|c| {
            if c.vms.contains_key(&name) {
                return Err(Error::Conflict(format!("VM '{name}' is already protected")));
            }
            c.vms.insert(name.clone(), record.clone());
            Ok(())
        })?;
        Ok(disks)
    }

    /// Remote VMs that `process --follow` pulls, and failed-over ones whose source site
    /// has not yet confirmed the fence (their follower tells it, then ends).
    pub fn remote_vms(&self) -> Vec<String> {
        self.catalog
            .vms
            .values()
            .filter(|v| {
                // A failback under way owns the VM until it is done.
                let live = !v.committed && v.state != VmState::FailedOver && v.failback.is_none();
                let unfenced = (v.committed || v.state == VmState::FailedOver)
                    && v.failover.as_ref().is_some_and(|f| f.fenced_us.is_none());
                v.remote.is_some() && v.unprotected.is_none() && (live || unfenced)
            })
            .map(|v| v.name.clone())
            .collect()
    }

    /// Record that the source site's cache service confirmed the fence of `vm`.
    pub fn set_fenced(&mut self, vm: &str) -> Result<()> {
        self.update(|c| {
            if let Some(f) = c.vm_mut(vm)?.failover.as_mut() {
                f.fenced_us = Some(crate::now_us());
            }
            Ok(())
        })
    }
}

/// One event worth telling the operator.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The live status of a remote VM as `follow` sees it: the vault's view plus the link.
pub(crate) fn write_status_file(
    vault: &Vault,
    vm: &str,
    st: Option<super::VmStatus>,
    link: &PullStatus,
) -> Result<()> {
    let doc = status_file::StatusFile::new(crate::now_us(), st, link.into());
    status_file::write(&*vault.vfs, &vault.vm_dir(vm), &doc)
}
