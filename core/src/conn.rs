//! [`Conn`]: a connected stream socket (TCP, the local end of a TLS relay,
//! or a unix socketpair handed in by an embedder), readable and writable
//! through a shared reference so one thread can read while another shuts
//! it down.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A connected stream socket.
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
    /// Bytes a relay took from this socket and sent on (TLS).
    relayed: Option<Arc<AtomicU64>>,
}

impl Conn {
    /// Wraps a connected stream socket.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd, relayed: None }
    }

    /// The local end of a relay that counts in `relayed` the bytes it took
    /// from this socket and sent on.
    pub(crate) fn with_counter(mut self, relayed: Arc<AtomicU64>) -> Self {
        self.relayed = Some(relayed);
        self
    }

    /// The relay's counter ([`Conn::relayed`]).
    pub(crate) fn counter(&self) -> Option<Arc<AtomicU64>> {
        self.relayed.clone()
    }

    /// Bytes written to this socket that its relay has sent on (None when
    /// the socket is not a relay's).
    pub fn relayed(&self) -> Option<u64> {
        self.relayed.as_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// Takes over a descriptor number the process inherited (embedded
    /// mode, `--fd-rpc N`). The caller guarantees it is an open, connected
    /// stream socket not owned elsewhere.
    ///
    /// # Safety
    /// `fd` must be open and owned by nobody else.
    pub unsafe fn from_raw(fd: RawFd) -> io::Result<Self> {
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid out-pointers for getsockopt.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "descriptor {fd} is not a socket: {}",
                    io::Error::last_os_error()
                ),
            ));
        }
        if ty != libc::SOCK_STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {fd} is not a stream socket"),
            ));
        }
        // SAFETY: the caller hands over ownership.
        Ok(Self::new(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Disables Nagle's algorithm on TCP sockets (no-op for others) and
    /// turns on keepalive probing ([`Conn::set_keepalive`]).
    pub fn set_nodelay(&self) {
        tune(self.fd.as_fd());
    }

    /// Turns on TCP keepalive probing and a 30 s user timeout, so that a
    /// peer host that vanished (no FIN, no RST) is noticed within about
    /// 30 s, however long the migration's own silences are. No-op for
    /// non-TCP sockets.
    pub fn set_keepalive(&self) {
        keepalive(self.fd.as_fd());
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            fd: self.fd.try_clone()?,
            relayed: self.relayed.clone(),
        })
    }

    /// Breaks the connection in both directions (wakes blocked readers).
    pub fn shutdown(&self) {
        // SAFETY: shutdown on an open descriptor.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Ends the writing direction (the peer reads end-of-file; reading
    /// goes on).
    pub fn shutdown_write(&self) {
        // SAFETY: shutdown on an open descriptor.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
    }

    /// Sets how long a read may block (None: forever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_RCVTIMEO, t)
    }

    /// Sets how long a write may block (None: forever).
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_SNDTIMEO, t)
    }

    /// Bounds reads and writes by `deadline` (None: no bound). A deadline
    /// already past still allows one millisecond, never "forever".
    pub fn set_deadline(&self, deadline: Option<std::time::Instant>) -> io::Result<()> {
        let t = deadline.map(|d| {
            d.saturating_duration_since(std::time::Instant::now())
                .max(std::time::Duration::from_millis(1))
        });
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }

    fn set_timeout(&self, opt: libc::c_int, t: Option<std::time::Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => {
                let d = d.max(std::time::Duration::from_micros(1));
                libc::timeval {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_usec: d.subsec_micros() as libc::suseconds_t,
                }
            }
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: valid option pointer.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether a read would not block (data, or the peer hung up), without
    /// reading.
    pub fn readable(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }

    /// Waits up to `timeout` for data (or the peer's hang-up), without
    /// reading; whether there is some.
    pub fn readable_within(&self, timeout: std::time::Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) > 0 }
    }

    /// Gives up the descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// TCP_NODELAY and keepalive ([`keepalive`]) on a TCP socket; no-op for
/// others.
fn tune(fd: BorrowedFd<'_>) {
    keepalive(fd);
    let one: libc::c_int = 1;
    // SAFETY: valid option pointer; failure (not TCP) is ignored.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Tunes a TCP socket as every phaul connection is ([`Conn::set_nodelay`]).
pub(crate) fn tune_tcp(s: &TcpStream) {
    tune(s.as_fd());
}

/// Keepalive probing and a 30 s user timeout on a TCP socket.
fn keepalive(fd: BorrowedFd<'_>) {
    let fd = fd.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: valid option pointer; failure (not TCP) is ignored.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4);
    // Data left unacknowledged (or a window left closed) for 30 s means
    // the peer is gone, even if it never closed the connection.
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000);
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Conn::new(s.into())
    }
}

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Self {
        Conn::new(s.into())
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buffer pointer and length come from a valid slice.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buffer pointer and length come from a valid slice.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
