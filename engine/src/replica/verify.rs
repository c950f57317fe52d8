//! The verify pass: re-read the manifest and every live layer index and check their crcs,
//! then read and check every data frame any layer (or the open layer) references. Damage is
//! reported as (file, offset, what) together with the recovery points that read it, so an
//! operator knows which points are still good. A layer index found damaged on open is
//! reported as it was found (with its point and every later one), and the frames of the
//! other layers are still checked. Verify reads; it never repairs.

use super::index::{self, decode_layer_index, Loc};
use super::manifest::{self, decode_manifest};
use super::open::read_all;
use super::Replica;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// One damaged structure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Damage {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
    /// Ids of the recovery points that read the damaged bytes.
    pub points: Vec<u64>,
    /// Whether the latest state (what `latest` failover would use) reads them.
    pub latest: bool,
}

/// What a verify pass checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub indexes_checked: usize,
    pub frames_checked: u64,
    pub frame_bytes_checked: u64,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

pub(super) fn corruption(e: Error) -> std::result::Result<(PathBuf, u64, String), Error> {
    match e {
        Error::Corrupt { path, offset, what } => Ok((path, offset, what)),
        Error::Unsupported { path, what } => Ok((path, 0, what)),
        other => Err(other),
    }
}

impl Replica {
    /// Check every crc of the replica. I/O errors are returned; damage is reported.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let vfs = &*self.store.vfs;
        let all_points: Vec<u64> = self.manifest.points.iter().map(|p| p.info.id).collect();
        let mpath = self.dir.join(manifest::FILE_NAME);
        let checked = read_all(vfs, &mpath, manifest::MAX_MANIFEST_BYTES as u64 + 64)
            .and_then(|b| decode_manifest(&b).map_err(|e| e.at(&mpath, 0)));
        if let Err(e) = checked {
            let (path, offset, what) = corruption(e)?;
            report.damage.push(Damage {
                path,
                offset,
                what,
                points: all_points.clone(),
                latest: true,
            });
        }
        let dir = self.layers_dir();
        for (k, l) in self.layers.iter().enumerate() {
            if let Some((_, d)) = self.damaged.iter().find(|(j, _)| *j == k) {
                // Found when the replica was opened; its stand-in has nothing to compare.
                report.indexes_checked += 1;
                report.damage.push(d.clone());
                continue;
            }
            let path = dir.join(index::file_name(l.layer_id));
            let checked = read_all(vfs, &path, u64::MAX).and_then(|b| {
                decode_layer_index(&b)
                    .map_err(|e| e.at(&path, 0))
                    .and_then(|d| {
                        if d == **l {
                            Ok(())
                        } else {
                            Err(Error::corrupt(
                                &path,
                                0,
                                "layer index changed since it was loaded",
                            ))
                        }
                    })
            });
            report.indexes_checked += 1;
            if let Err(e) = checked {
                let (path, offset, what) = corruption(e)?;
                report.damage.push(Damage {
                    path,
                    offset,
                    what,
                    points: all_points[k..].to_vec(),
                    latest: true,
                });
            }
        }
        // Every referenced frame, once.
        let mut frames: BTreeMap<(u64, u64), u32> = BTreeMap::new();
        for e in self
            .layers
            .iter()
            .flat_map(|l| l.entries.iter())
            .chain(self.open.entries.iter())
        {
            if let Loc::Data {
                file_id,
                frame_offset,
                frame_len,
                ..
            } = e.loc
            {
                frames.insert((file_id, frame_offset), frame_len);
            }
        }
        let mut bad: BTreeMap<(u64, u64), (PathBuf, String)> = BTreeMap::new();
        for (&(file_id, off), &len) in &frames {
            report.frames_checked += 1;
            report.frame_bytes_checked += len as u64;
            if let Err(e) = self.store.read_extent(file_id, off, len) {
                let (path, _, what) = corruption(e)?;
                bad.insert((file_id, off), (path, what));
            }
        }
        if bad.is_empty() {
            return Ok(report);
        }
        // Which points read the damaged frames (rare: costs a view per point).
        let keys: BTreeSet<(u64, u64)> = bad.keys().copied().collect();
        let mut readers: BTreeMap<(u64, u64), (Vec<u64>, bool)> = BTreeMap::new();
        // Points that read a damaged layer cannot be viewed (their damage is reported
        // above); neither can the latest state then, and it counts as reading the frame
        // when the open layer does.
        let intact = self.first_damaged().unwrap_or(self.manifest.points.len());
        for p in &self.manifest.points[..intact] {
            let v = self.view_point(p.info.id)?;
            for key in v.frames_read().intersection(&keys) {
                readers.entry(*key).or_default().0.push(p.info.id);
            }
        }
        if intact == self.manifest.points.len() {
            let latest = self.view_latest()?;
            for key in latest.frames_read().intersection(&keys) {
                readers.entry(*key).or_default().1 = true;
            }
        } else {
            for e in &self.open.entries {
                if let Loc::Data {
                    file_id,
                    frame_offset,
                    ..
                } = e.loc
                {
                    if let Some(r) = keys.get(&(file_id, frame_offset)) {
                        readers.entry(*r).or_default().1 = true;
                    }
                }
            }
        }
        for (key, (path, what)) in bad {
            let (points, latest) = readers.remove(&key).unwrap_or_default();
            report.damage.push(Damage {
                path,
                offset: key.1,
                what,
                points,
                latest,
            });
        }
        Ok(report)
    }
}
