//! One function per command, grouped by area; `run` in `main.rs` dispatches to them. What
//! they share: the vault the command works on, how long it waits for a lock, and the name
//! it holds locks under.

pub(crate) mod agent;
pub(crate) mod disk;
pub(crate) mod failover;
pub(crate) mod group;
pub(crate) mod mount;
pub(crate) mod point;
pub(crate) mod protect;
pub(crate) mod report;
pub(crate) mod roundtrip;
pub(crate) mod setup;

use standby_engine::vault::{LockWait, Vault};
use standby_engine::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

static VAULT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
static WAIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Record the global options (`--vault`, `--wait`) once, before a command runs.
pub(crate) fn set_globals(vault: Option<PathBuf>, wait: Duration) {
    let _ = VAULT.set(vault);
    let _ = WAIT.set(wait);
}

/// Open the vault; a command that finds a lock busy says who holds it, then waits.
pub(crate) fn open_vault(path: &Path, who: &str) -> Result<Vault, Error> {
    let mut v = Vault::open(path, who, LockWait::Until(wait()))?;
    v.on_wait(Box::new(|holder| {
        eprintln!("standby: waiting for the lock, held by {holder}")
    }));
    Ok(v)
}

pub(crate) fn wait() -> Duration {
    WAIT.get().copied().unwrap_or(Duration::from_secs(60))
}

/// The vault this command works on.
pub(crate) fn vault() -> Result<PathBuf, Error> {
    // Read here rather than by clap, which refuses a set-but-empty variable as a missing
    // value of --vault.
    let from_env = || {
        std::env::var_os("STANDBY_VAULT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    VAULT
        .get()
        .cloned()
        .flatten()
        .or_else(from_env)
        .ok_or_else(|| {
            Error::Invalid("no vault given: pass --vault VAULT or set STANDBY_VAULT".into())
        })
}

/// The name a command holds locks under (and the holder others are told about).
pub(crate) fn who(what: &str) -> String {
    format!("standby {what}")
}

/// The VM a command names (its positional is optional where `--group` stands for it).
pub(crate) fn named(vm: &str) -> Result<String, Error> {
    if vm.is_empty() {
        return Err(Error::Invalid(
            "name a VM (or a consistency group with --group G)".into(),
        ));
    }
    Ok(vm.to_string())
}
