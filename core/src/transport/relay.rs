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
/// One read from either side. From the network the relay reads into its
/// own buffer and feeds rustls from there: rustls reads at most 4 KiB per
/// `read_tls`, which read straight from the socket would cost a syscall
/// (and, on the TCP side, often an ACK) per 4 KiB.
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
    /// Plaintext from the network, not yet written to the engine, from
    /// `inbound_at` on; never longer than 2 * IN_LIMIT.
    inbound: Vec<u8>,
    inbound_at: usize,
    /// Plaintext from the engine rustls did not take yet, from
    /// `outbound_at` on.
    outbound: Vec<u8>,
    outbound_at: usize,
    /// Bytes read from the network, not yet given to rustls: `net_at` to
    /// `net_len`.
    net: Vec<u8>,
    net_at: usize,
    net_len: usize,
    buf: Vec<u8>,
    /// The network will bring nothing more (TCP end-of-file, or rustls saw
    /// close_notify); rustls may still hold plaintext from before it.
    net_done: bool,
    /// The peer will send nothing more and rustls has handed over all it
    /// decrypted (close_notify or end-of-file, after the last byte).
    peer_done: bool,
    /// The engine's reading side was shut down after `peer_done`.
    engine_told: bool,
    /// The engine will send nothing more.
    engine_done: bool,
    /// close_notify and FIN went out after `engine_done`.
    peer_told: bool,
    /// The engine closed its end altogether (after `peer_told`): what the
    /// peer still sends is read and dropped until it closes too, or until
    /// this instant (a peer that never closes does not keep the relay).
    engine_gone: Option<std::time::Instant>,
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
            outbound_at: 0,
            net: vec![0; CHUNK],
            net_at: 0,
            net_len: 0,
            buf: vec![0; CHUNK],
            net_done: false,
            peer_done: false,
            engine_told: false,
            engine_done: false,
            peer_told: false,
            engine_gone: None,
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

    fn pending_out(&self) -> usize {
        self.outbound.len() - self.outbound_at
    }

    fn pending_net(&self) -> usize {
        self.net_len - self.net_at
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

    /// Moves plaintext rustls decrypted into `inbound` (straight from
    /// rustls's buffer).
    fn decrypted(&mut self) -> io::Result<()> {
        use std::io::BufRead;
        while self.pending_in() < IN_LIMIT {
            let mut reader = self.tls.reader();
            match reader.fill_buf() {
                Ok([]) => {
                    self.peer_done = true;
                    break;
                }
                Ok(chunk) => {
                    let n = chunk.len();
                    if self.inbound_at == self.inbound.len() {
                        self.inbound.clear();
                        self.inbound_at = 0;
                    } else if self.inbound.len() + n > 2 * IN_LIMIT {
                        // An engine that never quite catches up never
                        // empties `inbound`: drop what it took, or the
                        // buffer grows with the stream (at most IN_LIMIT
                        // bytes move per IN_LIMIT written).
                        self.inbound.drain(..self.inbound_at);
                        self.inbound_at = 0;
                    }
                    self.inbound.extend_from_slice(chunk);
                    reader.consume(n);
                }
                // Nothing buffered: the end, if the network has ended.
                Err(e) if would_block(&e) => {
                    self.peer_done |= self.net_done;
                    break;
                }
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
        if self.engine_gone.is_some() {
            self.inbound.clear();
            self.inbound_at = 0;
            self.engine_told = self.peer_done;
            return Ok(());
        }
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
            if self.pending_out() > 0 {
                let n = self
                    .tls
                    .writer()
                    .write(&self.outbound[self.outbound_at..])?;
                self.outbound_at += n;
                self.sent.fetch_add(n as u64, Ordering::Relaxed);
                if self.pending_out() > 0 {
                    return Ok(());
                }
            }
            self.outbound.clear();
            self.outbound_at = 0;
            if self.engine_done {
                return Ok(());
            }
            match (&self.unix).read(&mut self.buf) {
                Ok(0) => {
                    self.engine_done = true;
                    self.tls.send_close_notify();
                    return Ok(());
                }
                // Straight to rustls; only what it does not take yet is
                // kept.
                Ok(n) => {
                    let took = self.tls.writer().write(&self.buf[..n])?;
                    self.sent.fetch_add(took as u64, Ordering::Relaxed);
                    self.outbound.extend_from_slice(&self.buf[took..n]);
                }
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

    /// Reads and decrypts what the network has, until it would block or
    /// `inbound` is full: one read of up to [`CHUNK`] bytes from the
    /// socket, handed to rustls in its 4 KiB steps.
    fn pull_from_network(&mut self) -> io::Result<()> {
        while !self.net_done && self.pending_in() < IN_LIMIT {
            if self.pending_net() == 0 {
                match (&self.tcp).read(&mut self.net) {
                    Ok(0) => {
                        // Lets rustls see the EOF (and tell a clean
                        // close_notify from a cut connection).
                        let _ = self.tls.read_tls(&mut io::empty());
                        self.net_done = true;
                        continue;
                    }
                    Ok(n) => {
                        self.net_at = 0;
                        self.net_len = n;
                    }
                    Err(e) if would_block(&e) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            let mut bytes = &self.net[self.net_at..self.net_len];
            match self.tls.read_tls(&mut bytes) {
                // close_notify came: rustls takes nothing more (what it
                // decrypted before still goes to the engine: `decrypted`
                // says when it is all out).
                Ok(0) => self.net_done = true,
                Ok(n) => {
                    self.net_at += n;
                    if let Err(e) = self.tls.process_new_packets() {
                        // Tell the peer why (an alert), then give up.
                        let _ = self.tls.write_tls(&mut self.tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    self.decrypted()?;
                }
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
        if (state.plaintext_bytes_to_read() > 0
            || (self.pending_net() > 0 && !self.net_done)
            || (self.net_done && !self.peer_done))
            && self.pending_in() < IN_LIMIT
        {
            return Ok(());
        }
        if self.pending_out() > 0 && !self.tls.wants_write() {
            return Ok(());
        }
        let mut tcp_ev = 0;
        if !self.net_done && self.pending_in() < IN_LIMIT && self.pending_net() == 0 {
            tcp_ev |= libc::POLLIN;
        }
        if self.tls.wants_write() {
            tcp_ev |= libc::POLLOUT;
        }
        let mut unix_ev = 0;
        if self.pending_in() > 0 {
            unix_ev |= libc::POLLOUT;
        }
        if !self.engine_done && self.pending_out() == 0 {
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
                // Watched for a hang-up alone once all the engine wrote
                // went out: if it then closes its end, nobody will read.
                fd: if unix_ev != 0 || self.hang_up_matters() {
                    self.unix.as_raw_fd()
                } else {
                    -1
                },
                events: unix_ev,
                revents: 0,
            },
        ];
        if tcp_ev == 0 && unix_ev == 0 && !self.hang_up_matters() {
            return Err(io::Error::other("relay stalled"));
        }
        let timeout = match self.engine_gone {
            Some(until) => {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer did not close after this side did",
                    ));
                }
                left.as_millis().min(i32::MAX as u128) as i32 + 1
            }
            None => -1,
        };
        // SAFETY: two valid pollfd entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let hung_up = fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0;
        // The engine closed its end altogether with bytes still waiting for
        // it: it will not read them; give up.
        if hung_up && self.pending_in() > 0 && self.engine_gone.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the local end closed",
            ));
        }
        // It closed after everything it wrote went out: drain the peer
        // until it closes (closing now, with its bytes unread, would reset
        // the connection and could destroy what it has not read yet).
        if hung_up && self.hang_up_matters() {
            self.engine_gone = Some(std::time::Instant::now() + std::time::Duration::from_secs(10));
        }
        Ok(())
    }

    /// Whether the engine's hang-up is worth watching: all it wrote went
    /// out (close_notify and FIN too), and it might still be reading.
    fn hang_up_matters(&self) -> bool {
        self.peer_told && !self.engine_told && self.engine_gone.is_none()
    }
}
