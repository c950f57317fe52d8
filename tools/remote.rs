//! The split deployment: `standby cache serve` (source site), `standby agent VM --cache`
//! (source site, in the VM's write path), and the link commands. The target site's side
//! (`protect --cache`, `process --follow`) lives with the other vault commands.

use standby_engine::link::service::{CacheService, ServiceConfig};
use standby_engine::link::tls::{Credentials, Role};
use standby_engine::link::Security;
use standby_engine::runtime::{SourceAgent, SourceOptions};
use standby_engine::Error;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::stop_flag;

/// `standby point VM --journal DIR`: ask the running agent to write a marker; returns its
/// sequence number once it is durable in the journal.
pub fn marker(journal: &Path, vm: &str, app: bool, name: Option<&str>) -> Result<u64, Error> {
    standby_engine::runtime::marker(journal, vm, app, name)
}

fn security(creds: &Path, role: Role, insecure_loopback: bool) -> Result<Security, Error> {
    Ok(Security {
        creds: Arc::new(Credentials::load(creds, role)?),
        insecure_loopback,
    })
}

fn log(line: &str) {
    eprintln!("standby: {line}");
}

pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub creds: PathBuf,
    pub insecure_loopback: bool,
    pub capacity: Option<u64>,
    pub metrics: Option<String>,
}

/// `standby cache serve`.
pub fn serve(o: ServeOptions) -> Result<(), Error> {
    let security = security(&o.creds, Role::Cache, o.insecure_loopback)?;
    let addr = standby_engine::link::resolve(&o.listen, &security)?;
    let metrics = crate::metrics::bind_opt(o.metrics.as_deref())?;
    let svc = CacheService::open(
        ServiceConfig {
            dir: o.dir.clone(),
            capacity_bytes: o.capacity,
            security,
        },
        log,
    )?;
    let listener = TcpListener::bind(addr)
        .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", o.listen)))?;
    let stop = stop_flag()?;
    println!(
        "cache service on {} ({}), directory {}, pid {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        if o.insecure_loopback {
            "plain TCP, loopback only"
        } else {
            "TLS"
        },
        o.dir.display(),
        std::process::id()
    );
    let names = svc.vm_names();
    if !names.is_empty() {
        println!("  holding the logs of {}", names.join(", "));
    }
    let _ = std::io::stdout().flush();
    let exporter = match metrics {
        Some(l) => {
            crate::metrics::announce(&l);
            let svc = svc.clone();
            Some(l.start(move || {
                let mut f = crate::metrics::Families::default();
                crate::metrics::cache_families(&svc.vm_reports(), &mut f);
                f.render()
            })?)
        }
        None => None,
    };
    let served = svc.serve(listener, &stop);
    drop(exporter);
    served?;
    svc.close()?;
    eprintln!("standby: cache service stopped cleanly");
    Ok(())
}

pub struct AgentOptions {
    pub vm: String,
    pub cache: String,
    pub creds: PathBuf,
    pub insecure_loopback: bool,
    pub journal: PathBuf,
    pub journal_capacity: Option<u64>,
    pub disks: Vec<(String, PathBuf)>,
    pub listen: String,
    pub metrics: Option<String>,
    pub seeded: bool,
}

/// `standby agent VM --cache ADDR`: serve the VM's disks over NBD through the write tap,
/// journal every write locally, ship the journal to the cache service.
pub fn agent(o: AgentOptions) -> Result<(), Error> {
    let security = security(&o.creds, Role::Agent, o.insecure_loopback)?;
    let stop = stop_flag()?;
    let metrics = crate::metrics::bind_opt(o.metrics.as_deref())?;
    let (vm, cache) = (o.vm.clone(), o.cache.clone());
    let agent = SourceAgent::start(SourceOptions {
        vm: o.vm,
        cache: o.cache,
        security,
        journal: o.journal,
        journal_capacity: o.journal_capacity,
        disks: o.disks,
        listen: o.listen,
        events: crate::agent::events(),
        seeded: o.seeded,
    })?;
    let addr = agent.addr();
    println!(
        "agent for {vm} serving NBD on {addr}, shipping to {cache} (pid {})",
        std::process::id()
    );
    for d in agent.disks() {
        println!("  nbd://{addr}/{d}");
    }
    let _ = std::io::stdout().flush();
    let _exporter = match metrics {
        Some(l) => {
            crate::metrics::announce(&l);
            let (vm, disks, stats, probe) = (
                vm.clone(),
                agent.disks(),
                agent.write_stats(),
                agent.probe(),
            );
            Some(l.start(move || {
                let mut f = crate::metrics::Families::default();
                if let Some(r) = probe.report() {
                    crate::metrics::source_families(&vm, &r, &mut f);
                }
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
