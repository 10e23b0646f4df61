//! Process objects: a helper with threads that each have their own signal
//! mask and alternate signal stack, a zombie kept by a helper, and a
//! session with several process groups.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, getpgid, getpid, getsid, ForkResult, Pid};

use super::helper::{
    exit_now, isolate, pipe, read_line, sleep_ms, Channel, Helper, ANSWER_TIMEOUT,
};
use super::{Check, Object};

// ---------------------------------------------------------------- threads

/// The signal each thread sends itself to see which stack its handler runs
/// on (never blocked by any thread).
fn probe_signal() -> libc::c_int {
    libc::SIGRTMIN() + 8
}

/// Where the last probe handler's stack was.
static PROBE_SP: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_probe(_: libc::c_int) {
    let marker = 0u8;
    PROBE_SP.store(std::ptr::addr_of!(marker) as usize, Ordering::SeqCst);
}

/// The signals thread `i` blocks.
fn thread_mask(i: usize) -> Vec<libc::c_int> {
    let rt = libc::SIGRTMIN();
    match i {
        0 => vec![libc::SIGUSR2],
        1 => vec![libc::SIGHUP, rt + 2],
        _ => vec![libc::SIGWINCH, libc::SIGTTIN, rt + 3, rt + 4],
    }
}

/// Size of thread `i`'s alternate signal stack.
fn altstack_size(i: usize) -> usize {
    (64 + 32 * i) << 10
}

const THREADS: usize = 3;

/// Thread `i`: sets its mask and its alternate stack, then checks both on
/// each request.
fn thread_main(i: usize, requests: mpsc::Receiver<()>, answers: mpsc::Sender<Check>) {
    let mut wanted = thread_mask(i);
    wanted.sort_unstable();
    let size = altstack_size(i);
    // SAFETY: sigset manipulation on locals, a fresh anonymous mapping for
    // the stack, sigaltstack with a valid stack_t.
    let stack = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in &wanted {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        let sp = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let ss = libc::stack_t {
            ss_sp: sp,
            ss_flags: 0,
            ss_size: size,
        };
        if sp == libc::MAP_FAILED || libc::sigaltstack(&ss, std::ptr::null_mut()) != 0 {
            let _ = answers.send(Check::fail(format!("thread {i}: no alternate stack")));
            return;
        }
        sp as usize
    };
    let _ = answers.send(Check::pass("ready"));
    while requests.recv().is_ok() {
        let mut problems = Vec::new();
        // SAFETY: queries into locals; tgkill to this very thread, whose
        // handler only stores to an atomic.
        let (blocked, ss, probe_sp, tid) = unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            let blocked: Vec<libc::c_int> = (1..=64)
                .filter(|&s| libc::sigismember(&cur, s) == 1)
                .collect();
            let mut ss: libc::stack_t = std::mem::zeroed();
            libc::sigaltstack(std::ptr::null(), &mut ss);
            let tid = libc::gettid();
            PROBE_SP.store(0, Ordering::SeqCst);
            libc::tgkill(libc::getpid(), tid, probe_signal());
            (blocked, ss, PROBE_SP.load(Ordering::SeqCst), tid)
        };
        if blocked != wanted {
            problems.push(format!("blocks {blocked:?}, expected {wanted:?}"));
        }
        if ss.ss_sp as usize != stack || ss.ss_size != size || ss.ss_flags != 0 {
            problems.push(format!(
                "altstack {:#x}+{} flags {}, expected {stack:#x}+{size}",
                ss.ss_sp as usize, ss.ss_size, ss.ss_flags
            ));
        }
        if !(stack..stack + size).contains(&probe_sp) {
            problems.push(format!("SA_ONSTACK handler ran at {probe_sp:#x}"));
        }
        let detail = format!(
            "thread {i} (tid {tid}) blocks {blocked:?}, handler ran on its {} KiB altstack",
            size >> 10
        );
        let _ = answers.send(Check::unless(problems, detail));
    }
}

/// The threads helper: installs the probe handler, starts the threads and
/// relays each request to every thread in turn.
fn threads_main(mut ch: Channel) {
    // SAFETY: the handler only stores to an atomic; SA_ONSTACK makes it run
    // on the interrupted thread's alternate stack.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_probe as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(probe_signal(), &sa, std::ptr::null_mut());
    }
    let (answer_tx, answers) = mpsc::channel();
    let mut requests = Vec::new();
    for i in 0..THREADS {
        let (tx, rx) = mpsc::channel();
        let answer_tx = answer_tx.clone();
        requests.push(tx);
        std::thread::spawn(move || thread_main(i, rx, answer_tx));
        match answers.recv() {
            Ok(c) if c.ok => {}
            Ok(c) => {
                ch.reply(false, &c.detail);
                exit_now(1)
            }
            Err(_) => {
                ch.reply(false, "a thread died");
                exit_now(1)
            }
        }
    }
    ch.reply(true, "threads ready");
    while ch.wait_request() {
        let mut checks = Vec::new();
        for tx in &requests {
            let _ = tx.send(());
            checks.push(
                answers
                    .recv_timeout(ANSWER_TIMEOUT)
                    .unwrap_or_else(|_| Check::fail("a thread did not answer")),
            );
        }
        let tasks = std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(0);
        let mut ok = checks.iter().all(|c| c.ok);
        let mut detail: Vec<String> = checks.into_iter().map(|c| c.detail).collect();
        if tasks != THREADS + 1 {
            ok = false;
            detail.push(format!("{tasks} tasks, expected {}", THREADS + 1));
        }
        ch.reply(ok, &detail.join("; "));
    }
}

/// A helper process with [`THREADS`] threads besides its main thread.
pub struct Threads {
    helper: Helper,
}

impl Threads {
    pub fn new() -> Result<Threads> {
        let (helper, _) = Helper::start(c"obj-threads", threads_main)?;
        Ok(Threads { helper })
    }
}

impl Object for Threads {
    fn verify(&mut self) -> Check {
        self.helper.ask()
    }

    fn shutdown(&mut self) {
        self.helper.kill();
    }
}

// ---------------------------------------------------------------- zombie

/// The zombie's exit status.
const ZOMBIE_STATUS: i32 = 42;

/// The keeper: forks a child that exits at once and never reaps it; each
/// request looks at it with `waitid(WNOWAIT)`.
fn keeper_main(mut ch: Channel) {
    // SAFETY: single-threaded process; the child exits at once.
    let zombie = match unsafe { fork() } {
        Ok(ForkResult::Child) => exit_now(ZOMBIE_STATUS),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            ch.reply(false, &format!("fork: {e}"));
            exit_now(1)
        }
    };
    let look = |flags: libc::c_int| {
        // SAFETY: an all-zero siginfo_t is valid output space.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; WNOWAIT leaves the child unreaped.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                zombie.as_raw() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | flags,
            )
        };
        // SAFETY: si_pid/si_status are valid for SIGCHLD information.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        (r, pid, info.si_code, status)
    };
    // Wait (without reaping) until it is a zombie.
    look(0);
    ch.reply(true, &zombie.to_string());
    while ch.wait_request() {
        let (r, pid, code, status) = look(libc::WNOHANG);
        let answer = if r < 0 {
            Check::fail(format!(
                "waitid({zombie}): {}",
                std::io::Error::last_os_error()
            ))
        } else if pid != zombie.as_raw() {
            Check::fail(format!("child {zombie} has not exited (it runs)"))
        } else if code != libc::CLD_EXITED || status != ZOMBIE_STATUS {
            Check::fail(format!("child {zombie}: code {code} status {status}"))
        } else {
            Check::pass(format!(
                "child {zombie} of keeper {} is an unreaped zombie, exit status {status}",
                getpid()
            ))
        };
        ch.reply(answer.ok, &answer.detail);
    }
}

/// A keeper process holding a zombie child.
pub struct Zombie {
    helper: Helper,
    zombie: Pid,
}

impl Zombie {
    pub fn new() -> Result<Zombie> {
        let (helper, pid) = Helper::start(c"obj-zombiekeep", keeper_main)?;
        let zombie = Pid::from_raw(pid.parse().context("zombie pid")?);
        Ok(Zombie { helper, zombie })
    }
}

impl Object for Zombie {
    fn verify(&mut self) -> Check {
        let c = self.helper.ask();
        // Seen from here too: it exists, in the keeper's process group.
        let here = match (getpgid(Some(self.zombie)), getpgid(Some(self.helper.pid))) {
            (Ok(z), Ok(k)) if z == k => None,
            (z, k) => Some(format!("pgid of zombie {z:?}, of keeper {k:?}")),
        };
        match here {
            None => c,
            Some(p) => Check::fail(format!("{p}; {}", c.detail)),
        }
    }

    fn shutdown(&mut self) {
        self.helper.kill();
    }
}

// ---------------------------------------------------------------- session

/// Sleeps until killed (or until the parent is gone: PDEATHSIG).
fn idle_forever() -> ! {
    loop {
        sleep_ms(1000);
    }
}

/// Session leader A: `setsid`, then B (own group) with C (in B's group).
fn session_main(mut ch: Channel) {
    let mut problems = Vec::new();
    if nix::unistd::setsid().is_err() {
        problems.push("setsid failed");
    }
    let (mut rd, mut wr) = match pipe(0) {
        Ok(p) => p,
        Err(e) => {
            ch.reply(false, &format!("pipe: {e}"));
            exit_now(1)
        }
    };
    // SAFETY: single-threaded; the children only sleep.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(rd);
            isolate(c"obj-sess-b", &[wr.as_raw_fd()]);
            let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
            // SAFETY: as above.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    isolate(c"obj-sess-c", &[]);
                    idle_forever()
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = writeln!(wr, "{} {child}", getpid());
                    drop(wr);
                    idle_forever()
                }
                Err(_) => exit_now(1),
            }
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(wr);
            match read_line(&mut rd, ANSWER_TIMEOUT) {
                Ok(pids) if problems.is_empty() => ch.reply(true, &format!("{} {pids}", getpid())),
                Ok(_) => ch.reply(false, &problems.join(", ")),
                Err(e) => ch.reply(false, &format!("no pids from B: {e}")),
            }
            drop(rd);
            // Nothing to answer: the workload checks the relations itself.
            while ch.wait_request() {}
            idle_forever()
        }
        Err(e) => ch.reply(false, &format!("fork: {e}")),
    }
}

/// A session led by A holding groups {A} and {B, C}, plus D in a group of
/// its own in the workload's session.
pub struct Session {
    a: Helper,
    d: Helper,
    b: Pid,
    c: Pid,
}

impl Session {
    pub fn new() -> Result<Session> {
        let (a, pids) = Helper::start(c"obj-sess-a", session_main)?;
        let pids: Vec<i32> = pids.split(' ').filter_map(|p| p.parse().ok()).collect();
        let &[_, b, c] = pids.as_slice() else {
            bail!("session leader sent {pids:?}");
        };
        let (d, _) = Helper::start(c"obj-sess-d", |mut ch| {
            match nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)) {
                Ok(()) => ch.reply(true, "own group"),
                Err(e) => ch.reply(false, &format!("setpgid: {e}")),
            }
            while ch.wait_request() {}
            idle_forever()
        })?;
        Ok(Session {
            a,
            d,
            b: Pid::from_raw(b),
            c: Pid::from_raw(c),
        })
    }
}

impl Object for Session {
    fn verify(&mut self) -> Check {
        let me = getpid();
        let (a, b, c, d) = (self.a.pid, self.b, self.c, self.d.pid);
        // (process, expected session, expected group)
        let expected = [
            ("workload", me, me, me),
            ("A", a, a, a),
            ("B", b, a, b),
            ("C", c, a, b),
            ("D", d, me, d),
        ];
        let mut problems = Vec::new();
        let mut seen = Vec::new();
        for (name, pid, sid, pgid) in expected {
            let got = (getsid(Some(pid)), getpgid(Some(pid)));
            let show = |r: &nix::Result<Pid>| match r {
                Ok(p) => p.to_string(),
                Err(e) => e.to_string(),
            };
            seen.push(format!(
                "{name} {pid}: sid {} pgid {}",
                show(&got.0),
                show(&got.1)
            ));
            if got != (Ok(sid), Ok(pgid)) {
                problems.push(format!("{name} ({pid}) should have sid {sid} pgid {pgid}"));
            }
            if kill(pid, None).is_err() {
                problems.push(format!("{name} ({pid}) is gone"));
            }
        }
        Check::unless(problems, seen.join("; "))
    }

    fn shutdown(&mut self) {
        for pid in [self.c, self.b] {
            let _ = kill(pid, Signal::SIGKILL);
        }
        self.a.kill();
        self.d.kill();
    }
}
