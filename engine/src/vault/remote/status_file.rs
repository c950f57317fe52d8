//! The follower's live status of a remote VM (`VAULT/vms/VM/status.json`): the vault's
//! view of the VM plus its link, as `process --follow` last saw them, for `standby status`
//! to show while the follower holds the VM. Written through the vault's Vfs, replaced
//! atomically (temporary file, sync, rename, sync the directory) every second.
//!
//! Format: one UTF-8 JSON object (JSON so an operator can read it), decoded into
//! [`StatusFile`]:
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `version` | u32 | format version (= 1); absent in files of earlier builds (version 0, the same fields) |
//! | `written_us` | u64 | when it was written |
//! | `status` | object or null | the VM's status ([`VmStatus`]) |
//! | `link` | object | [`LinkFile`]: the link and the source's last report |
//!
//! Validation: a version newer than [`VERSION`] is refused; a missing or mistyped field (a
//! null one too: nulls are written, never left out) is corruption naming the file and the
//! offset. Unknown keys are ignored (a later build may add
//! information an older one can skip without a new version).

use crate::error::{Error, Result};
use crate::link::pull::PullStatus;
use crate::vault::VmStatus;
use crate::vfs::Vfs;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file's name in the VM's directory.
pub const STATUS_FILE: &str = "status.json";
/// The format version this build writes (and the newest it reads).
pub const VERSION: u32 = 1;
/// A status file is a few KiB (the VM's record and status); more is not one.
const MAX_FILE_BYTES: usize = 1 << 20;

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusFile {
    /// 0 for a file written before the format had a version.
    #[serde(default)]
    pub version: u32,
    pub written_us: u64,
    // Required though optional (null is written): a damaged key is refused, not taken for null.
    #[serde(deserialize_with = "Option::deserialize")]
    pub status: Option<VmStatus>,
    pub link: LinkFile,
}

/// The follower's link as it last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFile {
    pub connected: bool,
    pub since_us: u64,
    // Required though optional (null is written): a damaged key is refused, not taken for null.
    #[serde(deserialize_with = "Option::deserialize")]
    pub last_error: Option<String>,
    // Required though optional (null is written): a damaged key is refused, not taken for null.
    #[serde(deserialize_with = "Option::deserialize")]
    pub source: Option<SourceFile>,
    pub source_at_us: u64,
    pub durable_seq: u64,
    pub durable_time_us: u64,
    pub records: u64,
    pub bytes: u64,
}

/// The source site's last `source-state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub durable_seq: u64,
    pub first_seq: u64,
    pub used_bytes: u64,
    pub backlog_bytes: u64,
    pub capacity_bytes: u64,
    pub last_time_us: u64,
    pub agent_connected: bool,
    pub agent_seen_us: u64,
    pub agent_resync_bytes: u64,
    pub agent_bitmap_mode: bool,
    pub agent_journal_bytes: u64,
    pub agent_journal_seq: u64,
}

impl From<&PullStatus> for LinkFile {
    fn from(l: &PullStatus) -> LinkFile {
        LinkFile {
            connected: l.connected,
            since_us: l.since_us,
            last_error: l.last_error.clone(),
            source: l.source.as_ref().map(|s| SourceFile {
                durable_seq: s.durable_seq,
                first_seq: s.first_seq,
                used_bytes: s.used_bytes,
                backlog_bytes: s.backlog_bytes,
                capacity_bytes: s.capacity_bytes,
                last_time_us: s.last_time_us,
                agent_connected: s.agent_connected,
                agent_seen_us: s.agent_seen_us,
                agent_resync_bytes: s.agent.resync_bytes,
                agent_bitmap_mode: s.agent.bitmap_mode,
                agent_journal_bytes: s.agent.journal_bytes,
                agent_journal_seq: s.agent.journal_seq,
            }),
            source_at_us: l.source_at_us,
            durable_seq: l.durable_seq,
            durable_time_us: l.durable_time_us,
            records: l.records,
            bytes: l.bytes,
        }
    }
}

impl StatusFile {
    /// A file of the current version.
    pub fn new(written_us: u64, status: Option<VmStatus>, link: LinkFile) -> StatusFile {
        StatusFile {
            version: VERSION,
            written_us,
            status,
            link,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode and validate; the error is (byte offset, what failed).
    pub fn decode(b: &[u8]) -> std::result::Result<StatusFile, (u64, String)> {
        let f: StatusFile = serde_json::from_slice(b).map_err(|e| {
            // The file is written on one line, so the column is the offset.
            let at = if e.line() == 1 {
                e.column().saturating_sub(1)
            } else {
                0
            };
            (at as u64, format!("not a VM status file: {e}"))
        })?;
        if f.version > VERSION {
            return Err((
                0,
                format!(
                    "status file format version {} is newer than this Standby reads ({VERSION})",
                    f.version
                ),
            ));
        }
        Ok(f)
    }
}

/// Replace the status file in `dir`, durably.
pub fn write(vfs: &dyn Vfs, dir: &Path, f: &StatusFile) -> Result<()> {
    crate::fsutil::replace_atomic(vfs, dir, STATUS_FILE, &f.encode())
}

/// The status file in `dir` (`None` if there is none).
pub fn read(vfs: &dyn Vfs, dir: &Path) -> Result<Option<StatusFile>> {
    let path = dir.join(STATUS_FILE);
    let Some(b) = crate::util::statefile::read_raw(vfs, &path, MAX_FILE_BYTES)? else {
        return Ok(None);
    };
    StatusFile::decode(&b)
        .map(Some)
        .map_err(|(at, what)| Error::corrupt(&path, at, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StatusFile {
        StatusFile::new(
            1_795_702_439_420_187,
            None,
            LinkFile {
                connected: true,
                since_us: 11,
                last_error: Some("reset".into()),
                source: Some(SourceFile {
                    durable_seq: 131,
                    first_seq: 132,
                    used_bytes: 40,
                    backlog_bytes: 7,
                    capacity_bytes: 8589934592,
                    last_time_us: 12,
                    agent_connected: true,
                    agent_seen_us: 13,
                    agent_resync_bytes: 14,
                    agent_bitmap_mode: true,
                    agent_journal_bytes: 56618,
                    agent_journal_seq: 131,
                }),
                source_at_us: 15,
                durable_seq: 16,
                durable_time_us: 17,
                records: 18,
                bytes: 19,
            },
        )
    }

    #[test]
    fn round_trips() {
        let f = sample();
        let g = StatusFile::decode(&f.encode()).unwrap();
        assert_eq!(g.version, VERSION);
        assert_eq!(g.written_us, f.written_us);
        assert_eq!(g.link, f.link);
        assert!(g.status.is_none());
    }

    #[test]
    fn a_flipped_bit_is_refused_or_changes_the_document() {
        let b = sample().encode();
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                if let Ok(g) = StatusFile::decode(&c) {
                    assert_ne!(g.encode(), b, "byte {i} bit {bit} went unnoticed");
                }
            }
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(StatusFile::decode(&b[..n]).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn an_unversioned_file_reads_as_version_0_and_a_newer_one_is_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        v.as_object_mut().unwrap().remove("version");
        let old = StatusFile::decode(v.to_string().as_bytes()).unwrap();
        assert_eq!(old.version, 0);
        assert_eq!(old.link, sample().link);
        v["version"] = (VERSION + 1).into();
        let (_, what) = StatusFile::decode(v.to_string().as_bytes()).unwrap_err();
        assert!(what.contains("newer"), "{what}");
        v["version"] = VERSION.into();
        v["link"]["records"] = "many".into();
        let (at, what) = StatusFile::decode(v.to_string().as_bytes()).unwrap_err();
        assert!(at > 100 && what.contains("expected u64"), "{at} {what}");
    }

    #[test]
    fn written_and_read_through_the_vfs() {
        let fs = crate::vfs::SimFs::new();
        let dir = Path::new("/vm");
        fs.create_dir_all(dir).unwrap();
        assert!(read(&fs, dir).unwrap().is_none());
        write(&fs, dir, &sample()).unwrap();
        let after = fs.crash(0);
        assert_eq!(read(&after, dir).unwrap().unwrap().link, sample().link);
        crate::fsutil::replace_atomic(&after, dir, STATUS_FILE, b"{\"written_us\": 1}").unwrap();
        let e = read(&after, dir).unwrap_err();
        assert!(
            e.is_corruption() && e.to_string().contains("status.json"),
            "{e}"
        );
    }
}
