//! The docker driver itself (exported as a plugin by `lib.rs`).
//!
//! Before anything is frozen, the source's driver describes the container
//! (`describe`: image, `Config`, `HostConfig`, networks, bind-mount
//! sources, volumes) and the destination's checks that description against
//! its own rules and its engine (the image, the name, the bind sources, the
//! volumes) and creates the same container there through its engine's API.
//! The engine then dumps the container's processes with its own CRIU and
//! the options runc's checkpoint uses (the merged rootfs as `--root`, its
//! freezer cgroup, every bind mount and cgroup controller mount as an
//! external mount keyed by its in-container destination, masked files as
//! `/dev/null`), so the memory channel, statistics and the commit protocol
//! work as for the pid htype, and the dump costs what CRIU costs (the
//! engine's own `docker checkpoint` tars the images into containerd's
//! content store first). The destination's engine restores: the driver puts
//! the synced writable layer and volumes under the new container, makes its
//! checkpoint directory of links to the engine's images (with runc's
//! `descriptors.json`) and calls `POST /containers/{id}/start?checkpoint=`.
//! runc's CRIU reads `/etc/criu/runc.conf`, which for the restore names a
//! hook that hands over to the engine's hold script in those images: the
//! restored copy is held, never running, at `post-restore` until the source
//! commits, and discarded otherwise. No daemon is restarted; the
//! destination's engine manages a normally running container afterwards
//! (`docker ps`, `stop`, `logs` work).
//!
//! What moves: the processes (memory, open files, pipes to the engine's
//! shim, sockets), the writable layer and plain local volumes (phaul's file
//! sync: live passes, a last one while frozen). What stays: bind-mount
//! sources and volumes on shared storage (the destination must have them;
//! checked), the image (it must exist on the destination; `-o send-image`
//! copies it through the engines' save/load before the freeze). The
//! container's address is the destination engine's choice unless it is a
//! static one (`--ip`) on a user-defined network both hosts have, so only
//! then do connections to it from outside survive.
//!
//! Options (both sides receive the same ones; the destination's engine is
//! its own `DOCKER_HOST`, never one the source names):
//! - `socket=PATH`: the source's engine socket (default `$DOCKER_HOST`,
//!   else /run/docker.sock)
//! - `dst-id=NAME` (`--dst-id`): the container's name on the destination
//! - `keep-source` (`--keep-source`): after success, leave the source
//!   container stopped instead of removing it
//! - `send-image`: copy the image to the destination if it lacks it
//! - `stop-timeout=SECONDS`: restart mode, how long `docker stop` waits
//!   before killing (default 10)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use phaul_plugin_api::{
    flag_option, Capabilities, CgroupMode, CriuOpts, Driver, DriverError, DriverInfo, DriverResult,
    FsSyncSpec, HookDeadline, HookOutcome, HostBox, HostExt, InitContext, KeyValue, LogLevel, Mode,
    RestoreContext, Side,
};
use serde_json::Value;

use crate::api::{encode, socket_from_host, Engine, Response, DEFAULT_SOCKET};
use crate::container::{
    create_body, external_mounts, freezer_cgroup, Inspected, SourceMeta, Volume,
};
use crate::runc;

const KNOWN_OPTIONS: &[&str] = &[
    "socket",
    "dst-id",
    "keep-source",
    "send-image",
    "stop-timeout",
];

/// The source fact describing the container (its `describe` answer).
pub const FACT: &str = "container";
/// The meta file with the source init's standard descriptors (runc's
/// name for it, in the checkpoint directory).
pub const DESCRIPTORS: &str = "descriptors.json";
/// runc's CRIU configuration file (read on every runc checkpoint/restore
/// of a container without an `org.criu.config` annotation).
pub const RUNC_CRIU_CONF: &str = "/etc/criu/runc.conf";
/// The action script runc's CRIU runs while phaul restores: it hands over
/// to the hold script in the images being restored, and does nothing for
/// any other checkpoint or restore (so a configuration left behind by a
/// killed phaul stays harmless).
pub const RUNC_HOOK: &str = "/var/lib/phaul/docker-runc-hook";
/// Where the host's own runc configuration is kept during a restore.
pub const RUNC_CONF_SAVED: &str = "/var/lib/phaul/docker-runc.conf.orig";
/// The first line of the configuration phaul writes (then the pid of the
/// phaul that wrote it).
const RUNC_MARKER: &str = "# phaul docker driver restore, by pid ";
/// runc's CRIU's log during phaul's restore, in the driver's directory.
const RESTORE_LOG: &str = "criu-restore.log";
/// The hold script's name in the checkpoint directory.
const HOLD_IN_IMAGES: &str = "phaul-hold";
const RUNC_HOOK_SCRIPT: &str = "#!/bin/sh\n\
# runc's CRIU runs this for every checkpoint and restore while phaul's docker\n\
# driver restores a container (/etc/criu/runc.conf): only the restore whose\n\
# images carry phaul's hold script is handed to it.\n\
[ -x \"$CRTOOLS_IMAGE_DIR/phaul-hold\" ] || exit 0\n\
exec \"$CRTOOLS_IMAGE_DIR/phaul-hold\"\n";
/// The checkpoint name the destination restores from.
const CHECKPOINT: &str = "phaul";
/// The image file in the transfer directory (`-o send-image`).
const IMAGE_TAR: &str = "image.tar";
/// How long the engine's start may take once the engine answered CRIU's
/// post-restore (or gave the restore up).
const START_FINISH: Duration = Duration::from_secs(60);

/// Settings parsed from the driver options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DockerOptions {
    /// The source engine's socket, if given.
    pub socket: Option<PathBuf>,
    /// The name on the destination, if not the same.
    pub dst_id: Option<String>,
    /// Leave the stopped source container after success.
    pub keep_source: bool,
    /// Copy the image if the destination lacks it.
    pub send_image: bool,
    /// `docker stop` timeout, seconds.
    pub stop_timeout: u32,
}

impl DockerOptions {
    /// Parses `key=value` pairs, refusing unknown keys with the list.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> DriverResult<Self> {
        let mut o = DockerOptions {
            stop_timeout: 10,
            ..Default::default()
        };
        for (k, v) in pairs {
            match k {
                "socket" => o.socket = Some(socket_from_host(v)?),
                "dst-id" => {
                    if !valid_name(v) {
                        return Err(DriverError::invalid(format!(
                            "dst-id={v}: not a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
                        )));
                    }
                    o.dst_id = Some(v.to_string())
                }
                "keep-source" => o.keep_source = flag_option(k, v)?,
                "send-image" => o.send_image = flag_option(k, v)?,
                "stop-timeout" => {
                    o.stop_timeout = v.parse().map_err(|_| {
                        DriverError::invalid(format!("stop-timeout={v}: expected seconds"))
                    })?
                }
                other => {
                    return Err(DriverError::invalid(format!(
                        "unknown docker option {other:?} (known: {})",
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Docker's container-name rule.
fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphanumeric())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '_' | '.' | '-'))
}

/// This side's engine: `DOCKER_HOST` (unix sockets only), else the
/// default socket.
fn local_engine() -> DriverResult<Engine> {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => Ok(Engine::new(socket_from_host(&h)?)),
        _ => Ok(Engine::new(DEFAULT_SOCKET)),
    }
}

/// An API answer that must be 2xx, else an error naming the call.
fn expect_ok(r: Response, what: &str) -> DriverResult<Response> {
    if r.ok() {
        return Ok(r);
    }
    Err(DriverError::failed(format!(
        "docker: {what}: the engine answered {}: {}",
        r.status,
        r.message()
    )))
}

fn io<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DriverError + 'a {
    move |e| DriverError::failed(format!("docker: {what} {}: {e}", path.display()))
}

/// `GET /containers/{id}/json`, refusing a missing container clearly.
fn inspect(engine: &Engine, id: &str) -> DriverResult<Inspected> {
    let r = engine.request("GET", &format!("/containers/{}/json", encode(id)), None)?;
    if r.status == 404 {
        return Err(DriverError::not_found(format!(
            "docker: no container {id:?} on the engine at {} ({})",
            engine.socket.display(),
            r.message()
        )));
    }
    Ok(Inspected::parse(
        expect_ok(r, "inspecting a container")?.json(),
    ))
}

/// The engine's data root (`GET /info`).
fn root_dir(engine: &Engine) -> DriverResult<PathBuf> {
    let info = expect_ok(engine.request("GET", "/info", None)?, "GET /info")?.json();
    info.get("DockerRootDir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .ok_or_else(|| DriverError::failed("docker: GET /info named no DockerRootDir"))
}

/// The source container.
struct Source {
    engine: Engine,
    ct: Inspected,
    freezer: Option<PathBuf>,
    /// Where `-o send-image` saves the image (synced before the freeze).
    transfer: PathBuf,
    volumes: Vec<Volume>,
}

/// The destination: where the container goes.
struct Dest {
    engine: Engine,
    root: PathBuf,
    /// Its name here (`--dst-id`, else the source's).
    name: String,
    /// The image to create it from (a tag naming the source's image here,
    /// else its id); `None` until a sent image is loaded.
    image: Option<String>,
    /// Staging directories the sync writes into (under the engine's data
    /// root, so that they are renamed into place, not copied).
    staging: PathBuf,
    /// The container this side created (rollback removes it).
    created: Option<String>,
    /// It, as its engine described it when it was created (its writable
    /// layer, its volumes' host paths).
    new_ct: Option<Inspected>,
    /// The source's description.
    meta: SourceMeta,
    /// runc's CRIU configuration as it was before the restore (restored
    /// afterwards): `Some(None)` when there was none.
    runc_conf: Option<Option<Vec<u8>>>,
    /// Held while this side's runc configuration is in place: one
    /// restore at a time on this host.
    runc_lock: Option<std::fs::File>,
    /// containerd's checkpoint copies present before the restore.
    tmp_before: Vec<PathBuf>,
    /// The source init's standard descriptors at the freeze (runc's
    /// `descriptors.json`).
    descriptors: Vec<String>,
    start: Option<Start>,
}

/// A running `start?checkpoint=`.
struct Start {
    done: mpsc::Receiver<DriverResult<()>>,
    /// The container restored.
    id: String,
    /// Set by the watchdog when runc's CRIU died and runc was killed.
    died: Arc<Mutex<Option<String>>>,
    /// A process that lives exactly as long as the request: the engine
    /// watches it to learn at once when the start failed. Whoever ends
    /// first (the request, or the driver giving it up) takes and kills it.
    sentinel: Sentinel,
}

impl Start {
    /// Waits up to `wait` for the start to return; if it does not, kills
    /// runc's restore of the container (so that it does) and waits a little
    /// more. `None` when it still did not return.
    fn finish(&self, wait: Duration) -> Option<DriverResult<()>> {
        if let Ok(r) = self.done.recv_timeout(wait) {
            return Some(r);
        }
        if let Some(r) = runc::restore_of(&self.id) {
            runc::kill_tree(r);
        }
        self.done.recv_timeout(Duration::from_secs(10)).ok()
    }
}

type Sentinel = Arc<Mutex<Option<Child>>>;

fn end_sentinel(s: &Sentinel) {
    if let Some(mut c) = s.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

enum State {
    New,
    Source(Box<Source>),
    Dest(Box<Dest>),
}

/// The docker htype driver.
pub struct DockerDriver {
    state: State,
    mode: Mode,
    opts: DockerOptions,
    host: Option<HostBox>,
    work_dir: PathBuf,
    warned_tcp: bool,
}

impl Default for DockerDriver {
    fn default() -> Self {
        DockerDriver {
            state: State::New,
            mode: Mode::Live,
            opts: DockerOptions::default(),
            host: None,
            work_dir: PathBuf::new(),
            warned_tcp: false,
        }
    }
}

/// Whatever the engine called last (a dry run ends after the pre-flight,
/// a given-up hook ends the instance): the destination's staging
/// directory and runc's configuration do not outlive the instance.
impl Drop for DockerDriver {
    fn drop(&mut self) {
        if let State::Dest(d) = &mut self.state {
            d.stop_start();
            let _ = d.restore_runc_conf();
            let _ = std::fs::remove_dir_all(&d.staging);
        }
    }
}

impl DockerDriver {
    fn log(&self, level: LogLevel, msg: &str) {
        if let Some(h) = &self.host {
            h.log_str(level, msg);
        }
    }

    fn source(&self) -> DriverResult<&Source> {
        match &self.state {
            State::Source(s) => Ok(s),
            _ => Err(DriverError::failed("docker: not initialised as the source")),
        }
    }

    fn dest(&mut self) -> DriverResult<&mut Dest> {
        match &mut self.state {
            State::Dest(d) => Ok(d),
            _ => Err(DriverError::failed(
                "docker: not initialised as the destination",
            )),
        }
    }

    fn init_source(&mut self, id: &str) -> DriverResult<()> {
        let engine = match &self.opts.socket {
            Some(s) => Engine::new(s),
            None => local_engine()?,
        };
        let ct = inspect(&engine, id)?;
        if !ct.running {
            return Err(DriverError::invalid(format!(
                "docker: container {} is {}: only a running container can be migrated ({})",
                ct.name,
                if ct.paused { "paused" } else { &ct.status },
                if ct.paused {
                    format!("docker unpause {}", ct.name)
                } else {
                    format!("docker start {}", ct.name)
                }
            )));
        }
        let problems = ct.problems(self.mode == Mode::Live);
        if !problems.is_empty() {
            return Err(DriverError::invalid(format!(
                "docker: container {} cannot be migrated: {}",
                ct.name,
                problems.join("; ")
            )));
        }
        if ct.upper.is_none() || ct.merged.is_none() {
            return Err(DriverError::failed(format!(
                "docker: the engine names no writable layer for {} (GraphDriver.Data)",
                ct.name
            )));
        }
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let freezer = freezer_cgroup(
            &read(&format!("/proc/{}/cgroup", ct.pid)),
            &read("/proc/self/mountinfo"),
        );
        if self.mode == Mode::Live && freezer.is_none() {
            return Err(DriverError::failed(format!(
                "docker: no freezer cgroup found for {}'s init {} (/proc/{}/cgroup)",
                ct.name, ct.pid, ct.pid
            )));
        }
        let transfer = self.work_dir.join("transfer");
        std::fs::create_dir_all(&transfer).map_err(io("creating", &transfer))?;
        if self.opts.send_image {
            let image = ct.raw["Image"].as_str().unwrap_or_default().to_string();
            let tar = transfer.join(IMAGE_TAR);
            let started = Instant::now();
            expect_ok(
                engine.download(&format!("/images/{}/get", encode(&image)), &tar)?,
                "saving the image",
            )?;
            let size = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
            self.log(
                LogLevel::Info,
                &format!(
                    "docker: saved image {image} ({} MiB, {:.1} s) to send along",
                    size >> 20,
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        self.log(
            LogLevel::Info,
            &format!(
                "docker: container {} ({}) on {}: init {}, writable layer {}, bind mounts {:?}",
                ct.name,
                &ct.id[..ct.id.len().min(12)],
                engine.socket.display(),
                ct.pid,
                ct.upper
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                ct.bind_sources()
            ),
        );
        let mut volumes = Vec::new();
        for (name, destination, source) in ct.volume_mounts() {
            let r = expect_ok(
                engine.request("GET", &format!("/volumes/{}", encode(&name)), None)?,
                &format!("inspecting volume {name}"),
            )?;
            volumes.push(Volume {
                synced: Volume::is_host_local(&r.json()),
                name,
                destination,
                source,
            });
        }
        if !volumes.is_empty() {
            let (synced, shared): (Vec<&Volume>, Vec<&Volume>) =
                volumes.iter().partition(|v| v.synced);
            let names = |v: Vec<&Volume>| {
                v.iter()
                    .map(|v| format!("{} at {}", v.name, v.destination))
                    .collect::<Vec<_>>()
            };
            self.log(
                LogLevel::Info,
                &format!(
                    "docker: volumes copied: {:?}; on shared storage, left alone: {:?}",
                    names(synced),
                    names(shared)
                ),
            );
        }
        self.state = State::Source(Box::new(Source {
            engine,
            ct,
            freezer,
            transfer,
            volumes,
        }));
        Ok(())
    }

    fn init_destination(&mut self, facts: Option<&str>) -> DriverResult<()> {
        let meta: SourceMeta = match facts {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                DriverError::failed(format!("docker: the source's description ({FACT}): {e}"))
            })?,
            None => {
                return Err(DriverError::failed(format!(
                    "docker: the source sent no {FACT} description (is it phaul's docker driver, \
                     plugin API 0.3 or later?)"
                )))
            }
        };
        let problems = meta.problems(self.mode == Mode::Live);
        if !problems.is_empty() {
            return Err(DriverError::invalid(format!(
                "docker: this host does not create container {} as described: {}",
                meta.name,
                problems.join("; ")
            )));
        }
        let engine = local_engine()?;
        let root = root_dir(&engine)?;
        if let Some(msg) = repair_runc_conf() {
            self.log(LogLevel::Warn, &msg);
        }
        let name = self
            .opts
            .dst_id
            .clone()
            .unwrap_or_else(|| meta.name.clone());
        refuse_taken(&engine, &name)?;
        for src in &meta.bind_sources {
            if !Path::new(src).exists() {
                return Err(DriverError::failed(format!(
                    "docker: the container bind-mounts {src}, which this host lacks (bind-mount \
                     sources are not copied: put them on storage both hosts share, or copy them \
                     first)"
                )));
            }
        }
        for v in &meta.volumes {
            let here = engine
                .request("GET", &format!("/volumes/{}", encode(&v.name)), None)?
                .ok();
            if v.synced && here {
                return Err(DriverError::invalid(format!(
                    "docker: a volume {} already exists on this host's engine; the container's \
                     (at {}) would be copied into it (docker volume rm it here, or migrate a \
                     container whose volume has another name)",
                    v.name, v.destination
                )));
            }
            if !v.synced && !here {
                return Err(DriverError::failed(format!(
                    "docker: the container's volume {} (at {}) is on shared storage and is not \
                     copied, but this host's engine has no volume {} (create it here with the \
                     same driver and options)",
                    v.name, v.destination, v.name
                )));
            }
        }
        let image = image_here(&engine, &meta)?;
        if image.is_none() && !meta.image_sent {
            return Err(DriverError::failed(format!(
                "docker: image {} ({}) is not on this host's engine at {}: load it (docker save | \
                 docker load, or pull it), or migrate with -o send-image",
                meta.image_ref,
                meta.image_id,
                engine.socket.display()
            )));
        }
        let session = self
            .work_dir
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| std::process::id().to_string());
        let staging = root.join("phaul").join(session);
        let synced = meta.volumes.iter().filter(|v| v.synced).count();
        for d in ["upper".to_string(), "transfer".into()]
            .into_iter()
            .chain((0..synced).map(|i| format!("volume-{i}")))
        {
            let p = staging.join(d);
            std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
        }
        self.log(
            LogLevel::Info,
            &format!(
                "docker: {} goes to the engine at {} as {name} (data root {}, image {})",
                meta.name,
                engine.socket.display(),
                root.display(),
                image.as_deref().unwrap_or("sent along")
            ),
        );
        self.state = State::Dest(Box::new(Dest {
            engine,
            root,
            name,
            image,
            staging,
            created: None,
            new_ct: None,
            meta,
            runc_conf: None,
            runc_lock: None,
            tmp_before: Vec::new(),
            descriptors: Vec::new(),
            start: None,
        }));
        Ok(())
    }

    /// Destination: the same container, from the source's configuration.
    fn create_container(&mut self) -> DriverResult<()> {
        let d = self.dest()?;
        let image = d
            .image
            .clone()
            .ok_or_else(|| DriverError::failed("docker: create before the image is here"))?;
        let r = expect_ok(
            d.engine.request(
                "POST",
                &format!("/containers/create?name={}", encode(&d.name)),
                Some(&create_body(&d.meta, &image)),
            )?,
            &format!("creating container {}", d.name),
        )?;
        let id = r.json()["Id"].as_str().unwrap_or_default().to_string();
        d.created = Some(id.clone());
        let ct = inspect(&d.engine, &id)?;
        if ct.upper.is_none() {
            return Err(DriverError::failed(format!(
                "docker: the new container {} has no UpperDir",
                d.name
            )));
        }
        d.new_ct = Some(ct);
        let msg = format!(
            "docker: created {} ({}) from {image}",
            d.name,
            &id[..id.len().min(12)]
        );
        self.log(LogLevel::Info, &msg);
        Ok(())
    }

    /// Destination, frozen: the image if it was sent, the container if
    /// it waited for it, then the synced writable layer in place of the
    /// new container's (a rename: the staging directory is on the data
    /// root's filesystem).
    fn install(&mut self) -> DriverResult<()> {
        if self.dest()?.image.is_none() {
            let d = self.dest()?;
            let tar = d.staging.join("transfer").join(IMAGE_TAR);
            expect_ok(
                d.engine.upload("/images/load?quiet=1", &tar)?,
                "loading the sent image",
            )?;
            d.image = image_here(&d.engine, &d.meta)?;
            if d.image.is_none() {
                return Err(DriverError::failed(format!(
                    "docker: the sent image did not load as {}",
                    d.meta.image_id
                )));
            }
        }
        if self.dest()?.created.is_none() {
            self.create_container()?;
        }
        let d = self.dest()?;
        let ct = d.new_ct.clone().ok_or_else(|| {
            DriverError::failed("docker: install before the container was created")
        })?;
        let upper = ct.upper.clone().unwrap_or_default();
        let staged = d.staging.join("upper");
        let empty = d.staging.join("upper.created");
        std::fs::rename(&upper, &empty).map_err(io("moving aside", &upper))?;
        std::fs::rename(&staged, &upper).map_err(io("installing the writable layer at", &upper))?;
        let _ = std::fs::remove_dir_all(&empty);
        // The copied volumes, onto the new container's (created with it).
        let staged: Vec<(PathBuf, Volume)> =
            d.staged_volumes().map(|(p, v)| (p, v.clone())).collect();
        for (from, v) in staged {
            let to = ct.mount_source(&v.destination).ok_or_else(|| {
                DriverError::failed(format!(
                    "docker: the new container has no volume at {}",
                    v.destination
                ))
            })?;
            let empty = from.with_extension("created");
            std::fs::rename(&to, &empty).map_err(io("moving aside", &to))?;
            std::fs::rename(&from, &to).map_err(io("installing volume data at", &to))?;
            let _ = std::fs::remove_dir_all(&empty);
        }
        Ok(())
    }

    /// Source, after success: the tree is gone; wait for the engine to see
    /// the container exit, then remove it (or leave it stopped).
    fn retire_source(&mut self) -> DriverResult<()> {
        let keep = self.opts.keep_source;
        let s = self.source()?;
        let (engine, id, name) = (s.engine.clone(), s.ct.id.clone(), s.ct.name.clone());
        let until = Instant::now() + Duration::from_secs(10);
        while inspect(&engine, &id)?.running {
            if Instant::now() >= until {
                expect_ok(
                    engine.request("POST", &format!("/containers/{id}/kill"), None)?,
                    "killing the source container",
                )?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if keep {
            self.log(
                LogLevel::Info,
                &format!("docker: --keep-source: {name} stays here, stopped"),
            );
            return Ok(());
        }
        // v=1: its anonymous volumes go with it; named ones stay.
        expect_ok(
            engine.request("DELETE", &format!("/containers/{id}?v=1&force=1"), None)?,
            "removing the source container",
        )?;
        self.log(LogLevel::Info, &format!("docker: removed {name} here"));
        Ok(())
    }
}

/// Refuses a name that is taken on this engine.
fn refuse_taken(engine: &Engine, name: &str) -> DriverResult<()> {
    let r = engine.request("GET", &format!("/containers/{}/json", encode(name)), None)?;
    if r.ok() {
        let id = r.json()["Id"].as_str().unwrap_or_default().to_string();
        if r.json()["Name"].as_str().map(|n| n.trim_start_matches('/')) == Some(name) {
            return Err(DriverError::invalid(format!(
                "docker: a container {name} ({}) already exists on the destination (docker rm it \
                 there, or choose another name with --dst-id)",
                &id[..id.len().min(12)]
            )));
        }
    }
    Ok(())
}

/// The reference to create the source's image from here: its tag when
/// that names the same image on this engine, else its id; `None` when
/// this engine lacks it.
fn image_here(engine: &Engine, meta: &SourceMeta) -> DriverResult<Option<String>> {
    let id_of = |r: &str| -> DriverResult<Option<String>> {
        let r = engine.request("GET", &format!("/images/{}/json", encode(r)), None)?;
        Ok(r.ok()
            .then(|| r.json()["Id"].as_str().map(str::to_string))
            .flatten())
    };
    if id_of(&meta.image_id)?.is_none() {
        return Ok(None);
    }
    if !meta.image_ref.is_empty() && id_of(&meta.image_ref)?.as_deref() == Some(&meta.image_id) {
        return Ok(Some(meta.image_ref.clone()));
    }
    Ok(Some(meta.image_id.clone()))
}

/// containerd's leftover checkpoint copies (`ctrd-checkpoint*` in its
/// temporary directory: this side's, or the data root's `tmp` where an
/// engine runs with `TMPDIR` there; containerd issue #10166).
fn ctrd_copies(root: &Path) -> Vec<PathBuf> {
    [std::env::temp_dir(), root.join("tmp")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ctrd-checkpoint")
        })
        .map(|e| e.path())
        .collect()
}

/// Writes an executable script (root only).
fn write_script(path: &Path, text: &str) -> DriverResult<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).map_err(io("writing", path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(io("making executable", path))
}

/// Takes the host's lock on runc's configuration (another restore by
/// phaul holds it until its own is over).
fn lock_runc_conf() -> DriverResult<std::fs::File> {
    use std::os::fd::AsRawFd;
    let p = Path::new(RUNC_CONF_SAVED).with_extension("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io("opening", &p))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("locking", &p)(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// A runc configuration left by a phaul that died during a restore: the
/// host's own is put back (logged), since that restore is over.
fn repair_runc_conf() -> Option<String> {
    let text = std::fs::read_to_string(RUNC_CRIU_CONF).ok()?;
    let pid: i32 = text
        .lines()
        .next()?
        .strip_prefix(RUNC_MARKER)?
        .trim()
        .parse()
        .ok()?;
    if Path::new(&format!("/proc/{pid}")).exists() {
        return None; // a restore under way
    }
    let r = match std::fs::read(RUNC_CONF_SAVED) {
        Ok(orig) => std::fs::write(RUNC_CRIU_CONF, orig),
        Err(_) => std::fs::remove_file(RUNC_CRIU_CONF),
    };
    let _ = std::fs::remove_file(RUNC_CONF_SAVED);
    Some(match r {
        Ok(()) => format!(
            "docker: {RUNC_CRIU_CONF} was left by phaul {pid}, which died during a restore: put \
             the host's own back"
        ),
        Err(e) => format!("docker: {RUNC_CRIU_CONF} was left by phaul {pid}: repairing it: {e}"),
    })
}

/// Makes `to` a checkpoint directory whose every image is a symlink to
/// the image in `from` (the engine's images directory, kept until the
/// migration ends): the destination engine tars the checkpoint directory
/// into containerd's content store and out again before runc restores
/// (twice the whole memory through the disk, with fsyncs: 9.8 s of a
/// 256 MiB container's pause, measured), but a tar of symlinks is a few
/// KiB, and CRIU opens the images through them.
fn link_images(from: &Path, to: &Path) -> DriverResult<()> {
    std::fs::create_dir_all(to).map_err(io("creating", to))?;
    for e in std::fs::read_dir(from).map_err(io("reading", from))? {
        let e = e.map_err(io("reading", from))?;
        let src = e.path();
        if !e.file_type().map_err(io("reading", &src))?.is_file() {
            continue;
        }
        // Relative, climbing past any root: CRIU opens some images from
        // its images directory's descriptor after it entered the
        // container's mount namespace, where an absolute link would
        // resolve inside the container.
        let target = PathBuf::from("../".repeat(64)).join(src.strip_prefix("/").unwrap_or(&src));
        std::os::unix::fs::symlink(&target, to.join(e.file_name())).map_err(io("linking", &src))?;
    }
    Ok(())
}

/// Watches runc's restore of container `id` while the start is under way
/// (until the sentinel is taken): when runc's CRIU has been dead for
/// [`runc::DEAD_FOR`], kills runc, says so in `died` and ends the sentinel.
fn watchdog(id: &str, sentinel: &Sentinel, died: &Mutex<Option<String>>) {
    let tick = Duration::from_millis(100);
    let mut dead_since: Option<Instant> = None;
    let mut runc: Option<i32> = None;
    while sentinel.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
        std::thread::sleep(tick);
        // runc, found once (a scan of every process) and kept while it runs.
        runc = runc
            .filter(|r| Path::new(&format!("/proc/{r}")).exists())
            .or_else(|| runc::restore_of(id));
        let Some(r) = runc else {
            dead_since = None;
            continue;
        };
        if !runc::criu_died(r) {
            dead_since = None;
            continue;
        }
        let since = *dead_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= runc::DEAD_FOR {
            runc::kill_tree(r);
            *died.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                "docker: runc's CRIU died during the restore on this host (runc {r} was left \
                 waiting for it and was killed)"
            ));
            end_sentinel(sentinel);
            return;
        }
    }
}

/// The last CRIU errors of a restore log, for an error message.
fn log_errors(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    errors[errors.len().saturating_sub(4)..].join(" | ")
}

impl Dest {
    /// Where each copied volume is synced to, with the volume.
    fn staged_volumes(&self) -> impl Iterator<Item = (PathBuf, &Volume)> + '_ {
        self.meta
            .volumes
            .iter()
            .filter(|v| v.synced)
            .enumerate()
            .map(|(i, v)| (self.staging.join(format!("volume-{i}")), v))
    }

    fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.root
            .join("containers")
            .join(id)
            .join("checkpoints")
            .join(CHECKPOINT)
    }

    /// Puts runc's CRIU configuration back as it was.
    fn restore_runc_conf(&mut self) -> DriverResult<()> {
        match self.runc_conf.take() {
            None => Ok(()),
            Some(None) => match std::fs::remove_file(RUNC_CRIU_CONF) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DriverError::failed(
                    format!("docker: removing {RUNC_CRIU_CONF}: {e}"),
                )),
                _ => Ok(()),
            },
            Some(Some(old)) => std::fs::write(RUNC_CRIU_CONF, old)
                .map_err(io("restoring", Path::new(RUNC_CRIU_CONF))),
        }
        .map(|()| {
            let _ = std::fs::remove_file(RUNC_CONF_SAVED);
            self.runc_lock = None;
        })
    }

    /// Removes the checkpoint images and containerd's copies of them.
    fn clean_checkpoint(&mut self) {
        if let Some(id) = &self.created {
            let _ = std::fs::remove_dir_all(self.checkpoint_dir(id));
        }
        for p in ctrd_copies(&self.root) {
            if !self.tmp_before.contains(&p) {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }

    /// Ends a start under way: its sentinel, and runc's restore if it
    /// still runs (so that the engine's start returns and the container
    /// can be removed).
    fn stop_start(&mut self) {
        if let Some(s) = self.start.take() {
            end_sentinel(&s.sentinel);
            s.finish(Duration::from_millis(200));
        }
    }
}

impl Driver for DockerDriver {
    fn info(&self) -> DriverInfo {
        let mut description = "Docker containers between two stock engines (phaul's CRIU dump, \
                               the destination engine's start?checkpoint=)"
            .to_string();
        // Every phaul that loads the plugin asks: a connection, no request.
        match local_engine().and_then(|e| e.reachable().map(|()| e)) {
            Ok(e) => description.push_str(&format!(" [engine at {}]", e.socket.display())),
            Err(e) => description.push_str(&format!(" [no engine reachable here: {e}]")),
        }
        DriverInfo {
            name: "docker".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: description.into(),
            capabilities: Capabilities::LIVE
                | Capabilities::RESTART
                | Capabilities::PRE_DUMP
                | Capabilities::TCP_ESTABLISHED
                | Capabilities::OWN_RESTORE,
        }
    }

    fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
        self.opts = DockerOptions::parse(
            ctx.options
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_str())),
        )?;
        self.mode = ctx.mode;
        self.work_dir = PathBuf::from(ctx.work_dir.as_str());
        self.host = Some(ctx.host.clone());
        match ctx.side {
            Side::Source => self.init_source(ctx.id.as_str()),
            Side::Destination => self.init_destination(ctx.source_fact(FACT)),
        }
    }

    fn root_task_pid(&mut self) -> DriverResult<i32> {
        Ok(self.source()?.ct.pid)
    }

    fn fs_sync(&mut self) -> DriverResult<FsSyncSpec> {
        match &self.state {
            // The writable layer, the transfer directory, the volumes this
            // host alone has: the same number on both sides, in order.
            State::Source(s) => Ok(FsSyncSpec::paths(
                [
                    s.ct.upper.clone().unwrap_or_default().display().to_string(),
                    s.transfer.display().to_string(),
                ]
                .into_iter()
                .chain(
                    s.volumes
                        .iter()
                        .filter(|v| v.synced)
                        .map(|v| v.source.clone()),
                ),
            )),
            State::Dest(d) => Ok(FsSyncSpec::paths(
                [d.staging.join("upper"), d.staging.join("transfer")]
                    .into_iter()
                    .chain(d.staged_volumes().map(|(p, _)| p))
                    .map(|p| p.display().to_string()),
            )),
            State::New => Err(DriverError::failed("docker: fs_sync before init")),
        }
    }

    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        if opts.tcp_established && !self.warned_tcp {
            self.warned_tcp = true;
            let moving = self.source()?.ct.moving_addresses();
            if !moving.is_empty() {
                self.log(
                    LogLevel::Warn,
                    &format!(
                        "docker: --tcp-established: the container's addresses {moving:?} are the \
                         engine's choice (no --ip on a user-defined network), so the destination's \
                         engine gives it others: connections to them from outside will not \
                         survive (connections inside the container do)"
                    ),
                );
            }
        }
        let s = self.source()?;
        let merged = s.ct.merged.clone().unwrap_or_default();
        opts.root = Some(merged.display().to_string().into()).into();
        opts.cgroup_mode = CgroupMode::Soft;
        if let Some(f) = &s.freezer {
            opts.freeze_cgroup = Some(f.display().to_string().into()).into();
        }
        let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", s.ct.pid))
            .map_err(|e| DriverError::failed(format!("docker: reading the init's mounts: {e}")))?;
        let mut binds = s.ct.bind_destinations();
        // The engine's own bind mounts of every container.
        binds.extend(["/etc/resolv.conf", "/etc/hostname", "/etc/hosts"].map(String::from));
        if s.ct.raw["HostConfig"]["IpcMode"].as_str() == Some("shareable") {
            binds.push("/dev/shm".into());
        }
        let masked: Vec<String> = s.ct.raw["HostConfig"]["MaskedPaths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        for e in external_mounts(&mountinfo, &binds, &masked) {
            opts.external.push(e.into());
        }
        Ok(())
    }

    /// CRIU locks the container's network namespace (nftables) when it
    /// freezes it and removes the lock itself whatever happens to phaul:
    /// nothing beyond it, on purpose (a host-side lock would outlive a
    /// killed phaul).
    fn net_lock(&mut self) -> DriverResult<()> {
        Ok(())
    }

    /// Source: the container as the destination must recreate it, sent
    /// before anything is frozen (so the destination checks its image and
    /// creates the container while the workload runs).
    fn describe(&mut self) -> DriverResult<Vec<KeyValue>> {
        let send_image = self.opts.send_image;
        let s = self.source()?;
        let meta = SourceMeta {
            id: s.ct.id.clone(),
            name: s.ct.name.clone(),
            image_id: s.ct.raw["Image"].as_str().unwrap_or_default().to_string(),
            image_ref: s.ct.raw["Config"]["Image"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            config: s.ct.raw["Config"].clone(),
            host_config: s.ct.raw["HostConfig"].clone(),
            networks: s.ct.networks(),
            bind_sources: s.ct.bind_sources(),
            volumes: s.volumes.clone(),
            image_sent: send_image,
        };
        let json = serde_json::to_string(&meta)
            .map_err(|e| DriverError::failed(format!("docker: {e}")))?;
        Ok(vec![KeyValue::new(FACT, json)])
    }

    /// Destination, source running: the container, when its image is
    /// here (a sent image is loaded once it arrived, while frozen).
    fn mount(&mut self) -> DriverResult<()> {
        if self.dest()?.image.is_some() {
            self.create_container()?;
        }
        Ok(())
    }

    fn meta_files_out(&mut self, dir: &str) -> DriverResult<Vec<String>> {
        let s = self.source()?;
        // runc's restore gives the new init the engine's stdio in place of
        // these (pipes to its shim), by position: as they are now, frozen.
        let descriptors: Vec<String> = (0..3)
            .map(|fd| {
                std::fs::read_link(format!("/proc/{}/fd/{fd}", s.ct.pid))
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "/dev/null".into())
            })
            .collect();
        let p = Path::new(dir).join(DESCRIPTORS);
        let json = serde_json::to_vec(&descriptors)
            .map_err(|e| DriverError::failed(format!("docker: {e}")))?;
        std::fs::write(&p, json).map_err(io("writing", &p))?;
        Ok(vec![DESCRIPTORS.into()])
    }

    fn meta_files_in(&mut self, dir: &str, names: &[String]) -> DriverResult<()> {
        if !names.iter().any(|n| n == DESCRIPTORS) {
            return Err(DriverError::failed(format!(
                "docker: the source sent no {DESCRIPTORS} (is it phaul's docker driver?)"
            )));
        }
        let p = Path::new(dir).join(DESCRIPTORS);
        let descriptors: Vec<String> =
            serde_json::from_slice(&std::fs::read(&p).map_err(io("reading", &p))?)
                .map_err(|e| DriverError::failed(format!("docker: {}: {e}", p.display())))?;
        self.dest()?.descriptors = descriptors;
        self.install()
    }

    fn restore(&mut self, ctx: &RestoreContext) -> DriverResult<HookOutcome> {
        if ctx.criu_config.is_empty() {
            return Err(DriverError::failed(
                "docker: the engine gave no CRIU configuration to hold the restore with",
            ));
        }
        let images = PathBuf::from(ctx.images_dir.as_str());
        let d = self.dest()?;
        let Some(id) = d.created.clone() else {
            return Err(DriverError::failed(
                "docker: restore before the container was created",
            ));
        };
        // The images become the new container's checkpoint (links to
        // them), with runc's descriptors.json.
        let cp = d.checkpoint_dir(&id);
        link_images(&images, &cp)?;
        let desc = cp.join(DESCRIPTORS);
        std::fs::write(
            &desc,
            serde_json::to_vec(&d.descriptors).unwrap_or_default(),
        )
        .map_err(io("writing", &desc))?;
        // The engine's hold, reached through the hook only from these
        // images.
        let hold = cp.join(HOLD_IN_IMAGES);
        write_script(
            &hold,
            &format!("#!/bin/sh\nexec '{}'\n", ctx.action_script.as_str()),
        )?;
        write_script(Path::new(RUNC_HOOK), RUNC_HOOK_SCRIPT)?;
        // runc's CRIU: the host's own settings, the hook, the network lock
        // phaul's CRIU dumped with, and what the dump needs restored
        // (these override runc's RPC settings).
        d.runc_lock = Some(lock_runc_conf()?);
        let path = Path::new(RUNC_CRIU_CONF);
        let original = std::fs::read(path).ok();
        let saved = Path::new(RUNC_CONF_SAVED);
        match &original {
            Some(o) => std::fs::write(saved, o).map_err(io("saving", saved))?,
            None => drop(std::fs::remove_file(saved)),
        }
        let mut conf = format!("{RUNC_MARKER}{}\n", std::process::id());
        conf.push_str(&String::from_utf8_lossy(
            original.as_deref().unwrap_or_default(),
        ));
        if !conf.ends_with('\n') {
            conf.push('\n');
        }
        // Its log where it outlives the engine's clean-up (containerd
        // deletes the shim's work directory with a failed restore): this
        // side's driver directory, which phaul keeps on failure.
        let log = self.work_dir.join(RESTORE_LOG);
        let d = self.dest()?;
        conf.push_str(&format!(
            "action-script {RUNC_HOOK}\nnetwork-lock nftables\nlog-file {}\n",
            log.display()
        ));
        for (on, key) in [
            (ctx.opts.tcp_established, "tcp-established"),
            (ctx.opts.file_locks, "file-locks"),
            (ctx.opts.ext_unix_sk, "ext-unix-sk"),
        ] {
            if on {
                conf.push_str(key);
                conf.push('\n');
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        d.runc_conf = Some(original);
        std::fs::write(path, conf).map_err(io("writing", path))?;
        d.tmp_before = ctrd_copies(&d.root);
        // The request blocks until runc's restore is over (after the
        // engine's answer at post-restore).
        let child = Command::new("sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                DriverError::failed(format!("docker: starting a sentinel process: {e}"))
            })?;
        let tool = child.id() as i32;
        let sentinel: Sentinel = Arc::new(Mutex::new(Some(child)));
        let ended = sentinel.clone();
        let (tx, done) = mpsc::channel();
        let engine = Engine {
            timeout: Duration::from_secs(3600),
            ..d.engine.clone()
        };
        let path = format!("/containers/{id}/start?checkpoint={CHECKPOINT}");
        let spawned = std::thread::Builder::new()
            .name("docker-start".into())
            .spawn(move || {
                let r = engine
                    .request("POST", &path, None)
                    .and_then(|r| expect_ok(r, "starting from the checkpoint").map(drop));
                end_sentinel(&ended);
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            end_sentinel(&sentinel);
            return Err(DriverError::failed(format!("docker: a thread: {e}")));
        }
        // The watchdog: a CRIU that dies under runc leaves the start
        // hanging; runc is killed so that it returns, and the sentinel ends
        // so that the engine asks at once.
        let died = Arc::new(Mutex::new(None));
        let (watched, report, cid) = (sentinel.clone(), died.clone(), id.clone());
        let _ = std::thread::Builder::new()
            .name("docker-watchdog".into())
            .spawn(move || watchdog(&cid, &watched, &report));
        d.start = Some(Start {
            done,
            id,
            died,
            sentinel,
        });
        Ok(HookOutcome::handled(tool))
    }

    fn restore_wait(&mut self) -> DriverResult<i32> {
        let work_dir = self.work_dir.clone();
        let d = self.dest()?;
        let Some(start) = d.start.take() else {
            return Err(DriverError::failed("docker: no restore was started"));
        };
        let result = match start.done.recv_timeout(START_FINISH) {
            Ok(r) => r,
            Err(_) => {
                // Unstick it: runc's restore of this container, killed.
                start.finish(Duration::ZERO);
                Err(DriverError::failed(format!(
                    "docker: the engine's start did not finish within {START_FINISH:?} of the \
                     engine's answer; runc's restore was killed"
                )))
            }
        };
        end_sentinel(&start.sentinel);
        let result = match start.died.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(why) => Err(DriverError::failed(why)),
            None => result,
        };
        let conf = d.restore_runc_conf();
        let id = d.created.clone().unwrap_or_default();
        let restore_log = work_dir.join(RESTORE_LOG);
        let errors = log_errors(&restore_log);
        d.clean_checkpoint();
        if let Err(e) = result {
            return Err(DriverError::failed(format!(
                "{e}{}",
                if errors.is_empty() {
                    String::new()
                } else {
                    format!("; CRIU: {errors}")
                }
            )));
        }
        conf?;
        let ct = inspect(&d.engine, &id)?;
        if !ct.running {
            return Err(DriverError::failed(format!(
                "docker: the start from the checkpoint succeeded but {} is {}",
                ct.name, ct.status
            )));
        }
        Ok(ct.pid)
    }

    fn stop(&mut self) -> DriverResult<()> {
        let t = self.opts.stop_timeout;
        let s = self.source()?;
        expect_ok(
            s.engine
                .request("POST", &format!("/containers/{}/stop?t={t}", s.ct.id), None)?,
            "stopping the container",
        )
        .map(drop)
    }

    fn start(&mut self) -> DriverResult<i32> {
        let (engine, id) = match &self.state {
            State::Source(s) => (s.engine.clone(), s.ct.id.clone()),
            State::Dest(d) => (
                d.engine.clone(),
                d.created
                    .clone()
                    .ok_or_else(|| DriverError::failed("docker: start before create"))?,
            ),
            State::New => return Err(DriverError::failed("docker: start before init")),
        };
        expect_ok(
            engine.request("POST", &format!("/containers/{id}/start"), None)?,
            "starting the container",
        )?;
        let ct = inspect(&engine, &id)?;
        if !ct.running {
            return Err(DriverError::failed(format!(
                "docker: {} exited right after its start ({})",
                ct.name, ct.status
            )));
        }
        Ok(ct.pid)
    }

    fn migration_complete(&mut self) -> DriverResult<()> {
        match &mut self.state {
            State::Source(_) => self.retire_source(),
            State::Dest(d) => {
                let _ = std::fs::remove_dir_all(&d.staging);
                let msg = format!(
                    "docker: {} runs here under the engine at {}",
                    d.name,
                    d.engine.socket.display()
                );
                self.log(LogLevel::Info, &msg);
                Ok(())
            }
            State::New => Ok(()),
        }
    }

    fn migration_fail(&mut self) -> DriverResult<()> {
        let State::Dest(d) = &mut self.state else {
            // Source: CRIU resumed the container as it was (the engine
            // never saw it stop).
            return Ok(());
        };
        d.stop_start();
        let mut errors = Vec::new();
        if let Err(e) = d.restore_runc_conf() {
            errors.push(e.to_string());
        }
        d.clean_checkpoint();
        if let Some(id) = d.created.take() {
            // Its copied volumes were created with it (none existed here).
            let created: Vec<String> = d.staged_volumes().map(|(_, v)| v.name.clone()).collect();
            let paths = std::iter::once((
                format!("/containers/{id}?v=1&force=1"),
                format!("container {id}"),
            ))
            .chain(
                created
                    .iter()
                    .map(|n| (format!("/volumes/{}", encode(n)), format!("volume {n}"))),
            );
            for (path, what) in paths {
                match d.engine.request("DELETE", &path, None) {
                    Ok(r) if r.ok() || r.status == 404 => {}
                    Ok(r) => errors.push(format!("removing {what}: {}", r.message())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&d.staging) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("removing {}: {e}", d.staging.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DriverError::failed(errors.join("; ")))
        }
    }

    fn deadlines(&self) -> Vec<HookDeadline> {
        // docker stop waits stop-timeout; saving or loading an image and
        // the engine's own copies of the checkpoint take a while.
        vec![
            HookDeadline::new("init", 300),
            HookDeadline::new("stop", 120),
            HookDeadline::new("start", 120),
            HookDeadline::new("meta_files_in", 300),
            HookDeadline::new("migration_complete", 120),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_refuse_clearly() {
        let o = DockerOptions::parse([
            ("socket", "unix:///run/a.sock"),
            ("dst-id", "web2"),
            ("keep-source", ""),
            ("send-image", "true"),
        ])
        .unwrap();
        assert_eq!(o.socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(o.dst_id.as_deref(), Some("web2"));
        assert!(o.keep_source && o.send_image);
        assert_eq!(o.stop_timeout, 10);
        let e = DockerOptions::parse([("lxcpath", "/x")]).unwrap_err();
        assert!(e.message.contains("known: socket"), "{e}");
        assert!(DockerOptions::parse([("dst-id", "../x")]).is_err());
        assert!(DockerOptions::parse([("socket", "tcp://h:2375")]).is_err());
    }
}
