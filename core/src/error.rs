//! The engine's error type.

use std::path::PathBuf;

use phaul_plugin_api::DriverError;

/// Everything the engine can fail with. Messages are one line and say what
/// to do where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No loaded plugin provides the htype.
    #[error("no driver for htype `{htype}` (available: {available}; searched {dirs}); pass --plugin-dir DIR")]
    UnknownHtype {
        /// The requested htype.
        htype: String,
        /// Comma-separated loaded htypes.
        available: String,
        /// Colon-separated searched directories.
        dirs: String,
    },
    /// A driver hook failed or panicked.
    #[error("{htype} driver: {hook} failed: {source}")]
    Driver {
        /// The htype.
        htype: String,
        /// The hook.
        hook: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// A driver hook did not return within its deadline; the driver is not
    /// called again in this process.
    #[error("{htype} driver: {hook} did not return within {}s (hung); this driver is not called again here (raise the deadline with --hook-timeout {hook}=SECONDS if it needs longer)", after.as_secs_f64())]
    HookHung {
        /// The htype.
        htype: String,
        /// The hook.
        hook: &'static str,
        /// Its deadline.
        after: std::time::Duration,
    },
    /// A driver hook was abandoned because the migration was interrupted.
    #[error("{htype} driver: {hook} was abandoned on an interrupt")]
    HookInterrupted {
        /// The htype.
        htype: String,
        /// The hook.
        hook: &'static str,
    },
    /// An I/O error on a path.
    #[error("{what} {}: {source}", path.display())]
    Path {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A directory phaul would trust (a work or log root, a session
    /// directory) is not safe: a symlink, another user's, or writable by
    /// others.
    #[error("{what} {}: {why}", path.display())]
    UnsafeDir {
        /// Which directory.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
