//! A vault: the embedded default deployment, one directory holding the catalog and, per
//! protected VM, its change log (the cache) and its replica (the target store).
//!
//! ```text
//! VAULT/catalog                 policies, VMs, settings, state (see catalog.rs)
//! VAULT/lock                    held by every command that uses the vault
//! VAULT/vms/VM/cache/           the VM's change log
//! VAULT/vms/VM/replica/         the VM's replica and recovery points
//! VAULT/failover/RG/VM/         default failover output: DISK.raw per disk + vm.json
//! VAULT/test-failover/RG/VM/    default test-failover output
//! ```
//!
//! Invariant: the catalog is replaced atomically, and changes that create files (protect,
//! failover) write those files first and the catalog last, so a kill at any moment leaves
//! either the old state or the new one.

pub mod catalog;
pub mod damage;
mod diff;
mod disks;
mod failover;
pub mod group;
mod lifecycle;
pub mod remote;
mod roundtrip;
mod roundtrip_remote;
pub mod spec;
mod status;

pub use crate::util::lock::LockWait;
pub use catalog::{
    Catalog, DiskRecord, FailbackRecord, FailoverRecord, Placement, PolicyRecord, RemoteSource,
    UnprotectedRecord, VmRecord, VmState,
};
pub use diff::{diff_views, DiffReport, DiffSide, DiskDiff, Range};
pub use disks::{DiskAddReport, DiskChange, DiskResizeReport};
pub use failover::{
    point_at, sha256_sparse, view_of, FailoverDisk, FailoverReport, MountHandle, Sha256Hex,
};
pub use lifecycle::UnprotectReport;
pub use roundtrip::{Direction, FailbackReport, ReprotectReport, SyncedDisk};
pub use roundtrip_remote::{HashedDisk, RemoteReprotectReport, RemoteReprotectRequest};
pub use spec::PointSpec;
pub use status::{DiskStatus, Health, VmStatus};

use crate::agent::{Agent, SourceDisk};
use crate::cache::{Cache, CacheConfig};
use crate::error::{Error, IoContext, Result};
use crate::now_us;
use crate::policy::Policy;
use crate::process::{PassReport, Processor};
use crate::record::{Consistency, Entry, Marker};
use crate::replica::{
    Damage, DiskSpec, PointInfo, PointKind, Replica, ReplicaConfig, VerifyReport,
};
use crate::util::lock;
use crate::util::names::check_name;
use crate::vfs::{RealFs, Vfs};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Reports long operations' progress (the CLI draws bars; the engine never prints).
pub trait Progress {
    fn begin(&mut self, _label: &str, _total_bytes: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn end(&mut self) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A source disk for `protect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskSource {
    /// An existing raw image.
    Existing(PathBuf),
    /// Create an empty sparse raw image of this size at this path.
    New(PathBuf, u64),
    /// Create an empty sparse raw image of this size inside the vault, at
    /// `VAULT/sources/VM/DISK.raw` (see [`Vault::new_disk_path`]): scoped by VM, so two VMs
    /// may each have a disk named `data`.
    NewInVault(u64),
}

/// What `protect` needs to know.
#[derive(Debug, Clone, Default)]
pub struct ProtectRequest {
    pub vm: String,
    pub disks: Vec<(String, Option<DiskSource>)>,
    pub policy: Option<String>,
    pub source: PlacementOverrides,
    pub target: PlacementOverrides,
    pub network_mapping: Vec<(String, String)>,
    /// Limit on the VM's change log (see [`VmRecord::cache_capacity_bytes`]).
    pub cache_capacity_bytes: Option<u64>,
}

/// Optional placement settings; unset ones take defaults.
#[derive(Debug, Clone, Default)]
pub struct PlacementOverrides {
    pub resource_group: Option<String>,
    pub network: Option<String>,
    pub subnet: Option<String>,
    pub availability_set: Option<String>,
}

/// What `protect` did.
#[derive(Debug, Clone)]
pub struct ProtectReport {
    pub initial_point: PointInfo,
    /// Bytes read from the source disks and shipped (holes and zero runs skipped).
    pub shipped_bytes: u64,
    pub scanned_bytes: u64,
    /// The images this protect created (`new:SIZE` disks), by disk name.
    pub created: Vec<(String, PathBuf)>,
}

/// Called with the holder's description before a command blocks on a busy lock.
pub type OnWait = Box<dyn Fn(&str) + Send + Sync>;

/// An open vault. It holds no lock itself: catalog changes take the vault lock for the
/// moment of the change (re-reading the catalog under it), and whatever opens a VM's log
/// or replica holds that VM's lock (`vms/VM/lock`) for as long as it does — a running
/// agent for its whole life.
pub struct Vault {
    root: PathBuf,
    pub(crate) vfs: Arc<dyn Vfs>,
    catalog: Catalog,
    who: String,
    wait: LockWait,
    on_wait: Option<OnWait>,
}

/// A VM's change log open through the agent's write tap, with the VM's lock held.
pub struct AgentHandle {
    agent: Agent,
    _lock: lock::VaultLock,
}

impl std::ops::Deref for AgentHandle {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl AgentHandle {
    /// Flush everything, close the log and release the VM.
    pub fn close(self) -> Result<()> {
        self.agent.close()
    }

    /// Split into the agent and the guard of the VM lock (keep the guard alive while the
    /// agent is used).
    pub fn into_parts(self) -> (Agent, lock::VaultLock) {
        (self.agent, self._lock)
    }
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact_at(&mut b, 0);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Created by a command waiting for a VM's lock; a long-running holder that can yield
/// (`process --follow`) lets go of the lock when it sees it.
pub const WANTED_FILE: &str = "lock.wanted";

/// The vault's link credentials (its own CA, certificates, link key), under the root.
pub const LINK_DIR: &str = "link";

impl Vault {
    /// Create a vault in `root` on the real filesystem (created if missing; an existing
    /// directory must be empty).
    pub fn init(root: &Path) -> Result<()> {
        // A URL (`az://…`, `s3://…`): the vault lives in the store, its locks and link
        // credentials in a local directory (see `objstore::resolve`).
        if let Some((shadow, fs)) = crate::objstore::resolve(root)? {
            fs.store()
                .probe()
                .map_err(|e| Error::Invalid(e.to_string()))?;
            if fs.exists(&shadow.join(catalog::FILE_NAME)) {
                return Err(Error::Conflict(format!(
                    "{} is already a Standby vault",
                    fs.store().url()
                )));
            }
            if fs.list(&shadow).is_ok_and(|n| !n.is_empty()) {
                return Err(Error::Conflict(format!(
                    "{} holds objects that are not a Standby vault; pick an empty or new prefix",
                    fs.store().url()
                )));
            }
            return Self::init_with(&fs, &shadow);
        }
        Self::init_with(&RealFs, root)
    }

    /// Create a vault in `root` through the given filesystem. The vault's locks and its link
    /// credentials are files on the real filesystem whatever `vfs` is (a lock is a flock, the
    /// keys are read by TLS), so `root` is created there too.
    pub fn init_with(vfs: &dyn Vfs, root: &Path) -> Result<()> {
        if vfs.exists(&root.join(catalog::FILE_NAME)) {
            return Err(Error::Conflict(format!(
                "{} is already a Standby vault",
                root.display()
            )));
        }
        if vfs.exists(root) {
            let entries = match vfs.list(root) {
                Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                    return Err(Error::Invalid(format!(
                        "{} exists and is not a directory",
                        root.display()
                    )))
                }
                other => other.at(root)?,
            };
            if !entries.is_empty() {
                return Err(Error::Conflict(format!(
                    "{} is a non-empty directory that is not a Standby vault; pick an empty or new directory",
                    root.display()
                )));
            }
        }
        vfs.create_dir_all(root).at(root)?;
        vfs.create_dir_all(&root.join("vms")).at(root)?;
        std::fs::create_dir_all(root).at(root)?;
        let _lock = lock::acquire(root, "standby init", LockWait::Fail)?;
        // The site-to-site link's CA, certificates and key (see `link::tls`).
        crate::link::tls::create(&root.join(LINK_DIR))?;
        catalog::store(vfs, root, &Catalog::new(random_id(), now_us()))?;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            if vfs.exists(parent) {
                vfs.sync_dir(parent).at(parent)?;
            }
        }
        Ok(())
    }

    /// Open a vault. `who` is recorded in the locks this command takes, so others can say
    /// whom they wait for; `wait` says whether a busy lock fails at once or is waited for.
    /// This opens the vault on the real filesystem; see [`Vault::open_with`].
    pub fn open(root: &Path, who: &str, wait: LockWait) -> Result<Vault> {
        if let Some((shadow, fs)) = crate::objstore::resolve(root)? {
            let fs = Arc::new(fs);
            // Unreachable, refused or missing container: say that, not "no vault". Only a
            // store that answered "no such object" makes this not a vault.
            let catalog = shadow.join(catalog::FILE_NAME);
            let present = |fs: &crate::objstore::ObjFs| -> Result<bool> {
                match fs.try_exists(&catalog) {
                    Ok(true) => Ok(true),
                    Ok(false) => {
                        fs.store()
                            .probe()
                            .map_err(|e| Error::Invalid(e.to_string()))?;
                        Ok(false)
                    }
                    Err(e) => Err(Error::io(&catalog, e)),
                }
            };
            let missing = |fs: &crate::objstore::ObjFs| {
                let url = fs.store().url();
                Error::NotFound(format!(
                    "{url} is not a Standby vault (create one with `standby init {url}`)"
                ))
            };
            if !present(&fs)? {
                return Err(missing(&fs));
            }
            // The store said the catalog is there: read it (a store gone meanwhile is an I/O
            // error naming it, never "not a vault").
            return Self::load_with(fs, &shadow, who, wait);
        }
        Self::open_with(Arc::new(RealFs), root, who, wait)
    }

    /// After `exists` said no (it cannot tell a missing object from an unreachable store):
    /// with an object vault, the store is asked again and an unreachable store is an error
    /// naming it.
    fn answers_and_has(&self, path: &Path) -> Result<bool> {
        match crate::objstore::registered(&self.root) {
            Some(fs) => fs.try_exists(path).map_err(|e| Error::io(path, e)),
            None => Ok(false),
        }
    }

    /// The vault's store URL when it lives in object storage.
    pub fn store_url(&self) -> Option<String> {
        crate::objstore::registered(&self.root).map(|fs| fs.store().url().to_string())
    }

    /// With an object vault, a VM's local directory (its lock file's) may not exist on this
    /// machine yet: another machine protected the VM.
    fn local_dir(&self, dir: &Path) -> Result<()> {
        if !dir.exists() && crate::objstore::registered(&self.root).is_some() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        Ok(())
    }

    /// With an object vault, hold the VM's lease (in `dir`) along with its local lock.
    fn with_lease(
        &self,
        dir: &Path,
        l: lock::VaultLock,
        wait: LockWait,
    ) -> Result<lock::VaultLock> {
        if dir == self.root {
            return Ok(l);
        }
        match crate::objstore::registered(&self.root) {
            Some(fs) => {
                use crate::objstore::lease;
                let lease = match lease::acquire(&fs, dir, &self.who, LockWait::Fail) {
                    Err(Error::Locked(holder)) if wait != LockWait::Fail => {
                        if let Some(f) = &self.on_wait {
                            f(&holder);
                        }
                        // A `process --follow` of this machine keeps the lease between its
                        // passes: ask it to let go, as for the local lock.
                        let wanted = dir.join(format!("{WANTED_FILE}.{}", std::process::id()));
                        let _ = std::fs::write(&wanted, self.who.as_bytes());
                        let got = lease::acquire(&fs, dir, &self.who, wait);
                        let _ = std::fs::remove_file(&wanted);
                        got?
                    }
                    other => other?,
                };
                Ok(l.with_hold(Box::new(lease)))
            }
            None => Ok(l),
        }
    }

    /// Open a vault whose files go through `vfs` (the vault's catalog, logs, replicas and
    /// state files; its locks stay flocks on the real filesystem, see [`Vault::init_with`]).
    pub fn open_with(vfs: Arc<dyn Vfs>, root: &Path, who: &str, wait: LockWait) -> Result<Vault> {
        if !vfs.exists(&root.join(catalog::FILE_NAME)) {
            return Err(Error::NotFound(format!(
                "{} is not a Standby vault (create one with `standby init {}`)",
                root.display(),
                root.display()
            )));
        }
        Self::load_with(vfs, root, who, wait)
    }

    /// [`Vault::open_with`] once the catalog is known to be there.
    fn load_with(vfs: Arc<dyn Vfs>, root: &Path, who: &str, wait: LockWait) -> Result<Vault> {
        let catalog = catalog::load(&*vfs, root)?;
        Ok(Vault {
            root: root.to_path_buf(),
            vfs,
            catalog,
            who: who.to_string(),
            wait,
            on_wait: None,
        })
    }

    /// Be told (with the holder's description) before this vault blocks on a busy lock.
    pub fn on_wait(&mut self, f: OnWait) {
        self.on_wait = Some(f);
    }

    fn acquire(&self, dir: &Path, wait: LockWait) -> Result<lock::VaultLock> {
        let l = self.acquire_local(dir, wait)?;
        self.with_lease(dir, l, wait)
    }

    fn acquire_local(&self, dir: &Path, wait: LockWait) -> Result<lock::VaultLock> {
        self.local_dir(dir)?;
        match lock::acquire(dir, &self.who, LockWait::Fail) {
            Err(Error::Locked(holder)) if wait != LockWait::Fail => {
                if let Some(f) = &self.on_wait {
                    f(&holder);
                }
                // Ask a holder that yields (`process --follow` of a remote VM) to let go.
                // One file per waiter, so one waiter's success never hides another's wish.
                let wanted = dir.join(format!("{WANTED_FILE}.{}", std::process::id()));
                let _ = std::fs::write(&wanted, self.who.as_bytes());
                let got = lock::acquire(dir, &self.who, wait);
                let _ = std::fs::remove_file(&wanted);
                got
            }
            other => other,
        }
    }

    /// Take the lock in `dir` (a VM's directory), waiting as `wait` says.
    pub(crate) fn acquire_dir(&self, dir: &Path, wait: LockWait) -> Result<lock::VaultLock> {
        self.acquire(dir, wait)
    }

    /// Whether some command waits for the lock in `dir` (a yielding holder lets go).
    pub fn lock_wanted(dir: &Path) -> bool {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(WANTED_FILE))
            })
        })
    }

    /// Change the catalog: under the vault lock, re-read it, apply `f`, store it.
    fn update<T>(&mut self, f: impl FnOnce(&mut Catalog) -> Result<T>) -> Result<T> {
        let _lock = self.acquire(&self.root, LockWait::Block)?;
        let mut fresh = catalog::load(&*self.vfs, &self.root)?;
        let out = f(&mut fresh)?;
        catalog::store(&*self.vfs, &self.root, &fresh)?;
        self.catalog = fresh;
        Ok(out)
    }

    /// Take a VM's lock (waiting per the vault's setting).
    fn lock_vm(&self, vm: &str) -> Result<lock::VaultLock> {
        self.catalog.vm(vm)?;
        let dir = self.vm_dir(vm);
        if !self.vfs.exists(&dir) && !self.answers_and_has(&dir)? {
            return Err(Error::NotFound(format!(
                "VM '{vm}' has no replication data (was its failover committed?)"
            )));
        }
        self.acquire(&dir, self.wait)
    }

    /// With an object vault, take (or share) the VM's lease alone, for a long-running
    /// command to keep the VM between its passes (`process --follow`): each pass's lock then
    /// shares it, and another machine waits until this process lets go or dies. None on a
    /// vault on the local filesystem. Fails at once if another holds the lease.
    pub fn pin_lease(&self, vm: &str) -> Result<Option<crate::objstore::lease::Lease>> {
        self.catalog.vm(vm)?;
        match crate::objstore::registered(&self.root) {
            Some(fs) => Ok(Some(crate::objstore::lease::acquire(
                &fs,
                &self.vm_dir(vm),
                &self.who,
                LockWait::Fail,
            )?)),
            None => Ok(None),
        }
    }

    /// A VM's directory (where its lock is, and where a waiter says it wants the lock).
    pub fn vm_dir_of(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm)
    }

    /// Take a VM's lock only if it is free (`Error::Locked` names the holder otherwise).
    pub fn try_lock_vm(&self, vm: &str) -> Result<lock::VaultLock> {
        self.catalog.vm(vm)?;
        let dir = self.vm_dir(vm);
        self.local_dir(&dir)?;
        let l = lock::acquire(&dir, &self.who, LockWait::Fail)?;
        self.with_lease(&dir, l, LockWait::Fail)
    }

    /// Refuse source images another VM of this vault (or another disk of the same VM)
    /// already uses: two agents would each replicate half of the writes. Paths are
    /// compared canonicalized, and existing files by identity (a hard link is the same
    /// image). VMs whose failover was committed no longer hold their sources.
    fn check_sources_unused(&self, disks: &[DiskRecord]) -> Result<()> {
        for (i, d) in disks.iter().enumerate() {
            let path = Path::new(&d.source);
            if let Some(other) = disks[..i]
                .iter()
                .find(|o| same_image(Path::new(&o.source), path))
            {
                return Err(Error::Invalid(format!(
                    "disks '{}' and '{}' are the same image {}",
                    other.name, d.name, d.source
                )));
            }
            for (vm, rec) in &self.catalog.vms {
                if rec.committed || rec.remote.is_some() || rec.unprotected.is_some() {
                    continue;
                }
                if let Some(o) = rec
                    .disks
                    .iter()
                    .find(|o| same_image(Path::new(&o.source), path))
                {
                    return Err(Error::Conflict(format!(
                        "{} is already the source of disk '{}' of VM '{vm}': one image is protected by one VM",
                        d.source, o.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Where a running agent of `vm` listens for control requests.
    pub fn agent_socket(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("agent.sock")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where throw-away files of a VM go (a writable mount's overlays).
    pub fn vm_scratch(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub(crate) fn vm_dir(&self, vm: &str) -> PathBuf {
        match self.catalog.vms.get(vm) {
            Some(rec) => self.root.join("vms").join(rec.dir_name()),
            None => self.root.join("vms").join(vm),
        }
    }

    /// The directory a new VM named `vm` gets: its name, unless another VM's data (an
    /// unprotected VM of that name) is there; then `VM.N` for the first free N.
    pub(crate) fn new_vm_dir_name(&self, vm: &str) -> Option<String> {
        let used: std::collections::BTreeSet<&str> =
            self.catalog.vms.values().map(|r| r.dir_name()).collect();
        if !used.contains(vm) {
            return None;
        }
        (1u64..)
            .map(|n| format!("{vm}.{n}"))
            .find(|d| !used.contains(d.as_str()))
    }

    /// Create or change a policy.
    pub fn set_policy(&mut self, name: &str, policy: &Policy) -> Result<()> {
        check_name("policy", name)?;
        policy.validate()?;
        let rec = PolicyRecord::from(policy);
        self.update(|c| {
            c.policies.insert(name.to_string(), rec);
            Ok(())
        })
    }

    /// The policy a VM follows.
    pub fn vm_policy(&self, vm: &str) -> Result<Policy> {
        let rec = self.catalog.vm(vm)?;
        self.catalog.policy(&rec.policy)
    }

    /// Enable replication of a VM: register it, ship every allocated extent of its disks
    /// (holes and zero runs skipped) and cut the `initial` point.
    pub fn protect(
        &mut self,
        req: &ProtectRequest,
        progress: &mut dyn Progress,
    ) -> Result<ProtectReport> {
        let policy_name = self.check_new_vm(req)?;
        if req.disks.is_empty() {
            return Err(Error::Invalid(
                "a VM needs at least one --disk NAME=PATH".into(),
            ));
        }
        let mut disks = Vec::new();
        let mut create: Vec<(String, PathBuf, u64)> = Vec::new();
        for (name, src) in &req.disks {
            check_name("disk", name)?;
            if disks.iter().any(|d: &DiskRecord| &d.name == name) {
                return Err(Error::Invalid(format!("disk '{name}' is named twice")));
            }
            let src = src.as_ref().ok_or_else(|| {
                Error::Invalid(format!(
                    "disk '{name}' needs a source: --disk {name}=PATH or {name}=new:SIZE"
                ))
            })?;
            let (path, size) = match src {
                DiskSource::Existing(p) => {
                    let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
                    if !meta.is_file() {
                        return Err(Error::Invalid(format!(
                            "source disk {} is not a raw image file",
                            p.display()
                        )));
                    }
                    (p.clone(), meta.len())
                }
                DiskSource::New(p, size) => {
                    if p.exists() {
                        return Err(Error::Conflict(format!(
                            "{} already exists; new:SIZE creates a new image",
                            p.display()
                        )));
                    }
                    (p.clone(), *size)
                }
                DiskSource::NewInVault(size) => {
                    let p = self.new_disk_path(&req.vm, name);
                    if p.exists() {
                        return Err(Error::Conflict(format!(
                            "{} already exists (left by an earlier protect of VM '{}'?); remove it, or use --disk {name}=PATH for an existing image",
                            p.display(),
                            req.vm
                        )));
                    }
                    (p, *size)
                }
            };
            if size == 0
                || !size.is_multiple_of(crate::SECTOR_BYTES)
                || size > crate::replica::MAX_DISK_BYTES
            {
                return Err(Error::Invalid(format!(
                    "disk '{name}' is {size} bytes: a disk must be a non-zero multiple of 512 bytes, at most 64 TiB"
                )));
            }
            let path = std::path::absolute(&path).map_err(|e| Error::io(&path, e))?;
            if matches!(src, DiskSource::New(..) | DiskSource::NewInVault(_)) {
                create.push((name.clone(), path.clone(), size));
            }
            disks.push(DiskRecord {
                name: name.clone(),
                source: path.to_string_lossy().into_owned(),
                size_bytes: size,
            });
        }
        self.check_sources_unused(&disks)?;
        // Everything that can refuse the request is checked before an image is created.
        let (source, target, network_mapping) = placements(req)?;
        for (i, (_, p, size)) in create.iter().enumerate() {
            if let Err(e) = create_sparse_image(p, *size) {
                remove_created(&create[..i]);
                return Err(e);
            }
        }
        let record = VmRecord {
            name: req.vm.clone(),
            disks,
            policy: policy_name,
            source,
            target,
            network_mapping,
            state: VmState::InitialReplication,
            created_us: now_us(),
            failover: None,
            committed: false,
            test_failover: None,
            resync_reason: None,
            cache_capacity_bytes: req.cache_capacity_bytes,
            remote: None,
            dir: self.new_vm_dir_name(&req.vm),
            unprotected: None,
            other_site_disks: None,
            failback: None,
            reversed: false,
        };
        // Files first, catalog last: a VM dir without a catalog entry is overwritten by the
        // next protect of that name, and a power cut anywhere before the catalog names the
        // VM leaves no VM.
        // Until the catalog names the VM, a failure leaves no image this protect created
        // (a retry would be refused with "already exists").
        let done = (|| -> Result<_> {
            let vm_dir = self.root.join("vms").join(record.dir_name());
            let _vm_lock = self.fresh_vm_dir(&vm_dir)?;
            let specs: Vec<DiskSpec> = record
                .disks
                .iter()
                .map(|d| DiskSpec {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                })
                .collect();
            let replica = Replica::create(
                self.vfs.clone(),
                vm_dir.join("replica"),
                &specs,
                ReplicaConfig::default(),
            )?;
            let config = CacheConfig::write_path(record.cache_capacity_bytes);
            let (cache, _) = Cache::open_with(self.vfs.clone(), vm_dir.join("cache"), config)?;
            let cache = Arc::new(cache);
            let vm_name = req.vm.clone();
            let mut replica = replica;
            let (shipped, scanned) =
                initial_replication(&cache, &mut replica, &record.disks, progress)?;
            // The initial point sits at its own record, so it has a sequence number and a time
            // even when the disks were empty.
            let marker = Marker {
                consistency: Consistency::Crash,
                name: Some("initial".into()),
                group: None,
                kind: crate::record::MarkerKind::Point,
            };
            if let Err(Error::CacheFull { .. }) = cache.append(&Entry::Marker(&marker)) {
                drain_into(&cache, &mut replica)?;
                cache.append(&Entry::Marker(&marker))?;
            }
            let durable = cache.sync()?;
            cache.set_source_seq(durable)?;
            // Apply the initial copy as one layer (no interval points inside it), cut the
            // `initial` point, then let the log trim it.
            drain_into(&cache, &mut replica)?;
            let initial_point = replica.cut_point(PointKind::Initial, Some("initial"))?;
            let applied = replica.flush()?;
            cache.set_checkpoint(applied.min(cache.durable_seq()))?;
            drop(replica);
            cache.close()?;
            // The VM exists from here on, complete: registered as protected in one catalog write.
            let record = VmRecord {
                state: VmState::Protected,
                ..record
            };
            self.update(|c| {
                if c.vms.contains_key(&vm_name) {
                    return Err(Error::Conflict(format!(
                        "VM '{vm_name}' is already protected"
                    )));
                }
                c.vms.insert(vm_name.clone(), record);
                Ok(())
            })?;
            Ok((initial_point, shipped, scanned))
        })();
        let (initial_point, shipped, scanned) = match done {
            Ok(r) => r,
            Err(e) => {
                remove_created(&create);
                return Err(e);
            }
        };
        Ok(ProtectReport {
            initial_point,
            shipped_bytes: shipped,
            scanned_bytes: scanned,
            created: create.into_iter().map(|(n, p, _)| (n, p)).collect(),
        })
    }

    /// Where `--disk NAME=new:SIZE` creates a VM's new source image: `VAULT/sources/VM/NAME.raw`.
    pub fn new_disk_path(&self, vm: &str, disk: &str) -> PathBuf {
        self.root
            .join("sources")
            .join(vm)
            .join(format!("{disk}.raw"))
    }

    /// Make a new VM's directory empty (what an interrupted protect left is removed) and
    /// hold its lock, so that a second protect of the same name fails rather than removes
    /// this one's files. The data goes through the vault's Vfs; the lock file (a flock)
    /// lives in the same directory on the real filesystem.
    pub(crate) fn fresh_vm_dir(&self, vm_dir: &Path) -> Result<lock::VaultLock> {
        std::fs::create_dir_all(vm_dir).at(vm_dir)?;
        let guard = lock::acquire(vm_dir, &self.who, LockWait::Fail)?;
        self.vfs.create_dir_all(vm_dir).at(vm_dir)?;
        // By name first: a Vfs need not list subdirectories.
        for sub in ["cache", "replica"] {
            let path = vm_dir.join(sub);
            self.vfs.remove_dir_all(&path).at(&path)?;
        }
        for name in self.vfs.list(vm_dir).at(vm_dir)? {
            let path = vm_dir.join(&name);
            if name == lock::FILE_NAME || name.starts_with(WANTED_FILE) {
                continue;
            }
            if self.vfs.list(&path).is_ok() {
                self.vfs.remove_dir_all(&path).at(&path)?;
            } else {
                self.vfs.remove(&path).at(&path)?;
            }
        }
        Ok(guard)
    }

    /// A protect request's VM name is valid and free, and its policy exists: the policy's name.
    fn check_new_vm(&self, req: &ProtectRequest) -> Result<String> {
        check_name("VM", &req.vm)?;
        if self.catalog.vms.contains_key(&req.vm) {
            return Err(Error::Conflict(format!(
                "VM '{}' is already protected (see `standby status {}`)",
                req.vm, req.vm
            )));
        }
        let policy_name = req.policy.clone().unwrap_or_else(|| "default".into());
        self.catalog.policy(&policy_name)?; // it must exist
        Ok(policy_name)
    }

    pub(crate) fn open_cache(&self, vm: &str) -> Result<Arc<Cache>> {
        let rec = self.live_vm(vm)?;
        let config = CacheConfig::write_path(rec.cache_capacity_bytes);
        let (cache, _) = Cache::open_with(self.vfs.clone(), self.vm_dir(vm).join("cache"), config)?;
        Ok(Arc::new(cache))
    }

    pub(crate) fn open_replica(&self, vm: &str) -> Result<Replica> {
        self.live_vm(vm)?;
        Ok(Replica::open(
            self.vfs.clone(),
            self.vm_dir(vm).join("replica"),
            ReplicaConfig::default(),
        )?
        .0)
    }

    /// A VM whose recovery points still exist.
    fn live_vm(&self, vm: &str) -> Result<&VmRecord> {
        let rec = self.catalog.vm(vm)?;
        if rec.committed {
            return Err(Error::Conflict(format!(
                "VM '{vm}' was failed over and the failover committed: its recovery points are gone"
            )));
        }
        Ok(rec)
    }

    /// The write tap of a VM (what the NBD agent serves; tests and the demo write through it).
    pub fn agent(&self, vm: &str) -> Result<AgentHandle> {
        self.agent_with(vm, true)
    }

    /// The write tap of a VM; without `replay`, see [`Agent::open_with`].
    pub(crate) fn agent_with(&self, vm: &str, replay: bool) -> Result<AgentHandle> {
        // The split-brain guard, before anything else (a committed VM has no data left).
        let rec = self.catalog.vm(vm)?;
        if rec.remote.is_none() && (rec.committed || rec.state == VmState::FailedOver) {
            return Err(split_brain(vm, rec));
        }
        let lock = self.lock_vm(vm)?;
        let rec = self.live_vm(vm)?;
        if let Some(r) = &rec.remote {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is replicated from a remote site: its agent runs there (`standby agent {vm} --cache {}`)",
                r.cache
            )));
        }
        self.refuse_retired(vm, rec)?;
        if rec.state == VmState::FailedOver {
            return Err(split_brain(vm, rec));
        }
        let disks = rec
            .disks
            .iter()
            .map(|d| SourceDisk {
                name: d.name.clone(),
                path: PathBuf::from(&d.source),
                size_bytes: d.size_bytes,
            })
            .collect();
        Ok(AgentHandle {
            agent: Agent::open_with(self.open_cache(vm)?, disks, replay)?,
            _lock: lock,
        })
    }

    /// The processor of a VM whose log the caller already has open through
    /// [`Vault::agent`] (which holds the VM's lock): the agent process runs it.
    pub fn processor_for(&self, vm: &str, handle: &AgentHandle) -> Result<Processor> {
        let policy = self.vm_policy(vm)?;
        Ok(
            Processor::new(handle.cache().clone(), self.open_replica(vm)?, policy)?
                .counting_into(crate::util::latency::replicated_bytes(vm)),
        )
    }

    /// Apply a VM's pending changes into its replica, cutting and pruning points per policy.
    pub fn process(&mut self, vm: &str) -> Result<PassReport> {
        let _lock = self.lock_vm(vm)?;
        let rec = self.live_vm(vm)?;
        self.refuse_retired(vm, rec)?;
        if rec.state == VmState::FailedOver {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is failed over and no longer processed"
            )));
        }
        let policy = self.vm_policy(vm)?;
        let cache = self.open_cache(vm)?;
        let mut p = Processor::new(cache.clone(), self.open_replica(vm)?, policy)?
            .counting_into(crate::util::latency::replicated_bytes(vm));
        let report = p.run_pass()?;
        drop(p);
        cache.close()?;
        Ok(report)
    }

    /// Record that a VM needs a resync (`Some(reason)`) or has finished one (`None`).
    pub fn set_resync(&mut self, vm: &str, reason: Option<String>) -> Result<()> {
        self.update(|c| {
            let rec = c.vm_mut(vm)?;
            match reason {
                Some(r) => {
                    if matches!(rec.state, VmState::Protected | VmState::InitialReplication) {
                        rec.state = VmState::ResyncRequired;
                    }
                    rec.resync_reason = Some(r);
                }
                None => {
                    if rec.state == VmState::ResyncRequired {
                        rec.state = VmState::Protected;
                    }
                    rec.resync_reason = None;
                }
            }
            Ok(())
        })
    }

    /// VMs that `process` without a name works through.
    pub fn processable_vms(&self) -> Vec<String> {
        self.catalog
            .vms
            .values()
            .filter(|v| {
                !v.committed
                    && v.unprotected.is_none()
                    && v.failback.is_none()
                    && matches!(
                        v.state,
                        VmState::Protected | VmState::TestFailover | VmState::ResyncRequired
                    )
            })
            .map(|v| v.name.clone())
            .collect()
    }

    /// Cut a recovery point now: a marker goes through the log, ordered with the writes,
    /// and the log is processed up to it.
    pub fn cut_point(
        &mut self,
        vm: &str,
        consistency: Consistency,
        name: Option<&str>,
    ) -> Result<PointInfo> {
        let _lock = self.lock_vm(vm)?;
        let rec = self.live_vm(vm)?;
        self.refuse_retired(vm, rec)?;
        if rec.state == VmState::FailedOver {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is failed over and no longer processed"
            )));
        }
        if let Some(n) = name {
            crate::record::check_point_name(n).map_err(Error::Invalid)?;
        }
        if rec.remote.is_some() {
            // The staging log mirrors the source's log record for record: nothing may be
            // appended here. A crash-consistent point is cut where processing stands.
            if consistency == Consistency::App {
                return Err(Error::Conflict(format!(
                    "VM '{vm}' is replicated from a remote site: app-consistent points are cut by its agent there"
                )));
            }
            let cache = self.open_cache(vm)?;
            let mut p = Processor::new(cache.clone(), self.open_replica(vm)?, self.vm_policy(vm)?)?;
            p.run_pass()?;
            if p.in_resync() {
                return Err(Error::Conflict(format!(
                    "VM '{vm}' is in the middle of a resync: no consistent point can be cut until it ends"
                )));
            }
            let point = p
                .replica_mut()
                .cut_point(PointKind::CrashConsistent, name)?;
            p.replica_mut().flush()?;
            drop(p);
            cache.close()?;
            return Ok(point);
        }
        let marker = Marker {
            consistency,
            name: name.map(str::to_string),
            group: None,
            kind: crate::record::MarkerKind::Point,
        };
        let cache = self.open_cache(vm)?;
        let seq = cache.append(&Entry::Marker(&marker))?;
        cache.wait_durable(seq)?;
        let mut p = Processor::new(cache.clone(), self.open_replica(vm)?, self.vm_policy(vm)?)?;
        let report = p.run_pass()?;
        drop(p);
        cache.close()?;
        report
            .points
            .into_iter()
            .find(|pt| pt.seq == seq)
            .ok_or_else(|| Error::Invalid(format!("the marker at seq {seq} cut no point")))
    }

    /// The retained points of a VM, oldest first.
    pub fn points(&self, vm: &str) -> Result<Vec<PointInfo>> {
        let _lock = self.lock_vm(vm)?;
        Ok(self.open_replica(vm)?.points())
    }

    /// Check every checksum of a VM's change log and replica (or, with `spec`, report only
    /// damage that point reads).
    pub fn verify(
        &self,
        vm: &str,
        spec: Option<PointSpec>,
    ) -> Result<(VerifyReport, Option<PointInfo>)> {
        let _lock = self.lock_vm(vm)?;
        let replica = self.open_replica(vm)?;
        let cache = self.open_cache(vm)?;
        let result = self.verify_open(vm, spec, &replica, &cache);
        cache.close()?;
        result
    }

    /// [`Vault::verify`] of a VM whose replica and log the caller has open (the process
    /// that owns the VM).
    pub fn verify_open(
        &self,
        vm: &str,
        spec: Option<PointSpec>,
        replica: &Replica,
        cache: &Cache,
    ) -> Result<(VerifyReport, Option<PointInfo>)> {
        let mut report = replica.verify()?;
        // The change log: reading every retained record verifies every frame.
        let first = cache.stats().first_seq;
        let mut reader = cache.reader(first)?;
        loop {
            match reader.next_record() {
                Ok(Some(_)) => report.frames_checked += 1,
                Ok(None) => break,
                Err(Error::Corrupt { path, offset, what }) => {
                    report.damage.push(crate::replica::Damage {
                        path,
                        offset,
                        what,
                        points: vec![],
                        latest: true,
                    });
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        // Every check ran whatever `spec` narrows the report to: record what was found (or
        // that nothing was), so status says so until a later verify is clean.
        let dir = self.vm_dir(vm);
        match report.damage.first() {
            None => damage::clear(&*self.vfs, &dir)?,
            Some(first) => damage::store(
                &*self.vfs,
                &dir,
                &damage::DamageRecord {
                    count: u32::try_from(report.damage.len()).unwrap_or(u32::MAX),
                    found_us: now_us(),
                    text: format!(
                        "corruption in {} at byte {}: {}",
                        first.path.display(),
                        first.offset,
                        first.what
                    ),
                },
            )?,
        }
        let point = match spec {
            None => None,
            Some(PointSpec::Id(id)) => {
                let p = replica
                    .point(id)
                    .ok_or_else(|| unknown_point(vm, &id.to_string()))?;
                report.damage.retain(|d| d.points.contains(&id));
                Some(p)
            }
            Some(PointSpec::Latest) => {
                report.damage.retain(|d| d.latest);
                None
            }
            Some(other) => {
                let p = resolve_existing(replica, vm, other)?;
                report.damage.retain(|d| d.points.contains(&p.id));
                Some(p)
            }
        };
        Ok((report, point))
    }
}

pub(crate) fn unknown_point(vm: &str, what: &str) -> Error {
    Error::NotFound(format!(
        "VM '{vm}' has no recovery point {what} (see `standby points {vm}`)"
    ))
}

/// Resolve a spec that names an existing point (not `latest`, `seq:` or `time:`).
pub(crate) fn resolve_existing(replica: &Replica, vm: &str, spec: PointSpec) -> Result<PointInfo> {
    let points = replica.points();
    match spec {
        PointSpec::LatestProcessed => points
            .last()
            .cloned()
            .ok_or_else(|| unknown_point(vm, "yet")),
        PointSpec::LatestAppConsistent => points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::AppConsistent)
            .cloned()
            .ok_or_else(|| unknown_point(vm, "that is app-consistent")),
        PointSpec::Id(id) => replica
            .point(id)
            .ok_or_else(|| unknown_point(vm, &id.to_string())),
        // Names need not be unique: the newest point of that name.
        PointSpec::Name(name) => points
            .iter()
            .rev()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "VM '{vm}' has no recovery point named '{name}' (see `standby points {vm}`; a point is also latest, latest-processed, latest-app-consistent, an id, seq:N or time:RFC3339)"
                ))
            }),
        other => Err(Error::Invalid(format!(
            "'{other}' does not name a single recovery point"
        ))),
    }
}

/// Ship every allocated, non-zero 4 KiB block of each disk into the log.
/// Apply everything durable in the log to the replica and let the log trim it (during
/// protect: the initial copy goes into one layer, and a capacity-limited log never fills).
/// The source and target placement and network mapping of a protect request (defaults
/// derived from the source).
fn placements(req: &ProtectRequest) -> Result<(Placement, Placement, BTreeMap<String, String>)> {
    let source = Placement {
        resource_group: req
            .source
            .resource_group
            .clone()
            .unwrap_or_else(|| "default".into()),
        network: req
            .source
            .network
            .clone()
            .unwrap_or_else(|| "default-net".into()),
        subnet: req
            .source
            .subnet
            .clone()
            .unwrap_or_else(|| "default".into()),
        availability_set: req.source.availability_set.clone(),
    };
    // The source network's entry of --network-mapping and --target-network say the same
    // thing; each defaults from the other, and a contradiction is refused.
    let mut mapped: BTreeMap<&str, &str> = BTreeMap::new();
    for (s, d) in &req.network_mapping {
        match mapped.insert(s, d) {
            Some(prev) if prev != d => {
                return Err(Error::Invalid(format!(
                    "--network-mapping maps network {s} twice: to {prev} and to {d}"
                )))
            }
            _ => {}
        }
    }
    let mapped_target = mapped.get(source.network.as_str()).map(|d| d.to_string());
    if let (Some(t), Some(m)) = (&req.target.network, &mapped_target) {
        if t != m {
            return Err(Error::Invalid(format!(
                "--target-network {t} contradicts --network-mapping {}={m}; give one of them (or the same network in both)",
                source.network
            )));
        }
    }
    let target = Placement {
        resource_group: req
            .target
            .resource_group
            .clone()
            .unwrap_or_else(|| format!("{}-asr", source.resource_group)),
        network: req
            .target
            .network
            .clone()
            .or(mapped_target)
            .unwrap_or_else(|| format!("{}-asr", source.network)),
        subnet: req
            .target
            .subnet
            .clone()
            .unwrap_or_else(|| source.subnet.clone()),
        availability_set: req
            .target
            .availability_set
            .clone()
            .or_else(|| source.availability_set.as_ref().map(|s| format!("{s}-asr"))),
    };
    for (what, v) in [
        ("resource group", &target.resource_group),
        ("network", &target.network),
    ] {
        check_name(what, v)?;
    }
    let mut network_mapping = BTreeMap::new();
    network_mapping.insert(source.network.clone(), target.network.clone());
    for (s, d) in &req.network_mapping {
        network_mapping.insert(s.clone(), d.clone());
    }
    Ok((source, target, network_mapping))
}

/// Remove the images a refused protect created (best effort: the error that refused it is
/// what the user needs to see).
fn remove_created(created: &[(String, PathBuf, u64)]) {
    for (_, p, _) in created {
        let _ = std::fs::remove_file(p);
    }
}

/// Create an empty sparse raw image (its parent directories as needed); the file and its
/// directory are synced, so the image protect recorded survives a crash.
fn create_sparse_image(p: &Path, size: u64) -> Result<()> {
    let dir = p
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", p.display())))?;
    std::fs::create_dir_all(dir).at(dir)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(|e| Error::io(p, e))?;
    f.set_len(size).map_err(|e| Error::io(p, e))?;
    f.sync_all().map_err(|e| Error::io(p, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir)?;
    Ok(())
}

fn drain_into(cache: &Cache, replica: &mut Replica) -> Result<()> {
    cache.sync()?;
    let mut reader = cache.reader(replica.applied_seq() + 1)?;
    while let Some(rec) = reader.next_record()? {
        replica.apply(&rec)?;
    }
    let applied = replica.flush()?;
    cache.set_checkpoint(applied.min(cache.durable_seq()))?;
    Ok(())
}

fn initial_replication(
    cache: &Cache,
    replica: &mut Replica,
    disks: &[DiskRecord],
    progress: &mut dyn Progress,
) -> Result<(u64, u64)> {
    const CHUNK: usize = 1 << 20;
    const BLOCK: usize = 4096;
    let mut extents = Vec::new();
    let mut total = 0;
    for (i, d) in disks.iter().enumerate() {
        let path = PathBuf::from(&d.source);
        let f = std::fs::File::open(&path).at(&path)?;
        for (s, e) in crate::fsutil::data_ranges(&f, d.size_bytes).at(&path)? {
            total += e - s;
            extents.push((i as u16, path.clone(), s, e));
        }
    }
    progress.begin("initial replication", total);
    let mut shipped = 0;
    let mut buf = vec![0u8; CHUNK];
    let mut last = 0;
    for (disk, path, start, end) in extents {
        let f = std::fs::File::open(&path).at(&path)?;
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], at).at(&path)?;
            // Ship runs of blocks that are not all zeros.
            let mut run_start: Option<usize> = None;
            let mut b = 0;
            while b <= n {
                let zero = b == n || buf[b..(b + BLOCK).min(n)].iter().all(|&x| x == 0);
                match (zero, run_start) {
                    (false, None) => run_start = Some(b),
                    (true, Some(s)) => {
                        let data = &buf[s..b.min(n)];
                        let entry = Entry::Write {
                            disk,
                            offset: at + s as u64,
                            data,
                        };
                        last = match cache.append(&entry) {
                            Err(Error::CacheFull { .. }) => {
                                // A capacity-limited log: apply what it holds, then go on.
                                drain_into(cache, replica)?;
                                cache.append(&entry)?
                            }
                            other => other?,
                        };
                        shipped += data.len() as u64;
                        run_start = None;
                    }
                    _ => {}
                }
                b += BLOCK;
            }
            at += n as u64;
            progress.advance(n as u64);
        }
    }
    if last > 0 {
        cache.wait_written(last)?;
    }
    progress.end();
    Ok((shipped, total))
}

/// A VM's points with the bytes each one's layer holds, and the damage that spoils some.
pub type PointsReport = (Vec<(PointInfo, u64)>, Vec<Damage>);

impl Vault {
    /// The retained points of a VM with the bytes each one's layer holds.
    pub fn points_with_bytes(&self, vm: &str) -> Result<Vec<(PointInfo, u64)>> {
        let _lock = self.lock_vm(vm)?;
        Ok(self.open_replica(vm)?.points_with_bytes())
    }

    /// The retained points of a VM with the bytes each one's layer holds, and the damage
    /// that makes some of them unreadable (each names the points it spoils).
    pub fn points_report(&self, vm: &str) -> Result<PointsReport> {
        let _lock = self.lock_vm(vm)?;
        let replica = self.open_replica(vm)?;
        Ok((replica.points_with_bytes(), replica.damage()))
    }
}

/// Whether two source paths name one image: by identity when both exist, else by their
/// canonical paths (a path that does not exist yet is canonicalized through its directory).
fn same_image(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return (x.dev(), x.ino()) == (y.dev(), y.ino());
    }
    let canonical = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) => std::fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| p.to_path_buf()),
            _ => p.to_path_buf(),
        })
    };
    canonical(a) == canonical(b)
}

/// The split-brain guard's refusal: the VM failed over, so its old source must not take
/// writes that no replica would ever hold (two histories would diverge silently).
pub(crate) fn split_brain(vm: &str, rec: &VmRecord) -> Error {
    Error::Conflict(format!(
        "{}: its old source disks are not served (the copies would diverge)",
        split_brain_reason(vm, rec)
    ))
}

/// "VM 'x' was failed over to point N (seq S) at T into DIR[, committed]".
pub fn split_brain_reason(vm: &str, rec: &VmRecord) -> String {
    let at = match &rec.failover {
        Some(f) => format!(
            " to {} (seq {}) at {} into {}",
            f.point_id
                .map_or_else(|| "a moment".to_string(), |id| format!("point {id}")),
            f.seq,
            spec::rfc3339(f.time_us),
            f.dir
        ),
        None => String::new(),
    };
    let committed = if rec.committed { ", committed" } else { "" };
    format!("VM '{vm}' was failed over{at}{committed}")
}
