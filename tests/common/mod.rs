//! Helpers the integration tests share (each test file is its own crate and takes this
//! module with `mod common;`): a throw-away vault directory with the `standby` command run
//! against it, a free port, a sha256 in hex, a clean stop by SIGINT, and qemu-io.
//!
//! Each test file adds what only it needs (how its vault is set up, how a failure must
//! look, how a server says it is up) in its own `impl Env`.

// Every test crate uses only some of these.
#![allow(dead_code)]

pub mod causal;
pub mod faultproxy;
pub mod objstores;

use serde_json::Value;
use standby_engine::vault::Sha256Hex;
use std::path::PathBuf;
use std::process::{Child, Command, Output};

/// A temporary directory (`root`, the commands' working directory) whose `vault` is
/// `STANDBY_VAULT` for every command run through it. Nothing is created in it yet.
pub struct Env {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub vault: PathBuf,
}

impl Env {
    pub fn empty() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Env {
            vault: root.join("vault"),
            root,
            _tmp: tmp,
        }
    }

    /// `standby ARGS` on this vault, run in `root` (with no RUST_BACKTRACE, so a panic
    /// shows as what an operator would see).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_standby"));
        c.args(args)
            .env("STANDBY_VAULT", &self.vault)
            .env_remove("RUST_BACKTRACE")
            .current_dir(&self.root);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "standby {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require success; returns stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

/// A TCP port on 127.0.0.1 nothing listens on (the OS's pick, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sha256 of `bytes`, in hex.
pub fn sha(bytes: &[u8]) -> String {
    let mut h = Sha256Hex::new();
    h.update(bytes);
    h.hex()
}

/// SIGINT a long-running command and require that it stops cleanly.
pub fn interrupt(child: &mut Child) {
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "clean stop on SIGINT, got {status}");
}

/// Run qemu-io's `cmds` against the raw image at `url`; require that every one worked
/// (qemu-io exits 0 even when a command, a pattern check say, fails: it then prints
/// "failed"). Returns what it printed.
pub fn qemu_io<S: AsRef<str> + std::fmt::Debug>(url: &str, cmds: &[S]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    let out = c.arg(url).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("fail"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// Kills (SIGKILL) the processes it names if dropped while the test panics: a failed
/// assertion must not leave a `process --follow` running against the shared servers.
pub struct ReapOnPanic(pub Vec<u32>);

impl Drop for ReapOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for pid in &self.0 {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
