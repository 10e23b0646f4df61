//! Facts the kernel gives about local sockets: who owns the other end of
//! a loopback connection (`/proc/net/tcp{,6}` lists every socket of the
//! network namespace with its owner's uid, as `inet_diag` does), and
//! whether kernel TLS is available.

use std::net::SocketAddr;

use crate::engine::checks::parse_addr;

/// IPv4-mapped IPv6 addresses as IPv4, so both families compare.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// The uid owning the socket whose local address is `peer` and remote
/// address is `local`: the other end of a connection this process
/// accepted. None when no such socket is listed (not on this host's
/// network namespace, or gone).
pub(super) fn owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (peer, local) = (canonical(peer), canonical(local));
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let (Some(l), Some(r)) = (parse_addr(f[1]), parse_addr(f[2])) else {
                continue;
            };
            if canonical(l) == peer && canonical(r) == local {
                return f[7].parse().ok();
            }
        }
    }
    None
}

/// Whether the `tls` TCP upper-layer protocol exists: attaching it to an
/// unconnected socket fails with ENOTCONN when it does, ENOENT when the
/// kernel has no TLS.
pub(super) fn ulp_tls_available() -> bool {
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let name = b"tls";
        let r = libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        );
        let e = std::io::Error::last_os_error().raw_os_error();
        libc::close(fd);
        r == 0 || e == Some(libc::ENOTCONN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_loopback_connection_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let me = unsafe { libc::geteuid() };
        assert_eq!(owner(peer, s.local_addr().unwrap()), Some(me));
        drop(c);
        assert_eq!(
            owner(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ),
            None
        );
    }
}
