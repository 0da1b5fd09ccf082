//! The progress bar of a long pass (a first pull of a large mailbox):
//! messages, bytes, rate and ETA, on stderr when it is a terminal and
//! `imapull run` was asked for; never in the daemon, under `-q`, or when
//! stderr is a pipe or the journal. The log goes around it
//! ([`suspend`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A pass with fewer messages and bytes than these is over before a bar
/// would say anything.
pub const MIN_MESSAGES: usize = 200;
pub const MIN_BYTES: u64 = 50 << 20;

static ENABLED: AtomicBool = AtomicBool::new(false);
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Turns bars on (the caller checked that stderr is a terminal).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

fn bars() -> &'static MultiProgress {
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Runs `f` (a log line) with the bars out of its way.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    if ENABLED.load(Ordering::Relaxed) {
        bars().suspend(f)
    } else {
        f()
    }
}

/// One pass's bar; cleared when dropped.
pub struct Bar {
    bar: ProgressBar,
    done: AtomicUsize,
    total: usize,
}

/// A bar for a pass of `messages` messages and `bytes` bytes, if bars are
/// on and the pass is long enough to want one.
pub fn start(mailbox: &str, messages: usize, bytes: u64) -> Option<Bar> {
    if !ENABLED.load(Ordering::Relaxed) || (messages < MIN_MESSAGES && bytes < MIN_BYTES) {
        return None;
    }
    let style = ProgressStyle::with_template(
        "{prefix} {wide_bar} {bytes}/{total_bytes} {msg}, {bytes_per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = bars().add(ProgressBar::new(bytes).with_style(style));
    bar.set_prefix(mailbox.to_string());
    bar.set_message(format!("0/{messages} messages"));
    Some(Bar {
        bar,
        done: AtomicUsize::new(0),
        total: messages,
    })
}

impl Bar {
    /// One more message dealt with, of `bytes` bytes.
    pub fn advance(&self, bytes: u64) {
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.inc(bytes);
        self.bar.set_message(format!("{n}/{} messages", self.total));
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        bars().remove(&self.bar);
    }
}
