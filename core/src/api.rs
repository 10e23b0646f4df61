//! The library API for embedders, in the shape of the Go phaul library
//! (P.Haul wiki): a [`Config`], a [`Server`] for the destination, a
//! [`Client`] for the source that takes a [`Local`] side (the final
//! dump-copy-restore step) and a [`Remote`] side (start/stop iteration
//! calls over whatever RPC the embedder has), and [`Client::migrate`].
//!
//! The embedder owns the transport: `Config::mem_fd` is a connected stream
//! socket CRIU uses as its page-server connection directly (the source's
//! pre-dumps write pages into it; the server's page servers read them).
//! The `phaul` command line is built from the same pieces (the iteration
//! loop and the page servers), with its own protocol on top.
//!
//! An embedder that runs phaul's whole destination service instead
//! ([`crate::server::serve_connections`], [`crate::server::Server`])
//! configures it with [`crate::engine::dest::DestOptions`], whose
//! [`DestPolicy`] (re-exported here) is the destination's own: the htypes it
//! accepts and the directories a file sync may write into (none unless
//! allowed), checked before the source freezes anything. This module's
//! [`Server`] writes only into its own `Config::work_dir`.
//!
//! ```no_run
//! use phaul_core::api::*;
//! # fn run(pid: i32, fd: i32, remote: impl Remote) -> Result<(), ApiError> {
//! struct MyLocal;
//! impl Local for MyLocal {
//!     fn dump_copy_restore(
//!         &mut self,
//!         criu: &mut Worker,
//!         cfg: &Config,
//!         last_images_dir: Option<&std::path::Path>,
//!     ) -> Result<(), ApiError> {
//!         // dump with criu (pages to cfg.mem_fd), copy the images, restore remotely
//!         Ok(())
//!     }
//! }
//! let cfg = Config::new(pid, fd, "/dev/shm/my-migration".into());
//! let report = Client::new(MyLocal, remote, cfg).migrate()?;
//! println!("pre-dump passes: {}, stopped: {}", report.passes.len(), report.stop_reason);
//! # Ok(()) }
//! ```

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::criu::Worker;
use crate::engine::iter::{StopReason, StopRules};
use crate::engine::pages::PageServers;
use crate::engine::predump::PreDumpLoop;
pub use crate::engine::predump::Remote;
use crate::engine::report::{NoProgress, PassReport};
pub use crate::engine::PreDump;
pub use crate::policy::{DestPolicy, PolicyError};

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// CRIU failed.
    #[error(transparent)]
    Criu(#[from] crate::criu::CriuError),
    /// Anything else, with a message.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for ApiError {
    fn from(s: String) -> Self {
        ApiError::Failed(s)
    }
}

/// What both sides are configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The root task to migrate (source side).
    pub pid: i32,
    /// A connected stream socket for the memory pages.
    pub mem_fd: RawFd,
    /// This side's work directory (images per pass, CRIU logs).
    pub work_dir: PathBuf,
    /// The CRIU binary.
    pub criu: PathBuf,
    /// Whether to pre-copy memory.
    pub pre_dump: PreDump,
    /// When to stop pre-copying.
    pub rules: StopRules,
    /// Restore cost assumed by the downtime rule.
    pub restore_estimate: Duration,
}

impl Config {
    /// A configuration with the defaults (automatic pre-dumps, P.Haul's
    /// stop rules plus a 300 ms downtime target, CRIU from
    /// [`crate::criu::locate`]).
    pub fn new(pid: i32, mem_fd: RawFd, work_dir: PathBuf) -> Self {
        Self {
            pid,
            mem_fd,
            work_dir,
            criu: crate::criu::locate(),
            pre_dump: PreDump::Auto,
            rules: StopRules::default(),
            restore_estimate: Duration::from_millis(150),
        }
    }

    fn images(&self, iter: u32) -> PathBuf {
        self.work_dir.join(iter.to_string())
    }

    fn criu_dir(&self) -> Result<PathBuf, ApiError> {
        let d = self.work_dir.join("criu");
        std::fs::create_dir_all(&d)
            .map_err(|e| ApiError::Failed(format!("{}: {e}", d.display())))?;
        Ok(d)
    }
}

/// The source's final step: dump (pages through `cfg.mem_fd` to the
/// server), move the images, restore on the destination.
pub trait Local {
    /// Runs the final dump, copy and restore. `criu` is the source's CRIU
    /// worker, ready for its last request (DUMP); `last_images_dir` is the
    /// last pre-dump's image directory, if there were pre-dumps.
    fn dump_copy_restore(
        &mut self,
        criu: &mut Worker,
        cfg: &Config,
        last_images_dir: Option<&Path>,
    ) -> Result<(), ApiError>;
}

/// What [`Client::migrate`] did.
#[derive(Debug, Clone)]
pub struct ClientReport {
    /// The pre-dump passes.
    pub passes: Vec<PassReport>,
    /// Why the loop stopped (or never ran).
    pub stop_reason: StopReason,
}

/// The source side.
pub struct Client<L, R> {
    local: L,
    remote: R,
    cfg: Config,
}

impl<L: Local, R: Remote> Client<L, R> {
    /// A client for one migration.
    pub fn new(local: L, remote: R, cfg: Config) -> Self {
        Self { local, remote, cfg }
    }

    /// Pre-copies memory while it converges (when the kernel and
    /// `cfg.pre_dump` allow), then hands over to the local side's final
    /// step.
    pub fn migrate(&mut self) -> Result<ClientReport, ApiError> {
        let mut criu = Worker::spawn(
            &self.cfg.criu,
            "client",
            &self.cfg.criu_dir()?,
            &[self.cfg.mem_fd],
        )?;
        criu.version()?;
        let mem_track = criu.mem_track()?;
        let (passes, last, stop_reason) = match (self.cfg.pre_dump, mem_track) {
            (PreDump::Never, _) => (
                Vec::new(),
                None,
                StopReason::NoPreDump {
                    why: "disabled".into(),
                },
            ),
            (PreDump::Force, false) => {
                return Err(ApiError::Failed(
                    "pre-dumps requested, but this kernel cannot track dirty memory".into(),
                ))
            }
            (PreDump::Uffd, _) => {
                return Err(ApiError::Failed(
                    "userfaultfd pre-copy needs the engine's post-copy switch-over: use \
                     `phaul migrate --pre-copy=uffd` (or the engine's `migrate()`), not the \
                     page-server client"
                        .into(),
                ))
            }
            (_, false) => (
                Vec::new(),
                None,
                StopReason::NoPreDump {
                    why: "this kernel cannot track dirty memory".into(),
                },
            ),
            (_, true) => {
                let cfg = &self.cfg;
                let images = |n: u32| cfg.images(n);
                let mut adjust = |_: &mut phaul_plugin_api::CriuOpts| Ok(());
                let mut lp = PreDumpLoop {
                    criu: &mut criu,
                    pid: cfg.pid,
                    ps_fd: cfg.mem_fd,
                    images: &images,
                    adjust: &mut adjust,
                    rules: cfg.rules,
                    restore_estimate: cfg.restore_estimate,
                    channel: None,
                    progress: std::sync::Arc::new(NoProgress),
                };
                let (passes, n, reason) = lp.run(&mut self.remote)?;
                (passes, Some(n), reason)
            }
        };
        let last_dir = last.map(|n| self.cfg.images(n));
        self.local
            .dump_copy_restore(&mut criu, &self.cfg, last_dir.as_deref())?;
        Ok(ClientReport {
            passes,
            stop_reason,
        })
    }
}

/// The destination side: a page server per pass, reading from
/// `cfg.mem_fd` into `cfg.work_dir/<pass>`.
#[derive(Debug)]
pub struct Server {
    pages: PageServers,
}

impl Server {
    /// Starts the server's CRIU worker (before anything is frozen).
    pub fn new(cfg: &Config) -> Result<Server, ApiError> {
        let mut worker = Worker::spawn(&cfg.criu, "server", &cfg.criu_dir()?, &[cfg.mem_fd])?;
        worker.version()?;
        Ok(Server {
            pages: PageServers::new(Box::new(worker), cfg.mem_fd, cfg.work_dir.clone()),
        })
    }

    /// Starts the page server for the next pass.
    pub fn start_iter(&mut self) -> Result<(), ApiError> {
        let next = self.pages.last() + 1;
        let parent = (next > 1).then(|| next - 1);
        Ok(self.pages.start(next, parent, false)?)
    }

    /// Waits until the current pass's pages are all written.
    pub fn stop_iter(&mut self) -> Result<(), ApiError> {
        Ok(self.pages.wait(Duration::from_secs(60))?)
    }

    /// The image directory of the last pass (where the final images go).
    pub fn last_images_dir(&self) -> PathBuf {
        self.pages.dir(self.pages.last())
    }
}

impl Remote for Server {
    fn start_iter(&mut self, _iter: u32, _parent: Option<u32>) -> Result<(), String> {
        Server::start_iter(self).map_err(|e| e.to_string())
    }

    fn stop_iter(&mut self, _iter: u32) -> Result<(), String> {
        Server::stop_iter(self).map_err(|e| e.to_string())
    }
}
