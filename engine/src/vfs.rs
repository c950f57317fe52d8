//! The I/O seam. Every store in the engine reaches files through [`Vfs`], so tests can
//! swap the real filesystem for [`SimFs`], which keeps what was *written* (in the kernel)
//! apart from what is *durable* (synced), and can cut the power at the Nth sync.
//!
//! Invariant of `SimFs`: after [`SimFs::crash`], a file holds exactly its last synced
//! contents (plus, optionally, a prefix of what was written after that sync, as a torn
//! tail), and exists only if its directory entry was synced.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An open file, positioned I/O only (no shared cursor), shareable across threads.
#[allow(clippy::len_without_is_empty)] // a file's length is a size, not a collection's
pub trait VFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync: the file's data (and size) survive a power loss once this returns.
    fn sync_data(&self) -> io::Result<()>;

    /// Start writing `[offset, offset+len)` back to the disk without waiting (a hint, so a
    /// later fdatasync has less to do). It promises nothing about durability.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// The alignment (of offset, length and memory) at which writes bypass the page cache,
    /// for a file from [`Vfs::create_new_direct`]; `None` when none do.
    fn direct_align(&self) -> Option<usize> {
        None
    }

    /// Tell the file `[offset, offset+len)` will be read soon, so it can start reading it
    /// now (a hint; the default does nothing).
    fn will_need(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Give back the space of `[offset, offset+len)`: it reads as zeros afterwards and the
    /// file's length is unchanged. The default writes zeros (correct, frees nothing).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.len()?);
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < end {
            let n = ((end - at) as usize).min(zeros.len());
            self.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Fill `buf` from `offset`; returns how many bytes were read (short only at end of file).
    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A filesystem: the few directory operations the engine needs.
pub trait Vfs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Create a new file, failing if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn VFile>>;
    /// [`Vfs::create_new`] for a file written once, in large pieces, and not read back
    /// soon (a materialized disk): writes of whole aligned blocks from aligned memory may
    /// bypass the page cache (`O_DIRECT`), which saves copying every byte into it; other
    /// writes go through it as usual. [`VFile::direct_align`] tells the alignment. The
    /// default is [`Vfs::create_new`].
    fn create_new_direct(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        self.create_new(path)
    }
    /// Open an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn VFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// fsync the directory so that created, renamed and removed entries survive a power loss.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Remove a directory and everything in it (nothing if it does not exist); durable once
    /// its parent is synced.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Rename a directory (the destination must not exist, or be an empty directory);
    /// durable once the destination's parent is synced.
    fn rename_dir(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealFile(File);

impl VFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let (Ok(off), Ok(l)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(());
        };
        #[allow(unsafe_code)]
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is owned
        // by `self.0` and stays open for the duration of the call.
        let r = unsafe {
            libc::sync_file_range(self.0.as_raw_fd(), off, l, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(());
        };
        #[allow(unsafe_code)]
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is owned by
        // `self.0` and stays open for the duration of the call.
        let rc =
            unsafe { libc::posix_fadvise(self.0.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hole out of range",
            ));
        };
        #[allow(unsafe_code)]
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.0` and stays open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // The filesystem cannot punch holes: keep the contract (zeros), free nothing.
            let end = offset.saturating_add(len).min(self.len()?);
            let zeros = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < end {
                let n = ((end - at) as usize).min(zeros.len());
                self.0.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        Err(err)
    }
}

/// A file from [`RealFs::create_new_direct`]: whole aligned blocks of a write from memory
/// at the same alignment go through the `O_DIRECT` descriptor, the rest (and everything
/// else) through the buffered one. The two never write the same block of the file: a block
/// is written direct only when a write covers all of it.
struct DirectFile {
    buffered: RealFile,
    direct: File,
}

/// Alignment of `O_DIRECT` writes: the page size, which covers every logical block size.
const DIRECT_ALIGN: u64 = 4096;

impl VFile for DirectFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.buffered.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN;
        let end = offset.saturating_add(buf.len() as u64);
        let (mid_start, mid_end) = (offset.div_ceil(a) * a, end / a * a);
        if (buf.as_ptr() as u64) % a != offset % a || mid_end <= mid_start {
            return self.buffered.0.write_all_at(buf, offset);
        }
        let (h, m) = ((mid_start - offset) as usize, (mid_end - offset) as usize);
        self.buffered.0.write_all_at(&buf[..h], offset)?;
        if self.direct.write_all_at(&buf[h..m], mid_start).is_err() {
            // Refused (an alignment this filesystem does not take): the same bytes buffered.
            self.buffered.0.write_all_at(&buf[h..m], mid_start)?;
        }
        self.buffered.0.write_all_at(&buf[m..], mid_end)
    }
    fn len(&self) -> io::Result<u64> {
        self.buffered.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.buffered.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.buffered.start_writeback(offset, len)
    }
    fn direct_align(&self) -> Option<usize> {
        Some(DIRECT_ALIGN as usize)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.buffered.punch_hole(offset, len)
    }
}

impl Vfs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(RealFile(f)))
    }
    fn create_new_direct(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        // A filesystem without O_DIRECT (tmpfs) refuses the flag: every write is buffered.
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(direct) => Ok(Arc::new(DirectFile {
                buffered: RealFile(buffered),
                direct,
            })),
            Err(_) => Ok(Arc::new(RealFile(buffered))),
        }
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile(f)))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    fn rename_dir(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
}

/// Contents of one simulated file.
#[derive(Default)]
struct SimData {
    written: Vec<u8>,
    durable: Vec<u8>,
}

struct SimFile {
    data: Mutex<SimData>,
    /// Weak: the filesystem's directories hold their files, so a strong reference back
    /// would keep every SimFs alive forever (the fuzz targets open one per input). A file
    /// used after its filesystem is gone behaves like an open descriptor: it still works.
    fs: std::sync::Weak<SimInner>,
}

impl SimFile {
    fn check(&self) -> io::Result<()> {
        self.fs.upgrade().map_or(Ok(()), |fs| fs.check())
    }
    fn check_room(&self) -> io::Result<()> {
        self.fs.upgrade().map_or(Ok(()), |fs| fs.check_room())
    }
    fn sync_point(&self) -> io::Result<()> {
        self.fs.upgrade().map_or(Ok(()), |fs| fs.sync_point())
    }
}

#[derive(Default)]
struct SimDir {
    /// name -> file, as the running system sees it.
    live: BTreeMap<String, Arc<SimFile>>,
    /// name -> file, as a power loss would leave it.
    durable: BTreeMap<String, Arc<SimFile>>,
    /// Where a power loss would leave this directory, when that differs from where it is
    /// now: its path before a rename whose parent was not synced yet (see `rename_dir`).
    durable_at: Option<PathBuf>,
}

#[derive(Default)]
struct SimInner {
    dirs: Mutex<BTreeMap<PathBuf, SimDir>>,
    /// Directories removed while their parent was not synced yet: a power loss brings
    /// them back, at these paths.
    removed: Mutex<Vec<(PathBuf, SimDir)>>,
    syncs: AtomicU64,
    /// Fail every sync from this count on (1-based); 0 = never.
    fail_at_sync: AtomicU64,
    /// Set once the power was cut: every later operation fails.
    dead: std::sync::atomic::AtomicBool,
    /// While set, the disk is full: creating a file or growing one fails with ENOSPC
    /// (overwriting bytes a file already has still works, as on a real filesystem).
    full: std::sync::atomic::AtomicBool,
    /// Snapshot of the durable state taken at the moment of the cut.
    snapshot: Mutex<Option<Snapshot>>,
}

/// The files of one directory: name and contents.
type DirFiles = Vec<(String, Vec<u8>)>;

type Snapshot = BTreeMap<PathBuf, BTreeMap<String, (Vec<u8>, Vec<u8>)>>;

/// An in-memory filesystem that can lose power. See the module comment.
#[derive(Clone, Default)]
pub struct SimFs {
    inner: Arc<SimInner>,
}

fn dead() -> io::Error {
    io::Error::other("simulated power loss")
}

impl SimInner {
    fn check(&self) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(dead())
        } else {
            Ok(())
        }
    }

    fn check_room(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(28)) // ENOSPC
        } else {
            Ok(())
        }
    }

    fn take_snapshot(&self) -> Snapshot {
        let dirs = self.dirs.lock();
        let removed = self.removed.lock();
        dirs.iter()
            .map(|(p, d)| (d.durable_at.as_ref().unwrap_or(p), d))
            .chain(removed.iter().map(|(p, d)| (p, d)))
            .map(|(p, d)| {
                let files = d
                    .durable
                    .iter()
                    .map(|(n, f)| {
                        let data = f.data.lock();
                        (n.clone(), (data.durable.clone(), data.written.clone()))
                    })
                    .collect();
                (p.clone(), files)
            })
            .collect()
    }

    /// Count a sync; at the configured count, cut the power instead of syncing.
    fn sync_point(&self) -> io::Result<()> {
        self.check()?;
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        let at = self.fail_at_sync.load(Ordering::SeqCst);
        if at != 0 && n >= at {
            let snap = self.take_snapshot();
            *self.snapshot.lock() = Some(snap);
            self.dead.store(true, Ordering::SeqCst);
            return Err(dead());
        }
        Ok(())
    }
}

impl VFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.check()?;
        let data = self.data.lock();
        let len = data.written.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = ((len - offset) as usize).min(buf.len());
        buf[..n].copy_from_slice(&data.written[offset as usize..offset as usize + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let mut data = self.data.lock();
        let end = offset as usize + buf.len();
        if data.written.len() < end {
            self.check_room()?;
            data.written.resize(end, 0);
        }
        data.written[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.check()?;
        Ok(self.data.lock().written.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        let mut data = self.data.lock();
        if len as usize > data.written.len() {
            self.check_room()?;
        }
        data.written.resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        let mut data = self.data.lock();
        let size = data.written.len() as u64;
        let end = offset.saturating_add(len).min(size);
        if offset < end {
            data.written[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.sync_point()?;
        let mut data = self.data.lock();
        data.durable = data.written.clone();
        Ok(())
    }
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cut the power at the `n`th sync from now on (1-based): that sync and everything
    /// after it fails, and the durable state at that moment is what [`SimFs::crash`] returns.
    pub fn fail_at_sync(&self, n: u64) {
        let done = self.inner.syncs.load(Ordering::SeqCst);
        self.inner.fail_at_sync.store(done + n, Ordering::SeqCst);
    }

    /// How many syncs (file or directory) have happened.
    /// Fill the disk (`true`: creating or growing a file fails with ENOSPC) or free it.
    pub fn set_full(&self, full: bool) {
        self.inner.full.store(full, Ordering::SeqCst);
    }

    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::SeqCst)
    }

    /// A new filesystem holding what a power loss at this moment (or at the cut, if the
    /// power was cut by `fail_at_sync`) leaves behind. `torn_tail` keeps, for each file,
    /// up to that many bytes written past its durable end (a partly persisted tail).
    pub fn crash(&self, torn_tail: usize) -> SimFs {
        let snap = self
            .inner
            .snapshot
            .lock()
            .clone()
            .unwrap_or_else(|| self.inner.take_snapshot());
        SimFs::from_files(snap.into_iter().map(|(path, files)| {
            let files = files
                .into_iter()
                .map(|(name, (durable, written))| {
                    let mut bytes = durable.clone();
                    if written.len() > durable.len() && written.starts_with(&durable) {
                        let extra = (written.len() - durable.len()).min(torn_tail);
                        bytes.extend_from_slice(&written[durable.len()..durable.len() + extra]);
                    }
                    (name, bytes)
                })
                .collect();
            (path, files)
        }))
    }

    /// A new filesystem holding everything written (a crash of the process alone: the
    /// kernel keeps what it was given).
    pub fn process_crash(&self) -> SimFs {
        let files: Vec<(PathBuf, DirFiles)> = self
            .inner
            .dirs
            .lock()
            .iter()
            .map(|(path, d)| {
                let files = d
                    .live
                    .iter()
                    .map(|(n, f)| (n.clone(), f.data.lock().written.clone()))
                    .collect();
                (path.clone(), files)
            })
            .collect();
        SimFs::from_files(files)
    }

    /// A filesystem whose files (per directory) hold these bytes, written and durable.
    fn from_files(dirs: impl IntoIterator<Item = (PathBuf, DirFiles)>) -> SimFs {
        let fresh = SimFs::new();
        {
            let mut out = fresh.inner.dirs.lock();
            for (path, files) in dirs {
                let mut dir = SimDir::default();
                for (name, bytes) in files {
                    let f = Arc::new(SimFile {
                        data: Mutex::new(SimData {
                            written: bytes.clone(),
                            durable: bytes,
                        }),
                        fs: Arc::downgrade(&fresh.inner),
                    });
                    dir.live.insert(name.clone(), f.clone());
                    dir.durable.insert(name, f);
                }
                out.insert(path, dir);
            }
        }
        fresh
    }

    fn split(path: &Path) -> io::Result<(PathBuf, String)> {
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad path"))?
            .to_string();
        Ok((parent, name))
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such file or directory")
}

impl Vfs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.check()?;
        // Directories themselves are treated as durable once created: the engine creates
        // its directories before any data goes in them.
        self.inner.dirs.lock().entry(dir.to_path_buf()).or_default();
        // A directory made where one was removed replaces it, durable as creation is.
        self.inner.removed.lock().retain(|(p, _)| p != dir);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.check()?;
        let dirs = self.inner.dirs.lock();
        let d = dirs.get(dir).ok_or_else(not_found)?;
        Ok(d.live.keys().cloned().collect())
    }
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        self.inner.check()?;
        self.inner.check_room()?;
        let (parent, name) = Self::split(path)?;
        let mut dirs = self.inner.dirs.lock();
        let d = dirs.get_mut(&parent).ok_or_else(not_found)?;
        if d.live.contains_key(&name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
        }
        let f = Arc::new(SimFile {
            data: Mutex::new(SimData::default()),
            fs: Arc::downgrade(&self.inner),
        });
        d.live.insert(name, f.clone());
        Ok(f)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        self.inner.check()?;
        let (parent, name) = Self::split(path)?;
        let dirs = self.inner.dirs.lock();
        let d = dirs.get(&parent).ok_or_else(not_found)?;
        let f = d.live.get(&name).ok_or_else(not_found)?;
        Ok(f.clone())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.check()?;
        let (parent, name) = Self::split(path)?;
        let mut dirs = self.inner.dirs.lock();
        let d = dirs.get_mut(&parent).ok_or_else(not_found)?;
        d.live.remove(&name).ok_or_else(not_found)?;
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.check()?;
        let (pf, nf) = Self::split(from)?;
        let (pt, nt) = Self::split(to)?;
        let mut dirs = self.inner.dirs.lock();
        let f = dirs
            .get_mut(&pf)
            .ok_or_else(not_found)?
            .live
            .remove(&nf)
            .ok_or_else(not_found)?;
        dirs.get_mut(&pt).ok_or_else(not_found)?.live.insert(nt, f);
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        let Ok((parent, name)) = Self::split(path) else {
            return false;
        };
        let dirs = self.inner.dirs.lock();
        dirs.get(&parent)
            .is_some_and(|d| d.live.contains_key(&name))
            || dirs.contains_key(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_point()?;
        let mut dirs = self.inner.dirs.lock();
        let d = dirs.get_mut(dir).ok_or_else(not_found)?;
        d.durable = d.live.clone();
        // Renames and removals of the directories inside it are now durable too.
        for (p, d) in dirs.iter_mut() {
            if p.parent() == Some(dir) {
                d.durable_at = None;
            }
        }
        // Removals of directories in it are durable now, and with each of them everything
        // that was inside it.
        let mut removed = self.inner.removed.lock();
        let gone: Vec<PathBuf> = removed
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, _)| p.clone())
            .collect();
        removed.retain(|(p, _)| !gone.iter().any(|g| p.starts_with(g)));
        Ok(())
    }
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.check()?;
        let mut dirs = self.inner.dirs.lock();
        if !dirs.contains_key(dir) {
            return Ok(());
        }
        let gone: Vec<PathBuf> = dirs
            .keys()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        let mut removed = self.inner.removed.lock();
        for p in gone {
            if let Some(d) = dirs.remove(&p) {
                // Only the top's entry waits for its parent's sync; what is inside goes
                // with it.
                let at = d.durable_at.clone().unwrap_or(p);
                removed.push((at, d));
            }
        }
        Ok(())
    }
    fn rename_dir(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.check()?;
        let mut dirs = self.inner.dirs.lock();
        if dirs.get(to).is_some_and(|d| !d.live.is_empty())
            || dirs.keys().any(|p| p != to && p.starts_with(to))
        {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                "directory not empty",
            ));
        }
        let moving: Vec<PathBuf> = dirs
            .keys()
            .filter(|p| p.starts_with(from))
            .cloned()
            .collect();
        if moving.is_empty() {
            return Err(not_found());
        }
        dirs.remove(to);
        for p in moving {
            if let Some(mut d) = dirs.remove(&p) {
                let rest = p.strip_prefix(from).unwrap_or(Path::new(""));
                if d.durable_at.is_none() {
                    d.durable_at = Some(p.clone());
                }
                dirs.insert(to.join(rest), d);
            }
        }
        Ok(())
    }
}

/// Names present in a simulated directory, for tests.
impl SimFs {
    pub fn names(&self, dir: &Path) -> BTreeSet<String> {
        self.inner
            .dirs
            .lock()
            .get(dir)
            .map(|d| d.live.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_renames_and_removals_are_durable_once_the_parent_is_synced() {
        let fs = SimFs::new();
        for d in ["/p", "/p/old", "/p/tmp"] {
            fs.create_dir_all(Path::new(d)).unwrap();
        }
        for (d, b) in [("/p/old/f", 1u8), ("/p/tmp/f", 2)] {
            let f = fs.create_new(Path::new(d)).unwrap();
            f.write_all_at(&[b], 0).unwrap();
            f.sync_data().unwrap();
        }
        fs.sync_dir(Path::new("/p/old")).unwrap();
        fs.sync_dir(Path::new("/p/tmp")).unwrap();
        fs.remove_dir_all(Path::new("/p/old")).unwrap();
        fs.rename_dir(Path::new("/p/tmp"), Path::new("/p/old"))
            .unwrap();
        let read = |fs: &SimFs, p: &str| {
            let mut b = [0u8; 1];
            fs.open(Path::new(p)).unwrap().read_at(&mut b, 0).unwrap();
            b[0]
        };
        assert_eq!(read(&fs, "/p/old/f"), 2);
        // Not synced yet: a power loss brings back the old directory and the old name.
        let lost = fs.crash(0);
        assert_eq!(read(&lost, "/p/old/f"), 1);
        assert_eq!(read(&lost, "/p/tmp/f"), 2);
        fs.sync_dir(Path::new("/p")).unwrap();
        let kept = fs.crash(0);
        assert_eq!(read(&kept, "/p/old/f"), 2);
        assert!(!kept.exists(Path::new("/p/tmp")));
    }

    #[test]
    fn remove_dir_all_removes_the_tree_and_only_it() {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/v")).unwrap();
        for d in ["/v/a", "/v/a/b", "/v/ab"] {
            fs.create_dir_all(Path::new(d)).unwrap();
            fs.create_new(&Path::new(d).join("f")).unwrap();
        }
        fs.remove_dir_all(Path::new("/v/a")).unwrap();
        assert!(!fs.exists(Path::new("/v/a")) && !fs.exists(Path::new("/v/a/b/f")));
        assert!(
            fs.exists(Path::new("/v/ab/f")),
            "a sibling whose name shares a prefix stays"
        );
        fs.remove_dir_all(Path::new("/v/none")).unwrap();
        fs.sync_dir(Path::new("/v")).unwrap();
        let after = fs.crash(0);
        assert!(!after.exists(Path::new("/v/a/b")));

        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("x/y");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"1").unwrap();
        RealFs.remove_dir_all(&tmp.path().join("x")).unwrap();
        assert!(!tmp.path().join("x").exists());
        RealFs.remove_dir_all(&tmp.path().join("x")).unwrap();
    }

    #[test]
    fn unsynced_data_and_entries_vanish_on_power_loss() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let a = fs.create_new(&dir.join("a")).unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        // The entry of `a` was never synced: a power loss loses the file.
        assert!(fs.crash(0).names(dir).is_empty());
        fs.sync_dir(dir).unwrap();
        a.write_all_at(b" world", 5).unwrap();
        let after = fs.crash(0);
        let mut buf = [0u8; 16];
        let n = after
            .open(&dir.join("a"))
            .unwrap()
            .read_full_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf[..n], b"hello");
        let torn = fs.crash(3);
        let n = torn
            .open(&dir.join("a"))
            .unwrap()
            .read_full_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf[..n], b"hello wo");
    }

    #[test]
    fn cut_at_nth_sync_fails_it_and_freezes_state() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let a = fs.create_new(&dir.join("a")).unwrap();
        fs.sync_dir(dir).unwrap();
        fs.fail_at_sync(2);
        a.write_all_at(b"one", 0).unwrap();
        a.sync_data().unwrap();
        a.write_all_at(b"two", 3).unwrap();
        assert!(a.sync_data().is_err());
        assert!(a.write_all_at(b"x", 0).is_err());
        let after = fs.crash(0);
        let mut buf = [0u8; 16];
        let n = after
            .open(&dir.join("a"))
            .unwrap()
            .read_full_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf[..n], b"one");
    }
}
