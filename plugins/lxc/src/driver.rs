//! The lxc driver itself (exported as a plugin by `lib.rs`).
//!
//! The engine dumps the container with its own CRIU (so pre-dumps where
//! the kernel tracks memory, the memory channel, rollback, statistics and
//! the commit protocol work as for the pid htype); this driver finds the
//! container, checks its configuration, and adds what CRIU needs to dump a
//! container as liblxc does (`--freeze-cgroup` of its freezer cgroup,
//! `--manage-cgroups=full` with its cgroup roots, its bind mounts as
//! external mounts keyed by their target, `--ext-mount-map auto`, external
//! sharing and masters, `--skip-in-flight`). The restore goes through
//! liblxc (`lxc-checkpoint -r`), so that LXC manages the restored container
//! (monitor, command socket: `lxc-info`, `lxc-attach`, `lxc-stop` work);
//! its CRIU reads the engine's action script from `CRIU_CONFIG_FILE`, which
//! holds the restored copy, never running, until the source commits.
//!
//! What moves: the container's processes (memory, files, sockets,
//! established TCP with `--tcp-established`, file locks), its
//! configuration (a meta file, rewritten on the destination for its
//! lxcpath and name), and its rootfs (phaul's file sync: live passes, then
//! a final one while frozen), or nothing of the rootfs with
//! `--shared-storage`. The destination's container directory is
//! `LXCPATH/NAME` with the destination's own `lxc.lxcpath` (`lxc-config
//! lxc.lxcpath`: its `/etc/lxc/lxc.conf`), never a path the source names.
//!
//! Options (both sides receive the same ones):
//! - `lxcpath=DIR`: the source's lxcpath (default: the source's
//!   `lxc.lxcpath`, or the lxcpath of the one running container of that
//!   name)
//! - `dst-id=NAME` (`--dst-id`): the container's name on the destination
//! - `bridge=BR`: attach its veths to `BR` on the destination (default: the
//!   bridge its configuration names)
//! - `shared-storage` (`--shared-storage`): both hosts see the rootfs at
//!   the same path; nothing is copied
//! - `keep-source` (`--keep-source`): after success, leave the source
//!   container stopped instead of destroying it
//! - `stop-timeout=SECONDS`: restart mode, how long `lxc-stop` waits for a
//!   clean shutdown before killing (default 30)

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use phaul_plugin_api::{
    Capabilities, CgroupMode, CriuOpts, Driver, DriverError, DriverInfo, DriverResult, FsSyncSpec,
    HookDeadline, HookOutcome, HostBox, HostExt, InitContext, KeyValue, LogLevel, Mode,
    RestoreContext, Side,
};
use serde::{Deserialize, Serialize};

use crate::config::{valid_name, Config, Lsms};
use crate::tools::{self, Container};

const KNOWN_OPTIONS: &[&str] = &[
    "lxcpath",
    "dst-id",
    "bridge",
    "shared-storage",
    "keep-source",
    "stop-timeout",
];

/// How long liblxc's restore may take to finish once the engine answered
/// CRIU's post-restore (or gave the restore up).
const RESTORE_FINISH: Duration = Duration::from_secs(30);

/// The meta file carrying the source's configuration file.
pub const CONFIG_META: &str = "lxc-config";
/// The meta file describing the source container.
pub const SOURCE_META: &str = "lxc-source.json";

/// Settings parsed from the driver options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LxcOptions {
    /// The source's lxcpath, if given.
    pub lxcpath: Option<PathBuf>,
    /// The name on the destination, if not the same.
    pub dst_id: Option<String>,
    /// The destination bridge for its veths.
    pub bridge: Option<String>,
    /// The rootfs is on storage both hosts see.
    pub shared_storage: bool,
    /// Leave the source stopped after success.
    pub keep_source: bool,
    /// Restart mode: `lxc-stop -t`.
    pub stop_timeout: u64,
}

impl LxcOptions {
    /// Parses `key=value` pairs; an unknown key or malformed value is an
    /// error naming it.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> DriverResult<Self> {
        let mut o = LxcOptions {
            stop_timeout: 30,
            ..LxcOptions::default()
        };
        for (key, value) in pairs {
            match key {
                "lxcpath" if value.starts_with('/') => o.lxcpath = Some(PathBuf::from(value)),
                "lxcpath" => {
                    return Err(DriverError::invalid(format!(
                        "option lxcpath={value}: expected an absolute directory"
                    )))
                }
                "dst-id" if valid_name(value) => o.dst_id = Some(value.to_string()),
                "dst-id" => {
                    return Err(DriverError::invalid(format!(
                        "--dst-id {value:?}: not a container name (letters, digits, `-`, `_`, `.`)"
                    )))
                }
                "bridge" if tools::valid_ifname(value) => o.bridge = Some(value.to_string()),
                "bridge" => {
                    return Err(DriverError::invalid(format!(
                        "option bridge={value}: not an interface name"
                    )))
                }
                "shared-storage" => o.shared_storage = phaul_plugin_api::flag_option(key, value)?,
                "keep-source" => o.keep_source = phaul_plugin_api::flag_option(key, value)?,
                "stop-timeout" => {
                    o.stop_timeout = value.parse().map_err(|_| {
                        DriverError::invalid(format!(
                            "option stop-timeout={value}: expected seconds"
                        ))
                    })?
                }
                _ => {
                    return Err(DriverError::invalid(format!(
                        "unknown option `{key}` for the lxc htype (known: {}; and for every \
                         htype file-locks, link-remap, ghost-limit, evasive-devices)",
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// What the source tells the destination about the container (the
/// [`SOURCE_META`] file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceMeta {
    /// Its name on the source.
    pub name: String,
    /// Its directory on the source (`LXCPATH/NAME`).
    pub dir: PathBuf,
    /// Its rootfs on the source.
    pub rootfs: Option<PathBuf>,
}

/// The container's cgroups, from `/proc/PID/cgroup` and the host's mounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroups {
    /// `CTRL:PATH` (cgroup v1) or `PATH` (v2 only) for CRIU's
    /// `--cgroup-root`.
    pub roots: Vec<String>,
    /// The directory whose freezer CRIU freezes the container with.
    pub freezer: Option<PathBuf>,
}

impl Cgroups {
    /// Parses `/proc/PID/cgroup` (`cgroup`) with the host's cgroup mounts
    /// (`mountinfo`, `/proc/self/mountinfo`).
    pub fn parse(cgroup: &str, mountinfo: &str) -> Cgroups {
        let mut v1 = Vec::new();
        let mut unified = None;
        for l in cgroup.lines() {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = match (f.next(), f.next(), f.next()) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => continue,
            };
            if ctrl.is_empty() {
                unified = Some(path.to_string());
            } else {
                v1.push((ctrl.to_string(), path.to_string()));
            }
        }
        // Mount points: (fstype, super options, mount point).
        let mounts: Vec<(String, String, String)> = mountinfo
            .lines()
            .filter_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let point = pre.split_whitespace().nth(4)?.to_string();
                let mut p = post.split_whitespace();
                let fstype = p.next()?.to_string();
                let opts = p.nth(1).unwrap_or_default().to_string();
                Some((fstype, opts, point))
            })
            .collect();
        let freezer_v1 = v1
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == "freezer"));
        let freezer = match (freezer_v1, &unified) {
            (Some((_, path)), _) => mounts
                .iter()
                .find(|(t, o, _)| t == "cgroup" && o.split(',').any(|o| o == "freezer"))
                .map(|(_, _, point)| join_cgroup(point, path)),
            (None, Some(path)) => mounts
                .iter()
                .find(|(t, _, _)| t == "cgroup2")
                .map(|(_, _, point)| join_cgroup(point, path)),
            (None, None) => None,
        };
        let roots = if v1.is_empty() {
            unified.into_iter().collect()
        } else {
            v1.into_iter().map(|(c, p)| format!("{c}:{p}")).collect()
        };
        Cgroups { roots, freezer }
    }
}

fn join_cgroup(point: &str, path: &str) -> PathBuf {
    Path::new(point).join(path.trim_start_matches('/'))
}

/// Which side of which migration this instance serves, and what it found.
enum State {
    /// Before `init`.
    New,
    /// The source: the running container and what it is made of.
    Source {
        ct: Container,
        config: Config,
        pid: i32,
        rootfs: Option<PathBuf>,
        cgroups: Cgroups,
    },
    /// The destination: where the container goes.
    Destination {
        ct: Container,
        /// This side created the container directory (rollback removes it).
        created_dir: bool,
        /// This side wrote the configuration (rollback removes it).
        wrote_config: bool,
        /// The bridges its veth networks attach to here (from the
        /// installed configuration).
        bridges: Vec<String>,
        restore: Option<Restore>,
    },
}

/// A running `lxc-checkpoint -r`.
struct Restore {
    child: Child,
    images: PathBuf,
    /// liblxc's log (`-o`).
    log: PathBuf,
    /// Its standard output and error.
    output: PathBuf,
}

/// The lxc htype driver.
pub struct LxcDriver {
    state: State,
    side: Side,
    mode: Mode,
    opts: LxcOptions,
    host: Option<HostBox>,
    work_dir: PathBuf,
}

impl Default for LxcDriver {
    fn default() -> Self {
        LxcDriver {
            state: State::New,
            side: Side::Source,
            mode: Mode::Live,
            opts: LxcOptions::default(),
            host: None,
            work_dir: PathBuf::new(),
        }
    }
}

impl LxcDriver {
    fn log(&self, level: LogLevel, msg: &str) {
        if let Some(h) = &self.host {
            h.log_str(level, msg);
        }
    }

    fn init_source(&mut self, id: &str) -> DriverResult<()> {
        let ct = find_container(id, self.opts.lxcpath.as_deref())?;
        let info = ct.info()?;
        let pid = match (info.state.as_str(), info.pid) {
            ("RUNNING", Some(pid)) => pid,
            (state, _) => {
                return Err(DriverError::invalid(format!(
                    "container {} in {} is {}: only a running container can be migrated \
                     ({})",
                    ct.name,
                    ct.lxcpath.display(),
                    if state.is_empty() {
                        "in no known state"
                    } else {
                        state
                    },
                    if state == "FROZEN" {
                        format!("lxc-unfreeze -P {} -n {}", ct.lxcpath.display(), ct.name)
                    } else {
                        format!("lxc-start -P {} -n {}", ct.lxcpath.display(), ct.name)
                    }
                )))
            }
        };
        let config = Config::read(&ct.config()).map_err(|e| DriverError::failed(e.0))?;
        let mut problems = config.problems(&ct.config(), &Lsms::probe(), self.opts.shared_storage);
        if self.mode == Mode::Restart {
            // No CRIU in restart mode: only the rootfs must be copyable.
            problems.retain(|p| p.starts_with("lxc.rootfs.path"));
        }
        if !problems.is_empty() {
            return Err(DriverError::invalid(format!(
                "container {} cannot be migrated as configured: {}",
                ct.name,
                problems.join("; ")
            )));
        }
        let rootfs = if self.opts.shared_storage {
            config.rootfs().ok()
        } else {
            Some(config.rootfs().map_err(DriverError::invalid)?)
        };
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cgroups = Cgroups::parse(
            &read(&format!("/proc/{pid}/cgroup")),
            &read("/proc/self/mountinfo"),
        );
        if self.mode == Mode::Live && cgroups.freezer.is_none() {
            return Err(DriverError::failed(format!(
                "container {}: no freezer cgroup found for its init {pid} (/proc/{pid}/cgroup)",
                ct.name
            )));
        }
        self.log(
            LogLevel::Info,
            &format!(
                "lxc: container {} in {} (init {pid}, rootfs {}, veths {:?})",
                ct.name,
                ct.lxcpath.display(),
                rootfs
                    .as_ref()
                    .map_or("shared".into(), |r| r.display().to_string()),
                info.links
            ),
        );
        self.state = State::Source {
            ct,
            config,
            pid,
            rootfs,
            cgroups,
        };
        Ok(())
    }

    fn init_destination(&mut self, id: &str) -> DriverResult<()> {
        let tool = match self.mode {
            Mode::Live => "lxc-checkpoint",
            Mode::Restart => "lxc-start",
        };
        if tools::which(tool).is_none() {
            return Err(DriverError::failed(format!(
                "LXC is not installed on the destination ({tool} is not on PATH): apt-get \
                 install lxc"
            )));
        }
        let name = self.opts.dst_id.clone().unwrap_or_else(|| id.to_string());
        let lxcpath = tools::default_lxcpath()?;
        let ct = Container::new(&lxcpath, &name);
        if let Some(pid) = tools::lxc_process_for(&lxcpath, &name) {
            return Err(DriverError::failed(format!(
                "an LXC process for {name} in {} still runs on the destination (pid {pid}: \
                 an earlier restore that did not finish?); stop it (kill {pid}) and retry",
                lxcpath.display()
            )));
        }
        let running = tools::running_monitors()
            .into_iter()
            .any(|(p, n)| p == lxcpath && n == name);
        if ct.config().exists() || running {
            return Err(DriverError::invalid(format!(
                "a container {name} already exists in {} on the destination (lxc-destroy -P {} \
                 -n {name} there, or choose another name with --dst-id)",
                lxcpath.display(),
                lxcpath.display()
            )));
        }
        self.log(
            LogLevel::Info,
            &format!("lxc: the container goes to {}", ct.dir().display()),
        );
        self.state = State::Destination {
            created_dir: !ct.dir().exists(),
            ct,
            wrote_config: false,
            bridges: Vec::new(),
            restore: None,
        };
        Ok(())
    }

    fn source(&self) -> DriverResult<&Container> {
        match &self.state {
            State::Source { ct, .. } => Ok(ct),
            _ => Err(DriverError::failed("lxc: not initialised as the source")),
        }
    }

    fn destination(&self) -> DriverResult<&Container> {
        match &self.state {
            State::Destination { ct, .. } => Ok(ct),
            _ => Err(DriverError::failed(
                "lxc: not initialised as the destination",
            )),
        }
    }

    /// Source, after success: the tree is gone; wait for LXC to see the
    /// container stopped, then remove it (or leave it stopped).
    fn retire_source(&mut self) -> DriverResult<()> {
        let keep = self.opts.keep_source;
        let shared = self.opts.shared_storage;
        let State::Source { ct, .. } = &self.state else {
            return Ok(());
        };
        let ct = ct.clone();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match ct.info() {
                Ok(i) if i.state == "STOPPED" => break,
                Ok(i) if Instant::now() >= until => {
                    self.log(
                        LogLevel::Warn,
                        &format!("lxc: {} is still {}; stopping it", ct.name, i.state),
                    );
                    ct.kill()?;
                    break;
                }
                Err(e) => return Err(e),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if keep {
            self.log(
                LogLevel::Info,
                &format!("lxc: --keep-source: {} stays here, stopped", ct.name),
            );
            return Ok(());
        }
        if shared {
            // The rootfs is the destination's now: unregister only.
            std::fs::remove_file(ct.config()).map_err(|e| {
                DriverError::failed(format!("removing {}: {e}", ct.config().display()))
            })?;
            self.log(
                LogLevel::Info,
                &format!(
                    "lxc: removed {} (the shared rootfs stays for the destination)",
                    ct.config().display()
                ),
            );
            return Ok(());
        }
        ct.destroy()?;
        self.log(LogLevel::Info, &format!("lxc: destroyed {} here", ct.name));
        Ok(())
    }
}

/// The container `name`: in `lxcpath` when given; otherwise in this host's
/// default lxcpath or the lxcpath of a running container of that name,
/// refusing when that is not exactly one.
fn find_container(name: &str, lxcpath: Option<&Path>) -> DriverResult<Container> {
    if !valid_name(name) {
        return Err(DriverError::invalid(format!(
            "{name:?} is not a container name (letters, digits, `-`, `_`, `.`)"
        )));
    }
    if let Some(p) = lxcpath {
        let ct = Container::new(p, name);
        if !ct.config().exists() {
            return Err(DriverError::not_found(format!(
                "no container {name} in {} (no {}; `lxc-ls -P {}` lists them)",
                p.display(),
                ct.config().display(),
                p.display()
            )));
        }
        return Ok(ct);
    }
    let default = tools::default_lxcpath()?;
    let mut found: Vec<PathBuf> = Vec::new();
    if Container::new(&default, name).config().exists() {
        found.push(default.clone());
    }
    for (p, n) in tools::running_monitors() {
        if n == name && !found.contains(&p) && Container::new(&p, name).config().exists() {
            found.push(p);
        }
    }
    match found.len() {
        1 => Ok(Container::new(&found[0], name)),
        0 => Err(DriverError::not_found(format!(
            "no container {name}: not in the default lxcpath {} and no running container of \
             that name elsewhere (`lxc-ls` lists them; -o lxcpath=DIR names another lxcpath)",
            default.display()
        ))),
        _ => Err(DriverError::invalid(format!(
            "container {name} is ambiguous: there is one in each of {}; choose with -o \
             lxcpath=DIR",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn io<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DriverError + 'a {
    move |e| DriverError::failed(format!("{what} {}: {e}", path.display()))
}

/// What to do about a CRIU restore error this driver recognises.
fn restore_hint(criu_errors: &str) -> &'static str {
    if criu_errors.contains("Can't restore link: -17") {
        " (an interface the container's network needs already exists on the destination: a \
         fixed lxc.net.N.veth.pair name that is taken there?)"
    } else if criu_errors.contains("No mapping for") {
        " (a bind mount of the container has no source on the destination: check its \
         lxc.mount.entry lines there)"
    } else {
        ""
    }
}

/// The `Error` lines at the end of a CRIU or liblxc log, for messages.
fn log_errors(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("ERROR"))
        .filter(|l| !l.contains("RLIMIT_NOFILE"))
        .collect();
    errors[errors.len().saturating_sub(4)..].join(" | ")
}

impl Driver for LxcDriver {
    fn info(&self) -> DriverInfo {
        let mut description = "LXC system containers, restored under LXC's management (liblxc's \
                               lxc-checkpoint -r)"
            .to_string();
        if tools::which("lxc-checkpoint").is_none() {
            description.push_str(" [LXC is not installed here: no lxc-checkpoint on PATH]");
        }
        DriverInfo {
            name: "lxc".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: description.into(),
            capabilities: Capabilities::LIVE
                | Capabilities::RESTART
                | Capabilities::PRE_DUMP
                | Capabilities::TCP_ESTABLISHED
                | Capabilities::SHARED_STORAGE
                | Capabilities::OWN_RESTORE,
        }
    }

    fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
        self.opts = LxcOptions::parse(
            ctx.options
                .iter()
                .map(|kv: &KeyValue| (kv.key.as_str(), kv.value.as_str())),
        )?;
        self.side = ctx.side;
        self.mode = ctx.mode;
        self.work_dir = PathBuf::from(ctx.work_dir.as_str());
        self.host = Some(ctx.host.clone());
        match ctx.side {
            Side::Source => self.init_source(ctx.id.as_str()),
            Side::Destination => self.init_destination(ctx.id.as_str()),
        }
    }

    fn root_task_pid(&mut self) -> DriverResult<i32> {
        match &self.state {
            State::Source { pid, .. } => Ok(*pid),
            _ => Err(DriverError::failed("lxc: not initialised as the source")),
        }
    }

    fn fs_sync(&mut self) -> DriverResult<FsSyncSpec> {
        if self.opts.shared_storage {
            return Ok(FsSyncSpec::shared_storage());
        }
        match &self.state {
            State::Source {
                rootfs: Some(r), ..
            } => Ok(FsSyncSpec::paths([r.display().to_string()])),
            State::Destination { ct, .. } => Ok(FsSyncSpec::paths([ct
                .dir()
                .join("rootfs")
                .display()
                .to_string()])),
            _ => Err(DriverError::failed("lxc: fs_sync before init")),
        }
    }

    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        let State::Source {
            config, cgroups, ..
        } = &self.state
        else {
            return Err(DriverError::failed("lxc: not initialised as the source"));
        };
        opts.cgroup_mode = CgroupMode::Full;
        if let Some(f) = &cgroups.freezer {
            opts.freeze_cgroup = Some(f.display().to_string().into()).into();
        }
        for m in config.bind_mounts() {
            opts.external.push(m.external().into());
        }
        for fs in ["hugetlbfs", "tracefs"] {
            opts.enable_fs.push(fs.into());
        }
        for root in &cgroups.roots {
            opts.extra.push(KeyValue::new("cgroup-root", root.as_str()));
        }
        for flag in [
            "auto-ext-mnt",
            "ext-sharing",
            "ext-masters",
            "tcp-skip-in-flight",
        ] {
            opts.extra.push(KeyValue::new(flag, ""));
        }
        Ok(())
    }

    /// Source: nothing beyond CRIU's own lock, on purpose. CRIU locks the
    /// container's network namespace (nftables) when it freezes it, so
    /// peers see a pause, not resets, and CRIU removes that lock itself
    /// whatever happens to phaul (a resumed tree is unlocked by CRIU even
    /// if phaul is killed). A host-side lock would outlive a killed phaul:
    /// taking the host-side veth down marks the container's routes
    /// `linkdown` in the images (CRIU then cannot restore them), and
    /// detaching it from its bridge leaves a resumed container cut off.
    fn net_lock(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Destination, CRIU unlocked the restored container: check that its
    /// host-side veths are on the bridges its configuration names (liblxc
    /// attaches them during the restore); a mismatch is reported.
    fn net_unlock(&mut self) -> DriverResult<()> {
        let State::Destination { ct, bridges, .. } = &self.state else {
            return Ok(());
        };
        let links = ct.info()?.links;
        let stray: Vec<String> = links
            .iter()
            .filter(|l| !tools::link_master(l).is_some_and(|m| bridges.contains(&m)))
            .map(|l| {
                format!(
                    "{l} (on {})",
                    tools::link_master(l).unwrap_or("no bridge".into())
                )
            })
            .collect();
        if stray.is_empty() || bridges.is_empty() {
            return Ok(());
        }
        Err(DriverError::failed(format!(
            "lxc: {}'s host-side veths {} are not on its bridges {bridges:?}",
            ct.name,
            stray.join(", ")
        )))
    }

    fn stop(&mut self) -> DriverResult<()> {
        self.source()?.stop(self.opts.stop_timeout)
    }

    fn start(&mut self) -> DriverResult<i32> {
        match &self.state {
            State::Source { ct, .. } | State::Destination { ct, .. } => ct.start(),
            State::New => Err(DriverError::failed("lxc: start before init")),
        }
    }

    fn meta_files_out(&mut self, dir: &str) -> DriverResult<Vec<String>> {
        let State::Source {
            ct, config, rootfs, ..
        } = &self.state
        else {
            return Err(DriverError::failed("lxc: not initialised as the source"));
        };
        let dir = Path::new(dir);
        let mut text = config.lines.join("\n");
        text.push('\n');
        let p = dir.join(CONFIG_META);
        std::fs::write(&p, text).map_err(io("writing", &p))?;
        let meta = SourceMeta {
            name: ct.name.clone(),
            dir: ct.dir(),
            rootfs: rootfs.clone(),
        };
        let p = dir.join(SOURCE_META);
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| DriverError::failed(e.to_string()))?;
        std::fs::write(&p, json).map_err(io("writing", &p))?;
        Ok(vec![CONFIG_META.into(), SOURCE_META.into()])
    }

    fn meta_files_in(&mut self, dir: &str, names: &[String]) -> DriverResult<()> {
        for want in [CONFIG_META, SOURCE_META] {
            if !names.iter().any(|n| n == want) {
                return Err(DriverError::failed(format!(
                    "lxc: the source sent no {want} (is it an lxc driver?)"
                )));
            }
        }
        let dir = Path::new(dir);
        let p = dir.join(SOURCE_META);
        let meta: SourceMeta =
            serde_json::from_slice(&std::fs::read(&p).map_err(io("reading", &p))?)
                .map_err(|e| DriverError::failed(format!("lxc: {}: {e}", p.display())))?;
        let p = dir.join(CONFIG_META);
        let config = Config::parse(&std::fs::read_to_string(&p).map_err(io("reading", &p))?);
        let shared = self.opts.shared_storage;
        let bridge = self.opts.bridge.clone();
        let State::Destination {
            ct,
            wrote_config,
            bridges: want,
            ..
        } = &mut self.state
        else {
            return Err(DriverError::failed(
                "lxc: not initialised as the destination",
            ));
        };
        // The rootfs: the copy in this container's directory, or with
        // shared storage the source's own path, which must be here too.
        let rootfs = if shared {
            let r = meta.rootfs.clone().ok_or_else(|| {
                DriverError::failed("lxc: the source named no rootfs for the shared storage")
            })?;
            if !r.is_dir() {
                return Err(DriverError::failed(format!(
                    "--shared-storage: the container's rootfs {} is not on this host (is it on \
                     storage both hosts mount at the same path?)",
                    r.display()
                )));
            }
            r
        } else {
            ct.dir().join("rootfs")
        };
        let text = config.rewritten(&meta.dir, &ct.dir(), Some(&rootfs), bridge.as_deref());
        std::fs::create_dir_all(ct.dir()).map_err(io("creating", &ct.dir()))?;
        let tmp = ct.dir().join(".config.phaul");
        std::fs::write(&tmp, &text).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, ct.config()).map_err(io("installing", &ct.config()))?;
        *wrote_config = true;
        let installed = Config::parse(&text);
        *want = installed
            .networks()
            .into_iter()
            .filter(|n| installed.get(&format!("lxc.net.{n}.type")) == Some("veth"))
            .filter_map(|n| {
                installed
                    .get(&format!("lxc.net.{n}.link"))
                    .map(str::to_string)
            })
            .collect();
        let msg = format!(
            "lxc: installed {} (from {} on the source)",
            ct.config().display(),
            meta.dir.display()
        );
        self.log(LogLevel::Info, &msg);
        Ok(())
    }

    fn restore(&mut self, ctx: &RestoreContext) -> DriverResult<HookOutcome> {
        if ctx.criu_config.is_empty() {
            return Err(DriverError::failed(
                "lxc: the engine gave no CRIU configuration to hold the restore with",
            ));
        }
        // liblxc's CRIU reads one CRIU_CONFIG_FILE: the engine's (its
        // action script) plus the network lock phaul's CRIU dumped with.
        let engine = Path::new(ctx.criu_config.as_str());
        let mut conf = std::fs::read_to_string(engine).map_err(io("reading", engine))?;
        conf.push_str("network-lock nftables\n");
        let conf_path = self.work_dir.join("criu-lxc.conf");
        std::fs::write(&conf_path, conf).map_err(io("writing", &conf_path))?;
        let criu_dir = self
            .host
            .as_ref()
            .map(|h| PathBuf::from(h.criu_binary().as_str()))
            .and_then(|b| b.parent().map(Path::to_path_buf));
        let log = self.work_dir.join("lxc-restore.log");
        let output = self.work_dir.join("lxc-checkpoint.out");
        let images = PathBuf::from(ctx.images_dir.as_str());
        let State::Destination { ct, restore, .. } = &mut self.state else {
            return Err(DriverError::failed(
                "lxc: not initialised as the destination",
            ));
        };
        let child = ct.spawn_restore(&images, &conf_path, criu_dir.as_deref(), &log, &output)?;
        let tool = child.id() as i32;
        *restore = Some(Restore {
            child,
            images,
            log,
            output,
        });
        // The engine watches lxc-checkpoint: its end before CRIU's
        // post-restore is a failed restore.
        Ok(HookOutcome::handled(tool))
    }

    fn restore_wait(&mut self) -> DriverResult<i32> {
        let State::Destination { ct, restore, .. } = &mut self.state else {
            return Err(DriverError::failed(
                "lxc: not initialised as the destination",
            ));
        };
        let Some(r) = restore.take() else {
            return Err(DriverError::failed("lxc: no restore was started"));
        };
        // The engine has answered CRIU (let the copy run, or discard it):
        // liblxc's restore ends within seconds either way. One that does
        // not is killed, so that the engine can clean up.
        let mut child = r.child;
        let until = Instant::now() + RESTORE_FINISH;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DriverError::failed(format!(
                    "lxc-checkpoint -r -P {} -n {} did not finish within {RESTORE_FINISH:?} of \
                     the engine's answer and was killed; CRIU: {}; liblxc: {}",
                    ct.lxcpath.display(),
                    ct.name,
                    log_errors(&r.images.join("restore.log")),
                    log_errors(&r.log),
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child
            .wait()
            .map_err(|e| DriverError::failed(format!("waiting for lxc-checkpoint -r: {e}")))?;
        if !status.success() {
            let said = std::fs::read_to_string(&r.output).unwrap_or_default();
            let criu = log_errors(&r.images.join("restore.log"));
            return Err(DriverError::failed(format!(
                "lxc-checkpoint -r -P {} -n {} failed ({}): {}; CRIU: {criu}; liblxc: {}{}",
                ct.lxcpath.display(),
                ct.name,
                status,
                said.trim().lines().last().unwrap_or_default(),
                log_errors(&r.log),
                restore_hint(&criu),
            )));
        }
        let info = ct.info()?;
        match (info.state.as_str(), info.pid) {
            ("RUNNING", Some(pid)) => Ok(pid),
            (state, _) => Err(DriverError::failed(format!(
                "lxc-checkpoint -r succeeded but {} is {state}",
                ct.name
            ))),
        }
    }

    fn migration_complete(&mut self) -> DriverResult<()> {
        match self.side {
            Side::Source => self.retire_source(),
            Side::Destination => {
                let ct = self.destination()?;
                let msg = format!(
                    "lxc: {} runs here under LXC ({})",
                    ct.name,
                    ct.lxcpath.display()
                );
                self.log(LogLevel::Info, &msg);
                Ok(())
            }
        }
    }

    fn migration_fail(&mut self) -> DriverResult<()> {
        match self.side {
            Side::Source => Ok(()), // CRIU resumed the container as it was
            Side::Destination => {
                let State::Destination {
                    ct,
                    created_dir,
                    wrote_config,
                    restore,
                    ..
                } = &mut self.state
                else {
                    return Ok(());
                };
                if let Some(mut r) = restore.take() {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
                let mut errors = Vec::new();
                if ct.info().is_ok_and(|i| i.state != "STOPPED") {
                    if let Err(e) = ct.kill() {
                        errors.push(e.to_string());
                    }
                }
                if *created_dir {
                    if let Err(e) = std::fs::remove_dir_all(ct.dir()) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            errors.push(format!("removing {}: {e}", ct.dir().display()));
                        }
                    }
                } else if *wrote_config {
                    if let Err(e) = std::fs::remove_file(ct.config()) {
                        errors.push(format!("removing {}: {e}", ct.config().display()));
                    }
                }
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(DriverError::failed(errors.join("; ")))
                }
            }
        }
    }

    fn deadlines(&self) -> Vec<HookDeadline> {
        // lxc-stop waits up to stop-timeout (30 s) for a clean shutdown;
        // lxc-destroy removes a whole rootfs.
        vec![
            HookDeadline::new("stop", 120),
            HookDeadline::new("start", 120),
            HookDeadline::new("migration_complete", 300),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_refuse_clearly() {
        let o = LxcOptions::parse([
            ("lxcpath", "/srv/lxc"),
            ("dst-id", "web2"),
            ("bridge", "br0"),
            ("keep-source", ""),
        ])
        .unwrap();
        assert_eq!(o.lxcpath, Some(PathBuf::from("/srv/lxc")));
        assert_eq!(o.dst_id.as_deref(), Some("web2"));
        assert_eq!(o.bridge.as_deref(), Some("br0"));
        assert!(o.keep_source && !o.shared_storage);
        assert_eq!(o.stop_timeout, 30);
        for (k, v, want) in [
            ("lxcpath", "rel", "absolute"),
            ("dst-id", "a/b", "not a container name"),
            ("bridge", "a b", "interface name"),
            ("sync", "/x", "unknown option `sync`"),
            ("stop-timeout", "soon", "seconds"),
        ] {
            let e = LxcOptions::parse([(k, v)]).unwrap_err().to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
        }
    }

    #[test]
    fn cgroups_v1_roots_and_freezer() {
        let cgroup = "9:name=systemd:/lxc.payload.c1\n6:freezer:/lxc.payload.c1\n\
                      2:cpu,cpuacct:/lxc.payload.c1\n0::/lxc.payload.c1\n";
        let mountinfo = "\
33 24 0:29 / /sys/fs/cgroup/freezer rw,relatime shared:11 - cgroup cgroup rw,freezer
34 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
";
        let c = Cgroups::parse(cgroup, mountinfo);
        assert_eq!(
            c.roots,
            vec![
                "name=systemd:/lxc.payload.c1",
                "freezer:/lxc.payload.c1",
                "cpu,cpuacct:/lxc.payload.c1"
            ]
        );
        assert_eq!(
            c.freezer,
            Some(PathBuf::from("/sys/fs/cgroup/freezer/lxc.payload.c1"))
        );
    }

    #[test]
    fn cgroups_v2_only() {
        let c = Cgroups::parse(
            "0::/lxc.payload.c1\n",
            "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        assert_eq!(c.roots, vec!["/lxc.payload.c1"]);
        assert_eq!(
            c.freezer,
            Some(PathBuf::from("/sys/fs/cgroup/lxc.payload.c1"))
        );
    }

    #[test]
    fn dump_options_carry_the_container() {
        let config = Config::parse(
            "lxc.rootfs.path = dir:/l/c1/rootfs\nlxc.mount.entry = /usr/lib lib none ro,bind 0 0\n",
        );
        let mut d = LxcDriver {
            state: State::Source {
                ct: Container::new(Path::new("/l"), "c1"),
                config,
                pid: 42,
                rootfs: Some(PathBuf::from("/l/c1/rootfs")),
                cgroups: Cgroups {
                    roots: vec!["freezer:/lxc.payload.c1".into()],
                    freezer: Some(PathBuf::from("/sys/fs/cgroup/freezer/lxc.payload.c1")),
                },
            },
            ..LxcDriver::default()
        };
        let mut o = CriuOpts::default();
        d.adjust_dump_opts(&mut o).unwrap();
        assert_eq!(o.cgroup_mode, CgroupMode::Full);
        assert_eq!(
            o.freeze_cgroup.as_ref().map(|s| s.as_str()).into_option(),
            Some("/sys/fs/cgroup/freezer/lxc.payload.c1")
        );
        assert_eq!(
            o.external.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["mnt[/lib]:lib"]
        );
        let extra: Vec<(&str, &str)> = o
            .extra
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert!(
            extra.contains(&("cgroup-root", "freezer:/lxc.payload.c1")),
            "{extra:?}"
        );
        assert!(extra.contains(&("auto-ext-mnt", "")), "{extra:?}");
        assert_eq!(d.root_task_pid().unwrap(), 42);
        assert_eq!(
            d.fs_sync()
                .unwrap()
                .paths
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>(),
            ["/l/c1/rootfs"]
        );
    }
}
