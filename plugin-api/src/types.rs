//! Plain data that crosses the plugin boundary: driver identity and
//! capabilities, errors, the context a driver is initialised with, the CRIU
//! options a driver may adjust, and what a driver wants synchronised.
//!
//! Every type here is `#[repr(C)]` or `#[repr(transparent)]` and derives
//! [`StableAbi`], so the engine checks its layout when it loads a plugin.
//! Sets that will grow (capabilities, error codes) are newtypes over integers
//! rather than Rust enums, so adding a value later is not an ABI break.

use abi_stable::std_types::{ROption, RString, RVec};
use abi_stable::StableAbi;
use std::fmt;

use crate::host::HostBox;

/// Which end of a migration a hook runs on.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The host the workload runs on when the migration starts.
    Source,
    /// The host the workload runs on when the migration succeeds.
    Destination,
}

/// How the workload is moved.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Checkpoint with CRIU and restore: the processes keep their state and
    /// only pause for the final dump ("live migration").
    Live,
    /// Sync the filesystem, stop the workload on the source, start it afresh
    /// on the destination. No CRIU involved; the processes restart.
    Restart,
}

/// What a driver can do, as a set of flags. Unknown bits are ignored by
/// older engines, so new capabilities can be added without an ABI break.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Memory can be pre-copied with CRIU pre-dumps while the workload runs
    /// (the engine still checks that the kernel can track dirty memory).
    pub const PRE_DUMP: Self = Self(1 << 0);
    /// Established TCP connections can be checkpointed and restored (TCP
    /// repair); the engine then allows `--tcp-established`.
    pub const TCP_ESTABLISHED: Self = Self(1 << 1);
    // Bit 2 was PAGE_SERVER, which the engine never read (memory always
    // travels to a page server): it is not reused.
    /// The driver supports [`Mode::Live`].
    pub const LIVE: Self = Self(1 << 3);
    /// The driver supports [`Mode::Restart`] (`stop` and `start` hooks).
    pub const RESTART: Self = Self(1 << 4);
    /// The driver's storage can be shared between the hosts and snapshotted
    /// for rollback (`storage_*` hooks); the engine refuses a driver that
    /// answers `fs_sync` with shared storage without this bit.
    pub const SHARED_STORAGE: Self = Self(1 << 5);

    /// The driver checkpoints through its own tooling (its `dump` hook runs
    /// CRIU, e.g. through a container engine): the engine calls `dump` with
    /// an action script and holds the frozen tree through it.
    pub const OWN_DUMP: Self = Self(1 << 6);
    /// The driver restores through its own tooling (its `restore` hook runs
    /// CRIU, e.g. `lxc-checkpoint -r`): the engine calls `restore` with an
    /// action script and holds the restored copy through it until the
    /// commit.
    pub const OWN_RESTORE: Self = Self(1 << 7);

    const NAMES: [(Self, &'static str); 7] = [
        (Self::OWN_DUMP, "own-dump"),
        (Self::OWN_RESTORE, "own-restore"),
        (Self::PRE_DUMP, "pre-dump"),
        (Self::TCP_ESTABLISHED, "tcp-established"),
        (Self::LIVE, "live"),
        (Self::RESTART, "restart"),
        (Self::SHARED_STORAGE, "shared-storage"),
    ];

    /// The empty set.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The union of two sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every flag of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the flags that are set, in a fixed order (unknown bits
    /// are left out).
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name)
            .collect()
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

/// Who a driver is and what it can do. Returned by the plugin's `info`
/// entry point and by [`crate::Driver::info`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct DriverInfo {
    /// The htype name users type on the command line (`pid`, `lxc`, ...).
    /// Must be unique among the loaded plugins.
    pub name: RString,
    /// The driver's own version (usually its crate version).
    pub version: RString,
    /// One line saying what kind of workload the driver moves.
    pub description: RString,
    /// What the driver supports.
    pub capabilities: Capabilities,
}

/// Why a driver hook failed. Extensible: compare against the associated
/// constants and treat unknown codes as [`ErrorCode::FAILED`].
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// The operation was attempted and failed.
    pub const FAILED: Self = Self(1);
    /// The driver does not implement this hook or mode.
    pub const UNSUPPORTED: Self = Self(2);
    /// An option or the workload id given by the user is wrong.
    pub const INVALID_ARGUMENT: Self = Self(3);
    /// The workload (process, container) does not exist.
    pub const NOT_FOUND: Self = Self(4);
    /// The hook panicked; the panic was caught inside the plugin.
    pub const PANICKED: Self = Self(5);
}

/// The error every driver hook returns: a code and a one-line message that
/// says what failed and, where possible, what to do about it.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct DriverError {
    /// The kind of failure.
    pub code: ErrorCode,
    /// Human-readable, one line.
    pub message: RString,
}

impl DriverError {
    /// An error with an explicit code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: RString::from(message.into()),
        }
    }

    /// [`ErrorCode::FAILED`] with a message.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FAILED, message)
    }

    /// [`ErrorCode::UNSUPPORTED`] naming what is not supported.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(ErrorCode::UNSUPPORTED, what)
    }

    /// [`ErrorCode::INVALID_ARGUMENT`] with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::INVALID_ARGUMENT, message)
    }

    /// [`ErrorCode::NOT_FOUND`] with a message.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NOT_FOUND, message)
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DriverError {}

/// The result type of every driver hook.
pub type DriverResult<T> = Result<T, DriverError>;

/// One `key=value` driver option (`phaul migrate ... -o key=value`).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// Option name.
    pub key: RString,
    /// Option value (empty for flags given as `-o key`).
    pub value: RString,
}

impl KeyValue {
    /// Builds a pair.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: RString::from(key.into()),
            value: RString::from(value.into()),
        }
    }
}

/// The value of a boolean driver option (`-o key`, `-o key=true|false`,
/// also `1`/`0`, `yes`/`no`, `on`/`off`), or an error naming it.
pub fn flag_option(key: &str, value: &str) -> DriverResult<bool> {
    match value {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(DriverError::invalid(format!(
            "option {key}={other}: expected a boolean (true/false)"
        ))),
    }
}

/// Everything a driver is told when the engine creates it for a migration.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct InitContext {
    /// Which end this driver instance serves.
    pub side: Side,
    /// The migration mode.
    pub mode: Mode,
    /// The workload id the user named on the source (`4242` for the pid
    /// htype, a container name for container htypes). The destination gets
    /// the same id.
    pub id: RString,
    /// The user's `-o key=value` options, in the order given. The same
    /// options reach both sides. `phaul migrate --sync DIR` and
    /// `--shared-storage` arrive here as `sync=DIR` (one per directory) and
    /// `shared-storage`; the engine's own CRIU options (`file-locks`,
    /// `link-remap`, `ghost-limit`, `evasive-devices`) are taken out before.
    pub options: RVec<KeyValue>,
    /// This side's private scratch directory for the migration (exists,
    /// empty, removed with the migration's work directory).
    pub work_dir: RString,
    /// Engine services the driver may call.
    pub host: HostBox,
    /// Destination: the source driver's answer to
    /// [`Driver::describe`](crate::Driver::describe), as it sent it.
    /// Empty on the source.
    pub source_facts: RVec<KeyValue>,
}

impl InitContext {
    /// The value of option `key`, if given (the last one wins).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str())
    }

    /// Destination: the source driver's fact `key`, if it sent one (the
    /// last one wins).
    pub fn source_fact(&self, key: &str) -> Option<&str> {
        self.source_facts
            .iter()
            .rev()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str())
    }

    /// Every value given for option `key`, in order.
    pub fn options_named<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.options
            .iter()
            .filter(move |kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str())
    }
}

/// How CRIU locks the network of the dumped tree.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkLock {
    /// nftables (the engine's default: CRIU is built with libnftables).
    Nftables,
    /// iptables (needs the iptables binaries).
    Iptables,
    /// No locking; the driver locks the network in `net_lock` itself.
    Skip,
}

/// How CRIU treats cgroups.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// CRIU's default for the request.
    Default,
    /// Do not touch cgroups.
    Ignore,
    /// Restore cgroup properties only.
    Props,
    /// Create missing cgroups, keep existing ones.
    Soft,
    /// Restore everything.
    Full,
    /// Fail on any mismatch.
    Strict,
}

/// The CRIU options a driver may adjust before a dump or restore. The
/// engine fills in what it owns (image directories, page server, notify
/// scripts, log file); the driver adds what its workload needs.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct CriuOpts {
    /// Root directory of the restored tree (`--root`).
    pub root: ROption<RString>,
    /// External resources (`--external`), e.g. `mnt[/data]:data`,
    /// `veth[eth0]:host-end@br0`, `dev[...]`.
    pub external: RVec<RString>,
    /// Mount points to skip (`--skip-mnt`).
    pub skip_mnt: RVec<RString>,
    /// Extra filesystems to allow (`--enable-fs`).
    pub enable_fs: RVec<RString>,
    /// Paths to scan for inotify watch targets (`--irmap-scan-path`).
    pub irmap_scan_paths: RVec<RString>,
    /// cgroup handling (`--manage-cgroups`).
    pub cgroup_mode: CgroupMode,
    /// Freeze the tree with this cgroup instead of ptrace (`--freeze-cgroup`).
    pub freeze_cgroup: ROption<RString>,
    /// LSM profile to restore with (`--lsm-profile`).
    pub lsm_profile: ROption<RString>,
    /// Network locking method (`--network-lock`).
    pub network_lock: NetworkLock,
    /// Dump/restore established TCP connections (`--tcp-established`).
    /// Set by the engine from the user's choice; a driver may clear it.
    pub tcp_established: bool,
    /// The tree is a shell job with a controlling terminal (`--shell-job`).
    pub shell_job: bool,
    /// Allow external unix sockets (`--ext-unix-sk`).
    pub ext_unix_sk: bool,
    /// Dump file locks (`--file-locks`).
    pub file_locks: bool,
    /// Remap unlinked-but-open files with links (`--link-remap`).
    pub link_remap: bool,
    /// Resolve inotify targets by path (`--force-irmap`); the engine sets it
    /// when files are copied, since inodes then change.
    pub force_irmap: bool,
    /// Tolerate devices whose node cannot be found (`--evasive-devices`).
    pub evasive_devices: bool,
    /// Let CRIU take over the master side of orphaned ptys.
    pub orphan_pts_master: bool,
    /// Namespaces to create empty on restore (CLONE_NEW* flags).
    pub empty_ns: u32,
    /// Further CRIU options, by name (engines that do not know a key log
    /// it and leave it out). Known since plugin-api 0.2: `cgroup-root`
    /// (`CTRL:PATH`, or `PATH` for every controller; `--cgroup-root`,
    /// repeatable), `auto-ext-mnt` (`--ext-mount-map auto`), `ext-sharing`
    /// (`--enable-external-sharing`), `ext-masters`
    /// (`--enable-external-masters`), `tcp-skip-in-flight`
    /// (`--skip-in-flight`), `timeout` (seconds, `--timeout`),
    /// `ghost-limit` (bytes; the larger of it and the user's
    /// `-o ghost-limit` applies), `cgroup-dump-controller` (`CTRL`,
    /// repeatable). Values are empty for flags.
    pub extra: RVec<KeyValue>,
}

impl Default for CriuOpts {
    fn default() -> Self {
        Self {
            root: ROption::RNone,
            external: RVec::new(),
            skip_mnt: RVec::new(),
            enable_fs: RVec::new(),
            irmap_scan_paths: RVec::new(),
            cgroup_mode: CgroupMode::Default,
            freeze_cgroup: ROption::RNone,
            lsm_profile: ROption::RNone,
            network_lock: NetworkLock::Nftables,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            link_remap: false,
            force_irmap: false,
            evasive_devices: false,
            orphan_pts_master: false,
            empty_ns: 0,
            extra: RVec::new(),
        }
    }
}

/// What the engine hands a driver's `dump` hook.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct DumpContext {
    /// Directory the images must be written to (this side's work dir).
    pub images_dir: RString,
    /// The previous pre-dump's images, for incremental dumps.
    pub parent_images_dir: ROption<RString>,
    /// The pid to dump (from `root_task_pid`).
    pub pid: i32,
    /// The options after `adjust_dump_opts`.
    pub opts: CriuOpts,
    /// For a driver that dumps itself ([`Capabilities::OWN_DUMP`]): the
    /// action script its CRIU must run (`--action-script PATH`); through it
    /// the engine holds the frozen tree at `post-dump` until the commit.
    /// Empty when the engine runs CRIU.
    pub action_script: RString,
    /// The same as a CRIU configuration file (`action-script PATH`), for
    /// tools that start CRIU themselves and honour `CRIU_CONFIG_FILE`
    /// (LXC does). Empty when the engine runs CRIU.
    pub criu_config: RString,
}

/// What the engine hands a driver's `restore` hook.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct RestoreContext {
    /// Directory holding the complete image set.
    pub images_dir: RString,
    /// The options after `adjust_restore_opts`.
    pub opts: CriuOpts,
    /// For a driver that restores itself ([`Capabilities::OWN_RESTORE`]):
    /// the action script its CRIU must run; through it the engine holds the
    /// restored copy at `post-restore` (never running) until the commit.
    /// Empty when the engine runs CRIU.
    pub action_script: RString,
    /// The same as a CRIU configuration file, for `CRIU_CONFIG_FILE`.
    pub criu_config: RString,
}

/// A driver's answer to `dump`/`restore`: do it itself, or let the engine.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookOutcome {
    /// `true`: the driver did the work. `false`: the engine runs its own
    /// CRIU request (the usual case).
    pub handled: bool,
    /// For `restore` handled by the driver: the pid of the restored root.
    /// For a driver's own restore ([`Capabilities::OWN_RESTORE`]), which
    /// returns before CRIU restored anything: the pid of its tooling's
    /// process (e.g. `lxc-checkpoint`), or 0. The engine watches it: if it
    /// ends before CRIU's `post-restore`, the restore failed, and the
    /// engine asks `restore_wait` why at once instead of waiting for its
    /// deadline.
    pub pid: i32,
}

impl HookOutcome {
    /// Let the engine do it.
    pub const ENGINE_DEFAULT: Self = Self {
        handled: false,
        pid: 0,
    };

    /// The driver did it (and, for restore, this is the restored root).
    pub const fn handled(pid: i32) -> Self {
        Self { handled: true, pid }
    }
}

/// What must reach the destination's filesystem for the workload to run
/// there.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsSyncKind {
    /// The workload needs no files moved.
    Nothing,
    /// Copy the listed directory subtrees (iteratively, then once more
    /// while the workload is frozen).
    Paths,
    /// The files live on storage both hosts see: nothing to copy, and the
    /// engine snapshots the storage before the final step for rollback.
    SharedStorage,
}

/// The answer of the `fs_sync` hook.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FsSyncSpec {
    /// What to do.
    pub kind: FsSyncKind,
    /// Absolute directory paths, for [`FsSyncKind::Paths`].
    pub paths: RVec<RString>,
    /// Whether files keep their inode numbers on the destination (shared
    /// storage, block-level copies). When `false` the engine asks CRIU to
    /// resolve inotify watches by path.
    pub inodes_persistent: bool,
}

impl FsSyncSpec {
    /// Nothing to move.
    pub fn nothing() -> Self {
        Self {
            kind: FsSyncKind::Nothing,
            paths: RVec::new(),
            inodes_persistent: true,
        }
    }

    /// Copy these directories.
    pub fn paths<I, S>(paths: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            kind: FsSyncKind::Paths,
            paths: paths.into_iter().map(|p| RString::from(p.into())).collect(),
            inodes_persistent: false,
        }
    }

    /// Shared storage: nothing to copy.
    pub fn shared_storage() -> Self {
        Self {
            kind: FsSyncKind::SharedStorage,
            paths: RVec::new(),
            inodes_persistent: true,
        }
    }
}

/// The result of [`crate::host::Host::run_command`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct CommandOutput {
    /// Exit status (or 128 + signal number).
    pub status: i32,
    /// Captured standard output.
    pub stdout: RString,
    /// Captured standard error.
    pub stderr: RString,
}

/// Log levels for [`crate::host::Host::log`].
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// A step of the migration.
    Info,
    /// Detail for debugging.
    Debug,
}

/// A hook that needs longer than the engine's deadline for it
/// ([`Driver::deadlines`](crate::Driver::deadlines)).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct HookDeadline {
    /// The hook's name, as in the [`Driver`](crate::Driver) trait
    /// (`net_lock`, `restore`, ...).
    pub hook: RString,
    /// How long it may take, seconds.
    pub seconds: u32,
}

impl HookDeadline {
    /// `hook` may take `seconds`.
    pub fn new(hook: &str, seconds: u32) -> Self {
        Self {
            hook: RString::from(hook),
            seconds,
        }
    }
}
