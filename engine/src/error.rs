//! The engine's error type. Corruption carries where it was found (file, offset, what failed)
//! apart from I/O errors, so callers and operators never have to parse message text.

use std::io;
use std::path::PathBuf;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Bytes on disk failed validation: a bad magic, length check, checksum or field.
    #[error("corruption in {path} at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A file was written by a newer Standby, or needs a feature this build lacks.
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// The change log reached its capacity limit; nothing was appended.
    #[error("cache full: {used_bytes} of {capacity_bytes} bytes used; the processor must catch up (or raise the limit) before more writes are accepted")]
    CacheFull {
        used_bytes: u64,
        capacity_bytes: u64,
    },
    /// A request that can never succeed as given (unaligned write, oversized record, …).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A previous write or sync failed; the store refuses further writes until reopened.
    #[error("store failed earlier and refuses writes until reopened: {0}")]
    Poisoned(String),
    /// The store was closed.
    #[error("store is closed")]
    Closed,
    /// Another process holds a lock of the vault (the vault's or a VM's); names the holder.
    #[error("in use by {0}")]
    Locked(String),
    /// The request conflicts with the current state (a second protect, a failover after
    /// commit, …).
    #[error("{0}")]
    Conflict(String),
    /// A named thing (disk, point, VM, …) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The site-to-site link failed: the peer is unreachable, refused us, was refused (wrong
    /// key, untrusted certificate, plaintext on a TLS port) or broke the protocol.
    #[error("link: {0}")]
    Link(String),
    /// A VM's running agent refused a control request. The message is the agent's own
    /// error, already formatted (so it is not prefixed a second time).
    #[error("{0}")]
    Agent(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(path: impl Into<PathBuf>, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }

    /// True for damage found in stored bytes (as opposed to I/O or usage errors).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }
}

/// Attach a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
