//! `--tcp-listen`: a non-blocking line server answering `"<n>\n"` with
//! `"<n+1>\n"`, serviced from the tick loop.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{Context, Result};
use nix::sys::socket::{
    listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
};

/// Most bytes read from one connection per tick (keeps ticks short).
const READ_BUDGET: usize = 64 * 1024;
/// Longest accepted request line; longer ones close the connection.
const MAX_LINE: usize = 64;

/// One client connection.
struct Conn {
    stream: TcpStream,
    /// Received bytes not yet forming a full line.
    inbuf: Vec<u8>,
    /// Answers not yet sent.
    outbuf: Vec<u8>,
    /// The peer shut down its sending side (or an error occurred).
    closing: bool,
}

/// The listening socket and its clients.
pub struct TcpServer {
    listener: TcpListener,
    conns: Vec<Conn>,
    /// Requests answered so far.
    requests: u64,
}

impl TcpServer {
    /// Creates the non-blocking listening socket (SO_REUSEADDR).
    pub fn bind(addr: SocketAddr) -> Result<TcpServer> {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("socket")?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).context("setsockopt(SO_REUSEADDR)")?;
        bind_raw(fd.as_raw_fd(), addr).with_context(|| format!("binding {addr}"))?;
        listen(&fd, Backlog::new(128).expect("valid backlog"))
            .with_context(|| format!("listening on {addr}"))?;
        Ok(TcpServer {
            listener: TcpListener::from(fd),
            conns: Vec::new(),
            requests: 0,
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Connected clients.
    pub fn clients(&self) -> u64 {
        self.conns.len() as u64
    }

    /// Accepts new clients and serves all connections, without blocking.
    pub fn service(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.conns.push(Conn {
                        stream,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        closing: false,
                    });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut answered = 0;
        self.conns.retain_mut(|c| {
            let (alive, n) = c.serve();
            answered += n;
            alive
        });
        self.requests += answered;
    }
}

/// bind(2) with a `sockaddr_in` / `sockaddr_in6` built from `addr`.
fn bind_raw(fd: RawFd, addr: SocketAddr) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `storage` holds a valid address of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd,
            (&storage as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Conn {
    /// Reads, answers and writes what it can; returns whether to keep the
    /// connection and how many requests were answered.
    fn serve(&mut self) -> (bool, u64) {
        let mut answered = 0;
        let mut buf = [0u8; 4096];
        let mut budget = READ_BUDGET;
        while !self.closing && budget > 0 {
            match self.stream.read(&mut buf) {
                Ok(0) => self.closing = true,
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    self.inbuf.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return (false, 0),
            }
        }
        let mut start = 0;
        while let Some(nl) = self.inbuf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.inbuf[start..start + nl];
            let answer = std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .and_then(|n| n.checked_add(1));
            match answer {
                Some(n) => self.outbuf.extend_from_slice(format!("{n}\n").as_bytes()),
                None => self.outbuf.extend_from_slice(b"ERR\n"),
            }
            answered += 1;
            start += nl + 1;
        }
        self.inbuf.drain(..start);
        if self.inbuf.len() > MAX_LINE {
            return (false, answered);
        }
        while !self.outbuf.is_empty() {
            match self.stream.write(&self.outbuf) {
                Ok(0) => return (false, answered),
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return (false, answered),
            }
        }
        (!(self.closing && self.outbuf.is_empty()), answered)
    }
}
