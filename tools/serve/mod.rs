//! `standby serve`: the dashboard and its JSON API over a vault, on `tiny_http`.
//!
//! Everything it shows comes from the calls `status --json` and `points --json` make
//! (through each VM's running owner, never waiting on its write path); its actions run the
//! code of `standby test-failover` and `test-failover-cleanup` in a background thread.
//! A sampler thread keeps what those calls cannot answer after the fact: the last hour of
//! every VM's RPO, and the events seen between successive samples. The page, its script
//! and its style are compiled into the binary, so the dashboard works offline.
//!
//! Access: loopback by default (and then only for a loopback `Host`, against DNS
//! rebinding); any other address needs `--token`, which every request then carries. Every
//! POST carries the CSRF token of this server's run, which only the page knows.

mod api;
mod state;

use crate::cli::ServeArgs;
use standby_engine::vault::{LockWait, Vault};
use standby_engine::Error;
use state::State;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Request threads: a slow answer (a VM's owner busy) never stalls the page's others.
const WORKERS: usize = 4;
/// How often an idle worker looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

pub(crate) fn run(a: ServeArgs) -> Result<(), Error> {
    let root = crate::cmd::vault()?;
    let root = std::path::absolute(&root).map_err(|e| Error::io(&root, e))?;
    // Refuse a directory that is not a vault now, not at the first request.
    Vault::open(&root, &crate::cmd::who("serve"), LockWait::Fail)?;
    let token = match a.token {
        Some(t) if t.is_empty() => {
            return Err(Error::Invalid("--token must not be empty".into()));
        }
        t => t,
    };
    let addrs: Vec<SocketAddr> = a
        .listen
        .to_socket_addrs()
        .map_err(|e| Error::Invalid(format!("--listen '{}' is not HOST:PORT: {e}", a.listen)))?
        .collect();
    let Some(addr) = addrs.first().copied() else {
        return Err(Error::Invalid(format!(
            "--listen '{}' names no address",
            a.listen
        )));
    };
    if token.is_none() && !addrs.iter().all(|a| a.ip().is_loopback()) {
        return Err(Error::Invalid(format!(
            "--listen {} is not a loopback address: pass --token TOKEN (or set STANDBY_DASHBOARD_TOKEN) to serve it",
            a.listen
        )));
    }
    if a.sample_every < Duration::from_millis(100) {
        return Err(Error::Invalid(
            "--sample-every must be at least 100ms".into(),
        ));
    }
    // Bound first: a bad address stops the command before anything starts.
    let metrics = crate::metrics::bind_opt(a.metrics.as_deref())?;
    let stop = crate::agent::stop_flag()?;
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::Invalid(format!("cannot listen on {addr}: {e}")))?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let server = Arc::new(server);
    let state = Arc::new(State::new(
        root.clone(),
        token,
        a.sample_every,
        crate::cmd::wait(),
    )?);
    println!(
        "dashboard of {} on http://{bound}/ (pid {})",
        root.display(),
        std::process::id()
    );
    let _ = std::io::stdout().flush();
    let _exporter = match metrics {
        Some(l) => {
            crate::metrics::announce(&l);
            let root = root.clone();
            Some(l.start(move || crate::metrics::render_vault(&root, None))?)
        }
        None => None,
    };

    let sampler = {
        let (state, stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || state.sample_until(&stop))
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (server, state, stop) = (server.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match server.recv_timeout(POLL) {
                        Ok(Some(req)) => api::handle(&state, req),
                        Ok(None) => {}
                        Err(e) => {
                            eprintln!("standby: dashboard: {e}");
                            std::thread::sleep(POLL);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let _ = sampler.join();
    if state.busy() {
        eprintln!("standby: dashboard: letting the running action finish");
        while state.busy() {
            std::thread::sleep(POLL);
        }
    }
    eprintln!("standby: dashboard stopped");
    Ok(())
}
