//! The cache service's fence (`vms/VM/fenced`): set when the target site says the VM
//! failed over there (a `fence` message from its processor), so the service refuses the
//! old source's agent from then on — the split-brain guard of the two-site deployment.
//! A state file (see `util/statefile.rs`): magic `STBYFNCE`, version 1, the body the
//! target's reason as UTF-8 (at most 4 KiB).
//!
//! Invariant: once written (durably, before the service answers), a fence is never lost
//! by a restart of the service; only removing the VM's directory lifts it.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, Result};
use crate::util::statefile::{self, Kind};
use crate::vfs::Vfs;
use std::path::Path;

pub const FILE_NAME: &str = "fenced";
const MAX_REASON_BYTES: usize = 4096;

const KIND: Kind = Kind {
    magic: *b"STBYFNCE",
    version: 1,
    max_body_bytes: MAX_REASON_BYTES as u32,
    what: "cache service fence",
};

/// Fence the VM whose directory is `dir`, durably.
pub fn write(vfs: &dyn Vfs, dir: &Path, reason: &str) -> Result<()> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    statefile::write(
        vfs,
        dir,
        FILE_NAME,
        &KIND,
        reason.as_bytes().get(..end).unwrap_or_default(),
    )
}

/// The fence of the VM in `dir`, if it has one.
pub fn read(vfs: &dyn Vfs, dir: &Path) -> Result<Option<String>> {
    let path = dir.join(FILE_NAME);
    let Some(b) = statefile::read_raw(vfs, &path, MAX_REASON_BYTES + statefile::FRAME_BYTES)?
    else {
        return Ok(None);
    };
    let v = statefile::decode(&KIND, &b).map_err(|(at, why)| Error::corrupt(&path, at, why))?;
    let reason = std::str::from_utf8(v.body).map_err(|_| {
        Error::corrupt(
            &path,
            statefile::FRAME_BYTES as u64,
            "fence reason is not UTF-8",
        )
    })?;
    Ok(Some(reason.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::RealFs;

    #[test]
    fn a_fence_round_trips_and_a_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&RealFs, dir.path()).unwrap(), None);
        write(&RealFs, dir.path(), "VM 'vm' was failed over to point 3").unwrap();
        assert_eq!(
            read(&RealFs, dir.path()).unwrap().as_deref(),
            Some("VM 'vm' was failed over to point 3")
        );
        let path = dir.path().join(FILE_NAME);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            assert!(read(&RealFs, dir.path()).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let long = "é".repeat(3000);
        write(&RealFs, dir.path(), &long).unwrap();
        let got = read(&RealFs, dir.path()).unwrap().unwrap();
        assert!(got.len() <= MAX_REASON_BYTES && long.starts_with(&got));
    }
}
