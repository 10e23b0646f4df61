//! Restart mode for the pid htype: what a process tree needs to be started
//! again elsewhere (program, arguments, working directory, environment, and
//! who it runs as: [`Identity`]), stopping the whole tree on the source, and
//! starting it, detached and as what it was, on the destination — or on the
//! source again when the migration fails.
//!
//! This is a restart, not a live move: the new process starts from scratch
//! with the same command line in the synced files; its memory is not kept.
//! Its children are not started by the driver: the restarted root starts
//! them again, as it did the first time.
//!
//! The stop walks the tree itself (through `/proc/PID/task/*/children`,
//! each process named by its pid and start time) rather than with the
//! engine's `phaul_core::proc`: a driver depends on phaul-plugin-api alone.
//! The engine checks the outcome with its own walk before the final sync.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use phaul_plugin_api::{DriverError, DriverResult};
use serde::{Deserialize, Serialize};

use crate::identity::{self, Identity};

/// The meta file carrying a [`Launch`] to the destination.
pub const META_FILE: &str = "pid-restart.json";

/// The version of [`Launch`] this driver writes: 1 had no `version` field
/// and no identity (the workload started as root in the service's cgroup),
/// 2 adds [`Launch::identity`]. Version 1 is still read; a newer one is
/// refused.
pub const LAUNCH_VERSION: u32 = 2;

fn version_1() -> u32 {
    1
}

/// How to start the workload again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The format's version ([`LAUNCH_VERSION`]; 1 when absent).
    #[serde(default = "version_1")]
    pub version: u32,
    /// The program (the source process's executable).
    pub exe: String,
    /// Its arguments, `argv[0]` included.
    pub argv: Vec<String>,
    /// Its working directory.
    pub cwd: String,
    /// Its environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Who it runs as (ids, groups, umask, limits, cgroups); absent in
    /// version 1.
    #[serde(default)]
    pub identity: Option<Identity>,
}

fn nul_list(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

impl Launch {
    /// Records how `pid` was started, from /proc.
    pub fn record(pid: i32) -> DriverResult<Launch> {
        let read = |what: &str| {
            std::fs::read(format!("/proc/{pid}/{what}"))
                .map_err(|e| DriverError::failed(format!("cannot read /proc/{pid}/{what}: {e}")))
        };
        let link = |what: &str| {
            std::fs::read_link(format!("/proc/{pid}/{what}"))
                .map(|p| p.to_string_lossy().into_owned())
                .map_err(|e| DriverError::failed(format!("cannot read /proc/{pid}/{what}: {e}")))
        };
        let argv = nul_list(&read("cmdline")?);
        if argv.is_empty() {
            return Err(DriverError::failed(format!(
                "process {pid} has no command line (a kernel thread?)"
            )));
        }
        Ok(Launch {
            version: LAUNCH_VERSION,
            exe: link("exe")?,
            argv,
            cwd: link("cwd")?,
            env: nul_list(&read("environ")?),
            identity: Some(Identity::record(pid).map_err(|e| DriverError::failed(e.to_string()))?),
        })
    }

    /// Writes the meta file into `dir`.
    pub fn save(&self, dir: &str) -> DriverResult<()> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| DriverError::failed(e.to_string()))?;
        std::fs::write(Path::new(dir).join(META_FILE), json)
            .map_err(|e| DriverError::failed(format!("cannot write {META_FILE}: {e}")))
    }

    /// Reads the meta file from `dir`.
    pub fn load(dir: &str) -> DriverResult<Launch> {
        let raw = std::fs::read(Path::new(dir).join(META_FILE))
            .map_err(|e| DriverError::failed(format!("the source sent no {META_FILE}: {e}")))?;
        let launch: Launch = serde_json::from_slice(&raw)
            .map_err(|e| DriverError::failed(format!("bad {META_FILE}: {e}")))?;
        if launch.version > LAUNCH_VERSION {
            return Err(DriverError::invalid(format!(
                "{META_FILE} is version {}, this pid driver reads versions up to \
                 {LAUNCH_VERSION}: the source's phaul is newer than this one",
                launch.version
            )));
        }
        if launch.version >= 2 && launch.identity.is_none() {
            return Err(DriverError::invalid(format!(
                "{META_FILE} version {} carries no identity",
                launch.version
            )));
        }
        Ok(launch)
    }

    /// Starts the program detached (its own session, reparented away from
    /// the caller, standard streams on /dev/null) as what it was — its
    /// cgroups joined, limits, umask, groups, gids and uids set in the child
    /// before the exec — and returns its pid. Any step that fails fails the
    /// start, naming the step.
    pub fn start(&self) -> DriverResult<i32> {
        let c =
            |s: &str| CString::new(s).map_err(|_| DriverError::invalid(format!("NUL in {s:?}")));
        let exe = c(&self.exe)?;
        let argv: Vec<CString> = self.argv.iter().map(|a| c(a)).collect::<Result<_, _>>()?;
        let env: Vec<CString> = self.env.iter().map(|a| c(a)).collect::<Result<_, _>>()?;
        let cwd = CString::new(Path::new(&self.cwd).as_os_str().as_bytes())
            .map_err(|_| DriverError::invalid("NUL in the working directory"))?;
        if !Path::new(&self.exe).exists() {
            return Err(DriverError::not_found(format!(
                "cannot start the workload: {} does not exist on this host",
                self.exe
            )));
        }
        if !Path::new(&self.cwd).is_dir() {
            return Err(DriverError::not_found(format!(
                "cannot start the workload: its working directory {} does not exist on this host",
                self.cwd
            )));
        }
        let identity = match &self.identity {
            Some(id) => Some(
                id.prepare()
                    .map_err(|e| DriverError::failed(format!("cannot start the workload: {e}")))?,
            ),
            None => None,
        };
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
        env_p.push(std::ptr::null());
        let devnull = c("/dev/null")?;
        let pipe = || -> DriverResult<[i32; 2]> {
            let mut fds = [0i32; 2];
            // SAFETY: fills `fds`.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                return Err(DriverError::failed(format!(
                    "pipe: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(fds)
        };
        // The grandchild's pid comes on `fds`; a failure of a step before
        // the exec on `errs`, which the exec closes.
        let fds = pipe()?;
        let errs = pipe()?;
        // SAFETY: plain syscalls; between fork and exec only async-signal-safe
        // calls are made, on data prepared before the fork.
        unsafe {
            let child = libc::fork();
            if child < 0 {
                return Err(DriverError::failed(format!(
                    "fork: {}",
                    std::io::Error::last_os_error()
                )));
            }
            if child == 0 {
                libc::setsid();
                let grandchild = libc::fork();
                if grandchild != 0 {
                    let v = grandchild.to_ne_bytes();
                    libc::write(fds[1], v.as_ptr().cast(), v.len());
                    libc::_exit(0);
                }
                let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                if libc::chdir(cwd.as_ptr()) < 0 {
                    identity::report(
                        errs[1],
                        identity::Failure {
                            step: 0,
                            index: 0,
                            errno: *libc::__errno_location(),
                        },
                    );
                    libc::_exit(126);
                }
                if let Some(id) = &identity {
                    if let Err(f) = id.apply() {
                        identity::report(errs[1], f);
                        libc::_exit(126);
                    }
                }
                libc::execve(exe.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
                identity::report(
                    errs[1],
                    identity::Failure {
                        step: -1,
                        index: 0,
                        errno: *libc::__errno_location(),
                    },
                );
                libc::_exit(127);
            }
            libc::close(fds[1]);
            libc::close(errs[1]);
            let mut buf = [0u8; 4];
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            libc::close(fds[0]);
            let mut status = 0;
            libc::waitpid(child, &mut status, 0);
            let mut errs = File::from_raw_fd(errs[0]);
            if n != 4 {
                return Err(DriverError::failed(
                    "cannot start the workload (fork failed)",
                ));
            }
            if let Some(f) = identity::read_report(&mut errs) {
                let err = std::io::Error::from_raw_os_error(f.errno);
                let why = match (f.step, &identity) {
                    (0, _) => format!("cannot enter {}: {err}", self.cwd),
                    (-1, _) => format!("cannot execute {}: {err}", self.exe),
                    (_, Some(id)) => id.describe(f),
                    (_, None) => err.to_string(),
                };
                return Err(DriverError::failed(format!(
                    "cannot start the workload: {why}"
                )));
            }
            let pid = i32::from_ne_bytes(buf);
            // An exec that fails exits at once: catch it rather than report success.
            std::thread::sleep(Duration::from_millis(50));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z") {
                return Err(DriverError::failed(format!(
                    "the workload ({}) exited right after starting",
                    self.exe
                )));
            }
            Ok(pid)
        }
    }
}

/// One process, named by its pid and start time (so a reused pid is not
/// taken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Task {
    pid: i32,
    start_time: u64,
}

/// State letter and start time of `pid`, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

impl Task {
    fn of(pid: i32) -> Option<Task> {
        stat(pid).map(|(_, start_time)| Task { pid, start_time })
    }

    /// Still this process, and not a zombie.
    fn exists(&self) -> bool {
        stat(self.pid).is_some_and(|(s, t)| t == self.start_time && s != 'Z' && s != 'X')
    }

    fn signal(&self, sig: i32) {
        if self.exists() {
            // SAFETY: kill with a plain signal number.
            unsafe { libc::kill(self.pid, sig) };
        }
    }
}

/// Adds to `tasks` every descendant of the ones that still exist (children
/// from `/proc/PID/task/*/children`, recursively) not in it yet; returns
/// how many were added.
fn add_descendants(tasks: &mut Vec<Task>) -> usize {
    let before = tasks.len();
    let mut todo: Vec<i32> = tasks.iter().filter(|t| t.exists()).map(|t| t.pid).collect();
    while let Some(pid) = todo.pop() {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in threads.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if let Some(task) = Task::of(c) {
                    if !tasks.contains(&task) {
                        tasks.push(task);
                        todo.push(c);
                    }
                }
            }
        }
    }
    tasks.len() - before
}

/// Stops every process of the tree rooted at `pid`: SIGTERM to all of them
/// (the descendants found when the stop begins, and any forked while it
/// runs), SIGKILL after `grace` to what is left, until none exists (zombies
/// do not count). Processes that reparented away keep being tracked by pid
/// and start time.
pub fn stop(pid: i32, grace: Duration) -> DriverResult<()> {
    let Some(root) = Task::of(pid).filter(Task::exists) else {
        return Ok(());
    };
    let mut tasks = vec![root];
    add_descendants(&mut tasks);
    for (sig, wait) in [
        (libc::SIGTERM, grace),
        (libc::SIGKILL, Duration::from_secs(5)),
    ] {
        let mut signalled = 0;
        let end = Instant::now() + wait;
        loop {
            // Signal the ones not signalled yet with this signal (all of
            // them the first time, then those forked meanwhile).
            for t in &tasks[signalled..] {
                t.signal(sig);
            }
            signalled = tasks.len();
            if !tasks.iter().any(Task::exists) {
                return Ok(());
            }
            if Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            add_descendants(&mut tasks);
        }
    }
    let left: Vec<String> = tasks
        .iter()
        .filter(|t| t.exists())
        .map(|t| t.pid.to_string())
        .collect();
    Err(DriverError::failed(format!(
        "processes {} of the tree of {pid} did not stop, even after SIGKILL",
        left.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(json: &str) -> DriverResult<Launch> {
        let dir = std::env::temp_dir().join(format!("phaul-launch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(META_FILE), json).unwrap();
        let r = Launch::load(dir.to_str().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    #[test]
    fn version_1_descriptions_are_still_read_and_newer_ones_refused() {
        let v1 = r#"{"exe": "/bin/true", "argv": ["true"], "cwd": "/", "env": []}"#;
        let l = roundtrip(v1).unwrap();
        assert_eq!(l.version, 1);
        assert!(l.identity.is_none());
        let v3 = r#"{"version": 3, "exe": "/bin/true", "argv": ["true"], "cwd": "/", "env": []}"#;
        let e = roundtrip(v3).unwrap_err();
        assert!(e.message.contains("version 3"), "{}", e.message);
        let v2 = r#"{"version": 2, "exe": "/bin/true", "argv": ["true"], "cwd": "/", "env": []}"#;
        assert!(roundtrip(v2).unwrap_err().message.contains("no identity"));
    }

    #[test]
    fn a_recorded_launch_carries_the_identity_through_its_file() {
        let me = std::process::id() as i32;
        let l = Launch::record(me).unwrap();
        assert_eq!(l.version, LAUNCH_VERSION);
        let dir = std::env::temp_dir().join(format!("phaul-launch-rec-{me}"));
        std::fs::create_dir_all(&dir).unwrap();
        l.save(dir.to_str().unwrap()).unwrap();
        let back = Launch::load(dir.to_str().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.unwrap(), l);
    }
}
