//! Standby's storage engine: the change log (cache), and — in later modules — replica
//! disks, recovery points, processing and materialization. Nothing here prints, parses
//! arguments or exits the process; the `standby` tool is a thin face over this crate.

// Nothing in the engine prints or exits (the CLI reports what the engine returns).
#![deny(clippy::print_stdout, clippy::print_stderr, clippy::exit)]

pub mod agent;
mod backoff;
pub mod cache;
pub mod delta;
pub mod error;
pub mod fsutil;
pub mod link;
pub mod mount;
pub mod nbd;
pub mod objstore;
pub mod policy;
pub mod process;
pub mod record;
pub mod replica;
pub mod runtime;
pub mod segment;
pub mod util;
pub mod vault;
pub mod vfs;

pub use error::{Error, Result};

/// Writes and zero ranges are aligned to this many bytes.
pub const SECTOR_BYTES: u64 = 512;

/// Wall-clock time in microseconds since the Unix epoch (0 if the clock is before it):
/// the unit of every `time_us` the engine stores.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
