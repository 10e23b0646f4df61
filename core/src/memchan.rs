//! The memory channel: the connection CRIU's page stream travels on. CRIU
//! is handed the socket itself (`ps.fd`) on both sides: over `--insecure`
//! TCP pages go from the dumped process's memory into the socket and from
//! the socket into the destination's image files without passing through
//! phaul; with TLS the socket is the local end of phaul's relay
//! ([`crate::transport`]), which encrypts them.
//!
//! CRIU corks a page-server socket and never uncorks it before waiting for
//! the page server's answer to its final close command, so on TCP the last
//! partial segment would sit in the kernel for the 200 ms cork timeout,
//! inside the downtime. While a dump runs, a watcher thread notices unsent
//! bytes that stop moving and pushes them (setting TCP_NODELAY flushes a
//! corked queue); it also reports progress from the bytes the peer
//! acknowledged.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::engine::report::Progress;

/// Bytes of `struct tcp_info` up to and including `tcpi_bytes_acked`.
const TCP_INFO_BYTES_ACKED_END: usize = 128;
/// `SIOCOUTQNSD`: bytes in the send queue not yet sent.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Bytes the peer acknowledged on a TCP socket (None if not TCP).
fn bytes_acked(fd: RawFd) -> Option<u64> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: a large enough buffer for the kernel to fill.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 || (len as usize) < TCP_INFO_BYTES_ACKED_END {
        return None;
    }
    let end = TCP_INFO_BYTES_ACKED_END;
    Some(u64::from_ne_bytes(
        buf[end - 8..end].try_into().expect("8 bytes"),
    ))
}

fn unsent(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int.
    if unsafe { libc::ioctl(fd, SIOCOUTQNSD, &mut n) } < 0 {
        return 0;
    }
    n
}

fn push(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: valid option pointer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// The memory channel of one migration.
#[derive(Debug)]
pub struct MemChannel {
    conn: Conn,
    watch: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl MemChannel {
    /// Wraps the memory connection (after its attach frame).
    pub fn new(conn: Conn) -> Self {
        Self { conn, watch: None }
    }

    /// The connection (post-copy's page protocol runs on it after the
    /// switch, when CRIU no longer uses it).
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The descriptor CRIU inherits and is told to use as `ps.fd`.
    pub fn raw_fd(&self) -> RawFd {
        self.conn.as_raw_fd()
    }

    /// Bytes sent so far: acknowledged by the peer (TCP), or taken by the
    /// TLS relay; 0 when neither is known (an embedder's socketpair).
    pub fn sent(&self) -> u64 {
        self.counted().unwrap_or(0)
    }

    fn counted(&self) -> Option<u64> {
        self.conn
            .relayed()
            .or_else(|| bytes_acked(self.conn.as_raw_fd()))
    }

    /// Whether byte counts are available.
    pub fn counts_bytes(&self) -> bool {
        self.counted().is_some()
    }

    /// Watches the channel while CRIU sends a pass: pushes stuck corked
    /// bytes and reports progress (bytes since `base`).
    pub fn watch(&mut self, progress: Arc<dyn Progress>, base: u64) {
        self.unwatch();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let fd = self.conn.as_raw_fd();
        let tcp = bytes_acked(fd).is_some();
        let relayed = self.conn.counter();
        let t = std::thread::Builder::new()
            .name("memchan".into())
            .spawn(move || {
                let mut last = (0, Instant::now());
                let mut shown = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    if tcp {
                        let n = unsent(fd);
                        if n > 0 && n == last.0 && last.1.elapsed() >= Duration::from_micros(500) {
                            push(fd);
                        }
                        if n != last.0 {
                            last = (n, Instant::now());
                        }
                    }
                    if shown.elapsed() >= Duration::from_millis(100) {
                        let sent = match &relayed {
                            Some(c) => Some(c.load(Ordering::Relaxed)),
                            None => bytes_acked(fd),
                        };
                        if let Some(n) = sent {
                            progress.pass_progress(n.saturating_sub(base));
                        }
                        shown = Instant::now();
                    }
                    std::thread::sleep(Duration::from_micros(250));
                }
            })
            .expect("spawn memchan thread");
        self.watch = Some((stop, t));
    }

    /// Stops watching.
    pub fn unwatch(&mut self) {
        if let Some((stop, t)) = self.watch.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
    }

    /// Breaks the channel (CRIU's next read or write on it fails).
    pub fn shutdown(&self) {
        self.conn.shutdown();
    }
}

impl Drop for MemChannel {
    fn drop(&mut self) {
        self.unwatch();
    }
}
