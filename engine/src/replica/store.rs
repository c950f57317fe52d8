//! Access to the replica's data files: opening (and caching handles), reading and verifying
//! one frame's extent, and the reference counts that decide which frame ranges may be
//! punched. Invariant kept with the caller: a byte range is punched only when no live
//! layer, and no view still pinning a retired layer, references a frame in it, and only
//! below the open layer's start.

use super::datafile::{self, HEADER_BYTES as DATA_HEADER_BYTES};
use super::extent::{decode_body_into, decode_body_to_slice, verify_frame, FrameHeader, KIND_DATA};
use super::index::{Entry, Loc};
use crate::error::{Error, IoContext, Result};
use crate::util::codec::DecodeError;
use crate::vfs::{VFile, Vfs};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// Largest frame buffer a thread keeps between reads.
const FRAME_KEEP_BYTES: usize = 8 << 20;

/// Data files of one replica, shared by the replica and its views.
pub(crate) struct Store {
    pub vfs: Arc<dyn Vfs>,
    pub data_dir: PathBuf,
    files: Mutex<HashMap<u64, Arc<dyn VFile>>>,
}

impl Store {
    pub fn new(vfs: Arc<dyn Vfs>, data_dir: PathBuf) -> Self {
        Store {
            vfs,
            data_dir,
            files: Mutex::new(HashMap::new()),
        }
    }

    pub fn path(&self, file_id: u64) -> PathBuf {
        self.data_dir.join(datafile::file_name(file_id))
    }

    /// An open handle to a data file (cached).
    pub fn file(&self, file_id: u64) -> Result<Arc<dyn VFile>> {
        if let Some(f) = self.files.lock().get(&file_id) {
            return Ok(f.clone());
        }
        let path = self.path(file_id);
        let f = self.vfs.open(&path).at(&path)?;
        self.files.lock().insert(file_id, f.clone());
        Ok(f)
    }

    pub fn insert(&self, file_id: u64, f: Arc<dyn VFile>) {
        self.files.lock().insert(file_id, f);
    }

    pub fn forget(&self, file_id: u64) {
        self.files.lock().remove(&file_id);
    }

    /// Read, verify and decode the data frame at `(file_id, frame_offset)`: its whole
    /// extent. Damage is reported with the file and the frame's offset.
    pub fn read_extent(&self, file_id: u64, frame_offset: u64, frame_len: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_extent_into(file_id, frame_offset, frame_len, &mut out)?;
        Ok(out)
    }

    /// [`Store::read_extent`] into `out`, reusing its memory; the frame itself is read into
    /// a buffer kept per thread, so a reader that decodes extent after extent allocates
    /// (and page-faults in) nothing new.
    pub fn read_extent_into(
        &self,
        file_id: u64,
        frame_offset: u64,
        frame_len: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        thread_local! {
            static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        FRAME.with(|frame| {
            let mut frame = frame.borrow_mut();
            let n = frame_len as usize;
            if frame.len() < n {
                frame.resize(n, 0); // grown only: shrinking and regrowing would zero again
            }
            let r = self.read_frame_into(file_id, frame_offset, &mut frame[..n], out);
            if frame.capacity() > FRAME_KEEP_BYTES {
                *frame = Vec::new(); // a rare huge frame: do not hold its memory
            }
            r
        })
    }

    /// Read `buf.len()` bytes of the frame at `frame_offset` into `buf` and verify it
    /// (header, kind, checksum); returns its header. The body is
    /// `buf[FRAME_HEADER_BYTES..frame_bytes() - 4]`.
    fn read_frame(&self, file_id: u64, frame_offset: u64, buf: &mut [u8]) -> Result<FrameHeader> {
        let frame_len = buf.len();
        let path = self.path(file_id);
        let f = self.file(file_id)?;
        let n = f.read_full_at(buf, frame_offset).at(&path)?;
        let fail = |e: DecodeError| e.at(&path, frame_offset);
        if n < buf.len() {
            return Err(Error::corrupt(
                &path,
                frame_offset,
                format!("extent frame cut short: {n} of {frame_len} bytes present"),
            ));
        }
        let h = FrameHeader::parse(buf, file_id).map_err(fail)?;
        if h.frame_bytes() != buf.len() || h.kind != KIND_DATA {
            return Err(Error::corrupt(
                &path,
                frame_offset,
                "extent frame does not match the index entry that references it",
            ));
        }
        verify_frame(buf, &h, file_id).map_err(fail)?;
        Ok(h)
    }

    fn read_frame_into(
        &self,
        file_id: u64,
        frame_offset: u64,
        buf: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let h = self.read_frame(file_id, frame_offset, buf)?;
        let body = &buf[super::extent::FRAME_HEADER_BYTES..h.frame_bytes() - 4];
        decode_body_into(body, &h, out).map_err(|e| e.at(&self.path(file_id), frame_offset))
    }

    /// Read, verify and decode the extent at `(file_id, frame_offset)` straight into `dst`
    /// when it is exactly `dst.len()` bytes long (a piece that uses its whole extent: no
    /// intermediate buffer, no second copy), returning `true`; an extent of another length
    /// is decoded into `spill` instead and `false` returned.
    pub fn read_extent_fit(
        &self,
        file_id: u64,
        frame_offset: u64,
        frame_len: u32,
        dst: &mut [u8],
        spill: &mut Vec<u8>,
    ) -> Result<bool> {
        thread_local! {
            static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        FRAME.with(|frame| {
            let mut frame = frame.borrow_mut();
            let n = frame_len as usize;
            if frame.len() < n {
                frame.resize(n, 0);
            }
            let r = (|| {
                let h = self.read_frame(file_id, frame_offset, &mut frame[..n])?;
                let body = &frame[super::extent::FRAME_HEADER_BYTES..h.frame_bytes() - 4];
                let fail = |e: DecodeError| e.at(&self.path(file_id), frame_offset);
                if h.len == dst.len() as u64 {
                    decode_body_to_slice(body, &h, dst).map_err(fail)?;
                    Ok(true)
                } else {
                    decode_body_into(body, &h, spill).map_err(fail)?;
                    Ok(false)
                }
            })();
            if frame.capacity() > FRAME_KEEP_BYTES {
                *frame = Vec::new();
            }
            r
        })
    }

    /// Ask the data file to read `[frame_offset, frame_offset + frame_len)` ahead (a hint:
    /// the read that follows finds it in memory).
    pub fn will_need(&self, file_id: u64, frame_offset: u64, frame_len: u32) {
        if let Ok(f) = self.file(file_id) {
            let _ = f.will_need(frame_offset, u64::from(frame_len));
        }
    }

    /// Punch `[start, end)` of a data file.
    pub fn punch(&self, file_id: u64, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let path = self.path(file_id);
        let f = self.file(file_id)?;
        f.punch_hole(start, end - start).at(&path)
    }
}

/// How many live (or pinned) index entries reference each frame.
#[derive(Default)]
pub(crate) struct Refs {
    /// file_id -> frame_offset -> (frame_len, count)
    files: BTreeMap<u64, BTreeMap<u64, (u32, u64)>>,
    /// Frames whose count dropped to zero since the last punch pass: file -> offsets.
    dead: BTreeMap<u64, BTreeSet<u64>>,
}

impl Refs {
    pub fn add(&mut self, entries: &[Entry]) {
        for e in entries {
            if let Loc::Data {
                file_id,
                frame_offset,
                frame_len,
                ..
            } = e.loc
            {
                let slot = self
                    .files
                    .entry(file_id)
                    .or_default()
                    .entry(frame_offset)
                    .or_insert((frame_len, 0));
                slot.1 += 1;
                if let Some(d) = self.dead.get_mut(&file_id) {
                    d.remove(&frame_offset);
                }
            }
        }
    }

    pub fn remove(&mut self, entries: &[Entry]) {
        for e in entries {
            if let Loc::Data {
                file_id,
                frame_offset,
                ..
            } = e.loc
            {
                let Some(frames) = self.files.get_mut(&file_id) else {
                    continue;
                };
                let gone = match frames.get_mut(&frame_offset) {
                    Some(slot) => {
                        slot.1 = slot.1.saturating_sub(1);
                        slot.1 == 0
                    }
                    None => false,
                };
                if gone {
                    frames.remove(&frame_offset);
                    self.dead.entry(file_id).or_default().insert(frame_offset);
                }
                if frames.is_empty() {
                    self.files.remove(&file_id);
                }
            }
        }
    }

    pub fn is_referenced(&self, file_id: u64) -> bool {
        self.files.contains_key(&file_id)
    }

    /// Take the frames that died since the last call, as maximal holes between the live
    /// frames around them: `(file_id, start, end)`, with `limit(file_id)` capping each file
    /// (the open layer's start in the open file). Holes absorb already-punched
    /// neighbours, so unaligned frames still free whole blocks once their neighbours die.
    pub fn take_holes(&mut self, limit: impl Fn(u64) -> Option<u64>) -> Vec<(u64, u64, u64)> {
        let dead = std::mem::take(&mut self.dead);
        let mut holes = BTreeSet::new();
        for (file_id, offsets) in dead {
            let Some(lim) = limit(file_id) else { continue };
            let live = self.files.get(&file_id);
            for off in offsets {
                let start = live
                    .and_then(|m| m.range(..off).next_back())
                    .map_or(DATA_HEADER_BYTES as u64, |(o, (l, _))| o + *l as u64);
                let end = live
                    .and_then(|m| m.range(off..).next())
                    .map_or(lim, |(o, _)| *o)
                    .min(lim);
                if start < end {
                    holes.insert((file_id, start, end));
                }
            }
        }
        holes.into_iter().collect()
    }

    /// Every gap between live frames of a file below `limit`: what a full heal punches.
    pub fn all_gaps(&self, file_id: u64, limit: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cursor = DATA_HEADER_BYTES as u64;
        if let Some(m) = self.files.get(&file_id) {
            for (&off, &(len, _)) in m {
                if off >= limit {
                    break;
                }
                if off > cursor {
                    out.push((cursor, off));
                }
                cursor = cursor.max(off + len as u64);
            }
        }
        if cursor < limit {
            out.push((cursor, limit));
        }
        out
    }
}
