//! Running real migrations from tests: a destination service, a test
//! workload in its own PID namespace, the `phaul migrate` command, and the
//! bookkeeping (subreaper, reaping, cleanup) that keeps runs independent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, plugin_dir};

/// Makes this test process the subreaper of everything it starts, so that
/// detached workloads (and restored ones) are reparented to it and can be
/// reaped, instead of lingering as zombies under PID 1 — a same-machine
/// restore needs their PIDs free. Also skips the test cleanly when not root.
pub fn setup() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: CRIU tests need root");
        return false;
    }
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    true
}

/// Reaps a process that is (or became) our child, if it has exited.
pub fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
}

/// Whether a process runs (exists and is not a zombie).
pub fn alive(pid: i32) -> bool {
    phaul_core::proc::alive(pid)
}

/// Waits until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A throw-away directory on tmpfs (phaul's default work directories are
/// there too).
pub fn shm_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("phaul-test-{tag}-"))
        .tempdir_in("/dev/shm")
        .expect("tempdir in /dev/shm")
}

/// A running `phaul serve`.
pub struct Serve {
    child: Child,
    /// The address it listens on.
    pub addr: String,
    /// Its plugin directory.
    pub plugins: tempfile::TempDir,
    /// Its work-directory root (unless the extra arguments name another).
    pub work: tempfile::TempDir,
    /// Its journal directory (unless the extra arguments name another).
    pub journal: tempfile::TempDir,
}

impl Serve {
    /// Starts `phaul serve` on a free loopback port with the given plugins
    /// (`(lib name, file name)`) and extra arguments.
    pub fn start(plugins: &[(&str, &str)], extra: &[&str]) -> Serve {
        Self::start_wrapped(&[], plugins, extra)
    }

    /// Like [`Serve::start`], run under a wrapper command (e.g. `unshare`).
    pub fn start_wrapped(wrapper: &[&str], plugins: &[(&str, &str)], extra: &[&str]) -> Serve {
        let plugins = plugin_dir(plugins);
        let work = shm_dir("dst");
        let phaul = bin("phaul");
        let mut cmd = if let Some((first, rest)) = wrapper.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg(&phaul);
            c
        } else {
            Command::new(&phaul)
        };
        cmd.arg("--plugin-dir")
            .arg(plugins.path())
            .args(["serve", "--listen", "127.0.0.1:0"]);
        if !extra.contains(&"--work-dir") {
            cmd.arg("--work-dir").arg(work.path());
        }
        let journal = tempfile::tempdir().expect("journal dir");
        if !extra.contains(&"--journal-dir") {
            cmd.arg("--journal-dir").arg(journal.path());
        }
        cmd.args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start phaul serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read serve's address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from phaul serve: {line:?}"))
            .to_string();
        Serve {
            child,
            addr,
            plugins,
            work,
            journal,
        }
    }

    /// The service's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Kills the service (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CRIU processes still working in this service's work directories.
    pub fn criu_processes(&self) -> Vec<i32> {
        processes_with_cwd_under(self.work.path())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pids of processes whose working directory is under `root`.
pub fn processes_with_cwd_under(root: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(root))
                && alive(*pid)
        })
        .collect()
}

/// A test workload (`phaul-workload run`) in its own PID namespace.
pub struct Workload {
    /// The host pid of its root (changes when it migrates).
    pub pid: i32,
    /// Its state directory (status.json) as the workload names it.
    pub state: PathBuf,
    /// Where this test reads the status from (the state directory, or the
    /// destination's copy of it after a migration with `--sync`).
    pub status_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pids_seen: Vec<i32>,
}

impl Workload {
    /// Starts one with `phaul-workload spawn --pidns -- run <args>`.
    pub fn spawn(args: &[&str]) -> Workload {
        Self::spawn_with(&["--pidns"], args)
    }

    /// Starts one with `phaul-workload spawn <spawn_flags> -- run <args>`.
    pub fn spawn_with(spawn_flags: &[&str], args: &[&str]) -> Workload {
        let tmp = shm_dir("wl");
        let mut w = Self::spawn_in(tmp.path(), spawn_flags, args);
        w._tmp = Some(tmp);
        w
    }

    /// Starts one whose state directory is `state` (e.g. inside a synced
    /// directory).
    pub fn spawn_in(state: &Path, spawn_flags: &[&str], args: &[&str]) -> Workload {
        let out = Command::new(bin("phaul-workload"))
            .arg("spawn")
            .args(spawn_flags)
            .args(["--", "--state-dir"])
            .arg(state)
            .args(args)
            .output()
            .expect("run phaul-workload spawn");
        assert!(
            out.status.success(),
            "phaul-workload spawn failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid: i32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("spawn prints the workload's pid");
        Workload {
            pid,
            state: state.to_path_buf(),
            status_dir: state.to_path_buf(),
            _tmp: None,
            pids_seen: vec![pid],
        }
    }

    /// The workload now runs as `pid` (after a migration).
    pub fn moved_to(&mut self, pid: i32) {
        self.pid = pid;
        self.pids_seen.push(pid);
    }

    /// Asks for a fresh report (every page verified) and returns it.
    pub fn report(&self) -> Value {
        let out = Command::new(bin("phaul-workload"))
            .args(["report", "--state-dir"])
            .arg(&self.status_dir)
            .args(["--pid", &self.pid.to_string(), "--timeout-ms", "60000"])
            .output()
            .expect("run phaul-workload report");
        assert!(
            out.status.success(),
            "report from workload {} failed: {}",
            self.pid,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report is JSON")
    }

    /// Checks a report: every page verified and intact.
    pub fn assert_intact(&self, r: &Value) {
        assert_eq!(r["pages_bad"], 0, "memory corrupted: {r}");
        assert_eq!(
            r["pages_verified"], r["pages"],
            "not every page verified: {r}"
        );
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for &pid in &self.pids_seen {
            phaul_core::proc::signal_tree(pid, nix::sys::signal::Signal::SIGKILL);
        }
        for &pid in &self.pids_seen {
            wait_for(Duration::from_secs(5), || {
                reap(pid);
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
    }
}

/// Runs `phaul migrate pid <pid> --to <addr> --json <extra...>` with the
/// given plugins and returns its output.
pub fn migrate(
    plugins: &Path,
    htype: &str,
    pid: i32,
    addr: &str,
    extra: &[&str],
) -> (Output, Option<Value>) {
    let work = shm_dir("src");
    let journal = tempfile::tempdir().expect("journal dir");
    let mut cmd = Command::new(bin("phaul"));
    cmd.arg("--plugin-dir")
        .arg(plugins)
        .args([
            "migrate",
            htype,
            &pid.to_string(),
            "--to",
            addr,
            "--json",
            "--work-dir",
        ])
        .arg(work.path());
    if !extra.contains(&"--journal-dir") {
        cmd.arg("--journal-dir").arg(journal.path());
    }
    let out = cmd.args(extra).output().expect("run phaul migrate");
    let json = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    eprintln!(
        "phaul migrate stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, json)
}

/// The directory holding `lib` plugins for the source side.
pub fn source_plugins(files: &[(&str, &str)]) -> tempfile::TempDir {
    plugin_dir(files)
}
