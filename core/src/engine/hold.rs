//! Holding a CRIU that phaul did not start: for drivers that dump or
//! restore through their own tooling (`Capabilities::OWN_DUMP`,
//! `OWN_RESTORE`), CRIU runs an action script phaul writes, which reports
//! each notification to the engine and waits for its verdict — the same
//! hold at `post-dump` and `post-restore` that the engine has over its own
//! CRIU through RPC.
//!
//! The script (bash) talks through two FIFOs in the migration's work
//! directory: it writes `ACTION PID` to `events` and reads `ok` or `fail`
//! from `verdicts`. It opens both read-write, so no open ever blocks, and
//! while it waits it checks every second that the engine's process still
//! exists: when the engine dies, the script fails, and CRIU does what it
//! does when its RPC peer dies — a dump resumes the tree, a restore kills
//! its copy.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The notifications the script reports (the others pass at once).
const REPORTED: &str =
    "pre-dump|network-lock|network-unlock|post-dump|setup-namespaces|post-restore";

/// An action-script channel to a CRIU started by a driver's tooling.
pub struct ActionHold {
    events: BufReader<std::fs::File>,
    verdicts: std::fs::File,
    script: PathBuf,
    config: PathBuf,
    pending: bool,
}

impl std::fmt::Debug for ActionHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionHold")
            .field("script", &self.script)
            .finish()
    }
}

fn mkfifo(p: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(p);
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
}

fn open_rw(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(p)
}

impl ActionHold {
    /// Creates the FIFOs, the script and a CRIU configuration file naming
    /// it, in `dir`, for this process.
    pub fn create(dir: &Path) -> std::io::Result<ActionHold> {
        Self::create_for(dir, std::process::id() as i32)
    }

    /// Like [`ActionHold::create`], for an engine running as `engine`.
    pub fn create_for(dir: &Path, engine: i32) -> std::io::Result<ActionHold> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let events = dir.join("events");
        let verdicts = dir.join("verdicts");
        mkfifo(&events)?;
        mkfifo(&verdicts)?;
        let script = dir.join("criu-action");
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\n\
                 # phaul: report CRIU's notification to the engine (pid {engine}), wait for its verdict.\n\
                 case \"$CRTOOLS_SCRIPT_ACTION\" in {REPORTED}) ;; *) exit 0 ;; esac\n\
                 exec 3<> '{}' 4<> '{}' || exit 1\n\
                 printf '%s %s\\n' \"$CRTOOLS_SCRIPT_ACTION\" \"${{CRTOOLS_INIT_PID:-0}}\" >&4 || exit 1\n\
                 while :; do\n\
                 \x20 if read -r -t 1 verdict <&3; then [ \"$verdict\" = ok ]; exit; fi\n\
                 \x20 kill -0 {engine} 2>/dev/null || exit 1\n\
                 done\n",
                verdicts.display(),
                events.display()
            ),
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
        let config = dir.join("criu.conf");
        std::fs::write(&config, format!("action-script {}\n", script.display()))?;
        Ok(ActionHold {
            events: BufReader::new(open_rw(&events)?),
            verdicts: open_rw(&verdicts)?,
            script,
            config,
            pending: false,
        })
    }

    /// The script CRIU must run.
    pub fn script(&self) -> &Path {
        &self.script
    }

    /// A CRIU configuration file naming the script.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The next notification (`action`, `pid`), waiting until `deadline`;
    /// `None` when nothing came in time. The script waits for
    /// [`ActionHold::verdict`] before CRIU goes on.
    pub fn next(&mut self, deadline: Instant) -> std::io::Result<Option<(String, i32)>> {
        if self.events.buffer().is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.events.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if n <= 0 {
                return Ok(None);
            }
        }
        let mut line = String::new();
        self.events.read_line(&mut line)?;
        let mut it = line.split_whitespace();
        let action = it.next().unwrap_or_default().to_string();
        let pid = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        self.pending = true;
        Ok(Some((action, pid)))
    }

    /// Answers the pending notification: `false` makes CRIU abort (a dump
    /// resumes the tree, a restore kills its copy).
    pub fn verdict(&mut self, ok: bool) -> std::io::Result<()> {
        if !std::mem::take(&mut self.pending) {
            return Ok(());
        }
        self.verdicts
            .write_all(if ok { b"ok\n" } else { b"fail\n" })
    }
}

impl ActionHold {
    /// Answers, with `ok`, every notification that has arrived (waiting
    /// for none) and returns their actions: for the time a driver's tooling
    /// finishes after the engine's last decision.
    pub fn answer_pending(&mut self, ok: bool) -> Vec<String> {
        let mut seen = Vec::new();
        if self.verdict(ok).is_err() {
            return seen;
        }
        while let Ok(Some((action, _))) = self.next(Instant::now()) {
            if self.verdict(ok).is_err() {
                break;
            }
            seen.push(action);
        }
        seen
    }
}

impl Drop for ActionHold {
    /// A notification left unanswered fails, as CRIU's RPC peer going away
    /// does.
    fn drop(&mut self) {
        let _ = self.verdict(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_reports_and_waits_for_the_verdict() {
        let d = tempfile::tempdir().unwrap();
        // The "engine" is a process the test can make disappear.
        let mut engine = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let mut h = ActionHold::create_for(d.path(), engine.id() as i32).unwrap();
        let run = |action: &str| {
            std::process::Command::new(h_script(d.path()))
                .env("CRTOOLS_SCRIPT_ACTION", action)
                .env("CRTOOLS_INIT_PID", "42")
                .spawn()
                .unwrap()
        };
        fn h_script(d: &Path) -> PathBuf {
            d.join("criu-action")
        }
        // Not reported: passes at once.
        assert!(run("post-setup-namespaces").wait().unwrap().success());
        let deadline = || Instant::now() + std::time::Duration::from_secs(5);
        // Notifications after the engine's last decision are answered as
        // they come, while the driver's tooling finishes.
        let mut c = run("network-unlock");
        let mut seen = Vec::new();
        let until = deadline();
        while seen.is_empty() && Instant::now() < until {
            seen = h.answer_pending(true);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(seen, vec!["network-unlock".to_string()]);
        assert!(c.wait().unwrap().success());
        let mut c = run("post-restore");
        assert_eq!(
            h.next(deadline()).unwrap(),
            Some(("post-restore".to_string(), 42))
        );
        h.verdict(true).unwrap();
        assert!(c.wait().unwrap().success());
        let mut c = run("post-dump");
        assert_eq!(h.next(deadline()).unwrap().unwrap().0, "post-dump");
        h.verdict(false).unwrap();
        assert!(
            !c.wait().unwrap().success(),
            "a failed verdict fails the script"
        );
        // The engine going away fails a waiting script.
        let mut c = run("post-dump");
        assert!(h.next(deadline()).unwrap().is_some());
        h.pending = false;
        let _ = engine.kill();
        let _ = engine.wait();
        assert!(!c.wait().unwrap().success());
        drop(h);
        let _ = std::fs::metadata(d.path().join("criu.conf")).unwrap();
    }
}
