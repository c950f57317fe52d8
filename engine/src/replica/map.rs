//! An interval map over one disk's byte addresses: non-overlapping pieces keyed by start
//! offset, where inserting a range overwrites (and splits) whatever it covers. Views use it
//! to overlay layers (newer over older), and coalescing uses it to find the surviving
//! pieces of a layer. Invariant: pieces never overlap and are never empty.

use std::collections::BTreeMap;

/// A value that can describe the tail of itself: `advance(n)` is the value for the piece
/// that starts `n` bytes further in.
pub trait Piece: Clone {
    fn advance(&self, by: u64) -> Self;
}

#[derive(Debug, Clone, Default)]
pub struct IntervalMap<V> {
    /// start -> (len, value)
    map: BTreeMap<u64, (u64, V)>,
}

impl<V: Piece> IntervalMap<V> {
    pub fn new() -> Self {
        IntervalMap {
            map: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Map `[start, start+len)` to `v`, overwriting what was there.
    pub fn insert(&mut self, start: u64, len: u64, v: V) {
        if len == 0 {
            return;
        }
        self.remove(start, len);
        self.map.insert(start, (len, v));
    }

    /// Unmap `[start, start+len)`, splitting pieces that straddle its ends.
    pub fn remove(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        // A piece that begins before `start` and reaches into the range.
        if let Some((&s, (l, v))) = self.map.range(..start).next_back() {
            let pend = s + *l;
            if pend > start {
                let v = v.clone();
                self.map.insert(s, (start - s, v.clone()));
                if pend > end {
                    self.map.insert(end, (pend - end, v.advance(end - s)));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(s, _)| *s).collect();
        for s in inside {
            if let Some((l, v)) = self.map.remove(&s) {
                let pend = s + l;
                if pend > end {
                    self.map.insert(end, (pend - end, v.advance(end - s)));
                }
            }
        }
    }

    /// All pieces in offset order: (start, len, value).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &V)> + '_ {
        self.map.iter().map(|(s, (l, v))| (*s, *l, v))
    }

    /// Pieces overlapping `[start, end)`, clipped to it, in offset order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, V)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((&s, (l, v))) = self.map.range(..start).next_back() {
            if s + l > start {
                let pend = (s + l).min(end);
                out.push((start, pend - start, v.advance(start - s)));
            }
        }
        for (&s, (l, v)) in self.map.range(start..end) {
            let pend = (s + l).min(end);
            out.push((s, pend - s, v.clone()));
        }
        out
    }

    /// Total bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.map.values().map(|(l, _)| *l).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that remembers which byte of its source it starts at.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Src(u32, u64);
    impl Piece for Src {
        fn advance(&self, by: u64) -> Self {
            Src(self.0, self.1 + by)
        }
    }

    fn flatten(m: &IntervalMap<Src>, size: u64) -> Vec<Option<(u32, u64)>> {
        let mut v = vec![None; size as usize];
        let mut last_end = 0;
        for (s, l, src) in m.iter() {
            assert!(s >= last_end && l > 0, "pieces overlap or are empty");
            last_end = s + l;
            for i in 0..l {
                v[(s + i) as usize] = Some((src.0, src.1 + i));
            }
        }
        v
    }

    #[test]
    fn matches_a_byte_model() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let size = 200;
        let mut m = IntervalMap::new();
        let mut model = vec![None; size as usize];
        for step in 0..5000u32 {
            let start = rnd(size);
            let len = 1 + rnd(size - start);
            if rnd(4) == 0 {
                m.remove(start, len);
                for i in start..start + len {
                    model[i as usize] = None;
                }
            } else {
                m.insert(start, len, Src(step, 0));
                for i in start..start + len {
                    model[i as usize] = Some((step, i - start));
                }
            }
            assert_eq!(flatten(&m, size), model, "step {step}");
            let (a, b) = (rnd(size), rnd(size));
            let (a, b) = (a.min(b), a.max(b));
            for (s, l, src) in m.overlapping(a, b) {
                for i in 0..l {
                    assert_eq!(model[(s + i) as usize], Some((src.0, src.1 + i)));
                }
            }
        }
    }
}
