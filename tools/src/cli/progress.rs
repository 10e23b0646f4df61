//! Progress bars (indicatif) for the memory passes and the phases after
//! them, drawn on standard error.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use phaul_core::engine::iter::PassStats;
use phaul_core::engine::report::Progress;

/// One bar per memory pass, then a spinner line per phase.
#[derive(Debug, Default)]
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    /// No bar yet.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Progress for Bars {
    fn pass_started(&self, iteration: u32, kind: &str, expected_bytes: u64) {
        let bar = ProgressBar::new(expected_bytes.max(1));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("pass {iteration}"));
        bar.set_message(kind.to_string());
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }

    fn pass_progress(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if bytes > b.length().unwrap_or(0) {
                b.set_length(bytes);
            }
            b.set_position(bytes);
        }
    }

    fn pass_finished(&self, stats: &PassStats) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.set_length(stats.bytes.max(1));
            b.set_position(stats.bytes);
            b.finish_with_message(format!(
                "{} pages",
                stats.pages_written.max(stats.bytes / 4096)
            ));
        }
    }

    fn phase(&self, what: &str) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            b.set_message(what.to_string());
        }
    }
}
