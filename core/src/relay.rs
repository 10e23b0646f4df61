//! Moving CRIU's page-server stream between a local socket (CRIU's end of a
//! socketpair) and the memory connection, without copying through user
//! space: each direction splices through a pipe in its own thread.
//!
//! Why not give CRIU the TCP socket itself? CRIU sets `TCP_CORK` on a
//! page-server socket, which stalls its last pages and its close command for
//! the kernel's 200 ms cork timeout; a local socketpair avoids that, and the
//! relay lets phaul count bytes for progress and statistics.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes moved so far, readable while the relay runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Towards the peer (pages on the source).
    pub sent: AtomicU64,
    /// From the peer (pages on the destination).
    pub received: AtomicU64,
}

/// A running two-way relay.
#[derive(Debug)]
pub struct Relay {
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    fds: [RawFd; 2],
    _owned: Arc<[OwnedFd; 2]>,
    error: Arc<Mutex<Option<String>>>,
}

const CHUNK: usize = 1 << 20;

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // A bigger pipe means fewer round trips; failure only costs speed.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((r, w))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain syscall on descriptors kept open by the caller.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
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

/// Copies `from` to `to` until EOF, then shuts `to` down with `how`.
fn pump(from: RawFd, to: RawFd, count: &AtomicU64, how: libc::c_int) -> io::Result<()> {
    let (pr, pw) = pipe_pair()?;
    loop {
        let n = splice(from, pw.as_raw_fd(), CHUNK)?;
        if n == 0 {
            // SAFETY: shutdown on a descriptor kept open by the caller.
            unsafe { libc::shutdown(to, how) };
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = splice(pr.as_raw_fd(), to, left)?;
            if m == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer stopped reading",
                ));
            }
            left -= m;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Relay {
    /// Starts relaying between `local` (CRIU's side) and `remote` (the
    /// memory connection), both stream sockets.
    pub fn start(local: OwnedFd, remote: OwnedFd) -> Relay {
        let counters = Arc::new(Counters::default());
        let fds = [local.as_raw_fd(), remote.as_raw_fd()];
        let owned = Arc::new([local, remote]);
        let error = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        for (from, to, outbound) in [(fds[0], fds[1], true), (fds[1], fds[0], false)] {
            let counters = counters.clone();
            let owned = owned.clone();
            let error = error.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(if outbound { "relay-out" } else { "relay-in" }.into())
                    .spawn(move || {
                        let count = if outbound {
                            &counters.sent
                        } else {
                            &counters.received
                        };
                        // CRIU ending its session is a half-close passed on to
                        // the peer. The peer closing means it is done or gone:
                        // CRIU's side is shut completely, so a CRIU blocked on
                        // a write fails at once instead of waiting forever.
                        let how = if outbound {
                            libc::SHUT_WR
                        } else {
                            libc::SHUT_RDWR
                        };
                        let r = pump(from, to, count, how);
                        if let Err(e) = &r {
                            let dir = if outbound {
                                "to the peer"
                            } else {
                                "from the peer"
                            };
                            let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert_with(|| format!("memory stream {dir} broke: {e}"));
                            // Make both ends fail fast: CRIU sees the error, so does the peer.
                            for fd in owned.iter() {
                                // SAFETY: shutdown on descriptors `owned` keeps open.
                                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                            }
                        }
                        r
                    })
                    .expect("spawn relay thread"),
            );
        }
        Relay {
            counters,
            threads,
            fds,
            _owned: owned,
            error,
        }
    }

    /// Live byte counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The first error either direction hit, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Breaks both directions (used on abort).
    pub fn shutdown(&self) {
        for fd in self.fds {
            // SAFETY: the descriptors stay open until `self` is dropped.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    /// Waits for both directions to finish; the first error if any.
    pub fn join(mut self) -> Result<(), String> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn relays_both_ways_and_counts() {
        let (criu, local) = UnixStream::pair().unwrap();
        let (remote, mut peer) = UnixStream::pair().unwrap();
        let relay = Relay::start(local.into(), remote.into());
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut criu = criu.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || {
                criu.write_all(&data).unwrap();
                criu.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, data);
        peer.write_all(b"ack!").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        let mut criu = criu;
        criu.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"ack!");
        let c = relay.counters();
        assert_eq!(c.sent.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(c.received.load(Ordering::Relaxed), 4);
        relay.join().unwrap();
    }
}
