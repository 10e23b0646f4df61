//! [`Driver`]: one driver instance, called with Rust types. Every hook's
//! FFI result becomes an [`Error::Driver`] naming the htype and the hook.

use phaul_plugin_api::abi_stable::std_types::{RResult, RString, RVec};
use phaul_plugin_api::{
    CriuOpts, DriverBox, DriverError, DriverInfo, DumpContext, FsSyncSpec, HookOutcome,
    InitContext, RestoreContext,
};

use crate::error::Error;

/// A driver instance for one side of one migration.
pub struct Driver {
    htype: String,
    inner: DriverBox,
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
        Self { htype, inner }
    }

    /// The htype this instance serves.
    pub fn htype(&self) -> &str {
        &self.htype
    }

    fn check<T>(&self, hook: &'static str, r: RResult<T, DriverError>) -> Result<T, Error> {
        r.into_result().map_err(|source| Error::Driver {
            htype: self.htype.clone(),
            hook,
            source,
        })
    }

    /// See [`phaul_plugin_api::Driver::info`].
    pub fn info(&self) -> Result<DriverInfo, Error> {
        self.check("info", self.inner.info())
    }
    /// See [`phaul_plugin_api::Driver::init`].
    pub fn init(&mut self, ctx: InitContext) -> Result<(), Error> {
        let r = self.inner.init(ctx);
        self.check("init", r)
    }
    /// See [`phaul_plugin_api::Driver::root_task_pid`].
    pub fn root_task_pid(&mut self) -> Result<i32, Error> {
        let r = self.inner.root_task_pid();
        self.check("root_task_pid", r)
    }
    /// See [`phaul_plugin_api::Driver::adjust_dump_opts`].
    pub fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> Result<(), Error> {
        let r = self.inner.adjust_dump_opts(opts);
        self.check("adjust_dump_opts", r)
    }
    /// See [`phaul_plugin_api::Driver::adjust_restore_opts`].
    pub fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> Result<(), Error> {
        let r = self.inner.adjust_restore_opts(opts);
        self.check("adjust_restore_opts", r)
    }
    /// See [`phaul_plugin_api::Driver::dump`].
    pub fn dump(&mut self, ctx: &DumpContext) -> Result<HookOutcome, Error> {
        let r = self.inner.dump(ctx);
        self.check("dump", r)
    }
    /// See [`phaul_plugin_api::Driver::restore`].
    pub fn restore(&mut self, ctx: &RestoreContext) -> Result<HookOutcome, Error> {
        let r = self.inner.restore(ctx);
        self.check("restore", r)
    }
    /// See [`phaul_plugin_api::Driver::fs_sync`].
    pub fn fs_sync(&mut self) -> Result<FsSyncSpec, Error> {
        let r = self.inner.fs_sync();
        self.check("fs_sync", r)
    }
    /// See [`phaul_plugin_api::Driver::net_lock`].
    pub fn net_lock(&mut self) -> Result<(), Error> {
        let r = self.inner.net_lock();
        self.check("net_lock", r)
    }
    /// See [`phaul_plugin_api::Driver::net_unlock`].
    pub fn net_unlock(&mut self) -> Result<(), Error> {
        let r = self.inner.net_unlock();
        self.check("net_unlock", r)
    }
    /// See [`phaul_plugin_api::Driver::mount`].
    pub fn mount(&mut self) -> Result<(), Error> {
        let r = self.inner.mount();
        self.check("mount", r)
    }
    /// See [`phaul_plugin_api::Driver::umount`].
    pub fn umount(&mut self) -> Result<(), Error> {
        let r = self.inner.umount();
        self.check("umount", r)
    }
    /// See [`phaul_plugin_api::Driver::stop`].
    pub fn stop(&mut self) -> Result<(), Error> {
        let r = self.inner.stop();
        self.check("stop", r)
    }
    /// See [`phaul_plugin_api::Driver::start`].
    pub fn start(&mut self) -> Result<i32, Error> {
        let r = self.inner.start();
        self.check("start", r)
    }
    /// See [`phaul_plugin_api::Driver::meta_files_out`].
    pub fn meta_files_out(&mut self, dir: &str) -> Result<Vec<String>, Error> {
        let r = self.inner.meta_files_out(RString::from(dir));
        self.check("meta_files_out", r)
            .map(|v| v.into_iter().map(RString::into_string).collect())
    }
    /// See [`phaul_plugin_api::Driver::meta_files_in`].
    pub fn meta_files_in(&mut self, dir: &str, names: &[String]) -> Result<(), Error> {
        let names: RVec<RString> = names.iter().map(|n| RString::from(n.as_str())).collect();
        let r = self.inner.meta_files_in(RString::from(dir), names);
        self.check("meta_files_in", r)
    }
    /// See [`phaul_plugin_api::Driver::storage_snapshot`].
    pub fn storage_snapshot(&mut self) -> Result<(), Error> {
        let r = self.inner.storage_snapshot();
        self.check("storage_snapshot", r)
    }
    /// See [`phaul_plugin_api::Driver::storage_rollback`].
    pub fn storage_rollback(&mut self) -> Result<(), Error> {
        let r = self.inner.storage_rollback();
        self.check("storage_rollback", r)
    }
    /// See [`phaul_plugin_api::Driver::storage_commit`].
    pub fn storage_commit(&mut self) -> Result<(), Error> {
        let r = self.inner.storage_commit();
        self.check("storage_commit", r)
    }
    /// See [`phaul_plugin_api::Driver::migration_complete`].
    pub fn migration_complete(&mut self) -> Result<(), Error> {
        let r = self.inner.migration_complete();
        self.check("migration_complete", r)
    }
    /// See [`phaul_plugin_api::Driver::migration_fail`].
    pub fn migration_fail(&mut self) -> Result<(), Error> {
        let r = self.inner.migration_fail();
        self.check("migration_fail", r)
    }
}
