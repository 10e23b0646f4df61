//! Event descriptors: inotify, eventfd, timerfd, signalfd and epoll, each
//! kept busy by the tick loop and checked through its own system calls.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::helper::{cvt, fdinfo, owned, pipe, wait_readable};
use super::{Check, Object};

/// Reads into `buf` from a non-blocking descriptor: Some(n), or None when
/// nothing is there (EAGAIN) or on an error.
fn read_nb(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: buf is valid for buf.len() bytes.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if r >= 0 {
        return Ok(Some(r as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

/// Writes all of `buf` to `fd` in one call.
fn write_all(fd: &OwnedFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: buf is valid for buf.len() bytes.
    let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r as usize != buf.len() {
        return Err(io::Error::other(format!("short write {r}/{}", buf.len())));
    }
    Ok(())
}

// ---------------------------------------------------------------- inotify

/// An inotify watch on a directory; each check creates and removes a file
/// in it and expects both events.
pub struct Inotify {
    fd: OwnedFd,
    wd: i32,
    dir: PathBuf,
    probes: u64,
    /// Events drained outside checks.
    other_events: u64,
}

impl Inotify {
    pub fn new(dir: &Path) -> Result<Inotify> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // SAFETY: plain syscall.
        let fd = owned(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })
            .context("inotify_init1")?;
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: a NUL-terminated path.
        let wd = cvt(unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CREATE | libc::IN_DELETE,
            )
        })
        .context("inotify_add_watch")?;
        Ok(Inotify {
            fd,
            wd,
            dir: dir.to_path_buf(),
            probes: 0,
            other_events: 0,
        })
    }

    /// Reads the queued events: (wd, mask, name).
    fn events(&mut self) -> io::Result<Vec<(i32, u32, String)>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(n) = read_nb(&self.fd, &mut buf)? {
            let mut at = 0;
            while at + 16 <= n {
                let word = |i: usize| {
                    u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap_or_default())
                };
                let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
                let name = &buf[at + 16..(at + 16 + len).min(n)];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                out.push((wd, mask, String::from_utf8_lossy(name).into_owned()));
                at += 16 + len;
            }
        }
        Ok(out)
    }

    /// Waits up to 1 s for the event (`mask`, `name`) on our watch.
    fn expect(&mut self, mask: u32, name: &str) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(1);
        loop {
            let evs = self.events().map_err(|e| format!("read: {e}"))?;
            if evs
                .iter()
                .any(|(wd, m, n)| *wd == self.wd && m & mask != 0 && n == name)
            {
                return Ok(());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(self.fd.as_raw_fd(), left) {
                return Err(format!("no event {mask:#x} for {name} within 1 s"));
            }
        }
    }
}

impl Object for Inotify {
    fn tick(&mut self, counter: u64) {
        if counter % 100 == 0 {
            if let Ok(evs) = self.events() {
                self.other_events += evs.len() as u64;
            }
        }
    }

    fn verify(&mut self) -> Check {
        let _ = self.events();
        self.probes += 1;
        let name = format!("probe-{}-{}", std::process::id(), self.probes);
        let path = self.dir.join(&name);
        let mut problems = Vec::new();
        if let Err(e) = File::create(&path) {
            problems.push(format!("creating {}: {e}", path.display()));
        } else if let Err(e) = self.expect(libc::IN_CREATE, &name) {
            problems.push(e);
        }
        if let Err(e) = fs::remove_file(&path) {
            problems.push(format!("removing {}: {e}", path.display()));
        } else if let Err(e) = self.expect(libc::IN_DELETE, &name) {
            problems.push(e);
        }
        let watches = fdinfo(self.fd.as_raw_fd())
            .lines()
            .filter(|l| l.starts_with("inotify wd:"))
            .count();
        if watches != 1 {
            problems.push(format!("{watches} watches in fdinfo (expected 1)"));
        }
        Check::unless(
            problems,
            format!(
                "wd {} on {}: IN_CREATE and IN_DELETE of {name} reported",
                self.wd,
                self.dir.display()
            ),
        )
    }
}

// ---------------------------------------------------------------- eventfd

/// Initial value of the eventfd counter.
const EVENTFD_INITIAL: u64 = 1000;

/// An eventfd whose counter grows by 3 every 10 ticks and is never consumed
/// (the check reads it and writes it back).
pub struct EventFd {
    fd: OwnedFd,
    expected: u64,
    errors: Vec<String>,
}

impl EventFd {
    pub fn new() -> Result<EventFd> {
        // SAFETY: plain syscall.
        let fd = owned(unsafe {
            libc::eventfd(
                EVENTFD_INITIAL as libc::c_uint,
                libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
            )
        })
        .context("eventfd")?;
        Ok(EventFd {
            fd,
            expected: EVENTFD_INITIAL,
            errors: Vec::new(),
        })
    }
}

impl Object for EventFd {
    fn tick(&mut self, counter: u64) {
        if counter % 10 == 0 {
            match write_all(&self.fd, &3u64.to_ne_bytes()) {
                Ok(()) => self.expected += 3,
                Err(e) if self.errors.is_empty() => self.errors.push(format!("write: {e}")),
                Err(_) => {}
            }
        }
    }

    fn verify(&mut self) -> Check {
        let mut problems = self.errors.clone();
        let info = fdinfo(self.fd.as_raw_fd());
        let shown = info
            .lines()
            .find_map(|l| l.strip_prefix("eventfd-count:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        if shown != Some(self.expected) {
            problems.push(format!("fdinfo count {shown:?}"));
        }
        let mut buf = [0u8; 8];
        let read = match read_nb(&self.fd, &mut buf) {
            Ok(Some(8)) => {
                let v = u64::from_ne_bytes(buf);
                // Put the value back: the counter is never consumed.
                if let Err(e) = write_all(&self.fd, &buf) {
                    problems.push(format!("writing it back: {e}"));
                }
                Some(v)
            }
            Ok(other) => {
                problems.push(format!("read gave {other:?}"));
                None
            }
            Err(e) => {
                problems.push(format!("read: {e}"));
                None
            }
        };
        if read != Some(self.expected) {
            problems.push(format!("read {read:?}"));
        }
        Check::unless(problems, format!("counter {} as expected", self.expected))
    }
}

// ---------------------------------------------------------------- timerfd

/// The timer's period.
const TIMER_PERIOD_NS: i64 = 10_000_000;

/// A periodic CLOCK_MONOTONIC timerfd, read every tick.
pub struct TimerFd {
    fd: OwnedFd,
    expirations: u64,
    errors: Vec<String>,
}

impl TimerFd {
    pub fn new() -> Result<TimerFd> {
        // SAFETY: plain syscalls with a valid itimerspec.
        let fd = owned(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })
        .context("timerfd_create")?;
        let period = libc::timespec {
            tv_sec: 0,
            tv_nsec: TIMER_PERIOD_NS,
        };
        let spec = libc::itimerspec {
            it_interval: period,
            it_value: period,
        };
        // SAFETY: valid pointers.
        cvt(unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })
            .context("timerfd_settime")?;
        Ok(TimerFd {
            fd,
            expirations: 0,
            errors: Vec::new(),
        })
    }

    /// Reads and counts the expirations so far (0 when none).
    fn drain(&mut self) -> u64 {
        let mut buf = [0u8; 8];
        match read_nb(&self.fd, &mut buf) {
            Ok(Some(8)) => {
                let n = u64::from_ne_bytes(buf);
                self.expirations += n;
                n
            }
            Ok(_) => 0,
            Err(e) => {
                if self.errors.is_empty() {
                    self.errors.push(format!("read: {e}"));
                }
                0
            }
        }
    }
}

impl Object for TimerFd {
    fn tick(&mut self, _counter: u64) {
        self.drain();
    }

    fn verify(&mut self) -> Check {
        let mut problems = self.errors.clone();
        // SAFETY: an all-zero itimerspec is valid output space.
        let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer.
        if unsafe { libc::timerfd_gettime(self.fd.as_raw_fd(), &mut cur) } < 0 {
            problems.push(format!("timerfd_gettime: {}", io::Error::last_os_error()));
        }
        let interval_ns =
            cur.it_interval.tv_sec as i64 * 1_000_000_000 + cur.it_interval.tv_nsec as i64;
        let next_ns = cur.it_value.tv_sec as i64 * 1_000_000_000 + cur.it_value.tv_nsec as i64;
        if interval_ns != TIMER_PERIOD_NS {
            problems.push(format!("interval {interval_ns} ns"));
        }
        if next_ns == 0 {
            problems.push("disarmed".into());
        }
        // It fires again within a few periods.
        self.drain();
        let start = Instant::now();
        let mut fresh = 0;
        while fresh == 0 && start.elapsed() < Duration::from_millis(500) {
            wait_readable(self.fd.as_raw_fd(), Duration::from_millis(100));
            fresh = self.drain();
        }
        if fresh == 0 {
            problems.push("no expiration within 500 ms".into());
        }
        let state = if next_ns == 0 {
            "disarmed".to_string()
        } else {
            format!("armed (next in {} us)", next_ns / 1000)
        };
        let fired = if fresh == 0 {
            "did not fire".to_string()
        } else {
            format!("fired again after {} us", start.elapsed().as_micros())
        };
        Check::unless(
            problems,
            format!(
                "{state}, interval {} ms, {fired}, {} expirations in all",
                interval_ns / 1_000_000,
                self.expirations
            ),
        )
    }
}

// ---------------------------------------------------------------- signalfd

/// The signal the signalfd reads (blocked in the workload).
fn signalfd_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

/// A signalfd for a blocked real-time signal; checks queue the signal with
/// a fresh value and read it back (also every 100 ticks).
pub struct SignalFd {
    fd: OwnedFd,
    sent: u64,
    received: u64,
    errors: Vec<String>,
}

impl SignalFd {
    pub fn new() -> Result<SignalFd> {
        let sig = signalfd_signal();
        // SAFETY: sigset manipulation on a local; sigprocmask/signalfd with
        // valid pointers.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            cvt(libc::sigprocmask(
                libc::SIG_BLOCK,
                &set,
                std::ptr::null_mut(),
            ))
            .context("sigprocmask")?;
            owned(libc::signalfd(
                -1,
                &set,
                libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
            ))
            .context("signalfd")?
        };
        Ok(SignalFd {
            fd,
            sent: 0,
            received: 0,
            errors: Vec::new(),
        })
    }

    /// Queues the signal to ourselves with a fresh value and reads it back.
    fn round_trip(&mut self) -> Result<String, String> {
        let sig = signalfd_signal();
        self.sent += 1;
        let value = 0x5eed_0000_i64 + self.sent as i64;
        // SAFETY: plain calls; sigval carries an integer here.
        let pid = unsafe { libc::getpid() };
        let sv = libc::sigval {
            sival_ptr: value as usize as *mut libc::c_void,
        };
        // SAFETY: as above.
        if unsafe { libc::sigqueue(pid, sig, sv) } < 0 {
            return Err(format!("sigqueue: {}", io::Error::last_os_error()));
        }
        wait_readable(self.fd.as_raw_fd(), Duration::from_secs(1));
        let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match read_nb(&self.fd, &mut buf) {
            Ok(Some(n)) if n == buf.len() => {}
            Ok(other) => return Err(format!("read gave {other:?}")),
            Err(e) => return Err(format!("read: {e}")),
        }
        // SAFETY: the kernel wrote a whole signalfd_siginfo.
        let info: libc::signalfd_siginfo = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        self.received += 1;
        if info.ssi_signo != sig as u32
            || info.ssi_code != libc::SI_QUEUE
            || info.ssi_int != value as i32
            || info.ssi_pid != pid as u32
        {
            return Err(format!(
                "read signo {} code {} value {:#x} pid {}, expected {sig} SI_QUEUE {value:#x} {pid}",
                info.ssi_signo, info.ssi_code, info.ssi_int, info.ssi_pid
            ));
        }
        Ok(format!("signal {sig} value {value:#x} from pid {pid}"))
    }
}

impl Object for SignalFd {
    fn tick(&mut self, counter: u64) {
        if counter % 100 == 0 && self.errors.is_empty() {
            if let Err(e) = self.round_trip() {
                self.errors.push(e);
            }
        }
    }

    fn verify(&mut self) -> Check {
        let mut problems = self.errors.clone();
        let sig = signalfd_signal();
        // Still blocked, and still what the signalfd waits for.
        // SAFETY: querying the mask into a local.
        let blocked = unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, sig) == 1
        };
        if !blocked {
            problems.push(format!("signal {sig} no longer blocked"));
        }
        let mask = fdinfo(self.fd.as_raw_fd())
            .lines()
            .find_map(|l| l.strip_prefix("sigmask:").map(|v| v.trim().to_string()))
            .and_then(|v| u64::from_str_radix(&v, 16).ok());
        if mask != Some(1u64 << (sig - 1)) {
            problems.push(format!("fdinfo sigmask {mask:?}"));
        }
        let detail = match self.round_trip() {
            Ok(d) => d,
            Err(e) => {
                problems.push(e);
                String::new()
            }
        };
        Check::unless(
            problems,
            format!(
                "read back {detail}; {} of {} queued signals read",
                self.received, self.sent
            ),
        )
    }
}

// ---------------------------------------------------------------- epoll

/// Tags of the epoll set's members.
const TAG_EVENTFD: u64 = 1;
const TAG_PIPE_IN: u64 = 2;
const TAG_PIPE_OUT: u64 = 3;
const TAG_IDLE: u64 = 4;

/// An epoll set: an eventfd with a count (readable), a pipe with a byte in
/// it (read end readable, write end writable) and an empty pipe (idle).
pub struct Epoll {
    ep: OwnedFd,
    _efd: OwnedFd,
    _pipe: (File, File),
    idle: (File, File),
    rounds: u64,
    errors: Vec<String>,
}

impl Epoll {
    pub fn new() -> Result<Epoll> {
        // SAFETY: plain syscalls.
        let ep = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).context("epoll")?;
        // SAFETY: plain syscall.
        let efd = owned(unsafe { libc::eventfd(1, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        let (prd, mut pwr) = pipe(libc::O_NONBLOCK)?;
        pwr.write_all(b"x")?;
        let idle = pipe(libc::O_NONBLOCK)?;
        let add = |fd: i32, events: i32, tag: u64| -> Result<()> {
            let mut ev = libc::epoll_event {
                events: events as u32,
                u64: tag,
            };
            // SAFETY: a valid epoll_event.
            cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
                .context("epoll_ctl")?;
            Ok(())
        };
        add(efd.as_raw_fd(), libc::EPOLLIN, TAG_EVENTFD)?;
        add(prd.as_raw_fd(), libc::EPOLLIN, TAG_PIPE_IN)?;
        add(pwr.as_raw_fd(), libc::EPOLLOUT, TAG_PIPE_OUT)?;
        add(idle.0.as_raw_fd(), libc::EPOLLIN, TAG_IDLE)?;
        Ok(Epoll {
            ep,
            _efd: efd,
            _pipe: (prd, pwr),
            idle,
            rounds: 0,
            errors: Vec::new(),
        })
    }

    /// The ready members now: (tag, events), sorted.
    fn ready(&self) -> Vec<(u64, u32)> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: evs has room for 8 events.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), 8, 0) };
        let mut out: Vec<(u64, u32)> = evs[..n.max(0) as usize]
            .iter()
            .map(|e| (e.u64, e.events))
            .collect();
        out.sort_unstable();
        out
    }

    /// One round: the fixed ready set, the idle member waking up when a
    /// byte is written to it and going quiet again when it is read.
    fn round(&mut self) -> Result<(), String> {
        self.rounds += 1;
        let base = vec![
            (TAG_EVENTFD, libc::EPOLLIN as u32),
            (TAG_PIPE_IN, libc::EPOLLIN as u32),
            (TAG_PIPE_OUT, libc::EPOLLOUT as u32),
        ];
        let got = self.ready();
        if got != base {
            return Err(format!("ready {got:?}, expected {base:?}"));
        }
        self.idle.1.write_all(b"y").map_err(|e| format!("{e}"))?;
        let mut woke = base.clone();
        woke.push((TAG_IDLE, libc::EPOLLIN as u32));
        let got = self.ready();
        if got != woke {
            return Err(format!("after a write: ready {got:?}, expected {woke:?}"));
        }
        let mut b = [0u8; 1];
        self.idle.0.read_exact(&mut b).map_err(|e| format!("{e}"))?;
        let got = self.ready();
        if got != base {
            return Err(format!("after the read: ready {got:?}, expected {base:?}"));
        }
        Ok(())
    }
}

impl Object for Epoll {
    fn tick(&mut self, counter: u64) {
        if counter % 100 == 0 && self.errors.is_empty() {
            if let Err(e) = self.round() {
                self.errors.push(e);
            }
        }
    }

    fn verify(&mut self) -> Check {
        let mut problems = self.errors.clone();
        if let Err(e) = self.round() {
            problems.push(e);
        }
        Check::unless(
            problems,
            format!(
                "eventfd IN, pipe IN, pipe OUT ready; idle pipe only after a write ({} rounds)",
                self.rounds
            ),
        )
    }
}
