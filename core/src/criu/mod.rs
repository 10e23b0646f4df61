//! Talking to CRIU: the RPC messages ([`rpc`]), a `criu swrk` worker
//! process speaking them over a socketpair ([`Worker`]), and CRIU's
//! statistics images ([`stats`]).
//!
//! The engine sees CRIU only through the [`Criu`] trait (the requests and
//! notifications it uses) and starts workers through a [`Launcher`]: the
//! real one ([`CriuBinary`]) runs `criu swrk`; the scripted fake in the
//! engine's unit tests plays recorded notification sequences and injects
//! failures, so every rollback path is tested without root.
//!
//! phaul never parses CRIU's command-line output and never lets CRIU open a
//! network connection: every socket CRIU uses is one phaul created and
//! handed over (the page-server socket travels as `ps.fd`).

pub mod diagnose;
#[cfg(test)]
pub(crate) mod fake;
pub mod rpc;
pub mod stats;
pub(crate) mod worker;

use std::path::{Path, PathBuf};

pub use worker::{Event, Worker};

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use rpc::{Features, Opts, ReqType, Resp};

/// The CRIU requests and notifications the engine uses, as one worker
/// process answers them. DUMP, PRE_DUMP and RESTORE are started with
/// [`Criu::start`] and followed with [`Criu::next_event`]; the engine holds
/// a frozen tree by not answering a notification yet.
pub trait Criu: Send {
    /// CRIU's version (an error if it is older than [`MIN_VERSION`]).
    fn version(&mut self) -> Result<CriuVersion, CriuError>;
    /// Whether the kernel can track dirty memory (pre-dumps).
    fn mem_track(&mut self) -> Result<bool, CriuError>;
    /// Asks about the features set to `true` in `query`.
    fn feature(&mut self, query: Features) -> Result<Features, CriuError>;
    /// Writes `cpuinfo.img` describing this CPU into `dir`.
    fn cpuinfo_dump(&mut self, dir: &Path) -> Result<(), CriuError>;
    /// Checks that the CPU described in `dir` can run here.
    fn cpuinfo_check(&mut self, dir: &Path) -> Result<(), CriuError>;
    /// Starts a page server reading from `ps_fd` into `images_dir`;
    /// returns its pid.
    fn page_server(&mut self, images_dir: &Path, ps_fd: RawFd, log: &str)
        -> Result<i32, CriuError>;
    /// Request options naming an images directory and a log.
    fn opts(&self, images_dir: &Path, log: &str) -> Opts;
    /// Starts a long request (DUMP, PRE_DUMP, RESTORE).
    fn start(&mut self, t: ReqType, opts: Opts) -> Result<(), CriuError>;
    /// The next notification or the final answer of a started request;
    /// [`CriuError::Timeout`] once the deadline passed.
    fn next_event(&mut self, t: ReqType) -> Result<Event, CriuError>;
    /// Answers the pending notification (`false` aborts the request).
    fn answer_notify(&mut self, success: bool) -> Result<(), CriuError>;
    /// Turns a failed final answer into an error quoting CRIU's log.
    fn check_done(&self, t: ReqType, resp: &Resp, log: &str) -> Result<(), CriuError>;
    /// Bounds every later wait for CRIU (`None`: wait as long as it takes).
    fn set_deadline(&mut self, deadline: Option<Instant>);
    /// Where the worker writes its logs and statistics.
    fn work_dir(&self) -> &Path;
    /// Waits up to `timeout` for the worker to exit after its last request.
    fn wait_exit(&mut self, timeout: Duration) -> bool;
    /// The worker's process id.
    fn pid(&self) -> u32;
    /// Whether the worker process has exited (without waiting).
    fn exited(&mut self) -> bool;
}

/// Starts CRIU workers.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Starts one; `inherit` are descriptors it must see under the same
    /// numbers (page-server sockets).
    fn spawn(
        &self,
        name: &str,
        work_dir: &Path,
        inherit: &[RawFd],
    ) -> Result<Box<dyn Criu>, CriuError>;
    /// The CRIU binary, for messages and for drivers.
    fn binary(&self) -> &Path;
}

/// The real launcher: `criu swrk` from this binary.
#[derive(Debug, Clone)]
pub struct CriuBinary(pub PathBuf);

impl Launcher for CriuBinary {
    fn spawn(
        &self,
        name: &str,
        work_dir: &Path,
        inherit: &[RawFd],
    ) -> Result<Box<dyn Criu>, CriuError> {
        Ok(Box::new(Worker::spawn(&self.0, name, work_dir, inherit)?))
    }

    fn binary(&self) -> &Path {
        &self.0
    }
}

impl Criu for Worker {
    fn version(&mut self) -> Result<CriuVersion, CriuError> {
        Worker::version(self)
    }
    fn mem_track(&mut self) -> Result<bool, CriuError> {
        Worker::mem_track(self)
    }
    fn feature(&mut self, query: Features) -> Result<Features, CriuError> {
        Worker::feature(self, query)
    }
    fn cpuinfo_dump(&mut self, dir: &Path) -> Result<(), CriuError> {
        Worker::cpuinfo_dump(self, dir)
    }
    fn cpuinfo_check(&mut self, dir: &Path) -> Result<(), CriuError> {
        Worker::cpuinfo_check(self, dir)
    }
    fn page_server(
        &mut self,
        images_dir: &Path,
        ps_fd: RawFd,
        log: &str,
    ) -> Result<i32, CriuError> {
        Worker::page_server(self, images_dir, ps_fd, log)
    }
    fn opts(&self, images_dir: &Path, log: &str) -> Opts {
        Worker::opts(self, images_dir, log)
    }
    fn start(&mut self, t: ReqType, opts: Opts) -> Result<(), CriuError> {
        Worker::start(self, t, opts)
    }
    fn next_event(&mut self, t: ReqType) -> Result<Event, CriuError> {
        Worker::next_event(self, t)
    }
    fn answer_notify(&mut self, success: bool) -> Result<(), CriuError> {
        Worker::answer_notify(self, success)
    }
    fn check_done(&self, t: ReqType, resp: &Resp, log: &str) -> Result<(), CriuError> {
        Worker::check_done(self, t, resp, log)
    }
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        Worker::set_deadline(self, deadline)
    }
    fn work_dir(&self) -> &Path {
        Worker::work_dir(self)
    }
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        Worker::wait_exit(self, timeout)
    }
    fn pid(&self) -> u32 {
        Worker::pid(self)
    }
    fn exited(&mut self) -> bool {
        Worker::exited(self)
    }
}

/// Where phaul looks for CRIU: `$PHAUL_CRIU`, else `/usr/local/sbin/criu`
/// (where `scripts/setup.sh` installs it), else `criu` in `PATH`.
pub fn locate() -> PathBuf {
    if let Some(p) = std::env::var_os("PHAUL_CRIU") {
        return PathBuf::from(p);
    }
    let local = Path::new("/usr/local/sbin/criu");
    if local.exists() {
        return local.to_path_buf();
    }
    PathBuf::from("criu")
}

/// A CRIU version, comparable.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CriuVersion {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Sublevel (patch) number.
    pub sublevel: u32,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// The oldest CRIU phaul works with: 4.1 cannot dump TCP/UDP sockets on
/// Linux 6.16+, 3.x fails on recent vDSO layouts.
pub const MIN_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    sublevel: 0,
};

fn failure_message(
    request: &str,
    errno: Option<i32>,
    line: Option<&str>,
    log: Option<&Path>,
) -> String {
    let mut m = format!("CRIU {request} failed");
    if let Some(e) = errno {
        m += &format!(" (errno {e}: {})", std::io::Error::from_raw_os_error(e));
    }
    if let Some(l) = line {
        m += &format!(": {l}");
    }
    if let Some(h) = diagnose::hint(line.unwrap_or(""), errno) {
        m += &format!(" — {h}");
    }
    if let Some(p) = log {
        m += &format!(" (CRIU log: {})", p.display());
    }
    m
}

impl CriuError {
    /// The CRIU log that explains the failure, if there is one.
    pub fn log(&self) -> Option<&Path> {
        match self {
            CriuError::Failed { log, .. } => log.as_deref(),
            _ => None,
        }
    }

    /// phaul's explanation of the failure, if it knows one.
    pub fn hint(&self) -> Option<String> {
        match self {
            CriuError::Failed { errno, line, .. } => {
                diagnose::hint(line.as_deref().unwrap_or(""), *errno)
            }
            _ => None,
        }
    }
}

/// Errors from CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// The binary could not be started.
    #[error("cannot start CRIU ({binary}): {source}; run scripts/setup.sh or set PHAUL_CRIU")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// Talking to the worker failed (it died or closed the socket).
    #[error("lost the connection to CRIU during {during}: {source}")]
    Io {
        /// What was going on.
        during: String,
        /// Why.
        source: std::io::Error,
    },
    /// The worker sent something that is not a CRIU RPC response.
    #[error("CRIU sent a malformed RPC message during {during}: {detail}")]
    Protocol {
        /// What was going on.
        during: String,
        /// What was wrong.
        detail: String,
    },
    /// A request failed inside CRIU.
    #[error("{}", failure_message(request, *errno, line.as_deref(), log.as_deref()))]
    Failed {
        /// The request type.
        request: &'static str,
        /// CRIU's errno, when it gave one.
        errno: Option<i32>,
        /// CRIU's own message, or the line of its log that says what failed.
        line: Option<String>,
        /// The log, which stays where it is after the migration.
        log: Option<PathBuf>,
    },
    /// CRIU did not answer in time.
    #[error("CRIU did not answer in time during {during}")]
    Timeout {
        /// What was going on.
        during: String,
    },
    /// CRIU is older than phaul supports.
    #[error("CRIU {found} is too old: phaul needs {MIN_VERSION} or newer (run scripts/setup.sh)")]
    TooOld {
        /// The version found.
        found: CriuVersion,
    },
}
