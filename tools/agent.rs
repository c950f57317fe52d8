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
    /// Serve Prometheus metrics here (`--metrics`).
    pub metrics: Option<String>,
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
    // Bound first: a bad address stops the command before the VM is touched.
    let listener = crate::metrics::bind_opt(opts.metrics.as_deref())?;
    // A short-lived holder of the VM (status, points, a mount, the dashboard's sampler) is
    // waited for, up to --wait, as every command that needs the VM to itself waits.
    let started = std::time::Instant::now();
    let mut told = false;
    let agent = loop {
        let r = EmbeddedAgent::start(
            root,
            &format!("standby agent {vm}"),
            vm,
            EmbeddedOptions {
                listen: opts.listen.clone(),
                process_every: opts.process_every,
                events: events(),
            },
        );
        match r {
            Err(Error::Locked(holder)) => {
                let wait = crate::cmd::wait();
                if started.elapsed() >= wait {
                    return Err(Error::Locked(format!(
                        "{holder} (gave up after waiting {}; pass a longer --wait)",
                        humantime::format_duration(Duration::from_secs(wait.as_secs().max(1)))
                    )));
                }
                if stop.load(Ordering::SeqCst) {
                    return Err(Error::Locked(holder));
                }
                if !told {
                    eprintln!("standby: waiting for the lock of VM {vm}, held by {holder}");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            r => break r?,
        }
    };
    let addr = agent.addr();
    println!(
        "agent for {vm} serving NBD on {addr} (pid {})",
        std::process::id()
    );
    for d in agent.disks() {
        println!("  nbd://{addr}/{d}");
    }
    let _ = std::io::stdout().flush();
    let _exporter = match listener {
        Some(l) => {
            crate::metrics::announce(&l);
            let (root, vm, disks, stats) = (
                root.to_path_buf(),
                vm.to_string(),
                agent.disks(),
                agent.write_stats(),
            );
            Some(l.start(move || {
                let mut f = crate::metrics::Families::default();
                crate::metrics::vault_families(&root, Some(&vm), &mut f);
                crate::metrics::write_families(&vm, &disks, &stats, &mut f);
                f.render()
            })?)
        }
        None => None,
    };
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
