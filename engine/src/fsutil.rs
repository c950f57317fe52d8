//! Small durable-file helpers shared by the stores.

use crate::error::{IoContext, Result};
use crate::vfs::Vfs;
use std::path::Path;

/// Replace `dir/name` with `bytes` atomically: write a temporary file, sync it, rename it
/// over the old one, sync the directory. A crash at any point leaves the old or the new
/// contents, never a mix.
pub fn replace_atomic(vfs: &dyn Vfs, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    if vfs.exists(&tmp) {
        vfs.remove(&tmp).at(&tmp)?;
    }
    let f = vfs.create_new(&tmp).at(&tmp)?;
    f.write_all_at(bytes, 0).at(&tmp)?;
    f.sync_data().at(&tmp)?;
    vfs.rename(&tmp, &dst).at(&dst)?;
    vfs.sync_dir(dir).at(dir)?;
    Ok(())
}

/// Make `len` bytes at `offset` read as zeros, freeing the space where the filesystem can
/// (a punched hole), else writing zeros.
pub fn zero_range(f: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    #[allow(unsafe_code)]
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The ranges of `f` (up to `len`) that may hold data, in order: holes are skipped using
/// SEEK_DATA/SEEK_HOLE; a filesystem without them reports the whole file. Ranges are
/// rounded out to 512-byte sectors.
pub fn data_ranges(f: &std::fs::File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    data_ranges_in(f, 0, len)
}

/// [`data_ranges`] of `[start, len)` only, clipped to it.
pub fn data_ranges_in(f: &std::fs::File, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    data_ranges_upto(f, start, len, usize::MAX)
}

/// [`data_ranges_in`], stopping after `max_ranges` ranges (the caller then knows the file
/// only up to the end of the last one): bounds the cost of a look at a fragmented file.
pub fn data_ranges_upto(
    f: &std::fs::File,
    start: u64,
    len: u64,
    max_ranges: usize,
) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = start;
    while at < len && out.len() < max_ranges {
        #[allow(unsafe_code)]
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(vec![(start, len)]);
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        #[allow(unsafe_code)]
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        let s = (data / 512 * 512).max(start);
        let e = hole.div_ceil(512) * 512;
        out.push((s, e.min(len)));
        at = hole;
    }
    Ok(out)
}

/// Take an exclusive advisory lock (`flock`) on `f` without waiting: `Ok(false)` if another
/// open file holds it. The lock lives as long as this open file does (kill -9 included).
pub fn try_lock_exclusive(f: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        #[allow(unsafe_code)]
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Who holds a `flock` on `f`, as far as the kernel says (`/proc/locks`): "pid N (its
/// command line)". `None` if it cannot tell.
pub fn flock_holder(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = f.metadata().ok()?;
    let want = (libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5996912 0 EOF": pid, then MAJ:MIN:INODE
    // (device numbers in hex).
    let pid = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, id) = (fields.get(1)?, fields.get(4)?, fields.get(5)?);
        let mut parts = id.split(':');
        let major = u32::from_str_radix(parts.next()?, 16).ok()?;
        let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
        let inode = parts.next()?.parse::<u64>().ok()?;
        (*kind == "FLOCK" && (major, minor, inode) == want).then(|| pid.parse::<u32>().ok())?
    })?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut cmd: String = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .replace(char::is_control, " ");
    if cmd.len() > 200 {
        let mut cut = 200;
        while !cmd.is_char_boundary(cut) {
            cut -= 1;
        }
        cmd.truncate(cut);
        cmd.push('…');
    }
    Some(if cmd.is_empty() {
        format!("pid {pid}")
    } else {
        format!("pid {pid} ({cmd})")
    })
}
