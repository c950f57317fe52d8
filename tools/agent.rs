//! `standby agent VM`: starts the engine's embedded agent (or, with `--cache`, the source
//! site's agent: see `remote.rs`), prints where it serves and what it reports, and stops
//! it on Ctrl-C or SIGTERM. The runtime itself lives in `standby_engine::runtime`.

use crate::output;
use standby_engine::runtime::{EmbeddedAgent, EmbeddedOptions, Event, Events};
use standby_engine::Error;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Options {
    pub listen: String,
    pub process_every: Duration,
}

/// Where the runtimes' events go: one line each on stderr.
pub(crate) fn events() -> Events {
    Arc::new(|e: Event| match e {
        Event::Point { vm, point } => eprintln!(
            "standby: {vm}: point {} ({}) at seq {}",
            point.id,
            output::kind(point.kind),
            point.seq
        ),
        Event::Notice(m) | Event::Trouble(m) => eprintln!("standby: {m}"),
    })
}

pub fn run(root: &Path, vm: &str, opts: Options) -> Result<(), Error> {
    let stop = stop_flag()?;
    let agent = EmbeddedAgent::start(
        root,
        &format!("standby agent {vm}"),
        vm,
        EmbeddedOptions {
            listen: opts.listen,
            process_every: opts.process_every,
            events: events(),
        },
    )?;
    let addr = agent.addr();
    println!(
        "agent for {vm} serving NBD on {addr} (pid {})",
        std::process::id()
    );
    for d in agent.disks() {
        println!("  nbd://{addr}/{d}");
    }
    let _ = std::io::stdout().flush();
    agent.run_until(&stop)?;
    eprintln!("standby: agent for {vm} stopped cleanly");
    Ok(())
}

/// A flag set by Ctrl-C or SIGTERM (installed once per process).
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>, Error> {
    static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(s) = STOP.get() {
        return Ok(s.clone());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .map_err(|e| Error::Invalid(format!("cannot install the signal handler: {e}")))?;
    let _ = STOP.set(stop.clone());
    Ok(stop)
}
