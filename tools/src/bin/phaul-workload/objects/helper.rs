//! Plumbing shared by the object checks: raw-fd helpers, and the processes
//! they fork — long-lived helpers that answer check requests over a pair of
//! pipes, and one-shot children that check something from a second process.
//!
//! Every forked process starts with [`isolate`]: default signal handlers,
//! stdio on /dev/null, no inherited descriptor except the ones it needs
//! (a migrated tree must not hold descriptors its dumper cannot name), and
//! SIGKILL when its parent dies.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use super::Check;
use crate::signals;

/// How long a helper may take to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// `Err(last OS error)` for a negative libc return value.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor a libc call returned.
pub fn owned(ret: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a fresh descriptor nobody else owns.
    cvt(ret).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec pipe with `flags` (e.g. O_NONBLOCK) on both ends:
/// (read end, write end).
pub fn pipe(flags: libc::c_int) -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) })?;
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Waits until `fd` is readable (or hung up), at most `timeout`; signals
/// interrupting the wait do not shorten it.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
        if r > 0 {
            return true;
        }
        if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Reads one `\n`-terminated line from a blocking pipe within `timeout`.
pub fn read_line(f: &mut File, timeout: Duration) -> io::Result<String> {
    let end = Instant::now() + timeout;
    let mut line = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || !wait_readable(f.as_raw_fd(), left) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
        }
        let mut b = [0u8; 1];
        match f.read(&mut b) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The text of `/proc/self/fdinfo/<fd>` (empty if unreadable).
pub fn fdinfo(fd: RawFd) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default()
}

/// `_exit`: leaves a forked child without running the parent's cleanup.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: always safe to call.
    unsafe { libc::_exit(code) }
}

/// Sleeps about `ms` milliseconds (interruptions end it early).
pub fn sleep_ms(ms: u64) {
    crate::sys::sleep_ns(ms * 1_000_000);
}

/// The start of every forked process: named `name`, default signal
/// handlers, no signal blocked, SIGKILL when the parent dies, stdio on
/// /dev/null and every descriptor but `keep` closed.
pub fn isolate(name: &CStr, keep: &[RawFd]) {
    signals::reset_to_default();
    // SAFETY: an emptied local sigset.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    // SAFETY: plain prctl calls; PR_SET_NAME reads a NUL-terminated string.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    // SAFETY: open/dup2/close_range on descriptors of this process only.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for std_fd in 0..3 {
                libc::dup2(null, std_fd);
            }
        }
        let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&k| k > 2).collect();
        keep.sort_unstable();
        let mut lo: u32 = 3;
        for k in keep {
            let k = k as u32;
            if k > lo {
                libc::close_range(lo, k - 1, 0);
            }
            lo = k + 1;
        }
        libc::close_range(lo, u32::MAX, 0);
    }
}

/// The helper's side of its two pipes.
pub struct Channel {
    req: File,
    resp: File,
}

impl Channel {
    /// Blocks until the workload asks for a check; false once it is gone.
    pub fn wait_request(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.req.read(&mut b) {
                Ok(1) => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return false,
            }
        }
    }

    /// Sends one answer (the first one is the helper's "ready" line).
    pub fn reply(&mut self, ok: bool, detail: &str) {
        let line = format!("{} {}\n", u8::from(ok), detail.replace('\n', " "));
        let _ = self.resp.write_all(line.as_bytes());
    }

    /// The descriptors the helper must keep.
    pub fn fds(&self) -> [RawFd; 2] {
        [self.req.as_raw_fd(), self.resp.as_raw_fd()]
    }
}

/// A long-lived helper process answering check requests.
pub struct Helper {
    pub pid: Pid,
    req: File,
    resp: File,
}

/// Parses an answer line: `1 detail` or `0 detail`.
fn parse_answer(line: &str) -> Check {
    match line.split_once(' ') {
        Some(("1", d)) => Check::pass(d),
        Some(("0", d)) => Check::fail(d),
        _ => Check::fail(format!("malformed answer {line:?}")),
    }
}

impl Helper {
    /// Forks a helper named `name` that keeps only its pipes and runs
    /// `body` (which opens what it needs itself); `body` must first `reply`
    /// once (the ready line, whose detail is returned here), then serve
    /// requests. The helper exits when `body` returns.
    pub fn start(name: &CStr, body: impl FnOnce(Channel)) -> Result<(Helper, String)> {
        let (req_rd, req_wr) = pipe(0).context("pipe")?;
        let (resp_rd, resp_wr) = pipe(0).context("pipe")?;
        // SAFETY: the workload is single-threaded; the child goes its own way.
        match unsafe { fork() }.context("fork")? {
            ForkResult::Child => {
                drop(req_wr);
                drop(resp_rd);
                let ch = Channel {
                    req: req_rd,
                    resp: resp_wr,
                };
                isolate(name, &ch.fds());
                body(ch);
                exit_now(0)
            }
            ForkResult::Parent { child } => {
                drop(req_rd);
                drop(resp_wr);
                let mut h = Helper {
                    pid: child,
                    req: req_wr,
                    resp: resp_rd,
                };
                let ready = match read_line(&mut h.resp, ANSWER_TIMEOUT) {
                    Ok(line) => parse_answer(&line),
                    Err(e) => Check::fail(format!("no ready line: {e}")),
                };
                if !ready.ok {
                    h.kill();
                    bail!("helper {name:?} did not start: {}", ready.detail);
                }
                Ok((h, ready.detail))
            }
        }
    }

    /// Asks for a check and returns the helper's answer.
    pub fn ask(&mut self) -> Check {
        if let Err(e) = self.req.write_all(b"?") {
            return Check::fail(format!("helper {} unreachable: {e}", self.pid));
        }
        match read_line(&mut self.resp, ANSWER_TIMEOUT) {
            Ok(line) => parse_answer(&line),
            Err(e) => Check::fail(format!("helper {} did not answer: {e}", self.pid)),
        }
    }

    /// SIGKILLs the helper (its own children die with it) and reaps it.
    pub fn kill(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// Runs `check` in a forked one-shot child (a second process, e.g. to see
/// the workload's file locks from outside) and returns its result.
pub fn check_in_child(name: &CStr, check: impl FnOnce() -> Check) -> Check {
    let (mut rd, mut wr) = match pipe(0) {
        Ok(p) => p,
        Err(e) => return Check::fail(format!("pipe: {e}")),
    };
    // SAFETY: the workload is single-threaded; the child only checks and
    // exits.
    match unsafe { fork() } {
        Err(e) => Check::fail(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(rd);
            isolate(name, &[wr.as_raw_fd()]);
            let c = check();
            let line = format!("{} {}\n", u8::from(c.ok), c.detail.replace('\n', " "));
            let _ = wr.write_all(line.as_bytes());
            exit_now(0)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(wr);
            let answer = read_line(&mut rd, ANSWER_TIMEOUT);
            if answer.is_err() {
                let _ = kill(child, Signal::SIGKILL);
            }
            let _ = waitpid(child, None);
            match answer {
                Ok(line) => parse_answer(&line),
                Err(e) => Check::fail(format!("checking child: {e}")),
            }
        }
    }
}
