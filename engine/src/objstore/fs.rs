//! [`ObjFs`]: the engine's [`Vfs`] over an object store, so a vault in a container works
//! with every command unchanged.
//!
//! Which paths are objects: everything under the vault's `vms/` and the files directly in
//! the vault's top (catalog, groups, …). The rest of the vault's (local, per-machine)
//! directory stays on the real filesystem: locks, the link credentials, `sources/`, and
//! failover output (`failover/`, `test-failover/`): disks are materialized on the machine
//! that runs the failover.
//!
//! The object layout (also in docs/format.md):
//!
//! ```text
//! KEY                 a file's first chunk: bytes [0, CHUNK_BYTES); its existence is the
//!                     file's existence
//! KEY@c/NNNNNN        chunk N >= 1: bytes [N*CHUNK_BYTES, (N+1)*CHUNK_BYTES)
//! DIR/.dir            an empty marker: the directory exists
//! ```
//!
//! A file's length: its first chunk's size if that is short of `CHUNK_BYTES` (one GET, no
//! listing: every small file); otherwise one listing of `KEY@c/` finds the rest. Every
//! chunk but the last is full; a missing middle chunk is a hole (zeros). Writes stay in
//! memory ("written", as in the kernel) until `sync_data`, which PUTs each changed chunk
//! whole ("durable"), the first chunk last, so a crash in the middle leaves the old length.
//!
//! Replacing a file (the engine's temp-file-then-rename, `fsutil::replace_atomic`) is one
//! conditional PUT of the destination: `If-None-Match: *` when it was seen absent,
//! `If-Match: ETAG` of the version this process last read, so a crash leaves the old or
//! the new object (a PUT is atomic) and two writers never lose an update (the second gets a
//! conflict error and nothing is overwritten). A temporary file (`*.tmp`) is not uploaded
//! by its own sync: its rename uploads it, once. Renaming a multi-chunk file or a directory
//! is copy-then-delete (the engine only does that to failover output, which it removes
//! first and writes its manifest into last).

use super::{Cond, Meta, Store, StoreError, Version};
use crate::vfs::{RealFs, VFile, Vfs};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Weak};

/// Size of one chunk object of a file (a few large PUTs; ranged GETs read parts of them).
pub const CHUNK_BYTES: u64 = 8 << 20;
/// Name of a directory's marker object.
const DIR_MARKER: &str = ".dir";
/// Suffix of the pseudo-directory holding a file's chunks after the first.
const CHUNKS_SUFFIX: &str = "@c";
/// Reads at least this long of a chunk not in memory go straight to ranged GETs (several
/// in flight) instead of loading the chunk.
const DIRECT_READ_BYTES: usize = 1 << 20;
/// Clean chunks a file keeps in memory (the bounded read cache, per open file).
const CLEAN_CHUNKS_KEPT: usize = 4;
/// Dirty bytes of one file past which full chunks are written back before the sync.
const WRITEBACK_BYTES: usize = 64 << 20;
/// Files kept in the registry before clean, unused ones are dropped.
const REGISTRY_KEPT: usize = 256;

/// The chunk-0 version this process last saw of a key (for conditional replaces).
#[derive(Debug, Clone)]
enum Seen {
    Absent,
    At(Version),
}

struct Inner {
    store: Store,
    root: PathBuf,
    files: Mutex<HashMap<String, Arc<ObjFile>>>,
    seen: Mutex<HashMap<String, Seen>>,
    dirs: Mutex<HashSet<String>>,
    /// VM directories (keys) whose lease was lost: writes under them are refused.
    fenced: Mutex<HashSet<String>>,
}

/// The engine's filesystem over one store. Cheap to clone; one per store per process
/// (see `objstore::resolve`), so every vault opened on it shares what was written.
#[derive(Clone)]
pub struct ObjFs {
    inner: Arc<Inner>,
}

/// What the store holds of a file.
#[derive(Debug, Clone, Default)]
struct Stored {
    len: u64,
    /// Chunk index -> object size.
    chunks: BTreeMap<u64, u64>,
    /// The first chunk's version, as last seen: another writer's change shows in it.
    v0: Option<Version>,
}

#[derive(Default)]
struct Chunk {
    data: Vec<u8>,
    dirty: bool,
}

#[derive(Default)]
struct FileData {
    len: u64,
    /// None: created here and not in the store yet.
    stored: Option<Stored>,
    chunks: BTreeMap<u64, Chunk>,
    /// Clean chunks in memory, oldest use first.
    lru: Vec<u64>,
    /// A `*.tmp` whose sync was deferred to its rename.
    deferred: bool,
    removed: bool,
    /// Created here: stale chunks of an earlier file of the same name are still to clear.
    fresh: bool,
}

struct ObjFile {
    key: Mutex<String>,
    fs: Weak<Inner>,
    d: Mutex<FileData>,
}

fn span(i: u64, len: u64) -> usize {
    len.saturating_sub(i * CHUNK_BYTES).min(CHUNK_BYTES) as usize
}

fn chunk_key(key: &str, i: u64) -> String {
    if i == 0 {
        key.to_string()
    } else {
        format!("{key}{CHUNKS_SUFFIX}/{i:06}")
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "the file was removed")
}

impl Inner {
    fn io(&self, key: &str, e: StoreError) -> io::Error {
        e.into_io(&self.store.name(key))
    }

    fn note(&self, key: &str, s: Seen) {
        self.seen.lock().insert(key.to_string(), s);
    }

    fn check_fence(&self, key: &str) -> io::Result<()> {
        let fenced = self.fenced.lock();
        if fenced.iter().any(|d| key.starts_with(&format!("{d}/"))) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: this process lost the VM's lease to another processor; it writes no more",
                    self.store.name(key)
                ),
            ));
        }
        Ok(())
    }

    /// What the store holds of `key` (None: no such file), with chunk 0's bytes if fetched.
    fn stat(&self, key: &str, fetch: bool) -> io::Result<Option<(Stored, Option<Vec<u8>>)>> {
        let (first, meta): (Option<Vec<u8>>, Meta) = if fetch {
            match self.store.get(key) {
                Ok((b, m)) => (Some(b), m),
                Err(StoreError::NotFound) => {
                    self.note(key, Seen::Absent);
                    return Ok(None);
                }
                Err(e) => return Err(self.io(key, e)),
            }
        } else {
            match self.store.head(key) {
                Ok(m) => (None, m),
                Err(StoreError::NotFound) => {
                    self.note(key, Seen::Absent);
                    return Ok(None);
                }
                Err(e) => return Err(self.io(key, e)),
            }
        };
        self.note(key, Seen::At(meta.version.clone()));
        let mut st = Stored {
            len: meta.size,
            chunks: BTreeMap::from([(0, meta.size)]),
            v0: Some(meta.version.clone()),
        };
        if meta.size >= CHUNK_BYTES {
            let dir = format!("{key}{CHUNKS_SUFFIX}");
            let listing = match self.store.list(&dir) {
                Ok(l) => l,
                Err(StoreError::NotFound) => Default::default(),
                Err(e) => return Err(self.io(&dir, e)),
            };
            for (name, size) in listing.objects {
                if let Ok(i) = name.parse::<u64>() {
                    if i > 0 {
                        st.chunks.insert(i, size);
                        st.len = st.len.max(i * CHUNK_BYTES + size);
                    }
                }
            }
        }
        Ok(Some((st, first)))
    }

    fn delete_chunks(&self, key: &str, stored: &Stored) -> io::Result<()> {
        // The first chunk first: the file is gone at once; leftovers are cleared by the
        // next file of the name (see `FileData::fresh`).
        self.store.delete(key).map_err(|e| self.io(key, e))?;
        for &i in stored.chunks.keys().rev().filter(|&&i| i > 0) {
            let k = chunk_key(key, i);
            self.store.delete(&k).map_err(|e| self.io(&k, e))?;
        }
        Ok(())
    }
}

impl ObjFile {
    fn inner(&self) -> io::Result<Arc<Inner>> {
        self.fs
            .upgrade()
            .ok_or_else(|| io::Error::other("the object store was closed"))
    }

    fn key(&self) -> String {
        self.key.lock().clone()
    }

    /// Bytes of chunk `i` as the store holds them (zeros for a hole or past the end).
    fn fetch_chunk(inner: &Inner, key: &str, d: &FileData, i: u64) -> io::Result<Vec<u8>> {
        let Some(st) = &d.stored else {
            return Ok(Vec::new());
        };
        if !st.chunks.contains_key(&i) {
            return Ok(Vec::new());
        }
        let k = chunk_key(key, i);
        match inner.store.get(&k) {
            Ok((b, m)) => {
                if i == 0 {
                    inner.note(key, Seen::At(m.version));
                }
                Ok(b)
            }
            Err(StoreError::NotFound) => Ok(Vec::new()),
            Err(e) => Err(inner.io(&k, e)),
        }
    }

    fn touch(d: &mut FileData, i: u64) {
        d.lru.retain(|&x| x != i);
        d.lru.push(i);
        while d.lru.len() > CLEAN_CHUNKS_KEPT {
            let old = d.lru.remove(0);
            if d.chunks.get(&old).is_some_and(|c| !c.dirty) {
                d.chunks.remove(&old);
            }
        }
    }

    /// Look at the store again (another process may have grown the file), keeping what is
    /// dirty here.
    fn refresh(&self, inner: &Inner, d: &mut FileData) -> io::Result<()> {
        if d.stored.is_none() || d.chunks.values().any(|c| c.dirty) {
            return Ok(());
        }
        let key = self.key();
        match inner.stat(&key, false)? {
            Some((st, _)) => {
                let same = d
                    .stored
                    .as_ref()
                    .is_some_and(|o| o.v0 == st.v0 && o.len == st.len);
                if !same || st.len != d.len {
                    d.chunks.clear();
                    d.lru.clear();
                }
                d.len = st.len;
                d.stored = Some(st);
            }
            None => {
                d.removed = true;
            }
        }
        Ok(())
    }

    /// Upload what changed. `all` false: only full chunks before the last (write-back).
    fn flush(&self, inner: &Inner, d: &mut FileData, all: bool) -> io::Result<()> {
        if d.removed {
            return Err(gone());
        }
        let key = self.key();
        inner.check_fence(&key)?;
        let last = if d.len == 0 {
            0
        } else {
            (d.len - 1) / CHUNK_BYTES
        };
        let stored = d.stored.clone().unwrap_or_default();
        let mut put: Vec<u64> = d
            .chunks
            .iter()
            .filter(|(&i, c)| c.dirty && i <= last)
            .map(|(&i, _)| i)
            .filter(|&i| all || (i < last && span(i, d.len) == CHUNK_BYTES as usize))
            .collect();
        if all {
            let want_len = |i: u64| span(i, d.len) as u64;
            if d.stored.is_none() || !stored.chunks.contains_key(&0) {
                put.push(0);
            }
            // The last chunk keeps the length; a chunk that was the last must become full.
            for (&i, &size) in stored.chunks.range(..=last) {
                if size != want_len(i) {
                    put.push(i);
                }
            }
            if stored.chunks.get(&last) != Some(&want_len(last)) {
                put.push(last);
            }
        }
        put.sort_unstable();
        put.dedup();
        // Chunks an earlier file of this name left behind would read as this one's.
        if d.fresh && all && (last > 0 || put.iter().any(|&i| i > 0)) {
            let dir = format!("{key}{CHUNKS_SUFFIX}");
            match inner.store.list(&dir) {
                Ok(l) => {
                    for (name, _) in l.objects {
                        let k = format!("{dir}/{name}");
                        inner.store.delete(&k).map_err(|e| inner.io(&k, e))?;
                    }
                }
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(inner.io(&dir, e)),
            }
            d.fresh = false;
        }
        let mut bodies: Vec<(u64, Vec<u8>)> = Vec::with_capacity(put.len());
        for &i in &put {
            let want = span(i, d.len);
            let mut data = match d.chunks.get(&i) {
                Some(c) => c.data.clone(),
                None => Self::fetch_chunk(inner, &key, d, i)?,
            };
            data.resize(want, 0);
            bodies.push((i, data));
        }
        let (first, rest): (Vec<_>, Vec<_>) = bodies.into_iter().partition(|(i, _)| *i == 0);
        let sizes: Vec<(u64, u64)> = rest
            .iter()
            .chain(first.iter())
            .map(|(i, b)| (*i, b.len() as u64))
            .collect();
        if !rest.is_empty() {
            inner
                .store
                .put_many(
                    rest.into_iter()
                        .map(|(i, b)| (chunk_key(&key, i), b))
                        .collect(),
                )
                .map_err(|e| inner.io(&key, e))?;
        }
        let mut st = stored;
        for (_, b) in first {
            let v = inner
                .store
                .put(&key, b, &Cond::Any)
                .map_err(|e| inner.io(&key, e))?;
            st.v0 = Some(v.clone());
            inner.note(&key, Seen::At(v));
        }
        for (i, size) in sizes {
            st.chunks.insert(i, size);
        }
        if all {
            // Truncated away: the highest first, so a crash leaves a longer file, not a hole.
            let beyond: Vec<u64> = st.chunks.range(last + 1..).map(|(&i, _)| i).collect();
            for &i in beyond.iter().rev() {
                if i > 0 {
                    let k = chunk_key(&key, i);
                    inner.store.delete(&k).map_err(|e| inner.io(&k, e))?;
                }
                st.chunks.remove(&i);
            }
            st.len = d.len;
        } else {
            st.len = st.len.max(
                st.chunks
                    .iter()
                    .map(|(&i, &s)| i * CHUNK_BYTES + s)
                    .max()
                    .unwrap_or(0),
            );
        }
        for &i in &put {
            if let Some(c) = d.chunks.get_mut(&i) {
                c.dirty = false;
            }
        }
        d.stored = Some(st);
        Ok(())
    }
}

impl VFile for ObjFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let inner = self.inner()?;
        let key = self.key();
        let mut direct: Vec<(String, std::ops::Range<u64>, usize)> = Vec::new();
        let n = {
            let mut d = self.d.lock();
            if d.removed {
                return Err(gone());
            }
            if offset >= d.len {
                self.refresh(&inner, &mut d)?;
            }
            if offset >= d.len {
                return Ok(0);
            }
            let n = ((d.len - offset) as usize).min(buf.len());
            let mut at = 0usize;
            while at < n {
                let pos = offset + at as u64;
                let i = pos / CHUNK_BYTES;
                let within = (pos - i * CHUNK_BYTES) as usize;
                let piece = (CHUNK_BYTES as usize - within).min(n - at);
                let out = &mut buf[at..at + piece];
                // A clean chunk shorter than asked for may have grown elsewhere: drop it.
                if d.chunks
                    .get(&i)
                    .is_some_and(|c| !c.dirty && c.data.len() < within + piece)
                {
                    d.chunks.remove(&i);
                }
                let in_store = d.stored.as_ref().is_some_and(|s| s.chunks.contains_key(&i));
                if let Some(c) = d.chunks.get(&i) {
                    let have = c.data.len().saturating_sub(within).min(piece);
                    out[..have].copy_from_slice(&c.data[within..within + have]);
                    out[have..].fill(0);
                    Self::touch(&mut d, i);
                } else if !in_store {
                    out.fill(0);
                } else if piece >= DIRECT_READ_BYTES {
                    let r = within as u64..(within + piece) as u64;
                    direct.push((chunk_key(&key, i), r, at));
                } else {
                    let data = Self::fetch_chunk(&inner, &key, &d, i)?;
                    let have = data.len().saturating_sub(within).min(piece);
                    out[..have].copy_from_slice(&data[within..within + have]);
                    out[have..].fill(0);
                    d.chunks.insert(i, Chunk { data, dirty: false });
                    Self::touch(&mut d, i);
                }
                at += piece;
            }
            n
        };
        if !direct.is_empty() {
            let parts: Vec<(String, std::ops::Range<u64>)> = direct
                .iter()
                .map(|(k, r, _)| (k.clone(), r.clone()))
                .collect();
            let got = inner
                .store
                .get_ranges(&parts)
                .map_err(|e| inner.io(&key, e))?;
            for ((_, r, at), bytes) in direct.iter().zip(got) {
                let want = (r.end - r.start) as usize;
                let out = &mut buf[*at..*at + want];
                let have = bytes.len().min(want);
                out[..have].copy_from_slice(&bytes[..have]);
                out[have..].fill(0);
            }
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let inner = self.inner()?;
        let key = self.key();
        inner.check_fence(&key)?;
        let mut d = self.d.lock();
        if d.removed {
            return Err(gone());
        }
        let end = offset + buf.len() as u64;
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let i = pos / CHUNK_BYTES;
            let within = (pos - i * CHUNK_BYTES) as usize;
            let piece = (CHUNK_BYTES as usize - within).min(buf.len() - at);
            if !d.chunks.contains_key(&i) {
                let whole = within == 0 && (piece == CHUNK_BYTES as usize || end >= d.len);
                let data = if whole {
                    Vec::new()
                } else {
                    let mut b = Self::fetch_chunk(&inner, &key, &d, i)?;
                    b.resize(span(i, d.len), 0);
                    b
                };
                d.chunks.insert(i, Chunk { data, dirty: true });
            }
            let c = d.chunks.get_mut(&i).ok_or_else(gone)?;
            if c.data.len() < within + piece {
                c.data.resize(within + piece, 0);
            }
            c.data[within..within + piece].copy_from_slice(&buf[at..at + piece]);
            c.dirty = true;
            d.lru.retain(|&x| x != i);
            at += piece;
        }
        d.len = d.len.max(end);
        let dirty: usize = d
            .chunks
            .values()
            .filter(|c| c.dirty)
            .map(|c| c.data.len())
            .sum();
        if dirty > WRITEBACK_BYTES {
            self.flush(&inner, &mut d, false)?;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let d = self.d.lock();
        if d.removed {
            return Err(gone());
        }
        Ok(d.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let inner = self.inner()?;
        let key = self.key();
        inner.check_fence(&key)?;
        let mut d = self.d.lock();
        if d.removed {
            return Err(gone());
        }
        if len < d.len {
            let last = if len == 0 { 0 } else { (len - 1) / CHUNK_BYTES };
            d.chunks.retain(|&i, _| i <= last);
            d.lru.retain(|&i| i <= last);
            if !d.chunks.contains_key(&last) {
                let data = Self::fetch_chunk(&inner, &key, &d, last)?;
                d.chunks.insert(last, Chunk { data, dirty: true });
            }
            let want = span(last, len);
            if let Some(c) = d.chunks.get_mut(&last) {
                c.data.resize(want.min(c.data.len()), 0);
                c.dirty = true;
            }
        }
        d.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let inner = self.inner()?;
        let mut d = self.d.lock();
        if d.stored.is_none() && self.key().ends_with(".tmp") {
            // Uploaded by its rename (one PUT instead of two and a delete).
            d.deferred = true;
            return Ok(());
        }
        self.flush(&inner, &mut d, true)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let inner = self.inner()?;
        let key = self.key();
        let size = self.len()?;
        let end = offset.saturating_add(len).min(size);
        let mut at = offset;
        while at < end {
            let i = at / CHUNK_BYTES;
            let c_end = ((i + 1) * CHUNK_BYTES).min(end);
            let whole = at == i * CHUNK_BYTES && c_end == (i + 1) * CHUNK_BYTES;
            let last = (size - 1) / CHUNK_BYTES;
            if whole && i > 0 && i < last {
                // A missing middle chunk reads as zeros: give the object back.
                inner.check_fence(&key)?;
                let mut d = self.d.lock();
                let k = chunk_key(&key, i);
                inner.store.delete(&k).map_err(|e| inner.io(&k, e))?;
                d.chunks.remove(&i);
                if let Some(st) = d.stored.as_mut() {
                    st.chunks.remove(&i);
                }
            } else {
                let zeros = vec![0u8; (c_end - at) as usize];
                self.write_all_at(&zeros, at)?;
            }
            at = c_end;
        }
        Ok(())
    }
}

impl ObjFs {
    /// The filesystem of `store`, for a vault whose local directory is `root`.
    pub fn new(store: Store, root: PathBuf) -> ObjFs {
        ObjFs {
            inner: Arc::new(Inner {
                store,
                root,
                files: Mutex::new(HashMap::new()),
                seen: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashSet::new()),
                fenced: Mutex::new(HashSet::new()),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The object key of `path`, or None if it stays on the real filesystem.
    pub fn key_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.inner.root).ok()?;
        let parts: Vec<&str> = rel
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        match parts.as_slice() {
            [] => Some(String::new()),
            ["vms", ..] => Some(parts.join("/")),
            [name] if is_top_file(name) => Some(name.to_string()),
            _ => None,
        }
    }

    /// Refuse further writes under `dir` (a VM's directory whose lease was lost).
    pub fn fence(&self, dir: &Path) {
        if let Some(k) = self.key_of(dir) {
            self.inner.fenced.lock().insert(k);
        }
    }

    /// Lift [`ObjFs::fence`] (the lease was taken again).
    pub fn unfence(&self, dir: &Path) {
        if let Some(k) = self.key_of(dir) {
            self.inner.fenced.lock().remove(&k);
        }
    }

    fn register(&self, key: &str, d: FileData) -> Arc<ObjFile> {
        let f = Arc::new(ObjFile {
            key: Mutex::new(key.to_string()),
            fs: Arc::downgrade(&self.inner),
            d: Mutex::new(d),
        });
        let mut files = self.inner.files.lock();
        if files.len() > REGISTRY_KEPT {
            files.retain(|_, f| {
                Arc::strong_count(f) > 1 || {
                    let d = f.d.lock();
                    d.stored.is_none() || d.deferred || d.chunks.values().any(|c| c.dirty)
                }
            });
        }
        files.insert(key.to_string(), f.clone());
        f
    }

    fn live(&self, key: &str) -> Option<Arc<ObjFile>> {
        let files = self.inner.files.lock();
        files.get(key).filter(|f| !f.d.lock().removed).cloned()
    }

    fn ensure_dir(&self, key: &str) -> io::Result<()> {
        if self.inner.dirs.lock().contains(key) {
            return Ok(());
        }
        let marker = marker_key(key);
        self.inner
            .store
            .put(&marker, Vec::new(), &Cond::Any)
            .map_err(|e| self.inner.io(&marker, e))?;
        self.inner.dirs.lock().insert(key.to_string());
        Ok(())
    }

    /// Whether `path` is there, telling an absent object from a store that did not answer
    /// (which [`Vfs::exists`] cannot: it says false to both).
    pub fn try_exists(&self, path: &Path) -> io::Result<bool> {
        let Some(key) = self.key_of(path) else {
            return Ok(RealFs.exists(path));
        };
        if key.is_empty() {
            return self.dir_exists(&key);
        }
        if self.live(&key).is_some() {
            return Ok(true);
        }
        if key.ends_with(".tmp") {
            // Never uploaded (its rename uploads it): no request needed.
            return Ok(false);
        }
        if self.inner.dirs.lock().contains(&key) {
            return Ok(true);
        }
        match self.inner.store.head(&key) {
            Ok(m) => {
                self.inner.note(&key, Seen::At(m.version));
                Ok(true)
            }
            Err(StoreError::NotFound) => {
                self.inner.note(&key, Seen::Absent);
                self.dir_exists(&key)
            }
            Err(e) => Err(self.inner.io(&key, e)),
        }
    }

    fn dir_exists(&self, key: &str) -> io::Result<bool> {
        if self.inner.dirs.lock().contains(key) {
            return Ok(true);
        }
        let marker = marker_key(key);
        match self.inner.store.head(&marker) {
            Ok(_) => {
                self.inner.dirs.lock().insert(key.to_string());
                Ok(true)
            }
            Err(StoreError::NotFound) => Ok(false),
            Err(e) => Err(self.inner.io(&marker, e)),
        }
    }

    /// The file at `key`, from the registry (refreshed) or the store; None if absent.
    fn lookup(&self, key: &str) -> io::Result<Option<Arc<ObjFile>>> {
        if let Some(f) = self.live(key) {
            {
                let mut d = f.d.lock();
                f.refresh(&self.inner, &mut d)?;
                if d.removed {
                    return Ok(None);
                }
            }
            return Ok(Some(f));
        }
        let Some((st, first)) = self.inner.stat(key, true)? else {
            return Ok(None);
        };
        let mut d = FileData {
            len: st.len,
            stored: Some(st),
            ..Default::default()
        };
        if let Some(b) = first {
            d.chunks.insert(
                0,
                Chunk {
                    data: b,
                    dirty: false,
                },
            );
            d.lru.push(0);
        }
        Ok(Some(self.register(key, d)))
    }
}

/// Files at the vault's top that stay local (per machine).
fn is_local_name(name: &str) -> bool {
    name == crate::util::lock::FILE_NAME
        || name.starts_with(crate::vault::WANTED_FILE)
        || name == super::STORE_URL_FILE
}

/// Files at the vault's top that are the vault's shared state (and their temporaries).
fn is_top_file(name: &str) -> bool {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    base == crate::vault::catalog::FILE_NAME || base == crate::vault::group::FILE_NAME
}

fn marker_key(dir: &str) -> String {
    if dir.is_empty() {
        DIR_MARKER.to_string()
    } else {
        format!("{dir}/{DIR_MARKER}")
    }
}

fn already_exists(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::AlreadyExists, format!("{what}: file exists"))
}

impl Vfs for ObjFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let Some(key) = self.key_of(dir) else {
            return RealFs.create_dir_all(dir);
        };
        // The local directory too: locks and sockets of the VM live there.
        std::fs::create_dir_all(dir)?;
        let mut k = key.as_str();
        let mut chain = vec![k.to_string()];
        while let Some((p, _)) = k.rsplit_once('/') {
            chain.push(p.to_string());
            k = p;
        }
        if !key.is_empty() {
            chain.push(String::new());
        }
        for d in chain.iter().rev() {
            self.ensure_dir(d)?;
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let Some(key) = self.key_of(dir) else {
            return RealFs.list(dir);
        };
        let l = match self.inner.store.list(&key) {
            Ok(l) => l,
            Err(StoreError::NotFound) => Default::default(),
            Err(e) => return Err(self.inner.io(&key, e)),
        };
        let mut marker = false;
        let mut names: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for (n, _) in l.objects {
            if n == DIR_MARKER {
                marker = true;
            } else {
                names.insert(n);
            }
        }
        for p in l.prefixes {
            if let Some(file) = p.strip_suffix(super::GENERATIONS_SUFFIX) {
                names.insert(file.to_string());
            } else if !p.ends_with(CHUNKS_SUFFIX) {
                names.insert(p);
            }
        }
        let prefix = if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        };
        for (k, f) in self.inner.files.lock().iter() {
            if let Some(rest) = k.strip_prefix(&prefix) {
                if !rest.contains('/') {
                    let d = f.d.lock();
                    if d.removed {
                        names.remove(rest);
                    } else if d.stored.is_none() {
                        names.insert(rest.to_string());
                    }
                }
            }
        }
        // Local-only entries of the vault's directory are not part of the store.
        names.retain(|n| !is_local_name(n));
        if names.is_empty() && !marker && !self.dir_exists(&key)? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such directory", self.inner.store.name(&key)),
            ));
        }
        Ok(names.into_iter().collect())
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        let Some(key) = self.key_of(path) else {
            return RealFs.create_new(path);
        };
        self.inner.check_fence(&key)?;
        if self.exists(path) {
            return Err(already_exists(&self.inner.store.name(&key)));
        }
        let f = self.register(
            &key,
            FileData {
                fresh: true,
                ..Default::default()
            },
        );
        Ok(f)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        let Some(key) = self.key_of(path) else {
            return RealFs.open(path);
        };
        match self.lookup(&key)? {
            Some(f) => Ok(f),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such file", self.inner.store.name(&key)),
            )),
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let Some(key) = self.key_of(path) else {
            return RealFs.remove(path);
        };
        self.inner.check_fence(&key)?;
        let f = self.live(&key);
        let stored = match &f {
            Some(f) => {
                let mut d = f.d.lock();
                d.removed = true;
                d.chunks.clear();
                d.stored.take()
            }
            None => self.inner.stat(&key, false)?.map(|(st, _)| st),
        };
        self.inner.files.lock().remove(&key);
        match stored {
            Some(st) => self.inner.delete_chunks(&key, &st)?,
            None if f.is_none() => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such file", self.inner.store.name(&key)),
                ))
            }
            None => {}
        }
        self.inner.note(&key, Seen::Absent);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (Some(fk), Some(tk)) = (self.key_of(from), self.key_of(to)) else {
            return RealFs.rename(from, to);
        };
        self.inner.check_fence(&tk)?;
        let src = self.lookup(&fk)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such file", self.inner.store.name(&fk)),
            )
        })?;
        let inner = &self.inner;
        let old_dst = self.live(&tk);
        let mut d = src.d.lock();
        if d.len <= CHUNK_BYTES {
            // One object: one conditional PUT replaces the destination atomically.
            let mut data = match d.chunks.get(&0) {
                Some(c) => c.data.clone(),
                None => ObjFile::fetch_chunk(inner, &fk, &d, 0)?,
            };
            data.resize(d.len as usize, 0);
            let cond = match inner.seen.lock().get(&tk) {
                Some(Seen::Absent) => Cond::Absent,
                Some(Seen::At(v)) => Cond::Is(v.clone()),
                None => Cond::Any,
            };
            let v = match inner.store.put_versioned(&tk, data.clone(), &cond) {
                Ok(v) => v,
                Err(e) => {
                    inner.seen.lock().remove(&tk);
                    return Err(inner.io(&tk, e));
                }
            };
            inner.note(&tk, Seen::At(v.clone()));
            // A destination that was larger loses its other chunks.
            if let Some(o) = &old_dst {
                if let Some(st) = o.d.lock().stored.clone() {
                    for &i in st.chunks.keys().filter(|&&i| i > 0) {
                        let k = chunk_key(&tk, i);
                        inner.store.delete(&k).map_err(|e| inner.io(&k, e))?;
                    }
                }
            }
            if let Some(st) = d.stored.take() {
                inner.delete_chunks(&fk, &st)?;
            }
            d.chunks.clear();
            d.lru.clear();
            d.chunks.insert(0, Chunk { data, dirty: false });
            d.stored = Some(Stored {
                len: d.len,
                chunks: BTreeMap::from([(0, d.len)]),
                v0: Some(v),
            });
        } else {
            // Several chunks: upload what is pending, copy each chunk, then delete the source.
            src.flush(inner, &mut d, true)?;
            let st = d.stored.clone().unwrap_or_default();
            if let Some(o) = &old_dst {
                if let Some(ost) = o.d.lock().stored.clone() {
                    inner.delete_chunks(&tk, &ost)?;
                }
            }
            for &i in st.chunks.keys().rev() {
                let (a, b) = (chunk_key(&fk, i), chunk_key(&tk, i));
                inner.store.copy(&a, &b).map_err(|e| inner.io(&a, e))?;
            }
            inner.delete_chunks(&fk, &st)?;
            inner.seen.lock().remove(&tk);
        }
        d.deferred = false;
        d.fresh = false;
        drop(d);
        inner.note(&fk, Seen::Absent);
        if let Some(o) = old_dst {
            o.d.lock().removed = true;
        }
        *src.key.lock() = tk.clone();
        let mut files = inner.files.lock();
        files.remove(&fk);
        files.insert(tk, src);
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.try_exists(path).unwrap_or(false)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let Some(key) = self.key_of(dir) else {
            return RealFs.sync_dir(dir);
        };
        let prefix = if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        };
        let pending: Vec<Arc<ObjFile>> = self
            .inner
            .files
            .lock()
            .iter()
            .filter(|(k, _)| k.strip_prefix(&prefix).is_some_and(|r| !r.contains('/')))
            .map(|(_, f)| f.clone())
            .collect();
        for f in pending {
            let mut d = f.d.lock();
            if d.stored.is_none() && !d.deferred && !d.removed {
                f.flush(&self.inner, &mut d, true)?;
            }
        }
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let Some(key) = self.key_of(dir) else {
            return RealFs.remove_dir_all(dir);
        };
        self.inner.check_fence(&key)?;
        let prefix = if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        };
        {
            let mut files = self.inner.files.lock();
            files.retain(|k, f| {
                if k.starts_with(&prefix) {
                    f.d.lock().removed = true;
                    false
                } else {
                    true
                }
            });
        }
        self.inner
            .dirs
            .lock()
            .retain(|d| d != &key && !d.starts_with(&prefix));
        let all = match self.inner.store.list_all(&key) {
            Ok(v) => v,
            Err(StoreError::NotFound) => Vec::new(),
            Err(e) => return Err(self.inner.io(&key, e)),
        };
        // The marker last: a crash in the middle leaves a directory that is still there.
        let (markers, files): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(k, _)| k.ends_with(DIR_MARKER));
        for (k, _) in files.iter().chain(markers.iter()) {
            self.inner
                .store
                .delete(k)
                .map_err(|e| self.inner.io(k, e))?;
        }
        self.inner
            .seen
            .lock()
            .retain(|k, _| !k.starts_with(&prefix));
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn rename_dir(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (Some(fk), Some(tk)) = (self.key_of(from), self.key_of(to)) else {
            return RealFs.rename_dir(from, to);
        };
        self.inner.check_fence(&tk)?;
        // Upload what is pending under `from` first.
        self.sync_dir(from)?;
        if let Ok(names) = self.list(to) {
            if !names.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::DirectoryNotEmpty,
                    format!("{}: directory not empty", self.inner.store.name(&tk)),
                ));
            }
        }
        let all = self
            .inner
            .store
            .list_all(&fk)
            .map_err(|e| self.inner.io(&fk, e))?;
        if all.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such directory", self.inner.store.name(&fk)),
            ));
        }
        for (k, _) in &all {
            let rest = k.strip_prefix(&fk).unwrap_or(k);
            let dst = format!("{tk}{rest}");
            self.inner
                .store
                .copy(k, &dst)
                .map_err(|e| self.inner.io(k, e))?;
        }
        for (k, _) in &all {
            self.inner
                .store
                .delete(k)
                .map_err(|e| self.inner.io(k, e))?;
        }
        let fprefix = format!("{fk}/");
        let mut files = self.inner.files.lock();
        let moved: Vec<String> = files
            .keys()
            .filter(|k| k.starts_with(&fprefix))
            .cloned()
            .collect();
        for k in moved {
            if let Some(f) = files.remove(&k) {
                let nk = format!("{tk}/{}", &k[fprefix.len()..]);
                *f.key.lock() = nk.clone();
                files.insert(nk, f);
            }
        }
        drop(files);
        self.inner
            .dirs
            .lock()
            .retain(|d| d != &fk && !d.starts_with(&fprefix));
        self.inner
            .seen
            .lock()
            .retain(|k, _| !k.starts_with(&fprefix));
        match std::fs::rename(from, to) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                let _ = std::fs::create_dir_all(to);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
