//! The baseline for the memory channel: a plain loopback TCP stream (one
//! connection, 1 MiB writes) measured in the same run. phaul hands CRIU the
//! memory connection itself, so its in-migration rate (pages over CRIU's
//! memwrite time) is compared against this.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use serde::Serialize;

/// The baseline, MiB/s.
#[derive(Debug, Clone, Serialize)]
pub struct Channel {
    /// Plain loopback TCP, one stream, 1 MiB writes.
    pub tcp_mib_s: f64,
    /// Bytes moved.
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

/// Streams `bytes` over loopback TCP.
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

    Ok(Channel {
        tcp_mib_s: tcp,
        bytes: got,
    })
}
