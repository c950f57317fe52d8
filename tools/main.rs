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
mod output;
mod owner;
mod progress;
mod remote;

use clap::Parser;
use cli::{CacheCmd, Cli, Command, LinkCmd, PolicyCmd};
use cmd::{failover, mount, point, protect, report, setup};
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
            usage = Some(u.to_string());
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
        } => protect::process(&cmd::vault()?, vm, follow, every, cache),
        Command::Cache(CacheCmd::Serve {
            dir,
            listen,
            creds,
            insecure_loopback,
            capacity,
        }) => remote::serve(remote::ServeOptions {
            dir,
            listen,
            creds,
            insecure_loopback,
            capacity,
        })
        .map(done),
        Command::Link(LinkCmd::Export { out }) => setup::link_export(&out).map(done),
        Command::Link(LinkCmd::Init) => setup::link_init().map(done),
        Command::Mount {
            vm,
            point,
            listen,
            writable,
        } => mount::run(&vm, point, &listen, writable).map(done),
        Command::Agent(a) => cmd::agent::run(a).map(done),
        Command::Point(a) => point::run(a),
        Command::Points { vm, json } => report::points(&vm, json).map(done),
        Command::Status { vm, json } => report::status(vm, json).map(done),
        Command::Failover(f) => failover::failover(f, false, None).map(done),
        Command::TestFailover { f, network } => failover::failover(f, true, network).map(done),
        Command::FailoverCommit { vm } => failover::commit(&vm).map(done),
        Command::TestFailoverCleanup { vm } => failover::test_cleanup(&vm).map(done),
        Command::Verify { vm, point, json } => report::verify(&vm, point, json),
        Command::Demo { dir } => demo::run(dir).map(done),
    }
}
