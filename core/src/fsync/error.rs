//! [`FsyncError`]: everything a tree synchronisation can fail with, each as
//! one line that says where and, when there is something to do, what.

use std::io;
use std::path::PathBuf;

use crate::proto::FrameError;

/// Why a directory-tree synchronisation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsyncError {
    /// A local I/O error on a path.
    #[error("fs sync: {what} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "creating", ...).
        what: &'static str,
        /// The local path (for the receiver: root joined with the wire path).
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The connection failed or carried a frame that does not decode.
    #[error("fs sync: {0}")]
    Frame(#[from] FrameError),
    /// The sender named a path the receiver must not touch. Nothing
    /// outside the root was touched.
    #[error("fs sync: refused unsafe path {path:?} from the sender: {why}")]
    Unsafe {
        /// The path as sent (lossily decoded).
        path: String,
        /// Why it is refused.
        why: String,
    },
    /// The peer broke the fs-sync protocol (a message out of order, a
    /// mismatch in counts, ...): both ends must run the same phaul.
    #[error("fs sync: protocol violation: {0} (are both hosts running the same phaul?)")]
    Protocol(String),
    /// The peer reported an error in an error frame.
    #[error("fs sync: the other side failed: {0}")]
    Peer(String),
    /// A destination file differs from what the earlier passes wrote, so a
    /// delta cannot be applied to it.
    #[error(
        "fs sync: destination file {path} changed behind phaul's back ({why}); \
         nothing else may write to the destination tree during a migration"
    )]
    Changed {
        /// The destination path.
        path: PathBuf,
        /// What was found.
        why: String,
    },
    /// A root directory is unusable.
    #[error("fs sync: root {}: {why}", path.display())]
    Root {
        /// The configured root.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// An earlier pass of this sender failed; its view of the receiver's
    /// tree is unknown.
    #[error("fs sync: an earlier pass failed, so this sender cannot go on; start a new sync")]
    Poisoned,
}

impl FsyncError {
    /// Wraps a local I/O error with what was being done and where.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        FsyncError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// An [`FsyncError::Unsafe`] for a wire path.
    pub fn unsafe_path(path: &[u8], why: impl Into<String>) -> Self {
        FsyncError::Unsafe {
            path: String::from_utf8_lossy(path).into_owned(),
            why: why.into(),
        }
    }

    /// Whether the error is a broken or closed connection (nothing more
    /// can be said to the peer).
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            FsyncError::Frame(FrameError::Closed) | FsyncError::Frame(FrameError::Io(_))
        )
    }
}
