//! The CLI explains itself: every argument of every command has a help text (walked over
//! clap's own description of the commands, so a new option without one fails here);
//! `--vault` is not offered where it means nothing; usage lines do not present optional
//! global options as required; `init` prints a path that works from anywhere;
//! `test-failover --help` names its real default output; `status --check` exits by health.

#[allow(dead_code)]
#[path = "../tools/cli.rs"]
mod cli;

mod common;

use clap::CommandFactory;
use common::Env;

/// Every argument (positional or option) of `cmd` and its subcommands without a help
/// text, as "standby sub --arg".
fn without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for a in cmd.get_arguments() {
        if a.is_hide_set() || ["help", "version"].contains(&a.get_id().as_str()) {
            continue;
        }
        let help = a
            .get_help()
            .or(a.get_long_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        if help.trim().is_empty() {
            let name = match a.get_long() {
                Some(l) => format!("--{l}"),
                None => format!("<{}>", a.get_id()),
            };
            out.push(format!("{path} {name}"));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        if sub
            .get_about()
            .is_none_or(|a| a.to_string().trim().is_empty())
        {
            out.push(format!("{path} {} (the command itself)", sub.get_name()));
        }
        without_help(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_argument_of_every_command_has_help() {
    let mut cmd = cli::Cli::command();
    cmd.build();
    let mut missing = Vec::new();
    without_help(&cmd, "standby", &mut missing);
    assert!(missing.is_empty(), "arguments without help: {missing:#?}");
}

#[test]
fn the_walk_finds_an_argument_without_help() {
    // The check above can fail: an argument with no doc comment is reported.
    let cmd = clap::Command::new("t").subcommand(
        clap::Command::new("s")
            .about("S.")
            .arg(clap::Arg::new("bare").long("bare")),
    );
    let mut missing = Vec::new();
    without_help(&cmd, "t", &mut missing);
    assert_eq!(missing, vec!["t s --bare".to_string()]);
}

fn help(env: &Env, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.push("--help");
    env.ok(&a)
}

#[test]
fn vault_is_not_offered_where_it_means_nothing() {
    let env = Env::empty();
    for args in [&["demo"][..], &["cache", "serve"]] {
        let h = help(&env, args);
        assert!(
            !h.contains("--vault"),
            "{args:?} --help lists --vault:\n{h}"
        );
        // Given anyway, it is refused (not silently ignored), in one line.
        let mut a = args.to_vec();
        a.extend(["--vault", "somewhere"]);
        if args == ["cache", "serve"] {
            a.extend(["--dir", "d", "--listen", "127.0.0.1:0", "--creds", "c"]);
        }
        let out = env.run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{a:?}: {err}");
        assert!(err.contains("without a vault"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!env.root.join("d").exists());
    }
    // Where it does mean something, it is listed.
    assert!(help(&env, &["status"]).contains("--vault"));
}

#[test]
fn usage_lines_do_not_show_vault_as_required() {
    let env = Env::empty();
    // clap puts the options given into the usage line of a usage error.
    let out = env.run(&[
        "point",
        "--vault",
        "v",
        "--wait",
        "1s",
        "--quiesce-command",
        "true",
        "web01",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("usage: standby point"), "{err}");
    assert!(!err.contains("--vault"), "{err}");
    assert!(!err.contains("--wait"), "{err}");
    let h = help(&env, &["point"]);
    let usage = h.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(!usage.contains("--vault"), "{usage}");
}

#[test]
fn init_prints_an_absolute_path_to_export() {
    let env = Env::empty();
    std::fs::create_dir(&env.root).ok();
    let out = env.ok(&["init", "relative-vault"]);
    let abs = env.root.join("relative-vault");
    let abs = abs.to_str().unwrap();
    assert!(
        out.contains(&format!("export STANDBY_VAULT={abs} ")),
        "{out}"
    );
    assert!(out.contains(&format!("created vault {abs}\n")), "{out}");
}

#[test]
fn test_failover_help_names_its_real_default_output() {
    let env = Env::empty();
    let h = help(&env, &["test-failover"]);
    assert!(h.contains("VAULT/test-failover/"), "{h}");
    let h = help(&env, &["failover"]);
    assert!(h.contains("VAULT/failover/TARGET-RG/VM"), "{h}");
}

#[test]
fn status_check_exits_by_health() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    env.ok(&["protect", "web01", "--disk", "os=new:1MiB"]);
    // No agent runs: warning.
    let out = env.run(&["status", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("warning"));
    // Without --check the same report exits 0.
    assert_eq!(env.run(&["status"]).status.code(), Some(0));

    // Its agent runs: healthy, 0 (json too).
    let mut agent = env
        .cmd(&["agent", "web01", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(agent.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("serving NBD"), "{line}");
    let out = env.run(&["status", "--check", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["vms"][0]["health"], "healthy", "{doc}");
    assert_eq!(out.status.code(), Some(0));
    common::interrupt(&mut agent);

    // A damaged replica manifest: critical, 2.
    let manifest = env.vault.join("vms/web01/replica/manifest");
    let mut bytes = std::fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&manifest, bytes).unwrap();
    let out = env.run(&["status", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("critical"));
}
