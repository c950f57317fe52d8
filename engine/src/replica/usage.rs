//! Space figures of a replica's points, for listings: what each point's layer holds.

use super::index::Loc;
use super::{PointInfo, Replica};

impl Replica {
    /// Every retained point with the bytes of data its layer holds (what changed between
    /// the previous point and it, as stored before coalescing and compression).
    pub fn points_with_bytes(&self) -> Vec<(PointInfo, u64)> {
        self.manifest
            .points
            .iter()
            .zip(self.layers.iter())
            .map(|(p, layer)| {
                let bytes = layer
                    .entries
                    .iter()
                    .filter(|e| matches!(e.loc, Loc::Data { .. }))
                    .map(|e| e.len)
                    .sum();
                (p.info.clone(), bytes)
            })
            .collect()
    }
}
