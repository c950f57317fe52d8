//! `failover`, `test-failover`, `failover-commit`, `test-failover-cleanup`.

use super::{open_vault, vault, wait, who};
use crate::cli::FailoverArgs;
use crate::{libvirt, output, owner, progress};
use standby_engine::vault::{FailoverReport, PointSpec, Progress};
use standby_engine::Error;
use std::path::Path;
use std::time::Duration;

pub(crate) fn failover(f: FailoverArgs, test: bool, network: Option<String>) -> Result<(), Error> {
    let r = if test {
        // The owner (if one runs) reports only once the disks are written: a spinner says
        // meanwhile that it works. Done here instead, the bar shows the bytes.
        let mut shown = SpinnerThenBar {
            spinner: if f.json {
                progress::Spinner::none()
            } else {
                progress::Spinner::start(&format!("test failover of {}: materializing", f.vm))
            },
            bar: progress::Bar::quiet_if(f.json),
        };
        let r = test_failover(
            &vault()?,
            &f.vm,
            f.point.clone(),
            f.out.as_deref(),
            network.as_deref(),
            wait(),
            &mut shown,
        );
        shown.spinner.stop();
        r?
    } else {
        let mut vault = open_vault(&vault()?, &who("failover"))?;
        let mut bar = progress::Bar::quiet_if(f.json);
        let r = vault.failover(&f.vm, f.point, f.out.as_deref(), false, None, &mut bar)?;
        libvirt::write_domain(&r)?;
        r
    };
    if f.json {
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        v["domain_xml"] = serde_json::json!(r.dir.join(libvirt::DOMAIN_FILE));
        output::print_json(&v);
    } else {
        output::failover(&r);
        println!(
            "  libvirt domain {}",
            r.dir.join(libvirt::DOMAIN_FILE).display()
        );
        super::disk::print_missing(&f.vm, &r);
    }
    Ok(())
}

/// A spinner until the first progress report, then a bar.
struct SpinnerThenBar {
    spinner: progress::Spinner,
    bar: progress::Bar,
}

impl Progress for SpinnerThenBar {
    fn begin(&mut self, label: &str, total_bytes: u64) {
        self.spinner.stop();
        self.bar.begin(label, total_bytes);
    }
    fn advance(&mut self, bytes: u64) {
        self.bar.advance(bytes);
    }
    fn end(&mut self) {
        self.spinner.stop();
        self.bar.end();
    }
}

/// A test failover of `vm` (what `standby test-failover` and the dashboard run): through
/// the VM's owner if one runs, else here under the VM's lock (waiting for a busy one at
/// most `wait`), reporting the materialization to `progress`; then its `domain.xml`.
pub(crate) fn test_failover(
    root: &Path,
    vm: &str,
    point: PointSpec,
    out: Option<&Path>,
    network: Option<&str>,
    wait: Duration,
    progress: &mut dyn Progress,
) -> Result<FailoverReport, Error> {
    use standby_engine::runtime::control::{Reply, Request};
    let req = Request::TestFailover {
        point: point.clone(),
        out: out.map(|o| std::path::absolute(o).unwrap_or_else(|_| o.to_path_buf())),
        network: network.map(str::to_string),
    };
    let r = owner::run(
        root,
        &who("test-failover"),
        vm,
        &req,
        wait,
        |v| v.failover(vm, point.clone(), out, true, network, &mut *progress),
        |reply, _| match reply {
            Reply::TestFailover { report } => Ok(report),
            other => Err(owner::unexpected(&other)),
        },
    )?;
    libvirt::write_domain(&r)?;
    Ok(r)
}

pub(crate) fn commit(vm: &str) -> Result<(), Error> {
    let mut vault = open_vault(&vault()?, &who("failover-commit"))?;
    vault.failover_commit(vm)?;
    println!("failover of {vm} committed; its recovery points are deleted");
    Ok(())
}

pub(crate) fn test_cleanup(vm: &str) -> Result<(), Error> {
    let dir = test_failover_cleanup(&vault()?, vm)?;
    println!("removed the test failover of {vm} ({})", dir.display());
    Ok(())
}

/// Remove a test failover's disks (what `standby test-failover-cleanup` and the dashboard
/// run); returns the directory removed.
pub(crate) fn test_failover_cleanup(root: &Path, vm: &str) -> Result<std::path::PathBuf, Error> {
    let mut vault = open_vault(root, &who("test-failover-cleanup"))?;
    vault.test_failover_cleanup(vm)
}
