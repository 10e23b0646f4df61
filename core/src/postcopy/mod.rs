//! Post-copy: the workload runs on the destination after a pause of
//! milliseconds, its private memory following on demand.
//!
//! # How
//!
//! The final CRIU dump is a lazy one (`lazy_pages`, `leave_stopped`):
//! CRIU writes every image except the private memory, which it leaves to
//! be fetched. The destination restores with `lazy_pages`: CRIU hands
//! phaul's [`pager`] one userfaultfd per task. At the switch (the commit)
//! the restored copy runs; each fault on a page that has not arrived sends
//! an urgent request over the memory channel, and a background stream
//! fetches the rest. The source's copy stays stopped and its pages are
//! read straight out of it ([`serve`]). phaul never lets CRIU listen on a
//! network socket: CRIU's lazy page server gets a socketpair phaul closed
//! (so it ends at once and leaves the tree stopped), and the pages travel
//! on phaul's own authenticated memory channel.
//!
//! # What can fail, and what happens
//!
//! Before the switch everything rolls back exactly as a single-shot
//! migration does. The switch moves the point of no return to the moment
//! the destination's copy starts running: from then on neither side alone
//! holds the whole workload, so
//!
//! - the source's copy never runs again: SIGSTOP is queued to its tasks
//!   before `Commit`, CRIU leaves them stopped, and they are removed only
//!   when the destination says every page has arrived;
//! - the destination's copy never runs with a page made up: a page that
//!   has not arrived blocks the faulting thread. CRIU's own lazy-pages
//!   daemon does not give that (its userfaultfd dies with it, and the
//!   kernel then maps zero pages, silently); phaul's [`keeper`] holds a
//!   reference to every userfaultfd from the switch until the last page,
//!   so a dying `phaul` leaves threads waiting, not memory corrupted;
//! - every wait has a deadline (`stall`): a transfer that stops moving
//!   is declared broken on both sides, recorded in both journals, and the
//!   migration ends *undecided* (exit 5): the source's copy stopped and
//!   whole, the destination's copy blocked on the pages it lacks.
//!   `phaul recover` on the source then resumes the transfer
//!   ([`resume`]); when the destination cannot, and has not discarded its
//!   copy, the source copy stays stopped: resuming it at its freeze point
//!   discards whatever the destination's copy did meanwhile, so that is
//!   the operator's decision, and recover says how.

pub mod image;
pub mod keeper;
pub mod pager;
pub mod resume;
pub mod serve;
pub mod uffd;
pub mod wire;

use std::time::Duration;

/// `--post-copy`: whether the final dump leaves private memory lazy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostCopy {
    /// Single-shot: every page crosses while the workload is frozen.
    #[default]
    Off,
    /// Always post-copy.
    On,
    /// Post-copy only when the predicted single-shot pause exceeds the
    /// downtime target.
    Auto,
}

/// How long a post-copy transfer may go without progress before it is
/// declared broken.
pub const DEFAULT_STALL: Duration = Duration::from_secs(15);

/// The pipe size CRIU's lazy dump asks for (`F_SETPIPE_SZ`), which needs
/// `fs.pipe-max-size` at least this large when root lacks
/// CAP_SYS_RESOURCE.
pub const PIPE_SIZE_NEEDED: u64 = 4 << 20;

const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// Makes sure CRIU's lazy dump can size its pipes: raises
/// `fs.pipe-max-size` to [`PIPE_SIZE_NEEDED`] when lower (returns what it
/// was, so the caller can say so), or explains how to.
pub fn ensure_pipe_max_size() -> Result<Option<u64>, String> {
    let read = || -> Result<u64, String> {
        std::fs::read_to_string(PIPE_MAX_SIZE)
            .map_err(|e| format!("{PIPE_MAX_SIZE}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{PIPE_MAX_SIZE}: {e}"))
    };
    let now = read()?;
    if now >= PIPE_SIZE_NEEDED {
        return Ok(None);
    }
    std::fs::write(PIPE_MAX_SIZE, PIPE_SIZE_NEEDED.to_string()).map_err(|e| {
        format!(
            "post-copy needs fs.pipe-max-size >= {PIPE_SIZE_NEEDED} (CRIU's lazy dump grows a pipe \
             to 4 MiB; it is {now}) and phaul could not raise it ({e}): run \
             `sysctl -w fs.pipe-max-size={PIPE_SIZE_NEEDED}`"
        )
    })?;
    Ok(Some(now))
}
