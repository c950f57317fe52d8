//! Progress bars on stderr, drawn only when stderr is a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use standby_engine::vault::Progress;
use std::io::IsTerminal;

pub struct Bar {
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Bar {
    pub fn new() -> Bar {
        Bar {
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }
}

impl Bar {
    /// A bar that draws nothing when `quiet` (with `--json`: stderr stays for errors).
    pub fn quiet_if(quiet: bool) -> Bar {
        let mut b = Bar::new();
        b.tty &= !quiet;
        b
    }
}

impl Progress for Bar {
    fn begin(&mut self, label: &str, total_bytes: u64) {
        if !self.tty {
            return;
        }
        let bar = ProgressBar::new(total_bytes);
        let style = ProgressStyle::with_template(
            "{msg:>20} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        self.bar = Some(bar);
    }
    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn end(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A spinner with the elapsed time on stderr while something runs elsewhere (a test
/// failover or a mount answered by the VM's running owner, which reports only at the
/// end); drawn only on a terminal, cleared when dropped or [`Spinner::stop`]ped.
pub struct Spinner {
    bar: Option<ProgressBar>,
}

impl Spinner {
    pub fn start(msg: &str) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner { bar: None };
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Spinner { bar: Some(bar) }
    }

    /// A spinner that draws nothing (for `--json`).
    pub fn none() -> Spinner {
        Spinner { bar: None }
    }

    pub fn set_message(&mut self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }

    pub fn stop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}
