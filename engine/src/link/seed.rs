//! The seed of a two-site reprotect: the block hashes of the vault's replica, left at the
//! new source site's cache service (`vms/VM/seed`) for the VM's agent there, whose first
//! run ships only the blocks of its images whose hashes differ (the delta engine across
//! the link), and the sequence number the VM's log continues at (the vault's next record),
//! so the vault's staging log and replica go on from where they are.
//!
//! The file is a state file (see `util/statefile.rs`): magic `STBYSEED`, version 1, the
//! body one whole `seed` link message (its own header and crc32, decoded and checked by
//! `wire`).
//!
//! Invariant: a seed is written durably before the service answers the vault, and the
//! vault records the reprotect only after that answer.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::wire::{self, DiskInfo, Msg, PeerRole};
use super::{auth, Security};
use crate::error::{Error, LinkError, Result};
use crate::util::statefile::{self, Kind};
use crate::vfs::Vfs;
use std::path::Path;

pub const FILE_NAME: &str = "seed";

const KIND: Kind = Kind {
    magic: *b"STBYSEED",
    version: 1,
    max_body_bytes: (wire::MAX_PAYLOAD_BYTES + wire::HEADER_BYTES) as u32,
    what: "cache service seed",
};

/// What a reprotect leaves for the new source's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The first sequence number of the VM's log in the new direction.
    pub next_seq: u64,
    pub disks: Vec<DiskInfo>,
    /// Per disk, one xxh3-128 hash per 64 KiB block (the last one may be short).
    pub hashes: Vec<Vec<u128>>,
}

impl Seed {
    fn msg(&self) -> Msg {
        Msg::Seed {
            next_seq: self.next_seq,
            disks: self.disks.clone(),
            hashes: self.hashes.clone(),
        }
    }

    fn from_msg(m: Msg) -> Option<Seed> {
        match m {
            Msg::Seed {
                next_seq,
                disks,
                hashes,
            } => Some(Seed {
                next_seq,
                disks,
                hashes,
            }),
            _ => None,
        }
    }
}

/// Keep `seed` in the VM directory `dir`, durably.
pub fn write(vfs: &dyn Vfs, dir: &Path, seed: &Seed) -> Result<()> {
    statefile::write(vfs, dir, FILE_NAME, &KIND, &seed.msg().encode())
}

/// The seed kept in `dir`, if any.
pub fn read(vfs: &dyn Vfs, dir: &Path) -> Result<Option<Seed>> {
    let path = dir.join(FILE_NAME);
    let Some(b) = statefile::read_raw(
        vfs,
        &path,
        KIND.max_body_bytes as usize + statefile::FRAME_BYTES,
    )?
    else {
        return Ok(None);
    };
    let v = statefile::decode(&KIND, &b).map_err(|(at, why)| Error::corrupt(&path, at, why))?;
    let msg = wire::decode(v.body)
        .map_err(|e| Error::corrupt(&path, statefile::FRAME_BYTES as u64, format!("seed: {e}")))?;
    Seed::from_msg(msg)
        .map(Some)
        .ok_or_else(|| Error::corrupt(&path, statefile::FRAME_BYTES as u64, "not a seed"))
}

/// The vault's side: give the cache service at `addr` the seed of `vm` (its log there
/// starts anew at `seed.next_seq`, its fence is lifted). Returns once the service holds it
/// durably.
pub fn push(addr: &str, security: &Security, vm: &str, seed: &Seed) -> Result<()> {
    let l = super::connect(addr, security, PeerRole::Processor, vm)?;
    let (mut r, mut w) = (l.reader, l.writer);
    wire::write_msg(&mut w, &seed.msg())?;
    let mut buf = Vec::new();
    match auth::expect(&mut r, &mut buf, "the cache service's answer to the seed")? {
        Msg::Ready { next_seq, .. } if next_seq == seed.next_seq => Ok(()),
        Msg::Ready { next_seq, .. } => Err(Error::Link(LinkError::Diverged {
            why: format!(
                "the cache service took the seed of '{vm}' but its log expects record {next_seq}, not {}",
                seed.next_seq
            ),
        })),
        m => Err(auth::refuse(
            &mut w,
            LinkError::Unexpected {
                wanted: "ready",
                got: m.name(),
            },
        )),
    }
}

/// The agent's side: the seed the vault left for `vm` at the cache service at `addr`.
pub fn fetch(addr: &str, security: &Security, vm: &str, disks: &[DiskInfo]) -> Result<Seed> {
    let l = super::connect(addr, security, PeerRole::Agent, vm)?;
    let (mut r, mut w) = (l.reader, l.writer);
    wire::write_msg(
        &mut w,
        &Msg::AskSeed {
            disks: disks.to_vec(),
        },
    )?;
    let mut buf = Vec::new();
    let m = auth::expect(&mut r, &mut buf, "the seed")?;
    let name = m.name();
    Seed::from_msg(m).ok_or_else(|| {
        auth::refuse(
            &mut w,
            LinkError::Unexpected {
                wanted: "seed",
                got: name,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::RealFs;

    #[test]
    fn a_seed_round_trips_and_a_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&RealFs, dir.path()).unwrap(), None);
        let seed = Seed {
            next_seq: 41,
            disks: vec![DiskInfo {
                name: "os".into(),
                size_bytes: 2 * crate::delta::BLOCK_BYTES,
            }],
            hashes: vec![vec![7, 9]],
        };
        write(&RealFs, dir.path(), &seed).unwrap();
        assert_eq!(read(&RealFs, dir.path()).unwrap(), Some(seed));
        let path = dir.path().join(FILE_NAME);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x04;
            std::fs::write(&path, &b).unwrap();
            assert!(read(&RealFs, dir.path()).is_err(), "flip at {i}");
        }
    }
}
