//! Looking at and signalling a process tree through /proc.

use std::collections::BTreeSet;

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The pids of `root` and all its descendants (threads excluded), root
/// first. Processes that vanish while walking are skipped.
pub fn tree(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        out.push(pid);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Resident memory of the tree in bytes (from `smaps_rollup`), an estimate
/// of what its images will need.
pub fn tree_rss(root: i32) -> u64 {
    tree(root)
        .into_iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("Rss:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|kb| kb.parse::<u64>().ok())
                })
                .unwrap_or(0)
                * 1024
        })
        .sum()
}

/// Sends `sig` to every process of the tree (leaves first).
pub fn signal_tree(root: i32, sig: nix::sys::signal::Signal) {
    for pid in tree(root).into_iter().rev() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Fields of `/proc/PID/stat` after the command name (field 3 onwards).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// A process's start time (clock ticks since boot): with the pid, it names
/// one process even after its pid is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The processes of the tree under `root`, each with its start time.
pub fn tasks(root: i32) -> Vec<crate::journal::Task> {
    tree(root)
        .into_iter()
        .filter_map(|pid| {
            start_time(pid).map(|start_time| crate::journal::Task { pid, start_time })
        })
        .collect()
}

/// What became of a recorded process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Gone (or its pid now names another process, or a zombie).
    Gone,
    /// Stopped (SIGSTOP, or held by a tracer).
    Stopped,
    /// Running (or sleeping: anything that can make progress).
    Running,
}

/// The state of `t`, checking that its pid still names the same process.
pub fn task_state(t: &crate::journal::Task) -> TaskState {
    let Some(f) = stat_fields(t.pid) else {
        return TaskState::Gone;
    };
    let same = f.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(t.start_time);
    match f.first().map(String::as_str) {
        _ if !same => TaskState::Gone,
        Some("Z") | Some("X") | None => TaskState::Gone,
        Some("T") | Some("t") => TaskState::Stopped,
        Some(_) => TaskState::Running,
    }
}

/// Sends `sig` to each recorded process that still is the one recorded
/// (leaves first); returns how many were signalled.
pub fn signal_tasks(tasks: &[crate::journal::Task], sig: nix::sys::signal::Signal) -> usize {
    let mut n = 0;
    for t in tasks.iter().rev() {
        if task_state(t) != TaskState::Gone
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(t.pid), sig).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Whether any recorded process still exists (running or stopped).
pub fn any_exists(tasks: &[crate::journal::Task]) -> bool {
    tasks.iter().any(|t| task_state(t) != TaskState::Gone)
}

/// The recorded processes that still exist, with every descendant they
/// have now (children forked after the record; a process that reparented
/// away is still found by its own record).
pub fn remaining(tasks: &[crate::journal::Task]) -> Vec<crate::journal::Task> {
    let mut out: Vec<crate::journal::Task> = Vec::new();
    for t in tasks.iter().filter(|t| task_state(t) != TaskState::Gone) {
        for d in self::tasks(t.pid) {
            if task_state(&d) != TaskState::Gone && !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// Kills the recorded processes and waits up to `timeout` for them to go.
pub fn kill_tasks(tasks: &[crate::journal::Task], timeout: std::time::Duration) -> bool {
    signal_tasks(tasks, nix::sys::signal::Signal::SIGKILL);
    let end = std::time::Instant::now() + timeout;
    while any_exists(tasks) {
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// `pid` as a [`crate::journal::Task`], if it exists.
pub fn task(pid: i32) -> Option<crate::journal::Task> {
    start_time(pid).map(|start_time| crate::journal::Task { pid, start_time })
}

/// This process, as a [`crate::journal::Task`].
pub fn this_task() -> Option<crate::journal::Task> {
    task(std::process::id() as i32)
}

/// The `NSpid` line of a process: its id in each PID namespace, outermost
/// first (empty if it is gone).
pub fn ns_pids(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("NSpid:")).map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// A pidfd for `pid` (`pidfd_open`).
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a fresh descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads `buf.len()` bytes of process `pid`'s memory at `addr`
/// (`process_vm_readv`): the bytes read (fewer where the range ends in
/// unmapped memory).
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec over `buf`; the remote one is only read by
    // the kernel.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `MemAvailable` from `/proc/meminfo`, bytes (0 if unreadable).
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}
