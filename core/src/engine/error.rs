//! The engine's typed errors: one enum per phase of a migration, each
//! variant one step that can fail, composed with `#[from]`. Which phase
//! an error comes from decides the outcome ([`MigrationError`]): a
//! [`PreflightError`] refuses (nothing was frozen), a [`CopyError`] or a
//! [`HandOverError`] rolls back, a [`CommitError`] is resolved by asking
//! the destination. No decision is ever taken by looking at a message.

use std::time::Duration;

use crate::criu::CriuError;
use crate::journal::JournalError;
use crate::proto::FrameError;

/// Something went wrong with the other side of the migration (the
/// destination, seen from the source, or the source, seen from the
/// destination).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The destination could not be reached.
    #[error("cannot connect to {addr}: {source} (is `phaul serve` running there?)")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS failed, or the destination refused this host's identity.
    #[error("{addr}: {source}")]
    Tls {
        /// The address.
        addr: String,
        /// Why.
        source: crate::transport::TlsError,
    },
    /// An extra connection (memory, files) could not be opened.
    #[error("cannot open the {what} connection to {addr}: {source}")]
    Channel {
        /// Which connection.
        what: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// An embedder did not hand in a connection the migration needs.
    #[error("no {0} connection was given")]
    Missing(&'static str),
    /// Sending a message failed.
    #[error("sending {what} to the {peer}: {source}")]
    Send {
        /// The message.
        what: &'static str,
        /// `source` or `destination`.
        peer: &'static str,
        /// Why.
        source: FrameError,
    },
    /// Waiting for a message failed (closed, reset, timed out, garbled).
    #[error("waiting for {waiting_for} from the {peer}: {source}")]
    Recv {
        /// The message expected.
        waiting_for: &'static str,
        /// `source` or `destination`.
        peer: &'static str,
        /// Why.
        source: FrameError,
    },
    /// The other side said it gives up (and rolls back its part).
    #[error("the {peer} aborted: {reason}")]
    Aborted {
        /// `source` or `destination`.
        peer: &'static str,
        /// Its reason (paths in it are on its host).
        reason: String,
        /// Its CRIU log explaining it, on its host.
        criu_log: Option<String>,
        /// Its explanation, when it has one.
        hint: Option<String>,
    },
    /// The other side sent something out of order.
    #[error("expected {expected} from the {peer}, got {got}")]
    Unexpected {
        /// What the protocol says comes next.
        expected: &'static str,
        /// What came.
        got: &'static str,
        /// `source` or `destination`.
        peer: &'static str,
    },
    /// The destination refused the migration in its pre-flight.
    #[error("the destination refused ({kind}): {reason}")]
    Refused {
        /// The category.
        kind: &'static str,
        /// Its one-line reason.
        reason: String,
    },
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Pre-flight (nothing frozen, nothing changed): the migration is refused.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The driver refused the workload or failed to initialise.
    #[error(transparent)]
    Driver(#[from] crate::Error),
    /// CRIU could not be started or asked.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// The destination could not be reached or refused.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The journal cannot record the migration.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A check failed: what, and what to do.
    #[error("{0}")]
    Check(String),
    /// Interrupted before anything was frozen.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

/// Memory and file passes while the workload runs: nothing was frozen, the
/// destination discards what it received.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A CRIU pre-dump failed.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// The destination failed or went away.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// A driver hook failed.
    #[error(transparent)]
    Driver(#[from] crate::Error),
    /// The file sync failed.
    #[error("{0}")]
    FileSync(String),
    /// Anything else in a pass (CRIU's pre-dump loop, image directories).
    #[error("{0}")]
    Pass(String),
    /// Interrupted (Ctrl-C).
    #[error("interrupted: {0}")]
    Interrupted(String),
}

/// The hand-over (the workload frozen, or stopped in restart mode, the
/// destination restoring): every failure resumes the source.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// The final dump failed (or CRIU died).
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// The destination failed or went away.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// A driver hook failed.
    #[error(transparent)]
    Driver(#[from] crate::Error),
    /// The final file sync failed.
    #[error("{0}")]
    FileSync(String),
    /// Restart mode: processes of the tree still exist after the driver's
    /// `stop` (and after SIGKILL).
    #[error(
        "processes {} of the workload's tree still run after it was stopped, even after SIGKILL",
        .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotStopped(Vec<i32>),
    /// Reading or writing the images failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The decision could not be recorded, so it is not taken.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The workload stayed frozen longer than `--freeze-timeout`.
    #[error(
        "the workload was frozen for longer than --freeze-timeout ({}s) while {during}",
        .limit.as_secs_f64()
    )]
    FreezeTimeout {
        /// The limit.
        limit: Duration,
        /// What was awaited.
        during: &'static str,
    },
    /// CRIU ended the dump without the notification the hand-over needs.
    #[error("{0}")]
    Dump(String),
    /// Interrupted (Ctrl-C) while frozen.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

/// Between `Commit` and the destination's answer.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The destination says it could not let its copy run and discarded
    /// it: the source copy (stopped, intact) resumes.
    #[error("the destination could not resume the workload and discarded its copy: {0}")]
    Discarded(String),
    /// The connection broke (or Ctrl-C, or the deadline) and the
    /// destination could not be asked within `--resolve-timeout`.
    #[error("{why}; the destination could not be asked whether it runs the workload")]
    Undecided {
        /// What broke.
        why: String,
    },
    /// The destination answered that it does not know the session (its
    /// journal was lost): nobody can tell.
    #[error("{why}; the destination has no record of this migration")]
    Unknown {
        /// What broke.
        why: String,
    },
    /// Post-copy: the page transfer broke after the switch. The
    /// destination's copy runs but waits on the pages it lacks (none is
    /// made up); the source's copy is stopped and whole.
    #[error(
        "the post-copy page transfer broke after the switch: {why}. The destination's copy runs \
         but its threads wait on the pages it lacks (none is made up); this host's copy is \
         stopped and whole"
    )]
    PostCopyBroken {
        /// What broke.
        why: String,
    },
    /// The decision could not be recorded.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Why a failed migration was rolled back.
#[derive(Debug, thiserror::Error)]
pub enum RollbackCause {
    /// While copying (nothing was frozen).
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// While frozen.
    #[error(transparent)]
    HandOver(#[from] HandOverError),
    /// After `Commit`, the destination confirmed it does not run it.
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// How a migration failed, which decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Refused before anything was frozen; nothing changed.
    #[error("refused: {0}")]
    Refused(#[from] PreflightError),
    /// Failed and rolled back: the source workload runs as before.
    #[error("failed, the source workload was resumed: {0}")]
    RolledBack(RollbackCause),
    /// Failed, and the source workload does not run again (it vanished
    /// while frozen, or the migration failed after the point of no return).
    #[error("failed after the point of no return: {0}")]
    AfterCommit(String),
    /// Nobody could tell whether the destination runs the workload: the
    /// source copy is left stopped, and `phaul recover` decides.
    #[error(
        "undecided: {cause}. The source copy (pid {pid}) is left STOPPED so that it cannot run twice; \
         run `phaul recover` (it asks the destination again and then resumes or removes it)"
    )]
    Undecided {
        /// What happened.
        cause: CommitError,
        /// The source tree's root.
        pid: i32,
    },
}

impl MigrationError {
    /// Where the migration stood: `refused`, `rolled-back`,
    /// `failed-after-commit` or `undecided`.
    pub fn kind(&self) -> &'static str {
        match self {
            MigrationError::Refused(_) => "refused",
            MigrationError::RolledBack(_) => "rolled-back",
            MigrationError::AfterCommit(_) => "failed-after-commit",
            MigrationError::Undecided { .. } => "undecided",
        }
    }

    /// Whether the source workload runs again (exit code 4) — the only
    /// failure where nothing is left to do.
    pub fn source_runs(&self) -> bool {
        matches!(self, MigrationError::RolledBack(_))
    }
}

/// Where a failure came from, for `--json` and for people.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnosis {
    /// `preflight`, `copy`, `hand-over`, `commit` or `after-commit`.
    pub phase: &'static str,
    /// `source` or `destination`: where it failed.
    pub side: &'static str,
    /// The CRIU log that explains it (a path on `side`'s host).
    pub criu_log: Option<String>,
    /// phaul's explanation and what to do, when it knows one.
    pub hint: Option<String>,
}

fn criu_diag(e: &CriuError) -> (&'static str, Option<String>, Option<String>) {
    ("source", e.log().map(|p| p.display().to_string()), e.hint())
}

fn peer_diag(e: &PeerError) -> (&'static str, Option<String>, Option<String>) {
    match e {
        PeerError::Aborted {
            peer,
            criu_log,
            hint,
            ..
        } => (peer, criu_log.clone(), hint.clone()),
        PeerError::Refused { .. } => ("destination", None, None),
        PeerError::Tls {
            source: crate::transport::TlsError::Refused(_),
            ..
        } => (
            "destination",
            None,
            Some(
                "the destination decides whom it accepts: its CA (ca.pem in its --tls-dir) \
                 must have signed this host's certificate, and its --allow-peer list (if any) \
                 must name this host"
                    .into(),
            ),
        ),
        _ => ("source", None, None),
    }
}

impl MigrationError {
    /// Where the failure came from: phase, side, CRIU log, hint.
    pub fn diagnosis(&self) -> Diagnosis {
        let none = || ("source", None, None);
        let (phase, (side, criu_log, hint)) = match self {
            MigrationError::Refused(e) => (
                "preflight",
                match e {
                    PreflightError::Criu(c) => criu_diag(c),
                    PreflightError::Peer(p) => peer_diag(p),
                    _ => none(),
                },
            ),
            MigrationError::RolledBack(RollbackCause::Copy(e)) => (
                "copy",
                match e {
                    CopyError::Criu(c) => criu_diag(c),
                    CopyError::Peer(p) => peer_diag(p),
                    _ => none(),
                },
            ),
            MigrationError::RolledBack(RollbackCause::HandOver(e)) => (
                "hand-over",
                match e {
                    HandOverError::Criu(c) => criu_diag(c),
                    HandOverError::Peer(p) => peer_diag(p),
                    _ => none(),
                },
            ),
            MigrationError::RolledBack(RollbackCause::Commit(_)) => {
                ("commit", ("destination", None, None))
            }
            MigrationError::Undecided { .. } => ("commit", none()),
            MigrationError::AfterCommit(_) => ("after-commit", none()),
        };
        Diagnosis {
            phase,
            side,
            criu_log,
            hint,
        }
    }
}

impl From<CopyError> for MigrationError {
    fn from(e: CopyError) -> Self {
        MigrationError::RolledBack(e.into())
    }
}
