//! Signal handlers of `run`: they only set atomic flags for the main loop.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{
    sigaction, sigprocmask, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
};

/// Set by SIGUSR1: a verified report is wanted.
static REPORT: AtomicBool = AtomicBool::new(false);
/// Set by SIGTERM / SIGINT: write the final status and exit.
static EXIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_report(_: libc::c_int) {
    REPORT.store(true, Ordering::SeqCst);
}

extern "C" fn on_exit(_: libc::c_int) {
    EXIT.store(true, Ordering::SeqCst);
}

/// The signals `run` handles.
const HANDLED: [Signal; 3] = [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT];

/// Installs the handlers with sigaction (needed anyway when the workload is
/// a PID namespace init, which ignores signals it has no handler for) and
/// unblocks the signals in case the spawner inherited a blocked mask.
pub fn install() -> Result<()> {
    for sig in HANDLED {
        let handler = if sig == Signal::SIGUSR1 {
            on_report
        } else {
            on_exit
        };
        let action = SigAction::new(
            SigHandler::Handler(handler),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("sigaction({sig})"))?;
    }
    let mut set = SigSet::empty();
    HANDLED.iter().for_each(|&s| set.add(s));
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None).context("sigprocmask")?;
    Ok(())
}

/// Restores the default dispositions (for a forked helper child).
pub fn reset_to_default() {
    let action = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in HANDLED {
        // SAFETY: restoring the default disposition.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Whether a report was requested since the last call (clears the flag).
pub fn take_report_request() -> bool {
    REPORT.swap(false, Ordering::SeqCst)
}

/// Whether SIGTERM or SIGINT arrived.
pub fn exit_requested() -> bool {
    EXIT.load(Ordering::SeqCst)
}
