//! A block device over a recovery point, for mounting it over NBD without a restore.
//! Read-only by default; with an overlay, writes land in a sparse scratch file beside the
//! point and shadow it (copy-on-write), so the point itself never changes and the overlay
//! is thrown away when the mount ends.
//!
//! Invariant: every byte a client reads is either the point's (through the replica's
//! verified read path) or the client's own overlay write; start-up costs the point's
//! index, never its data.

use crate::error::{IoContext, Result};
use crate::nbd::{BlockDevice, DevError, DevResult, Extent};
use crate::replica::View;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Written ranges of an overlay: start -> end, non-overlapping, merged when adjacent.
#[derive(Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|(_, &re)| re >= start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in touching {
            s = s.min(rs);
            e = e.max(re);
            self.0.remove(&rs);
        }
        self.0.insert(s, e);
    }

    /// Pieces of `[start, end)` covered by the overlay, in order.
    fn covered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((_, &re)) = self.0.range(..start).next_back() {
            if re > start {
                out.push((start, re.min(end)));
            }
        }
        for (&rs, &re) in self.0.range(start..end) {
            out.push((rs, re.min(end)));
        }
        out
    }
}

/// The copy-on-write overlay of a writable mount.
struct Overlay {
    file: File,
    path: PathBuf,
    ranges: RwLock<Ranges>,
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One disk of a recovery point as an NBD export.
pub struct MountDisk {
    view: Arc<View>,
    disk: u16,
    size: u64,
    overlay: Option<Overlay>,
}

impl MountDisk {
    /// A read-only export of `disk` of `view`.
    pub fn read_only(view: Arc<View>, disk: u16) -> Result<MountDisk> {
        let size = view
            .disks()
            .get(disk as usize)
            .map(|d| d.size_bytes)
            .ok_or_else(|| crate::Error::NotFound(format!("disk {disk} does not exist")))?;
        Ok(MountDisk {
            view,
            disk,
            size,
            overlay: None,
        })
    }

    /// A writable export whose writes go to a scratch file at `scratch` (created; removed
    /// when the export is dropped).
    pub fn writable(view: Arc<View>, disk: u16, scratch: &Path) -> Result<MountDisk> {
        let mut d = Self::read_only(view, disk)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch)
            .at(scratch)?;
        file.set_len(d.size).at(scratch)?;
        d.overlay = Some(Overlay {
            file,
            path: scratch.to_path_buf(),
            ranges: RwLock::new(Ranges::default()),
        });
        Ok(d)
    }

    fn overlay(&self) -> DevResult<&Overlay> {
        self.overlay.as_ref().ok_or_else(|| DevError {
            errno: crate::nbd::proto::EPERM,
            message: "the mount is read-only".into(),
        })
    }

    fn io(&self, e: std::io::Error) -> DevError {
        DevError::io(format!("overlay: {e}"))
    }
}

impl BlockDevice for MountDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        let end = offset + buf.len() as u64;
        match &self.overlay {
            None => Ok(self.view.read(self.disk, offset, buf)?),
            Some(o) => {
                let ranges = o.ranges.read();
                let covered = ranges.covered(offset, end);
                if covered.first() != Some(&(offset, end)) {
                    self.view.read(self.disk, offset, buf)?;
                }
                for (s, e) in covered {
                    let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
                    o.file.read_exact_at(dst, s).map_err(|e| self.io(e))?;
                }
                Ok(())
            }
        }
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<DevResult<()>> {
        // With an overlay, a read may need its file: the workers serve it.
        if self.overlay.is_some() {
            return None;
        }
        self.view
            .read_cached(self.disk, offset, buf)
            .map(|r| r.map_err(DevError::from))
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> DevResult<()> {
        let o = self.overlay()?;
        let mut ranges = o.ranges.write();
        o.file.write_all_at(data, offset).map_err(|e| self.io(e))?;
        ranges.insert(offset, offset + data.len() as u64);
        Ok(())
    }
    fn flush(&self) -> DevResult<()> {
        // The overlay is thrown away when the mount ends: nothing to make durable.
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> DevResult<()> {
        self.write_zeroes(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DevResult<()> {
        let o = self.overlay()?;
        let mut ranges = o.ranges.write();
        crate::fsutil::zero_range(&o.file, offset, len).map_err(|e| self.io(e))?;
        ranges.insert(offset, offset + len);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        let end = offset + len;
        // Allocated: the point's extents, plus anything the overlay wrote.
        let mut data: Vec<(u64, u64)> = self
            .view
            .extents_in(self.disk, offset, len)?
            .into_iter()
            .map(|e| (e.offset, e.offset + e.len))
            .collect();
        if let Some(o) = &self.overlay {
            data.extend(o.ranges.read().covered(offset, end));
            data.sort_unstable();
        }
        let mut out = Vec::new();
        let mut at = offset;
        for (s, e) in data {
            if e <= at {
                continue;
            }
            if s > at {
                out.push(Extent {
                    len: s - at,
                    hole: true,
                    zero: true,
                });
                at = s;
            }
            out.push(Extent {
                len: e - at,
                hole: false,
                zero: false,
            });
            at = e;
        }
        if at < end {
            out.push(Extent {
                len: end - at,
                hole: true,
                zero: true,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Ranges;

    #[test]
    fn ranges_merge_and_clip() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.covered(0, 100), vec![(10, 40)]);
        r.insert(50, 60);
        assert_eq!(r.covered(15, 55), vec![(15, 40), (50, 55)]);
        r.insert(5, 70);
        assert_eq!(r.covered(0, 100), vec![(5, 70)]);
        assert_eq!(r.covered(71, 80), vec![]);
    }
}
