//! The replica manifest (`manifest`): the one file that says which recovery points exist,
//! which layer each reads, which disks the VM has, and where the open layer starts. It is
//! only ever replaced atomically (temp file, sync, rename, sync dir), so after a crash the
//! replica is exactly what the last completed replacement describes.
//!
//! Byte map (integers little-endian; see `docs/format-replica.md`):
//!
//! ```text
//! header
//! off  size  field
//!   0     8  magic          "STBYMAN\0"
//!   8     2  version        1
//!  10     2  header_bytes   32
//!  12     4  incompat       feature bits a reader must know, or refuse the file
//!  16     4  compat         bit 0 PUNCH_PENDING: frames may be unreferenced, heal on open
//!  20     4  body_len
//!  24     4  reserved       0
//!  28     4  header_crc     crc32 seeded with HEADER_SEED over bytes 0..28
//! body
//!   0     8  generation     +1 on every replacement
//!   8     8  next_layer_id
//!  16     8  next_point_id
//!  24     8  open_file_id   the open layer starts at (open_file_id, open_offset)
//!  32     8  open_offset
//!  40     4  disk_count     then per disk: size_bytes u64, name (str)
//!   .     4  point_count    then per point, oldest first:
//!                             id u64, seq u64, time_us u64, kind u8 (1 initial,
//!                             2 crash-consistent, 3 app-consistent), name (opt str),
//!                             group (opt str), layer_id u64, layer_exact_from u64,
//!                             layer_entries u64
//!   .        disk history   only with incompat bit 0 DISK_HISTORY: per disk (disk_count
//!                             of them) epoch_count u32, then per epoch, oldest first:
//!                             from_seq u64, size_bytes u64. The disk exists in the
//!                             state at seq S from its first epoch's from_seq on
//!                             (u64::MAX: a `disk add` not finished, in no state), with
//!                             the size of the newest epoch whose from_seq <= S.
//! trailer
//!   0     4  crc32          seeded with CRC_SEED over header ‖ body
//! str:     present u8 (1), len u16, UTF-8 bytes
//! opt str: present u8 (0 absent / 1 present), len u16, UTF-8 bytes
//! ```
//!
//! Invariant: points are in strictly increasing seq (and id) order; point k's layer holds
//! the changes in (seq of point k-1, seq of point k], so the live layers are exactly the
//! points' layers, and the newest point's seq is where the open layer begins. A disk's
//! epochs grow in from_seq and in size (disks only grow), the newest one's size is the
//! disk's `size_bytes`, and disks appear in order (a disk's first from_seq is at least
//! the previous disk's), so the disks of any state are a prefix of `disks`. Without the
//! section every disk has one epoch from seq 0 at its size (a manifest older than disk
//! add and resize); an older reader refuses a manifest that has one (it would show a
//! disk, or a size, in points that never had it).

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::util::codec::{part, seeded_crc, DecodeError, Features, Reader, Writer};

pub const FILE_NAME: &str = "manifest";
pub const MAGIC: [u8; 8] = *b"STBYMAN\0";
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 32;
/// Incompatible feature: the disk history section follows the points (see the byte map).
pub const INCOMPAT_DISK_HISTORY: u32 = 1;
pub const KNOWN_INCOMPAT: u32 = INCOMPAT_DISK_HISTORY;
/// An epoch's `from_seq` while its disk is being added: the disk is in no state yet.
pub const PENDING_SEQ: u64 = u64::MAX;
/// Compatible feature: a prune or coalesce swapped the manifest and may not have punched
/// every frame it freed; the next open runs the reference scan.
pub const COMPAT_PUNCH_PENDING: u32 = 1;
/// Longest disk, point or group name.
pub const MAX_NAME_BYTES: usize = 1024;
/// A manifest larger than this is refused before allocation.
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
const HEADER_SEED: u32 = 0x5354_4d48; // "STMH"
const CRC_SEED: u32 = 0x5354_4d46; // "STMF"
const CRC_ID: u64 = 0x4d41_4e49_4645_5354; // "MANIFEST"

/// A disk of the VM: a name and a virtual size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub size_bytes: u64,
}

/// From `from_seq` on, a disk has `size_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskEpoch {
    pub from_seq: u64,
    pub size_bytes: u64,
}

/// What kind of recovery point this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PointKind {
    /// The first point after initial replication.
    Initial,
    CrashConsistent,
    AppConsistent,
}

impl PointKind {
    fn code(self) -> u8 {
        match self {
            PointKind::Initial => 1,
            PointKind::CrashConsistent => 2,
            PointKind::AppConsistent => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(PointKind::Initial),
            2 => Some(PointKind::CrashConsistent),
            3 => Some(PointKind::AppConsistent),
            _ => None,
        }
    }
}

/// A recovery point as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointInfo {
    pub id: u64,
    pub seq: u64,
    /// Time of the last change the point includes (microseconds since the Unix epoch).
    pub time_us: u64,
    pub kind: PointKind,
    pub name: Option<String>,
    pub group: Option<String>,
}

/// A point and the layer it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestPoint {
    pub info: PointInfo,
    pub layer_id: u64,
    pub layer_exact_from: u64,
    pub layer_entries: u64,
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub compat: u32,
    pub generation: u64,
    pub next_layer_id: u64,
    pub next_point_id: u64,
    pub open_file_id: u64,
    pub open_offset: u64,
    pub disks: Vec<DiskSpec>,
    pub points: Vec<ManifestPoint>,
    /// Per disk (parallel to `disks`), its sizes over time; see the byte map.
    pub disk_history: Vec<Vec<DiskEpoch>>,
}

/// The history of disks that were there from the start at their size.
pub fn initial_history(disks: &[DiskSpec]) -> Vec<Vec<DiskEpoch>> {
    disks
        .iter()
        .map(|d| {
            vec![DiskEpoch {
                from_seq: 0,
                size_bytes: d.size_bytes,
            }]
        })
        .collect()
}

impl Manifest {
    /// The disks of the state at `seq`, each at its size then (a prefix of `disks`).
    pub fn disks_at(&self, seq: u64) -> Vec<DiskSpec> {
        self.disks
            .iter()
            .zip(&self.disk_history)
            .map_while(|(d, h)| {
                let e = h.iter().rev().find(|e| e.from_seq <= seq)?;
                Some(DiskSpec {
                    name: d.name.clone(),
                    size_bytes: e.size_bytes,
                })
            })
            .collect()
    }

    /// Whether the history says more than "every disk from the start at its size".
    fn has_history(&self) -> bool {
        self.disk_history != initial_history(&self.disks)
    }

    /// Seq of the newest point (0 if none): where the open layer begins.
    pub fn sealed_seq(&self) -> u64 {
        self.points.last().map_or(0, |p| p.info.seq)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut w = Writer::new(&mut body);
        w.u64(self.generation)
            .u64(self.next_layer_id)
            .u64(self.next_point_id)
            .u64(self.open_file_id)
            .u64(self.open_offset)
            .u32(self.disks.len() as u32);
        for d in &self.disks {
            w.u64(d.size_bytes)
                .u8(1)
                .u16(d.name.len() as u16)
                .bytes(d.name.as_bytes());
        }
        w.u32(self.points.len() as u32);
        for p in &self.points {
            let i = &p.info;
            w.u64(i.id).u64(i.seq).u64(i.time_us).u8(i.kind.code());
            put_opt_str(&mut w, i.name.as_deref());
            put_opt_str(&mut w, i.group.as_deref());
            w.u64(p.layer_id)
                .u64(p.layer_exact_from)
                .u64(p.layer_entries);
        }
        let history = self.has_history();
        if history {
            for h in &self.disk_history {
                w.u32(h.len() as u32);
                for e in h {
                    w.u64(e.from_seq).u64(e.size_bytes);
                }
            }
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 4);
        Writer::new(&mut out)
            .bytes(&MAGIC)
            .u16(VERSION)
            .u16(HEADER_BYTES as u16)
            .u32(if history { INCOMPAT_DISK_HISTORY } else { 0 })
            .u32(self.compat)
            .u32(body.len() as u32)
            .u32(0);
        debug_assert_eq!(out.len(), 28);
        let h = seeded_crc(HEADER_SEED, CRC_ID, &[&out]);
        Writer::new(&mut out).u32(h).bytes(&body);
        let c = seeded_crc(CRC_SEED, CRC_ID, &[&out]);
        Writer::new(&mut out).u32(c);
        out
    }

    /// Check that names fit the format (callers validate before encoding).
    pub fn check_name(name: &str) -> Result<(), String> {
        if name.len() > MAX_NAME_BYTES {
            return Err(format!("name longer than {MAX_NAME_BYTES} bytes"));
        }
        Ok(())
    }
}

/// An optional UTF-8 string: present u8 (0/1), length u16, bytes.
fn put_opt_str(w: &mut Writer<'_>, s: Option<&str>) {
    match s {
        None => w.u8(0).u16(0),
        Some(s) => w.u8(1).u16(s.len() as u16).bytes(s.as_bytes()),
    };
}

fn get_opt_str(c: &mut Reader<'_>, field: &'static str) -> Result<Option<String>, DecodeError> {
    let present = c.u8(field)?;
    let at = c.position();
    let len = c.u16(field)? as usize;
    if len > MAX_NAME_BYTES {
        return Err(c.invalid(format!("string of {len} bytes exceeds {MAX_NAME_BYTES}")));
    }
    match present {
        0 if len == 0 => Ok(None),
        1 => c.utf8(len, field).map(Some),
        _ => Err(DecodeError::invalid(
            field,
            at - 1,
            "bad string presence byte",
        )),
    }
}

/// Decode and validate a whole manifest file.
pub fn decode_manifest(b: &[u8]) -> Result<Manifest, DecodeError> {
    let mut c = Reader::new(b);
    c.magic(&MAGIC, "not a Standby replica manifest (bad magic)")?;
    let version = c.u16("version")?;
    let header_bytes = c.u16("header_bytes")? as usize;
    let incompat = c.u32("incompat")?;
    let compat = c.u32("compat")?;
    let body_len = c.u32("body_len")? as usize;
    let _reserved = c.u32("reserved")?;
    let h = c.u32("header_crc")?;
    if seeded_crc(HEADER_SEED, CRC_ID, &[part(b, 0..28, "header")?]) != h {
        return Err(c.invalid("manifest header checksum mismatch"));
    }
    Features {
        version,
        version_at: 8,
        incompat,
        incompat_at: 12,
    }
    .check("manifest", VERSION, KNOWN_INCOMPAT)?;
    if header_bytes != HEADER_BYTES || body_len > MAX_MANIFEST_BYTES {
        return Err(DecodeError::invalid(
            "header_bytes",
            10,
            "manifest header has a bad length",
        ));
    }
    let total = HEADER_BYTES + body_len + 4;
    if b.len() < total {
        return Err(DecodeError::truncated("body", HEADER_BYTES, total, b.len()));
    }
    if b.len() != total {
        return Err(DecodeError::invalid(
            "end",
            total,
            "manifest has trailing bytes",
        ));
    }
    let mut t = Reader::new(part(b, total - 4..total, "crc")?);
    if seeded_crc(CRC_SEED, CRC_ID, &[part(b, 0..total - 4, "body")?]) != t.u32("crc")? {
        return Err(DecodeError::invalid(
            "crc",
            total - 4,
            "manifest checksum mismatch",
        ));
    }
    let mut c = Reader::new(part(b, 0..total - 4, "body")?);
    c.skip(HEADER_BYTES, "header")?;
    let generation = c.u64("generation")?;
    let next_layer_id = c.u64("next_layer_id")?;
    let next_point_id = c.u64("next_point_id")?;
    let open_file_id = c.u64("open_file_id")?;
    let open_offset = c.u64("open_offset")?;
    let disk_count = c.u32("disk_count")? as usize;
    if disk_count > u16::MAX as usize + 1 || disk_count > c.remaining() / 11 {
        return Err(c.invalid("manifest disk count is implausible"));
    }
    let mut disks = Vec::with_capacity(disk_count);
    for _ in 0..disk_count {
        let size_bytes = c.u64("size_bytes")?;
        let name =
            get_opt_str(&mut c, "disk_name")?.ok_or_else(|| c.invalid("disk without a name"))?;
        disks.push(DiskSpec { name, size_bytes });
    }
    let point_count = c.u32("point_count")? as usize;
    if point_count > c.remaining() / 55 {
        return Err(c.invalid("manifest point count is implausible"));
    }
    let mut points: Vec<ManifestPoint> = Vec::with_capacity(point_count);
    for _ in 0..point_count {
        let at = c.position();
        let id = c.u64("id")?;
        let seq = c.u64("seq")?;
        let time_us = c.u64("time_us")?;
        let kind = PointKind::from_code(c.u8("point_kind")?)
            .ok_or_else(|| c.invalid("unknown point kind"))?;
        let name = get_opt_str(&mut c, "name")?;
        let group = get_opt_str(&mut c, "group")?;
        let layer_id = c.u64("layer_id")?;
        let layer_exact_from = c.u64("layer_exact_from")?;
        let layer_entries = c.u64("layer_entries")?;
        let base = points.last().map_or(0, |p| p.info.seq);
        if let Some(prev) = points.last() {
            if id <= prev.info.id || seq <= prev.info.seq {
                return Err(DecodeError::invalid(
                    "id",
                    at,
                    "manifest points out of order",
                ));
            }
        }
        if layer_exact_from < base || layer_exact_from > seq || id >= next_point_id {
            return Err(DecodeError::invalid(
                "layer_exact_from",
                c.position() - 16,
                "manifest point has inconsistent fields",
            ));
        }
        if layer_id >= next_layer_id || points.iter().any(|p| p.layer_id == layer_id) {
            return Err(DecodeError::invalid(
                "layer_id",
                c.position() - 24,
                "manifest point has a bad layer id",
            ));
        }
        points.push(ManifestPoint {
            info: PointInfo {
                id,
                seq,
                time_us,
                kind,
                name,
                group,
            },
            layer_id,
            layer_exact_from,
            layer_entries,
        });
    }
    let disk_history = if incompat & INCOMPAT_DISK_HISTORY != 0 {
        decode_history(&mut c, &disks)?
    } else {
        initial_history(&disks)
    };
    if !c.is_empty() {
        return Err(DecodeError::invalid(
            "end",
            c.position(),
            "manifest body has trailing bytes",
        ));
    }
    Ok(Manifest {
        compat,
        generation,
        next_layer_id,
        next_point_id,
        open_file_id,
        open_offset,
        disks,
        points,
        disk_history,
    })
}

/// The disk history section: per disk its epochs, checked against the invariant.
fn decode_history(
    c: &mut Reader<'_>,
    disks: &[DiskSpec],
) -> Result<Vec<Vec<DiskEpoch>>, DecodeError> {
    let mut out: Vec<Vec<DiskEpoch>> = Vec::with_capacity(disks.len());
    let mut prev_first = 0;
    for d in disks {
        let at = c.position();
        let n = c.u32("epoch_count")? as usize;
        if n == 0 || n > c.remaining() / 16 {
            return Err(DecodeError::invalid(
                "epoch_count",
                at,
                "manifest disk history count is implausible",
            ));
        }
        let mut h: Vec<DiskEpoch> = Vec::with_capacity(n);
        for _ in 0..n {
            let at = c.position();
            let e = DiskEpoch {
                from_seq: c.u64("from_seq")?,
                size_bytes: c.u64("epoch_size_bytes")?,
            };
            if let Some(p) = h.last() {
                if e.from_seq <= p.from_seq || e.size_bytes <= p.size_bytes {
                    return Err(DecodeError::invalid(
                        "from_seq",
                        at,
                        "manifest disk history out of order",
                    ));
                }
            }
            h.push(e);
        }
        let first = h.first().map_or(0, |e| e.from_seq);
        if first < prev_first || h.last().map(|e| e.size_bytes) != Some(d.size_bytes) {
            return Err(DecodeError::invalid(
                "from_seq",
                at,
                "manifest disk history disagrees with its disks",
            ));
        }
        prev_first = first;
        out.push(h);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            compat: COMPAT_PUNCH_PENDING,
            generation: 7,
            next_layer_id: 10,
            next_point_id: 5,
            open_file_id: 3,
            open_offset: 4096,
            disks: vec![
                DiskSpec {
                    name: "os".into(),
                    size_bytes: 1 << 40,
                },
                DiskSpec {
                    name: "data".into(),
                    size_bytes: 1 << 30,
                },
            ],
            points: vec![
                ManifestPoint {
                    info: PointInfo {
                        id: 1,
                        seq: 100,
                        time_us: 1000,
                        kind: PointKind::Initial,
                        name: None,
                        group: None,
                    },
                    layer_id: 4,
                    layer_exact_from: 100,
                    layer_entries: 12,
                },
                ManifestPoint {
                    info: PointInfo {
                        id: 4,
                        seq: 150,
                        time_us: 2000,
                        kind: PointKind::AppConsistent,
                        name: Some("before-upgrade".into()),
                        group: Some("erp".into()),
                    },
                    layer_id: 9,
                    layer_exact_from: 100,
                    layer_entries: 3,
                },
            ],
            disk_history: vec![
                vec![DiskEpoch {
                    from_seq: 0,
                    size_bytes: 1 << 40,
                }],
                vec![DiskEpoch {
                    from_seq: 0,
                    size_bytes: 1 << 30,
                }],
            ],
        }
    }

    /// A disk added at seq 120 and grown at seq 140, and a disk add under way.
    pub(crate) fn with_history() -> Manifest {
        let mut m = sample();
        m.disks[1].size_bytes = 2 << 30;
        m.disks.push(DiskSpec {
            name: "logs".into(),
            size_bytes: 1 << 20,
        });
        m.disk_history[1] = vec![
            DiskEpoch {
                from_seq: 120,
                size_bytes: 1 << 30,
            },
            DiskEpoch {
                from_seq: 140,
                size_bytes: 2 << 30,
            },
        ];
        m.disk_history.push(vec![DiskEpoch {
            from_seq: PENDING_SEQ,
            size_bytes: 1 << 20,
        }]);
        m
    }

    #[test]
    fn disk_history_round_trips_sets_its_bit_and_gives_each_state_its_disks() {
        let plain = sample().encode();
        assert_eq!(u32::from_le_bytes(plain[12..16].try_into().unwrap()), 0);
        let m = with_history();
        let b = m.encode();
        assert_eq!(
            u32::from_le_bytes(b[12..16].try_into().unwrap()),
            INCOMPAT_DISK_HISTORY
        );
        assert_eq!(decode_manifest(&b).unwrap(), m);
        let sizes = |seq| {
            m.disks_at(seq)
                .iter()
                .map(|d| (d.name.clone(), d.size_bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(100), vec![("os".to_string(), 1 << 40)]);
        assert_eq!(
            sizes(120),
            vec![("os".to_string(), 1 << 40), ("data".to_string(), 1 << 30)]
        );
        assert_eq!(
            sizes(u64::MAX - 1),
            vec![("os".to_string(), 1 << 40), ("data".to_string(), 2 << 30)]
        );
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(decode_manifest(&d).is_err(), "byte {i}");
        }
    }

    #[test]
    fn disk_history_that_shrinks_or_disagrees_is_refused() {
        let mut m = with_history();
        m.disk_history[1][1].size_bytes = 1 << 29;
        m.disks[1].size_bytes = 1 << 29;
        assert!(decode_manifest(&m.encode()).is_err());
        let mut m = with_history();
        m.disk_history[2][0].from_seq = 10; // before the disk in front of it
        assert!(decode_manifest(&m.encode()).is_err());
        let mut m = with_history();
        m.disks[0].size_bytes = 1 << 41; // its history says 1 TiB
        assert!(decode_manifest(&m.encode()).is_err());
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(decode_manifest(&m.encode()).unwrap(), m);
        let empty = Manifest {
            points: vec![],
            disks: vec![],
            disk_history: vec![],
            ..sample()
        };
        assert_eq!(decode_manifest(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn every_flipped_bit_and_truncation_is_caught() {
        let b = sample().encode();
        for i in 0..b.len() {
            for bit in [0, 2, 7] {
                let mut d = b.clone();
                d[i] ^= 1 << bit;
                assert!(decode_manifest(&d).is_err(), "byte {i} bit {bit}");
            }
        }
        for cut in 0..b.len() {
            assert!(decode_manifest(&b[..cut]).is_err(), "cut {cut}");
        }
        assert!(decode_manifest(&vec![0u8; b.len()]).is_err());
    }

    #[test]
    fn unknown_incompat_refused_unknown_compat_ignored() {
        let reseal = |b: &mut Vec<u8>| {
            let h = seeded_crc(HEADER_SEED, CRC_ID, &[&b[..28]]);
            b[28..32].copy_from_slice(&h.to_le_bytes());
            let n = b.len() - 4;
            let c = seeded_crc(CRC_SEED, CRC_ID, &[&b[..n]]);
            b[n..].copy_from_slice(&c.to_le_bytes());
        };
        let mut b = sample().encode();
        b[19] = 0x40;
        reseal(&mut b);
        assert!(decode_manifest(&b).is_ok());
        b[13] = 1;
        reseal(&mut b);
        assert!(matches!(
            decode_manifest(&b),
            Err(e) if e.is_unsupported()
        ));
    }
}
