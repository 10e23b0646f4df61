//! The destination's side of post-copy: phaul's own lazy-pages server.
//!
//! CRIU's restore (with `lazy_pages`) connects to `lazy-pages.socket` in
//! its working directory and hands over one userfaultfd per task (a pid,
//! then the descriptor), and later a "restore finished" word. This pager
//! takes them, and from the switch on resolves every fault of the
//! restored workload: a page the source had is fetched from the source
//! (urgent requests for a waiting thread, a background stream for the
//! rest); a page the source did not have (never touched there) is a zero
//! page, exactly as it was there. A page that has not arrived is never
//! made up: the faulting thread waits for it. Fork, remap, unmap and
//! remove events follow the workload's address-space changes so that a
//! late page never lands where the workload has since dropped memory.
//!
//! Before the switch only the faults of CRIU's own restorer are served
//! (it touches some lazy memory before the copy is held); the background
//! stream waits for the switch (the source's copy is frozen until then,
//! and every page fetched would lengthen the pause). At the switch the
//! pager forks the [`super::keeper`], so that from then on no single
//! process dying can release the userfaultfds.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::keeper::Keeper;
use super::uffd::{self, Fill, PAGE};
use super::wire::{read_frame, write_frame, Frame};
use crate::conn::Conn;
use crate::precopy::store::{Local, Store};
use std::sync::Arc;

/// The socket CRIU's restore connects to, in its working directory.
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// CRIU's "restore finished" word.
const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Background pages in flight at most.
const WINDOW_PAGES: u64 = 4096;
/// Pages per background request.
const CHUNK_PAGES: u64 = 256;
/// Pages an urgent request asks for, from the faulting page on.
const URGENT_PAGES: u64 = 16;
/// Pre-copied pages placed per turn of the event loop (so that faults
/// and answers are not kept waiting behind the local stream).
const LOCAL_BUDGET: u64 = 512;

/// What the pager reports at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Pages that were lazy in the images (all tasks).
    pub lazy_pages: u64,
    /// Pages placed from the source's data.
    pub placed: u64,
    /// Of those, pages that were here already (userfaultfd pre-copy's
    /// store), not asked of the source.
    pub local: u64,
    /// Pages asked for urgently (a thread was waiting).
    pub on_demand: u64,
    /// Faults resolved with a zero page (no page there on the source).
    pub zero_faults: u64,
    /// Faults seen.
    pub faults: u64,
    /// Lazy pages the workload dropped or replaced before they arrived.
    pub dropped: u64,
    /// From the switch to the last page placed.
    pub took: Duration,
}

/// How the transfer ended.
#[derive(Debug)]
pub enum PagerEnd {
    /// Every page arrived and the source released its copy.
    AllIn(PagerStats),
    /// The transfer broke after the switch. The keeper (pid) still holds
    /// the userfaultfds: threads that fault on the `missing` pages wait.
    Broken {
        /// Why.
        why: String,
        /// Pages that never arrived.
        missing: u64,
        /// The keeper's pid.
        keeper: Option<i32>,
        /// What was done so far.
        stats: PagerStats,
    },
    /// Stopped before the switch (rollback), or never started.
    Stopped(String),
}

enum Cmd {
    Go(mpsc::Sender<Result<i32, String>>),
    Stop,
}

/// A pager thread, waiting for CRIU's userfaultfds.
pub struct Pager {
    cmd: mpsc::Sender<Cmd>,
    wake: OwnedFd,
    thread: Option<std::thread::JoinHandle<PagerEnd>>,
    socket: PathBuf,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("socket", &self.socket)
            .finish()
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn poke(fd: RawFd) {
    let one = 1u64;
    // SAFETY: 8 bytes to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

impl Pager {
    /// Listens in CRIU's working directory `criu_dir` (before the restore
    /// request) and starts the pager thread; `images` has the pagemaps,
    /// `mem` is the memory channel, `stall` bounds the wait for an answer.
    pub fn start(
        criu_dir: &Path,
        images: &Path,
        mem: Conn,
        stall: Duration,
        events: Option<&Path>,
        store: Option<Arc<Store>>,
    ) -> std::io::Result<Pager> {
        let events = events.map(super::resume::EventLog::create).transpose()?;
        let socket = criu_dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let wake = eventfd()?;
        let wake_fd = wake.as_raw_fd();
        let (tx, rx) = mpsc::channel();
        let images = images.to_path_buf();
        // A source that stops mid-answer (or stops reading) is a stall,
        // not a hang.
        mem.set_read_timeout(Some(stall))?;
        mem.set_write_timeout(Some(stall))?;
        let thread = std::thread::Builder::new()
            .name("postcopy-pager".into())
            .spawn(move || {
                let mut s = State::new(Some(listener), images, mem, wake_fd, stall);
                s.events = events;
                s.store = store;
                s.run(rx)
            })?;
        Ok(Pager {
            cmd: tx,
            wake,
            thread: Some(thread),
            socket,
        })
    }

    /// The switch: forks the keeper and starts fetching; returns the
    /// keeper's pid once it holds every userfaultfd received so far.
    pub fn go(&self) -> Result<i32, String> {
        let (tx, rx) = mpsc::channel();
        self.cmd
            .send(Cmd::Go(tx))
            .map_err(|_| "the pager thread is gone".to_string())?;
        poke(self.wake.as_raw_fd());
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the pager did not start".to_string())?
    }

    /// Waits for the end of the transfer.
    pub fn wait(mut self) -> PagerEnd {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(end)) => end,
            Some(Err(_)) => PagerEnd::Stopped("the pager thread panicked".into()),
            None => PagerEnd::Stopped("no pager".into()),
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.cmd.send(Cmd::Stop);
            poke(self.wake.as_raw_fd());
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A missing range: `[start, end)` in the task's address space, whose data
/// is at `img` in the source task.
pub(crate) type Ranges = BTreeMap<u64, (u64, u64)>;

struct Lpi {
    /// The source task the data comes from (a forked child's parent).
    src: i32,
    fd: OwnedFd,
    missing: Ranges,
    exited: bool,
}

struct Pending {
    lpi: usize,
    dst: u64,
    /// Where the data comes from in the source task.
    img: u64,
    pages: u64,
    urgent: bool,
    /// Parts the workload dropped while the request was in flight.
    holes: Vec<(u64, u64)>,
}

struct State {
    /// Post-copy's event log (see [`super::resume`]).
    events: Option<super::resume::EventLog>,
    /// Pages userfaultfd pre-copy brought before the switch: placed from
    /// here instead of asked for.
    store: Option<Arc<Store>>,
    scratch: Vec<u8>,
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
    images: PathBuf,
    mem: Conn,
    wake: RawFd,
    stall: Duration,
    lpis: Vec<Lpi>,
    pending: HashMap<u32, Pending>,
    next_id: u32,
    in_flight: u64,
    finished: bool,
    going: bool,
    keeper: Option<Keeper>,
    stats: PagerStats,
    go_at: Option<Instant>,
    last_answer: Instant,
    epoll: OwnedFd,
}

const T_LISTEN: u64 = 1;
const T_CLIENT: u64 = 2;
const T_MEM: u64 = 3;
const T_WAKE: u64 = 4;
const T_LPI: u64 = 100;

fn take_range(m: &mut Ranges, at: u64, max_pages: u64) -> Option<(u64, u64, u64)> {
    let (&s, &(e, img)) = m.range(..=at).next_back()?;
    if at >= e {
        return None;
    }
    m.remove(&s);
    if s < at {
        m.insert(s, (at, img));
    }
    let end = e.min(at + max_pages * PAGE);
    if end < e {
        m.insert(end, (e, img + (end - s)));
    }
    Some((at, end, img + (at - s)))
}

/// Removes `[a, b)` from `m`; returns the pages removed.
pub(crate) fn cut(m: &mut Ranges, a: u64, b: u64) -> u64 {
    let hit: Vec<(u64, (u64, u64))> = m
        .range(..b)
        .filter(|(&s, &(e, _))| e > a && s < b)
        .map(|(&s, &v)| (s, v))
        .collect();
    let mut n = 0;
    for (s, (e, img)) in hit {
        m.remove(&s);
        if s < a {
            m.insert(s, (a, img));
        }
        if e > b {
            m.insert(b, (e, img + (b - s)));
        }
        n += (e.min(b) - s.max(a)) / PAGE;
    }
    n
}

/// `mremap` moved `[from, from + len)` to `to`: the missing ranges in it
/// move along (their source addresses stay).
pub(crate) fn move_ranges(m: &mut Ranges, from: u64, to: u64, len: u64) {
    let moved: Vec<(u64, (u64, u64))> = m
        .range(..from + len)
        .filter(|(&s, &(e, _))| e > from && s < from + len)
        .map(|(&s, &v)| (s, v))
        .collect();
    cut(m, from, from + len);
    for (s, (e, img)) in moved {
        let (s2, e2) = (s.max(from), e.min(from + len));
        let img2 = img + (s2 - s);
        m.insert(s2 - from + to, (e2 - from + to, img2));
    }
}

fn epoll_add(ep: RawFd, fd: RawFd, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: token,
    };
    // SAFETY: valid epoll and event.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_del(ep: RawFd, fd: RawFd) {
    // SAFETY: valid epoll.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}

/// Receives one (pid, userfaultfd) or the "restore finished" word.
enum FromCriu {
    Task(i32, Option<OwnedFd>),
    Finished,
    Closed,
}

fn recv_from_criu(sock: &UnixStream) -> std::io::Result<FromCriu> {
    let mut w = [0u8; 4];
    let n = nix::sys::socket::recv(
        sock.as_raw_fd(),
        &mut w,
        nix::sys::socket::MsgFlags::MSG_WAITALL,
    )?;
    if n == 0 {
        return Ok(FromCriu::Closed);
    }
    if n != 4 {
        return Err(std::io::Error::other("a short word from CRIU's restore"));
    }
    let v = u32::from_ne_bytes(w);
    if v == RESTORE_FINISHED {
        return Ok(FromCriu::Finished);
    }
    let pid = v as i32;
    if pid < 0 {
        // A zombie: no descriptor follows.
        return Ok(FromCriu::Task(-pid, None));
    }
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: received, so ours.
                return Ok(FromCriu::Task(
                    pid,
                    Some(unsafe { OwnedFd::from_raw_fd(fd) }),
                ));
            }
        }
    }
    Err(std::io::Error::other(format!(
        "CRIU's restore named task {pid} without its userfaultfd"
    )))
}

impl State {
    fn new(
        listener: Option<UnixListener>,
        images: PathBuf,
        mem: Conn,
        wake: RawFd,
        stall: Duration,
    ) -> Self {
        // SAFETY: plain syscall.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        // SAFETY: a fresh descriptor (checked below through its use).
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        if let Some(l) = &listener {
            let _ = epoll_add(ep, l.as_raw_fd(), T_LISTEN);
        }
        let _ = epoll_add(ep, wake, T_WAKE);
        let _ = epoll_add(ep, mem.as_raw_fd(), T_MEM);
        State {
            events: None,
            store: None,
            scratch: Vec::new(),
            listener,
            client: None,
            images,
            mem,
            wake,
            stall,
            lpis: Vec::new(),
            pending: HashMap::new(),
            next_id: 1,
            in_flight: 0,
            finished: false,
            going: false,
            keeper: None,
            stats: PagerStats::default(),
            go_at: None,
            last_answer: Instant::now(),
            epoll,
        }
    }

    fn missing(&self) -> u64 {
        let ranges: u64 = self
            .lpis
            .iter()
            .filter(|l| !l.exited)
            .flat_map(|l| l.missing.values().zip(l.missing.keys()))
            .map(|(&(e, _), &s)| (e - s) / PAGE)
            .sum();
        ranges + self.pending.values().map(|p| p.pages).sum::<u64>()
    }

    fn broken(&mut self, why: String) -> PagerEnd {
        let missing = self.missing();
        tracing::error!(missing, "post-copy transfer broken: {why}");
        let keeper = self.keeper.take().map(|k| {
            let pid = k.pid();
            k.abandon();
            pid
        });
        self.stats.took = self.go_at.map(|t| t.elapsed()).unwrap_or_default();
        PagerEnd::Broken {
            why,
            missing,
            keeper,
            stats: self.stats.clone(),
        }
    }

    fn run(&mut self, cmds: mpsc::Receiver<Cmd>) -> PagerEnd {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // Pre-copied pages wait to be placed: do not sleep.
        let mut busy = false;
        loop {
            // SAFETY: a valid epoll and event buffer.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    if busy { 0 } else { 200 },
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return self.broken(format!("epoll: {e}"));
            }
            for ev in &events[..n as usize] {
                let r = match ev.u64 {
                    T_LISTEN => self.accept(),
                    T_CLIENT => self.read_criu(),
                    T_MEM => self.answer(),
                    T_WAKE => {
                        let mut b = [0u8; 8];
                        // SAFETY: 8 bytes from an eventfd.
                        unsafe { libc::read(self.wake, b.as_mut_ptr().cast(), 8) };
                        match cmds.try_recv() {
                            Ok(Cmd::Go(reply)) => {
                                let r = self.go();
                                let failed = r.as_ref().err().cloned();
                                let _ = reply.send(r);
                                match failed {
                                    Some(e) => Err(e),
                                    None => Ok(()),
                                }
                            }
                            Ok(Cmd::Stop) => return PagerEnd::Stopped("stopped".into()),
                            Err(_) => Ok(()),
                        }
                    }
                    t => self.uffd_events((t - T_LPI) as usize),
                };
                if let Err(e) = r {
                    if !self.going {
                        return PagerEnd::Stopped(e);
                    }
                    return self.broken(e);
                }
            }
            if !self.pending.is_empty() && self.last_answer.elapsed() >= self.stall {
                let why = format!(
                    "the source answered no page request for {} s: the transfer stalled",
                    self.stall.as_secs()
                );
                if !self.going {
                    return PagerEnd::Stopped(why);
                }
                return self.broken(why);
            }
            if !self.going {
                continue;
            }
            match self.request_background() {
                Ok(more) => busy = more,
                Err(e) => return self.broken(e),
            }
            if self.finished && self.pending.is_empty() && self.missing() == 0 {
                return self.all_in();
            }
        }
    }

    fn accept(&mut self) -> Result<(), String> {
        let l = self.listener.take().ok_or("no listener")?;
        let (c, _) = l.accept().map_err(|e| format!("lazy-pages socket: {e}"))?;
        epoll_del(self.epoll.as_raw_fd(), l.as_raw_fd());
        epoll_add(self.epoll.as_raw_fd(), c.as_raw_fd(), T_CLIENT).map_err(|e| e.to_string())?;
        self.client = Some(c);
        Ok(())
    }

    fn read_criu(&mut self) -> Result<(), String> {
        let Some(c) = &self.client else {
            return Ok(());
        };
        match recv_from_criu(c).map_err(|e| format!("CRIU's lazy-pages connection: {e}"))? {
            FromCriu::Task(pid, Some(fd)) => self.add_task(pid, fd),
            FromCriu::Task(_, None) => Ok(()),
            FromCriu::Finished => {
                self.finished = true;
                Ok(())
            }
            FromCriu::Closed => {
                let c = self.client.take().expect("client");
                epoll_del(self.epoll.as_raw_fd(), c.as_raw_fd());
                if self.finished {
                    Ok(())
                } else {
                    Err("CRIU's restore closed the lazy-pages connection before it finished".into())
                }
            }
        }
    }

    fn add_task(&mut self, pid: i32, fd: OwnedFd) -> Result<(), String> {
        let ranges = super::image::lazy_ranges(&self.images, pid)?;
        let mut missing = Ranges::new();
        for (s, e) in ranges {
            self.stats.lazy_pages += (e - s) / PAGE;
            missing.insert(s, (e, s));
        }
        tracing::debug!(pid, pages = self.stats.lazy_pages, "userfaultfd received");
        self.push_lpi(Lpi {
            src: pid,
            fd,
            missing,
            exited: false,
        })
    }

    fn push_lpi(&mut self, l: Lpi) -> Result<(), String> {
        let i = self.lpis.len();
        epoll_add(self.epoll.as_raw_fd(), l.fd.as_raw_fd(), T_LPI + i as u64)
            .map_err(|e| e.to_string())?;
        if let Some(k) = &self.keeper {
            k.add(l.fd.as_raw_fd())
                .map_err(|e| format!("handing a userfaultfd to the keeper: {e}"))?;
        }
        self.lpis.push(l);
        Ok(())
    }

    fn go(&mut self) -> Result<i32, String> {
        // Every userfaultfd CRIU sent before the switch must be ours (a
        // descriptor still in the socket dies with this process).
        while let Some(c) = &self.client {
            if !poll_in(c.as_raw_fd()) {
                break;
            }
            self.read_criu()?;
        }
        // The keeper also holds CRIU's lazy-pages connection: CRIU's
        // restore sends its "restore finished" word on it after the
        // switch, and fails (killing the copy) if it finds it closed,
        // which it would be if this pager broke or died first.
        let fds: Vec<RawFd> = self
            .lpis
            .iter()
            .map(|l| l.fd.as_raw_fd())
            .chain(self.client.as_ref().map(|c| c.as_raw_fd()))
            .collect();
        let k =
            Keeper::spawn(&fds).map_err(|e| format!("cannot start the userfaultfd keeper: {e}"))?;
        let pid = k.pid();
        self.keeper = Some(k);
        self.log_switch(pid);
        self.going = true;
        self.go_at = Some(Instant::now());
        self.last_answer = Instant::now();
        Ok(pid)
    }

    fn log(&mut self, line: String) {
        if let Some(l) = &mut self.events {
            l.line(&line);
        }
    }

    /// At the switch: the keeper, and each task's userfaultfd (its number
    /// in the keeper) with what it still lacks.
    fn log_switch(&mut self, keeper: i32) {
        if self.events.is_none() {
            return;
        }
        let start = crate::proc::start_time(keeper).unwrap_or(0);
        let mut lines = vec![format!("K {keeper} {start}")];
        for (i, l) in self.lpis.iter().enumerate() {
            lines.push(format!("T {i} {} {}", l.fd.as_raw_fd(), l.src));
            let mut m = l.missing.clone();
            for p in self.pending.values().filter(|p| p.lpi == i) {
                m.insert(p.dst, (p.dst + p.pages * PAGE, p.img));
                for &(a, b) in &p.holes {
                    cut(&mut m, a, b);
                }
            }
            for (s, (e, img)) in m {
                lines.push(format!("r {i} {s} {e} {img}"));
            }
        }
        for l in lines {
            self.log(l);
        }
    }

    fn channel_error(&self, e: std::io::Error) -> String {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "the source sent nothing for {} s in the middle of an answer: the transfer stalled",
                self.stall.as_secs()
            ),
            _ => format!("the memory channel broke: {e}"),
        }
    }

    fn send_get(
        &mut self,
        lpi: usize,
        dst: u64,
        img: u64,
        pages: u64,
        urgent: bool,
    ) -> Result<(), String> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if self.pending.is_empty() {
            self.last_answer = Instant::now();
        }
        let f = Frame::Get {
            id,
            vpid: self.lpis[lpi].src,
            addr: img,
            pages: pages as u32,
            urgent,
        };
        write_frame(&mut self.mem, &f, &[]).map_err(|e| self.channel_error(e))?;
        if !urgent {
            self.in_flight += pages;
        } else {
            self.stats.on_demand += pages;
        }
        self.pending.insert(
            id,
            Pending {
                lpi,
                dst,
                img,
                pages,
                urgent,
                holes: Vec::new(),
            },
        );
        Ok(())
    }

    /// Keeps the background window full, and places a share of the
    /// pre-copied pages; true when pre-copied pages are left for the next
    /// turn.
    fn request_background(&mut self) -> Result<bool, String> {
        let mut budget = LOCAL_BUDGET;
        let mut i = 0;
        while self.in_flight + CHUNK_PAGES <= WINDOW_PAGES && i < self.lpis.len() && budget > 0 {
            let l = &mut self.lpis[i];
            let first = (!l.exited)
                .then(|| l.missing.keys().next().copied())
                .flatten();
            match first {
                Some(at) => {
                    let (s, e, img) = take_range(&mut l.missing, at, CHUNK_PAGES).expect("a range");
                    budget = budget.saturating_sub(self.fetch(i, s, e, img, false)?);
                }
                None => i += 1,
            }
        }
        Ok(budget == 0)
    }

    /// Fills `[s, e)` of task `lpi` (its data at `img` in the source
    /// task): from the store what it holds, the rest asked of the source.
    /// Returns the pages placed from the store.
    fn fetch(&mut self, lpi: usize, s: u64, e: u64, img: u64, urgent: bool) -> Result<u64, String> {
        let mut local = 0;
        for (a, b, here) in self.runs(lpi, s, e, img) {
            let at = img + (a - s);
            if here {
                self.place_local(lpi, a, b, at)?;
                local += (b - a) / PAGE;
            } else {
                self.send_get(lpi, a, at, (b - a) / PAGE, urgent)?;
            }
        }
        Ok(local)
    }

    /// `[s, e)` split into runs the store holds (true) or not.
    fn runs(&self, lpi: usize, s: u64, e: u64, img: u64) -> Vec<(u64, u64, bool)> {
        let Some(st) = &self.store else {
            return vec![(s, e, false)];
        };
        let src = self.lpis[lpi].src;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = s;
        while at < e {
            let here = st.get(src, img + (at - s)).is_some();
            match out.last_mut() {
                Some(l) if l.2 == here => l.1 = at + PAGE,
                _ => out.push((at, at + PAGE, here)),
            }
            at += PAGE;
        }
        out
    }

    /// Places pre-copied pages `[s, e)` (their source address `img`).
    fn place_local(&mut self, lpi: usize, s: u64, e: u64, img: u64) -> Result<(), String> {
        let st = self.store.clone().expect("a store");
        let src = self.lpis[lpi].src;
        let pages = (e - s) / PAGE;
        let p = Pending {
            lpi,
            dst: s,
            img,
            pages,
            urgent: false,
            holes: Vec::new(),
        };
        let before = self.stats.placed;
        let r = match st.get_run(src, img, pages) {
            // Straight from the store's memory.
            Some(run) => self.place(&p, run),
            None => {
                let mut data = std::mem::take(&mut self.scratch);
                data.clear();
                data.resize((pages * PAGE) as usize, 0);
                for (i, page) in data.chunks_exact_mut(PAGE as usize).enumerate() {
                    if let Some(Local::Data(d)) = st.get(src, img + i as u64 * PAGE) {
                        page.copy_from_slice(d);
                    }
                }
                let r = self.place(&p, &data);
                self.scratch = data;
                r
            }
        };
        self.stats.local += self.stats.placed - before;
        r
    }

    fn answer(&mut self) -> Result<(), String> {
        let f = read_frame(&mut self.mem).map_err(|e| self.channel_error(e))?;
        self.last_answer = Instant::now();
        let (id, data) = match f {
            Frame::Pages { id, pages } => {
                let mut data = vec![0u8; (pages as u64 * PAGE) as usize];
                if let Err(e) = self.mem.read_exact(&mut data) {
                    return Err(self.channel_error(e));
                }
                (id, data)
            }
            Frame::Fail { id, errno } => {
                return Err(format!(
                    "the source cannot read the pages of request {id}: {}",
                    std::io::Error::from_raw_os_error(errno)
                ))
            }
            other => {
                return Err(format!(
                    "the source sent {other:?} during the page transfer"
                ))
            }
        };
        let p = self
            .pending
            .remove(&id)
            .ok_or_else(|| format!("the source answered request {id}, which was not asked"))?;
        if (data.len() as u64) != p.pages * PAGE {
            return Err(format!(
                "the source answered request {id} with the wrong size"
            ));
        }
        if !p.urgent {
            self.in_flight -= p.pages;
        }
        self.place(&p, &data)
    }

    /// Places an answer, page range by page range around the holes.
    /// `UFFDIO_COPY` fills within one mapping only: a range that spans two
    /// (CRIU's lazy ranges run across adjacent mappings, say a writable
    /// page and a read-only one) fails as a whole, so a range that finds
    /// no mapping is placed again page by page, and only the pages that
    /// really have none are dropped.
    fn place(&mut self, p: &Pending, data: &[u8]) -> Result<(), String> {
        let end = p.dst + p.pages * PAGE;
        let mut at = p.dst;
        let mut by_page = false;
        while at < end {
            if let Some(&(_, he)) = p.holes.iter().find(|(hs, he)| *hs <= at && at < *he) {
                at = he.min(end);
                continue;
            }
            let stop = p
                .holes
                .iter()
                .map(|h| h.0)
                .filter(|&s| s > at)
                .min()
                .unwrap_or(end)
                .min(end);
            let stop = match by_page {
                true => stop.min(at + PAGE),
                false => stop,
            };
            let lpi = &self.lpis[p.lpi];
            if lpi.exited {
                return Ok(());
            }
            let fd = lpi.fd.as_raw_fd();
            let off = (at - p.dst) as usize;
            let len = stop - at;
            let fill = uffd::copy(fd, at, &data[off..off + len as usize])
                .map_err(|e| format!("UFFDIO_COPY: {e}"))?;
            match fill {
                Fill::Done => {
                    self.stats.placed += len / PAGE;
                    at = stop;
                }
                Fill::Exists(n) => {
                    // Placed n bytes; the next page is there already (the
                    // workload replaced it): skip it.
                    self.stats.placed += n / PAGE;
                    self.stats.dropped += 1;
                    at += n + PAGE;
                }
                Fill::Gone if len > PAGE => by_page = true,
                Fill::Gone => {
                    self.stats.dropped += len / PAGE;
                    at = stop;
                }
                Fill::Exited => {
                    self.lpis[p.lpi].exited = true;
                    epoll_del(self.epoll.as_raw_fd(), fd);
                    return Ok(());
                }
                Fill::Again(n) => {
                    // The address space is changing: the rest goes back to
                    // the missing set (its events are read next, and may
                    // cut it), to be asked again.
                    self.stats.placed += n / PAGE;
                    at += n;
                    let m = &mut self.lpis[p.lpi].missing;
                    m.insert(at, (end, p.img + (at - p.dst)));
                    for &(a, b) in &p.holes {
                        cut(m, a, b);
                    }
                    return self.uffd_events(p.lpi);
                }
            }
        }
        self.stats.took = self.go_at.map(|t| t.elapsed()).unwrap_or_default();
        Ok(())
    }

    fn uffd_events(&mut self, i: usize) -> Result<(), String> {
        loop {
            let Some(l) = self.lpis.get(i) else {
                return Ok(());
            };
            if l.exited {
                return Ok(());
            }
            let fd = l.fd.as_raw_fd();
            let msg = match uffd::read_msg(fd) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("reading a userfaultfd: {e}")),
            };
            match msg.event {
                uffd::EVENT_PAGEFAULT => self.fault(i, msg.fault_address() & !(PAGE - 1))?,
                uffd::EVENT_FORK => {
                    self.log(format!("F {i}"));
                    // SAFETY: the kernel installed the child's descriptor
                    // in this process for us.
                    let fd = unsafe { OwnedFd::from_raw_fd(msg.fork_fd()) };
                    let parent = &self.lpis[i];
                    let mut missing = parent.missing.clone();
                    for p in self.pending.values().filter(|p| p.lpi == i) {
                        let img = p.img;
                        missing.insert(p.dst, (p.dst + p.pages * PAGE, img));
                        for &(a, b) in &p.holes {
                            cut(&mut missing, a, b);
                        }
                    }
                    let src = parent.src;
                    self.push_lpi(Lpi {
                        src,
                        fd,
                        missing,
                        exited: false,
                    })?;
                }
                uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                    let (a, b) = (msg.arg[0], msg.arg[1]);
                    self.drop_range(i, a, b);
                }
                uffd::EVENT_REMAP => {
                    let (from, to, len) = (msg.arg[0], msg.arg[1], msg.arg[2]);
                    self.remap(i, from, to, len);
                }
                e => return Err(format!("an unexpected userfaultfd event {e:#x}")),
            }
        }
    }

    fn drop_range(&mut self, i: usize, a: u64, b: u64) {
        self.log(format!("R {i} {a} {b}"));
        let n = cut(&mut self.lpis[i].missing, a, b);
        self.stats.dropped += n;
        for p in self.pending.values_mut().filter(|p| p.lpi == i) {
            let (s, e) = (p.dst, p.dst + p.pages * PAGE);
            if a < e && b > s {
                p.holes.push((a.max(s), b.min(e)));
            }
        }
    }

    fn remap(&mut self, i: usize, from: u64, to: u64, len: u64) {
        self.log(format!("M {i} {from} {to} {len}"));
        move_ranges(&mut self.lpis[i].missing, from, to, len);
        // A pending request whose target moved: its moved part is
        // asked again at the new place.
        let mut again = Vec::new();
        for p in self.pending.values_mut().filter(|p| p.lpi == i) {
            let (s, e) = (p.dst, p.dst + p.pages * PAGE);
            let (a, b) = (from.max(s), (from + len).min(e));
            if a < b {
                p.holes.push((a, b));
                again.push((a - from + to, b - from + to, a));
            }
        }
        for (s, e, img) in again {
            let img = self
                .pending
                .values()
                .find(|p| p.lpi == i && img >= p.dst && img < p.dst + p.pages * PAGE)
                .map_or(img, |p| p.img + (img - p.dst));
            self.lpis[i].missing.insert(s, (e, img));
        }
    }

    fn fault(&mut self, i: usize, page: u64) -> Result<(), String> {
        self.stats.faults += 1;
        let in_flight = self.pending.iter_mut().find(|(_, p)| {
            p.lpi == i
                && page >= p.dst
                && page < p.dst + p.pages * PAGE
                && !p.holes.iter().any(|&(a, b)| page >= a && page < b)
        });
        match in_flight {
            // Its answer wakes the thread.
            Some((_, p)) if p.urgent => return Ok(()),
            // Asked for in the background, maybe far back in the source's
            // queue: ask for this page again, urgently; the background
            // answer leaves it alone.
            Some((_, p)) => {
                let img = p.img + (page - p.dst);
                p.holes.push((page, page + PAGE));
                return self.send_get(i, page, img, 1, true);
            }
            None => {}
        }
        if let Some((s, e, img)) = take_range(&mut self.lpis[i].missing, page, URGENT_PAGES) {
            return self.fetch(i, s, e, img, true).map(|_| ());
        }
        // Not a page the source had, or one already placed.
        let fd = self.lpis[i].fd.as_raw_fd();
        match uffd::zero(fd, page).map_err(|e| format!("UFFDIO_ZEROPAGE: {e}"))? {
            Fill::Done => self.stats.zero_faults += 1,
            Fill::Exists(_) => uffd::wake(fd, page),
            Fill::Exited => self.lpis[i].exited = true,
            Fill::Gone | Fill::Again(_) => uffd::wake(fd, page),
        }
        Ok(())
    }

    fn all_in(&mut self) -> PagerEnd {
        self.stats.took = self.go_at.map(|t| t.elapsed()).unwrap_or_default();
        let placed = self.stats.placed;
        if let Err(e) = write_frame(&mut self.mem, &Frame::AllIn { pages: placed }, &[]) {
            // Every page is here: the workload is whole whatever the
            // source hears.
            tracing::warn!("every page arrived, but the source did not hear it: {e}");
        } else {
            match read_frame(&mut self.mem) {
                Ok(Frame::Released) => {}
                other => tracing::warn!("the source did not confirm removing its copy: {other:?}"),
            }
        }
        if let Some(k) = self.keeper.take() {
            k.release();
        }
        self.lpis.clear();
        PagerEnd::AllIn(self.stats.clone())
    }
}

/// A pager resumed after a broken transfer ([`super::resume`]): the
/// tasks' source pids, userfaultfds (taken back from the keeper) and
/// missing pages. It runs in the calling thread.
pub(crate) fn resumed(tasks: Vec<(i32, OwnedFd, Ranges)>, mem: Conn, stall: Duration) -> PagerEnd {
    let wake = match eventfd() {
        Ok(w) => w,
        Err(e) => return PagerEnd::Stopped(format!("eventfd: {e}")),
    };
    if let Err(e) = mem
        .set_read_timeout(Some(stall))
        .and_then(|()| mem.set_write_timeout(Some(stall)))
    {
        return PagerEnd::Stopped(format!("the memory channel: {e}"));
    }
    let mut s = State::new(None, PathBuf::new(), mem, wake.as_raw_fd(), stall);
    for (src, fd, missing) in tasks {
        s.stats.lazy_pages += missing
            .iter()
            .map(|(&a, &(b, _))| (b - a) / PAGE)
            .sum::<u64>();
        if let Err(e) = s.push_lpi(Lpi {
            src,
            fd,
            missing,
            exited: false,
        }) {
            return PagerEnd::Stopped(e);
        }
    }
    s.finished = true;
    s.going = true;
    s.go_at = Some(Instant::now());
    s.last_answer = Instant::now();
    let (_tx, rx) = mpsc::channel();
    s.run(rx)
}

fn poll_in(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_and_cut_keep_their_source_addresses() {
        let mut m = Ranges::new();
        m.insert(0x10000, (0x20000, 0x10000));
        let (s, e, img) = take_range(&mut m, 0x12000, 2).unwrap();
        assert_eq!((s, e, img), (0x12000, 0x14000, 0x12000));
        assert_eq!(m.len(), 2);
        assert!(take_range(&mut m, 0x13000, 1).is_none());
        assert_eq!(cut(&mut m, 0x11000, 0x15000), 2);
        assert_eq!(
            m.iter().map(|(&s, &v)| (s, v)).collect::<Vec<_>>(),
            vec![(0x10000, (0x11000, 0x10000)), (0x15000, (0x20000, 0x15000))]
        );
    }
}
