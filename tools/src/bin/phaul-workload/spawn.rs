//! `phaul-workload spawn`: start `run` fully detached (double fork, setsid,
//! optionally as PID 1 of a new PID namespace) and wait until it is ready.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use nix::fcntl::{open, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{dup2, execv, fork, pipe2, setsid, ForkResult, Pid};

use crate::{status, sys, RunArgs};

/// How long to wait for the ready status.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// File in the state directory receiving the workload's stderr.
const STDERR_FILE: &str = "workload.stderr";

/// Parser for the options after `spawn ... --`, to validate them and find
/// the state directory.
#[derive(Debug, Parser)]
#[command(name = "phaul-workload run", no_binary_name = true)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

/// Everything the grandchild needs, prepared before forking.
struct ExecPlan {
    exe: CString,
    argv: Vec<CString>,
    dev_null: CString,
    stderr_path: CString,
}

/// Starts the detached workload, prints its host PID, waits for readiness.
pub fn spawn(pidns: bool, netns: bool, run_args: &[String]) -> Result<()> {
    let parsed = RunOnly::try_parse_from(run_args)
        .map_err(|e| anyhow!("invalid run options after `--`:\n{e}"))?;
    let state_dir = parsed.args.state_dir;
    fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    // A stale status would look like readiness.
    let status_path = status::status_path(&state_dir);
    match fs::remove_file(&status_path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", status_path.display()))
        }
        _ => {}
    }
    let plan = exec_plan(run_args, &state_dir.join(STDERR_FILE))?;

    let (rd, wr) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: this process is single-threaded.
    let intermediate = match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(rd);
            intermediate_main(pidns, netns, File::from(wr), &plan)
        }
        ForkResult::Parent { child } => child,
    };
    drop(wr);
    // EOF comes once the intermediate child has exited and the grandchild
    // has exec'ed (the pipe is close-on-exec).
    let mut msg = String::new();
    let read = File::from(rd).read_to_string(&mut msg);
    let _ = waitpid(intermediate, None);
    read.context("reading the workload PID from the intermediate child")?;

    let mut host_pid = None;
    for line in msg.lines() {
        if let Some(err) = line.strip_prefix("err ") {
            bail!("starting the workload: {err}");
        }
        if let Some(pid) = line.strip_prefix("ok ") {
            host_pid = pid.trim().parse::<i32>().ok();
        }
    }
    let pid = host_pid.ok_or_else(|| anyhow!("no workload PID received (got {msg:?})"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{pid}").and_then(|()| out.flush())?;
    wait_ready(&state_dir, pid)
}

/// Builds the exec arguments: `/proc/self/exe run <run_args...>`.
fn exec_plan(run_args: &[String], stderr_path: &Path) -> Result<ExecPlan> {
    let cstr = |s: &str| CString::new(s).map_err(|_| anyhow!("argument contains a NUL: {s:?}"));
    let mut argv = vec![cstr("phaul-workload")?, cstr("run")?];
    for a in run_args {
        argv.push(cstr(a)?);
    }
    Ok(ExecPlan {
        exe: cstr("/proc/self/exe")?,
        argv,
        dev_null: cstr("/dev/null")?,
        stderr_path: CString::new(stderr_path.as_os_str().as_encoded_bytes())
            .map_err(|_| anyhow!("state dir path contains a NUL"))?,
    })
}

/// The intermediate child: optionally enters a new PID namespace (for its
/// children), forks the workload, reports its PID and exits.
fn intermediate_main(pidns: bool, netns: bool, mut pipe: File, plan: &ExecPlan) -> ! {
    let mut flags = CloneFlags::empty();
    if pidns {
        flags |= CloneFlags::CLONE_NEWPID;
    }
    if netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if !flags.is_empty() {
        if let Err(e) = unshare(flags) {
            let _ = writeln!(pipe, "err unshare({flags:?}): {e} (root needed)");
            exit_now(1);
        }
    }
    // SAFETY: single-threaded.
    match unsafe { fork() } {
        Err(e) => {
            let _ = writeln!(pipe, "err fork: {e}");
            exit_now(1)
        }
        Ok(ForkResult::Child) => grandchild_main(pipe, plan),
        Ok(ForkResult::Parent { child }) => {
            let _ = writeln!(pipe, "ok {child}");
            exit_now(0)
        }
    }
}

/// The workload-to-be: new session, stdio redirected, every other inherited
/// descriptor closed on exec, then exec `run`.
fn grandchild_main(mut pipe: File, plan: &ExecPlan) -> ! {
    let result = (|| -> Result<()> {
        setsid().context("setsid")?;
        let null = open(plan.dev_null.as_c_str(), OFlag::O_RDWR, Mode::empty())
            .context("opening /dev/null")?;
        let err = open(
            plan.stderr_path.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap_or(null);
        dup2(null, 0).context("dup2 stdin")?;
        dup2(null, 1).context("dup2 stdout")?;
        dup2(err, 2).context("dup2 stderr")?;
        // SAFETY: only marks descriptors close-on-exec.
        unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
        execv(&plan.exe, &plan.argv).context("exec /proc/self/exe")?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = writeln!(pipe, "err {e:#}");
    }
    exit_now(127)
}

/// `_exit`: leaves a forked child without running the parent's cleanup.
fn exit_now(code: i32) -> ! {
    // SAFETY: always safe to call.
    unsafe { libc::_exit(code) }
}

/// Waits until `status.json` exists with `report_seq` 0; kills the workload
/// on timeout.
fn wait_ready(state_dir: &Path, pid: i32) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if status::read_report_seq(state_dir).is_some() {
            return Ok(());
        }
        if !sys::process_alive(pid) {
            bail!(
                "workload (pid {pid}) exited before becoming ready{}",
                stderr_tail(&state_dir.join(STDERR_FILE))
            );
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            bail!(
                "workload (pid {pid}) not ready after {} s (no {}); killed it{}",
                READY_TIMEOUT.as_secs(),
                status::status_path(state_dir).display(),
                stderr_tail(&state_dir.join(STDERR_FILE))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The end of the workload's stderr file, formatted for an error message.
fn stderr_tail(path: &PathBuf) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("; its stderr ({}):\n{}", path.display(), &text[start..])
}
