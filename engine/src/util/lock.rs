//! The lock file: commands that change a vault, or open a VM's log or replica, hold an
//! exclusive `flock` on `VAULT/lock` (or the VM's, the cache service's, the source
//! journal's `DIR/lock`) for as long as they do. The file records who holds
//! it, so a second command can say whom it is waiting for. The kernel drops the lock when
//! its holder exits, however it exits (kill -9 included).

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

pub const FILE_NAME: &str = "lock";

/// A held vault lock; released on drop.
pub struct VaultLock {
    _file: File,
    /// What else is held with it: an object vault's VM lease (see `objstore::lease`).
    hold: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for VaultLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultLock")
            .field("hold", &self.hold.is_some())
            .finish()
    }
}

impl VaultLock {
    /// Hold `extra` (a lease) for as long as this lock: released with it.
    pub fn with_hold(mut self, extra: Box<dyn std::any::Any + Send + Sync>) -> VaultLock {
        self.hold = Some(extra);
        self
    }
}

/// What to do when another process holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once with [`Error::Locked`].
    Fail,
    /// Wait until the holder releases it.
    Block,
    /// Wait at most this long, then fail with [`Error::Locked`] naming the holder.
    Until(Duration),
}

/// How often a waiter looks again (it takes the lock within this of its release).
const POLL: Duration = Duration::from_millis(20);

fn flock(f: &File, nonblocking: bool) -> std::io::Result<bool> {
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    loop {
        #[allow(unsafe_code)]
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Take the vault lock, recording `who` (e.g. "pid 123: standby process --follow").
pub fn acquire(dir: &Path, who: &str, wait: LockWait) -> Result<VaultLock> {
    let path = dir.join(FILE_NAME);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    if !flock(&f, true).map_err(|e| Error::io(&path, e))? {
        // Polled rather than a blocking flock: the waiter can give up at its deadline, and
        // it takes the lock as soon as it is free, whoever frees it.
        let deadline = match wait {
            LockWait::Fail => return Err(Error::Locked(holder(&mut f))),
            LockWait::Block => None,
            LockWait::Until(d) => Some((Instant::now() + d, d)),
        };
        loop {
            std::thread::sleep(POLL);
            if flock(&f, true).map_err(|e| Error::io(&path, e))? {
                break;
            }
            if let Some((at, d)) = deadline {
                if Instant::now() >= at {
                    return Err(Error::Locked(format!(
                        "{} (gave up after waiting {}; stop it first, or pass a longer --wait)",
                        holder(&mut f),
                        humantime::format_duration(Duration::from_secs(d.as_secs().max(1)))
                    )));
                }
            }
        }
    }
    let note = format!("pid {}: {who}\n", std::process::id());
    f.set_len(0).map_err(|e| Error::io(&path, e))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(&path, e))?;
    f.write_all(note.as_bytes())
        .map_err(|e| Error::io(&path, e))?;
    Ok(VaultLock {
        _file: f,
        hold: None,
    })
}

/// Who holds the lock, as recorded in the lock file.
pub fn holder(f: &mut File) -> String {
    let mut s = String::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.take(512).read_to_string(&mut s);
    let s = s.trim();
    if s.is_empty() {
        "another standby command".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path(), "test one", LockWait::Fail).unwrap();
        match acquire(dir.path(), "test two", LockWait::Fail) {
            Err(Error::Locked(who)) => assert!(who.contains("test one"), "{who}"),
            other => panic!("{other:?}"),
        }
        drop(first);
        acquire(dir.path(), "test two", LockWait::Fail).unwrap();
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _first = acquire(dir.path(), "standby agent web01", LockWait::Fail).unwrap();
        match acquire(
            dir.path(),
            "two",
            LockWait::Until(Duration::from_millis(100)),
        ) {
            Err(Error::Locked(who)) => {
                assert!(who.contains("standby agent web01"), "{who}");
                assert!(who.contains("gave up"), "{who}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_waiter_wakes_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path(), "one", LockWait::Fail).unwrap();
        let d = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || acquire(&d, "two", LockWait::Block).map(drop));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "took a held lock");
        drop(first);
        waiter.join().unwrap().unwrap();
    }
}
