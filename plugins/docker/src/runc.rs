//! The destination engine's runc restore of one container, as this host's
//! process table shows it: found by its command line, judged dead when its
//! CRIU died under it, and killed with its children so that the engine's
//! start request returns. (runc's CRIU forks the restored tree's root as a
//! sibling that inherits the RPC socket: when CRIU's RPC process dies, that
//! child keeps the socket open and runc waits for an answer forever, and so
//! do containerd, the engine's start and every `docker rm` of the
//! container.)

use std::time::Duration;

/// A process's command line, as its arguments.
fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A process's state letter and parent, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The `runc ... restore ... ID` process of container `id`, if one runs.
pub fn restore_of(id: &str) -> Option<i32> {
    pids().into_iter().find(|&p| {
        let a = cmdline(p);
        a.first().is_some_and(|c| c.ends_with("runc"))
            && a.iter().any(|x| x == "restore")
            && a.last().is_some_and(|x| x == id)
    })
}

/// Children of `pid`, with their state letters and names.
fn children(pid: i32) -> Vec<(i32, char, String)> {
    pids()
        .into_iter()
        .filter_map(|p| {
            let (st, pp) = stat(p)?;
            (pp == pid).then(|| {
                let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                (p, st, comm.trim().to_string())
            })
        })
        .collect()
}

/// Whether runc `runc`'s CRIU has died under it (a `criu` child left a
/// zombie: runc reaps it only once it has its answer, which never comes).
pub fn criu_died(runc: i32) -> bool {
    children(runc)
        .iter()
        .any(|(_, st, comm)| *st == 'Z' && comm == "criu")
}

/// SIGKILLs `pid` and its children (runc and its CRIU processes).
pub fn kill_tree(pid: i32) {
    let kids: Vec<i32> = children(pid).into_iter().map(|(p, _, _)| p).collect();
    for p in kids.iter().copied().chain(std::iter::once(pid)) {
        // SAFETY: kill(2) on pids just read from /proc.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
}

/// How long CRIU must have stayed dead before runc is killed (a CRIU that
/// exits at the end of a good restore is reaped by runc at once).
pub const DEAD_FOR: Duration = Duration::from_secs(1);
