//! Retention: which points a policy keeps, and the maintenance that applies it.
//!
//! - Layers wholly older than the any-moment window are *coalesced*: their index is
//!   rewritten keeping only the pieces no later change in the same layer shadows.
//! - Pruned points have their layer *merged* into the next retained point's layer (a new
//!   index holding both, coalesced up to where exactness is still owed).
//!
//! Every new index is written and synced before one manifest swap makes it live; frames no
//! longer referenced are punched after the swap, old index files deleted last. A crash in
//! between is healed on open, and running prune again with the same `now` does nothing
//! more: the plan is a fixed point once applied.

use super::index::{Entry, LayerIndex, Loc};
use super::manifest::{ManifestPoint, PointInfo, PointKind, COMPAT_PUNCH_PENDING};
use super::map::{IntervalMap, Piece};
use super::Replica;
use crate::error::{IoContext, Result};
use crate::policy::{us, Policy, THIN_BUCKET};
use std::collections::BTreeSet;
use std::sync::Arc;

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub pruned_points: Vec<u64>,
    /// Layers whose index was rewritten (coalesced or merged).
    pub rewritten_layers: usize,
    /// Byte ranges of data files punched, and whole data files removed.
    pub punched_ranges: usize,
    pub removed_files: usize,
}

/// The ids of the points `policy` prunes at `now_us`: older than the retention; between
/// `thin_after` and the retention all but one per hour (the newest app-consistent one of
/// that hour, else the newest). The newest point is never pruned. Applying the result and
/// planning again at the same `now_us` prunes nothing more.
pub fn plan_prune(points: &[PointInfo], policy: &Policy, now_us: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Some(newest) = points.last() else {
        return out;
    };
    let bucket_us = us(THIN_BUCKET).max(1);
    let retention = us(policy.retention);
    let thin_after = us(policy.thin_after);
    let mut i = 0;
    while i < points.len() {
        // Group thinned points by the hour (of their own time) they fall in.
        let p = &points[i];
        let age = now_us.saturating_sub(p.time_us);
        if p.id == newest.id {
            break;
        }
        if age > retention {
            out.insert(p.id);
            i += 1;
            continue;
        }
        if age <= thin_after {
            i += 1;
            continue;
        }
        let bucket = p.time_us / bucket_us;
        let mut j = i;
        while j < points.len() {
            let q = &points[j];
            let qage = now_us.saturating_sub(q.time_us);
            if q.time_us / bucket_us != bucket || qage <= thin_after || qage > retention {
                break;
            }
            j += 1;
        }
        let group = &points[i..j];
        let keep = group
            .iter()
            .rev()
            .find(|q| q.kind == PointKind::AppConsistent)
            .unwrap_or(&group[group.len() - 1]);
        for q in group {
            if q.id != keep.id && q.id != newest.id {
                out.insert(q.id);
            }
        }
        i = j;
    }
    out
}

/// A piece of a layer being coalesced: where it came from, keeping its seq and time.
#[derive(Debug, Clone, Copy)]
struct Src {
    seq: u64,
    time_us: u64,
    loc: Loc,
}

impl Piece for Src {
    fn advance(&self, by: u64) -> Self {
        let loc = match self.loc {
            Loc::Data {
                file_id,
                frame_offset,
                frame_len,
                skip,
            } => Loc::Data {
                file_id,
                frame_offset,
                frame_len,
                // Pieces never outgrow their extent (<= 32 MiB), so this fits.
                skip: skip + by as u32,
            },
            z => z,
        };
        Src { loc, ..*self }
    }
}

/// Coalesce entries (in seq order) up to `upto`: those with seq <= upto are reduced to
/// the pieces nothing later (and <= upto) overwrites; later entries are kept as they are.
/// With `drop_zeros` (the bottom layer, nothing beneath) zero pieces are dropped too.
pub(crate) fn coalesce(entries: Vec<Entry>, upto: u64, drop_zeros: bool) -> Vec<Entry> {
    let split = entries.partition_point(|e| e.seq <= upto);
    let mut maps: Vec<IntervalMap<Src>> = Vec::new();
    for e in &entries[..split] {
        let d = e.disk as usize;
        if maps.len() <= d {
            maps.resize_with(d + 1, IntervalMap::new);
        }
        maps[d].insert(
            e.offset,
            e.len,
            Src {
                seq: e.seq,
                time_us: e.time_us,
                loc: e.loc,
            },
        );
    }
    let mut out: Vec<Entry> = Vec::new();
    for (disk, m) in maps.iter().enumerate() {
        for (offset, len, s) in m.iter() {
            if drop_zeros && matches!(s.loc, Loc::Zero { .. }) {
                continue;
            }
            out.push(Entry {
                disk: disk as u16,
                offset,
                len,
                seq: s.seq,
                time_us: s.time_us,
                loc: s.loc,
            });
        }
    }
    out.sort_by_key(|e| (e.seq, e.disk, e.offset));
    out.extend_from_slice(&entries[split..]);
    out
}

impl Replica {
    /// Apply `policy` at `now_us`: coalesce layers older than the any-moment window, prune
    /// and thin points, give back the space nothing retained reads. Crash-safe and
    /// idempotent.
    pub fn prune(&mut self, policy: &Policy, now_us: u64) -> Result<PruneReport> {
        self.check_writable()?;
        self.guard(|r| r.prune_inner(policy, now_us))
    }

    fn prune_inner(&mut self, policy: &Policy, now_us: u64) -> Result<PruneReport> {
        self.absorb_pins();
        let mut report = PruneReport::default();
        let infos = self.points();
        let doomed = plan_prune(&infos, policy, now_us);
        let window_start = now_us.saturating_sub(us(policy.any_moment_window));
        // Groups of consecutive layers that become one: [first, last] (last is retained).
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        for (k, p) in infos.iter().enumerate() {
            if doomed.contains(&p.id) {
                continue;
            }
            let old_enough = p.time_us < window_start;
            let l = &self.layers[k];
            if start < k || (old_enough && l.exact_from < l.end_seq) {
                groups.push((start, k));
            }
            start = k + 1;
        }
        if groups.is_empty() {
            self.sweep_pins()?;
            report.punched_ranges += self.punch_dead()?;
            report.removed_files += self.remove_dead_data_files()?;
            return Ok(report);
        }
        // Build and durably write the new layers.
        let mut next_layer_id = self.manifest.next_layer_id;
        let mut replaced: Vec<(usize, usize, Arc<LayerIndex>)> = Vec::new();
        for &(a, b) in &groups {
            let newest = &self.layers[b];
            // Where exactness is still owed: a layer older than the window owes only its
            // end; a younger one owes its whole exact range, which joins the older
            // layer's if it starts right at that layer's end.
            let owed_from = |k: usize| {
                if infos[k].time_us < window_start {
                    self.layers[k].end_seq
                } else {
                    self.layers[k].exact_from
                }
            };
            let mut exact_from = owed_from(b);
            let mut j = b;
            while j > a && exact_from == self.layers[j].base_seq {
                j -= 1;
                exact_from = owed_from(j);
            }
            let mut all = Vec::new();
            for l in &self.layers[a..=b] {
                all.extend_from_slice(&l.entries);
            }
            let entries = coalesce(all, exact_from, a == 0);
            let layer = LayerIndex {
                layer_id: next_layer_id,
                base_seq: self.layers[a].base_seq,
                end_seq: newest.end_seq,
                exact_from,
                compat: 0,
                entries,
            };
            next_layer_id += 1;
            self.write_index(&layer)?;
            replaced.push((a, b, Arc::new(layer)));
        }
        self.sync_layers_dir()?;
        // One manifest swap makes all of it live.
        let mut m = self.manifest.clone();
        m.next_layer_id = next_layer_id;
        m.compat |= COMPAT_PUNCH_PENDING;
        let mut points: Vec<ManifestPoint> = Vec::new();
        let mut layers: Vec<Arc<LayerIndex>> = Vec::new();
        let mut retired: Vec<Arc<LayerIndex>> = Vec::new();
        let mut g = replaced.iter().peekable();
        let mut k = 0;
        while k < self.layers.len() {
            if let Some((a, b, new)) = g.peek().filter(|(a, _, _)| *a == k) {
                let p = &self.manifest.points[*b];
                points.push(ManifestPoint {
                    info: p.info.clone(),
                    layer_id: new.layer_id,
                    layer_exact_from: new.exact_from,
                    layer_entries: new.entries.len() as u64,
                });
                layers.push(new.clone());
                retired.extend(self.layers[*a..=*b].iter().cloned());
                for q in &self.manifest.points[*a..*b] {
                    report.pruned_points.push(q.info.id);
                }
                k = b + 1;
                g.next();
                continue;
            }
            if doomed.contains(&self.manifest.points[k].info.id) {
                // Unreachable: a doomed point always belongs to a group.
                k += 1;
                continue;
            }
            points.push(self.manifest.points[k].clone());
            layers.push(self.layers[k].clone());
            k += 1;
        }
        m.points = points;
        self.commit(m)?;
        report.rewritten_layers = replaced.len();
        for (_, _, l) in &replaced {
            self.refs.add(&l.entries);
        }
        self.layers = layers;
        let old_ids: Vec<u64> = retired.iter().map(|l| l.layer_id).collect();
        for l in retired {
            self.retire(l);
        }
        // Clean up: punch, remove files, then say so in the manifest.
        report.punched_ranges += self.punch_dead()?;
        report.removed_files += self.remove_dead_data_files()?;
        let dir = self.layers_dir();
        for id in old_ids {
            let p = dir.join(super::index::file_name(id));
            if self.store.vfs.exists(&p) {
                self.store.vfs.remove(&p).at(&p)?;
            }
        }
        self.sync_layers_dir()?;
        if self.pins.is_empty() {
            let mut m = self.manifest.clone();
            m.compat &= !COMPAT_PUNCH_PENDING;
            self.commit(m)?;
        }
        Ok(report)
    }

    /// A layer left the manifest: drop its references, unless a view still reads it.
    fn retire(&mut self, l: Arc<LayerIndex>) {
        if Arc::strong_count(&l) > 1 {
            self.pins.push(l);
        } else {
            self.refs.remove(&l.entries);
        }
    }

    /// Take over the open-layer snapshots views made: their frames count as referenced.
    fn absorb_pins(&mut self) {
        let pending = std::mem::take(&mut *self.pending_pins.lock());
        for p in pending {
            self.refs.add(&p.entries);
            self.pins.push(p);
        }
    }

    /// Release pins no view holds any more.
    fn sweep_pins(&mut self) -> Result<()> {
        let pins = std::mem::take(&mut self.pins);
        for p in pins {
            if Arc::strong_count(&p) > 1 {
                self.pins.push(p);
            } else {
                self.refs.remove(&p.entries);
            }
        }
        Ok(())
    }

    /// Punch the holes left by frames whose last reference went away.
    fn punch_dead(&mut self) -> Result<usize> {
        self.sweep_pins()?;
        let m = &self.manifest;
        let (open_file, open_offset) = (m.open_file_id, m.open_offset);
        let store = self.store.clone();
        let holes = self.refs.take_holes(|id| {
            if id > open_file {
                None
            } else if id == open_file {
                Some(open_offset)
            } else {
                store.file(id).ok().and_then(|f| f.len().ok())
            }
        });
        for &(id, s, e) in &holes {
            self.store.punch(id, s, e)?;
        }
        Ok(holes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(id: u64, min: u64, kind: PointKind) -> PointInfo {
        PointInfo {
            id,
            seq: id * 10,
            time_us: min * 60_000_000,
            kind,
            name: None,
            group: None,
        }
    }

    #[test]
    fn retention_and_hourly_thinning_prefer_app_consistent() {
        use PointKind::*;
        let h = 60;
        // Points every 20 minutes over 30 hours; every 3rd one app-consistent.
        let points: Vec<PointInfo> = (1..=90)
            .map(|i| {
                pt(
                    i,
                    i * 20,
                    if i % 3 == 1 {
                        AppConsistent
                    } else {
                        CrashConsistent
                    },
                )
            })
            .collect();
        let policy = Policy::default();
        let now = 90 * 20 * 60_000_000 + 60_000_000;
        let doomed = plan_prune(&points, &policy, now);
        let kept: Vec<&PointInfo> = points.iter().filter(|p| !doomed.contains(&p.id)).collect();
        let age_min = |p: &PointInfo| (now - p.time_us) / 60_000_000;
        assert!(kept.iter().all(|p| age_min(p) <= 24 * h));
        let mut per_hour = std::collections::BTreeMap::new();
        let thinned = |p: &PointInfo| age_min(p) > 2 * h && age_min(p) <= 24 * h;
        for p in &kept {
            if thinned(p) {
                let hour = p.time_us / 3_600_000_000;
                *per_hour.entry(hour).or_insert(0) += 1;
                let app_in_hour = points.iter().any(|q| {
                    thinned(q) && q.time_us / 3_600_000_000 == hour && q.kind == AppConsistent
                });
                if app_in_hour {
                    assert_eq!(
                        p.kind, AppConsistent,
                        "thinning keeps app-consistent points"
                    );
                }
            }
        }
        assert!(per_hour.values().all(|n| *n == 1));
        assert!(kept.iter().filter(|p| age_min(p) <= 2 * h).count() >= 6);
        // Applying the plan is a fixed point.
        let rest: Vec<PointInfo> = kept.into_iter().cloned().collect();
        assert!(plan_prune(&rest, &policy, now).is_empty());
        // The newest point survives any age.
        let old = vec![pt(1, 0, CrashConsistent), pt(2, 1, CrashConsistent)];
        assert_eq!(plan_prune(&old, &policy, u64::MAX / 2), BTreeSet::from([1]));
    }

    #[test]
    fn coalesce_keeps_surviving_pieces_and_later_entries() {
        let d = |seq, offset, len, skip| Entry {
            disk: 0,
            offset,
            len,
            seq,
            time_us: seq,
            loc: Loc::Data {
                file_id: 1,
                frame_offset: seq * 100,
                frame_len: 100,
                skip,
            },
        };
        let entries = vec![d(1, 0, 4096, 0), d(2, 1024, 1024, 0), d(3, 0, 512, 0)];
        let out = coalesce(entries.clone(), 2, false);
        assert_eq!(
            out,
            vec![
                d(1, 0, 1024, 0),
                d(1, 2048, 2048, 2048),
                d(2, 1024, 1024, 0),
                d(3, 0, 512, 0)
            ]
        );
        assert_eq!(coalesce(entries.clone(), 0, false), entries);
    }
}
