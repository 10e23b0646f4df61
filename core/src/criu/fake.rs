//! A scripted stand-in for CRIU, for the engine's unit tests: it speaks the
//! [`Criu`] trait the way `criu swrk` does (the same notifications in the
//! same order, the same reactions to answers and to a lost RPC peer) and
//! injects failures at chosen points. The "workloads" are real processes
//! (`sleep`), so the tests see real effects: a dump answered `true` kills
//! the source process, a restore spawns the destination's copy and kills
//! it when answered `false` or abandoned — as CRIU does.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::rpc::{self, Features, Opts, ReqType, Resp};
use super::{Criu, CriuError, CriuVersion, Event, Launcher};

/// A failure to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The request fails (CRIU's answer says so) instead of its first
    /// notification.
    Fail(ReqType),
    /// The worker dies just before this notification.
    DieBefore(&'static str),
    /// The worker sends this notification, then dies (the answer is lost).
    DieAfter(&'static str),
    /// The worker stops answering at this notification.
    HangAt(&'static str),
    /// The worker sends this notification, then dies while the engine holds
    /// it there.
    DiesHolding(&'static str),
}

/// What the fakes did, shared with the test.
#[derive(Debug, Default)]
pub struct Log {
    /// One line per request, notification and answer.
    pub lines: Vec<String>,
    /// The destination copies spawned by restores.
    pub copies: Vec<i32>,
}

/// Starts fake workers, all sharing one fault list and one log.
#[derive(Debug, Clone)]
pub struct FakeLauncher {
    faults: Arc<Vec<Fault>>,
    /// What happened.
    pub log: Arc<Mutex<Log>>,
    binary: PathBuf,
}

impl FakeLauncher {
    /// Fake workers that inject `faults`.
    pub fn new(faults: Vec<Fault>) -> Self {
        Self {
            faults: Arc::new(faults),
            log: Arc::default(),
            binary: PathBuf::from("fake-criu"),
        }
    }
}

impl Launcher for FakeLauncher {
    fn spawn(
        &self,
        name: &str,
        work_dir: &Path,
        _inherit: &[RawFd],
    ) -> Result<Box<dyn Criu>, CriuError> {
        Ok(Box::new(FakeCriu {
            name: name.to_string(),
            work_dir: work_dir.to_path_buf(),
            faults: self.faults.clone(),
            log: self.log.clone(),
            queue: VecDeque::new(),
            running: None,
            dead: false,
            deadline: None,
            copy: None,
            victim: None,
            pending: None,
        }))
    }

    fn binary(&self) -> &Path {
        &self.binary
    }
}

struct FakeCriu {
    name: String,
    work_dir: PathBuf,
    faults: Arc<Vec<Fault>>,
    log: Arc<Mutex<Log>>,
    queue: VecDeque<&'static str>,
    running: Option<ReqType>,
    dead: bool,
    deadline: Option<Instant>,
    /// The restored copy (restore requests).
    copy: Option<Child>,
    /// The dumped tree's root (dump requests).
    victim: Option<i32>,
    /// The notification awaiting an answer.
    pending: Option<&'static str>,
}

fn died(during: &str) -> CriuError {
    CriuError::Io {
        during: during.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "CRIU exited"),
    }
}

fn done(t: ReqType, success: bool, pid: Option<i32>) -> Event {
    Event::Done(Resp {
        r#type: t as i32,
        success,
        restore: pid.map(|pid| rpc::RestoreResp { pid }),
        ..Default::default()
    })
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

impl FakeCriu {
    fn note(&self, what: String) {
        self.log
            .lock()
            .unwrap()
            .lines
            .push(format!("{}: {what}", self.name));
    }

    fn fault(&self, f: &Fault) -> bool {
        self.faults.contains(f)
    }

    fn alive(&self, during: &str) -> Result<(), CriuError> {
        if self.dead {
            return Err(died(during));
        }
        Ok(())
    }

    /// CRIU's reaction to losing its RPC peer, or to `false` on a held
    /// notification: a dump resumes its tree (here: leaves it alone), a
    /// restore kills its copy.
    fn abandon(&mut self) {
        if let Some(mut c) = self.copy.take() {
            kill(c.id() as i32);
            let _ = c.wait();
        }
    }
}

impl Criu for FakeCriu {
    fn version(&mut self) -> Result<CriuVersion, CriuError> {
        self.alive("version")?;
        Ok(CriuVersion {
            major: 4,
            minor: 2,
            sublevel: 1,
        })
    }
    fn mem_track(&mut self) -> Result<bool, CriuError> {
        self.alive("feature check")?;
        Ok(false)
    }
    fn feature(&mut self, _query: Features) -> Result<Features, CriuError> {
        self.alive("feature check")?;
        Ok(Features::default())
    }
    fn cpuinfo_dump(&mut self, dir: &Path) -> Result<(), CriuError> {
        self.alive("cpuinfo dump")?;
        std::fs::write(dir.join("cpuinfo.img"), b"fake").map_err(|e| CriuError::Io {
            during: "cpuinfo dump".into(),
            source: e,
        })
    }
    fn cpuinfo_check(&mut self, _dir: &Path) -> Result<(), CriuError> {
        self.alive("cpuinfo check")
    }
    fn page_server(
        &mut self,
        images_dir: &Path,
        _ps_fd: RawFd,
        _log: &str,
    ) -> Result<i32, CriuError> {
        self.alive("page-server")?;
        // A real process that ends by itself, as a page server does once
        // the dump's pages arrived.
        let mut c = Command::new("sleep")
            .arg("0.05")
            .spawn()
            .map_err(|e| CriuError::Io {
                during: "page-server".into(),
                source: e,
            })?;
        let pid = c.id() as i32;
        std::thread::spawn(move || c.wait());
        let _ = std::fs::write(images_dir.join("pages-1.img"), b"fake pages");
        self.note(format!("page server {pid}"));
        Ok(pid)
    }
    fn opts(&self, images_dir: &Path, log: &str) -> Opts {
        Opts {
            images_dir_fd: -1,
            images_dir: Some(images_dir.display().to_string()),
            log_file: Some(log.to_string()),
            ..Default::default()
        }
    }
    fn start(&mut self, t: ReqType, opts: Opts) -> Result<(), CriuError> {
        self.alive("start")?;
        self.note(format!("start {t:?}"));
        self.running = Some(t);
        if self.fault(&Fault::Fail(t)) {
            self.queue.push_back("!fail");
            return Ok(());
        }
        match t {
            ReqType::Dump => {
                self.victim = opts.pid;
                if let Some(dir) = opts.images_dir {
                    let _ = std::fs::write(Path::new(&dir).join("core-1.img"), b"fake core");
                }
                self.queue.extend(["pre-dump", "network-lock", "post-dump"]);
            }
            ReqType::Restore => {
                let c = Command::new("sleep")
                    .arg("1000")
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| CriuError::Io {
                        during: "restore".into(),
                        source: e,
                    })?;
                self.log.lock().unwrap().copies.push(c.id() as i32);
                self.copy = Some(c);
                self.queue
                    .extend(["pre-restore", "setup-namespaces", "post-restore"]);
            }
            _ => self.queue.push_back("!done"),
        }
        Ok(())
    }
    fn next_event(&mut self, t: ReqType) -> Result<Event, CriuError> {
        self.alive("next event")?;
        let Some(next) = self.queue.pop_front() else {
            return Err(died("next event"));
        };
        match next {
            "!fail" => return Ok(done(t, false, None)),
            "!done" | "!ok" => {
                let pid = self.copy.as_ref().map(|c| c.id() as i32);
                if t == ReqType::Dump {
                    if let Some(v) = self.victim.take() {
                        kill(v); // CRIU kills the dumped tree after success.
                    }
                }
                if t == ReqType::Restore {
                    // The copy runs on its own now; CRIU lets go of it.
                    if let Some(c) = self.copy.take() {
                        std::thread::spawn(move || {
                            let mut c = c;
                            c.wait()
                        });
                    }
                }
                return Ok(done(t, true, pid));
            }
            "!failed" => return Ok(done(t, false, None)),
            _ => {}
        }
        if self.fault(&Fault::DieBefore(next)) {
            self.note(format!("dies before {next}"));
            self.dead = true;
            if let Some(c) = &self.copy {
                // A copy whose CRIU died is stuck in CRIU's restorer: it
                // never runs.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGSTOP,
                );
            }
            return Err(died(next));
        }
        if self.fault(&Fault::HangAt(next)) {
            self.note(format!("hangs at {next}"));
            let until = self
                .deadline
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3));
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            self.queue.push_front(next);
            return Err(CriuError::Timeout {
                during: next.to_string(),
            });
        }
        self.note(format!("notify {next}"));
        self.pending = Some(next);
        if self.fault(&Fault::DiesHolding(next)) {
            self.note(format!("dies holding {next}"));
            self.dead = true;
        }
        // CRIU names the restored root at these two points.
        let pid = matches!(next, "setup-namespaces" | "post-restore")
            .then(|| self.copy.as_ref().map(|c| c.id() as i32))
            .flatten();
        Ok(Event::Notify {
            script: next.to_string(),
            pid,
        })
    }
    fn answer_notify(&mut self, success: bool) -> Result<(), CriuError> {
        self.alive("notify answer")?;
        let at = self.pending.take().unwrap_or("?");
        if self.fault(&Fault::DieAfter(at)) {
            self.note(format!("dies after {at} (answer lost)"));
            self.dead = true;
            if let Some(c) = &self.copy {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGSTOP,
                );
            }
            return Err(died("notify answer"));
        }
        self.note(format!("answer {at} {success}"));
        if !success {
            self.queue.clear();
            if at != "pre-dump" && self.running == Some(ReqType::Dump) {
                self.queue.push_back("network-unlock");
            }
            self.abandon();
            self.queue.push_back("!failed");
            return Ok(());
        }
        if self.queue.is_empty() {
            if at == "post-restore" {
                self.queue.push_back("network-unlock");
            }
            self.queue.push_back("!ok");
        }
        Ok(())
    }
    fn check_done(&self, t: ReqType, resp: &Resp, _log: &str) -> Result<(), CriuError> {
        if resp.success {
            return Ok(());
        }
        Err(CriuError::Failed {
            request: match t {
                ReqType::Dump => "dump",
                ReqType::Restore => "restore",
                _ => "request",
            },
            errno: None,
            line: Some("injected failure".into()),
            log: None,
        })
    }
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }
    fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    fn wait_exit(&mut self, _timeout: Duration) -> bool {
        true
    }
    fn pid(&self) -> u32 {
        0
    }
    fn exited(&mut self) -> bool {
        self.dead
    }
}

impl Drop for FakeCriu {
    /// Like a worker whose RPC peer went away mid-request.
    fn drop(&mut self) {
        if self.running.is_some() && !self.dead {
            self.abandon();
        }
    }
}
