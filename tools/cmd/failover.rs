//! `failover`, `test-failover`, `failover-commit`, `test-failover-cleanup`.

use super::{open_vault, vault, wait, who};
use crate::cli::FailoverArgs;
use crate::{output, owner, progress};
use standby_engine::Error;

pub(crate) fn failover(f: FailoverArgs, test: bool, network: Option<String>) -> Result<(), Error> {
    use standby_engine::runtime::control::{Reply, Request};
    let what = if test { "test-failover" } else { "failover" };
    let r = if test {
        // A test failover runs beside replication: through the VM's owner if it runs.
        let req = Request::TestFailover {
            point: f.point.clone(),
            out: f
                .out
                .as_ref()
                .map(|o| std::path::absolute(o).unwrap_or_else(|_| o.clone())),
            network: network.clone(),
        };
        owner::run(
            &vault()?,
            &who(what),
            &f.vm,
            &req,
            wait(),
            |v| {
                let mut bar = progress::Bar::new();
                v.failover(
                    &f.vm,
                    f.point.clone(),
                    f.out.as_deref(),
                    true,
                    network.as_deref(),
                    &mut bar,
                )
            },
            |reply, _| match reply {
                Reply::TestFailover { report } => Ok(report),
                other => Err(owner::unexpected(&other)),
            },
        )?
    } else {
        let mut vault = open_vault(&vault()?, &who(what))?;
        let mut bar = progress::Bar::new();
        vault.failover(&f.vm, f.point, f.out.as_deref(), false, None, &mut bar)?
    };
    if f.json {
        output::print_json(&serde_json::to_value(&r).unwrap_or_default());
    } else {
        output::failover(&r);
    }
    Ok(())
}

pub(crate) fn commit(vm: &str) -> Result<(), Error> {
    let mut vault = open_vault(&vault()?, &who("failover-commit"))?;
    vault.failover_commit(vm)?;
    println!("failover of {vm} committed; its recovery points are deleted");
    Ok(())
}

pub(crate) fn test_cleanup(vm: &str) -> Result<(), Error> {
    let mut vault = open_vault(&vault()?, &who("test-failover-cleanup"))?;
    let dir = vault.test_failover_cleanup(vm)?;
    println!("removed the test failover of {vm} ({})", dir.display());
    Ok(())
}
