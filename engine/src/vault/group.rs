//! The vault's consistency groups: which VMs recover together, and the group points cut
//! across them. Its own small state file (`groups` in the vault's root) in the frame of
//! [`crate::util::statefile`], replaced atomically through the Vfs under the vault lock, so
//! the VM catalog's format (and older builds reading it) are untouched.
//!
//! Body byte map (inside the statefile frame, magic `STBYGRPS`, version 1):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | incompatible feature bits u32 LE (an unknown one refuses to open) |
//! | 4 | 4 | compatible feature bits u32 LE (unknown ones are ignored) |
//! | 8 | n | the groups, as JSON ([`Groups`]) |
//!
//! Invariants: a VM is in at most one group; a group point is recorded here only once
//! every member's marker is durable and its member point cut (the coordinator records it
//! last), so a group point listed here is whole.

use crate::error::{Error, Result};
use crate::util::statefile::{self, Kind};
use crate::vfs::Vfs;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The file's name in the vault's root.
pub const FILE_NAME: &str = "groups";
const KIND: Kind = Kind {
    magic: *b"STBYGRPS",
    version: 1,
    max_body_bytes: 64 << 20,
    what: "consistency groups",
};
/// Incompatible feature bits this build knows (none yet).
const KNOWN_INCOMPAT: u32 = 0;

/// Every group of a vault.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Groups {
    pub groups: BTreeMap<String, Group>,
}

/// One consistency group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub members: Vec<String>,
    /// The policy whose intervals cut group points on their own (none: on demand only).
    #[serde(default)]
    pub policy: Option<String>,
    /// The number the next group point takes (ids are never reused, failed ones included).
    pub next_point: u64,
    pub points: Vec<GroupPoint>,
    /// The group's test failover while one is up: where its `group.json` is and which
    /// VMs it brought up (members may have changed since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<GroupTestFailover>,
}

/// A group's test failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupTestFailover {
    pub dir: std::path::PathBuf,
    pub members: Vec<String>,
}

/// A group point: one member point per VM, cut behind one barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPoint {
    pub id: u64,
    /// When the barrier cut it (microseconds since the Unix epoch).
    pub time_us: u64,
    pub app_consistent: bool,
    pub name: Option<String>,
    pub members: Vec<MemberPoint>,
}

/// One member's part of a group point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPoint {
    pub vm: String,
    pub point: u64,
    pub seq: u64,
}

impl GroupPoint {
    /// The marker's `group` field: `GROUP/N`.
    pub fn marker_id(group: &str, id: u64) -> String {
        format!("{group}/{id}")
    }
}

impl Groups {
    /// The group `name`, or a one-line error naming it.
    pub fn group(&self, name: &str) -> Result<&Group> {
        self.groups
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("no consistency group '{name}'")))
    }

    pub(crate) fn group_mut(&mut self, name: &str) -> Result<&mut Group> {
        self.groups
            .get_mut(name)
            .ok_or_else(|| Error::NotFound(format!("no consistency group '{name}'")))
    }

    /// The group `vm` is in, if any.
    pub fn group_of(&self, vm: &str) -> Option<&str> {
        self.groups
            .iter()
            .find(|(_, g)| g.members.iter().any(|m| m == vm))
            .map(|(n, _)| n.as_str())
    }

    /// Refuse `vm` if it is in a group already.
    pub(crate) fn check_free(&self, vm: &str) -> Result<()> {
        match self.group_of(vm) {
            Some(g) => Err(Error::Conflict(format!(
                "VM '{vm}' is already in consistency group '{g}' (a VM is in at most one group)"
            ))),
            None => Ok(()),
        }
    }
}

fn encode(g: &Groups) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(g)
        .map_err(|e| Error::Invalid(format!("cannot encode the groups: {e}")))?;
    let mut body = Vec::with_capacity(8 + json.len());
    body.extend_from_slice(&KNOWN_INCOMPAT.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&json);
    Ok(body)
}

fn decode(path: &Path, raw: &[u8]) -> Result<Groups> {
    let v = statefile::decode(&KIND, raw).map_err(|(at, what)| Error::corrupt(path, at, what))?;
    let incompat = v
        .body
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| Error::corrupt(path, 16, "groups body shorter than its feature bits"))?;
    if incompat & !KNOWN_INCOMPAT != 0 {
        return Err(Error::Invalid(format!(
            "{} uses features this Standby does not know (incompatible bits {:#x}): upgrade Standby to open it",
            path.display(),
            incompat & !KNOWN_INCOMPAT
        )));
    }
    let json = v
        .body
        .get(8..)
        .ok_or_else(|| Error::corrupt(path, 16, "groups body shorter than its feature bits"))?;
    serde_json::from_slice(json).map_err(|e| Error::corrupt(path, 24, format!("groups: {e}")))
}

/// Read the vault's groups (none if the file does not exist yet).
pub fn load(vfs: &dyn Vfs, root: &Path) -> Result<Groups> {
    let path = root.join(FILE_NAME);
    match statefile::read_raw(
        vfs,
        &path,
        KIND.max_body_bytes as usize + statefile::FRAME_BYTES,
    )? {
        None => Ok(Groups::default()),
        Some(raw) => decode(&path, &raw),
    }
}

/// Replace the vault's groups atomically (the caller holds the vault lock).
pub fn store(vfs: &dyn Vfs, root: &Path, g: &Groups) -> Result<()> {
    statefile::write(vfs, root, FILE_NAME, &KIND, &encode(g)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Groups {
        let mut g = Groups::default();
        g.groups.insert(
            "erp".into(),
            Group {
                members: vec!["web".into(), "db".into()],
                policy: None,
                next_point: 2,
                points: vec![GroupPoint {
                    id: 1,
                    time_us: 7,
                    app_consistent: true,
                    name: Some("n".into()),
                    members: vec![MemberPoint {
                        vm: "web".into(),
                        point: 3,
                        seq: 9,
                    }],
                }],
                test_failover: None,
            },
        );
        g
    }

    #[test]
    fn round_trips_through_the_vfs() {
        let fs = crate::vfs::SimFs::new();
        let root = Path::new("/v");
        fs.create_dir_all(root).unwrap();
        assert_eq!(load(&fs, root).unwrap(), Groups::default());
        store(&fs, root, &sample()).unwrap();
        assert_eq!(load(&fs, root).unwrap(), sample());
        assert_eq!(sample().group_of("db"), Some("erp"));
        assert!(sample().check_free("db").is_err());
        assert!(sample().group("nope").is_err());
    }

    #[test]
    fn an_unknown_incompatible_bit_refuses_and_damage_is_corruption() {
        let mut body = encode(&sample()).unwrap();
        body[0] |= 0x80;
        let raw = statefile::encode(&KIND, &body);
        match decode(Path::new("/v/groups"), &raw) {
            Err(Error::Invalid(m)) => assert!(m.contains("upgrade"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A compatible bit is ignored.
        let mut body = encode(&sample()).unwrap();
        body[4] |= 1;
        assert_eq!(
            decode(Path::new("/g"), &statefile::encode(&KIND, &body)).unwrap(),
            sample()
        );
        let mut raw = statefile::encode(&KIND, &encode(&sample()).unwrap());
        let n = raw.len();
        raw[n / 2] ^= 1;
        assert!(decode(Path::new("/g"), &raw).unwrap_err().is_corruption());
    }
}

/// Which group point a group failover takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupSpec {
    /// The newest group point.
    LatestGroup,
    /// The newest app-consistent group point.
    LatestGroupApp,
    Id(u64),
    /// The newest group point at or before this time (microseconds since the Unix epoch).
    Time(u64),
}

impl std::str::FromStr for GroupSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<GroupSpec> {
        Ok(match s {
            "latest-group" => GroupSpec::LatestGroup,
            "latest-group-app-consistent" => GroupSpec::LatestGroupApp,
            _ if s.starts_with("time:") => match s.parse::<crate::vault::PointSpec>()? {
                crate::vault::PointSpec::Time(t) => GroupSpec::Time(t),
                _ => unreachable_spec(s)?,
            },
            _ => match s.parse::<u64>() {
                Ok(n) => GroupSpec::Id(n),
                Err(_) => unreachable_spec(s)?,
            },
        })
    }
}

fn unreachable_spec(s: &str) -> Result<GroupSpec> {
    Err(Error::Invalid(format!(
        "'{s}' is not a group point: use latest-group, latest-group-app-consistent, a group point id or time:RFC3339"
    )))
}

impl Group {
    /// The group point `spec` names.
    pub fn point(&self, group: &str, spec: &GroupSpec) -> Result<&GroupPoint> {
        let found = match spec {
            GroupSpec::LatestGroup => self.points.last(),
            GroupSpec::LatestGroupApp => self.points.iter().rev().find(|p| p.app_consistent),
            GroupSpec::Id(id) => self.points.iter().find(|p| p.id == *id),
            GroupSpec::Time(t) => self.points.iter().rev().find(|p| p.time_us <= *t),
        };
        found.ok_or_else(|| {
            Error::NotFound(format!(
                "consistency group '{group}' has no group point {}",
                match spec {
                    GroupSpec::LatestGroup => "yet".to_string(),
                    GroupSpec::LatestGroupApp => "that is app-consistent".to_string(),
                    GroupSpec::Id(id) => id.to_string(),
                    GroupSpec::Time(_) => "at or before that time".to_string(),
                }
            ))
        })
    }
}

impl crate::vault::Vault {
    /// The vault's consistency groups.
    pub fn groups(&self) -> Result<Groups> {
        load(&*self.vfs, &self.root)
    }

    /// Change the groups: under the vault lock, re-read them (and the catalog), apply `f`,
    /// store them.
    fn update_groups<T>(
        &mut self,
        f: impl FnOnce(&mut Groups, &crate::vault::Catalog) -> Result<T>,
    ) -> Result<T> {
        let _lock = self.acquire(&self.root, LockWait::Block)?;
        let catalog = crate::vault::catalog::load(&*self.vfs, &self.root)?;
        let mut g = load(&*self.vfs, &self.root)?;
        let out = f(&mut g, &catalog)?;
        store(&*self.vfs, &self.root, &g)?;
        self.catalog = catalog;
        Ok(out)
    }

    /// Create group `name` of `members` (each protected here, in no other group).
    pub fn group_create(
        &mut self,
        name: &str,
        members: &[String],
        policy: Option<&str>,
    ) -> Result<()> {
        crate::util::names::check_name("group", name)?;
        if members.is_empty() {
            return Err(Error::Invalid(format!(
                "group '{name}' needs at least one --vm"
            )));
        }
        self.update_groups(|g, catalog| {
            if g.groups.contains_key(name) {
                return Err(Error::Conflict(format!(
                    "consistency group '{name}' already exists"
                )));
            }
            if let Some(p) = policy {
                catalog.policy(p)?;
            }
            let mut seen = Vec::new();
            for vm in members {
                catalog.vm(vm)?;
                g.check_free(vm)?;
                if seen.contains(vm) {
                    return Err(Error::Invalid(format!("VM '{vm}' is named twice")));
                }
                seen.push(vm.clone());
            }
            g.groups.insert(
                name.to_string(),
                Group {
                    members: seen,
                    policy: policy.map(str::to_string),
                    next_point: 1,
                    points: Vec::new(),
                    test_failover: None,
                },
            );
            Ok(())
        })
    }

    /// Add `vm` to group `name`: it takes part from the next group point on.
    pub fn group_add(&mut self, name: &str, vm: &str) -> Result<()> {
        self.update_groups(|g, catalog| {
            catalog.vm(vm)?;
            g.group(name)?;
            g.check_free(vm)?;
            g.group_mut(name)?.members.push(vm.to_string());
            Ok(())
        })
    }

    /// Take `vm` out of group `name`; group points already cut keep its member point.
    pub fn group_remove(&mut self, name: &str, vm: &str) -> Result<()> {
        self.update_groups(|g, _| {
            let grp = g.group_mut(name)?;
            let before = grp.members.len();
            grp.members.retain(|m| m != vm);
            if grp.members.len() == before {
                return Err(Error::NotFound(format!(
                    "VM '{vm}' is not in consistency group '{name}'"
                )));
            }
            Ok(())
        })
    }

    /// Delete group `name` (its members' own points stay).
    pub fn group_delete(&mut self, name: &str) -> Result<()> {
        self.update_groups(|g, _| {
            g.group(name)?;
            g.groups.remove(name);
            Ok(())
        })
    }

    /// Take the next group point id of `name` and its members at this moment.
    pub fn group_reserve_point(&mut self, name: &str) -> Result<(u64, Vec<String>)> {
        self.update_groups(|g, _| {
            let grp = g.group_mut(name)?;
            if grp.members.is_empty() {
                return Err(Error::Conflict(format!(
                    "consistency group '{name}' has no members"
                )));
            }
            let id = grp.next_point.max(1);
            grp.next_point = id + 1;
            Ok((id, grp.members.clone()))
        })
    }

    /// Record (or, with `None`, forget) the group's test failover.
    pub fn group_set_test_failover(
        &mut self,
        name: &str,
        t: Option<GroupTestFailover>,
    ) -> Result<()> {
        self.update_groups(|g, _| {
            g.group_mut(name)?.test_failover = t;
            Ok(())
        })
    }

    /// List a group point whose every member point is durable (the barrier's last step).
    pub fn group_record_point(&mut self, name: &str, point: GroupPoint) -> Result<()> {
        self.update_groups(|g, _| {
            // In id order: group points of one group may settle out of order (each cut
            // waits for its members' passes), and readers take the last as the newest.
            let points = &mut g.group_mut(name)?.points;
            let at = points.partition_point(|p| p.id < point.id);
            points.insert(at, point);
            Ok(())
        })
    }
}

use crate::vault::LockWait;

impl crate::vault::Vault {
    /// Where a group failover's `group.json` goes: `out` if given, else
    /// `VAULT/failover/groups/G` (`G-test` for a test failover).
    pub fn group_failover_dir(
        &self,
        group: &str,
        test: bool,
        out: Option<&Path>,
    ) -> std::path::PathBuf {
        match out {
            Some(o) => o.to_path_buf(),
            None => self.root.join("failover").join("groups").join(if test {
                format!("{group}-test")
            } else {
                group.to_string()
            }),
        }
    }

    /// Write `group.json` (`doc`, naming every member's failover) into `dir`, atomically
    /// through the Vfs; its path.
    pub fn write_group_manifest(
        &self,
        dir: &Path,
        doc: &serde_json::Value,
    ) -> Result<std::path::PathBuf> {
        use crate::error::IoContext;
        self.vfs.create_dir_all(dir).at(dir)?;
        let bytes = serde_json::to_vec_pretty(doc)
            .map_err(|e| Error::Invalid(format!("cannot encode group.json: {e}")))?;
        crate::fsutil::replace_atomic(&*self.vfs, dir, "group.json", &bytes)?;
        Ok(dir.join("group.json"))
    }

    /// Remove a test group failover's `group.json` (the members' disks go with each
    /// member's cleanup).
    pub fn remove_group_manifest(&self, dir: &Path) -> Result<()> {
        use crate::error::IoContext;
        let p = dir.join("group.json");
        if self.vfs.exists(&p) {
            self.vfs.remove(&p).at(&p)?;
        }
        Ok(())
    }
}
