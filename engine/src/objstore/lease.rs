//! The lease of a VM in an object vault: `vms/VM/lease`, so two processors (on one machine
//! or on two) never apply the same VM, and a dead holder's lease expires for another to
//! take over.
//!
//! The object is a state-file frame (magic `STBYLEAS`, version, crc; see
//! `util::statefile`) around `holder \n expires_us \n ttl_ms`. It is only ever written by
//! conditional PUTs: `If-None-Match: *` to take a lease nobody ever held, `If-Match: ETAG`
//! to take an expired (or released) one, or to renew one's own. Two takers race on the same
//! version and exactly one wins. The holder renews every third of the TTL; a renewal that
//! loses (another process took the lease: ours had expired, say after a long pause) or
//! that cannot reach the store before the lease runs out *fences* the VM in this process:
//! every later write under the VM's directory fails, so a stale holder never writes over
//! the new one's work. Releasing writes an expiry of 0 (conditionally, too).
//!
//! The expiry is wall-clock time: machines sharing a vault need clocks within a few
//! seconds of each other (NTP), a fraction of the TTL.

use super::{Cond, ObjFs, StoreError, Version};
use crate::error::{Error, Result};
use crate::util::lock::LockWait;
use crate::util::statefile::{self, Kind};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

pub const FILE_NAME: &str = "lease";

const KIND: Kind = Kind {
    magic: *b"STBYLEAS",
    version: 1,
    max_body_bytes: 1024,
    what: "VM lease",
};

/// How long a lease lasts unrenewed: `STANDBY_LEASE_SECS` (default 15 s).
pub fn ttl() -> Duration {
    std::env::var("STANDBY_LEASE_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(15))
}

/// How often a waiter looks at a busy lease again.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Body {
    holder: String,
    expires_us: u64,
    ttl_ms: u64,
}

fn encode(b: &Body) -> Vec<u8> {
    let holder = b.holder.replace('\n', " ");
    statefile::encode(
        &KIND,
        format!("{holder}\n{}\n{}", b.expires_us, b.ttl_ms).as_bytes(),
    )
}

/// The lease's fields; None if the object is not a lease this build reads (taken as free:
/// it names no holder that could still be writing).
fn decode(bytes: &[u8]) -> Option<Body> {
    let v = statefile::decode(&KIND, bytes).ok()?;
    let text = std::str::from_utf8(v.body).ok()?;
    let mut it = text.split('\n');
    let holder = it.next()?.to_string();
    let expires_us = it.next()?.parse().ok()?;
    let ttl_ms = it.next()?.parse().ok()?;
    Some(Body {
        holder,
        expires_us,
        ttl_ms,
    })
}

/// A held lease; renewed by a thread of its own until the last handle to it is dropped
/// (which releases it). Within one process the handles of one VM's lease share it: a
/// long-running holder (`process --follow`) keeps the VM across its passes, and each pass's
/// lock takes a handle of the same lease rather than waiting for itself. Exclusion between
/// the users of one machine is the local lock's business; the lease's is between machines.
pub struct Lease {
    held: Arc<Held>,
}

struct Held {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    fs: ObjFs,
    key: String,
    /// The store's name for the key (unique across stores: the map's key).
    name: String,
    holder: String,
    version: Arc<Mutex<Version>>,
}

/// This process's live leases, by the store's name of the lease object.
fn live() -> &'static Mutex<HashMap<String, Weak<Held>>> {
    static LIVE: OnceLock<Mutex<HashMap<String, Weak<Held>>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A handle of the lease this process already holds on `name`, if it holds one still good.
fn shared(name: &str) -> Option<Lease> {
    let held = live().lock().get(name)?.upgrade()?;
    (!held.lost.load(Ordering::SeqCst)).then_some(Lease { held })
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.held.key)
    }
}

impl Lease {
    /// Whether the lease was lost (the VM is fenced in this process).
    pub fn lost(&self) -> bool {
        self.held.lost.load(Ordering::SeqCst)
    }
}

/// Take the lease of the VM whose directory is `dir`, waiting as `wait` says (or share the
/// one this process holds already).
pub fn acquire(fs: &ObjFs, dir: &Path, who: &str, wait: LockWait) -> Result<Lease> {
    let dir_key = fs
        .key_of(dir)
        .ok_or_else(|| Error::Invalid(format!("{} is not in the object vault", dir.display())))?;
    let key = format!("{dir_key}/{FILE_NAME}");
    let name = fs.store().name(&key);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let holder = format!("pid {} on {host}: {who}", std::process::id());
    let ttl = ttl();
    let started = Instant::now();
    let io = |e: StoreError| Error::io(dir, e.into_io(&name));
    let version = loop {
        if let Some(l) = shared(&name) {
            return Ok(l);
        }
        let (cond, current) = match fs.store().get(&key) {
            Err(StoreError::NotFound) => (Cond::Absent, None),
            Ok((bytes, meta)) => (Cond::Is(meta.version), decode(&bytes)),
            Err(e) => return Err(io(e)),
        };
        let now = crate::now_us();
        match current.filter(|b| b.expires_us > now) {
            Some(b) => {
                let left = Duration::from_micros(b.expires_us - now);
                let desc = format!(
                    "{} (its lease on {name} runs {} more unless renewed)",
                    b.holder,
                    humantime::format_duration(Duration::from_secs(left.as_secs().max(1)))
                );
                match wait {
                    LockWait::Fail => return Err(Error::Locked(desc)),
                    LockWait::Until(d) if started.elapsed() >= d => {
                        return Err(Error::Locked(format!(
                            "{desc} (gave up after waiting {}; stop it first, or pass a longer --wait)",
                            humantime::format_duration(Duration::from_secs(d.as_secs().max(1)))
                        )))
                    }
                    _ => std::thread::sleep(POLL),
                }
            }
            None => {
                let body = Body {
                    holder: holder.clone(),
                    expires_us: now + ttl.as_micros() as u64,
                    ttl_ms: ttl.as_millis() as u64,
                };
                match fs.store().put_versioned(&key, encode(&body), &cond) {
                    Ok(v) => break v,
                    // Another taker won this version: look again.
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(io(e)),
                }
            }
        }
    };
    fs.unfence(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let version = Arc::new(Mutex::new(version));
    let thread = {
        let (stop, lost, version) = (stop.clone(), lost.clone(), version.clone());
        let (fs, key, dir, holder) = (fs.clone(), key.clone(), dir.to_path_buf(), holder.clone());
        std::thread::Builder::new()
            .name("standby-lease".into())
            .spawn(move || renew(&fs, &key, &dir, &holder, ttl, &stop, &lost, &version))
            .map_err(|e| Error::io(dir_key.as_str(), e))?
    };
    let held = Arc::new(Held {
        stop,
        lost,
        thread: Mutex::new(Some(thread)),
        fs: fs.clone(),
        key,
        name: name.clone(),
        holder,
        version,
    });
    live().lock().insert(name, Arc::downgrade(&held));
    Ok(Lease { held })
}

#[allow(clippy::too_many_arguments)]
fn renew(
    fs: &ObjFs,
    key: &str,
    dir: &Path,
    holder: &str,
    ttl: Duration,
    stop: &AtomicBool,
    lost: &AtomicBool,
    version: &Mutex<Version>,
) {
    let every = ttl / 3;
    let mut held_until = Instant::now() + ttl;
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50).min(every));
        if Instant::now() < next {
            continue;
        }
        let body = Body {
            holder: holder.to_string(),
            expires_us: crate::now_us() + ttl.as_micros() as u64,
            ttl_ms: ttl.as_millis() as u64,
        };
        let at = Instant::now();
        let cond = Cond::Is(version.lock().clone());
        match fs.store().put_versioned(key, encode(&body), &cond) {
            Ok(v) => {
                *version.lock() = v;
                held_until = at + ttl;
                next = at + every;
            }
            Err(StoreError::Conflict) => {
                fs.fence(dir);
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(_) => {
                if Instant::now() >= held_until {
                    fs.fence(dir);
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                next = Instant::now() + Duration::from_millis(500);
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if !self.lost.load(Ordering::SeqCst) {
            let body = Body {
                holder: self.holder.clone(),
                expires_us: 0,
                ttl_ms: 0,
            };
            let cond = Cond::Is(self.version.lock().clone());
            let _ = self
                .fs
                .store()
                .put_versioned(&self.key, encode(&body), &cond);
        }
        // Forget it (unless a new lease of the same object took the entry meanwhile).
        let mut live = live().lock();
        if live.get(&self.name).is_some_and(|w| w.strong_count() == 0) {
            live.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_round_trips_and_damage_reads_as_free() {
        let b = Body {
            holder: "pid 1 on h: standby process".into(),
            expires_us: 123,
            ttl_ms: 15000,
        };
        let bytes = encode(&b);
        assert_eq!(decode(&bytes), Some(b));
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(b""), None);
    }
}
