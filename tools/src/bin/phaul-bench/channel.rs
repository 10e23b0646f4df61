//! The baselines for the memory channel, measured in the same run: a plain
//! loopback TCP stream (one connection, 1 MiB writes) — with `--insecure`
//! phaul hands CRIU the memory connection itself — and the same stream
//! through phaul's TLS transport (`Remote::dial` / `Acceptor::accept`: the
//! writer and the reader each on a socketpair, a relay thread on each side
//! encrypting or decrypting), which isolates what the relays cost.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_core::transport::{Acceptor, Identity, Remote, TlsClient, TlsFiles, TlsServer};
use serde::Serialize;

/// The baseline, MiB/s.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Channel {
    /// Plain loopback TCP, one stream, 1 MiB writes.
    pub tcp_mib_s: f64,
    /// The same through phaul's TLS relays (both sides), MiB/s.
    pub tls_mib_s: f64,
    /// User+system CPU of this process while streaming plain TCP, ms
    /// (writer, reader and the kernel's work for them).
    pub tcp_cpu_ms: f64,
    /// The same through the TLS relays (writer, reader, both relays).
    pub tls_cpu_ms: f64,
    /// Bytes moved by each stream.
    pub bytes: u64,
}

fn cpu_ms() -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: this process's own usage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn pump(mut w: impl Write, total: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; 1 << 20];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn drain(mut r: impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got += n as u64;
    }
}

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// A client and a server connection through phaul's TLS transport, with
/// the certificates in `tls` (`src/`, `dst/` as `phaul certs issue` wrote
/// them).
fn tls_pair(tls: &Path) -> anyhow::Result<(phaul_core::conn::Conn, phaul_core::conn::Conn)> {
    let server = TlsServer::new(
        &Identity::load(&TlsFiles::in_dir(&tls.join("dst")))?,
        vec![],
    )?;
    let client = TlsClient::new(&Identity::load(&TlsFiles::in_dir(&tls.join("src")))?)?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let remote = Remote::tls(l.local_addr()?, Arc::new(client), "127.0.0.1");
    let accepting = std::thread::spawn(move || -> anyhow::Result<_> {
        let (tcp, _) = l.accept()?;
        let (conn, _) = Acceptor::Tls(Arc::new(server))
            .accept(tcp, Instant::now() + Duration::from_secs(10))?;
        Ok(conn)
    });
    let a = remote.dial(Duration::from_secs(10))?;
    let b = accepting
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
    Ok((a, b))
}

/// Streams `bytes` from `a` to `b`: MiB/s, CPU ms, bytes received.
fn stream(
    a: impl Write,
    b: impl Read + Send + 'static,
    bytes: u64,
) -> anyhow::Result<(f64, f64, u64)> {
    let cpu = cpu_ms();
    let t = Instant::now();
    let reader = std::thread::spawn(move || drain(b));
    pump(a, bytes)?;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    Ok((rate(got, secs), cpu_ms() - cpu, got))
}

/// Streams `bytes` over loopback TCP, then through the TLS relays.
pub fn measure(bytes: u64, tls: &Path) -> anyhow::Result<Channel> {
    let (a, b) = tcp_pair()?;
    let (tcp, tcp_cpu, got) = stream(a, b, bytes)?;
    let (a, b) = tls_pair(tls)?;
    // The writer's end closes when `pump` returns (the relay sends
    // close_notify), so the reader sees the end of the stream.
    let (tls_rate, tls_cpu, tls_got) = stream(a, b, bytes)?;
    if tls_got != got {
        anyhow::bail!("the TLS stream carried {tls_got} bytes of {got}");
    }
    Ok(Channel {
        tcp_mib_s: tcp,
        tls_mib_s: tls_rate,
        tcp_cpu_ms: tcp_cpu,
        tls_cpu_ms: tls_cpu,
        bytes: got,
    })
}
