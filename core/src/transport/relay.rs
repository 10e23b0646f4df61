//! The TLS relay: one thread per connection carries bytes between a TLS
//! connection on a TCP socket and one end of a local socketpair, whose
//! other end the engine (or CRIU) uses as a plain socket. Non-blocking,
//! driven by poll(2), with bounded buffers in each direction (phaul's
//! memory stays flat whatever the workload's size). A half-close travels
//! through: the engine shutting its end down sends TLS close_notify and
//! then a TCP FIN; the peer's close_notify (or FIN) shuts down the engine's
//! reading side. Any error breaks both sides, so blocked readers wake.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::Connection;

use crate::conn::Conn;

/// Decrypted bytes held for the engine before TLS reading pauses.
const IN_LIMIT: usize = 1 << 20;
/// Plaintext rustls may hold encrypted for the network.
const OUT_LIMIT: usize = 1 << 20;
/// One read from either side.
const CHUNK: usize = 256 << 10;

/// Starts relaying `tls` (handshake done) over `tcp`; the engine's end.
pub(super) fn spawn(mut tls: Connection, tcp: TcpStream) -> io::Result<Conn> {
    let (ours, theirs) = UnixStream::pair()?;
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    tcp.set_nonblocking(true)?;
    ours.set_nonblocking(true)?;
    tls.set_buffer_limit(Some(OUT_LIMIT));
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::Builder::new()
        .name("tls-relay".into())
        .spawn(move || {
            if let Err(e) = Relay::new(tls, tcp, ours, counter).run() {
                tracing::debug!("TLS relay ended: {e}");
            }
        })?;
    Ok(Conn::from(theirs).with_counter(sent))
}

struct Relay {
    tls: Connection,
    tcp: TcpStream,
    unix: UnixStream,
    /// Plaintext from the network, not yet written to the engine.
    inbound: Vec<u8>,
    inbound_at: usize,
    /// Plaintext from the engine rustls did not take yet.
    outbound: Vec<u8>,
    buf: Vec<u8>,
    /// The peer will send nothing more (close_notify or EOF).
    peer_done: bool,
    /// The engine's reading side was shut down after `peer_done`.
    engine_told: bool,
    /// The engine will send nothing more.
    engine_done: bool,
    /// close_notify and FIN went out after `engine_done`.
    peer_told: bool,
    sent: Arc<AtomicU64>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

impl Relay {
    fn new(tls: Connection, tcp: TcpStream, unix: UnixStream, sent: Arc<AtomicU64>) -> Self {
        Self {
            tls,
            tcp,
            unix,
            inbound: Vec::new(),
            inbound_at: 0,
            outbound: Vec::new(),
            buf: vec![0; CHUNK],
            peer_done: false,
            engine_told: false,
            engine_done: false,
            peer_told: false,
            sent,
        }
    }

    fn run(mut self) -> io::Result<()> {
        let r = self.pump();
        if r.is_err() {
            let _ = self.tcp.shutdown(Shutdown::Both);
            let _ = self.unix.shutdown(Shutdown::Both);
        }
        r
    }

    fn pending_in(&self) -> usize {
        self.inbound.len() - self.inbound_at
    }

    fn pump(&mut self) -> io::Result<()> {
        loop {
            self.decrypted()?;
            self.push_to_engine()?;
            self.pull_from_engine()?;
            self.push_to_network()?;
            if self.peer_done && self.engine_told && self.engine_done && self.peer_told {
                return Ok(());
            }
            self.wait()?;
            self.pull_from_network()?;
        }
    }

    /// Moves plaintext rustls decrypted into `inbound`.
    fn decrypted(&mut self) -> io::Result<()> {
        while self.pending_in() < IN_LIMIT {
            match self.tls.reader().read(&mut self.buf) {
                Ok(0) => {
                    self.peer_done = true;
                    break;
                }
                Ok(n) => {
                    if self.inbound_at == self.inbound.len() {
                        self.inbound.clear();
                        self.inbound_at = 0;
                    }
                    self.inbound.extend_from_slice(&self.buf[..n]);
                }
                Err(e) if would_block(&e) => break,
                // EOF without close_notify: the peer is gone; whatever the
                // engine was reading is cut short, which its framing sees.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.peer_done = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn push_to_engine(&mut self) -> io::Result<()> {
        while self.pending_in() > 0 {
            match (&self.unix).write(&self.inbound[self.inbound_at..]) {
                Ok(n) => self.inbound_at += n,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.peer_done && !self.engine_told {
            let _ = self.unix.shutdown(Shutdown::Write);
            self.engine_told = true;
        }
        Ok(())
    }

    fn pull_from_engine(&mut self) -> io::Result<()> {
        loop {
            if !self.outbound.is_empty() {
                let n = self.tls.writer().write(&self.outbound)?;
                self.outbound.drain(..n);
                self.sent.fetch_add(n as u64, Ordering::Relaxed);
                if !self.outbound.is_empty() {
                    return Ok(());
                }
            }
            if self.engine_done {
                return Ok(());
            }
            match (&self.unix).read(&mut self.buf) {
                Ok(0) => {
                    self.engine_done = true;
                    self.tls.send_close_notify();
                    return Ok(());
                }
                Ok(n) => self.outbound.extend_from_slice(&self.buf[..n]),
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn push_to_network(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.engine_done && !self.peer_told {
            let _ = self.tcp.shutdown(Shutdown::Write);
            self.peer_told = true;
        }
        Ok(())
    }

    /// Reads and decrypts what the network has (4 KiB per read: rustls's
    /// read size), until it would block or `inbound` is full.
    fn pull_from_network(&mut self) -> io::Result<()> {
        while !self.peer_done && self.pending_in() < IN_LIMIT {
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => self.peer_done = true,
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        // Tell the peer why (an alert), then give up.
                        let _ = self.tls.write_tls(&mut self.tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    self.decrypted()?;
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sleeps until one of the sockets can do what the relay wants (at
    /// once when there is work without waiting: plaintext rustls holds
    /// that `inbound` has room for, or engine bytes rustls has room for).
    fn wait(&mut self) -> io::Result<()> {
        let state = self
            .tls
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if state.plaintext_bytes_to_read() > 0 && self.pending_in() < IN_LIMIT {
            return Ok(());
        }
        if !self.outbound.is_empty() && !self.tls.wants_write() {
            return Ok(());
        }
        let mut tcp_ev = 0;
        if !self.peer_done && self.pending_in() < IN_LIMIT {
            tcp_ev |= libc::POLLIN;
        }
        if self.tls.wants_write() {
            tcp_ev |= libc::POLLOUT;
        }
        let mut unix_ev = 0;
        if self.pending_in() > 0 {
            unix_ev |= libc::POLLOUT;
        }
        if !self.engine_done && self.outbound.is_empty() {
            unix_ev |= libc::POLLIN;
        }
        // A descriptor nobody waits on is left out (-1), so that a hang-up
        // on it cannot wake the loop over and over.
        let mut fds = [
            libc::pollfd {
                fd: if tcp_ev != 0 {
                    self.tcp.as_raw_fd()
                } else {
                    -1
                },
                events: tcp_ev,
                revents: 0,
            },
            libc::pollfd {
                // Watched for a hang-up alone once the engine stopped
                // writing: if it closes its end, nobody will read.
                fd: if unix_ev != 0 || self.engine_done && !self.engine_told {
                    self.unix.as_raw_fd()
                } else {
                    -1
                },
                events: unix_ev,
                revents: 0,
            },
        ];
        if tcp_ev == 0 && unix_ev == 0 {
            return Err(io::Error::other("relay stalled"));
        }
        // SAFETY: two valid pollfd entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // The engine closed its end altogether: nothing will read what the
        // peer sends; finish (and let the peer see the connection go).
        if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0
            && (self.pending_in() > 0 || self.engine_done && !self.engine_told)
        {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the local end closed",
            ));
        }
        Ok(())
    }
}
