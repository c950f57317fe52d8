//! `standby`: the command-line face of the Standby engine. It parses arguments, calls the
//! engine, and prints tables (or one JSON document with `--json`); errors become one line
//! on stderr and exit status 1 (2 for usage errors). Nothing here touches vault files
//! directly.

/// Every line the CLI prints to stdout goes through [`output::line`]: this shadows std's
/// `println!` for the whole crate (the modules below included), so a closed pipe
/// (`standby status | head -1`) ends the command quietly instead of panicking.
macro_rules! println {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

mod agent;
mod cli;
mod cmd;
mod demo;
mod libvirt;
mod metrics;
mod output;
mod owner;
mod progress;
mod remote;
mod serve;

use clap::Parser;
use cli::{CacheCmd, Cli, Command, DiskCmd, LinkCmd, PolicyCmd};
use cmd::{disk, failover, group, mount, point, protect, report, roundtrip, setup};
use standby_engine::Error;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("standby: {}", usage_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("standby: {}", output::one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// clap's error (an error line, tips, the usage, a pointer to `--help`) as one line: what is
/// wrong, the tip if any, and the usage to follow.
fn usage_line(text: &str) -> String {
    let mut what = String::new();
    let mut usage = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage: ") {
            // clap lists the options already given; the global ones are never required
            // (--vault also comes from STANDBY_VAULT), so they do not belong in the usage.
            let u = u
                .replace(" --vault <VAULT>", "")
                .replace(" --wait <DURATION>", "");
            usage = Some(u);
        } else if line.starts_with("For more information") {
            continue;
        } else {
            let line = line.strip_prefix("error: ").unwrap_or(line);
            if what.ends_with(':') {
                what.push(' '); // a list follows its heading
            } else if !what.is_empty() {
                what.push_str("; ");
            }
            what.push_str(line);
        }
    }
    match usage {
        Some(u) => format!("{what} (usage: {u}; see --help)"),
        None => what,
    }
}

/// Run one command: each has its own function in `cmd`.
fn run(cli: Cli) -> Result<ExitCode, Error> {
    cmd::set_globals(cli.vault, cli.wait);
    let done = |()| ExitCode::SUCCESS;
    match cli.command {
        Command::Init { vault } => setup::init(&vault).map(done),
        Command::Policy(PolicyCmd::Set(a)) => setup::policy_set(a).map(done),
        Command::Policy(PolicyCmd::List { json }) => setup::policy_list(json).map(done),
        Command::Protect(a) => protect::protect(a).map(done),
        Command::Process {
            vm,
            follow,
            every,
            cache,
            metrics,
        } => protect::process(&cmd::vault()?, vm, follow, every, cache, metrics),
        Command::Cache(CacheCmd::Serve {
            dir,
            listen,
            creds,
            insecure_loopback,
            capacity,
            metrics,
            vault,
        }) => {
            no_vault("cache serve", vault)?;
            remote::serve(remote::ServeOptions {
                dir,
                listen,
                creds,
                insecure_loopback,
                capacity,
                metrics,
            })
            .map(done)
        }
        Command::Link(LinkCmd::Export { out }) => setup::link_export(&out).map(done),
        Command::Link(LinkCmd::Init) => setup::link_init().map(done),
        Command::Mount {
            vm,
            point,
            listen,
            writable,
        } => mount::run(&vm, point, &listen, writable).map(done),
        Command::Agent(a) => cmd::agent::run(a).map(done),
        Command::Point(a) if a.group.is_some() => group::point(a),
        Command::Point(a) => {
            cmd::named(&a.vm)?;
            point::run(a)
        }
        Command::Points {
            group: Some(g),
            json,
            ..
        } => group::points(&g, json).map(done),
        Command::Points { vm, json, .. } => report::points(&cmd::named(&vm)?, json).map(done),
        Command::Status { vm, json, check } => report::status(vm, json, check),
        Command::Failover(f) if f.group.is_some() => group::failover(f, false, None).map(done),
        Command::TestFailover { f, network } if f.group.is_some() => {
            group::failover(f, true, network).map(done)
        }
        Command::Failover(f) => {
            cmd::named(&f.vm)?;
            failover::failover(f, false, None).map(done)
        }
        Command::TestFailover { f, network } => {
            cmd::named(&f.vm)?;
            failover::failover(f, true, network).map(done)
        }
        Command::FailoverCommit { group: Some(g), .. } => group::commit(&g).map(done),
        Command::FailoverCommit { vm, .. } => failover::commit(&cmd::named(&vm)?).map(done),
        Command::TestFailoverCleanup { group: Some(g), .. } => group::test_cleanup(&g).map(done),
        Command::TestFailoverCleanup { vm, .. } => {
            failover::test_cleanup(&cmd::named(&vm)?).map(done)
        }
        Command::Verify { vm, point, json } => report::verify(&vm, point, json),
        Command::Demo { dir, vault } => {
            no_vault("demo", vault)?;
            demo::run(dir).map(done)
        }
        Command::Serve(a) => serve::run(a).map(done),
        Command::Group(c) => group::run(c).map(done),
        Command::Diff { vm, a, b, json } => roundtrip::diff(&vm, a, b, json).map(done),
        Command::Unprotect { vm, delete_points } => {
            roundtrip::unprotect(&vm, delete_points).map(done)
        }
        Command::Reprotect {
            vm,
            json,
            cache: Some(cache),
            seed,
            policy,
            insecure_loopback,
        } => {
            roundtrip::reprotect_remote(&vm, cache, seed, policy, insecure_loopback, json).map(done)
        }
        Command::Reprotect { vm, json, .. } => roundtrip::reprotect(&vm, json).map(done),
        Command::Failback { vm, point, json } => roundtrip::failback(&vm, point, json).map(done),
        Command::Policy(PolicyCmd::Assign { vm, policy }) => {
            roundtrip::policy_assign(&vm, &policy).map(done)
        }
        Command::Disk(DiskCmd::Add { vm, disk, json }) => disk::add(&vm, disk, json).map(done),
        Command::Disk(DiskCmd::Resize {
            vm,
            disk,
            size,
            json,
        }) => disk::resize(&vm, &disk, size, json).map(done),
    }
}

/// `--vault` (hidden there) given to a command that has no vault: refused, not ignored.
fn no_vault(command: &str, vault: Option<std::path::PathBuf>) -> Result<(), Error> {
    match vault {
        Some(_) => Err(Error::Invalid(format!(
            "`standby {command}` works without a vault: drop --vault"
        ))),
        None => Ok(()),
    }
}
