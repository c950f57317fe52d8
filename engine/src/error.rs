//! The engine's error type. Corruption carries where it was found (file, offset, what failed)
//! apart from I/O errors, so callers and operators never have to parse message text.

use std::io;
use std::path::PathBuf;

/// Everything the engine can fail with. Clone, so a store can latch a failure and hand
/// every later caller the same typed error (an I/O error's copy keeps its kind and its
/// OS error code, hence its message).
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
    #[error("{0}")]
    Invalid(String),
    /// A previous write or sync failed; the store refuses further writes until reopened.
    /// Carries that failure, typed (a full disk is an [`Error::Io`] whose kind says so,
    /// damage an [`Error::Corrupt`]): see [`Error::latched`].
    #[error("store failed earlier and refuses writes until reopened: {0}")]
    Poisoned(Box<Error>),
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
    Link(LinkError),
    /// A VM's running agent refused a control request. The message is the agent's own
    /// error, already formatted (so it is not prefixed a second time).
    #[error("{0}")]
    Agent(String),
}

/// Why the site-to-site link failed, as a type: callers tell an unreachable peer from a
/// refusal, a protocol breach or a clean close without reading message text. Each variant
/// displays the one line an operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached at all.
    #[error("cannot reach the cache service at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// The peer sent an error message in answer to ours: it refused us.
    #[error("the peer refused: {why}")]
    Refused { why: String },
    /// We refused the peer (and told it why, where the link allowed).
    #[error("{why}")]
    RefusedPeer { why: String },
    /// The two ends' logs do not line up (records lost on one side, or another VM's log):
    /// nothing is shipped; the target must resync or the operator must look.
    #[error("{why}")]
    Diverged { why: String },
    /// The challenge/response proof of the vault's link key failed.
    #[error("wrong link key: {who} does not hold this vault's link key{hint}")]
    WrongKey { who: String, hint: &'static str },
    /// The peer ended the session with an error message.
    #[error("{peer} closed the link: {why}")]
    ClosedBy { peer: &'static str, why: String },
    /// The peer closed the connection between messages, without a word.
    #[error("{peer} closed the link")]
    Closed { peer: &'static str },
    /// The peer closed the connection while a handshake step was awaited.
    #[error("the peer closed the link while we waited for {what}")]
    ClosedWaiting { what: String },
    /// The peer closed the connection inside a message.
    #[error("the peer closed the link mid-message")]
    ClosedMidMessage,
    /// A message that is well formed but not the one this step of the protocol needs.
    #[error("expected {wanted}, got a {got} message")]
    Unexpected {
        wanted: &'static str,
        got: &'static str,
    },
    /// The peer broke the protocol: a malformed message, or one its role may not send.
    #[error("malformed message from the peer: {what}")]
    Protocol { what: String },
    /// The peer does not speak the Standby link protocol at all.
    #[error("the peer does not speak the Standby link protocol (bad magic)")]
    NotStandby,
    /// The peer speaks TLS to our plaintext (an `--insecure-loopback` mismatch).
    #[error("the peer speaks TLS on a plaintext link (drop --insecure-loopback on this side, or add it on the other)")]
    TlsOnPlaintext,
    /// The peer speaks another version of the link protocol.
    #[error("the peer speaks link protocol version {peer}, this build speaks {ours}")]
    Version { peer: u8, ours: u8 },
    /// The peer stopped answering.
    #[error("the peer stopped answering (timed out)")]
    TimedOut,
    /// The connection broke (reset, broken pipe, early end).
    #[error("the link broke ({why})")]
    Broken { why: String },
    /// Another I/O failure on the connection.
    #[error("link I/O failed: {why}")]
    Io { why: String },
    /// TLS failed: credentials, handshake, or the peer's certificate.
    #[error("{0}")]
    Tls(String),
    /// Something this side needs for the link is missing (randomness, a thread).
    #[error("{0}")]
    Local(String),
    /// A link failure another process reported (over the control protocol), as its text.
    #[error("{0}")]
    Remote(String),
}

impl From<LinkError> for Error {
    fn from(e: LinkError) -> Error {
        Error::Link(e)
    }
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

    /// The failure itself: for [`Error::Poisoned`], the error that latched the store (a
    /// poisoned store's refusal says nothing new), else `self`.
    pub fn latched(&self) -> &Error {
        match self {
            Error::Poisoned(e) => e.latched(),
            e => e,
        }
    }

    /// The kind of the operating-system error under this one (through a latch), if it is
    /// one: how a caller tells a full disk (`StorageFull`) from other failures.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self.latched() {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// A refusal of a store that `self` latched (failed earlier): what every later write
    /// or wait on it returns.
    pub fn poisoned(&self) -> Error {
        match self {
            Error::Poisoned(_) => self.clone(),
            e => Error::Poisoned(Box::new(e.clone())),
        }
    }
}

/// A copy of an I/O error with the same kind and message: the OS error code when there
/// is one, else the kind and the text (an `io::Error`'s payload cannot be cloned).
fn copy_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

impl Clone for Error {
    fn clone(&self) -> Error {
        match self {
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: copy_io(source),
            },
            Error::Corrupt { path, offset, what } => Error::Corrupt {
                path: path.clone(),
                offset: *offset,
                what: what.clone(),
            },
            Error::Unsupported { path, what } => Error::Unsupported {
                path: path.clone(),
                what: what.clone(),
            },
            Error::CacheFull {
                used_bytes,
                capacity_bytes,
            } => Error::CacheFull {
                used_bytes: *used_bytes,
                capacity_bytes: *capacity_bytes,
            },
            Error::Invalid(m) => Error::Invalid(m.clone()),
            Error::Poisoned(e) => Error::Poisoned(e.clone()),
            Error::Closed => Error::Closed,
            Error::Locked(m) => Error::Locked(m.clone()),
            Error::Conflict(m) => Error::Conflict(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::Link(e) => Error::Link(e.clone()),
            Error::Agent(m) => Error::Agent(m.clone()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_io_error_keeps_its_kind_code_and_message() {
        let os = Error::io("/v/log", io::Error::from_raw_os_error(28));
        let copy = os.clone();
        assert_eq!(copy.io_kind(), Some(io::ErrorKind::StorageFull));
        assert_eq!(copy.to_string(), os.to_string());
        match &copy {
            Error::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(28)),
            other => panic!("{other:?}"),
        }
        let custom = Error::io("/v/log", io::Error::other("simulated power loss"));
        assert_eq!(custom.clone().io_kind(), Some(io::ErrorKind::Other));
        assert_eq!(custom.clone().to_string(), custom.to_string());
    }

    #[test]
    fn a_latch_keeps_the_failure_typed_and_wraps_it_once() {
        let full = Error::io("/v/log/seg", io::Error::from_raw_os_error(28));
        let refused = full.poisoned();
        assert!(matches!(refused.latched(), Error::Io { .. }));
        assert_eq!(refused.io_kind(), Some(io::ErrorKind::StorageFull));
        match refused.poisoned() {
            Error::Poisoned(inner) => assert!(matches!(*inner, Error::Io { .. })),
            other => panic!("{other:?}"),
        }
        let damaged = Error::corrupt("/v/log/seg", 4096, "bad crc").poisoned();
        assert!(matches!(
            damaged.latched(),
            Error::Corrupt { offset: 4096, .. }
        ));
        assert_eq!(damaged.io_kind(), None);
        // The one line an operator reads is unchanged by the typing.
        assert_eq!(
            damaged.to_string(),
            "store failed earlier and refuses writes until reopened: corruption in /v/log/seg at byte 4096: bad crc"
        );
    }
}
