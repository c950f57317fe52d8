//! A vault URL → the vault's local directory and its filesystem.
//!
//! A URL vault still has a local directory on each machine that uses it (the *shadow*):
//! its flocks, control sockets, link credentials and failover output live there, and a
//! file `store.url` in it names the URL, so that the shadow's path opens the same vault as
//! the URL (the runtime reopens vaults by their root). The shadow is
//! `$STANDBY_STATE_DIR/stores/NAME` (default `$XDG_STATE_HOME/standby`, else
//! `~/.local/state/standby`), NAME derived from the URL.

use super::{ObjFs, Store, StoreUrl};
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// In a shadow directory: the URL of the vault it stands for.
pub const STORE_URL_FILE: &str = "store.url";

/// Whether `path` is written as a URL (`SCHEME://…`) rather than a directory.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.contains("://"))
}

fn state_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("STANDBY_STATE_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|p| p.join("standby")))
        .or_else(|| env("HOME").map(|p| p.join(".local/state/standby")))
        .unwrap_or_else(|| std::env::temp_dir().join("standby-state"))
}

/// The local directory of the vault at `url` on this machine.
pub fn shadow_dir(url: &StoreUrl) -> PathBuf {
    let text = url.to_string();
    let safe: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = crc32fast::hash(text.as_bytes());
    state_dir()
        .join("stores")
        .join(format!("{safe}-{hash:08x}"))
}

/// One filesystem per store per process: every vault opened on it shares its registry of
/// open files (what one thread wrote, another reads).
fn registry() -> &'static Mutex<HashMap<StoreUrl, ObjFs>> {
    static R: OnceLock<Mutex<HashMap<StoreUrl, ObjFs>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// If `path` names a URL vault (the URL itself, or its shadow directory): the shadow
/// directory (created) and the filesystem. None for a plain local vault.
pub fn resolve(path: &Path) -> Result<Option<(PathBuf, ObjFs)>> {
    let url = if is_url(path) {
        let s = path.to_str().unwrap_or_default();
        StoreUrl::parse(s)?
    } else {
        let marker = path.join(STORE_URL_FILE);
        match std::fs::read_to_string(&marker) {
            Ok(s) => StoreUrl::parse(s.trim())?,
            Err(_) => return Ok(None),
        }
    };
    let mut reg = registry().lock();
    if let Some(fs) = reg.get(&url) {
        return Ok(Some((fs.root().to_path_buf(), fs.clone())));
    }
    let shadow = if is_url(path) {
        shadow_dir(&url)
    } else {
        path.to_path_buf()
    };
    std::fs::create_dir_all(&shadow).map_err(|e| Error::io(&shadow, e))?;
    let marker = shadow.join(STORE_URL_FILE);
    if !marker.exists() {
        std::fs::write(&marker, format!("{url}\n")).map_err(|e| Error::io(&marker, e))?;
    }
    let store = Store::connect(&url)?;
    let fs = ObjFs::new(store, shadow.clone());
    reg.insert(url, fs.clone());
    Ok(Some((shadow, fs)))
}

/// The filesystem of an already resolved vault, for engine code that holds only a `Vfs`.
pub(crate) fn registered(root: &Path) -> Option<ObjFs> {
    registry()
        .lock()
        .values()
        .find(|fs| fs.root() == root)
        .cloned()
}
