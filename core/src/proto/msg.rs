//! The control messages. One enum, so an unexpected message is always a
//! clear "expected X, got Y" error rather than a decoding accident.

use serde::{Deserialize, Serialize};

use crate::criu::stats::RestoreStats;
use crate::criu::CriuVersion;

/// How the workload moves (mirrors the plugin ABI's `Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Checkpoint/restore with CRIU.
    Live,
    /// Sync files, stop on the source, start on the destination.
    Restart,
}

/// The first control message: who the source is and what it wants moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// A random id naming this migration on both sides.
    pub session: u64,
    /// The source's phaul version.
    pub phaul_version: String,
    /// The source's plugin ABI version.
    pub abi_version: String,
    /// The source's CRIU version (none in restart mode, which needs no CRIU).
    pub criu_version: Option<CriuVersion>,
    /// The htype to migrate.
    pub htype: String,
    /// The workload id on the source.
    pub id: String,
    /// Live or restart.
    pub mode: MigrationMode,
    /// The driver options (both sides' drivers get them; the paths they
    /// make the destination write into are checked against its own
    /// policy, see [`crate::engine::dest`]).
    pub options: Vec<(String, String)>,
    /// `cpuinfo.img` from CRIU on the source (empty in restart mode).
    pub cpuinfo: Vec<u8>,
    /// Bytes the images will need in the destination work directory.
    pub need_bytes: u64,
    /// Skip the CPU and version checks.
    pub force: bool,
    /// Established TCP connections are dumped (TCP repair).
    pub tcp_established: bool,
    /// Keep the images on the destination after the migration.
    pub keep_images: bool,
    /// Directories the source will sync (the driver's `fs_sync`); the
    /// destination's driver must name the same ones.
    pub fs_roots: Vec<String>,
    /// Restart mode: leave the workload stopped on the destination.
    pub no_start: bool,
    /// Live mode: the ids the tree's processes will be restored with, when
    /// they must be free on the destination (empty for a tree in its own
    /// PID namespace).
    pub pids: Vec<i32>,
    /// Live mode: the tree's listening TCP and bound UDP sockets, when it
    /// shares the host's network namespace.
    pub bound: Vec<crate::engine::checks::BoundSocket>,
    /// Only check: the destination runs its pre-flight and answers, then
    /// the source ends the session (`--dry-run`).
    pub dry_run: bool,
    /// The final dump may leave private memory lazy (`--post-copy`): the
    /// destination must be able to restore with lazy pages.
    pub post_copy: bool,
    /// The source driver's `describe` answer, for the destination's
    /// driver's `init`.
    pub source_facts: Vec<(String, String)>,
}

/// The destination accepts the migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The destination's phaul version.
    pub phaul_version: String,
    /// The destination's CRIU version (none in restart mode).
    pub criu_version: Option<CriuVersion>,
    /// Free bytes in the destination's work directory.
    pub free_bytes: u64,
}

/// Why the destination refused, so the source can say it precisely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// phaul or plugin ABI versions differ.
    Version,
    /// The destination's CRIU is older than the source's.
    Criu,
    /// The htype has no driver on the destination.
    Htype,
    /// The CPU cannot run the source's processes.
    Cpu,
    /// Not enough free space for the images.
    Space,
    /// Another migration is running.
    Busy,
    /// Something the workload needs is taken on the destination (a
    /// process id, an address).
    InUse,
    /// The destination driver refused (init or mount failed).
    Driver,
    /// Anything else.
    Other,
    /// The destination's own policy does not allow it (an htype it does
    /// not accept, a file-sync root outside its allowed directories).
    Policy,
}

/// What became of a session, as the destination remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Still in progress.
    InProgress,
    /// The workload runs on the destination.
    Resumed,
    /// The destination discarded its copy.
    RolledBack,
    /// The destination never saw the session (or forgot it).
    Unknown,
}

/// The largest rate probe a destination reads.
pub const MAX_PROBE_BYTES: u64 = 256 << 20;

/// Every control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// Source -> destination, first frame of a migration.
    Hello(Box<Hello>),
    /// Destination -> source: go ahead.
    Welcome(Welcome),
    /// Destination -> source: refused before anything happened.
    Refused {
        /// The category.
        kind: Refusal,
        /// One line saying what does not match.
        reason: String,
    },
    /// Source -> destination, first frame of the memory connection.
    AttachMemory {
        /// The session it belongs to.
        session: u64,
    },
    /// Source -> destination, first frame of the file-sync connection.
    AttachFs {
        /// The session it belongs to.
        session: u64,
    },
    /// Source -> destination, restart mode: the workload is stopped and
    /// its files are final; start it there.
    Start {
        /// Files produced by the driver's `meta_files_out`.
        meta_files: Vec<String>,
    },
    /// Destination -> source, restart mode: started (pid 0 with
    /// `--no-start`).
    Started {
        /// The new root pid.
        pid: i32,
    },
    /// Source -> destination: start a page server for memory pass `iter`
    /// (pass `parent` holds the pages it builds on).
    StartIter {
        /// The pass number, from 1.
        iter: u32,
        /// The previous pass, for incremental pre-dumps.
        parent: Option<u32>,
        /// A lazy final dump (post-copy): no pages on the memory channel
        /// now, the private memory follows after the switch.
        lazy: bool,
    },
    /// Destination -> source: the page server for `iter` listens.
    IterReady {
        /// The pass number.
        iter: u32,
    },
    /// Source -> destination: an image or meta file follows in chunks.
    File {
        /// Plain file name (no directories).
        name: String,
        /// Permission bits.
        mode: u32,
        /// Total size.
        size: u64,
    },
    /// A piece of the current file.
    Chunk(#[serde(with = "serde_bytes_compat")] Vec<u8>),
    /// Source -> destination: all images are there; restore from pass
    /// `iter`'s directory.
    Restore {
        /// The last pass.
        iter: u32,
        /// Files produced by the driver's `meta_files_out`.
        meta_files: Vec<String>,
    },
    /// Destination -> source: restored, held frozen with its network
    /// locked, waiting for [`Msg::Commit`].
    Restored,
    /// Source -> destination: let it run. From here on the source never
    /// resumes its copy on its own.
    Commit,
    /// Destination -> source: the workload runs on the destination (the
    /// point of no return).
    Resumed {
        /// The restored root's pid on the destination.
        pid: i32,
        /// CRIU's restore statistics.
        stats: Option<RestoreStats>,
        /// Wall time of the restore request, microseconds.
        restore_us: u64,
    },
    /// Either side: stop and roll back.
    Abort {
        /// Why, in one line.
        reason: String,
        /// The sender's CRIU log that explains it (a path on the sender's
        /// host, kept after the migration).
        criu_log: Option<String>,
        /// The sender's explanation and what to do, when it knows one.
        hint: Option<String>,
    },
    /// Source -> destination, on a fresh connection: what happened to a
    /// session whose connection broke?
    Query {
        /// The session.
        session: u64,
    },
    /// Source -> destination, live mode, between memory passes: `bytes`
    /// of filler follow on the memory channel, to measure its rate
    /// (`--post-copy=auto` without a pre-dump to measure it by).
    Probe {
        /// How many bytes follow (at most [`MAX_PROBE_BYTES`]).
        bytes: u64,
    },
    /// Destination -> source: the probe's bytes all arrived.
    ProbeDone,
    /// Source -> destination, live mode, while the workload runs (and
    /// once more frozen): userfaultfd pre-copy pass `pass` follows on the
    /// memory channel ([`crate::precopy`]), ending with its `End` frame.
    PreCopy {
        /// The pass number, from 1.
        pass: u32,
    },
    /// Destination -> source: pass `pass` is stored (`pages` data pages
    /// held in all).
    PreCopied {
        /// The pass number.
        pass: u32,
        /// Pages the destination holds now.
        pages: u64,
    },
    /// Source -> destination, on a fresh connection (`phaul recover`):
    /// resume the broken post-copy transfer of `session`; after
    /// [`Msg::ResumeReady`] the connection carries the page protocol.
    ResumePages {
        /// The session.
        session: u64,
    },
    /// Destination -> source: the copy is there and waits for `missing`
    /// pages; the page protocol follows.
    ResumeReady {
        /// Pages it still lacks.
        missing: u64,
    },
    /// Destination -> source: the answer to [`Msg::Query`].
    Status {
        /// The session.
        session: u64,
        /// Its outcome.
        outcome: Outcome,
    },
}

impl Msg {
    /// A short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "Hello",
            Msg::Welcome(_) => "Welcome",
            Msg::Refused { .. } => "Refused",
            Msg::AttachMemory { .. } => "AttachMemory",
            Msg::AttachFs { .. } => "AttachFs",
            Msg::Start { .. } => "Start",
            Msg::Started { .. } => "Started",
            Msg::StartIter { .. } => "StartIter",
            Msg::IterReady { .. } => "IterReady",
            Msg::File { .. } => "File",
            Msg::Chunk(_) => "Chunk",
            Msg::Restore { .. } => "Restore",
            Msg::Restored => "Restored",
            Msg::Commit => "Commit",
            Msg::Resumed { .. } => "Resumed",
            Msg::Abort { .. } => "Abort",
            Msg::Query { .. } => "Query",
            Msg::Status { .. } => "Status",
            Msg::Probe { .. } => "Probe",
            Msg::ProbeDone => "ProbeDone",
            Msg::PreCopy { .. } => "PreCopy",
            Msg::PreCopied { .. } => "PreCopied",
            Msg::ResumePages { .. } => "ResumePages",
            Msg::ResumeReady { .. } => "ResumeReady",
        }
    }
}

/// Byte vectors as one length-prefixed blob (postcard already does this for
/// `Vec<u8>`; the module keeps the intent visible and the encoding fixed).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}
