//! Pre-flight checks that catch, before anything is frozen, the failures
//! CRIU would otherwise report only after the freeze:
//!
//! - **Process ids.** CRIU restores a tree's processes with the same ids.
//!   A tree in its own PID namespace (as containers are) gets a new
//!   namespace on the destination, so nothing can collide; a tree in the
//!   host's PID namespace needs its ids free there. The source sends the
//!   ids ([`restore_pids`]), the destination checks them ([`check_pids`]).
//! - **Listening and bound sockets.** A tree that shares the host's
//!   network namespace re-binds its listening TCP and bound UDP sockets on
//!   the destination; the source lists them ([`bound_sockets`]), the
//!   destination tries to bind each ([`check_sockets`]). A tree with its
//!   own network namespace takes it along: nothing to check.
//! - **Unix sockets connected outside the tree.** CRIU cannot restore the
//!   far end of a connection it did not dump; without `-o ext-unix-sk` it
//!   refuses such a tree, after freezing it. [`check_unix_peers`] finds
//!   them first (the kernel's `sock_diag` names each socket's peer).
//! - **Session and process group.** A tree whose session or process group
//!   leader is outside it (a program started from a shell) can only be
//!   dumped with its terminal (`-o shell-job`); [`check_session`] says so
//!   before CRIU would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::proc;

/// A socket the tree listens on (TCP) or is bound to (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundSocket {
    /// TCP (listening) or UDP (bound).
    pub tcp: bool,
    /// The local address.
    pub addr: SocketAddr,
}

impl std::fmt::Display for BoundSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", if self.tcp { "TCP" } else { "UDP" }, self.addr)
    }
}

/// The ids CRIU will restore the tree's processes with, when they must be
/// free on the destination; empty when the tree is the init of its own
/// PID namespace (it gets a new namespace there).
pub fn restore_pids(root: i32) -> Vec<i32> {
    if proc::ns_pids(root).last() == Some(&1) {
        return Vec::new();
    }
    proc::tree(root)
        .into_iter()
        .filter_map(|p| proc::ns_pids(p).last().copied())
        .collect()
}

/// Destination: the first of `pids` that is taken here, as a refusal.
pub fn check_pids(pids: &[i32]) -> Result<(), String> {
    match pids
        .iter()
        .find(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        Some(p) => Err(format!(
            "process id {p} of the workload is in use on the destination: CRIU restores a tree's \
             processes with the same ids, so a tree in the host PID namespace can only move where \
             its ids are free (a workload in its own PID namespace, as containers are, does not \
             have this limit)"
        )),
        None => Ok(()),
    }
}

fn namespace(pid: &str, ns: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok()
}

/// Parses `0100007F:1F90` (or the IPv6 form) from `/proc/net/tcp`.
pub(crate) fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_be(
            u32::from_str_radix(ip, 16).ok()?,
        ))),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The tree's listening TCP and bound UDP sockets, when it shares this
/// process's network namespace (empty otherwise).
pub fn bound_sockets(root: i32) -> Vec<BoundSocket> {
    if namespace(&root.to_string(), "net") != namespace("self", "net") {
        return Vec::new();
    }
    let inodes = socket_inodes(root);
    let mut out = Vec::new();
    for (file, tcp, state) in [
        ("tcp", true, "0A"),
        ("tcp6", true, "0A"),
        ("udp", false, "07"),
        ("udp6", false, "07"),
    ] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{root}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != state {
                continue;
            }
            let inode: u64 = f[9].parse().unwrap_or(0);
            if let (true, Some(addr)) = (inodes.contains_key(&inode), parse_addr(f[1])) {
                out.push(BoundSocket { tcp, addr });
            }
        }
    }
    out.sort_by_key(|b| (b.tcp, b.addr));
    out.dedup();
    out
}

/// Destination: binds a socket like each of `bound` (and lets go of it at
/// once); the first that cannot be bound, as a refusal.
pub fn check_sockets(bound: &[BoundSocket]) -> Result<(), String> {
    for b in bound {
        // A TCP listener binds with SO_REUSEADDR (connections lingering in
        // TIME_WAIT do not block a restore; a listener does).
        let r = match b.tcp {
            true => std::net::TcpListener::bind(b.addr).map(drop),
            false => std::net::UdpSocket::bind(b.addr).map(drop),
        };
        if let Err(e) = r {
            let why = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => "is in use on the destination",
                Some(libc::EADDRNOTAVAIL) => "is not an address of the destination",
                _ => "cannot be bound on the destination",
            };
            return Err(format!(
                "the workload's {b} {why} ({e}): the restore would fail; free it there, or give \
                 the workload its own network namespace"
            ));
        }
    }
    Ok(())
}

/// The socket inodes the tree's processes hold open.
fn socket_inodes(root: i32) -> std::collections::BTreeMap<u64, i32> {
    let mut inodes = std::collections::BTreeMap::new();
    for pid in proc::tree(root) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(i) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|i| i.parse::<u64>().ok())
                {
                    inodes.entry(i).or_insert(pid);
                }
            }
        }
    }
    inodes
}

/// Every unix socket of this network namespace and its peer's inode, from
/// the kernel (`NETLINK_SOCK_DIAG`, `UDIAG_SHOW_PEER`).
fn unix_peers() -> std::io::Result<std::collections::HashMap<u64, u64>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UNIX_DIAG_PEER: u16 = 2;
    // SAFETY: plain socket call; the result is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16 bytes) + unix_diag_req (24 bytes).
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: a valid buffer for the length given.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut peers = std::collections::HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    let u16_at = |b: &[u8], o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    loop {
        // SAFETY: a valid buffer for the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let b = &buf[..n as usize];
        let mut off = 0;
        while off + 16 <= b.len() {
            let len = u32_at(b, off) as usize;
            let ty = u16_at(b, off + 4);
            if len < 16 || off + len > b.len() {
                return Ok(peers);
            }
            match ty {
                NLMSG_DONE => return Ok(peers),
                NLMSG_ERROR => return Err(std::io::Error::other("sock_diag refused the request")),
                _ => {}
            }
            // unix_diag_msg: family, type, state, pad, ino, cookie[2].
            let msg = &b[off + 16..off + len];
            if msg.len() >= 16 {
                let ino = u32_at(msg, 4) as u64;
                let mut a = 16;
                while a + 4 <= msg.len() {
                    let alen = u16_at(msg, a) as usize;
                    let aty = u16_at(msg, a + 2);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    if aty == UNIX_DIAG_PEER && alen >= 8 {
                        peers.insert(ino, u32_at(msg, a + 4) as u64);
                    }
                    a += (alen + 3) & !3;
                }
            }
            off += (len + 3) & !3;
        }
    }
}

/// Source: a unix socket of the tree connected to one outside it needs
/// `ext-unix-sk`; the refusal names the process and the peer.
pub fn check_unix_peers(root: i32, ext_unix_sk: bool) -> Result<(), String> {
    if ext_unix_sk || namespace(&root.to_string(), "net") != namespace("self", "net") {
        return Ok(());
    }
    let ours = socket_inodes(root);
    let Ok(peers) = unix_peers() else {
        return Ok(()); // No sock_diag: CRIU will say it, if it must.
    };
    for (ino, pid) in &ours {
        if let Some(peer) = peers.get(ino).filter(|p| **p != 0 && !ours.contains_key(p)) {
            return Err(format!(
                "a unix socket of the workload (process {pid}, socket inode {ino}) is connected \
                 to a socket outside the tree (inode {peer}): CRIU cannot restore the other end; \
                 pass -o ext-unix-sk (the peer sees the connection break and must reconnect), \
                 or migrate the peer along"
            ));
        }
    }
    Ok(())
}

/// Source: a tree whose session or process-group leader is outside it
/// needs `shell-job`; the refusal names the leader and what to do.
pub fn check_session(root: i32, shell_job: bool) -> Result<(), String> {
    if shell_job {
        return Ok(());
    }
    let Some((pgrp, sid)) = std::fs::read_to_string(format!("/proc/{root}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<i32> = rest
                .split_whitespace()
                .skip(2)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some((*f.first()?, *f.get(1)?))
        })
    else {
        return Ok(());
    };
    let tree = proc::tree(root);
    for (what, leader) in [("session", sid), ("process group", pgrp)] {
        if leader != 0 && !tree.contains(&leader) {
            return Err(format!(
                "the workload's {what} leader (pid {leader}) is outside the tree rooted at \
                 {root} (it was started from a shell?): CRIU cannot dump it without its \
                 terminal; pass -o shell-job, or start the workload detached (setsid, stdio \
                 redirected)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
        assert_eq!(parse_addr("zz"), None);
    }

    #[test]
    fn a_listening_socket_of_this_process_is_found_and_its_address_is_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let found = bound_sockets(std::process::id() as i32);
        let me = BoundSocket { tcp: true, addr };
        assert!(found.contains(&me), "{found:?}");
        let e = check_sockets(&[me]).unwrap_err();
        assert!(e.contains("in use on the destination"), "{e}");
        drop(l);
        // Free again (a child another test forks may hold the descriptor
        // for a moment before its exec closes it).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while check_sockets(&[me]).is_err() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        check_sockets(&[me]).unwrap();
    }

    #[test]
    fn a_tree_whose_session_leader_is_outside_needs_shell_job() {
        // A child of this test is in this test's session, whose leader is
        // not in the child's tree.
        let mut c = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        let e = check_session(pid, false).unwrap_err();
        assert!(e.contains("-o shell-job") && e.contains("leader"), "{e}");
        check_session(pid, true).unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    #[test]
    fn a_unix_socket_connected_outside_the_tree_needs_ext_unix_sk() {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        // A child holding one end; this test holds the other.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("100");
        // SAFETY: fcntl only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::fcntl(fd, libc::F_SETFD, 0);
                Ok(())
            });
        }
        let mut c = cmd.spawn().unwrap();
        let pid = c.id() as i32;
        let e = check_unix_peers(pid, false).unwrap_err();
        assert!(
            e.contains("-o ext-unix-sk") && e.contains(&pid.to_string()),
            "{e}"
        );
        check_unix_peers(pid, true).unwrap();
        // A tree whose sockets all connect inside it passes.
        check_unix_peers(std::process::id() as i32, false).unwrap();
        drop(ours);
        let _ = c.kill();
        let _ = c.wait();
    }

    #[test]
    fn taken_pids_are_named() {
        let me = std::process::id() as i32;
        let e = check_pids(&[me]).unwrap_err();
        assert!(
            e.contains(&me.to_string()) && e.contains("PID namespace"),
            "{e}"
        );
        // This test process runs in the host PID namespace.
        assert!(restore_pids(me).contains(&me));
        check_pids(&[i32::MAX - 1]).unwrap();
    }
}
