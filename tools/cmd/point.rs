//! `point`: cut a recovery point now, between the operator's quiesce and thaw hooks.

use super::{vault, wait, who};
use crate::cli::PointArgs;
use crate::{output, owner, remote};
use standby_engine::record::Consistency;
use standby_engine::vault::{LockWait, Vault};
use standby_engine::Error;
use std::path::Path;
use std::process::ExitCode;

pub(crate) fn run(a: PointArgs) -> Result<ExitCode, Error> {
    let PointArgs {
        vm,
        app_consistent,
        name,
        quiesce_command,
        thaw_command,
        journal,
        group: _,
    } = a;
    if let Some(journal) = journal {
        let hooked = with_hooks(
            quiesce_command.as_deref(),
            thaw_command.as_deref(),
            || remote::marker(&journal, &vm, app_consistent, name.as_deref()),
            |seq| format!("wrote the marker for {vm} at seq {seq}"),
        );
        let seq = match hooked {
            Ok(seq) => seq,
            Err(line) => {
                eprintln!("standby: {line}");
                return Ok(ExitCode::from(1));
            }
        };
        println!(
            "wrote {} marker for {vm} at seq {seq}; the target cuts the point when it arrives",
            if app_consistent {
                "an app-consistent"
            } else {
                "a crash-consistent"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    Vault::open(&vault()?, &who("point"), LockWait::Fail)?
        .catalog()
        .vm(&vm)?;
    let root = vault()?;
    let hooked = with_hooks(
        quiesce_command.as_deref(),
        thaw_command.as_deref(),
        || cut_point(&root, &vm, app_consistent, name.as_deref()),
        |p| format!("cut point {} of {vm} at seq {}", p["id"], p["seq"]),
    );
    let p = match hooked {
        Ok(p) => p,
        Err(line) => {
            eprintln!("standby: {line}");
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "cut point {} of {vm} at seq {} ({}, {})",
        p["id"],
        p["seq"],
        p["kind"].as_str().unwrap_or(""),
        p["time"].as_str().unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

/// Cut a point through the VM's running owner if there is one, else directly.
fn cut_point(
    root: &Path,
    vm: &str,
    app: bool,
    name: Option<&str>,
) -> Result<serde_json::Value, Error> {
    use standby_engine::runtime::control::{Reply, Request};
    let req = Request::Point {
        app,
        name: name.map(str::to_string),
    };
    let c = if app {
        Consistency::App
    } else {
        Consistency::Crash
    };
    let p = owner::run(
        root,
        &who("point"),
        vm,
        &req,
        wait(),
        |v| v.cut_point(vm, c, name),
        |reply, _| match reply {
            Reply::Point { point: Some(p), .. } => Ok(p),
            other => Err(owner::unexpected(&other)),
        },
    )?;
    Ok(output::point_json(&p, None))
}

/// Run an operator's hook with `sh -c`; the error is what to tell the operator.
pub(crate) fn run_hook(what: &str, cmd: &str) -> Result<(), String> {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map_err(|e| format!("the {what} command could not be started ({e}): {cmd}"))?;
    if !status.success() {
        return Err(format!("the {what} command failed ({status}): {cmd}"));
    }
    Ok(())
}

/// Cut between the quiesce and the thaw hook. Once quiesce was attempted the thaw hook
/// always runs — after a failed quiesce (nothing is cut then: the guest may not be
/// consistent) and after a failed cut too — so a guest is never left frozen. The error is
/// one line that says what happened to each step; `done` describes a cut that worked
/// when only the thaw failed.
pub(crate) fn with_hooks<T>(
    quiesce: Option<&str>,
    thaw: Option<&str>,
    cut: impl FnOnce() -> Result<T, Error>,
    done: impl FnOnce(&T) -> String,
) -> Result<T, String> {
    let cut = match quiesce.map(|c| run_hook("quiesce", c)) {
        Some(Err(q)) => Err(format!("{q}; nothing was cut")),
        _ => cut().map_err(|e| output::one_line(&e)),
    };
    let thawed = thaw.map(|c| run_hook("thaw", c));
    match (cut, thawed) {
        (Ok(v), None | Some(Ok(()))) => Ok(v),
        (Ok(v), Some(Err(t))) => Err(format!("{}, but {t}", done(&v))),
        (Err(e), None) => Err(e),
        (Err(e), Some(Ok(()))) => Err(format!("{e}; the thaw command ran and succeeded")),
        (Err(e), Some(Err(t))) => Err(format!("{e}; {t} too")),
    }
}
