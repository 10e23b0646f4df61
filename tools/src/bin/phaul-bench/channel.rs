//! The memory channel on its own: how fast phaul's relay (CRIU's socketpair
//! -> splice -> TCP -> splice -> socketpair) moves bytes, against a plain
//! loopback TCP stream measured the same way in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use phaul_core::relay::Relay;
use serde::Serialize;

/// The two rates, MiB/s.
#[derive(Debug, Clone, Serialize)]
pub struct Channel {
    /// Plain loopback TCP, one stream, 1 MiB writes.
    pub tcp_mib_s: f64,
    /// The same bytes through phaul's two relays and a loopback TCP stream.
    pub relay_mib_s: f64,
    /// Bytes moved by each.
    pub bytes: u64,
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

/// Measures both, `bytes` each.
pub fn measure(bytes: u64) -> anyhow::Result<Channel> {
    // Plain TCP.
    let (a, b) = tcp_pair()?;
    let t = Instant::now();
    let reader = std::thread::spawn(move || drain(b));
    pump(a, bytes)?;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let tcp = rate(got, t.elapsed().as_secs_f64());

    // CRIU's side -> relay -> TCP -> relay -> page server's side.
    let (criu_src, relay_src_local) = UnixStream::pair()?;
    let (relay_dst_local, page_server) = UnixStream::pair()?;
    let (tcp_src, tcp_dst) = tcp_pair()?;
    let r1 = Relay::start(relay_src_local.into(), tcp_src.into());
    let r2 = Relay::start(relay_dst_local.into(), tcp_dst.into());
    let t = Instant::now();
    let reader = std::thread::spawn(move || drain(page_server));
    let mut w = criu_src;
    pump(&mut w, bytes)?;
    w.shutdown(std::net::Shutdown::Write)?;
    let got2 = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let relay = rate(got2, t.elapsed().as_secs_f64());
    r1.shutdown();
    r2.shutdown();
    Ok(Channel {
        tcp_mib_s: tcp,
        relay_mib_s: relay,
        bytes: got.min(got2),
    })
}
