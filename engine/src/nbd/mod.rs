//! An NBD server (fixed newstyle, structured replies, `base:allocation` block status) over
//! a small block-device trait. It knows nothing of Standby: the agent and the mount
//! implement [`BlockDevice`] and hand their exports to [`Server`].

mod mem;
pub mod proto;
mod server;
#[cfg(test)]
mod tests;
mod transmit;

pub use mem::MemDisk;
pub use server::{serve_session, Server, ServerConfig};

use std::sync::Arc;

/// A failed device operation, answered to the client with this errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevError {
    pub errno: u32,
    pub message: String,
}

impl DevError {
    pub fn io(message: impl Into<String>) -> Self {
        DevError {
            errno: proto::EIO,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        DevError {
            errno: proto::EINVAL,
            message: message.into(),
        }
    }
    pub fn no_space(message: impl Into<String>) -> Self {
        DevError {
            errno: proto::ENOSPC,
            message: message.into(),
        }
    }
}

impl From<crate::Error> for DevError {
    fn from(e: crate::Error) -> Self {
        let errno = match &e {
            crate::Error::Invalid(_) => proto::EINVAL,
            crate::Error::CacheFull { .. } => proto::ENOSPC,
            _ => proto::EIO,
        };
        DevError {
            errno,
            message: e.to_string(),
        }
    }
}

pub type DevResult<T> = Result<T, DevError>;

/// One run of a block-status reply: `len` bytes, `hole` if unallocated, `zero` if it
/// reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
    pub zero: bool,
}

/// What an export serves. Offsets and lengths are checked against `size()` by the server
/// before any call.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Smallest write the device accepts whole (writes must be multiples of it).
    fn min_block_bytes(&self) -> u32 {
        1
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DevResult<()>;
    /// [`BlockDevice::read`] if it can be answered at once from memory (no I/O, no
    /// decode, no wait on a lock held across I/O); `None` otherwise, `buf` then
    /// unspecified. The connection's request reader answers such reads itself, without
    /// a hop to a worker thread; the rest go to the workers. The default: never.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> Option<DevResult<()>> {
        None
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()>;
    /// [`BlockDevice::write`] of a payload the server hands over: a device that keeps the
    /// bytes after it returns (the agent's pending set) takes the buffer instead of
    /// copying it. The default writes from it and drops it.
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> DevResult<()> {
        self.write(offset, &data, fua)
    }
    fn flush(&self) -> DevResult<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> DevResult<()>;
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DevResult<()>;
    /// Allocation of `[offset, offset+len)`: runs in order, covering at least a prefix of
    /// the range. The default says "all data".
    fn block_status(&self, _offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
}

/// The named exports a server offers.
pub trait Exports: Send + Sync {
    fn names(&self) -> Vec<String>;
    fn get(&self, name: &str) -> Option<Arc<dyn BlockDevice>>;
    /// The export `name` selects and its canonical name: the empty name selects the
    /// default export, the first of [`Exports::names`].
    fn resolve(&self, name: &str) -> Option<(String, Arc<dyn BlockDevice>)> {
        let name = if name.is_empty() {
            self.names().into_iter().next()?
        } else {
            name.to_string()
        };
        let dev = self.get(&name)?;
        Some((name, dev))
    }
}

/// A fixed set of exports.
pub struct ExportList(pub Vec<(String, Arc<dyn BlockDevice>)>);

impl Exports for ExportList {
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }
    fn get(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        // The empty name is the default export: the only one, or the first.
        if name.is_empty() {
            return self.0.first().map(|(_, d)| d.clone());
        }
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
    }
}
