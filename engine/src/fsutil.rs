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
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        #[allow(unsafe_code)]
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(vec![(0, len)]);
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
        let s = data / 512 * 512;
        let e = hole.div_ceil(512) * 512;
        out.push((s, e.min(len)));
        at = hole;
    }
    Ok(out)
}
