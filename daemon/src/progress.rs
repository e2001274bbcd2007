//! The progress bar of `tern migrate` and `tern demo` (only on a terminal).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tern_engine::SourceProgress;
use tokio::sync::watch;

/// A byte progress bar on stderr; hidden when stderr is not a terminal or `quiet` is set.
pub(crate) fn bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Shows progress from `rx` until the sender is dropped. Returns `None` (shows nothing) when
/// stderr is not a terminal or `quiet` is set.
pub(crate) fn spawn(
    rx: watch::Receiver<SourceProgress>,
    quiet: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    let bar = bar(rx.borrow().bytes_total, quiet);
    if bar.is_hidden() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut rx = rx;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                _ = tick.tick() => {}
            }
            let progress = rx.borrow().clone();
            bar.set_length(progress.bytes_total);
            bar.set_position(progress.bytes_done);
            bar.set_message(progress.phase);
        }
        bar.finish_and_clear();
    }))
}
