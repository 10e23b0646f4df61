//! `--extras`: an append-only log file, a pipe and a child process writing
//! sequence numbers into it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, getpid, getppid, pipe2, ForkResult, Pid};

use crate::status::Status;
use crate::{signals, sys};

/// Log file name inside the state directory.
pub const LOG_FILE: &str = "extras.log";
/// A log line is written every this many ticks.
const LOG_EVERY_TICKS: u64 = 10;
/// The child writes a sequence number this often.
const CHILD_PERIOD_NS: u64 = 5_000_000;

/// State of the extras, owned by the main loop.
pub struct Extras {
    /// `<state-dir>/extras.log`, opened for append.
    log: File,
    /// Last number written to the log.
    log_lines: u64,
    /// Non-blocking read end of the pipe.
    pipe: File,
    /// Bytes of an incomplete 8-byte message.
    partial: Vec<u8>,
    /// Messages received.
    pipe_msgs: u64,
    /// Messages that were not the previous one plus one.
    pipe_seq_errors: u64,
    /// Last sequence number received (0 before the first).
    last_seq: u64,
    /// The child, as seen by us.
    child: Pid,
    /// Whether the child was reaped.
    child_exited: bool,
}

impl Extras {
    /// Forks the child first (so it does not share the big memory area), then
    /// opens the log.
    pub fn start(state_dir: &Path) -> Result<Extras> {
        let (rd, wr) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
        let parent = getpid();
        // SAFETY: the workload is single-threaded; the child only uses
        // async-signal-safe calls plus writes to its own copy of memory.
        match unsafe { fork() }.context("fork of the extras child")? {
            ForkResult::Child => {
                drop(rd);
                child_main(File::from(wr), parent)
            }
            ForkResult::Parent { child } => {
                drop(wr);
                fcntl(rd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                    .context("making the pipe non-blocking")?;
                let path = state_dir.join(LOG_FILE);
                let log = match OpenOptions::new().create(true).append(true).open(&path) {
                    Ok(log) => log,
                    Err(e) => {
                        let _ = kill(child, Signal::SIGKILL);
                        let _ = waitpid(child, None);
                        return Err(e).with_context(|| format!("opening {}", path.display()));
                    }
                };
                Ok(Extras {
                    log,
                    log_lines: 0,
                    pipe: File::from(rd),
                    partial: Vec::with_capacity(8),
                    pipe_msgs: 0,
                    pipe_seq_errors: 0,
                    last_seq: 0,
                    child,
                    child_exited: false,
                })
            }
        }
    }

    /// Per-tick work: a log line every 10 ticks, then drain the pipe.
    pub fn tick(&mut self, counter: u64) {
        if counter % LOG_EVERY_TICKS == 0 {
            let line = format!("{}\n", self.log_lines + 1);
            match self.log.write_all(line.as_bytes()) {
                Ok(()) => self.log_lines += 1,
                Err(e) => eprintln!("phaul-workload: writing {LOG_FILE}: {e}"),
            }
        }
        self.drain_pipe();
    }

    /// Reads every available message from the pipe.
    fn drain_pipe(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.pipe.read(&mut buf) {
                Ok(0) => return, // the child is gone
                Ok(n) => {
                    for &b in &buf[..n] {
                        self.partial.push(b);
                        if self.partial.len() == 8 {
                            let mut word = [0u8; 8];
                            word.copy_from_slice(&self.partial);
                            self.partial.clear();
                            self.message(u64::from_le_bytes(word));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock (or nothing sensible to do)
            }
        }
    }

    /// Accounts one sequence number.
    fn message(&mut self, seq: u64) {
        self.pipe_msgs += 1;
        if seq != self.last_seq.wrapping_add(1) {
            self.pipe_seq_errors += 1;
        }
        self.last_seq = seq;
    }

    /// Notes reaped children (from [`sys::reap_children`]).
    pub fn reaped(&mut self, pids: &[Pid]) {
        if pids.contains(&self.child) {
            self.child_exited = true;
        }
    }

    /// Whether the child runs: not reaped, and `kill(child, 0)` succeeds.
    pub fn child_alive(&mut self) -> bool {
        let reaped = sys::reap_children();
        self.reaped(&reaped);
        !self.child_exited && kill(self.child, None).is_ok()
    }

    /// Fills the extras fields of `status`.
    pub fn fill_status(&mut self, status: &mut Status) {
        status.extras_log_lines = self.log_lines;
        status.pipe_msgs = self.pipe_msgs;
        status.pipe_seq_errors = self.pipe_seq_errors;
        status.child_pid = self.child.as_raw();
        status.child_alive = self.child_alive();
    }

    /// Kills and reaps the child.
    pub fn shutdown(&mut self) {
        if !self.child_exited {
            let _ = kill(self.child, Signal::SIGKILL);
            let _ = waitpid(self.child, None);
            self.child_exited = true;
        }
    }
}

/// The child: writes 1, 2, 3, ... (8 bytes little endian) into the pipe every
/// ~5 ms until the parent goes away.
fn child_main(mut pipe: File, parent: Pid) -> ! {
    signals::reset_to_default();
    // Die with the parent; if it already died, stop now.
    // SAFETY: plain prctl call.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let mut seq: u64 = 0;
    while getppid() == parent {
        seq += 1;
        if pipe.write_all(&seq.to_le_bytes()).is_err() {
            break;
        }
        sys::sleep_ns(CHILD_PERIOD_NS);
    }
    // SAFETY: leave without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}
