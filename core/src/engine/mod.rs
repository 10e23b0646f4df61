//! The migration engine: a live migration of one workload from a source
//! host ([`source::migrate`]) to a destination service
//! ([`dest::serve_session`]), with an htype driver on each side.
//!
//! # The invariant
//!
//! **After any migration attempt, whatever single process dies — the
//! source `phaul`, the destination `phaul`, either CRIU worker — or the
//! connection breaks, and whenever, at most one copy of the workload runs
//! and at least one copy exists. When a copy is left stopped because the
//! outcome cannot be decided locally, `phaul recover` ([`recover`])
//! resolves it.**
//!
//! What makes it true:
//!
//! - Before the source sends `Commit` it records `Committing` in its
//!   journal ([`crate::journal`], fsynced) and queues SIGSTOP to every task
//!   of the frozen tree. CRIU resumes a tree whose RPC peer dies at
//!   `post-dump`, so from this point a dying source `phaul` leaves its
//!   copy stopped, never running. Only a confirmed rollback (the
//!   destination says it discarded its copy) sends SIGCONT; only the
//!   destination's `Resumed` (or its answer to a query) kills it.
//! - The destination's copy is held at CRIU's `post-restore` (restored,
//!   network locked, never ran) until `Commit` arrives. If the destination
//!   `phaul` dies while holding, CRIU loses its RPC peer and kills the copy;
//!   if the destination's CRIU dies, the copy is stuck in CRIU's restorer
//!   and never runs, and the abandon path kills it. The destination records
//!   `Restored` before it says so and `Committing` before it lets CRIU
//!   release the copy, so a restarted `phaul serve` answers "what became
//!   of session S" from its journal: a held copy that never ran is
//!   discarded, a committed copy that is alive runs there.
//! - "Unknown" is never read as "discarded": a source that cannot get a
//!   definite answer leaves its copy stopped and says how to decide.
//! - Every wait while the workload is frozen has a deadline
//!   (`--freeze-timeout`): before the commit its expiry rolls back, after
//!   it the source asks the destination. Ctrl-C before the commit rolls
//!   back; after it, it makes the source ask instead of wait.
//!
//! # Phases, and what a failure does in each
//!
//! The source moves through types ([`source`]): pre-flight, connected,
//! copied, frozen, restored, committed; the destination through the states
//! of [`dest::State`], one step function and one abandon path. Errors are
//! typed per phase ([`error`]); which phase failed decides the outcome.
//!
//! 1. **Pre-flight** (nothing frozen, nothing changed). The source loads
//!    the driver, validates the workload, starts its CRIU worker, checks
//!    pre-dump support, dumps its CPU description, connects, and sends the
//!    handshake; the destination checks protocol, phaul and plugin ABI
//!    versions, that the htype exists, that its CRIU is the same or newer,
//!    the CPU (CRIU `cpuinfo check`), and free space, then initialises its
//!    driver, starts its own CRIU workers (so their start-up is not paid
//!    while the workload is frozen) and records the session. *Failure*:
//!    the migration is refused with a message naming the mismatch; exit
//!    code 3.
//! 2. **Memory passes** (workload running). With pre-dumps, each pass
//!    copies memory to a destination page server while the workload runs,
//!    until a stop rule fires ([`iter`]). *Failure*: the workload never
//!    stopped; the destination discards its images; exit code 4.
//! 3. **Final dump** (workload frozen, network locked). The source records
//!    the tree, CRIU freezes it, streams the remaining pages and stops at
//!    `post-dump` ([`dump`]), where the engine holds it while the remaining
//!    images go over and the destination restores up to its own
//!    `post-restore`. *Failure* (destination dies, connection drops,
//!    restore fails, a driver hook fails, the freeze deadline, Ctrl-C): the
//!    source answers `post-dump` with failure, CRIU resumes the tree and
//!    unlocks its network exactly as it was; the destination's copy is
//!    killed; exit code 4.
//! 4. **Commit**. The source records `Committing`, stops its tree (SIGSTOP)
//!    and sends `Commit`; the destination records it, lets its copy run and
//!    reports `Resumed`. *Failure*: if the destination cannot let its copy
//!    run, it discards it and says so, and the source resumes; exit 4.
//!    With `--post-copy` ([`crate::postcopy`]) the final dump leaves the
//!    private memory behind and the commit is the switch: from `Commit`
//!    on, the destination's copy runs and fetches its pages from the
//!    source's stopped copy; both journals say `PostCopy` until every page
//!    has arrived, and `phaul recover` resumes a broken transfer.
//! 5. **Point of no return**: the source receives `Resumed`, records
//!    `Migrated`, answers `post-dump` with success and CRIU kills the
//!    source copy (TCP sockets stay in repair mode, so peers see no reset).
//!    If the answer does not come, the source asks the destination on new
//!    connections (for `--resolve-timeout`); without a definite answer the
//!    source copy stays stopped and the migration ends *undecided* (exit 5)
//!    until `phaul recover` asks again.

pub mod abort;
pub mod checks;
pub mod dest;
pub mod dryrun;
pub mod dump;
pub mod error;
pub mod fs;
pub mod hold;
pub mod iter;
pub mod pages;
pub mod predump;
pub mod recover;
pub mod report;
pub mod restart;
pub mod session;
pub mod source;
#[cfg(test)]
mod tests;
mod uffdcopy;

pub use error::MigrationError;

use phaul_plugin_api::{CgroupMode, CriuOpts, InitContext, KeyValue, Mode, NetworkLock, Side};

use crate::plugins::EngineHost;
use crate::proto::MigrationMode;
use crate::workdir::WorkDir;

use crate::conn::Conn;
use crate::criu::rpc;

/// How to pre-copy memory while the workload runs (`--pre-copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreDump {
    /// CRIU pre-dumps when the kernel tracks soft-dirty bits; else
    /// userfaultfd pre-copy when post-copy was asked for and the kernel
    /// can; else none.
    Auto,
    /// CRIU pre-dumps (soft-dirty); refuse the migration if impossible.
    Force,
    /// Userfaultfd write-protect tracking ([`crate::precopy`]); the last
    /// dirty set follows after the switch (post-copy). Refused if
    /// impossible.
    Uffd,
    /// Never: all memory moves in the final dump.
    Never,
}

/// How the source reaches the destination.
#[derive(Debug)]
pub enum Connector {
    /// Connect to a `phaul serve` (a control connection, a memory
    /// connection in live mode, a file connection when files are synced),
    /// over mutual TLS or, on loopback, `--insecure` TCP.
    Tcp(crate::transport::Remote),
    /// Connections the embedder already has.
    Given {
        /// The control channel.
        control: Conn,
        /// The memory channel.
        mem: Conn,
        /// The file-sync channel (needed when directories are synced).
        fs: Option<Conn>,
    },
}

impl Connector {
    /// For the report.
    pub fn describe(&self) -> String {
        match self {
            Connector::Tcp(r) => r.addr.to_string(),
            Connector::Given { .. } => "given connections".to_string(),
        }
    }

    /// How the connections are secured, for the report: mutual TLS through
    /// phaul's relay (and whether this kernel could have done TLS itself),
    /// plain TCP, or the embedder's own connections.
    pub fn transport(&self) -> String {
        match self {
            Connector::Tcp(r) if r.encrypted() => format!(
                "mutual TLS 1.3, pages relayed through phaul ({})",
                match crate::transport::kernel_tls() {
                    true => "this kernel has TLS offload, which this version does not use yet",
                    false => "this kernel has no TLS offload",
                }
            ),
            Connector::Tcp(_) => "plain TCP (--insecure)".to_string(),
            Connector::Given { .. } => "connections handed in by the embedder".to_string(),
        }
    }
}

/// CRIU behaviours every htype shares, chosen with `-o KEY[=VALUE]` like
/// driver options (the engine takes them out before the driver sees the
/// rest). The defaults are those of a tool for ordinary programs:
///
/// - `file-locks` (on): POSIX, `flock` and OFD locks are dumped and
///   restored. Off, CRIU refuses any tree holding a lock ("Some file
///   locks are hold by dumping tasks"); on, it costs nothing when there is
///   none. P.Haul and LXC set it always.
/// - `link-remap` (on): a file open under a path that was removed while
///   another hard link remains is re-linked for the restore. Off, CRIU
///   refuses such a tree ("Can't create link remap ... Use link-remap
///   option"); on, CRIU creates a `link_remap.N` link next to the file
///   while frozen (it travels with the file sync).
/// - `ghost-limit=BYTES` (16 MiB): a deleted file still open (a rotated
///   log, a temporary file) is copied into the images up to this size.
///   CRIU's own default, 1 MiB, refuses a larger one ("Can't dump ghost
///   file ... increase limit"); the cost is copying the file while frozen.
/// - `evasive-devices` (off): use another path to a device file whose path
///   is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CriuDefaults {
    /// Dump and restore file locks.
    pub file_locks: bool,
    /// Re-link files removed while open but still linked elsewhere.
    pub link_remap: bool,
    /// Largest deleted-but-open file copied into the images.
    pub ghost_limit: u32,
    /// Use any path to a device whose path is gone.
    pub evasive_devices: bool,
}

impl Default for CriuDefaults {
    fn default() -> Self {
        Self {
            file_locks: true,
            link_remap: true,
            ghost_limit: 16 << 20,
            evasive_devices: false,
        }
    }
}

impl CriuDefaults {
    /// The option keys the engine takes.
    pub const KEYS: &'static [&'static str] =
        &["file-locks", "link-remap", "ghost-limit", "evasive-devices"];

    /// Takes the engine's keys out of `options`; returns them parsed and
    /// the rest (the driver's).
    pub fn split(
        options: &[(String, String)],
    ) -> Result<(CriuDefaults, Vec<(String, String)>), String> {
        let mut d = CriuDefaults::default();
        let mut rest = Vec::new();
        let flag = |k: &str, v: &str| match v {
            "" | "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            other => Err(format!("option {k}={other}: expected true or false")),
        };
        for (k, v) in options {
            match k.as_str() {
                "file-locks" => d.file_locks = flag(k, v)?,
                "link-remap" => d.link_remap = flag(k, v)?,
                "evasive-devices" => d.evasive_devices = flag(k, v)?,
                "ghost-limit" => {
                    d.ghost_limit = v
                        .parse()
                        .map_err(|_| format!("option ghost-limit={v}: expected a size in bytes"))?
                }
                _ => rest.push((k.clone(), v.clone())),
            }
        }
        Ok((d, rest))
    }

    /// Sets them in a request's options (the driver adjusts after).
    pub fn apply(&self, c: &mut CriuOpts) {
        c.file_locks = self.file_locks;
        c.link_remap = self.link_remap;
        c.evasive_devices = self.evasive_devices;
    }

    /// What does not cross the plugin boundary (a driver's larger
    /// `ghost-limit`, set before, stays).
    pub fn apply_rpc(&self, o: &mut rpc::Opts) {
        o.ghost_limit = Some(o.ghost_limit.unwrap_or(0).max(self.ghost_limit));
    }
}

/// What a driver instance is initialised with.
pub(crate) fn init_context(
    side: Side,
    mode: MigrationMode,
    id: &str,
    options: &[(String, String)],
    source_facts: &[(String, String)],
    work: &WorkDir,
    host: EngineHost,
) -> InitContext {
    InitContext {
        side,
        mode: match mode {
            MigrationMode::Live => Mode::Live,
            MigrationMode::Restart => Mode::Restart,
        },
        id: id.into(),
        options: options.iter().map(|(k, v)| KeyValue::new(k, v)).collect(),
        work_dir: work.driver().display().to_string().into(),
        host: host.into_box(),
        source_facts: source_facts
            .iter()
            .map(|(k, v)| KeyValue::new(k, v))
            .collect(),
    }
}

/// Copies the driver-adjustable CRIU options into an RPC request.
pub fn criu_opts_to_rpc(c: &CriuOpts, o: &mut rpc::Opts) {
    if let Some(root) = c.root.as_ref().into_option() {
        o.root = Some(root.to_string());
    }
    o.external.extend(c.external.iter().map(|s| s.to_string()));
    o.skip_mnt.extend(c.skip_mnt.iter().map(|s| s.to_string()));
    o.enable_fs
        .extend(c.enable_fs.iter().map(|s| s.to_string()));
    o.irmap_scan_paths
        .extend(c.irmap_scan_paths.iter().map(|s| s.to_string()));
    o.manage_cgroups_mode = match c.cgroup_mode {
        CgroupMode::Default => None,
        CgroupMode::Ignore => Some(rpc::CgMode::Ignore as i32),
        CgroupMode::Props => Some(rpc::CgMode::Props as i32),
        CgroupMode::Soft => Some(rpc::CgMode::Soft as i32),
        CgroupMode::Full => Some(rpc::CgMode::Full as i32),
        CgroupMode::Strict => Some(rpc::CgMode::Strict as i32),
    };
    if let Some(f) = c.freeze_cgroup.as_ref().into_option() {
        o.freeze_cgroup = Some(f.to_string());
    }
    if let Some(l) = c.lsm_profile.as_ref().into_option() {
        o.lsm_profile = Some(l.to_string());
    }
    o.network_lock = Some(match c.network_lock {
        NetworkLock::Nftables => rpc::NetworkLockMethod::Nftables,
        NetworkLock::Iptables => rpc::NetworkLockMethod::Iptables,
        NetworkLock::Skip => rpc::NetworkLockMethod::Skip,
    } as i32);
    let flag = |b: bool| b.then_some(true);
    o.tcp_established = flag(c.tcp_established);
    o.shell_job = flag(c.shell_job);
    o.ext_unix_sk = flag(c.ext_unix_sk);
    o.file_locks = flag(c.file_locks);
    o.link_remap = flag(c.link_remap);
    o.force_irmap = flag(c.force_irmap);
    o.evasive_devices = flag(c.evasive_devices);
    o.orphan_pts_master = flag(c.orphan_pts_master);
    if c.empty_ns != 0 {
        o.empty_ns = Some(c.empty_ns);
    }
    for kv in c.extra.iter() {
        let (key, value) = (kv.key.as_str(), kv.value.as_str());
        match key {
            "cgroup-root" => o.cg_root.push(match value.split_once(':') {
                Some((ctrl, path)) => rpc::CgroupRoot {
                    ctrl: Some(ctrl.to_string()),
                    path: path.to_string(),
                },
                None => rpc::CgroupRoot {
                    ctrl: None,
                    path: value.to_string(),
                },
            }),
            "auto-ext-mnt" => o.auto_ext_mnt = Some(true),
            "ext-sharing" => o.ext_sharing = Some(true),
            "ext-masters" => o.ext_masters = Some(true),
            "tcp-skip-in-flight" => o.tcp_skip_in_flight = Some(true),
            "timeout" => match value.parse() {
                Ok(s) => o.timeout = Some(s),
                Err(_) => tracing::warn!("ignoring the driver's CRIU option timeout={value}"),
            },
            "ghost-limit" => match value.parse() {
                Ok(b) => o.ghost_limit = Some(b),
                Err(_) => tracing::warn!("ignoring the driver's CRIU option ghost-limit={value}"),
            },
            "cgroup-dump-controller" => o.cgroup_dump_controller.push(value.to_string()),
            other => tracing::warn!(
                "ignoring the driver's CRIU option `{other}`: this engine does not know it"
            ),
        }
    }
}
