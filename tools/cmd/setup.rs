//! Setting a vault up: `init`, `policy set|list`, `link export|init`.

use super::{open_vault, vault, who};
use crate::cli::{Interval, PolicySetArgs};
use crate::output;
use standby_engine::vault::Vault;
use standby_engine::Error;
use std::path::Path;

pub(crate) fn init(vault: &Path) -> Result<(), Error> {
    Vault::init(vault)?;
    if standby_engine::objstore::is_url(vault) {
        let url = vault.display();
        println!("created vault {url}");
        println!("next: export STANDBY_VAULT={url} and `standby protect VM --disk NAME=PATH`");
        return Ok(());
    }
    // Absolute, so the line can be pasted from any directory.
    let abs = std::path::absolute(vault).map_err(|e| Error::io(vault, e))?;
    println!("created vault {}", abs.display());
    println!(
        "next: export STANDBY_VAULT={} and `standby protect VM --disk NAME=PATH`",
        abs.display()
    );
    Ok(())
}

pub(crate) fn policy_set(a: PolicySetArgs) -> Result<(), Error> {
    let PolicySetArgs {
        name,
        crash_interval,
        app_interval,
        retention,
        any_moment_window,
        thin_after,
        rpo_threshold,
    } = a;
    let mut vault = open_vault(&vault()?, &who("policy set"))?;
    let mut p = vault.catalog().policy(&name).unwrap_or_default();
    if let Some(d) = crash_interval {
        p.crash_interval = d;
    }
    if let Some(Interval(d)) = app_interval {
        p.app_interval = d;
    }
    if let Some(d) = retention {
        p.retention = d;
    }
    if let Some(d) = any_moment_window {
        p.any_moment_window = d;
    }
    if let Some(d) = thin_after {
        p.thin_after = d;
    }
    if let Some(d) = rpo_threshold {
        p.rpo_threshold = d;
    }
    vault.set_policy(&name, &p)?;
    println!("policy {name}: {}", output::policy_line(&p));
    Ok(())
}

pub(crate) fn policy_list(json: bool) -> Result<(), Error> {
    let vault = open_vault(&vault()?, &who("policy list"))?;
    output::policies(vault.catalog(), json);
    Ok(())
}

pub(crate) fn link_export(out: &Path) -> Result<(), Error> {
    let vault = open_vault(&vault()?, &who("link export"))?;
    vault.link_export(out)?;
    println!(
        "wrote the source site's credentials to {} (keep them secret: they hold keys)",
        out.display()
    );
    println!(
        "source site: standby cache serve --dir DIR --listen ADDR --creds {}",
        out.display()
    );
    Ok(())
}

pub(crate) fn link_init() -> Result<(), Error> {
    let vault = open_vault(&vault()?, &who("link init"))?;
    vault.link_init()?;
    println!("created the link credentials of {}", vault.root().display());
    Ok(())
}
