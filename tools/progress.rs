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
