//! Data in flight: a pipe, a FIFO and unix socketpairs (stream, dgram,
//! seqpacket) whose both ends the workload holds, with a fixed backlog of
//! messages always written and not yet read; and a helper listening on a
//! unix socket bound to a relative path.
//!
//! Message `n` (from 1) is `8 + (13 n mod 57)` bytes: `n` (little endian)
//! then a filler derived from `n`. The writer sends one per tick; the reader
//! reads only while more than [`BACKLOG`] are unread, so at any instant —
//! the freeze included — [`BACKLOG`] messages sit in the kernel's buffer.
//! A lost, doubled, reordered, merged or split message breaks the sequence
//! (datagram and seqpacket reads must return exactly one message each).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::helper::{cvt, exit_now, sleep_ms, Channel, Helper, ANSWER_TIMEOUT};
use super::{Check, Object};

/// Messages always written and not yet read.
pub const BACKLOG: u64 = 16;

/// Length of message `n`.
fn msg_len(n: u64) -> usize {
    8 + ((n * 13) % 57) as usize
}

/// Message `n`.
fn message(n: u64) -> Vec<u8> {
    let mut m = n.to_le_bytes().to_vec();
    m.extend((8..msg_len(n)).map(|i| (n as u8).wrapping_mul(7).wrapping_add(i as u8)));
    m
}

/// One channel with both ends in the workload.
pub struct Stream {
    /// What it is, for the detail.
    what: String,
    tx: File,
    rx: File,
    /// Each read returns exactly one message (dgram, seqpacket).
    boundaries: bool,
    /// Messages completely written / completely read.
    sent: u64,
    received: u64,
    /// Bytes of the message being written that did not fit yet.
    unsent: Vec<u8>,
    /// Bytes read past the last complete message (byte streams).
    partial: Vec<u8>,
    /// `sent` at the previous check: those were in flight then.
    sent_at_check: u64,
    /// First inconsistency; the channel is not read any more after it.
    broken: Option<String>,
}

/// The last OS error, unless it says "try again" (None).
fn hard_error() -> Option<io::Error> {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => None,
        _ => Some(e),
    }
}

impl Stream {
    fn with(what: String, rx: File, tx: File, boundaries: bool) -> Stream {
        Stream {
            what,
            tx,
            rx,
            boundaries,
            sent: 0,
            received: 0,
            unsent: Vec::new(),
            partial: Vec::new(),
            sent_at_check: 0,
            broken: None,
        }
    }

    /// A pipe.
    pub fn pipe() -> Result<Stream> {
        let (rx, tx) = super::helper::pipe(libc::O_NONBLOCK).context("pipe2")?;
        Ok(Stream::with("pipe".into(), rx, tx, false))
    }

    /// A FIFO at `path` (created here), opened for reading, then writing.
    pub fn fifo(path: &Path) -> Result<Stream> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: NUL-terminated path; fresh descriptors become Files.
        let (rx, tx) = unsafe {
            cvt(libc::mkfifo(c.as_ptr(), 0o600)).context("mkfifo")?;
            let rx = cvt(libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            ))
            .context("opening the FIFO for reading")?;
            let rx = File::from_raw_fd(rx);
            let tx = cvt(libc::open(
                c.as_ptr(),
                libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            ))
            .context("opening the FIFO for writing")?;
            (rx, File::from_raw_fd(tx))
        };
        Ok(Stream::with(
            format!("FIFO {}", path.display()),
            rx,
            tx,
            false,
        ))
    }

    /// A unix socketpair of `type_` (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET).
    pub fn unix(type_: libc::c_int) -> Result<Stream> {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                type_ | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })
        .context("socketpair")?;
        // SAFETY: two fresh descriptors.
        let (rx, tx) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let (what, boundaries) = match type_ {
            libc::SOCK_STREAM => ("unix stream socketpair", false),
            libc::SOCK_DGRAM => ("unix dgram socketpair", true),
            _ => ("unix seqpacket socketpair", true),
        };
        Ok(Stream::with(what.into(), rx, tx, boundaries))
    }

    /// Writes the next message (or the rest of a partly written one).
    fn write_one(&mut self) {
        if self.unsent.is_empty() {
            self.unsent = message(self.sent + 1);
        }
        // SAFETY: unsent is valid for its length.
        let r = unsafe {
            libc::write(
                self.tx.as_raw_fd(),
                self.unsent.as_ptr().cast(),
                self.unsent.len(),
            )
        };
        if r < 0 {
            if let Some(e) = hard_error() {
                self.broken = Some(format!("write of message {}: {e}", self.sent + 1));
            }
            return;
        }
        let r = r as usize;
        if self.boundaries && r != self.unsent.len() {
            self.broken = Some(format!("message {} sent short ({r} bytes)", self.sent + 1));
            return;
        }
        self.unsent.drain(..r);
        if self.unsent.is_empty() {
            self.sent += 1;
        }
    }

    /// Reads while more than [`BACKLOG`] messages are unread.
    fn read_excess(&mut self) {
        let mut buf = [0u8; 4096];
        while self.broken.is_none() && self.sent - self.received > BACKLOG {
            let want = if self.boundaries {
                buf.len()
            } else {
                // Exactly the bytes of the messages past the backlog.
                let total: usize = (self.received + 1..=self.sent - BACKLOG).map(msg_len).sum();
                (total - self.partial.len()).min(buf.len())
            };
            // SAFETY: buf is valid for `want` bytes.
            let r = unsafe { libc::read(self.rx.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
            if r <= 0 {
                let why = if r == 0 {
                    "end of file".to_string()
                } else {
                    match hard_error() {
                        Some(e) => e.to_string(),
                        None => "nothing to read".to_string(),
                    }
                };
                self.broken = Some(format!(
                    "message {} missing ({why}) with {} unread",
                    self.received + 1,
                    self.sent - self.received
                ));
                return;
            }
            let got = &buf[..r as usize];
            if self.boundaries {
                self.accept(got);
            } else {
                self.partial.extend_from_slice(got);
                while self.broken.is_none() && self.partial.len() >= msg_len(self.received + 1) {
                    let m: Vec<u8> = self.partial.drain(..msg_len(self.received + 1)).collect();
                    self.accept(&m);
                }
            }
        }
    }

    /// Checks that `m` is the next message.
    fn accept(&mut self, m: &[u8]) {
        let n = self.received + 1;
        if m != message(n).as_slice() {
            let seq = m
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            self.broken = Some(format!(
                "expected message {n} ({} bytes), read {} bytes starting with number {seq:?}",
                msg_len(n),
                m.len()
            ));
            return;
        }
        self.received = n;
    }
}

impl Object for Stream {
    fn tick(&mut self, _counter: u64) {
        if self.broken.is_none() {
            self.write_one();
            self.read_excess();
        }
    }

    fn verify(&mut self) -> Check {
        let mut problems = Vec::new();
        if let Some(b) = &self.broken {
            problems.push(b.clone());
        }
        let in_flight = self.sent - self.received;
        if self.broken.is_none() && in_flight != BACKLOG {
            problems.push(format!("{in_flight} in flight, expected {BACKLOG}"));
        }
        // What was in flight at the previous check has been read since, in
        // order (and new messages were written).
        if self.received < self.sent_at_check {
            problems.push(format!(
                "only {} read, but {} were written at the previous check",
                self.received, self.sent_at_check
            ));
        }
        if self.sent <= self.sent_at_check {
            problems.push("nothing written since the previous check".into());
        }
        let previous = self.sent_at_check;
        self.sent_at_check = self.sent;
        Check::unless(
            problems,
            format!(
                "{}: {} messages written, {} read in order{}, {in_flight} in flight; \
                 all {previous} written by the previous check arrived",
                self.what,
                self.sent,
                self.received,
                if self.boundaries {
                    ", one message per read"
                } else {
                    ""
                }
            ),
        )
    }
}

/// A helper process whose cwd is the objects directory, listening on the
/// unix socket it bound to the relative name `name`; it answers each
/// connection with its socket's name and its cwd, and the check connects to
/// the socket's absolute path.
pub struct UnixListen {
    helper: Helper,
    path: PathBuf,
    name: String,
    accepted: u64,
}

/// The sun_path of a bound unix socket, as bound.
fn socket_name(fd: RawFd) -> String {
    // SAFETY: an all-zero sockaddr_un is valid output space.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr and len describe valid output space.
    if unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) } < 0
    {
        return String::new();
    }
    let path: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&path).into_owned()
}

/// The helper: bind `name` relative to `dir`, listen, serve forever.
fn listener_main(mut ch: Channel, dir: &Path, name: &str) {
    let setup = || -> io::Result<std::os::unix::net::UnixListener> {
        std::env::set_current_dir(dir)?;
        let _ = std::fs::remove_file(name);
        std::os::unix::net::UnixListener::bind(name)
    };
    let listener = match setup() {
        Ok(l) => l,
        Err(e) => {
            ch.reply(false, &format!("binding {name} in {}: {e}", dir.display()));
            exit_now(1)
        }
    };
    ch.reply(true, &socket_name(listener.as_raw_fd()));
    loop {
        let Ok((mut conn, _)) = listener.accept() else {
            sleep_ms(10);
            continue;
        };
        let _ = conn.set_read_timeout(Some(ANSWER_TIMEOUT));
        let mut req = [0u8; 5];
        if conn.read_exact(&mut req).is_err() || &req != b"ping\n" {
            continue;
        }
        let cwd = std::fs::read_link("/proc/self/cwd")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let answer = format!("pong {} {cwd}\n", socket_name(listener.as_raw_fd()));
        let _ = conn.write_all(answer.as_bytes());
    }
}

impl UnixListen {
    pub fn new(dir: &Path, name: &str) -> Result<UnixListen> {
        let path = dir.join(name);
        if path.as_os_str().len() >= 108 {
            bail!("{} is too long for a unix socket path", path.display());
        }
        let owned_dir = dir.to_path_buf();
        let owned_name = name.to_string();
        let (helper, bound) = Helper::start(c"obj-listener", move |ch| {
            listener_main(ch, &owned_dir, &owned_name)
        })?;
        if bound != name {
            bail!("the listener is bound to {bound:?}, not {name:?}");
        }
        Ok(UnixListen {
            helper,
            path,
            name: name.to_string(),
            accepted: 0,
        })
    }

    /// Connects to the socket's absolute path and reads the answer.
    fn connect(&self) -> io::Result<String> {
        let mut s = UnixStream::connect(&self.path)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        s.write_all(b"ping\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer.trim_end().to_string())
    }
}

impl Object for UnixListen {
    fn verify(&mut self) -> Check {
        let answer = match self.connect() {
            Ok(a) => a,
            Err(e) => {
                return Check::fail(format!("connecting to {}: {e}", self.path.display()));
            }
        };
        let mut words = answer.split(' ');
        let (pong, bound, cwd) = (words.next(), words.next(), words.next());
        let dir = self.path.parent().map(|d| d.display().to_string());
        let mut problems = Vec::new();
        if pong != Some("pong") {
            problems.push(format!("answer {answer:?}"));
        }
        if bound != Some(self.name.as_str()) {
            problems.push(format!(
                "bound to {bound:?}, not the relative {:?}",
                self.name
            ));
        }
        if cwd.map(str::to_string) != dir {
            problems.push(format!("listener's cwd {cwd:?}"));
        }
        if problems.is_empty() {
            self.accepted += 1;
        }
        Check::unless(
            problems,
            format!(
                "connection to {} accepted by pid {} (bound to relative {:?} in cwd {}); {} accepted so far",
                self.path.display(),
                self.helper.pid,
                self.name,
                cwd.unwrap_or("?"),
                self.accepted
            ),
        )
    }

    fn shutdown(&mut self) {
        self.helper.kill();
    }
}
