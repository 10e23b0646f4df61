//! The source side of a live migration: pre-flight, memory passes, the
//! final dump held at `post-dump` while the destination restores, and the
//! commit or the rollback. See the [module documentation](super) for the
//! phases and what a failure does in each.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_plugin_api::{CriuOpts, DumpContext, FsSyncKind, Side};

use super::abort::Abort;
use super::fs::SourceSync;
use super::iter::{PassStats, StopReason, StopRules};
use super::predump::{PreDumpLoop, Remote};
use super::report::{PassReport, Progress, Report};
use super::{criu_opts_to_rpc, Connector, MigrationError, PreDump};
use crate::conn::Conn;
use crate::criu::rpc::{self, ReqType};
use crate::criu::{stats, Event, Worker};
use crate::memchan::MemChannel;
use crate::plugins::{Driver, EngineHost, Registry};
use crate::proto::{
    FrameReader, FrameWriter, Hello, MigrationMode, Msg, Outcome, Refusal, Welcome,
};
use crate::workdir::WorkDir;
use crate::{proc, ABI_VERSION, PHAUL_VERSION};

/// Everything the source needs to know about a migration.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The htype.
    pub htype: String,
    /// The workload id (a pid for the pid htype).
    pub id: String,
    /// Driver options (`-o key=value`).
    pub options: Vec<(String, String)>,
    /// Pre-dump choice.
    pub pre_dump: PreDump,
    /// Iteration stop rules.
    pub rules: StopRules,
    /// Dump and restore established TCP connections.
    pub tcp_established: bool,
    /// Skip CPU and version checks.
    pub force: bool,
    /// Keep images on both sides.
    pub keep_images: bool,
    /// Root of the work directories.
    pub work_root: PathBuf,
    /// The CRIU binary.
    pub criu: PathBuf,
    /// How long to keep asking an unreachable destination what became of
    /// a committed migration.
    pub resolve_timeout: Duration,
    /// Restore cost assumed by the downtime rule before one is measured.
    pub restore_estimate: Duration,
    /// Live or restart.
    pub mode: MigrationMode,
    /// Restart mode: leave the workload stopped on the destination.
    pub no_start: bool,
    /// Stop rules of the file-sync passes.
    pub fs_rules: crate::fsync::FsStopRules,
}

/// Size of the chunks image files travel in.
const CHUNK: usize = 1 << 20;

pub(crate) type Control = (FrameReader<Conn>, FrameWriter<Conn>);

struct Source<'a> {
    opts: &'a SourceOptions,
    connector: &'a Connector,
    progress: Arc<dyn Progress>,
    abort: &'a Abort,
    session: u64,
    driver: Driver,
    work: WorkDir,
    criu: Option<Worker>,
    ps_fd: i32,
    control: Control,
    mem: MemChannel,
    pid: i32,
    passes: Vec<PassReport>,
    image_bytes: u64,
    frozen_at: Option<Instant>,
    criu_dump_us: u64,
    /// CRIU's statistics of the final dump, once it ended.
    criu_dump: Option<stats::DumpStats>,
    /// The tree's resident memory before the migration (the size estimate
    /// of the final pass).
    need_bytes: u64,
    fs: Option<SourceSync>,
    fs_report: Option<(Vec<crate::fsync::PassStats>, String)>,
    /// Files were copied (inodes change): CRIU must resolve inotify
    /// watches by path.
    irmap: bool,
    /// The files are on shared storage: snapshot it before the hand-over,
    /// put it back if the migration fails.
    shared_storage: bool,
    snapshotted: bool,
}

pub(crate) fn refused(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Refused(e.to_string())
}

pub(crate) fn open_control(conn: Conn) -> Control {
    let reader = FrameReader::new(conn.try_clone().expect("dup control socket"));
    (reader, FrameWriter::new(conn))
}

/// The connections of one migration.
pub(crate) struct Conns {
    pub control: Conn,
    pub mem: Option<Conn>,
    pub fs: Option<Conn>,
}

/// Connects (or takes the embedder's connections) and writes the preambles
/// and attach frames: always a control connection, a memory connection in
/// live mode, a file connection when directories are synced.
pub(crate) fn connect(
    connector: &Connector,
    session: u64,
    mem: bool,
    fs: bool,
) -> Result<Conns, String> {
    let dial = |what: &str| -> Result<Conn, String> {
        match connector {
            Connector::Tcp(addr) => {
                std::net::TcpStream::connect_timeout(addr, Duration::from_secs(10))
                    .map(Conn::from)
                    .map_err(|e| match what {
                        "control" => format!(
                            "cannot connect to {addr}: {e} (is `phaul serve` running there?)"
                        ),
                        _ => format!("cannot open the {what} connection to {addr}: {e}"),
                    })
            }
            Connector::Given { .. } => unreachable!("given connections are not dialled"),
        }
    };
    let given = |c: Option<&Conn>, what: &str| -> Result<Conn, String> {
        c.ok_or_else(|| format!("no {what} connection was given"))?
            .try_clone()
            .map_err(|e| e.to_string())
    };
    let (control, mem, fs) = match connector {
        Connector::Tcp(_) => (
            dial("control")?,
            if mem { Some(dial("memory")?) } else { None },
            if fs { Some(dial("file")?) } else { None },
        ),
        Connector::Given {
            control,
            mem: m,
            fs: f,
        } => (
            given(Some(control), "control")?,
            if mem {
                Some(given(Some(m), "memory")?)
            } else {
                None
            },
            if fs {
                Some(given(f.as_ref(), "file")?)
            } else {
                None
            },
        ),
    };
    for c in std::iter::once(&control).chain(mem.iter()).chain(fs.iter()) {
        c.set_nodelay();
        crate::proto::write_preamble(&mut &*c).map_err(|e| e.to_string())?;
    }
    if let Some(m) = &mem {
        FrameWriter::new(m)
            .write(&Msg::AttachMemory { session })
            .map_err(|e| e.to_string())?;
    }
    if let Some(f) = &fs {
        FrameWriter::new(f)
            .write(&Msg::AttachFs { session })
            .map_err(|e| e.to_string())?;
    }
    Ok(Conns { control, mem, fs })
}

/// The handshake for `opts`; the live mode adds what CRIU said.
pub(crate) fn hello(opts: &SourceOptions, session: u64, roots: &[String]) -> Hello {
    Hello {
        session,
        phaul_version: PHAUL_VERSION.into(),
        abi_version: ABI_VERSION.into(),
        criu_version: None,
        htype: opts.htype.clone(),
        id: opts.id.clone(),
        mode: opts.mode,
        options: opts.options.clone(),
        cpuinfo: Vec::new(),
        need_bytes: 0,
        force: opts.force,
        tcp_established: opts.tcp_established,
        keep_images: opts.keep_images,
        fs_roots: roots.to_vec(),
        no_start: opts.no_start,
    }
}

/// Sends the handshake and reads the answer.
pub(crate) fn handshake(control: &mut Control, hello: Hello) -> Result<Welcome, MigrationError> {
    control
        .1
        .write(&Msg::Hello(Box::new(hello)))
        .map_err(|e| refused(format!("sending the handshake: {e}")))?;
    match control.0.read::<Msg>() {
        Ok(Msg::Welcome(w)) => {
            tracing::info!(
                destination_phaul = %w.phaul_version,
                destination_criu = %w.criu_version.map_or("none".to_string(), |v| v.to_string()),
                free_mib = w.free_bytes >> 20,
                "destination accepted the migration"
            );
            Ok(w)
        }
        Ok(Msg::Refused { kind, reason }) => Err(MigrationError::Refused(format!(
            "the destination refused ({}): {reason}",
            refusal_name(kind)
        ))),
        Ok(other) => Err(refused(format!(
            "the destination answered the handshake with {}",
            other.name()
        ))),
        Err(e) => Err(refused(format!(
            "no handshake answer from the destination: {e}"
        ))),
    }
}

/// The driver, initialised, with what the engine needs from it.
pub(crate) struct Prepared {
    pub driver: Driver,
    pub info: phaul_plugin_api::DriverInfo,
    pub pid: i32,
    pub fs: phaul_plugin_api::FsSyncSpec,
}

/// Initialises the source driver and asks it about the workload.
pub(crate) fn prepare(
    mut driver: Driver,
    opts: &SourceOptions,
    work: &WorkDir,
    criu_version: &str,
) -> Result<Prepared, MigrationError> {
    let host = EngineHost::new(
        &opts.htype,
        &opts.criu.display().to_string(),
        criu_version,
        feature_checker(opts.criu.clone(), work.criu()),
    );
    driver
        .init(super::init_context(
            Side::Source,
            opts.mode,
            &opts.id,
            &opts.options,
            work,
            host,
        ))
        .map_err(refused)?;
    let info = driver.info().map_err(refused)?;
    let needed = match opts.mode {
        MigrationMode::Live => (phaul_plugin_api::Capabilities::LIVE, "live"),
        MigrationMode::Restart => (phaul_plugin_api::Capabilities::RESTART, "restart"),
    };
    if !info.capabilities.contains(needed.0) {
        return Err(refused(format!(
            "the {} driver does not support {} mode",
            opts.htype, needed.1
        )));
    }
    let pid = driver.root_task_pid().map_err(refused)?;
    if !proc::alive(pid) {
        return Err(refused(format!(
            "the workload's root task {pid} does not exist"
        )));
    }
    let fs = driver.fs_sync().map_err(refused)?;
    Ok(Prepared {
        driver,
        info,
        pid,
        fs,
    })
}

/// The roots the driver wants synced (empty unless it names paths).
pub(crate) fn fs_roots(fs: &phaul_plugin_api::FsSyncSpec) -> Vec<String> {
    match fs.kind {
        FsSyncKind::Paths => fs.paths.iter().map(|p| p.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// Migrates one workload to the destination behind `connector`.
pub fn migrate(
    registry: &Registry,
    opts: &SourceOptions,
    connector: &Connector,
    progress: Arc<dyn Progress>,
    abort: &Abort,
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    let session: u64 = rand_session();
    let span = tracing::info_span!("migrate", session = %format!("{session:016x}"));
    let _g = span.enter();
    let driver = registry.instantiate(&opts.htype).map_err(refused)?;
    let work = WorkDir::create(&opts.work_root, "src", session).map_err(refused)?;
    if opts.mode == MigrationMode::Restart {
        return super::restart::source(
            opts, connector, progress, abort, session, driver, work, started,
        );
    }

    // --- Pre-flight: nothing is touched if any of this fails. -----------
    // A probe worker answers the questions; the dump worker, started once
    // the memory connection exists (CRIU inherits it), only dumps.
    let mut criu = Worker::spawn(&opts.criu, "probe", &work.criu(), &[]).map_err(refused)?;
    let criu_version = criu.version().map_err(refused)?;
    let Prepared {
        driver,
        info,
        pid,
        fs,
    } = prepare(driver, opts, &work, &criu_version.to_string())?;
    if opts.tcp_established
        && !info
            .capabilities
            .contains(phaul_plugin_api::Capabilities::TCP_ESTABLISHED)
    {
        return Err(refused(format!(
            "--tcp-established: the {} driver cannot migrate established TCP connections",
            opts.htype
        )));
    }
    let mem_track = criu.mem_track().map_err(refused)?;
    let can_pre_dump = info
        .capabilities
        .contains(phaul_plugin_api::Capabilities::PRE_DUMP);
    let use_pre_dump = match (opts.pre_dump, mem_track, can_pre_dump) {
        (PreDump::Never, ..) => Err("disabled by --no-pre-dump".to_string()),
        (PreDump::Force, false, _) => return Err(refused(
            "--pre-dump: this kernel cannot track dirty memory (CRIU's mem_track feature check \
                 failed: no soft-dirty bits), so pre-dumps are impossible; run without --pre-dump",
        )),
        (PreDump::Force, true, false) | (PreDump::Auto, true, false) => {
            Err(format!("the {} driver cannot pre-dump", opts.htype))
        }
        (_, true, true) => Ok(()),
        (PreDump::Auto, false, _) => Err(
            "this kernel cannot track dirty memory (no soft-dirty); memory moves in one final dump"
                .to_string(),
        ),
    };
    match &use_pre_dump {
        Ok(()) => tracing::info!("pre-dumps: enabled (CRIU can track dirty memory)"),
        Err(why) => tracing::info!("pre-dumps: off, {why}"),
    }
    let cpu_dir = work.path().join("cpuinfo");
    std::fs::create_dir_all(&cpu_dir).map_err(refused)?;
    criu.cpuinfo_dump(&cpu_dir).map_err(refused)?;
    let cpuinfo = std::fs::read(cpu_dir.join("cpuinfo.img")).map_err(refused)?;
    let need_bytes = proc::tree_rss(pid);
    let roots = fs_roots(&fs);

    let conns = connect(connector, session, true, !roots.is_empty()).map_err(refused)?;
    let mem = conns.mem.expect("memory connection in live mode");
    for c in std::iter::once(&conns.control)
        .chain(std::iter::once(&mem))
        .chain(conns.fs.iter())
    {
        abort.watch(c);
    }
    let mut control = open_control(conns.control);
    handshake(
        &mut control,
        Hello {
            criu_version: Some(criu_version),
            cpuinfo,
            need_bytes,
            ..hello(opts, session, &roots)
        },
    )?;
    if let Some(r) = abort.reason() {
        return Err(refused(r));
    }
    let fs_sync = conns
        .fs
        .map(|c| SourceSync::start(c, roots.iter().map(PathBuf::from).collect(), opts.fs_rules));
    drop(criu);
    let mem = MemChannel::new(mem);
    let ps_fd = mem.raw_fd();
    let criu = Worker::spawn(&opts.criu, "source", &work.criu(), &[ps_fd]).map_err(refused)?;
    let mut src = Source {
        opts,
        connector,
        progress,
        abort,
        session,
        driver,
        work,
        criu: Some(criu),
        ps_fd,
        control,
        mem,
        pid,
        passes: Vec::new(),
        image_bytes: 0,
        frozen_at: None,
        criu_dump_us: 0,
        criu_dump: None,
        need_bytes,
        fs: fs_sync,
        fs_report: None,
        irmap: !roots.is_empty() && !fs.inodes_persistent,
        shared_storage: fs.kind == FsSyncKind::SharedStorage,
        snapshotted: false,
    };
    let result = src.run(use_pre_dump);
    src.finish(result, started)
}

fn refusal_name(k: Refusal) -> &'static str {
    match k {
        Refusal::Version => "version mismatch",
        Refusal::Criu => "CRIU version",
        Refusal::Htype => "htype",
        Refusal::Cpu => "CPU",
        Refusal::Space => "disk space",
        Refusal::Busy => "busy",
        Refusal::Driver => "driver",
        Refusal::Other => "error",
    }
}

fn rand_session() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}

/// `criu_feature` for drivers: a short-lived worker per question.
fn feature_checker(binary: PathBuf, dir: PathBuf) -> crate::plugins::FeatureCheck {
    Arc::new(move |name: &str| {
        let mut w = Worker::spawn(&binary, "feature", &dir, &[]).map_err(|e| e.to_string())?;
        let q = match name {
            "mem_track" => rpc::Features {
                mem_track: Some(true),
                ..Default::default()
            },
            "lazy_pages" => rpc::Features {
                lazy_pages: Some(true),
                ..Default::default()
            },
            "pidfd_store" => rpc::Features {
                pidfd_store: Some(true),
                ..Default::default()
            },
            other => return Err(format!("unknown CRIU feature `{other}`")),
        };
        let f = w.feature(q).map_err(|e| e.to_string())?;
        Ok(f.mem_track
            .or(f.lazy_pages)
            .or(f.pidfd_store)
            .unwrap_or(false))
    })
}

/// How the final dump ended.
enum DumpEnd {
    /// The destination runs the workload; the source copy is gone.
    Migrated {
        dest_pid: i32,
        restore: Option<stats::RestoreStats>,
        restore_us: u64,
        /// When the destination's `Resumed` arrived.
        resumed_at: Instant,
    },
}

impl Source<'_> {
    fn criu(&mut self) -> &mut Worker {
        self.criu
            .as_mut()
            .expect("CRIU worker present until the final dump ends")
    }

    fn send(&mut self, msg: &Msg) -> Result<(), String> {
        self.control
            .1
            .write(msg)
            .map_err(|e| format!("sending {} to the destination: {e}", msg.name()))
    }

    fn recv(&mut self, waiting_for: &str) -> Result<Msg, String> {
        recv(&mut self.control, self.abort, waiting_for)
    }

    fn run(
        &mut self,
        use_pre_dump: Result<(), String>,
    ) -> Result<(DumpEnd, StopReason, bool), String> {
        let (last_pre, reason) = match use_pre_dump {
            Ok(()) => {
                let work = &self.work;
                let images = |n: u32| work.images(n);
                let driver = &mut self.driver;
                let mut adjust =
                    |o: &mut CriuOpts| driver.adjust_dump_opts(o).map_err(|e| e.to_string());
                let mut lp = PreDumpLoop {
                    criu: self.criu.as_mut().expect("worker"),
                    pid: self.pid,
                    ps_fd: self.ps_fd,
                    images: &images,
                    adjust: &mut adjust,
                    rules: self.opts.rules,
                    restore_estimate: self.opts.restore_estimate,
                    channel: Some(&mut self.mem),
                    progress: self.progress.clone(),
                };
                let mut remote = ControlRemote {
                    control: &mut self.control,
                    abort: self.abort,
                };
                let (reports, n, r) = lp.run(&mut remote)?;
                self.passes.extend(reports);
                (Some(n), r)
            }
            Err(why) => (None, StopReason::NoPreDump { why }),
        };
        if let Some(fs) = self.fs.as_mut() {
            self.progress.phase("syncing files");
            fs.wait_converged()?;
        }
        let iter = last_pre.map_or(1, |n| n + 1);
        let end = self.final_dump(iter, last_pre)?;
        Ok((end, reason, last_pre.is_some()))
    }

    /// The final dump. CRIU freezes the tree, sends the pages, writes the
    /// other images and stops at `post-dump`; we hold it there while the
    /// images go across and the destination restores, then answer.
    fn final_dump(&mut self, iter: u32, parent: Option<u32>) -> Result<DumpEnd, String> {
        ControlRemote {
            control: &mut self.control,
            abort: self.abort,
        }
        .start_iter(iter, parent)?;
        let dir = self.work.images(iter);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut copts = CriuOpts {
            tcp_established: self.opts.tcp_established,
            force_irmap: self.irmap,
            ..CriuOpts::default()
        };
        self.driver
            .adjust_dump_opts(&mut copts)
            .map_err(|e| e.to_string())?;
        let outcome = self
            .driver
            .dump(&DumpContext {
                images_dir: dir.display().to_string().into(),
                parent_images_dir: parent
                    .map(|p| self.work.images(p).display().to_string().into())
                    .into(),
                pid: self.pid,
                opts: copts.clone(),
            })
            .map_err(|e| e.to_string())?;
        if outcome.handled {
            return Err(
                "drivers that dump through their own tooling are not supported by this engine yet"
                    .into(),
            );
        }
        let mut o = self.criu.as_ref().expect("worker").opts(&dir, "dump.log");
        o.pid = Some(self.pid);
        o.notify_scripts = Some(true);
        o.ps = Some(rpc::PageServerInfo {
            fd: Some(self.ps_fd),
            ..Default::default()
        });
        if let Some(p) = parent {
            o.parent_img = Some(format!("../{p}"));
            o.track_mem = Some(true);
        }
        criu_opts_to_rpc(&copts, &mut o);

        self.progress.pass_started(iter, "dump", self.need_bytes);
        let before = self.mem.sent();
        let t = Instant::now();
        self.mem.watch(self.progress.clone(), before);
        self.criu()
            .start(ReqType::Dump, o)
            .map_err(|e| e.to_string())?;

        let mut failure: Option<String> = None;
        let mut migrated: Option<DumpEnd> = None;
        let mut pass_done = false;
        loop {
            let ev = match self.criu().next_event(ReqType::Dump) {
                Ok(ev) => ev,
                Err(e) => {
                    // CRIU died: if we had committed, the destination runs
                    // the workload; make sure the source copy is gone.
                    if migrated.is_some() {
                        proc::signal_tree(self.pid, nix::sys::signal::Signal::SIGKILL);
                        break;
                    }
                    return Err(failure.unwrap_or_else(|| e.to_string()));
                }
            };
            match ev {
                Event::Notify { script, .. } => {
                    tracing::debug!(%script, "CRIU notification");
                    let ok = match script.as_str() {
                        // CRIU seizes the tree right after `pre-dump`.
                        "pre-dump" => {
                            self.frozen_at = Some(Instant::now());
                            self.progress.phase("frozen");
                            true
                        }
                        "network-lock" => self
                            .driver
                            .net_lock()
                            .map_err(|e| failure.get_or_insert(e.to_string()).clone())
                            .is_ok(),
                        "network-unlock" => {
                            if let Err(e) = self.driver.net_unlock() {
                                tracing::warn!("{e}");
                            }
                            true
                        }
                        "post-dump" => {
                            self.criu_dump_us = t.elapsed().as_micros() as u64;
                            self.mem.unwatch();
                            let pass = PassStats {
                                pages_written: 0,
                                bytes: self.mem.sent() - before,
                                duration: t.elapsed(),
                            };
                            self.progress.pass_finished(&pass);
                            self.passes.push(PassReport::new(iter, "dump", &pass, None));
                            pass_done = true;
                            match self.hand_over(iter) {
                                Ok(end) => {
                                    migrated = Some(end);
                                    true
                                }
                                Err(e) => {
                                    tracing::warn!("rolling back: {e}");
                                    // The storage goes back before the tree
                                    // resumes on it.
                                    self.rollback_storage();
                                    failure.get_or_insert(e);
                                    false
                                }
                            }
                        }
                        _ => true,
                    };
                    if let Err(e) = self.criu().answer_notify(ok) {
                        if migrated.is_some() {
                            proc::signal_tree(self.pid, nix::sys::signal::Signal::SIGKILL);
                            break;
                        }
                        return Err(failure.unwrap_or_else(|| e.to_string()));
                    }
                }
                Event::Done(resp) => {
                    if !pass_done {
                        self.mem.unwatch();
                    }
                    if migrated.is_some() {
                        if !resp.success {
                            tracing::warn!("CRIU reported a failure after the commit; making sure the source copy is gone");
                            proc::signal_tree(self.pid, nix::sys::signal::Signal::SIGKILL);
                        }
                        break;
                    }
                    let err = self
                        .criu
                        .as_ref()
                        .expect("worker")
                        .check_done(ReqType::Dump, &resp, "dump.log")
                        .err()
                        .map(|e| e.to_string());
                    return Err(failure
                        .or(err)
                        .unwrap_or_else(|| "the dump ended without a commit".into()));
                }
            }
        }
        // The final dump was the worker's last request.
        if let Some(mut w) = self.criu.take() {
            w.wait_exit(Duration::from_secs(5));
        }
        self.criu_dump = stats::read_dump(&self.work.criu()).ok();
        if let (Some(last), Some(s)) = (self.passes.last_mut(), self.criu_dump.as_ref()) {
            last.pages_written = s.pages_written;
            last.pages_skipped_parent = s.pages_skipped_parent;
            last.pages_scanned = s.pages_scanned;
        }
        migrated.ok_or_else(|| "the dump ended without a commit".into())
    }

    /// Inside the `post-dump` hold (tree frozen, pages already at the
    /// destination): send the images, let the destination restore, commit.
    /// An `Err` before the commit means "resume the source".
    fn hand_over(&mut self, iter: u32) -> Result<DumpEnd, String> {
        if let Some(r) = self.abort.reason() {
            return Err(r);
        }
        if let Some(fs) = self.fs.take() {
            self.progress.phase("final file sync");
            self.fs_report = Some(fs.final_pass()?);
        }
        if self.shared_storage {
            self.progress.phase("snapshotting shared storage");
            self.driver.storage_snapshot().map_err(|e| e.to_string())?;
            self.snapshotted = true;
        }
        let meta_dir = self.work.meta();
        let meta = self
            .driver
            .meta_files_out(&meta_dir.display().to_string())
            .map_err(|e| e.to_string())?;
        let images = self.work.images(iter);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
            .map_err(|e| e.to_string())?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        files.sort();
        files.extend(meta.iter().map(|m| meta_dir.join(m)));
        self.progress.phase("sending images");
        for f in &files {
            self.send_file(f)?;
        }
        self.send(&Msg::Restore {
            iter,
            meta_files: meta,
        })?;
        self.progress.phase("restoring on the destination");
        match self.recv("Restored")? {
            Msg::Restored => {}
            other => return Err(format!("expected Restored, got {}", other.name())),
        }
        // The commit: from here on the source never resumes on its own.
        if !self.abort.commit() {
            return Err(self.abort.reason().unwrap_or_else(|| "aborted".into()));
        }
        if let Err(e) = self.send(&Msg::Commit) {
            return self.resolve(e);
        }
        match self.control.0.read::<Msg>() {
            Ok(Msg::Resumed {
                pid,
                stats,
                restore_us,
            }) => Ok(DumpEnd::Migrated {
                dest_pid: pid,
                restore: stats,
                restore_us,
                resumed_at: Instant::now(),
            }),
            // The destination could not resume its copy and discarded it:
            // the source copy is still intact, so it resumes.
            Ok(Msg::Abort { reason }) => Err(format!(
                "the destination failed to resume the workload: {reason}"
            )),
            Ok(other) => self.resolve(format!("expected Resumed, got {}", other.name())),
            Err(e) => self.resolve(format!("lost the destination after the commit: {e}")),
        }
    }

    /// After the commit the connection broke: ask the destination, on a new
    /// connection, whether its copy runs. Resumed -> kill ours; rolled
    /// back -> resume ours; no answer -> leave ours stopped for an operator.
    fn resolve(&mut self, why: String) -> Result<DumpEnd, String> {
        tracing::warn!("{why}; asking the destination what became of the migration");
        let deadline = Instant::now() + self.opts.resolve_timeout;
        let Connector::Tcp(addr) = self.connector else {
            return self.undecided(why);
        };
        while Instant::now() < deadline {
            match query(addr, self.session) {
                Ok(Outcome::Resumed) => {
                    tracing::info!("the destination runs the workload: completing the migration");
                    return Ok(DumpEnd::Migrated {
                        dest_pid: 0,
                        restore: None,
                        restore_us: 0,
                        resumed_at: Instant::now(),
                    });
                }
                Ok(Outcome::RolledBack) | Ok(Outcome::Unknown) => {
                    return Err(format!("{why}; the destination discarded its copy"));
                }
                Ok(Outcome::InProgress) | Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        self.undecided(why)
    }

    /// Neither side can tell: stop the source tree (SIGSTOP) so it cannot
    /// run twice, and let CRIU detach from it.
    fn undecided(&mut self, why: String) -> Result<DumpEnd, String> {
        proc::signal_tree(self.pid, nix::sys::signal::Signal::SIGSTOP);
        Err(format!(
            "{why}. The destination could not be asked whether it runs the workload, so the source \
             tree (pid {}) is left STOPPED: if the destination runs it, kill the source copy \
             (kill -KILL {}); otherwise resume it (kill -CONT {})",
            self.pid, self.pid, self.pid
        ))
    }

    fn send_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        self.image_bytes += send_file(&mut self.control, path)?;
        Ok(())
    }

    /// Puts shared storage back to its snapshot (once).
    fn rollback_storage(&mut self) {
        if std::mem::take(&mut self.snapshotted) {
            if let Err(e) = self.driver.storage_rollback() {
                tracing::error!("could not put the shared storage back to its snapshot: {e}");
            }
        }
    }

    /// Turns the outcome into a report or a classified error, running the
    /// driver's completion or rollback hooks.
    fn finish(
        mut self,
        result: Result<(DumpEnd, StopReason, bool), String>,
        started: Instant,
    ) -> Result<Report, MigrationError> {
        self.work.keep(self.opts.keep_images);
        let committed = self.abort.committed();
        match result {
            Ok((
                DumpEnd::Migrated {
                    dest_pid,
                    restore,
                    restore_us,
                    resumed_at,
                },
                stop_reason,
                pre_dump,
            )) => {
                let frozen = self.frozen_at.map_or(0, |t| {
                    resumed_at.saturating_duration_since(t).as_micros() as u64
                });
                if let Err(e) = self.driver.umount() {
                    tracing::warn!("{e}");
                }
                if self.snapshotted {
                    if let Err(e) = self.driver.storage_commit() {
                        tracing::warn!("{e}");
                    }
                }
                if let Err(e) = self.driver.migration_complete() {
                    tracing::warn!("{e}");
                }
                // Acknowledged bytes where the channel is TCP; CRIU's own
                // count of pages otherwise.
                let memory_bytes = match self.mem.counts_bytes() {
                    true => self.mem.sent(),
                    false => self
                        .passes
                        .iter()
                        .map(|p| p.pages_written * super::iter::PAGE_SIZE)
                        .sum(),
                };
                self.mem.shutdown();
                let criu_dump = self.criu_dump.take();
                Ok(Report {
                    session: format!("{:016x}", self.session),
                    htype: self.opts.htype.clone(),
                    id: self.opts.id.clone(),
                    mode: "live",
                    destination: self.connector.describe(),
                    destination_pid: dest_pid,
                    total_time_us: started.elapsed().as_micros() as u64,
                    frozen_time_us: frozen,
                    restore_time_us: restore_us,
                    criu_dump_time_us: self.criu_dump_us,
                    pre_dump,
                    stop_reason,
                    iterations: self.passes,
                    memory_bytes,
                    image_bytes: self.image_bytes,
                    bytes_on_wire: memory_bytes + self.image_bytes + fs_bytes(&self.fs_report),
                    criu_dump,
                    criu_restore: restore,
                    fs_passes: self
                        .fs_report
                        .as_ref()
                        .map(|r| r.0.clone())
                        .unwrap_or_default(),
                    fs_stop_reason: self.fs_report.map(|r| r.1),
                })
            }
            Err(e) if committed => Err(MigrationError::AfterCommit(e)),
            Err(e) => {
                // CRIU resumed the tree (it answers a failed dump that way);
                // tell the destination, undo the driver's work.
                let _ = self.control.1.write(&Msg::Abort { reason: e.clone() });
                self.mem.shutdown();
                drop(self.criu.take());
                if let Err(e) = self.driver.migration_fail() {
                    tracing::warn!("{e}");
                }
                if !proc::alive(self.pid) {
                    return Err(MigrationError::AfterCommit(format!(
                        "{e}; and the source workload (pid {}) is no longer running",
                        self.pid
                    )));
                }
                Err(MigrationError::RolledBack(e))
            }
        }
    }
}

pub(crate) fn recv(control: &mut Control, abort: &Abort, waiting_for: &str) -> Result<Msg, String> {
    match control.0.read::<Msg>() {
        Ok(Msg::Abort { reason }) => Err(format!("the destination aborted: {reason}")),
        Ok(m) => Ok(m),
        Err(e) => Err(match abort.reason() {
            Some(r) => r,
            None => format!("waiting for {waiting_for} from the destination: {e}"),
        }),
    }
}

/// Iterations over the phaul protocol: the destination starts a page
/// server per pass and says when it listens.
struct ControlRemote<'c> {
    control: &'c mut Control,
    abort: &'c Abort,
}

impl Remote for ControlRemote<'_> {
    fn start_iter(&mut self, iter: u32, parent: Option<u32>) -> Result<(), String> {
        let m = Msg::StartIter { iter, parent };
        self.control
            .1
            .write(&m)
            .map_err(|e| format!("sending StartIter to the destination: {e}"))?;
        match recv(self.control, self.abort, "IterReady")? {
            Msg::IterReady { iter: i } if i == iter => Ok(()),
            other => Err(format!(
                "expected IterReady for pass {iter}, got {}",
                other.name()
            )),
        }
    }

    fn stop_iter(&mut self, _iter: u32) -> Result<(), String> {
        // The destination waits for the pass's page server to finish
        // before it starts the next one or restores.
        Ok(())
    }
}

/// Sends one file (an image or a meta file) in chunks; returns its size.
pub(crate) fn send_file(control: &mut Control, path: &std::path::Path) -> Result<u64, String> {
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("bad file name {}", path.display()))?
        .to_string();
    let send = |c: &mut Control, m: &Msg| {
        c.1.write(m)
            .map_err(|e| format!("sending {} to the destination: {e}", m.name()))
    };
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    send(
        control,
        &Msg::File {
            name,
            mode: meta.permissions().mode() & 0o7777,
            size: meta.len(),
        },
    )?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        send(control, &Msg::Chunk(buf[..n].to_vec()))?;
    }
    if sent != meta.len() {
        return Err(format!("{} changed size while being sent", path.display()));
    }
    Ok(sent)
}

/// File bytes sent by the sync passes.
pub(crate) fn fs_bytes(r: &Option<(Vec<crate::fsync::PassStats>, String)>) -> u64 {
    r.as_ref()
        .map_or(0, |(p, _)| p.iter().map(|s| s.bytes_sent).sum())
}

/// Asks the destination at `addr` what became of `session`.
pub(crate) fn query(addr: &std::net::SocketAddr, session: u64) -> Result<Outcome, String> {
    let c = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    let c = Conn::from(c);
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    crate::proto::write_preamble(&mut &c).map_err(|e| e.to_string())?;
    let (mut r, mut w) = open_control(c);
    w.write(&Msg::Query { session })
        .map_err(|e| e.to_string())?;
    match r.read::<Msg>().map_err(|e| e.to_string())? {
        Msg::Status { outcome, .. } => Ok(outcome),
        other => Err(format!("unexpected {}", other.name())),
    }
}
