//! Restart mode for the pid htype: what a process tree needs to be started
//! again elsewhere (program, arguments, working directory, environment),
//! stopping it on the source, and starting it, detached, on the
//! destination — or on the source again when the migration fails.
//!
//! This is a restart, not a live move: the new process starts from scratch
//! with the same command line in the synced files; its memory is not kept.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use phaul_plugin_api::{DriverError, DriverResult};
use serde::{Deserialize, Serialize};

/// The meta file carrying a [`Launch`] to the destination.
pub const META_FILE: &str = "pid-restart.json";

/// How to start the workload again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The program (the source process's executable).
    pub exe: String,
    /// Its arguments, `argv[0]` included.
    pub argv: Vec<String>,
    /// Its working directory.
    pub cwd: String,
    /// Its environment, `KEY=VALUE`.
    pub env: Vec<String>,
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
            exe: link("exe")?,
            argv,
            cwd: link("cwd")?,
            env: nul_list(&read("environ")?),
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
        serde_json::from_slice(&raw)
            .map_err(|e| DriverError::failed(format!("bad {META_FILE}: {e}")))
    }

    /// Starts the program detached (its own session, reparented away from
    /// the caller, standard streams on /dev/null) and returns its pid.
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
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
        env_p.push(std::ptr::null());
        let devnull = c("/dev/null")?;
        let mut fds = [0i32; 2];
        // SAFETY: plain syscalls; between fork and exec only async-signal-safe
        // calls are made, on data prepared before the fork.
        unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
                return Err(DriverError::failed(format!(
                    "pipe: {}",
                    std::io::Error::last_os_error()
                )));
            }
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
                    libc::_exit(126);
                }
                libc::execve(exe.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
                libc::_exit(127);
            }
            libc::close(fds[1]);
            let mut buf = [0u8; 4];
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            libc::close(fds[0]);
            let mut status = 0;
            libc::waitpid(child, &mut status, 0);
            if n != 4 {
                return Err(DriverError::failed(
                    "cannot start the workload (fork failed)",
                ));
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

/// Stops the tree rooted at `pid`: SIGTERM, then SIGKILL after `grace`.
/// Waits until the root is gone (or a zombie).
pub fn stop(pid: i32, grace: Duration) -> DriverResult<()> {
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z") || s.contains(") X"))
            .unwrap_or(true)
    };
    // SAFETY: kill with a plain signal number.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if gone() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if gone() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(DriverError::failed(format!("process {pid} did not stop")))
}
