//! Iterative directory-tree synchronisation over a stream socket (phaul's
//! replacement for rsync): copies directory subtrees (a container rootfs,
//! a data directory) from the source host to the destination while the
//! workload runs — a first full pass, live passes that send only what
//! changed, then a final pass while the workload is frozen, after which
//! the destination trees are identical to the source's.
//!
//! # Design
//!
//! - **Sides.** A [`Sender`] on the source owns the roots and remembers,
//!   per path, what the receiver has (its stat, hard-link leader, block
//!   signatures, a metadata hash); a [`Receiver`] on the destination
//!   applies passes and remembers nothing between them but its roots.
//! - **Wire.** The project's length-prefixed postcard frames
//!   ([`crate::proto::frame`]) of [`FsMsg`]; file data in chunks of at
//!   most [`CHUNK`] bytes. Each pass ends with the receiver's `Ack` (its
//!   own counts, cross-checked by the sender) or `Error` (its message
//!   becomes [`FsyncError::Peer`]).
//! - **What is copied.** Regular files (data regions only, holes stay
//!   holes), directories, symlinks (target as is, never followed), hard
//!   links (per root: same inode on the source, one inode on the
//!   receiver, kept so across passes), FIFOs and device nodes; mode bits
//!   including setuid/setgid/sticky, numeric owner, mtime in nanoseconds
//!   (directories after their contents, deepest first) and every
//!   extended attribute. Sockets are skipped; atimes are not kept.
//! - **Change detection** ([`sender`]): stat comparison (entries changed
//!   within [`sender::RACY_SECS`] of a pass are re-checked by content in
//!   the next, since a change in the same timestamp tick would not show),
//!   then block hashes ([`delta`], xxh3-128 of 64 KiB blocks); content
//!   unchanged means metadata only. A changed file the receiver has, of
//!   any size, goes as a delta: the receiver copies its old version's
//!   data regions into a temporary file (`copy_file_range`), applies the
//!   changed blocks and punched holes, checks a whole-file hash and only
//!   then renames it into place ([`FsyncError::Changed`] if the
//!   destination was modified behind phaul's back).
//! - **Atomicity** ([`receiver`]): every entry is built under a temporary
//!   name in its directory and renamed over the real name; temporary names
//!   are removed on error. No fsync (tmpfs-friendly).
//! - **Safety** ([`confine`]): the receiver treats the sender as hostile:
//!   wire paths are plain relative names, resolved with `openat2`
//!   beneath the root without following any symlink, and every change is
//!   an `*at` call that does not follow the final name. The sender reads
//!   the same way, so a workload racing the walk (a directory swapped for
//!   a symlink) cannot get files from outside its tree copied.
//! - **When to stop** ([`rules`]): P.Haul's restart-mode rules on the
//!   bytes each live pass sent.

pub mod confine;
pub mod delta;
mod error;
pub mod msg;
pub mod receiver;
pub mod rules;
mod scan;
pub mod sender;
mod sys;

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use serde::{Deserialize, Serialize};

pub use confine::{check_path, resolve_root, Root};
pub use error::FsyncError;
pub use msg::FsMsg;
pub use receiver::Receiver;
pub use rules::{should_stop, FsStopRules};
pub use sender::Sender;

/// Largest file data payload of one frame (well below the 4 MiB frame limit).
pub const CHUNK: usize = 1 << 20;

/// What one pass did (the sender's count, or the receiver's view of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassStats {
    /// Pass number, from 1.
    pub pass: u32,
    /// Whether it was the final (frozen) pass.
    pub final_pass: bool,
    /// Entries walked on the source.
    pub files_scanned: u64,
    /// Entries something was sent for (content, metadata or a link).
    pub files_sent: u64,
    /// Payload bytes of file data actually sent.
    pub bytes_sent: u64,
    /// Paths deleted on the receiver.
    pub deleted: u64,
    /// How long the pass took, microseconds.
    pub duration_us: u64,
}
