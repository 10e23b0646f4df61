//! The driver contract: the [`Driver`] trait a driver author implements, and
//! the FFI-safe trait object ([`FfiDriver`]) the engine calls through.
//!
//! # The life of a driver instance
//!
//! The engine creates one instance per migration and per side, calls
//! [`Driver::deadlines`] and [`Driver::init`] once, then the hooks below in
//! the order of the migration, and finally exactly one of
//! [`Driver::migration_complete`] or [`Driver::migration_fail`]. The test
//! `tests/tests/lifecycle.rs` records every call of a real migration and
//! asserts these orders, so this documentation and the engine cannot drift
//! apart. On the source, in live mode:
//!
//! ```text
//! init -> root_task_pid -> fs_sync -> describe
//!      -> adjust_dump_opts                               (pre-flight, running)
//!      -> [adjust_dump_opts per pre-dump]                (running)
//!      -> adjust_dump_opts -> dump                       (running, just before the freeze)
//!      -> [net_lock]          CRIU froze the tree; only for a tree with its own
//!                             network namespace (CRIU asks only then)
//!      -> [storage_snapshot]  shared storage only            (frozen)
//!      -> meta_files_out                                     (frozen)
//!         ... the destination restores and holds its copy ...
//!      -> umount -> [storage_commit] -> migration_complete  (success: the tree is gone)
//!      or [net_unlock] -> [storage_rollback] -> migration_fail
//!                             (rollback; net_unlock when CRIU unlocks a tree
//!                             with its own network namespace)
//! ```
//!
//! On the destination, in live mode:
//!
//! ```text
//! init (with the source driver's `describe` answer)
//!      -> fs_sync (as many directories as the source's, matched in order) -> mount
//!      -> meta_files_in -> adjust_restore_opts -> restore    (source frozen)
//!      -> restored(pid)       the copy exists, held, never ran
//!         ... the source commits ...
//!      -> [net_unlock]        own network namespace only
//!      -> migration_complete                             (success)
//!      or umount -> migration_fail                       (rollback)
//! ```
//!
//! In restart mode the source calls `init -> root_task_pid -> fs_sync ->
//! describe -> net_lock -> stop -> [storage_snapshot] -> meta_files_out`, then
//! `migration_complete`; if the destination fails it calls `net_unlock`,
//! `start` again (when the workload went down) and `migration_fail`. The
//! destination calls `init -> fs_sync -> mount -> meta_files_in -> start ->
//! migration_complete`.
//!
//! # Deadlines
//!
//! The engine waits for each hook only so long (10 s for `net_lock` and
//! `net_unlock`, which run while the workload is frozen; 30 s for the
//! questions and option hooks; 60 s for hooks that act on the workload or
//! its storage; 300 s for a driver's own `dump`/`restore`). A driver that
//! needs longer says so in [`Driver::deadlines`]; the user can override any
//! with `--hook-timeout HOOK=SECONDS`. A hook that misses its deadline, or
//! that is under way when the user presses Ctrl-C, is given up: the
//! migration rolls back (while it still can) and the instance is not
//! called again — its thread may still be stuck in the hook.
//!
//! # Errors and panics
//!
//! Every hook returns [`DriverResult`]. An error before the point of no
//! return (the destination confirming that the workload runs) rolls the
//! migration back: the source workload is resumed untouched and the
//! destination cleaned up. An error after it is reported but cannot undo the
//! move. A hook that panics is caught by the code [`export_driver!`]
//! generates and comes back as an error with [`ErrorCode::PANICKED`]; the
//! instance is then poisoned and every later call fails the same way.
//!
//! [`export_driver!`]: crate::export_driver
//! [`ErrorCode::PANICKED`]: crate::ErrorCode::PANICKED

// abi_stable's `#[sabi_trait]` expands to impls inside a generated const.
#![allow(non_local_definitions)]

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RString, RVec};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::types::{
    CriuOpts, DriverError, DriverInfo, DriverResult, DumpContext, ErrorCode, FsSyncSpec,
    HookDeadline, HookOutcome, InitContext, KeyValue, RestoreContext,
};

/// The hooks of an htype driver. Implement this, then export it with
/// [`export_driver!`](crate::export_driver).
///
/// Only [`info`](Driver::info) and [`init`](Driver::init) are required; every
/// other hook has a default that fits a driver which needs nothing special
/// there. Each hook's documentation says when it runs, on which side,
/// whether the source workload is frozen at that moment, and what a failure
/// does.
pub trait Driver: Send + 'static {
    /// Identity and capabilities. Called when the plugin is loaded (on a
    /// fresh default instance) and by `phaul htypes`; must not have side
    /// effects. Failure (or panic) makes the loader skip the plugin.
    fn info(&self) -> DriverInfo;

    /// Both sides, first call of a migration, workload running. Validate the
    /// workload id and options here and keep the host handle. Failure
    /// refuses the migration before anything is touched.
    fn init(&mut self, ctx: InitContext) -> DriverResult<()>;

    /// Source, after `init`, workload running: the pid of the root task
    /// CRIU dumps. Failure refuses the migration.
    fn root_task_pid(&mut self) -> DriverResult<i32> {
        Err(DriverError::unsupported(
            "this driver has no root task (root_task_pid not implemented)",
        ))
    }

    /// Source, before each pre-dump and the final dump, workload running:
    /// add the CRIU options the workload needs (external mounts, veth
    /// pairs, cgroup mode, ...). Failure rolls back.
    fn adjust_dump_opts(&mut self, _opts: &mut CriuOpts) -> DriverResult<()> {
        Ok(())
    }

    /// Destination, before the restore, source frozen: add the CRIU options
    /// the restore needs (root path, veth pairs, ...). Failure rolls back.
    fn adjust_restore_opts(&mut self, _opts: &mut CriuOpts) -> DriverResult<()> {
        Ok(())
    }

    /// Source, just before the final dump, workload running. Return
    /// [`HookOutcome::ENGINE_DEFAULT`] (the default): the engine runs CRIU.
    /// A driver that checkpoints through its own tooling declares
    /// [`Capabilities::OWN_DUMP`](crate::Capabilities::OWN_DUMP), starts
    /// the tooling here with CRIU running `ctx.action_script` (or
    /// `CRIU_CONFIG_FILE=ctx.criu_config`), images into `ctx.images_dir`,
    /// and returns `HookOutcome::handled(0)` without waiting: the engine
    /// follows CRIU through the script, holds the frozen tree at
    /// `post-dump` for the commit, and then calls `dump_wait`. A `handled`
    /// answer without the capability is refused (the engine could not hold
    /// the tree). Failure rolls back.
    fn dump(&mut self, _ctx: &DumpContext) -> DriverResult<HookOutcome> {
        Ok(HookOutcome::ENGINE_DEFAULT)
    }

    /// Destination, source frozen, all images present, just before the
    /// restore: return [`HookOutcome::ENGINE_DEFAULT`] (the default): the
    /// engine restores with CRIU. A driver that restores through its own
    /// tooling (`lxc-checkpoint -r`, a container engine) declares
    /// [`Capabilities::OWN_RESTORE`](crate::Capabilities::OWN_RESTORE),
    /// starts it here with CRIU running `ctx.action_script`, and returns
    /// `HookOutcome::handled(TOOL_PID)` (or 0) without waiting: the engine
    /// watches the tool's process, holds the copy
    /// at `post-restore` (never running) until the commit, then calls
    /// `restore_wait`. Failure rolls back.
    fn restore(&mut self, _ctx: &RestoreContext) -> DriverResult<HookOutcome> {
        Ok(HookOutcome::ENGINE_DEFAULT)
    }

    /// Both sides, after `init`, workload running. Source: which directories
    /// must be copied to the destination (the engine syncs them iteratively
    /// and once more while the workload is frozen), or whether the storage
    /// is shared (then the driver must declare
    /// [`Capabilities::SHARED_STORAGE`](crate::Capabilities::SHARED_STORAGE)).
    /// Destination: where the same directories go on this host, in the
    /// same order (the pid driver names the same paths; a container driver
    /// its own container directory), checked against the destination's
    /// `--allow-sync-root` policy; the engine refuses a migration whose
    /// sides name different numbers of directories. Default: nothing to
    /// copy.
    /// Failure refuses the migration.
    fn fs_sync(&mut self) -> DriverResult<FsSyncSpec> {
        Ok(FsSyncSpec::nothing())
    }

    /// Source, in pre-flight after `fs_sync`, workload running: what the
    /// destination's driver must know before anything is frozen (an image
    /// id, the container's configuration), as key/value pairs. They reach
    /// the destination driver's `init` as
    /// [`InitContext::source_facts`](crate::InitContext::source_facts),
    /// so that it can check and prepare there (and refuse) while the
    /// workload still runs. At most 256 pairs and 1 MiB in all. Default:
    /// nothing. Failure refuses the migration.
    fn describe(&mut self) -> DriverResult<Vec<KeyValue>> {
        Ok(Vec::new())
    }

    /// Source, when CRIU has frozen the tree (CRIU's `network-lock`
    /// notification, which CRIU sends only for a tree with its own network
    /// namespace), or before `stop` in restart mode: block the workload's
    /// network traffic if CRIU's own lock is not enough. Workload frozen;
    /// deadline 10 s. Failure rolls back.
    fn net_lock(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Destination, when CRIU unlocks the restored tree's network (after the
    /// commit); or source, during rollback, when CRIU unlocks the resumed
    /// tree's network (CRIU's `network-unlock`, again only for a tree with
    /// its own network namespace), or after `stop` failed in restart mode;
    /// or source, when the outcome is undecided after the commit (the tree
    /// stays stopped for `phaul recover` and CRIU let go of its lock), so
    /// that the network is as CRIU left it whatever recovery decides.
    /// Failure is logged; the migration goes on.
    fn net_unlock(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Destination, before images arrive, source running: mount what the
    /// workload's root filesystem needs. Failure refuses the migration.
    fn mount(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Source after success (the workload is gone; `mount` never ran on
    /// this side): release what the workload held here. Destination during
    /// rollback: undo `mount`. Failure is logged only.
    fn umount(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Source, restart mode, after the last live filesystem pass: stop the
    /// workload cleanly — every process of it. Failure rolls back (the
    /// workload is started again if it went down). Afterwards, before the
    /// final sync, the engine checks that nothing of the root task's tree
    /// (as it was when the stop began) remains, kills what does with a
    /// warning, and rolls back if anything survives that.
    fn stop(&mut self) -> DriverResult<()> {
        Err(DriverError::unsupported(
            "this driver has no restart mode (stop)",
        ))
    }

    /// Destination, restart mode, after the final filesystem pass: start the
    /// workload; or source, during a restart-mode rollback: start it again.
    /// Returns the pid of the started root task. Failure on the destination
    /// rolls back.
    fn start(&mut self) -> DriverResult<i32> {
        Err(DriverError::unsupported(
            "this driver has no restart mode (start)",
        ))
    }

    /// Source, workload frozen (live) or stopped (restart), before images
    /// are sent: write extra files the destination needs into `dir` and
    /// return their names (plain file names, no directories). Failure rolls
    /// back.
    fn meta_files_out(&mut self, _dir: &str) -> DriverResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// Destination, after the files named by the source's `meta_files_out`
    /// arrived in `dir`, before `adjust_restore_opts`/`start`: install them.
    /// Failure rolls back.
    fn meta_files_in(&mut self, _dir: &str, _names: &[String]) -> DriverResult<()> {
        Ok(())
    }

    /// Source, shared storage only, workload frozen, before the destination
    /// restores: snapshot the shared disk so a failed migration can put it
    /// back. Failure rolls back.
    fn storage_snapshot(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Source, shared storage only, during rollback, before the workload is
    /// resumed: revert the disk to the snapshot. Failure is reported loudly
    /// (the workload is still resumed).
    fn storage_rollback(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Source, shared storage only, after the point of no return: drop the
    /// snapshot. Failure is logged only.
    fn storage_commit(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Both sides, after the point of no return (the workload runs on the
    /// destination, the source copy is gone): final clean-up. Failure is
    /// reported but changes nothing.
    fn migration_complete(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Both sides, once, when the migration is rolled back (source workload
    /// resumed, destination copy removed): undo whatever `init` and later
    /// hooks set up. Failure is logged only.
    fn migration_fail(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Destination, live mode, right after the restore: the restored copy's
    /// root pid (as this host sees it). The copy exists but has never run:
    /// it is held with its network locked until the source commits.
    /// Failure rolls back (the copy is discarded, the source resumes).
    fn restored(&mut self, _pid: i32) -> DriverResult<()> {
        Ok(())
    }

    /// Source, a driver with [`Capabilities::OWN_DUMP`](crate::Capabilities::OWN_DUMP)
    /// only: its `dump` started its tooling (CRIU run with
    /// `ctx.action_script`) and returned `handled` without waiting; the
    /// engine followed CRIU through the script and answered `post-dump`.
    /// Now wait for the tooling to finish. Failure after the commit is
    /// reported; before it, the tree was resumed by CRIU already.
    fn dump_wait(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Destination, a driver with
    /// [`Capabilities::OWN_RESTORE`](crate::Capabilities::OWN_RESTORE)
    /// only: its `restore` started its tooling and returned `handled`; the
    /// engine held the copy at `post-restore` and has answered (let it run
    /// after the commit, or discard it). Wait for the tooling and return
    /// the restored root's pid (0 if it was discarded).
    fn restore_wait(&mut self) -> DriverResult<i32> {
        Ok(0)
    }

    /// Either side, when the instance is created: hooks that need longer
    /// than the engine's deadlines (see the crate documentation), as
    /// `(hook, seconds)`. The user's `--hook-timeout` still wins. Default:
    /// none.
    fn deadlines(&self) -> Vec<HookDeadline> {
        Vec::new()
    }
}

/// The FFI-safe mirror of [`Driver`] the engine calls. Driver authors do not
/// implement it: [`export_driver!`](crate::export_driver) wraps a [`Driver`]
/// in [`GuardedDriver`], which does, catching panics.
#[sabi_trait]
#[allow(missing_docs)]
pub trait FfiDriver: Send {
    fn info(&self) -> RResult<DriverInfo, DriverError>;
    fn init(&mut self, ctx: InitContext) -> RResult<(), DriverError>;
    fn root_task_pid(&mut self) -> RResult<i32, DriverError>;
    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> RResult<(), DriverError>;
    fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> RResult<(), DriverError>;
    fn dump(&mut self, ctx: &DumpContext) -> RResult<HookOutcome, DriverError>;
    fn restore(&mut self, ctx: &RestoreContext) -> RResult<HookOutcome, DriverError>;
    fn fs_sync(&mut self) -> RResult<FsSyncSpec, DriverError>;
    fn net_lock(&mut self) -> RResult<(), DriverError>;
    fn net_unlock(&mut self) -> RResult<(), DriverError>;
    fn mount(&mut self) -> RResult<(), DriverError>;
    fn umount(&mut self) -> RResult<(), DriverError>;
    fn stop(&mut self) -> RResult<(), DriverError>;
    fn start(&mut self) -> RResult<i32, DriverError>;
    fn meta_files_out(&mut self, dir: RString) -> RResult<RVec<RString>, DriverError>;
    fn meta_files_in(&mut self, dir: RString, names: RVec<RString>) -> RResult<(), DriverError>;
    fn storage_snapshot(&mut self) -> RResult<(), DriverError>;
    fn storage_rollback(&mut self) -> RResult<(), DriverError>;
    fn storage_commit(&mut self) -> RResult<(), DriverError>;
    fn migration_complete(&mut self) -> RResult<(), DriverError>;
    fn migration_fail(&mut self) -> RResult<(), DriverError>;
    fn restored(&mut self, pid: i32) -> RResult<(), DriverError>;
    fn dump_wait(&mut self) -> RResult<(), DriverError>;
    fn restore_wait(&mut self) -> RResult<i32, DriverError>;
    fn describe(&mut self) -> RResult<RVec<KeyValue>, DriverError>;
    #[sabi(last_prefix_field)]
    fn deadlines(&self) -> RResult<RVec<HookDeadline>, DriverError>;
}

/// An owned driver instance behind the stable ABI.
pub type DriverBox = FfiDriver_TO<'static, RBox<()>>;

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    static IN_GUARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook in the plugin's own copy of std that
/// records where a driver panicked instead of printing a backtrace: the
/// engine reports the panic as an error, with that location, in one line.
/// Panics outside driver hooks (a host that links a driver in-process)
/// still reach the previous hook.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_GUARD.with(|g| g.get()) {
                return previous(info);
            }
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(at));
        }));
    });
}

/// Runs `f`, turning a panic into a [`ErrorCode::PANICKED`] error that
/// quotes the panic message and where it happened. Used by the code
/// [`export_driver!`] generates.
///
/// [`export_driver!`]: crate::export_driver
pub fn guard<T>(hook: &str, f: impl FnOnce() -> DriverResult<T>) -> RResult<T, DriverError> {
    install_quiet_panic_hook();
    let outer = IN_GUARD.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_GUARD.with(|g| g.set(outer));
    match r {
        Ok(result) => result.into(),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            let at = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_default();
            RResult::RErr(DriverError::new(
                ErrorCode::PANICKED,
                format!("driver panicked in {hook}: {what}{at}"),
            ))
        }
    }
}

/// Adapts a [`Driver`] to [`FfiDriver`]: every call runs under
/// [`guard`], and after a panic the instance is poisoned (its state may be
/// half-updated), so later calls fail without entering driver code.
pub struct GuardedDriver<D> {
    inner: D,
    poisoned: Option<String>,
}

impl<D: Driver> GuardedDriver<D> {
    /// Wraps a driver instance.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            poisoned: None,
        }
    }

    fn call<T>(
        &mut self,
        hook: &str,
        f: impl FnOnce(&mut D) -> DriverResult<T>,
    ) -> RResult<T, DriverError> {
        if let Some(first) = &self.poisoned {
            return RResult::RErr(DriverError::new(
                ErrorCode::PANICKED,
                format!("driver unusable after an earlier panic ({first}); {hook} not called"),
            ));
        }
        let inner = &mut self.inner;
        let result = guard(hook, || f(inner));
        if let RResult::RErr(e) = &result {
            if e.code == ErrorCode::PANICKED {
                self.poisoned = Some(e.message.to_string());
            }
        }
        result
    }
}

impl<D: Driver> FfiDriver for GuardedDriver<D> {
    fn info(&self) -> RResult<DriverInfo, DriverError> {
        guard("info", || Ok(self.inner.info()))
    }
    fn init(&mut self, ctx: InitContext) -> RResult<(), DriverError> {
        self.call("init", |d| d.init(ctx))
    }
    fn root_task_pid(&mut self) -> RResult<i32, DriverError> {
        self.call("root_task_pid", |d| d.root_task_pid())
    }
    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> RResult<(), DriverError> {
        self.call("adjust_dump_opts", |d| d.adjust_dump_opts(opts))
    }
    fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> RResult<(), DriverError> {
        self.call("adjust_restore_opts", |d| d.adjust_restore_opts(opts))
    }
    fn dump(&mut self, ctx: &DumpContext) -> RResult<HookOutcome, DriverError> {
        self.call("dump", |d| d.dump(ctx))
    }
    fn restore(&mut self, ctx: &RestoreContext) -> RResult<HookOutcome, DriverError> {
        self.call("restore", |d| d.restore(ctx))
    }
    fn fs_sync(&mut self) -> RResult<FsSyncSpec, DriverError> {
        self.call("fs_sync", |d| d.fs_sync())
    }
    fn net_lock(&mut self) -> RResult<(), DriverError> {
        self.call("net_lock", |d| d.net_lock())
    }
    fn net_unlock(&mut self) -> RResult<(), DriverError> {
        self.call("net_unlock", |d| d.net_unlock())
    }
    fn mount(&mut self) -> RResult<(), DriverError> {
        self.call("mount", |d| d.mount())
    }
    fn umount(&mut self) -> RResult<(), DriverError> {
        self.call("umount", |d| d.umount())
    }
    fn stop(&mut self) -> RResult<(), DriverError> {
        self.call("stop", |d| d.stop())
    }
    fn start(&mut self) -> RResult<i32, DriverError> {
        self.call("start", |d| d.start())
    }
    fn meta_files_out(&mut self, dir: RString) -> RResult<RVec<RString>, DriverError> {
        self.call("meta_files_out", |d| {
            d.meta_files_out(dir.as_str())
                .map(|names| names.into_iter().map(RString::from).collect())
        })
    }
    fn meta_files_in(&mut self, dir: RString, names: RVec<RString>) -> RResult<(), DriverError> {
        let names: Vec<String> = names.into_iter().map(|n| n.into_string()).collect();
        self.call("meta_files_in", |d| d.meta_files_in(dir.as_str(), &names))
    }
    fn storage_snapshot(&mut self) -> RResult<(), DriverError> {
        self.call("storage_snapshot", |d| d.storage_snapshot())
    }
    fn storage_rollback(&mut self) -> RResult<(), DriverError> {
        self.call("storage_rollback", |d| d.storage_rollback())
    }
    fn storage_commit(&mut self) -> RResult<(), DriverError> {
        self.call("storage_commit", |d| d.storage_commit())
    }
    fn migration_complete(&mut self) -> RResult<(), DriverError> {
        self.call("migration_complete", |d| d.migration_complete())
    }
    fn migration_fail(&mut self) -> RResult<(), DriverError> {
        self.call("migration_fail", |d| d.migration_fail())
    }
    fn restored(&mut self, pid: i32) -> RResult<(), DriverError> {
        self.call("restored", |d| d.restored(pid))
    }
    fn dump_wait(&mut self) -> RResult<(), DriverError> {
        self.call("dump_wait", |d| d.dump_wait())
    }
    fn restore_wait(&mut self) -> RResult<i32, DriverError> {
        self.call("restore_wait", |d| d.restore_wait())
    }
    fn describe(&mut self) -> RResult<RVec<KeyValue>, DriverError> {
        self.call("describe", |d| d.describe().map(RVec::from))
    }
    fn deadlines(&self) -> RResult<RVec<HookDeadline>, DriverError> {
        guard("deadlines", || {
            Ok(self.inner.deadlines().into_iter().collect())
        })
    }
}
