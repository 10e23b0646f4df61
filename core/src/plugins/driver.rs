//! [`Driver`]: one driver instance, called with Rust types. Every hook's
//! FFI result becomes an [`Error::Driver`] naming the htype and the hook.
//!
//! Hooks run on the instance's own thread, and the engine waits for each
//! only until its deadline ([`HookDeadlines`]) or until the migration is
//! interrupted: a hook that never returns cannot hold a frozen workload
//! hostage. A driver whose hook hung (or was abandoned on Ctrl-C) is not
//! called again in this process, like one that panicked — its state is
//! unknown, and its thread may still be stuck in the hook.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_plugin_api::abi_stable::std_types::{RResult, RString, RVec};
use phaul_plugin_api::{
    CriuOpts, DriverBox, DriverError, DriverInfo, DumpContext, ErrorCode, FsSyncSpec, HookOutcome,
    InitContext, RestoreContext,
};

use crate::error::Error;

/// How long each hook may take before the engine gives up on it.
///
/// Defaults: 10 s for `net_lock`/`net_unlock` (the workload is frozen
/// meanwhile), 30 s for the questions and option adjustments (`info`,
/// `init`, `root_task_pid`, `fs_sync`, `adjust_*`, `meta_files_*`), 60 s for
/// the hooks that act on the workload or its storage (`mount`, `umount`,
/// `stop`, `start`, `storage_*`, `migration_complete`, `migration_fail`),
/// and 300 s for a driver's own `dump`/`restore`. A driver declares longer
/// needs with [`phaul_plugin_api::Driver::deadlines`]; the user overrides either with
/// `--hook-timeout HOOK=SECONDS`.
#[derive(Debug, Clone, Default)]
pub struct HookDeadlines {
    overrides: BTreeMap<String, Duration>,
}

impl HookDeadlines {
    /// The built-in deadline of `hook`.
    pub fn default_for(hook: &str) -> Duration {
        Duration::from_secs(match hook {
            "net_lock" | "net_unlock" => 10,
            "info"
            | "init"
            | "describe"
            | "root_task_pid"
            | "fs_sync"
            | "adjust_dump_opts"
            | "adjust_restore_opts"
            | "meta_files_out"
            | "meta_files_in" => 30,
            "dump" | "restore" | "dump_wait" | "restore_wait" => 300,
            _ => 60,
        })
    }

    /// The deadline of `hook`.
    pub fn get(&self, hook: &str) -> Duration {
        self.overrides
            .get(hook)
            .copied()
            .unwrap_or_else(|| Self::default_for(hook))
    }

    /// Sets the deadline of `hook`.
    pub fn set(&mut self, hook: &str, d: Duration) {
        self.overrides.insert(hook.to_string(), d);
    }

    /// Parses `HOOK=SECONDS`.
    pub fn parse_override(s: &str) -> Result<(String, Duration), String> {
        let (hook, secs) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected HOOK=SECONDS (e.g. net_lock=5)"))?;
        let secs: f64 = secs
            .parse()
            .ok()
            .filter(|v: &f64| *v > 0.0)
            .ok_or_else(|| format!("`{s}`: the deadline must be a positive number of seconds"))?;
        Ok((hook.to_string(), Duration::from_secs_f64(secs)))
    }
}

type Job = Box<dyn FnOnce(&mut DriverBox) + Send>;

/// A driver instance for one side of one migration.
pub struct Driver {
    htype: String,
    jobs: Option<mpsc::Sender<Job>>,
    deadlines: HookDeadlines,
    /// Set when the migration is interrupted (Ctrl-C).
    interrupt: Option<Arc<AtomicBool>>,
    /// Why the driver is no longer called.
    unusable: Option<String>,
    /// `net_lock` was called and no `net_unlock` since.
    net_locked: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("htype", &self.htype)
            .finish()
    }
}

impl Driver {
    pub(crate) fn new(htype: String, inner: DriverBox) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let name = format!("driver-{htype}");
        let started = std::thread::Builder::new().name(name).spawn(move || {
            let mut inner = inner;
            for job in rx {
                job(&mut inner);
            }
        });
        Self {
            htype,
            jobs: started.ok().map(|_| tx),
            deadlines: HookDeadlines::default(),
            interrupt: None,
            unusable: None,
            net_locked: false,
        }
    }

    /// The htype this instance serves.
    pub fn htype(&self) -> &str {
        &self.htype
    }

    /// Uses these deadlines (on top of the built-in ones).
    pub fn set_deadlines(&mut self, d: HookDeadlines) {
        self.deadlines = d;
    }

    /// The deadlines in force.
    pub fn deadlines_mut(&mut self) -> &mut HookDeadlines {
        &mut self.deadlines
    }

    /// A hook under way is abandoned once `flag` is set.
    pub fn interrupt_on(&mut self, flag: Arc<AtomicBool>) {
        self.interrupt = Some(flag);
    }

    fn unusable_error(&self, hook: &'static str, why: &str) -> Error {
        Error::Driver {
            htype: self.htype.clone(),
            hook,
            source: DriverError::new(ErrorCode::FAILED, why.to_string()),
        }
    }

    /// Stops calling the driver (a hook it runs was given up on).
    pub fn mark_unusable(&mut self, why: &str) {
        self.unusable.get_or_insert_with(|| why.to_string());
    }

    /// Runs `f` on the driver's thread and waits for it, at most until the
    /// hook's deadline or an interrupt.
    fn call<T: Send + 'static>(
        &mut self,
        hook: &'static str,
        f: impl FnOnce(&mut DriverBox) -> RResult<T, DriverError> + Send + 'static,
    ) -> Result<T, Error> {
        self.call_while(hook, f, &mut || {})
    }

    /// [`Driver::call`], running `meanwhile` about every 50 ms while the
    /// hook runs (e.g. to answer CRIU notifications the hook's tooling
    /// waits for).
    fn call_while<T: Send + 'static>(
        &mut self,
        hook: &'static str,
        f: impl FnOnce(&mut DriverBox) -> RResult<T, DriverError> + Send + 'static,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<T, Error> {
        if let Some(why) = &self.unusable {
            return Err(self.unusable_error(hook, &format!("not called: {why}")));
        }
        let Some(jobs) = &self.jobs else {
            return Err(self.unusable_error(hook, "the driver's thread could not be started"));
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |d| {
            let _ = tx.send(f(d));
        });
        if jobs.send(job).is_err() {
            return Err(self.unusable_error(hook, "the driver's thread is gone"));
        }
        let limit = self.deadlines.get(hook);
        let deadline = Instant::now() + limit;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match rx.recv_timeout(slice) {
                Ok(r) => {
                    let r = r.into_result().map_err(|source| Error::Driver {
                        htype: self.htype.clone(),
                        hook,
                        source,
                    });
                    if let Err(Error::Driver { source, .. }) = &r {
                        if source.code == ErrorCode::PANICKED {
                            self.unusable =
                                Some(format!("unusable after an earlier panic in {hook}"));
                        }
                    }
                    return r;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.unusable = Some(format!("unusable after its thread died in {hook}"));
                    return Err(self.unusable_error(hook, "the driver's thread died"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => meanwhile(),
            }
            if self
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                self.unusable = Some(format!(
                    "unusable after {hook} was abandoned on an interrupt"
                ));
                return Err(Error::HookInterrupted {
                    htype: self.htype.clone(),
                    hook,
                });
            }
            if Instant::now() >= deadline {
                self.unusable = Some(format!("unusable after it hung in {hook}"));
                return Err(Error::HookHung {
                    htype: self.htype.clone(),
                    hook,
                    after: limit,
                });
            }
        }
    }

    /// See [`phaul_plugin_api::Driver::info`].
    pub fn info(&mut self) -> Result<DriverInfo, Error> {
        self.call("info", |d| d.info())
    }
    /// See [`phaul_plugin_api::Driver::init`].
    pub fn init(&mut self, ctx: InitContext) -> Result<(), Error> {
        self.call("init", move |d| d.init(ctx))
    }
    /// See [`phaul_plugin_api::Driver::root_task_pid`].
    pub fn root_task_pid(&mut self) -> Result<i32, Error> {
        self.call("root_task_pid", |d| d.root_task_pid())
    }
    /// See [`phaul_plugin_api::Driver::adjust_dump_opts`].
    pub fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> Result<(), Error> {
        let mut o = opts.clone();
        let r = self.call("adjust_dump_opts", move |d| {
            d.adjust_dump_opts(&mut o).map(|()| o)
        })?;
        *opts = r;
        Ok(())
    }
    /// See [`phaul_plugin_api::Driver::adjust_restore_opts`].
    pub fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> Result<(), Error> {
        let mut o = opts.clone();
        let r = self.call("adjust_restore_opts", move |d| {
            d.adjust_restore_opts(&mut o).map(|()| o)
        })?;
        *opts = r;
        Ok(())
    }
    /// See [`phaul_plugin_api::Driver::dump`].
    pub fn dump(&mut self, ctx: &DumpContext) -> Result<HookOutcome, Error> {
        let ctx = ctx.clone();
        self.call("dump", move |d| d.dump(&ctx))
    }
    /// See [`phaul_plugin_api::Driver::restore`].
    pub fn restore(&mut self, ctx: &RestoreContext) -> Result<HookOutcome, Error> {
        let ctx = ctx.clone();
        self.call("restore", move |d| d.restore(&ctx))
    }
    /// See [`phaul_plugin_api::Driver::fs_sync`].
    pub fn fs_sync(&mut self) -> Result<FsSyncSpec, Error> {
        self.call("fs_sync", |d| d.fs_sync())
    }
    /// See [`phaul_plugin_api::Driver::describe`].
    pub fn describe(&mut self) -> Result<Vec<(String, String)>, Error> {
        let facts = self.call("describe", |d| d.describe())?;
        Ok(facts
            .into_iter()
            .map(|kv| (kv.key.into_string(), kv.value.into_string()))
            .collect())
    }
    /// See [`phaul_plugin_api::Driver::net_lock`].
    pub fn net_lock(&mut self) -> Result<(), Error> {
        self.net_locked = true;
        self.call("net_lock", |d| d.net_lock())
    }
    /// See [`phaul_plugin_api::Driver::net_unlock`].
    pub fn net_unlock(&mut self) -> Result<(), Error> {
        self.net_locked = false;
        self.call("net_unlock", |d| d.net_unlock())
    }
    /// Whether `net_lock` was called (even if it failed) and `net_unlock`
    /// not since.
    pub fn net_locked(&self) -> bool {
        self.net_locked
    }
    /// See [`phaul_plugin_api::Driver::mount`].
    pub fn mount(&mut self) -> Result<(), Error> {
        self.call("mount", |d| d.mount())
    }
    /// See [`phaul_plugin_api::Driver::umount`].
    pub fn umount(&mut self) -> Result<(), Error> {
        self.call("umount", |d| d.umount())
    }
    /// See [`phaul_plugin_api::Driver::stop`].
    pub fn stop(&mut self) -> Result<(), Error> {
        self.call("stop", |d| d.stop())
    }
    /// See [`phaul_plugin_api::Driver::start`].
    pub fn start(&mut self) -> Result<i32, Error> {
        self.call("start", |d| d.start())
    }
    /// See [`phaul_plugin_api::Driver::meta_files_out`].
    pub fn meta_files_out(&mut self, dir: &str) -> Result<Vec<String>, Error> {
        let dir = RString::from(dir);
        self.call("meta_files_out", move |d| d.meta_files_out(dir))
            .map(|v| v.into_iter().map(RString::into_string).collect())
    }
    /// See [`phaul_plugin_api::Driver::meta_files_in`].
    pub fn meta_files_in(&mut self, dir: &str, names: &[String]) -> Result<(), Error> {
        let names: RVec<RString> = names.iter().map(|n| RString::from(n.as_str())).collect();
        let dir = RString::from(dir);
        self.call("meta_files_in", move |d| d.meta_files_in(dir, names))
    }
    /// See [`phaul_plugin_api::Driver::storage_snapshot`].
    pub fn storage_snapshot(&mut self) -> Result<(), Error> {
        self.call("storage_snapshot", |d| d.storage_snapshot())
    }
    /// See [`phaul_plugin_api::Driver::storage_rollback`].
    pub fn storage_rollback(&mut self) -> Result<(), Error> {
        self.call("storage_rollback", |d| d.storage_rollback())
    }
    /// See [`phaul_plugin_api::Driver::storage_commit`].
    pub fn storage_commit(&mut self) -> Result<(), Error> {
        self.call("storage_commit", |d| d.storage_commit())
    }
    /// See [`phaul_plugin_api::Driver::migration_complete`].
    pub fn migration_complete(&mut self) -> Result<(), Error> {
        self.call("migration_complete", |d| d.migration_complete())
    }
    /// See [`phaul_plugin_api::Driver::migration_fail`].
    pub fn migration_fail(&mut self) -> Result<(), Error> {
        self.call("migration_fail", |d| d.migration_fail())
    }
    /// See [`phaul_plugin_api::Driver::dump_wait`].
    pub fn dump_wait(&mut self) -> Result<(), Error> {
        self.call("dump_wait", |d| d.dump_wait())
    }
    /// [`Driver::dump_wait`], running `meanwhile` about every 50 ms until it
    /// returns (see [`Driver::restore_wait_while`]).
    pub fn dump_wait_while(&mut self, meanwhile: &mut dyn FnMut()) -> Result<(), Error> {
        self.call_while("dump_wait", |d| d.dump_wait(), meanwhile)
    }
    /// See [`phaul_plugin_api::Driver::restore_wait`].
    pub fn restore_wait(&mut self) -> Result<i32, Error> {
        self.call("restore_wait", |d| d.restore_wait())
    }
    /// [`Driver::restore_wait`], running `meanwhile` about every 50 ms until
    /// it returns: the driver's CRIU may still report notifications (its
    /// `network-unlock`) that must be answered before it can finish.
    pub fn restore_wait_while(&mut self, meanwhile: &mut dyn FnMut()) -> Result<i32, Error> {
        self.call_while("restore_wait", |d| d.restore_wait(), meanwhile)
    }
    /// See [`phaul_plugin_api::Driver::restored`].
    pub fn restored(&mut self, pid: i32) -> Result<(), Error> {
        self.call("restored", move |d| d.restored(pid))
    }
    /// Applies the driver's declared deadlines
    /// ([`phaul_plugin_api::Driver::deadlines`]), then `overrides` (the
    /// user's).
    pub fn apply_deadlines(&mut self, overrides: &[(String, Duration)]) -> Result<(), Error> {
        for d in self.call("deadlines", |d| d.deadlines())? {
            let own = Duration::from_secs(u64::from(d.seconds));
            if own > HookDeadlines::default_for(d.hook.as_str()) {
                self.deadlines.set(d.hook.as_str(), own);
            }
        }
        for (hook, d) in overrides {
            self.deadlines.set(hook, *d);
        }
        Ok(())
    }
}
