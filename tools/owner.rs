//! Commands that need a VM go through the process that owns it, if one runs (the embedded
//! agent, the target's follower): they are answered from its live views and never wait
//! for the VM's write path. With no owner running, the command does the work itself under
//! the VM's lock; a short-lived holder (another command) is waited for, up to `--wait`.

use standby_engine::runtime::control::{self, Reply, Request, Session};
use standby_engine::vault::{LockWait, Vault};
use standby_engine::Error;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a waiting command looks again.
const POLL: Duration = Duration::from_millis(25);

/// Run `req` through the owner of `vm`, or `local` (on a vault whose locks fail at once)
/// when no owner runs. Waits for a busy VM at most `wait`, saying once whom it waits for.
pub fn run<T>(
    root: &Path,
    who: &str,
    vm: &str,
    req: &Request,
    wait: Duration,
    mut local: impl FnMut(&mut Vault) -> Result<T, Error>,
    remote: impl FnOnce(Reply, Session) -> Result<T, Error>,
) -> Result<T, Error> {
    let started = Instant::now();
    let mut told = false;
    // While it waits, the command says so in the VM's directory: a holder that keeps the VM
    // between passes (`process --follow`) lets go of it when it sees that.
    let mut _wanted: Option<Wanted> = None;
    loop {
        let mut vault = Vault::open(root, who, LockWait::Fail)?;
        vault.catalog().vm(vm)?;
        match control::ask(&vault.agent_socket(vm), vm, req) {
            // The owner went away under the request (a follower reconnecting, an agent
            // stopping): a request that changes nothing is asked again, of whoever owns
            // the VM now (or done here).
            Some(Err(Error::Io { .. })) if read_only(req) && started.elapsed() < wait => {
                std::thread::sleep(POLL);
                continue;
            }
            Some(r) => {
                let (reply, session) = r?;
                return remote(reply, session);
            }
            None => {}
        }
        match local(&mut vault) {
            Err(Error::Locked(holder)) => {
                if started.elapsed() >= wait {
                    return Err(Error::Locked(format!(
                        "{holder} (gave up after waiting {}; pass a longer --wait)",
                        humantime::format_duration(Duration::from_secs(wait.as_secs().max(1)))
                    )));
                }
                if !told {
                    eprintln!("standby: waiting for the lock of VM {vm}, held by {holder}");
                    told = true;
                    _wanted = Wanted::say(&vault.vm_dir_of(vm), who);
                }
                std::thread::sleep(POLL);
            }
            other => return other,
        }
    }
}

/// A waiter's `lock.wanted.PID` file, removed when the waiter is done.
struct Wanted(std::path::PathBuf);

impl Wanted {
    fn say(dir: &Path, who: &str) -> Option<Wanted> {
        let f = dir.join(format!(
            "{}.{}",
            standby_engine::vault::WANTED_FILE,
            std::process::id()
        ));
        std::fs::write(&f, who.as_bytes()).ok().map(|_| Wanted(f))
    }
}

impl Drop for Wanted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Requests that change nothing, so asking again after a lost answer is harmless.
fn read_only(req: &Request) -> bool {
    matches!(
        req,
        Request::Status | Request::Points | Request::Verify { .. } | Request::Mount { .. }
    )
}

/// The reply a request expects, or a one-line error for any other.
pub fn unexpected(reply: &Reply) -> Error {
    Error::Conflict(format!(
        "unexpected reply from the VM's owner: {}",
        serde_json::to_string(reply).unwrap_or_default()
    ))
}
