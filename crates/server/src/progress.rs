//! Progress of the long commands (`sourced export`, `import`, `rebuild`; issue 18): a bar with
//! the rate and the time left on stderr when it is a terminal, nothing while it runs when it is
//! not (a pipe, a log file), and a one-line summary at the end either way.

use std::io::IsTerminal as _;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What a bar counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Unit {
    /// Events.
    Events,
    /// Bytes of the input.
    Bytes,
}

/// One command's bar.
pub(crate) struct Bar {
    bar: ProgressBar,
    started: Instant,
}

impl Bar {
    /// A bar of `len` units (unknown: a spinner), drawn only on a terminal.
    pub(crate) fn new(len: Option<u64>, unit: Unit) -> Bar {
        let target =
            if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(len, target);
        let counts = match unit {
            Unit::Events => "{human_pos}/{human_len} events, {per_sec}, {eta} left",
            Unit::Bytes => "{bytes}/{total_bytes}, {bytes_per_sec}, {eta} left",
        };
        let template = format!("{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {counts}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Bar { bar, started: Instant::now() }
    }

    /// How far it is.
    pub(crate) fn set(&self, position: u64) {
        self.bar.set_position(position);
    }

    /// Wraps a reader so the bytes read move the bar.
    pub(crate) fn wrap<R: std::io::Read>(&self, reader: R) -> indicatif::ProgressBarIter<R> {
        self.bar.wrap_read(reader)
    }

    /// Seconds since the bar began.
    pub(crate) fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Clears the bar and prints `summary` as the last line.
    pub(crate) fn finish(self, summary: &str) {
        self.bar.finish_and_clear();
        eprintln!("{summary}");
    }
}

/// `n` per second over `secs`, as a whole number.
pub(crate) fn rate(n: u64, secs: f64) -> String {
    format!("{:.0}", n as f64 / secs.max(1e-9))
}
