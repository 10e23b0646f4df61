//! The vz driver itself (exported as a plugin by `lib.rs`): a Virtuozzo or
//! OpenVZ container, named by its CTID, whose disks are ploop images.
//!
//! - Live mode: the engine dumps the container with CRIU (root, cgroups,
//!   freezer, secondary disks: [`crate::criu`]); the destination restores
//!   it with `vzctl restore` (own-restore), CRIU running the engine's action
//!   script so the engine holds the copy until the commit.
//! - Restart mode: `vzctl stop` on the source, the final disk sync,
//!   `vzctl start` on the destination (and on the source again if that
//!   fails).
//! - Disks: copied (the directories holding the deltas: `VE_PRIVATE` and
//!   each disk outside it, iteratively while the container runs and once
//!   more while it is frozen or stopped), or, with `-o shared-disks` or
//!   `PHAUL_SHARED_DISKS=yes` in the container's configuration or vz.conf,
//!   on storage both hosts see, with the snapshot algorithm of
//!   [`crate::shared`] for the rollback.
//!
//! Options (both sides get the same):
//! - `vz-root=DIR`: where the host's Virtuozzo files are (`/etc/vz`,
//!   `/var/run/ve`, the private areas); default `/`. The tests point it at
//!   a stand-in tree.
//! - `shared-disks[=BOOL]`: every disk of the container is on shared
//!   storage. phaul moves either every disk or none (its file sync is all
//!   or nothing), so a container with some disks shared and some not is
//!   not supported.
//!
//! Every call to Virtuozzo's tools goes through [`VzTools`]; the tests use
//! the stand-in ([`crate::standin`]), **not** a Virtuozzo host.

use std::path::{Path, PathBuf};

use phaul_plugin_api::abi_stable::std_types::RString;
use phaul_plugin_api::{
    Capabilities, CriuOpts, Driver, DriverError, DriverInfo, DriverResult, FsSyncSpec,
    HookDeadline, HookOutcome, HostBox, HostExt, InitContext, LogLevel, Mode, RestoreContext, Side,
};

use crate::config::{CtConfig, Layout};
use crate::criu::{self, DiskDevice};
use crate::error::{Result, VzError};
use crate::meta;
use crate::ploop;
use crate::shared::{self, HandoffFile, SharedDisk};
use crate::tools::{self, RealTools, VzCommand, VzTools};

const KNOWN_OPTIONS: &[&str] = &["vz-root", "shared-disks"];

/// The file `vzctl restore` reads its work directory and log from.
pub const RESTORE_EXTRA_ARGS: &str = "restore-extra-args";

/// Settings parsed from the driver options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VzOptions {
    /// `vz-root`.
    pub root: Option<PathBuf>,
    /// `shared-disks`, when given.
    pub shared_disks: Option<bool>,
}

fn flag(value: &str, key: &str) -> Result<bool> {
    phaul_plugin_api::flag_option(key, value).map_err(|e| VzError::Option(e.message.into_string()))
}

impl VzOptions {
    /// Parses `key=value` pairs; an unknown key is an error naming it.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        let mut o = VzOptions::default();
        for (key, value) in pairs {
            match key {
                "vz-root" if value.starts_with('/') => o.root = Some(PathBuf::from(value)),
                "vz-root" => {
                    return Err(VzError::Option(format!(
                        "option vz-root={value}: expected an absolute directory"
                    )))
                }
                "shared-disks" => o.shared_disks = Some(flag(value, key)?),
                _ => {
                    return Err(VzError::Option(format!(
                        "unknown option `{key}` for the vz htype (known: {}; and for every \
                         htype file-locks, link-remap, ghost-limit, evasive-devices)",
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// A container id as vzctl takes it: a number or a UUID-like name, never a
/// path.
pub fn check_ctid(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '{' | '}'));
    if ok {
        Ok(())
    } else {
        Err(VzError::Option(format!(
            "`{id}` is not a container id (the vz htype takes a CTID, as vzctl does)"
        )))
    }
}

/// The description `phaul htypes` shows: with a note when `vzctl` is not
/// on `PATH`.
pub fn description(vzctl_installed: bool) -> String {
    let base = "Virtuozzo/OpenVZ containers on ploop disks (vzctl)";
    if vzctl_installed {
        base.to_string()
    } else {
        format!("{base} [note: vzctl is not installed on this host]")
    }
}

/// The vz driver.
#[derive(Default)]
pub struct VzDriver {
    tools: Option<Box<dyn VzTools>>,
    host: Option<HostBox>,
    side: Option<Side>,
    mode: Option<Mode>,
    layout: Layout,
    ct: Option<CtConfig>,
    shared: bool,
    work_dir: PathBuf,
    devices: Option<Vec<DiskDevice>>,
    disks: Vec<SharedDisk>,
    merges: Vec<(PathBuf, String)>,
    ve_images: Vec<PathBuf>,
    restore_started: bool,
}

impl VzDriver {
    /// A driver that calls `tools` instead of the real commands (the tests
    /// give it the stand-in).
    pub fn with_tools(tools: Box<dyn VzTools>) -> VzDriver {
        VzDriver {
            tools: Some(tools),
            ..VzDriver::default()
        }
    }

    fn log(&self, level: LogLevel, msg: &str) {
        if let Some(host) = &self.host {
            host.log_str(level, msg);
        }
    }

    fn ct(&self) -> Result<&CtConfig> {
        self.ct
            .as_ref()
            .ok_or_else(|| VzError::Config("the driver was not initialised".into()))
    }

    fn tools(&mut self) -> Result<&mut (dyn VzTools + 'static)> {
        self.tools
            .as_deref_mut()
            .ok_or_else(|| VzError::Config("the driver was not initialised".into()))
    }

    fn run(&mut self, cmd: VzCommand) -> Result<String> {
        self.tools()?.run(&cmd)
    }

    fn ctid(&self) -> Result<String> {
        Ok(self.ct()?.ctid.clone())
    }

    /// The directories holding the container's deltas: `VE_PRIVATE`, and
    /// the directory of each disk outside it.
    pub fn sync_dirs(&self) -> Result<Vec<String>> {
        let ct = self.ct()?;
        let private = self.layout.host(&ct.private);
        let mut dirs = vec![private.clone()];
        for d in &ct.disks {
            let dd = self.layout.host(&d.descriptor());
            let dir = dd.parent().unwrap_or(Path::new("/")).to_path_buf();
            if !dirs.iter().any(|x| dir.starts_with(x)) {
                dirs.push(dir);
            }
        }
        Ok(dirs.iter().map(|d| d.display().to_string()).collect())
    }

    /// The secondary disks' devices, asked of ploop once.
    fn disk_devices(&mut self) -> Result<Vec<DiskDevice>> {
        if let Some(d) = &self.devices {
            return Ok(d.clone());
        }
        let mut out = Vec::new();
        let disks: Vec<_> = self.ct()?.secondary_disks().cloned().collect();
        for d in disks {
            let dd = self.layout.host(&d.descriptor());
            let stdout = self.run(VzCommand::Device {
                descriptor: dd.display().to_string(),
            })?;
            let dev = tools::parse_device(&stdout).ok_or_else(|| VzError::Tool {
                command: format!("ploop info -d {}", dd.display()),
                message: format!("no device in its output `{}`", stdout.trim()),
            })?;
            let name = dev
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // The filesystem's partition, as libvzctl's get_fs_partdev.
            let sys = self.layout.host(&format!("/sys/block/{name}/{name}p1/dev"));
            let text = std::fs::read_to_string(&sys).map_err(|e| VzError::io(&sys, e))?;
            let (major, minor) = text
                .trim()
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| {
                    VzError::descriptor(&sys, format!("`{}` is not MAJOR:MINOR", text.trim()))
                })?;
            out.push(DiskDevice {
                uuid: d.uuid.clone(),
                major,
                minor,
            });
        }
        self.devices = Some(out.clone());
        Ok(out)
    }

    fn init_inner(&mut self, ctx: &InitContext) -> Result<()> {
        let opts = VzOptions::parse(
            ctx.options
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_str())),
        )?;
        let ctid = ctx.id.as_str();
        check_ctid(ctid)?;
        self.layout = Layout::new(opts.root.clone().unwrap_or_else(|| PathBuf::from("/")));
        let ct = CtConfig::load(&self.layout, ctid)?;
        self.shared = match opts.shared_disks {
            Some(b) => b,
            None => match ct.shared_disks.as_deref() {
                None => false,
                Some(v) => flag(v, "PHAUL_SHARED_DISKS")?,
            },
        };
        if ctx.side == Side::Source && self.layout.init_pid(ctid)?.is_none() {
            return Err(VzError::NotFound(format!(
                "container {ctid} is not running ({} does not exist)",
                self.layout.init_pid_file(ctid).display()
            )));
        }
        self.ct = Some(ct);
        self.side = Some(ctx.side);
        self.mode = Some(ctx.mode);
        self.work_dir = PathBuf::from(ctx.work_dir.as_str());
        self.host = Some(ctx.host.clone());
        if self.tools.is_none() {
            self.tools = Some(Box::new(RealTools::new(ctx.host.clone())));
        }
        Ok(())
    }

    fn snapshot_disks(&mut self) -> Result<()> {
        let ct = self.ct()?.clone();
        let copy_offline = self.mode == Some(Mode::Restart);
        let mut disks: Vec<SharedDisk> = ct
            .disks
            .iter()
            .map(|d| SharedDisk::new(&d.descriptor(), self.layout.host(&d.descriptor())))
            .collect();
        let tools = self.tools()?;
        let mut guids = ploop::new_guid;
        for i in 0..disks.len() {
            if let Err(e) = disks[i].prepare(tools, &mut guids, copy_offline) {
                // Put back the disks done so far, newest first.
                let mut msg = e.to_string();
                for d in disks[..i].iter_mut().rev() {
                    if let Err(r) = d.rollback(tools) {
                        msg.push_str(&format!("; rolling back {}: {r}", d.descriptor().display()));
                    }
                }
                return Err(VzError::descriptor(disks[i].descriptor(), msg));
            }
        }
        self.disks = disks;
        Ok(())
    }

    fn meta_out(&mut self, dir: &str) -> Result<Vec<String>> {
        let dir = Path::new(dir);
        let ct = self.ct()?.clone();
        let conf = dir.join(meta::CONF);
        std::fs::write(&conf, &ct.text).map_err(|e| VzError::io(&conf, e))?;
        let mut names = vec![meta::CONF.to_string()];
        if self.mode == Some(Mode::Live) {
            let (ve, warnings) = meta::write_ve_images(self.tools()?, &ct.ctid, dir)?;
            for w in warnings {
                self.log(LogLevel::Warn, &w);
            }
            names.extend(ve);
        }
        let handoffs: Vec<_> = self.disks.iter().filter_map(SharedDisk::handoff).collect();
        if !handoffs.is_empty() {
            let p = dir.join(meta::SHARED);
            let body = serde_json::to_vec_pretty(&HandoffFile {
                version: 1,
                disks: handoffs,
            })
            .map_err(|e| VzError::Config(e.to_string()))?;
            std::fs::write(&p, body).map_err(|e| VzError::io(&p, e))?;
            names.push(meta::SHARED.to_string());
        }
        Ok(names)
    }

    fn meta_in(&mut self, dir: &str, names: &[String]) -> Result<()> {
        let dir = Path::new(dir);
        let ct = self.ct()?.clone();
        for name in names {
            let p = dir.join(name);
            if name == meta::CONF {
                let text = std::fs::read_to_string(&p).map_err(|e| VzError::io(&p, e))?;
                let global = std::fs::read_to_string(self.layout.global_conf()).unwrap_or_default();
                let theirs = CtConfig::parse(&ct.ctid, &text, &global)?;
                if !theirs.same_container(&ct) {
                    return Err(VzError::Config(format!(
                        "the source's configuration of container {} describes another container \
                         than {} here (private area, root, interfaces or disks differ): copy the \
                         source's configuration here first",
                        ct.ctid,
                        self.layout.ct_conf(&ct.ctid).display()
                    )));
                }
                if theirs.text != ct.text {
                    self.log(
                        LogLevel::Warn,
                        &format!(
                            "{} differs from the source's (the same container otherwise); \
                             keeping this host's",
                            self.layout.ct_conf(&ct.ctid).display()
                        ),
                    );
                }
            } else if name == meta::SHARED {
                let body = std::fs::read(&p).map_err(|e| VzError::io(&p, e))?;
                let file: HandoffFile = serde_json::from_slice(&body)
                    .map_err(|e| VzError::descriptor(&p, e.to_string()))?;
                if file.version != 1 {
                    return Err(VzError::descriptor(
                        &p,
                        format!("version {} (this driver reads 1)", file.version),
                    ));
                }
                for h in file.disks {
                    // Merge only what is one of this container's disks here.
                    if !ct.disks.iter().any(|d| d.descriptor() == h.descriptor) {
                        return Err(VzError::descriptor(
                            &p,
                            format!(
                                "names {}, which is not a disk of container {}",
                                h.descriptor, ct.ctid
                            ),
                        ));
                    }
                    self.merges.push((self.layout.host(&h.descriptor), h.guid));
                }
            } else if meta::is_ve_image(name) {
                let keep = self.work_dir.join(name);
                std::fs::copy(&p, &keep).map_err(|e| VzError::io(&keep, e))?;
                self.ve_images.push(keep);
            } else {
                return Err(VzError::Config(format!("unexpected meta file `{name}`")));
            }
        }
        Ok(())
    }

    fn restore_inner(&mut self, ctx: &RestoreContext) -> Result<i32> {
        let images = PathBuf::from(ctx.images_dir.as_str());
        let extra = images.join(RESTORE_EXTRA_ARGS);
        std::fs::write(
            &extra,
            format!(
                "VE_WORK_DIR={}\nVE_RESTORE_LOG_PATH=restore.log\n",
                self.work_dir.display()
            ),
        )
        .map_err(|e| VzError::io(&extra, e))?;
        for f in &self.ve_images {
            let to = images.join(f.file_name().unwrap_or_default());
            std::fs::copy(f, &to).map_err(|e| VzError::io(&to, e))?;
        }
        let cmd = VzCommand::Restore {
            ctid: self.ctid()?,
            dump_dir: images.display().to_string(),
        };
        let log = self.work_dir.join("vzctl-restore.log");
        let config = ctx.criu_config.to_string();
        let pid = self.tools()?.spawn_restore(&cmd, &config, &log)?;
        self.restore_started = true;
        Ok(pid)
    }

    fn init_pid(&self) -> Result<i32> {
        let ctid = self.ctid()?;
        self.layout.init_pid(&ctid)?.ok_or_else(|| {
            VzError::NotFound(format!(
                "container {ctid} has no init pid ({} does not exist)",
                self.layout.init_pid_file(&ctid).display()
            ))
        })
    }

    /// Every shared disk's result, the errors joined.
    fn each_disk(
        &mut self,
        what: &str,
        f: impl Fn(&mut SharedDisk, &mut dyn VzTools) -> Result<()>,
    ) -> Result<()> {
        let mut disks = std::mem::take(&mut self.disks);
        let mut errors = Vec::new();
        if let Ok(tools) = self.tools() {
            for d in disks.iter_mut().rev() {
                if let Err(e) = f(d, tools) {
                    errors.push(e.to_string());
                }
            }
        }
        self.disks = disks;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(VzError::Config(format!("{what}: {}", errors.join("; "))))
        }
    }
}

impl Driver for VzDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            name: RString::from("vz"),
            version: RString::from(env!("CARGO_PKG_VERSION")),
            description: RString::from(description(tools::vzctl_installed())),
            capabilities: Capabilities::PRE_DUMP
                | Capabilities::TCP_ESTABLISHED
                | Capabilities::LIVE
                | Capabilities::RESTART
                | Capabilities::SHARED_STORAGE
                | Capabilities::OWN_RESTORE,
        }
    }

    fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
        self.init_inner(&ctx)?;
        self.log(
            LogLevel::Debug,
            &format!(
                "vz driver ready for container {} ({}shared disks, root {})",
                ctx.id,
                if self.shared { "" } else { "no " },
                self.layout.root().display()
            ),
        );
        Ok(())
    }

    fn root_task_pid(&mut self) -> DriverResult<i32> {
        Ok(self.init_pid()?)
    }

    fn fs_sync(&mut self) -> DriverResult<FsSyncSpec> {
        if self.shared {
            return Ok(FsSyncSpec::shared_storage());
        }
        let mut spec = FsSyncSpec::paths(self.sync_dirs()?);
        // The filesystems inside the ploop images are copied block for
        // block: their inode numbers do not change.
        spec.inodes_persistent = true;
        Ok(spec)
    }

    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        let devices = self.disk_devices()?;
        criu::adjust_dump(opts, self.ct()?, &self.layout, &devices);
        Ok(())
    }

    fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        criu::adjust_restore(opts, self.ct()?, &self.layout);
        Ok(())
    }

    fn net_lock(&mut self) -> DriverResult<()> {
        // The container is frozen now and the final disk pass comes next:
        // what its filesystems hold in the page cache must be in the delta
        // files first (P.Haul's ploop copy froze the filesystem for this).
        let root = self.layout.host(&self.ct()?.root);
        if let Ok(f) = std::fs::File::open(&root) {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs on a descriptor we own.
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                return Err(VzError::io(&root, std::io::Error::last_os_error()).into());
            }
        }
        Ok(())
    }

    fn restore(&mut self, ctx: &RestoreContext) -> DriverResult<HookOutcome> {
        // The engine watches vzctl: its end before post-restore fails the
        // restore at once.
        let tool = self.restore_inner(ctx)?;
        Ok(HookOutcome::handled(tool))
    }

    fn restore_wait(&mut self) -> DriverResult<i32> {
        self.tools()?.wait_restore()?;
        Ok(self
            .ctid()
            .ok()
            .and_then(|c| self.layout.init_pid(&c).ok().flatten())
            .unwrap_or(0))
    }

    fn umount(&mut self) -> DriverResult<()> {
        // Source after success (its copy is gone; the disks are still
        // mounted), or destination during a rollback after vzctl restore
        // mounted them.
        if self.side == Some(Side::Source) || self.restore_started {
            let ctid = self.ctid()?;
            self.run(VzCommand::Umount { ctid })?;
        }
        Ok(())
    }

    fn stop(&mut self) -> DriverResult<()> {
        let ctid = self.ctid()?;
        self.run(VzCommand::Stop { ctid })?;
        Ok(())
    }

    fn start(&mut self) -> DriverResult<i32> {
        let ctid = self.ctid()?;
        self.run(VzCommand::Start { ctid })?;
        Ok(self.init_pid()?)
    }

    fn meta_files_out(&mut self, dir: &str) -> DriverResult<Vec<String>> {
        Ok(self.meta_out(dir)?)
    }

    fn meta_files_in(&mut self, dir: &str, names: &[String]) -> DriverResult<()> {
        Ok(self.meta_in(dir, names)?)
    }

    fn storage_snapshot(&mut self) -> DriverResult<()> {
        Ok(self.snapshot_disks()?)
    }

    fn storage_rollback(&mut self) -> DriverResult<()> {
        Ok(self.each_disk("rolling back the shared disks", |d, t| d.rollback(t))?)
    }

    fn storage_commit(&mut self) -> DriverResult<()> {
        Ok(self.each_disk("dropping the shared disks' copies", |d, _| d.commit())?)
    }

    fn migration_complete(&mut self) -> DriverResult<()> {
        let merges = std::mem::take(&mut self.merges);
        let mut errors = Vec::new();
        for (dd, guid) in &merges {
            if let Err(e) = shared::merge_on_destination(self.tools()?, dd, guid) {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DriverError::failed(format!(
                "the container runs, but merging its shared disks' snapshots failed (the disks \
                 read correctly; merge later with ploop snapshot-delete): {}",
                errors.join("; ")
            )))
        }
    }

    fn deadlines(&self) -> Vec<HookDeadline> {
        vec![
            // vzctl restore: mounting the disks and CRIU's own 180 s.
            HookDeadline::new("restore_wait", 600),
            // vzctl stop waits for the container's shutdown; start for its init.
            HookDeadline::new("stop", 300),
            HookDeadline::new("start", 300),
            // Merges of deltas the container wrote while it moved.
            HookDeadline::new("migration_complete", 600),
            HookDeadline::new("storage_rollback", 300),
            HookDeadline::new("umount", 120),
        ]
    }
}
