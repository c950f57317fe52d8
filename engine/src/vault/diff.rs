//! `diff`: the byte ranges where two states of a VM differ (two points, or a point and
//! `latest`), disk by disk. Two views of one replica are compared first by their extent
//! maps: a range both read from the same bytes of the same frame is equal without a read,
//! and so is a hole on both sides. Only where the maps cannot tell (the data was written
//! again, or coalesced into a new frame) are the blocks hashed, by the delta engine.

use super::{PointSpec, Vault};
use crate::delta::{self, ViewDisk};
use crate::error::{Error, Result};
use crate::replica::{PointInfo, View};
use serde::{Deserialize, Serialize};

/// One side of a diff: the state a spec resolved to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffSide {
    pub requested: PointSpec,
    pub point: Option<PointInfo>,
    pub seq: u64,
}

/// A changed byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// How one disk differs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskDiff {
    pub name: String,
    pub size_bytes: u64,
    /// Whole 64 KiB blocks (the last one clipped to the disk), adjacent ones merged.
    pub changed: Vec<Range>,
    pub changed_bytes: u64,
    /// Bytes the extent maps could not tell apart, which were hashed (both sides).
    pub compared_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffReport {
    pub vm: String,
    pub from: DiffSide,
    pub to: DiffSide,
    pub block_bytes: u64,
    pub disks: Vec<DiskDiff>,
    pub changed_bytes: u64,
    pub compared_bytes: u64,
}

impl Vault {
    /// The changed ranges between the states `a` and `b` of `vm` name.
    pub fn diff(&self, vm: &str, a: PointSpec, b: PointSpec) -> Result<DiffReport> {
        let _lock = self.lock_vm(vm)?;
        let rec = self.live_vm(vm)?.clone();
        // `latest` processes everything pending first: resolve it before the other side,
        // so a point cut by it is not missed by, say, `latest-processed`.
        let (va, vb) = if b == PointSpec::Latest {
            let vb = self.resolve_view(vm, &rec, b.clone())?;
            (self.resolve_view(vm, &rec, a.clone())?, vb)
        } else {
            let va = self.resolve_view(vm, &rec, a.clone())?;
            (va, self.resolve_view(vm, &rec, b.clone())?)
        };
        let names: Vec<String> = rec.disks.iter().map(|d| d.name.clone()).collect();
        diff_views(vm, &names, (&va, a), (&vb, b))
    }
}

/// Compare two views of one replica, disk by disk.
pub fn diff_views(
    vm: &str,
    names: &[String],
    (va, a): (&View, PointSpec),
    (vb, b): (&View, PointSpec),
) -> Result<DiffReport> {
    let mut disks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let disk = i as u16;
        for v in [va, vb] {
            if v.disks().len() <= i {
                return Err(Error::Invalid(format!(
                    "disk '{name}' is not in the state at seq {} (it was added after it): only states with the same disks compare",
                    v.seq()
                )));
            }
        }
        let (sa, sb) = (size_of(va, disk)?, size_of(vb, disk)?);
        if sa != sb {
            return Err(Error::Invalid(format!(
                "disk '{name}' is {sa} bytes at seq {} and {sb} bytes at seq {}: only points of one size compare",
                va.seq(),
                vb.seq()
            )));
        }
        let maybe = va.maybe_different(vb, disk)?;
        let d = delta::compare_within(
            &ViewDisk { view: va, disk },
            &ViewDisk { view: vb, disk },
            Some(&maybe),
        )?;
        disks.push(DiskDiff {
            name: name.clone(),
            size_bytes: sa,
            changed_bytes: d.changed_bytes(),
            compared_bytes: d.compared_bytes,
            changed: d
                .changed
                .iter()
                .map(|&(offset, len)| Range { offset, len })
                .collect(),
        });
    }
    let side = |v: &View, spec: PointSpec| DiffSide {
        requested: spec,
        point: v.point().cloned(),
        seq: v.seq(),
    };
    Ok(DiffReport {
        vm: vm.to_string(),
        from: side(va, a),
        to: side(vb, b),
        block_bytes: delta::BLOCK_BYTES,
        changed_bytes: disks.iter().map(|d| d.changed_bytes).sum(),
        compared_bytes: disks.iter().map(|d| d.compared_bytes).sum(),
        disks,
    })
}

fn size_of(v: &View, disk: u16) -> Result<u64> {
    v.disks()
        .get(disk as usize)
        .map(|d| d.size_bytes)
        .ok_or_else(|| Error::NotFound(format!("disk {disk} does not exist at seq {}", v.seq())))
}
