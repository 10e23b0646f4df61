//! `--linger-child`: a child that ignores SIGTERM and SIGINT and outlives
//! the workload (no parent-death signal, never killed by it), as a daemon's
//! stray helper would; only SIGKILL ends it. Tests use it to check that
//! stopping a tree stops all of it, not only its root.

use anyhow::{Context, Result};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, ForkResult, Pid};

use crate::signals;

/// Forks the lingering child and returns its pid.
pub fn start() -> Result<Pid> {
    // SAFETY: the workload is single-threaded here; the child only makes
    // async-signal-safe calls.
    match unsafe { fork() }.context("fork of the lingering child")? {
        ForkResult::Child => {
            signals::reset_to_default();
            for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
                // SAFETY: sets a disposition to SIG_IGN.
                let _ = unsafe { signal(sig, SigHandler::SigIgn) };
            }
            loop {
                // SAFETY: waits for a signal (only SIGKILL or SIGUSR1 come).
                unsafe { libc::pause() };
            }
        }
        ForkResult::Parent { child } => Ok(child),
    }
}
