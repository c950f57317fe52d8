//! The vault's catalog: policies, protected VMs, their disks, source and target settings,
//! and replication state. Stored as one file, `VAULT/catalog`, replaced atomically.
//!
//! Byte map (integers little-endian):
//!
//! ```text
//! off  size  field
//!   0     8  magic        "STBYVLT\0"
//!   8     2  version      1
//!  10     2  reserved     0
//!  12     4  incompat     feature bits a reader must know: bit 0 ROUNDTRIP
//!                         (a VM record uses `dir`, `unprotected`, `other_site_disks`,
//!                         `failback` or a failover record's `disks`: an older reader that
//!                         skipped them would serve or process a VM it must not)
//!  16     4  payload_len  bytes of the JSON payload, <= 64 MiB
//!  20     4  crc32        of the payload
//!  24     n  payload      UTF-8 JSON, the `Catalog` below
//! ```
//!
//! The payload is JSON so that an operator can read it with any tool; the header makes a
//! torn or damaged catalog detectable. Invariant: the file on disk is always a complete
//! catalog (old or new), never a mix.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, Result};
use crate::fsutil::replace_atomic;
use crate::policy::Policy;
use crate::util::codec::Features;
use crate::vfs::Vfs;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub const FILE_NAME: &str = "catalog";
pub const MAGIC: [u8; 8] = *b"STBYVLT\0";
pub const VERSION: u16 = 1;
const HEADER_BYTES: usize = 24;
/// Incompatible feature: the round-trip fields (see the byte map) are in use.
pub const INCOMPAT_ROUNDTRIP: u32 = 1;
const KNOWN_INCOMPAT: u32 = INCOMPAT_ROUNDTRIP;

/// The incompatible features `c` needs a reader to know.
fn incompat_of(c: &Catalog) -> u32 {
    let roundtrip = c.vms.values().any(|r| {
        r.dir.is_some()
            || r.unprotected.is_some()
            || r.other_site_disks.is_some()
            || r.failback.is_some()
            || r.failover.as_ref().is_some_and(|f| f.disks.is_some())
    });
    if roundtrip {
        INCOMPAT_ROUNDTRIP
    } else {
        0
    }
}
const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// Replication state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    InitialReplication,
    Protected,
    ResyncRequired,
    FailedOver,
    TestFailover,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::InitialReplication => "initial-replication",
            VmState::Protected => "protected",
            VmState::ResyncRequired => "resync-required",
            VmState::FailedOver => "failed-over",
            VmState::TestFailover => "test-failover",
        }
    }
}

/// A policy as stored: whole seconds, `None` for "off".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub crash_interval_s: u64,
    pub app_interval_s: Option<u64>,
    pub retention_s: u64,
    pub thin_after_s: u64,
    pub any_moment_window_s: u64,
    pub rpo_threshold_s: u64,
}

impl From<&Policy> for PolicyRecord {
    fn from(p: &Policy) -> Self {
        PolicyRecord {
            crash_interval_s: p.crash_interval.as_secs(),
            app_interval_s: p.app_interval.map(|d| d.as_secs()),
            retention_s: p.retention.as_secs(),
            thin_after_s: p.thin_after.as_secs(),
            any_moment_window_s: p.any_moment_window.as_secs(),
            rpo_threshold_s: p.rpo_threshold.as_secs(),
        }
    }
}

impl From<&PolicyRecord> for Policy {
    fn from(r: &PolicyRecord) -> Self {
        Policy {
            crash_interval: Duration::from_secs(r.crash_interval_s),
            app_interval: r.app_interval_s.map(Duration::from_secs),
            retention: Duration::from_secs(r.retention_s),
            thin_after: Duration::from_secs(r.thin_after_s),
            any_moment_window: Duration::from_secs(r.any_moment_window_s),
            rpo_threshold: Duration::from_secs(r.rpo_threshold_s),
        }
    }
}

/// Where a VM lives, or will live after failover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub resource_group: String,
    pub network: String,
    pub subnet: String,
    pub availability_set: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub name: String,
    /// The source disk: a raw image file.
    pub source: String,
    pub size_bytes: u64,
}

/// A materialized failover (or test failover) that is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub point_id: Option<u64>,
    pub seq: u64,
    pub dir: String,
    pub network: String,
    pub time_us: u64,
    /// The images the failover left, by disk, when they are not `DIR/DISK.raw` (a
    /// failback writes the point into the original site's images in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<String>>,
    /// For a remote VM: when its source site's cache service confirmed the fence (it
    /// refuses the old source's writes from then on). Until then `process --follow` keeps
    /// telling it. Informational for older readers (no feature bit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_us: Option<u64>,
}

impl FailoverRecord {
    /// The failed-over image of each disk of `rec`, in disk order.
    pub fn disk_paths(&self, rec: &VmRecord) -> Vec<String> {
        match &self.disks {
            Some(d) => d.clone(),
            None => rec
                .disks
                .iter()
                .map(|d| {
                    std::path::Path::new(&self.dir)
                        .join(format!("{}.raw", d.name))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect(),
        }
    }
}

/// A failback under way: the point being written into the original site's images. Set
/// before the first byte is written there and cleared when the last one is durable, so a
/// failback that was stopped is finished by the next one (and the agent refuses meanwhile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackRecord {
    pub point_id: u64,
    pub seq: u64,
    pub time_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub disks: Vec<DiskRecord>,
    pub policy: String,
    pub source: Placement,
    pub target: Placement,
    /// Source network -> target network.
    pub network_mapping: BTreeMap<String, String>,
    pub state: VmState,
    pub created_us: u64,
    pub failover: Option<FailoverRecord>,
    /// Set by failover-commit: the failover is final and the points are gone.
    #[serde(default)]
    pub committed: bool,
    pub test_failover: Option<FailoverRecord>,
    /// Why the VM needs a resync, when it does.
    #[serde(default)]
    pub resync_reason: Option<String>,
    /// Limit on the VM's change log; when it is full the agent falls back to its dirty
    /// bitmap. `None`: no limit.
    #[serde(default)]
    pub cache_capacity_bytes: Option<u64>,
    /// Set when the VM's source site is remote: its agent ships to a cache service there,
    /// and `process --follow` pulls from it.
    #[serde(default)]
    pub remote: Option<RemoteSource>,
    /// The directory under `VAULT/vms/` holding the VM's log and replica, when it is not
    /// the VM's name: an unprotected VM keeps its directory, so a new VM of that name
    /// gets another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Set by `unprotect`: replication has ended; the points are kept for reading (listed,
    /// mounted, failed over) until `unprotect --delete-points`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unprotected: Option<UnprotectedRecord>,
    /// After a reprotect: the images at the VM's other site (the disks it ran on before
    /// the failover), by disk: what a failback writes into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_site_disks: Option<Vec<String>>,
    /// Set while a failback writes into the other site's images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<FailbackRecord>,
    /// Set while the VM is protected in the reverse direction (from the site it failed
    /// over to); each reprotect flips it. Informational for older readers (no feature
    /// bit: `other_site_disks` is set whenever this is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reversed: bool,
}

/// When a VM was unprotected and the name it was protected under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnprotectedRecord {
    pub name: String,
    pub time_us: u64,
}

impl VmRecord {
    /// The VM's directory name under `VAULT/vms/`.
    pub fn dir_name(&self) -> &str {
        self.dir.as_deref().unwrap_or(&self.name)
    }
}

/// Where a remote VM's cache service is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSource {
    /// The cache service's address (host:port).
    pub cache: String,
    /// Plain TCP on loopback (`--insecure-loopback`).
    #[serde(default)]
    pub insecure_loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// A random id naming this vault (refuses to mix files of two vaults).
    pub vault_id: String,
    pub created_us: u64,
    pub policies: BTreeMap<String, PolicyRecord>,
    pub vms: BTreeMap<String, VmRecord>,
}

impl Catalog {
    pub fn new(vault_id: String, created_us: u64) -> Catalog {
        let mut policies = BTreeMap::new();
        policies.insert(
            "default".to_string(),
            PolicyRecord::from(&Policy::default()),
        );
        Catalog {
            vault_id,
            created_us,
            policies,
            vms: BTreeMap::new(),
        }
    }

    pub fn vm(&self, name: &str) -> Result<&VmRecord> {
        self.vms.get(name).ok_or_else(|| unknown_vm(name))
    }

    pub fn vm_mut(&mut self, name: &str) -> Result<&mut VmRecord> {
        self.vms.get_mut(name).ok_or_else(|| unknown_vm(name))
    }

    pub fn policy(&self, name: &str) -> Result<Policy> {
        self.policies.get(name).map(Policy::from).ok_or_else(|| {
            Error::NotFound(format!(
                "unknown policy '{name}' (see `standby policy list`)"
            ))
        })
    }
}

fn unknown_vm(name: &str) -> Error {
    Error::NotFound(format!(
        "unknown VM '{name}' (see `standby status` for the protected VMs)"
    ))
}

/// Encode a catalog file.
pub fn encode(c: &Catalog) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec_pretty(c)
        .map_err(|e| Error::Invalid(format!("catalog does not serialize: {e}")))?;
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&incompat_of(c).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decode and validate a catalog file. `path` names it in errors.
pub fn decode(b: &[u8], path: &Path) -> Result<Catalog> {
    let corrupt = |offset: u64, what: &str| Error::corrupt(path, offset, what.to_string());
    // The header as a fixed-size array: every index below is checked at compile time.
    let Some((h, payload)) = b.split_first_chunk::<HEADER_BYTES>() else {
        return Err(corrupt(0, "vault catalog is truncated"));
    };
    if h[0..8] != MAGIC {
        return Err(corrupt(0, "not a Standby vault catalog (bad magic)"));
    }
    Features {
        version: u16::from_le_bytes([h[8], h[9]]),
        version_at: 8,
        incompat: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        incompat_at: 12,
    }
    .check("vault catalog", VERSION, KNOWN_INCOMPAT)
    .map_err(|e| e.at(path, 0))?;
    let len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize;
    if len > MAX_PAYLOAD_BYTES || HEADER_BYTES + len != b.len() {
        return Err(corrupt(16, "vault catalog length does not match the file"));
    }
    if crc32fast::hash(payload) != u32::from_le_bytes([h[20], h[21], h[22], h[23]]) {
        return Err(corrupt(20, "vault catalog checksum mismatch"));
    }
    serde_json::from_slice(payload).map_err(|e| {
        corrupt(
            HEADER_BYTES as u64,
            &format!("vault catalog does not parse: {e}"),
        )
    })
}

/// Read the catalog in `dir` through the vault's Vfs.
pub fn load(vfs: &dyn Vfs, dir: &Path) -> Result<Catalog> {
    let path = dir.join(FILE_NAME);
    match crate::util::statefile::read_raw(vfs, &path, HEADER_BYTES + MAX_PAYLOAD_BYTES)? {
        Some(bytes) => decode(&bytes, &path),
        None => Err(Error::io(
            &path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )),
    }
}

pub fn store(vfs: &dyn Vfs, dir: &Path, c: &Catalog) -> Result<()> {
    replace_atomic(vfs, dir, FILE_NAME, &encode(c)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_refused() {
        let c = Catalog::new("abc".into(), 7);
        let b = encode(&c).unwrap();
        let p = Path::new("catalog");
        assert_eq!(decode(&b, p).unwrap(), c);
        // Every byte but the reserved field (ignored on read, as the format rules say).
        for i in (0..b.len()).filter(|i| !(10..12).contains(i)) {
            let mut d = b.clone();
            d[i] ^= 0x04;
            assert!(decode(&d, p).is_err(), "flip at {i}");
        }
        assert!(decode(&b[..b.len() - 1], p).is_err());
    }

    #[test]
    fn the_round_trip_fields_set_their_incompatible_bit_and_only_they() {
        let mut c = Catalog::new("abc".into(), 7);
        let vm = VmRecord {
            name: "vm".into(),
            disks: vec![],
            policy: "default".into(),
            source: Placement::default(),
            target: Placement::default(),
            network_mapping: BTreeMap::new(),
            state: VmState::Protected,
            created_us: 1,
            failover: None,
            committed: false,
            test_failover: None,
            resync_reason: None,
            cache_capacity_bytes: None,
            remote: None,
            dir: None,
            unprotected: None,
            other_site_disks: None,
            failback: None,
            reversed: false,
        };
        c.vms.insert("vm".into(), vm.clone());
        let p = Path::new("catalog");
        let plain = encode(&c).unwrap();
        assert_eq!(plain[12..16], [0, 0, 0, 0], "older readers still open it");
        assert!(!String::from_utf8_lossy(&plain).contains("unprotected"));
        let mut kept = vm;
        kept.dir = Some("vm".into());
        kept.unprotected = Some(UnprotectedRecord {
            name: "vm".into(),
            time_us: 5,
        });
        c.vms.insert("vm.unprotected-1".into(), kept);
        let b = encode(&c).unwrap();
        assert_eq!(b[12..16], INCOMPAT_ROUNDTRIP.to_le_bytes());
        assert_eq!(decode(&b, p).unwrap(), c);
        // A bit this build does not know is refused with a readable message.
        let mut d = b.clone();
        d[12] |= 0x02;
        let e = decode(&d, p).unwrap_err().to_string();
        assert!(e.contains("feature"), "{e}");
    }
}
