//! Running real migrations from tests: a destination service (restartable
//! on its address and journal), a test workload in its own PID namespace and
//! the copies of it that exist or run, the `phaul migrate` command (in the
//! foreground or the background), `phaul recover`, each side's CRIU
//! workers, and the bookkeeping (subreaper, reaping, cleanup) that keeps
//! runs independent.

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

/// Runs `ip ARGS...` (iproute2), which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
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
    /// Where it keeps CRIU's logs, for versions that keep them apart from
    /// the work directories (`PHAUL_LOG_DIR`; ignored by versions without).
    pub logs: tempfile::TempDir,
    /// How it was started, so that [`Serve::restart`] can do it again.
    wrapper: Vec<String>,
    extra: Vec<String>,
    log: Option<PathBuf>,
}

impl Serve {
    /// Starts `phaul serve` on a free loopback port with the given plugins
    /// (`(lib name, file name)`) and extra arguments.
    pub fn start(plugins: &[(&str, &str)], extra: &[&str]) -> Serve {
        Self::start_wrapped(&[], plugins, extra)
    }

    /// Like [`Serve::start`], run under a wrapper command (e.g. `unshare`).
    pub fn start_wrapped(wrapper: &[&str], plugins: &[(&str, &str)], extra: &[&str]) -> Serve {
        Self::start_on(wrapper, plugins, "127.0.0.1:0", extra, None)
    }

    /// Like [`Serve::start`], in a mount namespace of its own (`unshare -m
    /// --propagation private`) where the shell commands `setup` (e.g. `mount
    /// --bind A B`) run first: a second "host" for paths.
    pub fn start_with_own_mounts(setup: &str, plugins: &[(&str, &str)], extra: &[&str]) -> Serve {
        let script = format!("{setup} && exec \"$0\" \"$@\"");
        Self::start_wrapped(
            &[
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
            plugins,
            extra,
        )
    }

    /// Starts `phaul serve` on `listen` (a loopback `ADDR:PORT`; port 0
    /// picks a free one) under `wrapper` (may be empty), with its standard
    /// error appended to `log` (inherited when `None`).
    pub fn start_on(
        wrapper: &[&str],
        plugins: &[(&str, &str)],
        listen: &str,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Serve {
        Self::start_in(wrapper, plugin_dir(plugins), listen, extra, log)
    }

    /// Like [`Serve::start_on`], with a plugin directory the caller made
    /// (e.g. holding a driver built outside the workspace, see
    /// [`crate::plugin_dir_of`]).
    pub fn start_in(
        wrapper: &[&str],
        plugins: tempfile::TempDir,
        listen: &str,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Serve {
        let work = shm_dir("dst");
        let journal = tempfile::tempdir().expect("journal dir");
        let logs = tempfile::Builder::new()
            .prefix("phaul-test-dst-logs-")
            .tempdir()
            .expect("log directory");
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let log = log.map(Path::to_path_buf);
        let dirs = [plugins.path(), work.path(), journal.path(), logs.path()];
        let (child, addr) = spawn_serve(&wrapper, dirs, listen, &extra, &log);
        Serve {
            child,
            addr,
            plugins,
            work,
            journal,
            logs,
            wrapper,
            extra,
            log,
        }
    }

    /// Starts `phaul serve --journal-dir <journal>` (a journal the caller
    /// keeps, e.g. to run `phaul recover` on it) on a free loopback port
    /// (kept by [`Serve::restart`]), logging to `log`.
    pub fn start_journaled(
        plugins: &[(&str, &str)],
        journal: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Serve {
        let journal = journal.to_str().expect("journal path is UTF-8");
        let mut args = vec!["--journal-dir", journal];
        args.extend_from_slice(extra);
        Self::start_on(&[], plugins, "127.0.0.1:0", &args, log)
    }

    /// Kills the service if it still runs and starts it again with the
    /// same address, plugins, work directory and arguments (its journal
    /// directory too). std's listener sets SO_REUSEADDR, so the port is
    /// free again at once.
    pub fn restart(&mut self) {
        self.kill();
        let dirs = [
            self.plugins.path(),
            self.work.path(),
            self.journal.path(),
            self.logs.path(),
        ];
        let (child, addr) = spawn_serve(&self.wrapper, dirs, &self.addr, &self.extra, &self.log);
        assert_eq!(addr, self.addr, "the service came back on its address");
        self.child = child;
    }

    /// The service's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the service process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the service (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CRIU processes still working in this service's work (or log)
    /// directories.
    pub fn criu_processes(&self) -> Vec<i32> {
        let mut p = processes_with_cwd_under(self.work.path());
        p.extend(processes_with_cwd_under(self.logs.path()));
        p
    }

    /// This service's CRIU workers (`criu swrk`), by worker name.
    pub fn criu_workers(&self) -> Vec<CriuWorker> {
        side_workers(self.pid(), &[self.work.path(), self.logs.path()])
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `phaul serve` with its plugin, work, journal and log directories
/// (work and journal unless `extra` names others) and reads the address it
/// reports.
fn spawn_serve(
    wrapper: &[String],
    [plugins, work, journal, logs]: [&Path; 4],
    listen: &str,
    extra: &[String],
    log: &Option<PathBuf>,
) -> (Child, String) {
    let phaul = bin("phaul");
    let mut cmd = if let Some((first, rest)) = wrapper.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(&phaul);
        c
    } else {
        Command::new(&phaul)
    };
    cmd.arg("--plugin-dir")
        .arg(plugins)
        .args(["serve", "--listen", listen]);
    if !extra.iter().any(|a| a == "--work-dir") {
        cmd.arg("--work-dir").arg(work);
    }
    if !extra.iter().any(|a| a == "--journal-dir") {
        cmd.arg("--journal-dir").arg(journal);
    }
    if !crate::pki::chooses_transport(extra) {
        cmd.arg("--tls-dir").arg(&crate::pki::pki().dst);
    }
    if log.is_some() {
        cmd.env("NO_COLOR", "1");
    }
    cmd.env("PHAUL_LOG_DIR", logs)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(log));
    let mut child = cmd.spawn().expect("start phaul serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read serve's address");
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = child.kill();
        let status = child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        let said = log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| {
                let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
                lines[lines.len().saturating_sub(8)..].join("\n")
            })
            .unwrap_or_default();
        panic!(
            "phaul serve --listen {listen} did not start (first line {line:?}, {status}){}{said}",
            if said.is_empty() {
                ""
            } else {
                "; its log ends:\n"
            }
        );
    };
    (child, addr.to_string())
}

/// Standard error for a child: appended to `log`, or inherited. (Children
/// logging to a file are also given `NO_COLOR`, so the logs are plain text.)
fn log_file(log: &Option<PathBuf>) -> Stdio {
    match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(Stdio::from)
            .unwrap_or_else(|e| panic!("open log {}: {e}", p.display())),
        None => Stdio::inherit(),
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

/// One `criu swrk` worker of a side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuWorker {
    /// Its pid.
    pub pid: i32,
    /// phaul's name for it (`source`, `probe`, `pages`, `restore`, ...),
    /// from the `criu-<name>.stderr` file its standard error goes to; empty
    /// when that cannot be read.
    pub name: String,
}

/// The `criu swrk` workers whose working directory is under `root` (a
/// side's `--work-dir`). CRIU rewrites its command line while it works
/// (`criu: dump --rpc -t N`), so workers are recognised by their command
/// name. Tasks CRIU forked to restore a workload still look like CRIU until
/// they become the workload, and keep looking like it if their CRIU dies
/// under them; they are not workers: their parent is CRIU, or they live in
/// the workload's own PID namespace.
pub fn criu_workers(root: &Path) -> Vec<CriuWorker> {
    let is_criu = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "criu")
    };
    let pid_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let ours = pid_ns("self");
    processes_with_cwd_under(root)
        .into_iter()
        .filter(|&pid| is_criu(pid))
        .filter(|&pid| !parent(pid).is_some_and(is_criu))
        .filter(|&pid| pid_ns(&pid.to_string()) == ours)
        .map(|pid| CriuWorker {
            pid,
            name: worker_name(pid),
        })
        .collect()
}

/// Whether one of `workers` is in the middle of a restore: it runs a
/// restore request (CRIU calls itself `criu: restore ...` then) and has
/// forked the tasks of the copy.
pub fn restore_underway(workers: &[CriuWorker]) -> bool {
    workers.iter().any(|w| {
        std::fs::read(format!("/proc/{}/cmdline", w.pid))
            .is_ok_and(|c| c.starts_with(b"criu: restore"))
            && !phaul_core::proc::tree(w.pid).iter().all(|&p| p == w.pid)
    })
}

/// phaul's name for a CRIU worker, from the `criu-<name>.stderr` file its
/// standard error goes to; else what it is doing (`restore`, `pages`,
/// `dump`, from the title CRIU gives itself); empty when neither tells.
fn worker_name(pid: i32) -> String {
    let from_stderr = std::fs::read_link(format!("/proc/{pid}/fd/2"))
        .ok()
        .and_then(|p| {
            let f = p.file_name()?.to_str()?.to_string();
            Some(
                f.strip_prefix("criu-")?
                    .strip_suffix(".stderr")?
                    .to_string(),
            )
        });
    from_stderr.unwrap_or_else(|| {
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        [
            (&b"criu: restore"[..], "restore"),
            (b"criu: page-server", "pages"),
            (b"criu: dump", "dump"),
        ]
        .iter()
        .find(|(title, _)| c.starts_with(title))
        .map_or(String::new(), |(_, n)| n.to_string())
    })
}

/// The CRIU workers of one side: CRIU processes whose parent is that side's
/// phaul (`phaul_pid`), wherever their working directory is, plus workers
/// working under `roots` (e.g. ones whose phaul died).
pub fn side_workers(phaul_pid: i32, roots: &[&Path]) -> Vec<CriuWorker> {
    let ours = std::fs::read_link("/proc/self/ns/pid").ok();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| parent(pid) == Some(phaul_pid) && exists(pid))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "criu")
        })
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() == ours)
        .collect();
    for root in roots {
        pids.extend(criu_workers(root).iter().map(|w| w.pid));
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| CriuWorker {
            pid,
            name: worker_name(pid),
        })
        .collect()
}

/// Every process still working under `root` (CRIU workers and the tasks
/// they are restoring), as `pid (command name)`, for messages.
pub fn describe_processes_under(root: &Path) -> Vec<String> {
    processes_with_cwd_under(root)
        .into_iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} ({})", comm.trim())
        })
        .collect()
}

/// A process's state letter (`R`, `S`, `T`, `t`, `Z`, ...) from
/// /proc/PID/stat; `None` when it does not exist.
pub fn task_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

/// A process's parent pid.
pub fn parent(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether a process exists and is not a zombie (running, stopped or
/// held).
pub fn exists(pid: i32) -> bool {
    task_state(pid).is_some_and(|s| !matches!(s, 'Z' | 'X' | 'x'))
}

/// How much a process did so far: CPU time (clock ticks) plus context
/// switches, from /proc. A task that runs its code moves it; a task held
/// inside CRIU's restorer (waiting for CRIU to let it go) does not.
fn activity(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted from the state (3).
    let cpu: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let switches: u64 = status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    // A CPU tick is 10 ms of work: weigh it like the switches of 10 ticks
    // of the workload.
    Some(cpu * 10 + switches)
}

/// After a successful migration: no CRIU process is left on the
/// destination and its work directory is empty.
pub fn assert_destination_clean(serve: &Serve) {
    assert!(
        wait_for(Duration::from_secs(5), || serve.criu_processes().is_empty()),
        "CRIU processes left on the destination: {:?}",
        serve.criu_processes()
    );
    assert!(
        std::fs::read_dir(serve.work.path())
            .unwrap()
            .next()
            .is_none(),
        "destination work dir cleaned"
    );
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
        Self::spawn_configured(state, spawn_flags, args, |_| {})
    }

    /// Like [`Workload::spawn_in`], `configure` adjusting the
    /// `phaul-workload spawn` command first (e.g. a `pre_exec` giving it
    /// another user, which the workload inherits).
    pub fn spawn_configured(
        state: &Path,
        spawn_flags: &[&str],
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Workload {
        let mut cmd = Command::new(bin("phaul-workload"));
        cmd.arg("spawn")
            .args(spawn_flags)
            .args(["--", "--state-dir"])
            .arg(state)
            .args(args);
        configure(&mut cmd);
        let out = cmd.output().expect("run phaul-workload spawn");
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

    /// A workload something else started (e.g. inside a container) as
    /// `pid`, with its status in `status_dir` as this host sees it.
    pub fn attach(pid: i32, status_dir: &Path) -> Workload {
        Workload {
            pid,
            state: status_dir.to_path_buf(),
            status_dir: status_dir.to_path_buf(),
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
        self.try_report().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Workload::report`], an error instead of a panic.
    pub fn try_report(&self) -> Result<Value, String> {
        let out = Command::new(bin("phaul-workload"))
            .args(["report", "--state-dir"])
            .arg(&self.status_dir)
            .args(["--pid", &self.pid.to_string(), "--timeout-ms", "60000"])
            .output()
            .map_err(|e| format!("run phaul-workload report: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "report from workload {} failed: {}",
                self.pid,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("report is not JSON: {e}"))
    }

    /// Checks a report: every page verified and intact.
    pub fn assert_intact(&self, r: &Value) {
        assert_eq!(r["pages_bad"], 0, "memory corrupted: {r}");
        assert_eq!(
            r["pages_verified"], r["pages"],
            "not every page verified: {r}"
        );
    }

    /// Like [`Workload::assert_intact`], an error instead of a panic.
    pub fn check_intact(r: &Value) -> Result<(), String> {
        if r["pages_bad"] != 0 {
            return Err(format!("memory corrupted: {r}"));
        }
        if r["pages_verified"] != r["pages"] || r["pages"].as_u64().unwrap_or(0) == 0 {
            return Err(format!("not every page verified: {r}"));
        }
        Ok(())
    }

    /// Copies of this workload other than the one at [`Workload::pid`]
    /// (and its own children): restored ones, normally.
    pub fn restored_copies(&self) -> Vec<i32> {
        let own = phaul_core::proc::tree(self.pid);
        workload_copies(&self.state)
            .into_iter()
            .filter(|p| !own.contains(p))
            .collect()
    }

    /// Remembers `pid` as a copy of this workload, to be killed and reaped
    /// with it.
    pub fn seen(&mut self, pid: i32) {
        if !self.pids_seen.contains(&pid) {
            self.pids_seen.push(pid);
        }
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

/// Root pids of every copy of the workload whose state directory is
/// `state`: processes running `phaul-workload run` on it whose parent does
/// not (a copy's own children, e.g. its `--extras` child, are part of it).
/// Zombies are not copies.
pub fn workload_copies(state: &Path) -> Vec<i32> {
    let needle = state.as_os_str().as_encoded_bytes();
    let is_workload = |p: i32| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"phaul-workload"))
                && args.get(1) == Some(&b"run".as_slice())
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--state-dir" && w[1] == needle)
        })
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&p| exists(p) && is_workload(p))
        .filter(|&p| !parent(p).is_some_and(|pp| exists(pp) && is_workload(pp)))
        .collect()
}

/// How long [`Copies::observe`] watches each copy for activity.
pub const OBSERVE_WINDOW: Duration = Duration::from_millis(50);

/// Activity a copy must show within [`OBSERVE_WINDOW`] to count as
/// running. The test workload ticks about once a millisecond (a context
/// switch each), ~50 in the window even on a busy machine; a copy held in
/// CRIU's restorer is woken a few times at most, once per restore stage.
const RUNNING_ACTIVITY: u64 = 10;

/// What one look at a workload's copies saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copies {
    /// Every copy: root pid, state letter, and whether it ran its own code
    /// while watched.
    pub existing: Vec<Copy>,
}

/// One copy of a workload, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    /// The root pid.
    pub pid: i32,
    /// Its state letter at the end of the look.
    pub state: char,
    /// It ran: neither stopped (`T`), nor held by a tracer (`t`, e.g.
    /// CRIU's frozen source), nor held inside CRIU's restorer (alive in
    /// `S` but doing nothing, e.g. a restored copy waiting for the commit,
    /// or one whose CRIU died under it).
    pub running: bool,
}

impl Copies {
    /// Looks at the copies of the workload whose state directory is
    /// `state`, watching each for [`OBSERVE_WINDOW`]: `existing` lists the
    /// copies there at the end of the window; one that appeared during it
    /// counts as not running (the next look sees it for the whole window).
    pub fn observe(state: &Path) -> Copies {
        let before: Vec<(i32, Option<u64>)> = workload_copies(state)
            .into_iter()
            .map(|p| (p, activity(p)))
            .collect();
        std::thread::sleep(OBSERVE_WINDOW);
        let existing = workload_copies(state)
            .into_iter()
            .filter_map(|pid| {
                let state = task_state(pid)?;
                let a0 = before.iter().find(|(p, _)| *p == pid).and_then(|(_, a)| *a);
                let moved = match (a0, activity(pid)) {
                    (Some(a0), Some(a1)) => a1.saturating_sub(a0) >= RUNNING_ACTIVITY,
                    _ => false,
                };
                Some(Copy {
                    pid,
                    state,
                    running: moved && !matches!(state, 'T' | 't'),
                })
            })
            .collect();
        Copies { existing }
    }

    /// The copies that ran.
    pub fn running(&self) -> Vec<i32> {
        self.existing
            .iter()
            .filter(|c| c.running)
            .map(|c| c.pid)
            .collect()
    }

    /// Every copy's root pid.
    pub fn pids(&self) -> Vec<i32> {
        self.existing.iter().map(|c| c.pid).collect()
    }
}

impl std::fmt::Display for Copies {
    /// `pid:state` for each copy, with `+` when it ran (`12:S+ 34:t`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.existing.is_empty() {
            return f.write_str("none");
        }
        for (i, c) in self.existing.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(
                f,
                "{}:{}{}",
                c.pid,
                c.state,
                if c.running { "+" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// Reaps zombies that were reparented to this process (the subreaper):
/// CRIU workers and workload copies whose parents died. Other children
/// (the services and commands a test started) are left to their owners.
pub fn reap_strays() {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
    {
        if task_state(pid) == Some('Z') && parent(pid) == Some(me) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if matches!(comm.trim(), "criu" | "phaul-workload") {
                reap(pid);
            }
        }
    }
}

/// Runs `phaul migrate pid <pid> --to <addr> --json <extra...>` with the
/// given plugins and returns its output.
pub fn migrate(
    plugins: &Path,
    htype: &str,
    pid: impl std::fmt::Display,
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
    source_transport(&mut cmd, extra);
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

/// The source's TLS files, unless `extra` chooses how to connect.
pub fn source_transport(cmd: &mut Command, extra: &[&str]) {
    if !crate::pki::chooses_transport(extra) {
        cmd.arg("--tls-dir").arg(&crate::pki::pki().src);
    }
}

/// The directory holding `lib` plugins for the source side.
pub fn source_plugins(files: &[(&str, &str)]) -> tempfile::TempDir {
    plugin_dir(files)
}

/// A `phaul migrate --json` running in the background, with its own work
/// directory and journal directory; standard output goes to a file (the
/// JSON summary), standard error to `log`.
pub struct Migration {
    child: Child,
    /// Its work-directory root.
    pub work: tempfile::TempDir,
    /// Where it keeps CRIU's logs (`PHAUL_LOG_DIR`, for versions that keep
    /// them apart from the work directories).
    pub logs: tempfile::TempDir,
    /// Its journal directory.
    pub journal: PathBuf,
    out: tempfile::NamedTempFile,
    status: Option<std::process::ExitStatus>,
}

impl Migration {
    /// Starts `phaul --plugin-dir <plugins> migrate <htype> <pid> --to
    /// <addr> --json --work-dir <fresh> --journal-dir <journal> <extra>`.
    pub fn start(
        plugins: &Path,
        htype: &str,
        pid: impl std::fmt::Display,
        addr: &str,
        journal: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Migration {
        let work = shm_dir("src");
        let logs = tempfile::Builder::new()
            .prefix("phaul-test-src-logs-")
            .tempdir()
            .expect("log directory");
        let out = tempfile::NamedTempFile::new().expect("stdout file");
        let mut cmd = Command::new(bin("phaul"));
        cmd.env("PHAUL_LOG_DIR", logs.path());
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
            .arg(work.path())
            .arg("--journal-dir")
            .arg(journal);
        source_transport(&mut cmd, extra);
        if log.is_some() {
            cmd.env("NO_COLOR", "1");
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.reopen().expect("reopen stdout file"))
            .stderr(log_file(&log.map(Path::to_path_buf)))
            .spawn()
            .expect("start phaul migrate");
        Migration {
            child,
            work,
            logs,
            journal: journal.to_path_buf(),
            out,
            status: None,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its exit status, if it exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.try_wait().is_some());
        self.try_wait()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// The last line of its standard output as JSON (the summary).
    pub fn json(&self) -> Option<Value> {
        std::fs::read_to_string(self.out.path())
            .ok()?
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
    }

    /// Its CRIU workers (`criu swrk`), by worker name.
    pub fn criu_workers(&self) -> Vec<CriuWorker> {
        side_workers(self.pid(), &[self.work.path(), self.logs.path()])
    }

    /// CRIU processes still working in its work (or log) directories.
    pub fn criu_processes(&self) -> Vec<i32> {
        let mut p = processes_with_cwd_under(self.work.path());
        p.extend(processes_with_cwd_under(self.logs.path()));
        p
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What `phaul recover` did.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Its exit code (`None`: killed by a signal, or by us for taking too
    /// long).
    pub code: Option<i32>,
    /// Its `--json` report: `{"pending": N, "sessions": [{"session",
    /// "side", "action", "message"}]}`.
    pub json: Option<Value>,
    /// Its standard error.
    pub stderr: String,
}

impl Recovery {
    /// One line: exit code, pending count, each session's action.
    pub fn summary(&self) -> String {
        let code = self
            .code
            .map_or("killed".to_string(), |c| format!("exit {c}"));
        let Some(j) = &self.json else {
            return format!("{code}, no JSON");
        };
        let sessions: Vec<String> = j["sessions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        format!(
                            "{}:{}",
                            s["side"].as_str().unwrap_or("?"),
                            s["action"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "{code}, pending {}, [{}]",
            j["pending"],
            sessions.join(", ")
        )
    }
}

/// Runs `phaul --plugin-dir <plugins> recover --journal-dir <journal>
/// --json --timeout <timeout_s>`, killed if it overruns its own timeout by
/// 30 s.
pub fn recover(plugins: &Path, journal: &Path, timeout_s: u64) -> Recovery {
    recover_with(plugins, journal, timeout_s, &[])
}

/// [`recover`] with extra arguments (an operator's decision, such as
/// `--resume-source SESSION`).
pub fn recover_with(plugins: &Path, journal: &Path, timeout_s: u64, extra: &[&str]) -> Recovery {
    let out = tempfile::NamedTempFile::new().expect("stdout file");
    let err = tempfile::NamedTempFile::new().expect("stderr file");
    let mut child = Command::new(bin("phaul"))
        .arg("--plugin-dir")
        .arg(plugins)
        .args(["recover", "--journal-dir"])
        .arg(journal)
        .arg("--tls-dir")
        .arg(&crate::pki::pki().src)
        .args(["--json", "--timeout", &timeout_s.to_string()])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.reopen().expect("reopen stdout file"))
        .stderr(err.reopen().expect("reopen stderr file"))
        .spawn()
        .expect("run phaul recover");
    let limit = Duration::from_secs(timeout_s + 30);
    let mut status = None;
    wait_for(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = std::fs::read_to_string(out.path()).unwrap_or_default();
    // One JSON object, on one line or pretty-printed.
    let json = serde_json::from_str::<Value>(stdout.trim())
        .ok()
        .or_else(|| {
            stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        });
    Recovery {
        code: status.and_then(|s| s.code()),
        json,
        stderr: std::fs::read_to_string(err.path()).unwrap_or_default(),
    }
}

/// Migrates `w` (htype pid) to `serve` with `extra` arguments and requires
/// a refusal by the destination's pre-flight whose message says each of
/// `expect`, that left the workload as it was and never reached the
/// freeze (the source's journal, written before the freeze, stays empty).
pub fn assert_refused_in_preflight(w: &Workload, serve: &Serve, extra: &[&str], expect: &[&str]) {
    let before = w.report();
    let journal = tempfile::tempdir().unwrap();
    let j = journal.path().to_str().unwrap();
    let mut args = vec!["--journal-dir", j];
    args.extend_from_slice(extra);
    let src = plugin_dir(&[("phaul_pid", "libphaul_pid.so")]);
    let (out, json) = migrate(src.path(), "pid", w.pid, &serve.addr, &args);
    assert_eq!(out.status.code(), Some(3), "refused in pre-flight");
    let json = json.expect("--json failure");
    assert_eq!(json["error"], "refused");
    assert_eq!(json["phase"], "preflight");
    assert_eq!(json["side"], "destination");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for e in expect {
        assert!(stderr.contains(e), "the message says {e:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read_dir(journal.path()).unwrap().count(),
        0,
        "nothing was frozen"
    );
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(wait_for(Duration::from_secs(5), || serve
        .criu_processes()
        .is_empty()));
}

/// `phaul recover`, run again (as an operator would, told so) while the
/// only sessions left pending are ones a phaul that still runs is busy
/// finishing (`left-alone`), for up to 20 s.
pub fn recover_settled(plugins: &Path, journal: &Path, timeout_s: u64) -> Recovery {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = recover(plugins, journal, timeout_s);
        let busy = r.json.as_ref().is_some_and(|j| {
            j["pending"].as_u64().unwrap_or(0) > 0
                && j["sessions"].as_array().is_some_and(|s| {
                    s.iter()
                        .filter(|a| a["pending"] == true)
                        .all(|a| a["action"] == "left-alone")
                })
        });
        if !busy || std::time::Instant::now() >= end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `phaul --plugin-dir DIR htypes --json` (with `PATH=path` when given),
/// which must succeed: its output.
pub fn htypes_json(dir: &Path, path: Option<&str>) -> Value {
    let mut cmd = Command::new(bin("phaul"));
    cmd.arg("--plugin-dir").arg(dir).args(["htypes", "--json"]);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().expect("run phaul htypes");
    assert!(
        out.status.success(),
        "phaul htypes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("phaul htypes --json prints JSON")
}

/// A `phaul-workload tcp-client` talking to `server` (a `run
/// --tcp-listen` workload) for `ms` milliseconds, reporting into `out`.
pub fn tcp_client(server: &str, ms: u64, out: &Path) -> Child {
    Command::new(bin("phaul-workload"))
        .args([
            "tcp-client",
            "--connect",
            server,
            "--duration-ms",
            &ms.to_string(),
            "--out",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .spawn()
        .expect("start phaul-workload tcp-client")
}

/// How many userfaultfds `pid` holds.
pub fn userfaultfds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))
                })
                .count()
        })
        .unwrap_or(0)
}
