//! Which pages of a running process were written, without soft-dirty
//! bits: an asynchronous userfaultfd write-protect registration on each
//! private anonymous writable mapping of the process, read with the
//! `PAGEMAP_SCAN` ioctl, which reports the pages written since the last
//! scan and protects them again in the same call (Linux 6.7+).
//!
//! The userfaultfd must belong to the process's address space, so phaul
//! makes the process create it: it attaches with ptrace (`PTRACE_SEIZE` +
//! `PTRACE_INTERRUPT`), runs `userfaultfd()` in it from a `syscall`
//! instruction already in its memory, takes the descriptor over with
//! `pidfd_getfd`, runs `close()` so that the process holds no userfaultfd
//! (CRIU cannot dump a task that holds one), puts every register back and
//! detaches. An interrupted system call restarts exactly as it would have
//! after any signal. The process pauses for well under a millisecond.
//!
//! What is not tracked is reported as such, never as clean: a mapping
//! that appears (or replaces a tracked one, which `PAGEMAP_SCAN` reports
//! as `EPERM` under `PM_SCAN_CHECK_WPASYNC`) is new, and every page
//! present in it counts as written; a tracked range that disappeared is
//! dropped. Closing the userfaultfd (dropping the [`Tracker`]) ends the
//! registration and clears every write-protect bit; the kernel does the
//! same if phaul dies.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::postcopy::uffd::PAGE;

const fn uffd_iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = uffd_iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = uffd_iowr(0x00, 32);
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFD_USER_MODE_ONLY: u64 = 1;

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Can this kernel track writes this way? (`PAGEMAP_SCAN` and
/// asynchronous userfaultfd write-protect, asked of a userfaultfd of
/// phaul's own.)
pub fn supported() -> Result<(), String> {
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY as i32,
        )
    };
    if fd < 0 {
        return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    api(&fd).map_err(|e| {
        format!("this kernel has no asynchronous userfaultfd write-protect (Linux 6.7+): {e}")
    })?;
    let pm = File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut regions = [PageRegion::default(); 1];
    let probe = [0u8; 1];
    let at = probe.as_ptr() as u64 & !(PAGE - 1);
    scan_raw(&pm, at, at + PAGE, 0, &mut regions)
        .map_err(|e| format!("this kernel has no PAGEMAP_SCAN (Linux 6.7+): {e}"))?;
    Ok(())
}

fn api(fd: &OwnedFd) -> std::io::Result<()> {
    let mut a = [UFFD_API, UFFD_FEATURE_WP_ASYNC, 0u64];
    // SAFETY: a struct uffdio_api.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, a.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One `PAGEMAP_SCAN` call over `[start, end)`: the regions found and
/// where the walk stopped.
fn scan_raw(
    pagemap: &File,
    start: u64,
    end: u64,
    flags: u64,
    vec: &mut [PageRegion],
) -> std::io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags,
        start,
        end,
        walk_end: 0,
        vec: vec.as_mut_ptr() as u64,
        vec_len: vec.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
    };
    // SAFETY: a valid pm_scan_arg whose vec has vec_len entries.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize, arg.walk_end))
}

/// Written pages in one scan: `[start, end)`, and whether they map the
/// shared zero page (read but never written).
pub type Written = (u64, u64, bool);

/// What one pass over one process found.
#[derive(Debug, Default)]
pub struct Changes {
    /// Pages written since the last pass (the first pass: every present
    /// page), protected again.
    pub written: Vec<Written>,
    /// Ranges whose earlier pages are void (unmapped, or replaced by a
    /// new mapping): what was sent of them must be forgotten.
    pub dropped: Vec<(u64, u64)>,
}

impl Changes {
    /// Pages reported written.
    pub fn pages(&self) -> u64 {
        self.written.iter().map(|(a, b, _)| (b - a) / PAGE).sum()
    }
}

/// One tracked process.
pub struct Proc {
    /// Its pid on this host.
    pub pid: i32,
    /// Its pid in the workload's PID namespace (CRIU's images name it).
    pub vpid: i32,
    start_time: u64,
    uffd: OwnedFd,
    pagemap: File,
    /// Registered ranges, start -> end.
    tracked: BTreeMap<u64, u64>,
    regions: Vec<PageRegion>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("pid", &self.pid)
            .field("vpid", &self.vpid)
            .field("ranges", &self.tracked.len())
            .finish()
    }
}

/// The private anonymous writable mappings of `pid` (`[start, end)`):
/// what CRIU leaves lazy, and what can be write-protected.
fn private_anon_writable(pid: i32) -> std::io::Result<Vec<(u64, u64)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps.lines().filter_map(parse_map_line).collect())
}

fn parse_map_line(l: &str) -> Option<(u64, u64)> {
    let mut f = l.split_whitespace();
    let range = f.next()?;
    let perms = f.next()?.as_bytes();
    let _off = f.next()?;
    let _dev = f.next()?;
    let inode = f.next()?;
    let path = f.next().unwrap_or("");
    if perms.len() < 4 || perms[1] != b'w' || perms[3] != b'p' || inode != "0" {
        return None;
    }
    if !(path.is_empty() || path == "[heap]" || path == "[stack]") {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

fn covered(t: &BTreeMap<u64, u64>, a: u64, b: u64) -> bool {
    // Tracked ranges are kept merged, so one must hold all of [a, b).
    t.range(..=a).next_back().is_some_and(|(_, &e)| e >= b)
}

fn insert_merged(t: &mut BTreeMap<u64, u64>, a: u64, b: u64) {
    let (mut a, mut b) = (a, b);
    if let Some((&s, &e)) = t.range(..=a).next_back() {
        if e >= a {
            a = s;
            b = b.max(e);
            t.remove(&s);
        }
    }
    while let Some((&s, &e)) = t.range(a..=b).next() {
        b = b.max(e);
        t.remove(&s);
    }
    t.insert(a, b);
}

/// `t` minus `u` (both merged range maps).
fn subtract(t: &BTreeMap<u64, u64>, u: &BTreeMap<u64, u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (&s, &e) in t {
        let mut at = s;
        for (&us, &ue) in u.range(..e) {
            if ue <= at {
                continue;
            }
            if us > at {
                out.push((at, us.min(e)));
            }
            at = at.max(ue);
            if at >= e {
                break;
            }
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

impl Proc {
    /// Attaches to `pid` (a process, not a thread) and gives phaul a
    /// write-protect userfaultfd of its address space; nothing is
    /// registered yet.
    pub fn attach(pid: i32) -> Result<Proc, String> {
        let start_time =
            crate::proc::start_time(pid).ok_or_else(|| format!("process {pid} is gone"))?;
        let vpid = *crate::proc::ns_pids(pid)
            .last()
            .ok_or_else(|| format!("process {pid} is gone"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
        let uffd = inject::userfaultfd(pid)?;
        api(&uffd).map_err(|e| format!("UFFDIO_API for process {pid}: {e}"))?;
        Ok(Proc {
            pid,
            vpid,
            start_time,
            uffd,
            pagemap,
            tracked: BTreeMap::new(),
            regions: vec![PageRegion::default(); 4096],
        })
    }

    /// Still the process attached to (not gone, its pid not reused)?
    pub fn alive(&self) -> bool {
        crate::proc::start_time(self.pid) == Some(self.start_time)
    }

    fn register(&self, a: u64, b: u64) -> std::io::Result<()> {
        let mut r = [a, b - a, UFFDIO_REGISTER_MODE_WP, 0u64];
        // SAFETY: a struct uffdio_register.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, r.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The pages written in `[a, b)` since the last scan, protected again.
    fn scan(&mut self, a: u64, b: u64, out: &mut Vec<Written>) -> std::io::Result<()> {
        let mut at = a;
        while at < b {
            let (n, walk_end) = scan_raw(
                &self.pagemap,
                at,
                b,
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                &mut self.regions,
            )?;
            for r in &self.regions[..n] {
                let zero = r.categories & PAGE_IS_PFNZERO != 0;
                match out.last_mut() {
                    Some(l) if l.1 == r.start && l.2 == zero => l.1 = r.end,
                    _ => out.push((r.start, r.end, zero)),
                }
            }
            if walk_end <= at {
                break;
            }
            at = walk_end;
        }
        Ok(())
    }

    /// One pass: the pages written since the last one, and the ranges to
    /// forget. New mappings are registered (and so reported whole) when
    /// `register_new`; on the last pass (the process frozen) they are
    /// only reported dropped, so that nothing sent earlier stands for
    /// them.
    pub fn pass(&mut self, register_new: bool) -> Result<Changes, String> {
        let vmas =
            private_anon_writable(self.pid).map_err(|e| format!("/proc/{}/maps: {e}", self.pid))?;
        let mut ch = Changes::default();
        let mut still = BTreeMap::new();
        for (a, b) in vmas {
            if covered(&self.tracked, a, b) {
                let mark = ch.written.len();
                match self.scan(a, b, &mut ch.written) {
                    Ok(()) => {
                        insert_merged(&mut still, a, b);
                        continue;
                    }
                    // Not registered: a new mapping in a tracked place.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => ch.written.truncate(mark),
                    Err(e) => return Err(format!("PAGEMAP_SCAN of process {}: {e}", self.pid)),
                }
            }
            ch.dropped.push((a, b));
            if !register_new {
                continue;
            }
            match self.register(a, b) {
                Ok(()) => {
                    let mark = ch.written.len();
                    match self.scan(a, b, &mut ch.written) {
                        Ok(()) => insert_merged(&mut still, a, b),
                        Err(e) => {
                            ch.written.truncate(mark);
                            tracing::debug!(pid = self.pid, a, b, "cannot scan a new mapping: {e}");
                        }
                    }
                }
                // Some mappings cannot be registered (mlocked, special):
                // they stay untracked and follow after the switch.
                Err(e) => tracing::debug!(pid = self.pid, a, b, "not tracked: {e}"),
            }
        }
        ch.dropped.extend(subtract(&self.tracked, &still));
        ch.dropped.sort_unstable();
        ch.dropped.dedup();
        self.tracked = still;
        Ok(ch)
    }

    /// Bytes of memory under tracking.
    pub fn tracked_bytes(&self) -> u64 {
        self.tracked.iter().map(|(a, b)| b - a).sum()
    }
}

/// Every process of a workload, tracked.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The processes, in tree order.
    pub procs: Vec<Proc>,
}

/// A pass over every process.
#[derive(Debug)]
pub struct Pass {
    /// (index into `procs`, its changes).
    pub changes: Vec<(usize, Changes)>,
    /// Processes that could not be tracked (forked since and not
    /// attachable, say): their memory follows after the switch.
    pub untracked: Vec<(i32, String)>,
    /// How long the scans took.
    pub scan_time: Duration,
}

impl Tracker {
    /// Attaches to every process of the tree under `root` not tracked yet
    /// (new children are picked up on every pass) and forgets the ones
    /// that are gone.
    fn refresh(&mut self, root: i32, untracked: &mut Vec<(i32, String)>) {
        self.procs.retain(Proc::alive);
        for pid in crate::proc::tree(root) {
            if self.procs.iter().any(|p| p.pid == pid) {
                continue;
            }
            match Proc::attach(pid) {
                Ok(p) => self.procs.push(p),
                Err(e) => untracked.push((pid, e)),
            }
        }
    }

    /// One pass over the tree under `root` (`last`: the tree is frozen,
    /// nothing new is registered).
    pub fn pass(&mut self, root: i32, last: bool) -> Result<Pass, String> {
        let mut untracked = Vec::new();
        if !last {
            self.refresh(root, &mut untracked);
        }
        let t = Instant::now();
        let mut changes = Vec::new();
        for (i, p) in self.procs.iter_mut().enumerate() {
            if !p.alive() {
                continue;
            }
            changes.push((i, p.pass(!last)?));
        }
        Ok(Pass {
            changes,
            untracked,
            scan_time: t.elapsed(),
        })
    }
}

/// Running a system call inside another process (x86_64).
#[cfg(target_arch = "x86_64")]
mod inject {
    use std::os::fd::{FromRawFd, OwnedFd};

    fn ptrace(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> std::io::Result<i64> {
        // SAFETY: ptrace requests with integer or register-buffer arguments.
        let r = unsafe { libc::ptrace(req, pid, addr, data) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r)
    }

    fn wait_stop(pid: i32) -> std::io::Result<i32> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our tracee.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if libc::WIFSTOPPED(status) {
                return Ok(status);
            }
            return Err(std::io::Error::other("the process exited while attached"));
        }
    }

    fn regs(pid: i32) -> std::io::Result<libc::user_regs_struct> {
        // SAFETY: zeroed plain data, filled by the kernel.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        ptrace(libc::PTRACE_GETREGS, pid, 0, &mut r as *mut _ as usize)?;
        Ok(r)
    }

    fn set_regs(pid: i32, r: &libc::user_regs_struct) -> std::io::Result<()> {
        ptrace(libc::PTRACE_SETREGS, pid, 0, r as *const _ as usize).map(|_| ())
    }

    fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> bool {
        crate::proc::read_memory(pid, addr, buf).is_ok_and(|n| n == buf.len())
    }

    /// A `syscall` instruction (0f 05) in the process: the one it is
    /// stopped after (interrupted in a system call), else one in its vDSO
    /// or its executable mappings.
    fn syscall_insn(pid: i32, rip: u64) -> Option<u64> {
        let mut b = [0u8; 2];
        if rip >= 2 && read_mem(pid, rip - 2, &mut b) && b == [0x0f, 0x05] {
            return Some(rip - 2);
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let mut exec: Vec<(u64, u64, bool)> = maps
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (a, b) = f.next()?.split_once('-')?;
                let perms = f.next()?;
                if !perms.starts_with("r-x") && !perms.starts_with("r-xp") {
                    return None;
                }
                let vdso = l.ends_with("[vdso]");
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                    vdso,
                ))
            })
            .collect();
        exec.sort_by_key(|&(_, _, vdso)| !vdso);
        let mut buf = vec![0u8; 1 << 16];
        for (a, b, _) in exec {
            let mut at = a;
            while at < b {
                let n = ((b - at) as usize).min(buf.len());
                if !read_mem(pid, at, &mut buf[..n]) {
                    break;
                }
                if let Some(i) = buf[..n].windows(2).position(|w| w == [0x0f, 0x05]) {
                    return Some(at + i as u64);
                }
                // One byte of overlap for an instruction across chunks.
                at += (n as u64).saturating_sub(1).max(1);
            }
        }
        None
    }

    /// Attached and stopped: runs system calls, then restores and detaches.
    struct Attached {
        pid: i32,
        saved: libc::user_regs_struct,
        at: u64,
        /// Signals that arrived meanwhile, delivered at detach.
        pending: Vec<i32>,
    }

    impl Attached {
        fn seize(pid: i32) -> std::io::Result<Attached> {
            ptrace(libc::PTRACE_SEIZE, pid, 0, 0)?;
            let detach = |e| {
                let _ = ptrace(libc::PTRACE_DETACH, pid, 0, 0);
                e
            };
            ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0).map_err(detach)?;
            let mut pending = Vec::new();
            loop {
                let st = wait_stop(pid)?;
                if st >> 16 == libc::PTRACE_EVENT_STOP {
                    break;
                }
                // A signal arrived first: keep it for the detach.
                pending.push(libc::WSTOPSIG(st));
                ptrace(libc::PTRACE_CONT, pid, 0, 0).map_err(detach)?;
            }
            let saved = regs(pid).map_err(detach)?;
            let Some(at) = syscall_insn(pid, saved.rip) else {
                let _ = ptrace(libc::PTRACE_DETACH, pid, 0, 0);
                return Err(std::io::Error::other(
                    "no syscall instruction found in the process",
                ));
            };
            Ok(Attached {
                pid,
                saved,
                at,
                pending,
            })
        }

        fn syscall(&mut self, nr: i64, a0: u64) -> std::io::Result<i64> {
            let mut r = self.saved;
            r.rax = nr as u64;
            r.rdi = a0;
            r.rip = self.at;
            // No system-call restart for the injected call.
            r.orig_rax = u64::MAX;
            set_regs(self.pid, &r)?;
            loop {
                ptrace(libc::PTRACE_SINGLESTEP, self.pid, 0, 0)?;
                let st = wait_stop(self.pid)?;
                let sig = libc::WSTOPSIG(st);
                if sig == libc::SIGTRAP && st >> 16 == 0 {
                    let now = regs(self.pid)?;
                    if now.rip == self.at + 2 {
                        return Ok(now.rax as i64);
                    }
                    // Stepped somewhere else? Refuse rather than guess.
                    return Err(std::io::Error::other(format!(
                        "the injected system call stopped at {:#x}, not after it",
                        now.rip
                    )));
                }
                if st >> 16 == 0 {
                    // A signal before the step: deliver it at detach.
                    self.pending.push(sig);
                }
            }
        }

        fn detach(self) -> std::io::Result<()> {
            let r = set_regs(self.pid, &self.saved);
            let sig = self.pending.first().copied().unwrap_or(0);
            ptrace(libc::PTRACE_DETACH, self.pid, 0, sig as usize)?;
            for &s in self.pending.iter().skip(1) {
                // SAFETY: re-sends a signal the process had been sent.
                unsafe { libc::kill(self.pid, s) };
            }
            r
        }
    }

    /// Makes process `pid` create a write-protect-capable userfaultfd of
    /// its address space and hands it to phaul; the process keeps none.
    pub fn userfaultfd(pid: i32) -> Result<OwnedFd, String> {
        let pidfd = crate::proc::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let mut t = Attached::seize(pid).map_err(|e| format!("ptrace of process {pid}: {e}"))?;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | super::UFFD_USER_MODE_ONLY;
        let made = t.syscall(libc::SYS_userfaultfd, flags);
        let taken = match made {
            Ok(fd) if fd >= 0 => {
                // SAFETY: plain syscall on a pidfd of ours.
                let ours = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_getfd,
                        std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                        fd as i32,
                        0,
                    )
                };
                let ours = match ours {
                    n if n >= 0 => Ok(n as i32),
                    _ => Err(format!("pidfd_getfd: {}", std::io::Error::last_os_error())),
                };
                let closed = t.syscall(libc::SYS_close, fd as u64);
                match (ours, closed) {
                    // SAFETY: a descriptor pidfd_getfd just gave us.
                    (Ok(n), Ok(0)) => Ok(unsafe { OwnedFd::from_raw_fd(n) }),
                    (Ok(n), c) => {
                        // SAFETY: ours; closing it.
                        unsafe { libc::close(n) };
                        Err(format!("closing the userfaultfd in process {pid}: {c:?}"))
                    }
                    (Err(e), _) => Err(e),
                }
            }
            Ok(e) => Err(format!(
                "userfaultfd() in process {pid}: {}",
                std::io::Error::from_raw_os_error(-e as i32)
            )),
            Err(e) => Err(format!("running userfaultfd() in process {pid}: {e}")),
        };
        if let Err(e) = t.detach() {
            return Err(format!("detaching from process {pid}: {e}"));
        }
        taken
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod inject {
    use std::os::fd::OwnedFd;

    pub fn userfaultfd(_pid: i32) -> Result<OwnedFd, String> {
        Err("userfaultfd pre-copy injects a system call, which phaul does only on x86_64".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_PAGES: u64 = 64;
    const HUGE: u64 = 2 << 20;

    /// A child that writes exactly the pages it is told to, and nothing
    /// else in its test mappings (it is idle, blocked on a pipe, at each
    /// scan).
    struct Child {
        pid: i32,
        cmd: i32,
        ack: i32,
        a: u64,
        huge: u64,
    }

    const WRITE_A: u64 = 0;
    const WRITE_HUGE: u64 = 1;
    const MAP_B: u64 = 2;
    const WRITE_B: u64 = 3;
    const REPLACE_A: u64 = 4;
    const THREAD_START: u64 = 5;
    const THREAD_WRITE_A: u64 = 6;
    const FORK: u64 = 7;

    /// What the child's second thread needs.
    #[repr(C)]
    struct ThreadArgs {
        cmd: i32,
        ack: i32,
        a: u64,
    }

    /// The child's second thread: writes the page of A it is told to.
    extern "C" fn thread_main(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` points at the child's ThreadArgs, which lives as
        // long as the child; plain system calls and writes.
        unsafe {
            let t = &*(arg as *const ThreadArgs);
            let mut k = 0u64;
            loop {
                if libc::read(t.cmd, (&mut k as *mut u64).cast(), 8) != 8 {
                    libc::syscall(libc::SYS_exit, 0);
                }
                std::ptr::write_volatile((t.a + k * PAGE) as *mut u64, k + 1000);
                let v = 0u64;
                libc::write(t.ack, (&v as *const u64).cast(), 8);
            }
        }
    }

    impl Child {
        fn start() -> Child {
            let mut cmd = [0i32; 2];
            let mut ack = [0i32; 2];
            // SAFETY: plain syscalls; the child only makes system calls
            // and writes its own memory until it exits.
            unsafe {
                assert_eq!(libc::pipe(cmd.as_mut_ptr()), 0);
                assert_eq!(libc::pipe(ack.as_mut_ptr()), 0);
                let map = |len: u64| {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    assert_ne!(p, libc::MAP_FAILED);
                    p as u64
                };
                let a = map(A_PAGES * PAGE);
                let raw = map(3 * HUGE);
                let huge = (raw + HUGE - 1) & !(HUGE - 1);
                libc::madvise(huge as *mut _, HUGE as usize, libc::MADV_HUGEPAGE);
                let pid = libc::fork();
                assert!(pid >= 0);
                if pid == 0 {
                    // Nothing but its pipes: a descriptor inherited from
                    // this (multi-threaded) test process, such as another
                    // test's userfaultfd, would keep that alive.
                    close_all_but(&[cmd[0], ack[1]]);
                    child_loop(cmd[0], ack[1], a, huge);
                }
                libc::close(cmd[0]);
                libc::close(ack[1]);
                libc::munmap(a as *mut _, (A_PAGES * PAGE) as usize);
                libc::munmap(raw as *mut _, (3 * HUGE) as usize);
                let c = Child {
                    pid,
                    cmd: cmd[1],
                    ack: ack[0],
                    a,
                    huge,
                };
                c.wait_ack();
                c
            }
        }

        fn wait_ack(&self) -> u64 {
            let mut b = [0u8; 8];
            // SAFETY: 8 bytes into a local buffer.
            let n = unsafe { libc::read(self.ack, b.as_mut_ptr().cast(), 8) };
            assert_eq!(n, 8, "the child did not answer");
            u64::from_ne_bytes(b)
        }

        fn tell(&self, op: u64, arg: u64) -> u64 {
            let w = (op << 56) | arg;
            // SAFETY: 8 bytes from a local.
            let n = unsafe { libc::write(self.cmd, (&w as *const u64).cast(), 8) };
            assert_eq!(n, 8);
            self.wait_ack()
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            // SAFETY: our child and descriptors.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
                libc::close(self.cmd);
                libc::close(self.ack);
            }
        }
    }

    /// Closes every descriptor from 3 up except `keep` (`close_range`;
    /// no allocation: it runs in a forked child of a multi-threaded
    /// process).
    unsafe fn close_all_but(keep: &[i32; 2]) {
        let mut keep = *keep;
        keep.sort_unstable();
        let mut from = 3u32;
        for k in keep {
            if (k as u32) > from {
                // SAFETY: plain syscall on our own descriptor table.
                unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0) };
            }
            from = from.max(k as u32 + 1);
        }
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
    }

    /// The child's side: system calls and writes only.
    unsafe fn child_loop(cmd: i32, ack: i32, a: u64, huge: u64) -> ! {
        // SAFETY: the mappings were made for this; plain system calls.
        unsafe {
            let touch = |p: u64, v: u64| std::ptr::write_volatile(p as *mut u64, v);
            for i in 0..A_PAGES {
                touch(a + i * PAGE, i);
            }
            for i in 0..HUGE / PAGE {
                touch(huge + i * PAGE, i);
            }
            let mut b = 0u64;
            let reply = |v: u64| libc::write(ack, (&v as *const u64).cast(), 8);
            let mut to_thread = [0i32; 2];
            libc::pipe(to_thread.as_mut_ptr());
            let targs = ThreadArgs {
                cmd: to_thread[0],
                ack,
                a,
            };
            reply(0);
            let mut n = 1u64;
            loop {
                if libc::read(cmd, (&mut b as *mut u64).cast(), 8) != 8 {
                    libc::_exit(0);
                }
                let (op, arg) = (b >> 56, b & ((1 << 56) - 1));
                n += 1;
                match op {
                    WRITE_A => touch(a + arg * PAGE, n),
                    WRITE_HUGE => touch(huge + arg * PAGE, n),
                    MAP_B => {
                        let p = libc::mmap(
                            std::ptr::null_mut(),
                            (16 * PAGE) as usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        ) as u64;
                        for i in 0..16 {
                            touch(p + i * PAGE, n);
                        }
                        reply(p);
                        continue;
                    }
                    WRITE_B => touch(arg, n),
                    REPLACE_A => {
                        libc::munmap(a as *mut _, (4 * PAGE) as usize);
                        libc::mmap(
                            a as *mut _,
                            (4 * PAGE) as usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        );
                        touch(a, n);
                    }
                    THREAD_START => {
                        let stack = libc::mmap(
                            std::ptr::null_mut(),
                            1 << 16,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        ) as *mut u8;
                        let flags = libc::CLONE_VM
                            | libc::CLONE_FS
                            | libc::CLONE_FILES
                            | libc::CLONE_SIGHAND
                            | libc::CLONE_THREAD
                            | libc::CLONE_SYSVSEM;
                        let arg = &targs as *const ThreadArgs as *mut libc::c_void;
                        libc::clone(thread_main, stack.add(1 << 16).cast(), flags, arg);
                    }
                    THREAD_WRITE_A => {
                        // The thread writes and answers.
                        libc::write(to_thread[1], (&arg as *const u64).cast(), 8);
                        continue;
                    }
                    FORK => {
                        if libc::fork() == 0 {
                            // The grandchild rewrites its copy of A, says
                            // who it is, and idles.
                            for i in 0..A_PAGES {
                                touch(a + i * PAGE, n + i);
                            }
                            reply(libc::getpid() as u64);
                            loop {
                                libc::pause();
                            }
                        }
                        continue;
                    }
                    _ => libc::_exit(0),
                }
                reply(0);
            }
        }
    }

    /// The written pages of `ch` inside `[a, b)`, as page indexes.
    fn pages_in(ch: &Changes, a: u64, b: u64) -> Vec<u64> {
        let mut v = Vec::new();
        for &(s, e, _) in &ch.written {
            let mut p = s.max(a);
            while p < e.min(b) {
                v.push((p - a) / PAGE);
                p += PAGE;
            }
        }
        v
    }

    fn holds_uffd(pid: i32) -> bool {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|l| l.to_string_lossy().contains("userfaultfd"))
    }

    /// Pages of `[a, b)` whose pagemap entry has the uffd-wp bit (57).
    fn wp_marked(pid: i32, a: u64, b: u64) -> usize {
        let f = File::open(format!("/proc/{pid}/pagemap")).unwrap();
        let mut buf = vec![0u8; ((b - a) / PAGE * 8) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, a / PAGE * 8).unwrap();
        buf.chunks_exact(8)
            .filter(|c| u64::from_ne_bytes((*c).try_into().unwrap()) & (1 << 57) != 0)
            .count()
    }

    #[test]
    fn the_tracker_follows_a_second_thread_and_a_forked_child() {
        supported().expect("this kernel tracks writes with userfaultfd write-protect");
        let c = Child::start();
        let (a, a_end) = (c.a, c.a + A_PAGES * PAGE);
        let mut t = Tracker::default();
        let pass = t.pass(c.pid, false).unwrap();
        assert_eq!(t.procs.len(), 1);
        assert_eq!(pages_in(&pass.changes[0].1, a, a_end).len() as u64, A_PAGES);
        // Writes by a thread other than the one the userfaultfd was made
        // in: the same address space, tracked alike.
        c.tell(THREAD_START, 0);
        for k in [4, 20] {
            c.tell(THREAD_WRITE_A, k);
        }
        let pass = t.pass(c.pid, false).unwrap();
        assert_eq!(pages_in(&pass.changes[0].1, a, a_end), vec![4, 20]);
        // A child forked while tracked is picked up on the next pass and
        // reported whole (its mappings are not registered after a fork);
        // the parent's own pages stay exact across the copy-on-write.
        let g = c.tell(FORK, 0) as i32;
        let pass = t.pass(c.pid, false).unwrap();
        assert_eq!(t.procs.len(), 2, "{:?}", t.procs);
        let of = |t: &Tracker, pass: &Pass, pid: i32| {
            let i = t.procs.iter().position(|p| p.pid == pid).unwrap();
            let ch = &pass.changes.iter().find(|(j, _)| *j == i).unwrap().1;
            pages_in(ch, a, a_end)
        };
        assert_eq!(of(&t, &pass, g).len() as u64, A_PAGES);
        assert!(of(&t, &pass, c.pid).is_empty());
        c.tell(WRITE_A, 7);
        let pass = t.pass(c.pid, false).unwrap();
        assert_eq!(of(&t, &pass, c.pid), vec![7]);
        assert!(of(&t, &pass, g).is_empty());
        assert!(!holds_uffd(g));
        drop(t);
        assert_eq!(wp_marked(c.pid, a, a_end), 0);
        assert_eq!(wp_marked(g, a, a_end), 0);
        // SAFETY: the grandchild we made.
        unsafe { libc::kill(g, libc::SIGKILL) };
    }

    #[test]
    fn the_tracker_reports_exactly_the_pages_written() {
        supported().expect("this kernel tracks writes with userfaultfd write-protect");
        let c = Child::start();
        let (a, a_end) = (c.a, c.a + A_PAGES * PAGE);
        let (h, h_end) = (c.huge, c.huge + HUGE);
        let mut p = Proc::attach(c.pid).unwrap();
        assert!(
            !holds_uffd(c.pid),
            "the process must not keep a userfaultfd"
        );
        // Pass 1: every present page.
        let ch = p.pass(true).unwrap();
        assert_eq!(pages_in(&ch, a, a_end), (0..A_PAGES).collect::<Vec<_>>());
        assert_eq!(pages_in(&ch, h, h_end).len() as u64, HUGE / PAGE);
        // Known write patterns, each scanned with the child idle: exact.
        for set in [
            vec![3, 10, 11, 40],
            vec![0, 63],
            vec![],
            vec![5, 6, 7, 8, 9],
        ] {
            for &k in &set {
                c.tell(WRITE_A, k);
            }
            let ch = p.pass(true).unwrap();
            assert_eq!(pages_in(&ch, a, a_end), set, "region A");
            assert!(pages_in(&ch, h, h_end).is_empty(), "the huge region");
        }
        // A write into a (protected) huge page: only that page.
        c.tell(WRITE_HUGE, 5);
        let ch = p.pass(true).unwrap();
        assert_eq!(pages_in(&ch, h, h_end), vec![5]);
        assert!(pages_in(&ch, a, a_end).is_empty());
        // A new mapping is reported whole (and as new), then tracked.
        let b = c.tell(MAP_B, 0);
        let ch = p.pass(true).unwrap();
        assert_eq!(pages_in(&ch, b, b + 16 * PAGE), (0..16).collect::<Vec<_>>());
        assert!(ch
            .dropped
            .iter()
            .any(|&(s, e)| s <= b && e >= b + 16 * PAGE));
        c.tell(WRITE_B, b + 2 * PAGE);
        let ch = p.pass(true).unwrap();
        assert_eq!(pages_in(&ch, b, b + 16 * PAGE), vec![2]);
        // Pages replaced under a tracked range: dropped, then reported
        // whole once (its never-touched pages read as zero), then only
        // what is written.
        c.tell(REPLACE_A, 0);
        let ch = p.pass(true).unwrap();
        assert!(
            ch.dropped.iter().any(|&(s, e)| s <= a && e >= a + 4 * PAGE),
            "{:x?}",
            ch.dropped
        );
        assert!(pages_in(&ch, a, a + 4 * PAGE).contains(&0));
        let ch = p.pass(true).unwrap();
        assert!(pages_in(&ch, a, a_end).is_empty());
        c.tell(WRITE_A, 2);
        let ch = p.pass(true).unwrap();
        assert_eq!(pages_in(&ch, a, a_end), vec![2]);
        // The last pass registers nothing new.
        let b2 = c.tell(MAP_B, 0);
        let ch = p.pass(false).unwrap();
        assert!(pages_in(&ch, b2, b2 + 16 * PAGE).is_empty());
        assert!(ch
            .dropped
            .iter()
            .any(|&(s, e)| s <= b2 && e >= b2 + 16 * PAGE));
        assert!(
            wp_marked(c.pid, a, a_end) > 0,
            "tracked pages are protected"
        );
        // Dropping the tracker leaves nothing behind.
        drop(p);
        assert_eq!(wp_marked(c.pid, a, a_end), 0);
        assert_eq!(wp_marked(c.pid, h, h_end), 0);
        assert!(!holds_uffd(c.pid));
        // And the child still works (its interrupted read restarted).
        c.tell(WRITE_A, 1);
    }

    #[test]
    fn maps_lines_select_private_anonymous_writable_memory() {
        let l = |s| parse_map_line(s);
        assert_eq!(
            l("7f00a000-7f00c000 rw-p 00000000 00:00 0 "),
            Some((0x7f00a000, 0x7f00c000))
        );
        assert_eq!(
            l("55d0-55e0 rw-p 00000000 00:00 0                          [heap]"),
            Some((0x55d0, 0x55e0))
        );
        assert!(l("7f00-7f10 r--p 00000000 00:00 0").is_none());
        assert!(l("7f00-7f10 rw-s 00000000 00:01 1234 /dev/zero (deleted)").is_none());
        assert!(l("7f00-7f10 rw-p 00001000 08:01 5678 /usr/lib/libc.so.6").is_none());
        assert!(l("7fff-8000 rw-p 00000000 00:00 0 [vvar]").is_none());
    }

    #[test]
    fn range_sets_merge_and_subtract() {
        let mut t = BTreeMap::new();
        insert_merged(&mut t, 0x1000, 0x3000);
        insert_merged(&mut t, 0x3000, 0x5000);
        insert_merged(&mut t, 0x8000, 0x9000);
        assert_eq!(t.len(), 2);
        assert!(covered(&t, 0x2000, 0x5000));
        assert!(!covered(&t, 0x2000, 0x6000));
        let mut u = BTreeMap::new();
        insert_merged(&mut u, 0x2000, 0x3000);
        insert_merged(&mut u, 0x8000, 0x9000);
        assert_eq!(subtract(&t, &u), vec![(0x1000, 0x2000), (0x3000, 0x5000)]);
    }
}
