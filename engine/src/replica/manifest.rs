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
//! trailer
//!   0     4  crc32          seeded with CRC_SEED over header ‖ body
//! str:     present u8 (1), len u16, UTF-8 bytes
//! opt str: present u8 (0 absent / 1 present), len u16, UTF-8 bytes
//! ```
//!
//! Invariant: points are in strictly increasing seq (and id) order; point k's layer holds
//! the changes in (seq of point k-1, seq of point k], so the live layers are exactly the
//! points' layers, and the newest point's seq is where the open layer begins.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::codec::{bad, check_features, put_opt_str, put_u16, put_u32, put_u64, Cursor};
use super::codec::{part, seeded_crc, FormatError};

pub const FILE_NAME: &str = "manifest";
pub const MAGIC: [u8; 8] = *b"STBYMAN\0";
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 32;
pub const KNOWN_INCOMPAT: u32 = 0;
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
}

impl Manifest {
    /// Seq of the newest point (0 if none): where the open layer begins.
    pub fn sealed_seq(&self) -> u64 {
        self.points.last().map_or(0, |p| p.info.seq)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for v in [
            self.generation,
            self.next_layer_id,
            self.next_point_id,
            self.open_file_id,
            self.open_offset,
        ] {
            put_u64(&mut body, v);
        }
        put_u32(&mut body, self.disks.len() as u32);
        for d in &self.disks {
            put_u64(&mut body, d.size_bytes);
            body.push(1);
            put_u16(&mut body, d.name.len() as u16);
            body.extend_from_slice(d.name.as_bytes());
        }
        put_u32(&mut body, self.points.len() as u32);
        for p in &self.points {
            let i = &p.info;
            for v in [i.id, i.seq, i.time_us] {
                put_u64(&mut body, v);
            }
            body.push(i.kind.code());
            put_opt_str(&mut body, i.name.as_deref());
            put_opt_str(&mut body, i.group.as_deref());
            for v in [p.layer_id, p.layer_exact_from, p.layer_entries] {
                put_u64(&mut body, v);
            }
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 4);
        out.extend_from_slice(&MAGIC);
        put_u16(&mut out, VERSION);
        put_u16(&mut out, HEADER_BYTES as u16);
        put_u32(&mut out, KNOWN_INCOMPAT);
        put_u32(&mut out, self.compat);
        put_u32(&mut out, body.len() as u32);
        put_u32(&mut out, 0);
        debug_assert_eq!(out.len(), 28);
        let h = seeded_crc(HEADER_SEED, CRC_ID, &[&out]);
        put_u32(&mut out, h);
        out.extend_from_slice(&body);
        let c = seeded_crc(CRC_SEED, CRC_ID, &[&out]);
        put_u32(&mut out, c);
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

/// Decode and validate a whole manifest file.
pub fn decode_manifest(b: &[u8]) -> Result<Manifest, FormatError> {
    let mut c = Cursor::new(b);
    if c.bytes(8)? != MAGIC {
        return Err(bad("not a Standby replica manifest (bad magic)"));
    }
    let version = c.u16()?;
    let header_bytes = c.u16()? as usize;
    let incompat = c.u32()?;
    let compat = c.u32()?;
    let body_len = c.u32()? as usize;
    let _reserved = c.u32()?;
    let h = c.u32()?;
    if seeded_crc(HEADER_SEED, CRC_ID, &[part(b, 0..28)?]) != h {
        return Err(bad("manifest header checksum mismatch"));
    }
    check_features("manifest", version, VERSION, incompat, KNOWN_INCOMPAT)?;
    if header_bytes != HEADER_BYTES || body_len > MAX_MANIFEST_BYTES {
        return Err(bad("manifest header has a bad length"));
    }
    let total = HEADER_BYTES + body_len + 4;
    if b.len() < total {
        return Err(FormatError::Truncated {
            needed: total,
            have: b.len(),
        });
    }
    if b.len() != total {
        return Err(bad("manifest has trailing bytes"));
    }
    let mut t = Cursor::new(part(b, total - 4..total)?);
    if seeded_crc(CRC_SEED, CRC_ID, &[part(b, 0..total - 4)?]) != t.u32()? {
        return Err(bad("manifest checksum mismatch"));
    }
    let mut c = Cursor::new(part(b, HEADER_BYTES..total - 4)?);
    let generation = c.u64()?;
    let next_layer_id = c.u64()?;
    let next_point_id = c.u64()?;
    let open_file_id = c.u64()?;
    let open_offset = c.u64()?;
    let disk_count = c.u32()? as usize;
    if disk_count > u16::MAX as usize + 1 || disk_count > c.remaining() / 11 {
        return Err(bad("manifest disk count is implausible"));
    }
    let mut disks = Vec::with_capacity(disk_count);
    for _ in 0..disk_count {
        let size_bytes = c.u64()?;
        let name = c
            .opt_str(MAX_NAME_BYTES)?
            .ok_or_else(|| bad("disk without a name"))?;
        disks.push(DiskSpec { name, size_bytes });
    }
    let point_count = c.u32()? as usize;
    if point_count > c.remaining() / 55 {
        return Err(bad("manifest point count is implausible"));
    }
    let mut points: Vec<ManifestPoint> = Vec::with_capacity(point_count);
    for _ in 0..point_count {
        let id = c.u64()?;
        let seq = c.u64()?;
        let time_us = c.u64()?;
        let kind = PointKind::from_code(c.u8()?).ok_or_else(|| bad("unknown point kind"))?;
        let name = c.opt_str(MAX_NAME_BYTES)?;
        let group = c.opt_str(MAX_NAME_BYTES)?;
        let layer_id = c.u64()?;
        let layer_exact_from = c.u64()?;
        let layer_entries = c.u64()?;
        let base = points.last().map_or(0, |p| p.info.seq);
        if let Some(prev) = points.last() {
            if id <= prev.info.id || seq <= prev.info.seq {
                return Err(bad("manifest points out of order"));
            }
        }
        if layer_exact_from < base || layer_exact_from > seq || id >= next_point_id {
            return Err(bad("manifest point has inconsistent fields"));
        }
        if layer_id >= next_layer_id || points.iter().any(|p| p.layer_id == layer_id) {
            return Err(bad("manifest point has a bad layer id"));
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
    if c.remaining() != 0 {
        return Err(bad("manifest body has trailing bytes"));
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
    })
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
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(decode_manifest(&m.encode()).unwrap(), m);
        let empty = Manifest {
            points: vec![],
            disks: vec![],
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
            Err(FormatError::Unsupported(_))
        ));
    }
}
