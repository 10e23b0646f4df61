//! The source side of a live migration, as a sequence of phases, each a
//! type that owns what the next step needs ([`migrate`] reads top to
//! bottom):
//!
//! ```text
//! preflight ──► Live (connected) ──copy──► Copied ──freeze──► Frozen
//!    │refused          │rolled back          │rolled back       │
//!                                                   hand_over ──► Restored
//!                                                                    │commit
//!                       Migrated ◄──complete── Committed ◄───────────┘
//! ```
//!
//! Before `Committed` every failure resumes the source (exit 4). From
//! it on the source tree has a SIGSTOP queued, so it cannot run again
//! without a decision: the destination's `Resumed` (or its answer to a
//! query) kills it; the destination's confirmed discard resumes it; no
//! answer leaves it stopped for `phaul recover`. See the
//! [module documentation](super) for the invariant.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_plugin_api::{Capabilities, CriuOpts, DumpContext, FsSyncKind};

use super::abort::Abort;
use super::dump::{DumpHooks, FinalDump, Hold};
use super::error::{
    CommitError, CopyError, HandOverError, MigrationError, PeerError, PreflightError,
};
use super::fs::SourceSync;
use super::iter::{PassStats, StopReason, StopRules};
use super::predump::{PreDumpLoop, Remote};
use super::report::{PassReport, PostCopyReport, Progress, Report};
use super::session::{
    self, connect, fs_roots, handshake, hello, prepare, send_file, unexpected, Control, Prepared,
    Verdict,
};
use super::{criu_opts_to_rpc, Connector, PreDump};
use crate::criu::rpc;
use crate::criu::{stats, Criu, CriuBinary, Launcher};
use crate::journal::{self, Journal, Record, Task};
use crate::memchan::MemChannel;
use crate::plugins::{Driver, Registry};
use crate::proc;
use crate::proto::{Hello, MigrationMode, Msg};
use crate::workdir::WorkDir;

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
    /// Where this side records its decisions ([`crate::journal`]).
    pub journal_dir: PathBuf,
    /// Where CRIU's logs go (kept after a failure; see [`crate::workdir`]).
    pub log_dir: PathBuf,
    /// Deadlines for driver hooks (`--hook-timeout HOOK=SECONDS`), on top of
    /// the engine's and the driver's own.
    pub hook_deadlines: Vec<(String, Duration)>,
    /// The longest the workload may stay frozen before the commit (the
    /// migration then rolls back) or wait for the destination's answer
    /// after it (then the outcome is resolved); `None`:
    /// [`default_freeze_timeout`] of the workload's size.
    pub freeze_timeout: Option<Duration>,
    /// Post-copy ([`crate::postcopy`]): the final dump leaves private
    /// memory to follow after the switch.
    pub post_copy: crate::postcopy::PostCopy,
    /// Post-copy: how long the page transfer may make no progress before
    /// it is declared broken.
    pub post_copy_stall: Duration,
}

/// The freeze deadline when none is given: 10 s plus 4 s per GiB of the
/// tree's resident memory — a few seconds above what a dump and restore of
/// that size take on a slow host (about 4 s per GiB measured here).
pub fn default_freeze_timeout(rss_bytes: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_secs_f64(4.0 * rss_bytes as f64 / (1u64 << 30) as f64)
}

/// Migrates one workload to the destination behind `connector`.
pub fn migrate(
    registry: &Registry,
    opts: &SourceOptions,
    connector: &Connector,
    progress: Arc<dyn Progress>,
    abort: &Abort,
) -> Result<Report, MigrationError> {
    let driver = registry
        .instantiate(&opts.htype)
        .map_err(PreflightError::from)?;
    let launcher: Arc<dyn Launcher> = Arc::new(CriuBinary(opts.criu.clone()));
    migrate_with(driver, launcher, opts, connector, progress, abort)
}

/// [`migrate`] with a given driver instance and CRIU launcher (the unit
/// tests hand in a scripted CRIU).
pub(crate) fn migrate_with(
    driver: Driver,
    launcher: Arc<dyn Launcher>,
    opts: &SourceOptions,
    connector: &Connector,
    progress: Arc<dyn Progress>,
    abort: &Abort,
) -> Result<Report, MigrationError> {
    let env = Env::new(opts, connector, progress, abort, launcher);
    let span = tracing::info_span!("migrate", session = %format!("{:016x}", env.session));
    let _g = span.enter();
    let session = env.session;
    let mut driver = driver;
    driver
        .apply_deadlines(&opts.hook_deadlines)
        .map_err(PreflightError::from)?;
    driver.interrupt_on(abort.flag());
    let work = WorkDir::create(&opts.work_root, &opts.log_dir, "src", session)
        .map_err(PreflightError::from)?;
    let journal = Journal::open(&opts.journal_dir).map_err(PreflightError::from)?;
    if opts.mode == MigrationMode::Restart {
        return super::restart::source(&env, driver, work);
    }

    let pre = preflight(&env, driver, &work)?;
    let (mut live, connected) = Live::connect(env, pre, work, journal)?;
    let copied = match live.copy(connected) {
        Ok(c) => c,
        Err(e) => return Err(live.abandon(e.into())),
    };
    let frozen = match live.freeze(copied) {
        Ok(f) => f,
        Err(e) => return Err(live.abandon(e.into())),
    };
    let mut frozen = frozen;
    let restored = match live.hand_over(&mut frozen) {
        Ok(r) => r,
        Err(e) => return Err(live.roll_back(frozen, e)),
    };
    let committed = match live.commit(frozen, restored) {
        Ok(c) => c,
        Err(failed) => {
            let (frozen, e) = *failed;
            return Err(live.roll_back(frozen, e));
        }
    };
    live.complete(committed)
}

/// What every phase of one migration sees.
pub(crate) struct Env<'a> {
    pub opts: &'a SourceOptions,
    pub connector: &'a Connector,
    pub progress: Arc<dyn Progress>,
    pub abort: &'a Abort,
    pub session: u64,
    pub started: Instant,
    pub launcher: Arc<dyn Launcher>,
}

impl<'a> Env<'a> {
    /// A new migration (a fresh session id), starting now.
    pub fn new(
        opts: &'a SourceOptions,
        connector: &'a Connector,
        progress: Arc<dyn Progress>,
        abort: &'a Abort,
        launcher: Arc<dyn Launcher>,
    ) -> Self {
        Env {
            opts,
            connector,
            progress,
            abort,
            session: session::rand_session(),
            started: Instant::now(),
            launcher,
        }
    }
}

/// Pre-flight done (nothing frozen, nothing changed): the driver knows the
/// workload, CRIU answered the questions.
pub(crate) struct Preflight {
    pub(crate) prepared: Prepared,
    pub(crate) criu_version: crate::criu::CriuVersion,
    pub(crate) use_pre_dump: Result<(), String>,
    pub(crate) cpuinfo: Vec<u8>,
    pub(crate) need_bytes: u64,
    pub(crate) roots: Vec<String>,
    pub(crate) pids: Vec<i32>,
    pub(crate) bound: Vec<super::checks::BoundSocket>,
    /// Post-copy is possible here (asked for, and CRIU and the kernel can).
    pub(crate) post_copy: bool,
    /// Userfaultfd pre-copy runs (and so post-copy switches over).
    pub(crate) uffd: bool,
}

/// Pre-flight: a probe worker answers the questions (the dump worker,
/// started once the memory connection exists since CRIU inherits it, only
/// dumps). Any failure refuses the migration with nothing touched.
pub(crate) fn preflight(
    env: &Env,
    driver: Driver,
    work: &WorkDir,
) -> Result<Preflight, PreflightError> {
    let opts = env.opts;
    let mut criu = env.launcher.spawn("probe", &work.criu(), &[])?;
    let criu_version = criu.version()?;
    let prepared = prepare(driver, opts, work, &env.launcher, &criu_version.to_string())?;
    let caps = prepared.info.capabilities;
    if opts.tcp_established && !caps.contains(Capabilities::TCP_ESTABLISHED) {
        return Err(PreflightError::Check(format!(
            "--tcp-established: the {} driver cannot migrate established TCP connections",
            opts.htype
        )));
    }
    let mem_track = criu.mem_track()?;
    let post_copy_wanted = opts.post_copy != crate::postcopy::PostCopy::Off;
    let uffd = match opts.pre_dump {
        PreDump::Uffd => {
            uffd_possible(opts, caps).map_err(|why| {
                PreflightError::Check(format!("--pre-copy=uffd: {why}; run without it"))
            })?;
            true
        }
        PreDump::Auto if !mem_track && post_copy_wanted => match uffd_possible(opts, caps) {
            Ok(()) => true,
            Err(why) => {
                tracing::info!("userfaultfd pre-copy: off, {why}");
                false
            }
        },
        _ => false,
    };
    // Userfaultfd pre-copy switches over through post-copy.
    let post_copy = post_copy_wanted || uffd;
    if post_copy {
        post_copy_preflight(opts, caps, &mut *criu)?;
    }
    let use_pre_dump = match (
        opts.pre_dump,
        mem_track,
        caps.contains(Capabilities::PRE_DUMP),
    ) {
        (PreDump::Never, ..) => Err("disabled by --pre-copy=none".to_string()),
        (PreDump::Uffd, ..) => Err("--pre-copy=uffd".to_string()),
        (PreDump::Force, false, _) => {
            return Err(PreflightError::Check(
                "--pre-copy=soft-dirty: this kernel cannot track dirty memory (CRIU's mem_track \
                 feature check failed: no soft-dirty bits), so pre-dumps are impossible; run \
                 with --pre-copy=uffd (with post-copy) or without --pre-copy"
                    .into(),
            ))
        }
        (_, true, false) => Err(format!("the {} driver cannot pre-dump", opts.htype)),
        (_, true, true) => Ok(()),
        (PreDump::Auto, false, _) if uffd => Err(
            "no soft-dirty bits: userfaultfd write-protect tracking pre-copies instead".to_string(),
        ),
        (PreDump::Auto, false, _) => Err(
            "this kernel cannot track dirty memory with soft-dirty bits, and userfaultfd \
             pre-copy runs only with post-copy (--post-copy); memory moves in one final dump"
                .to_string(),
        ),
    };
    let use_pre_dump = match use_pre_dump {
        Ok(()) if post_copy => Err(
            "post-copy: the memory follows after the switch (CRIU pre-dumps with post-copy are \
             not supported)"
                .to_string(),
        ),
        other => other,
    };
    match &use_pre_dump {
        Ok(()) => tracing::info!("pre-dumps: enabled (CRIU can track dirty memory)"),
        Err(why) => tracing::info!("pre-dumps: off, {why}"),
    }
    let cpu_dir = work.path().join("cpuinfo");
    let io = |e: std::io::Error| PreflightError::Check(format!("{}: {e}", cpu_dir.display()));
    std::fs::create_dir_all(&cpu_dir).map_err(io)?;
    criu.cpuinfo_dump(&cpu_dir)?;
    let cpuinfo = std::fs::read(cpu_dir.join("cpuinfo.img")).map_err(io)?;
    let need_bytes = proc::tree_rss(prepared.pid);
    let roots = fs_roots(&prepared.fs);
    // What the dump will be asked for, to check the tree against it.
    let mut effective = CriuOpts::default();
    prepared.criu_defaults.apply(&mut effective);
    let mut prepared = prepared;
    prepared.driver.adjust_dump_opts(&mut effective)?;
    super::checks::check_session(prepared.pid, effective.shell_job)
        .map_err(PreflightError::Check)?;
    super::checks::check_unix_peers(prepared.pid, effective.ext_unix_sk)
        .map_err(PreflightError::Check)?;
    let pids = super::checks::restore_pids(prepared.pid);
    let bound = super::checks::bound_sockets(prepared.pid);
    Ok(Preflight {
        prepared,
        criu_version,
        use_pre_dump,
        cpuinfo,
        need_bytes,
        roots,
        pids,
        bound,
        post_copy,
        uffd,
    })
}

/// Whether userfaultfd pre-copy can run here (the reason if not).
fn uffd_possible(opts: &SourceOptions, caps: Capabilities) -> Result<(), String> {
    if caps.contains(Capabilities::OWN_DUMP) {
        return Err(format!(
            "the {} driver dumps through its own tooling, whose final dump phaul cannot make \
             leave memory lazy",
            opts.htype
        ));
    }
    crate::precopy::tracker::supported()
}

/// Post-copy's own pre-flight: a dump phaul's CRIU runs, CRIU's lazy
/// pages, and a pipe limit CRIU's lazy dump needs.
fn post_copy_preflight(
    opts: &SourceOptions,
    caps: Capabilities,
    criu: &mut dyn Criu,
) -> Result<(), PreflightError> {
    if caps.contains(Capabilities::OWN_DUMP) {
        return Err(PreflightError::Check(format!(
            "--post-copy: the {} driver dumps through its own tooling, which phaul cannot make \
             leave memory lazy; run without --post-copy",
            opts.htype
        )));
    }
    let f = criu.feature(rpc::Features {
        lazy_pages: Some(true),
        ..Default::default()
    })?;
    if f.lazy_pages != Some(true) {
        return Err(PreflightError::Check(
            "--post-copy: CRIU says this kernel cannot restore lazily (no non-cooperative \
             userfaultfd: `criu check --feature uffd-noncoop` fails); run without --post-copy"
                .into(),
        ));
    }
    match crate::postcopy::ensure_pipe_max_size() {
        Ok(Some(was)) => tracing::warn!(
            "raised fs.pipe-max-size from {was} to {} for CRIU's lazy dump (its pipes are 4 MiB)",
            crate::postcopy::PIPE_SIZE_NEEDED
        ),
        Ok(None) => {}
        Err(e) => return Err(PreflightError::Check(e)),
    }
    Ok(())
}

/// Counters for the report.
#[derive(Default)]
struct Stats {
    passes: Vec<PassReport>,
    image_bytes: u64,
    criu_dump_us: u64,
    criu_dump: Option<stats::DumpStats>,
    fs_report: Option<(Vec<crate::fsync::PassStats>, String)>,
    stop_reason: Option<StopReason>,
}

/// The live source after the destination accepted: what every later phase
/// uses.
struct Live<'a> {
    env: Env<'a>,
    driver: Driver,
    work: WorkDir,
    journal: Journal,
    record: Record,
    control: Control,
    mem: MemChannel,
    ps_fd: i32,
    fs: Option<SourceSync>,
    /// The file connection, to bound the final pass by the freeze deadline.
    fs_conn: Option<crate::conn::Conn>,
    pid: i32,
    need_bytes: u64,
    use_pre_dump: Result<(), String>,
    criu_defaults: super::CriuDefaults,
    /// The driver dumps through its own tooling (`OWN_DUMP`).
    own_dump: bool,
    freeze_timeout: Duration,
    /// Files were copied (inodes change): CRIU resolves inotify watches by
    /// path.
    irmap: bool,
    /// The files are on shared storage: snapshot before the hand-over,
    /// put back if the migration fails.
    shared_storage: bool,
    snapshotted: bool,
    stats: Stats,
    /// Post-copy: the CRIU configuration that hands the lazy dump's page
    /// server a socket phaul closed (so it never listens on the network,
    /// and ends at once leaving the tree stopped).
    lazy_conf: Option<PathBuf>,
    /// The final dump is lazy (post-copy), and why.
    post_copy: Option<String>,
    /// What `--post-copy=auto` predicted and chose.
    post_copy_decision: Option<String>,
    /// Post-copy: the page server, reading the frozen (later stopped)
    /// tree since the restore request went out (CRIU's restorer already
    /// touches lazy memory before the copy is held).
    serving: Option<Serving>,
    /// Userfaultfd pre-copy is to run ([`crate::precopy`]).
    uffd: bool,
    /// Its write tracking, from the first pass on (dropping it ends the
    /// tracking and clears every write-protect bit).
    tracker: Option<crate::precopy::tracker::Tracker>,
    /// Its passes so far.
    uffd_passes: u32,
}

/// Memory passes done while the workload ran.
/// Connected: the destination accepted, the dump worker is ready.
struct Connected {
    dumper: Box<dyn Criu>,
}

/// Memory passes done while the workload ran; the dump worker is ready for
/// the final dump.
struct Copied {
    dumper: Box<dyn Criu>,
    last_pre: Option<u32>,
}

/// Frozen at CRIU's `post-dump`: every image is written, the pages are at
/// the destination.
struct Frozen {
    dump: Hold,
    iter: u32,
}

/// The destination restored its copy and holds it (not running, network
/// locked), waiting for `Commit`.
struct Restored;

/// `Commit` is sent (or its sending failed half-way); the source tree has
/// a SIGSTOP queued, so it cannot run again without a decision.
struct Committed {
    dump: Hold,
    tasks: Vec<Task>,
    /// The commit could not be confirmed sent: resolve at once.
    broken: Option<PeerError>,
}

/// The source's post-copy page server, running.
struct Serving {
    thread: std::thread::JoinHandle<crate::postcopy::serve::Served>,
    counts: Arc<crate::postcopy::serve::ServeCounts>,
    since: Instant,
}

impl Serving {
    /// The destination asked for pages in the background: it does so
    /// only after the switch.
    fn past_switch(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.counts.pages.load(Relaxed) > self.counts.urgent.load(Relaxed)
    }
}

/// Driver hooks and progress during the final dump.
struct Hooks<'d> {
    driver: &'d mut Driver,
    progress: &'d dyn Progress,
}

impl DumpHooks for Hooks<'_> {
    fn freezing(&mut self) {
        self.progress.phase("frozen");
    }
    fn net_lock(&mut self) -> Result<(), crate::Error> {
        self.driver.net_lock()
    }
    fn net_unlock(&mut self) {
        if let Err(e) = self.driver.net_unlock() {
            tracing::warn!("{e}");
        }
    }
    fn own_dump_finished(&mut self, meanwhile: &mut dyn FnMut()) -> Result<(), crate::Error> {
        self.driver.dump_wait_while(meanwhile)
    }
}

impl<'a> Live<'a> {
    /// Connects, sends the handshake, starts the file sync and the dump
    /// worker. Still pre-flight: a failure refuses.
    fn connect(
        env: Env<'a>,
        pre: Preflight,
        work: WorkDir,
        journal: Journal,
    ) -> Result<(Live<'a>, Connected), PreflightError> {
        let Preflight {
            prepared,
            criu_version,
            use_pre_dump,
            cpuinfo,
            need_bytes,
            roots,
            pids,
            bound,
            post_copy,
            uffd,
        } = pre;
        let opts = env.opts;
        let conns = connect(env.connector, env.session, true, !roots.is_empty())?;
        let mem = conns.mem.expect("memory connection in live mode");
        for c in std::iter::once(&conns.control)
            .chain(std::iter::once(&mem))
            .chain(conns.fs.iter())
        {
            env.abort.watch(c);
        }
        let mut control = Control::with_peer(conns.control, "destination").map_err(|e| {
            PreflightError::Check(format!("cannot use the control connection: {e}"))
        })?;
        control.set_deadline(Some(Instant::now() + Duration::from_secs(60)));
        handshake(
            &mut control,
            Hello {
                criu_version: Some(criu_version),
                cpuinfo,
                need_bytes,
                pids,
                bound,
                post_copy,
                source_facts: prepared.facts.clone(),
                ..hello(opts, env.session, &roots)
            },
        )?;
        control.set_deadline(None);
        if let Some(r) = env.abort.reason() {
            return Err(PreflightError::Interrupted(r));
        }
        let fs_conn = conns.fs.as_ref().and_then(|c| c.try_clone().ok());
        let fs = conns.fs.map(|c| {
            SourceSync::start(c, roots.iter().map(PathBuf::from).collect(), opts.fs_rules)
        });
        let mem = MemChannel::new(mem);
        let ps_fd = mem.raw_fd();
        // Post-copy: CRIU's lazy page server gets one end of a socketpair
        // whose other end is closed now (see `crate::postcopy`).
        let lazy = match post_copy {
            true => Some(
                nix::sys::socket::socketpair(
                    nix::sys::socket::AddressFamily::Unix,
                    nix::sys::socket::SockType::Stream,
                    None,
                    nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                )
                .map_err(|e| PreflightError::Check(format!("socketpair: {e}")))?
                .1,
            ),
            false => None,
        };
        let inherit: Vec<i32> = std::iter::once(ps_fd)
            .chain(lazy.as_ref().map(|l| l.as_raw_fd()))
            .collect();
        let dumper = env.launcher.spawn("source", &work.criu(), &inherit)?;
        let lazy_conf = match &lazy {
            Some(l) => {
                let p = work.path().join("lazy-dump.conf");
                std::fs::write(&p, format!("ps-socket {}\n", l.as_raw_fd()))
                    .map_err(|e| PreflightError::Check(format!("{}: {e}", p.display())))?;
                Some(p)
            }
            None => None,
        };
        drop(lazy);
        let mut record = Record::new(
            env.session,
            journal::Side::Source,
            &opts.htype,
            &opts.id,
            "live",
        );
        if let Connector::Tcp(remote) = env.connector {
            record.peer = Some(remote.addr.to_string());
            record.peer_name = remote.server_name().map(str::to_string);
        }
        record.owner = proc::this_task();
        let Prepared {
            driver,
            pid,
            fs: spec,
            info,
            criu_defaults,
            ..
        } = prepared;
        Ok((
            Live {
                own_dump: info.capabilities.contains(Capabilities::OWN_DUMP),
                criu_defaults,
                freeze_timeout: opts
                    .freeze_timeout
                    .unwrap_or_else(|| default_freeze_timeout(need_bytes)),
                env,
                driver,
                work,
                journal,
                record,
                control,
                mem,
                ps_fd,
                fs,
                fs_conn,
                pid,
                need_bytes,
                use_pre_dump,
                irmap: !roots.is_empty() && !spec.inodes_persistent,
                shared_storage: spec.kind == FsSyncKind::SharedStorage,
                snapshotted: false,
                stats: Stats::default(),
                lazy_conf,
                post_copy: None,
                post_copy_decision: None,
                serving: None,
                uffd,
                tracker: None,
                uffd_passes: 0,
            },
            Connected { dumper },
        ))
    }

    /// Memory passes (pre-dumps, when the kernel tracks dirty memory) and
    /// the live file-sync passes, while the workload runs.
    fn copy(&mut self, connected: Connected) -> Result<Copied, CopyError> {
        let Connected { mut dumper } = connected;
        let last_pre = match std::mem::replace(&mut self.use_pre_dump, Ok(())) {
            Ok(()) => {
                let work = &self.work;
                let images = |n: u32| work.images(n);
                let driver = &mut self.driver;
                let mut adjust =
                    |o: &mut CriuOpts| driver.adjust_dump_opts(o).map_err(|e| e.to_string());
                let mut lp = PreDumpLoop {
                    criu: &mut *dumper,
                    pid: self.pid,
                    ps_fd: self.ps_fd,
                    images: &images,
                    adjust: &mut adjust,
                    rules: self.env.opts.rules,
                    restore_estimate: self.env.opts.restore_estimate,
                    channel: Some(&mut self.mem),
                    progress: self.env.progress.clone(),
                };
                let mut remote = ControlRemote {
                    control: &mut self.control,
                    abort: self.env.abort,
                    lazy: false,
                };
                let (reports, n, r) = lp.run(&mut remote).map_err(CopyError::Pass)?;
                self.stats.passes.extend(reports);
                self.stats.stop_reason = Some(r);
                Some(n)
            }
            Err(_) if self.uffd && self.single_shot_fits()? => {
                self.uffd = false;
                self.lazy_conf = None;
                self.stats.stop_reason = Some(StopReason::NoPreDump {
                    why: "--post-copy=auto: a single-shot dump fits the downtime target, so \
                          neither pre-copy nor post-copy is needed"
                        .into(),
                });
                None
            }
            Err(_) if self.uffd => {
                self.tracker = Some(Default::default());
                let (reports, n, r) = self.uffd_loop().expect("a tracker").run()?;
                self.stats.passes.extend(reports);
                self.stats.stop_reason = Some(r);
                self.uffd_passes = n;
                None
            }
            Err(why) => {
                self.stats.stop_reason = Some(StopReason::NoPreDump { why });
                None
            }
        };
        if let Some(fs) = self.fs.as_mut() {
            self.env.progress.phase("syncing files");
            fs.wait_converged().map_err(CopyError::FileSync)?;
        }
        if let Some(r) = self.env.abort.reason() {
            return Err(CopyError::Interrupted(r));
        }
        self.post_copy = match (self.uffd, self.post_copy_decision.clone()) {
            (true, Some(auto)) => Some(format!(
                "{auto}; userfaultfd pre-copy ran first, the pages written after its last pass \
                 follow"
            )),
            (true, None) => Some(
                "userfaultfd pre-copy: the pages written after its last pass follow".to_string(),
            ),
            // After `single_shot_fits` chose a single-shot dump there is
            // no lazy configuration left, and this says so.
            (false, _) => self.decide_post_copy()?,
        };
        Ok(Copied { dumper, last_pre })
    }

    /// Whether the final dump leaves private memory lazy, and why (also
    /// recorded for the report when `auto` decides against it).
    fn decide_post_copy(&mut self) -> Result<Option<String>, CopyError> {
        use crate::postcopy::PostCopy;
        if self.lazy_conf.is_none() {
            return Ok(None);
        }
        let why = match self.env.opts.post_copy {
            PostCopy::Off => return Ok(None),
            PostCopy::On => return Ok(Some("--post-copy".into())),
            PostCopy::Auto => {
                // Post-copy runs no pre-dumps, so nothing measured the
                // channel yet.
                let rate = self.probe_rate()?;
                let target = self.env.opts.rules.downtime_target;
                let last = PassStats {
                    pages_written: self.need_bytes / super::iter::PAGE_SIZE,
                    bytes: rate as u64,
                    duration: Duration::from_secs(1),
                };
                let predicted =
                    super::iter::predicted_downtime(&last, self.env.opts.restore_estimate)
                        .unwrap_or(Duration::MAX);
                let said = format!(
                    "--post-copy=auto: a single-shot dump would freeze the workload for about {} ms \
                     ({} MiB at {:.0} MiB/s measured, plus the restore), {} the {} ms target",
                    predicted.as_millis(),
                    self.need_bytes >> 20,
                    rate / (1 << 20) as f64,
                    if predicted > target { "above" } else { "within" },
                    target.as_millis()
                );
                tracing::info!("{said}");
                self.post_copy_decision = Some(said.clone());
                if predicted <= target {
                    return Ok(None);
                }
                said
            }
        };
        Ok(Some(why))
    }

    /// `--post-copy=auto` with userfaultfd pre-copy chosen by `auto`:
    /// does a single-shot dump fit the downtime target anyway (then
    /// neither runs)? Decided on a measured burst, before any pass.
    fn single_shot_fits(&mut self) -> Result<bool, CopyError> {
        use crate::postcopy::PostCopy;
        if self.env.opts.post_copy != PostCopy::Auto || self.env.opts.pre_dump != PreDump::Auto {
            return Ok(false);
        }
        let lazy = self.decide_post_copy()?;
        Ok(lazy.is_none())
    }

    /// Measures the memory channel's rate with a burst of filler bytes
    /// while the workload runs.
    fn probe_rate(&mut self) -> Result<f64, CopyError> {
        use std::io::Write;
        let bytes = (self.need_bytes / 8).clamp(8 << 20, 64 << 20);
        self.env.progress.phase("measuring the link");
        let started = Instant::now();
        self.control.send(&Msg::Probe { bytes })?;
        let chunk = vec![0u8; 1 << 20];
        let mut conn = self
            .mem
            .conn()
            .try_clone()
            .map_err(|e| CopyError::Pass(format!("the memory channel: {e}")))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            conn.write_all(&chunk[..n])
                .map_err(|e| CopyError::Pass(format!("the rate probe: {e}")))?;
            left -= n as u64;
        }
        match self.control.recv("ProbeDone")? {
            Msg::ProbeDone => {}
            other => return Err(unexpected(&other, "ProbeDone", "destination").into()),
        }
        let rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-6);
        tracing::debug!(mib_s = rate / (1 << 20) as f64, "memory channel measured");
        Ok(rate)
    }

    /// The final dump up to `post-dump`: CRIU freezes the tree, streams the
    /// remaining pages and writes the other images. A failure here means
    /// CRIU resumed the tree already.
    fn freeze(&mut self, copied: Copied) -> Result<Frozen, HandOverError> {
        let Copied {
            dumper: criu,
            last_pre: parent,
        } = copied;
        let iter = parent.map_or(1, |n| n + 1);
        let lazy = self.post_copy.is_some();
        ControlRemote {
            control: &mut self.control,
            abort: self.env.abort,
            lazy,
        }
        .start_iter(iter, parent)
        .map_err(HandOverError::Dump)?;
        let dir = self.work.images(iter);
        std::fs::create_dir_all(&dir).map_err(|source| HandOverError::Io {
            what: dir.display().to_string(),
            source,
        })?;
        let mut copts = CriuOpts {
            tcp_established: self.env.opts.tcp_established,
            force_irmap: self.irmap,
            ..CriuOpts::default()
        };
        self.criu_defaults.apply(&mut copts);
        self.driver.adjust_dump_opts(&mut copts)?;
        let mut ctx = DumpContext {
            images_dir: dir.display().to_string().into(),
            parent_images_dir: parent
                .map(|p| self.work.images(p).display().to_string().into())
                .into(),
            pid: self.pid,
            opts: copts.clone(),
            action_script: "".into(),
            criu_config: "".into(),
        };
        // The tree is about to freeze: record it first.
        self.record.tasks = proc::tasks(self.pid);
        let deadline_from_now = self.freeze_timeout;
        let before = self.mem.sent();
        let dump = if self.own_dump {
            // The driver's tooling runs CRIU; phaul's action script holds
            // it. Its pages land in the images, not on the memory channel.
            self.mem.shutdown();
            let hold = super::hold::ActionHold::create(&self.work.path().join("hold")).map_err(
                |source| HandOverError::Io {
                    what: "the action script".into(),
                    source,
                },
            )?;
            ctx.action_script = hold.script().display().to_string().into();
            ctx.criu_config = hold.config().display().to_string().into();
            self.journal.set(
                &mut self.record,
                journal::State::Started,
                "final dump (driver)",
            )?;
            self.env
                .progress
                .pass_started(iter, "dump", self.need_bytes);
            let outcome = self.driver.dump(&ctx)?;
            if !outcome.handled {
                return Err(HandOverError::Dump(format!(
                    "the {} driver declares own-dump but left the dump to the engine",
                    self.env.opts.htype
                )));
            }
            let progress = self.env.progress.clone();
            let held = super::dump::ScriptDump::until_post_dump(
                hold,
                &mut || progress.phase("frozen"),
                Instant::now() + deadline_from_now,
            );
            if held.is_err() {
                // Its tooling may still run: let it end.
                let _ = self.driver.dump_wait();
            }
            Hold::Script(Box::new(held?))
        } else {
            let outcome = self.driver.dump(&ctx)?;
            if outcome.handled {
                return Err(HandOverError::Dump(format!(
                    "the {} driver dumped the workload itself without declaring the own-dump \
                     capability, so the engine could not hold it for the commit",
                    self.env.opts.htype
                )));
            }
            let mut o = criu.opts(&dir, "dump.log");
            o.pid = Some(self.pid);
            o.notify_scripts = Some(true);
            match (lazy, &self.lazy_conf) {
                (true, Some(conf)) => {
                    // Private memory stays behind; CRIU's lazy page server
                    // ends at once (its socket's peer is closed) and leaves
                    // the tree stopped for phaul to serve the pages.
                    o.lazy_pages = Some(true);
                    o.leave_stopped = Some(true);
                    o.config_file = Some(conf.display().to_string());
                }
                _ => {
                    o.ps = Some(rpc::PageServerInfo {
                        fd: Some(self.ps_fd),
                        ..Default::default()
                    })
                }
            }
            if let Some(p) = parent {
                o.parent_img = Some(format!("../{p}"));
                o.track_mem = Some(true);
            }
            criu_opts_to_rpc(&copts, &mut o);
            self.criu_defaults.apply_rpc(&mut o);
            skip_needless_network_lock(self.pid, &copts, &mut o);
            self.journal
                .set(&mut self.record, journal::State::Started, "final dump")?;
            self.env
                .progress
                .pass_started(iter, "dump", self.need_bytes);
            self.mem.watch(self.env.progress.clone(), before);
            let deadline = Instant::now() + deadline_from_now;
            let held = FinalDump::start(criu, o)
                .map_err(HandOverError::from)
                .and_then(|d| {
                    d.until_post_dump(
                        &mut Hooks {
                            driver: &mut self.driver,
                            progress: &*self.env.progress,
                        },
                        Some(deadline),
                    )
                });
            self.mem.unwatch();
            Hold::Criu(held.map_err(|e| match e {
                HandOverError::Criu(crate::criu::CriuError::Timeout { .. }) => {
                    HandOverError::FreezeTimeout {
                        limit: self.freeze_timeout,
                        during: "CRIU dumped the workload",
                    }
                }
                e => e,
            })?)
        };
        self.stats.criu_dump_us = dump.dump_time().as_micros() as u64;
        let pass = PassStats {
            pages_written: 0,
            bytes: self.mem.sent().saturating_sub(before),
            duration: dump.dump_time(),
        };
        self.env.progress.pass_finished(&pass);
        self.stats
            .passes
            .push(PassReport::new(iter, "dump", &pass, None));
        Ok(Frozen { dump, iter })
    }

    /// The userfaultfd pre-copy loop over this migration's tracker.
    fn uffd_loop(&mut self) -> Option<super::uffdcopy::UffdLoop<'_>> {
        Some(super::uffdcopy::UffdLoop {
            tracker: self.tracker.as_mut()?,
            pid: self.pid,
            rules: self.env.opts.rules,
            restore_estimate: self.env.opts.restore_estimate,
            need_bytes: self.need_bytes,
            control: &mut self.control,
            mem: &mut self.mem,
            progress: self.env.progress.clone(),
            abort: self.env.abort,
        })
    }

    /// Userfaultfd pre-copy, the tree frozen by the final dump: the last
    /// scan, and the destination forgets what it names.
    fn last_scan(&mut self, dump: &Hold) -> Result<(), HandOverError> {
        let deadline = dump.frozen_at() + self.freeze_timeout;
        let _ = self.mem.conn().set_deadline(Some(deadline));
        self.uffd_passes += 1;
        let pass = self.uffd_passes;
        let Some(mut lp) = self.uffd_loop() else {
            return Ok(());
        };
        let r = lp.last(pass);
        let _ = self.mem.conn().set_deadline(None);
        let (sent, took) = r.map_err(|e| match e {
            CopyError::Peer(p) => HandOverError::Peer(p),
            e => HandOverError::Dump(format!("userfaultfd pre-copy's last scan: {e}")),
        })?;
        let mut report = PassReport::new(
            self.uffd_passes,
            "uffd-last",
            &PassStats {
                pages_written: sent.written,
                bytes: 0,
                duration: took,
            },
            None,
        );
        report.pages_written = sent.written;
        self.stats.passes.push(report);
        Ok(())
    }

    /// While frozen: the final file pass, the storage snapshot, the images
    /// and meta files, and the destination's restore up to its hold.
    fn hand_over(&mut self, frozen: &mut Frozen) -> Result<Restored, HandOverError> {
        let deadline = frozen.dump.frozen_at() + self.freeze_timeout;
        self.control.set_deadline(Some(deadline));
        let (limit, abort) = (self.freeze_timeout, self.env.abort);
        let timeout = |e: PeerError, during| match (e, abort.reason()) {
            (_, Some(r)) => HandOverError::Interrupted(r),
            (PeerError::Recv { .. } | PeerError::Send { .. }, None)
                if Instant::now() >= deadline =>
            {
                HandOverError::FreezeTimeout { limit, during }
            }
            (e, None) => e.into(),
        };
        if let Some(r) = self.env.abort.reason() {
            return Err(HandOverError::Interrupted(r));
        }
        if self.tracker.is_some() {
            self.last_scan(&frozen.dump)?;
            self.control.set_deadline(Some(deadline));
        }
        if let Some(fs) = self.fs.take() {
            self.env.progress.phase("final file sync");
            if let Some(c) = &self.fs_conn {
                let _ = c.set_deadline(Some(deadline));
            }
            let report = fs.final_pass().map_err(|e| match abort.reason() {
                Some(r) => HandOverError::Interrupted(r),
                None if Instant::now() >= deadline => HandOverError::FreezeTimeout {
                    limit,
                    during: "the final file sync",
                },
                None => HandOverError::FileSync(e),
            })?;
            self.stats.fs_report = Some(report);
        }
        if self.shared_storage {
            self.env.progress.phase("snapshotting shared storage");
            self.driver.storage_snapshot()?;
            self.snapshotted = true;
        }
        let meta_dir = self.work.meta();
        let meta = self
            .driver
            .meta_files_out(&meta_dir.display().to_string())?;
        let images = self.work.images(frozen.iter);
        let io = |source| HandOverError::Io {
            what: images.display().to_string(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
            .map_err(io)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        files.sort();
        files.extend(meta.iter().map(|m| meta_dir.join(m)));
        self.env.progress.phase("sending images");
        for f in &files {
            self.stats.image_bytes += send_file(&mut self.control, f).map_err(|e| match e {
                HandOverError::Peer(p) => timeout(p, "sending the images"),
                e => e,
            })?;
        }
        self.control
            .send(&Msg::Restore {
                iter: frozen.iter,
                meta_files: meta,
            })
            .map_err(|e| timeout(e, "sending the restore request"))?;
        self.env.progress.phase("restoring on the destination");
        if self.post_copy.is_some() {
            let tasks = proc::tasks(self.pid);
            self.serving = Some(self.start_serving(&tasks)?);
        }
        // While the destination restores, CRIU holds the tree; if CRIU
        // dies, the tree runs on and the dump is stale: roll back at once.
        while !self
            .control
            .conn()
            .readable_within(Duration::from_millis(100))
        {
            if frozen.dump.criu_exited() {
                return Err(stale_dump());
            }
            if Instant::now() >= deadline {
                return Err(HandOverError::FreezeTimeout {
                    limit,
                    during: "the destination restored",
                });
            }
        }
        match self.control.recv("Restored") {
            Ok(Msg::Restored) => Ok(Restored),
            Ok(other) => Err(unexpected(&other, "Restored", "destination").into()),
            Err(e) => Err(timeout(e, "the destination restored")),
        }
    }

    /// The commit: record it, stop the frozen tree so that it cannot run
    /// again on its own (a SIGSTOP queued to every task; CRIU resuming the
    /// tree leaves it stopped), then send `Commit`. A failure before the
    /// SIGSTOP hands the frozen dump back for a rollback.
    fn commit(
        &mut self,
        frozen: Frozen,
        _restored: Restored,
    ) -> Result<Committed, Box<(Frozen, HandOverError)>> {
        if !self.env.abort.commit() {
            let r = self.env.abort.reason().unwrap_or_else(|| "aborted".into());
            return Err(Box::new((frozen, HandOverError::Interrupted(r))));
        }
        // The tree is frozen: this is every task it has.
        let tasks = proc::tasks(self.pid);
        self.record.tasks = tasks.clone();
        if let Err(e) = self.journal.set(
            &mut self.record,
            journal::State::Committing,
            "the source tree is stopped and Commit sent",
        ) {
            return Err(Box::new((frozen, e.into())));
        }
        proc::signal_tasks(&tasks, nix::sys::signal::Signal::SIGSTOP);
        // CRIU must still hold the tree now that it cannot run again: had it
        // died before, the tree ran on from the dump, which is stale.
        let mut frozen = frozen;
        if frozen.dump.criu_exited() {
            proc::signal_tasks(&tasks, nix::sys::signal::Signal::SIGCONT);
            return Err(Box::new((frozen, stale_dump())));
        }
        let broken = self.control.send(&Msg::Commit).err();
        Ok(Committed {
            dump: frozen.dump,
            tasks,
            broken,
        })
    }

    /// Starts post-copy's page server on the memory channel (reading the
    /// frozen tree now, its stopped copy after the switch).
    fn start_serving(&mut self, tasks: &[Task]) -> Result<Serving, HandOverError> {
        let pids = crate::postcopy::serve::vpid_map(tasks);
        let counts = Arc::new(crate::postcopy::serve::ServeCounts::default());
        let c = counts.clone();
        let io = |what: &str| {
            let what = what.to_string();
            move |source| HandOverError::Io { what, source }
        };
        let conn = self
            .mem
            .conn()
            .try_clone()
            .map_err(io("the memory channel"))?;
        let stall = self.env.opts.post_copy_stall;
        let thread = std::thread::Builder::new()
            .name("postcopy-serve".into())
            .spawn(move || crate::postcopy::serve::serve(&conn, &pids, stall, &c))
            .map_err(io("the post-copy page server's thread"))?;
        Ok(Serving {
            thread,
            counts,
            since: Instant::now(),
        })
    }

    /// Waits for the destination's `Resumed` (or resolves the outcome by
    /// asking it) and finishes accordingly.
    fn complete(mut self, mut c: Committed) -> Result<Report, MigrationError> {
        let answer = match c.broken.take() {
            Some(e) => Err(e),
            None => self.control.recv("Resumed"),
        };
        let verdict = match answer {
            Ok(Msg::Resumed {
                pid,
                stats,
                restore_us,
            }) => {
                if self.serving.is_some() {
                    return self.post_copied(c, pid, stats, restore_us);
                }
                return Ok(self.migrated(c, pid, stats, restore_us));
            }
            // The destination could not let its copy run and discarded it.
            Err(PeerError::Aborted { reason, .. }) => {
                return Err(self.resume(c, CommitError::Discarded(reason)));
            }
            Ok(other) => self.resolve(unexpected(&other, "Resumed", "destination").to_string()),
            // Post-copy: a background page request means the destination
            // passed the switch: its copy runs, whatever became of the
            // control connection; the page transfer decides the rest.
            Err(e) if self.serving.as_ref().is_some_and(Serving::past_switch) => {
                tracing::warn!(
                    "lost the control connection after the switch ({e}); the page transfer goes on"
                );
                return self.post_copied(c, 0, None, 0);
            }
            Err(e) => {
                let why = match self.env.abort.reason() {
                    Some(r) => format!("{r} after the commit"),
                    None => format!("lost the destination after the commit: {e}"),
                };
                self.resolve(why)
            }
        };
        match verdict {
            (Verdict::Runs, _) => {
                tracing::info!("the destination runs the workload: completing the migration");
                if self.serving.is_some() {
                    return self.post_copied(c, 0, None, 0);
                }
                Ok(self.migrated(c, 0, None, 0))
            }
            (Verdict::Discarded, why) => Err(self.resume(
                c,
                CommitError::Discarded(format!("{why}; the destination says so")),
            )),
            (Verdict::Unknown, why) => Err(self.undecided(c, CommitError::Unknown { why })),
            (Verdict::NoAnswer(last), why) => Err(self.undecided(
                c,
                CommitError::Undecided {
                    why: format!("{why} ({last})"),
                },
            )),
        }
    }

    /// After the commit the connection broke: ask the destination, on new
    /// connections, what became of the session.
    fn resolve(&self, why: String) -> (Verdict, String) {
        tracing::warn!("{why}; asking the destination what became of the migration");
        self.env.progress.phase("asking the destination");
        let verdict = match self.env.connector {
            Connector::Tcp(remote) => session::ask(
                remote,
                self.env.session,
                self.env.opts.resolve_timeout,
                Some(self.env.abort),
            ),
            Connector::Given { .. } => {
                Verdict::NoAnswer("the connections were handed in, none can be opened".into())
            }
        };
        (verdict, why)
    }

    /// The destination runs the workload: record it, let CRIU kill the
    /// source copy, make sure it is gone, and report.
    fn migrated(
        mut self,
        c: Committed,
        dest_pid: i32,
        restore: Option<stats::RestoreStats>,
        restore_us: u64,
    ) -> Report {
        let resumed_at = Instant::now();
        if let Err(e) = self
            .journal
            .set(&mut self.record, journal::State::Migrated, "")
        {
            tracing::error!("{e}");
        }
        let (frozen_at, work_criu) = self.let_criu_go(
            c.dump,
            "after the commit; making sure the source copy is gone",
        );
        if !proc::kill_tasks(&c.tasks, Duration::from_secs(10)) {
            tracing::error!("the source copy (pid {}) did not go away", self.pid);
        }
        let times = (frozen_at, resumed_at, dest_pid, restore_us);
        self.finish(times, work_criu, restore, None)
    }

    /// Answers `post-dump` with success and follows CRIU to its end (it
    /// kills the tree, or with post-copy leaves it stopped); returns when
    /// the tree froze and CRIU's log directory.
    fn let_criu_go(&mut self, dump: Hold, failing: &str) -> (Instant, Option<PathBuf>) {
        let frozen_at = dump.frozen_at();
        let work_criu = dump.work_dir();
        let mut hooks = Hooks {
            driver: &mut self.driver,
            progress: &*self.env.progress,
        };
        if let Err(e) = dump.release(true, &mut hooks, Duration::from_secs(30)) {
            tracing::warn!("CRIU reported a failure ({e}) {failing}");
        }
        (frozen_at, work_criu)
    }

    /// Post-copy: the destination runs the workload and fetches its
    /// memory from this host's stopped copy. Record it, let CRIU go (its
    /// lazy page server ends at once and leaves the tree stopped), serve
    /// until every page has arrived, then remove the source copy.
    fn post_copied(
        mut self,
        c: Committed,
        dest_pid: i32,
        restore: Option<stats::RestoreStats>,
        restore_us: u64,
    ) -> Result<Report, MigrationError> {
        let resumed_at = Instant::now();
        if let Err(e) = self.journal.set(
            &mut self.record,
            journal::State::PostCopy,
            "the destination runs; this stopped copy serves the memory it still lacks",
        ) {
            tracing::error!("{e}");
        }
        let serving = self.serving.take().expect("post-copy serves");
        let (frozen_at, work_criu) =
            self.let_criu_go(c.dump, "ending the lazy dump; the tree stays stopped");
        // CRIU left the tree stopped; the SIGSTOP queued at the commit
        // holds it whatever CRIU did.
        proc::signal_tasks(&c.tasks, nix::sys::signal::Signal::SIGSTOP);
        let progress = self.env.progress.clone();
        progress.phase("post-copy: memory follows");
        progress.pass_started(0, "post-copy", self.need_bytes);
        while !serving.thread.is_finished() {
            let pages = serving
                .counts
                .pages
                .load(std::sync::atomic::Ordering::Relaxed);
            progress.pass_progress(pages * super::iter::PAGE_SIZE);
            std::thread::sleep(Duration::from_millis(50));
        }
        let served = serving.thread.join().unwrap_or_else(|_| {
            crate::postcopy::serve::Served::Broken("the page server panicked".into())
        });
        let took = serving.since.elapsed();
        let pages = serving
            .counts
            .pages
            .load(std::sync::atomic::Ordering::Relaxed);
        let urgent = serving
            .counts
            .urgent
            .load(std::sync::atomic::Ordering::Relaxed);
        progress.pass_finished(&PassStats {
            pages_written: pages,
            bytes: pages * super::iter::PAGE_SIZE,
            duration: took,
        });
        match served {
            crate::postcopy::serve::Served::AllIn { pages: placed } => {
                if let Err(e) = self.journal.set(
                    &mut self.record,
                    journal::State::Migrated,
                    "every page arrived at the destination",
                ) {
                    tracing::error!("{e}");
                }
                if !proc::kill_tasks(&c.tasks, Duration::from_secs(10)) {
                    tracing::error!("the source copy (pid {}) did not go away", self.pid);
                }
                if let Err(e) = crate::postcopy::serve::released(self.mem.conn()) {
                    tracing::warn!(
                        "the destination did not hear that the source copy is gone: {e}"
                    );
                }
                let report = PostCopyReport {
                    why: self.post_copy.take().unwrap_or_default(),
                    pages_served: pages,
                    pages_placed: placed,
                    pages_on_demand: urgent,
                    pages_background: pages - urgent,
                    time_to_last_page_us: took.as_micros() as u64,
                    rate_mib_s: (pages * super::iter::PAGE_SIZE) as f64
                        / took.as_secs_f64().max(1e-6)
                        / (1 << 20) as f64,
                };
                let times = (frozen_at, resumed_at, dest_pid, restore_us);
                Ok(self.finish(times, work_criu, restore, Some(report)))
            }
            crate::postcopy::serve::Served::Broken(why) => {
                // Neither copy is whole on its own now: keep this one
                // stopped, say so, and leave the decision to recover.
                proc::signal_tasks(&c.tasks, nix::sys::signal::Signal::SIGSTOP);
                let note = format!("post-copy transfer broke after {pages} pages: {why}");
                if let Err(e) = self
                    .journal
                    .set(&mut self.record, journal::State::PostCopy, &note)
                {
                    tracing::error!("{e}");
                }
                if self.driver.net_locked() {
                    if let Err(e) = self.driver.net_unlock() {
                        tracing::warn!("{e}");
                    }
                }
                self.work.keep(true);
                self.mem.shutdown();
                Err(MigrationError::Undecided {
                    cause: CommitError::PostCopyBroken { why },
                    pid: self.pid,
                })
            }
        }
    }

    /// The migration succeeded: statistics, clean-up, the report.
    fn finish(
        mut self,
        (frozen_at, resumed_at, dest_pid, restore_us): (Instant, Instant, i32, u64),
        work_criu: Option<PathBuf>,
        restore: Option<stats::RestoreStats>,
        post_copy: Option<PostCopyReport>,
    ) -> Report {
        // A lazy dump's statistics describe CRIU's own lazy page server,
        // which phaul ends at once: they would mislead.
        self.stats.criu_dump = work_criu
            .filter(|_| post_copy.is_none())
            .and_then(|d| stats::read_dump(&d).ok());
        if let (Some(last), Some(s)) = (self.stats.passes.last_mut(), self.stats.criu_dump.as_ref())
        {
            last.pages_written = s.pages_written;
            last.pages_skipped_parent = s.pages_skipped_parent;
            last.pages_scanned = s.pages_scanned;
        }
        self.work.keep(self.env.opts.keep_images);
        self.work.succeeded();
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
        // Acknowledged bytes where the channel is TCP; CRIU's own count of
        // pages otherwise.
        let memory_bytes = match self.mem.counts_bytes() {
            true => self.mem.sent(),
            false => self
                .stats
                .passes
                .iter()
                .map(|p| p.pages_written * super::iter::PAGE_SIZE)
                .sum(),
        };
        self.mem.shutdown();
        self.journal.prune(7 * 24 * 3600);
        let opts = self.env.opts;
        Report {
            session: format!("{:016x}", self.env.session),
            htype: opts.htype.clone(),
            id: opts.id.clone(),
            mode: "live",
            destination: self.env.connector.describe(),
            transport: self.env.connector.transport(),
            destination_pid: dest_pid,
            total_time_us: self.env.started.elapsed().as_micros() as u64,
            frozen_time_us: resumed_at.saturating_duration_since(frozen_at).as_micros() as u64,
            restore_time_us: restore_us,
            criu_dump_time_us: self.stats.criu_dump_us,
            pre_dump: self
                .stats
                .passes
                .iter()
                .any(|p| p.kind == "pre-dump" || p.kind == "uffd"),
            stop_reason: self
                .stats
                .stop_reason
                .take()
                .unwrap_or(StopReason::NoPreDump {
                    why: "no passes".into(),
                }),
            iterations: std::mem::take(&mut self.stats.passes),
            memory_bytes,
            image_bytes: self.stats.image_bytes,
            bytes_on_wire: memory_bytes
                + self.stats.image_bytes
                + session::fs_bytes(&self.stats.fs_report),
            criu_dump: self.stats.criu_dump.take(),
            criu_restore: restore,
            fs_passes: self
                .stats
                .fs_report
                .as_ref()
                .map(|r| r.0.clone())
                .unwrap_or_default(),
            fs_stop_reason: self.stats.fs_report.take().map(|r| r.1),
            post_copy,
            post_copy_decision: self.post_copy_decision.take(),
        }
    }

    /// After the commit the destination confirmed it does not run the
    /// workload: put the storage back, let the stopped tree run again.
    fn resume(mut self, c: Committed, cause: CommitError) -> MigrationError {
        tracing::warn!("resuming the source copy: {cause}");
        self.stop_serving();
        self.rollback_storage();
        let mut hooks = Hooks {
            driver: &mut self.driver,
            progress: &*self.env.progress,
        };
        if let Err(e) = c.dump.release(false, &mut hooks, Duration::from_secs(30)) {
            tracing::warn!("CRIU did not confirm resuming the tree: {e}");
        }
        proc::signal_tasks(&c.tasks, nix::sys::signal::Signal::SIGCONT);
        self.finish_rollback(cause.into())
    }

    /// Nobody can tell whether the destination runs the workload: the tree
    /// stays stopped (CRIU lets go of it; the queued SIGSTOP holds it), the
    /// journal says `Committing`, and `phaul recover` decides later.
    fn undecided(mut self, c: Committed, cause: CommitError) -> MigrationError {
        self.stop_serving();
        drop(c.dump);
        proc::signal_tasks(&c.tasks, nix::sys::signal::Signal::SIGSTOP);
        // CRIU let go of the tree and of its network lock; the driver's
        // lock goes with it (the stopped tree sends nothing), so that
        // whatever `phaul recover` decides finds the network as CRIU left
        // it.
        if self.driver.net_locked() {
            if let Err(e) = self.driver.net_unlock() {
                tracing::warn!("{e}");
            }
        }
        self.work.keep(true);
        self.mem.shutdown();
        MigrationError::Undecided {
            cause,
            pid: self.pid,
        }
    }

    /// Post-copy's page server must stop before the tree may run again (or
    /// is given up): nothing reads it after that.
    fn stop_serving(&mut self) {
        if let Some(s) = self.serving.take() {
            self.mem.shutdown();
            let _ = s.thread.join();
        }
    }

    /// A failure while frozen, before the commit: the storage goes back
    /// before the tree resumes on it, then CRIU resumes the tree and
    /// unlocks its network exactly as it was.
    fn roll_back(mut self, frozen: Frozen, e: HandOverError) -> MigrationError {
        tracing::warn!("rolling back: {e}");
        self.control.abort(&e.to_string());
        self.stop_serving();
        self.rollback_storage();
        let mut hooks = Hooks {
            driver: &mut self.driver,
            progress: &*self.env.progress,
        };
        if let Err(e) = frozen
            .dump
            .release(false, &mut hooks, Duration::from_secs(30))
        {
            tracing::warn!("CRIU did not confirm resuming the tree: {e}");
        }
        self.finish_rollback(e.into())
    }

    /// A failure before the freeze, or a dump that failed by itself (CRIU
    /// resumed the tree already).
    fn abandon(mut self, cause: super::error::RollbackCause) -> MigrationError {
        tracing::warn!("abandoning the migration: {cause}");
        self.control.abort(&cause.to_string());
        self.rollback_storage();
        self.finish_rollback(cause)
    }

    fn finish_rollback(mut self, cause: super::error::RollbackCause) -> MigrationError {
        self.mem.shutdown();
        if let Err(e) = self.driver.migration_fail() {
            tracing::warn!("{e}");
        }
        self.work.keep(self.env.opts.keep_images);
        if !proc::alive(self.pid) {
            self.journal_final(journal::State::RolledBack, "the source copy vanished");
            return MigrationError::AfterCommit(format!(
                "{cause}; and the source workload (pid {}) is no longer running",
                self.pid
            ));
        }
        self.journal_final(journal::State::RolledBack, &cause.to_string());
        MigrationError::RolledBack(cause)
    }

    fn journal_final(&mut self, state: journal::State, note: &str) {
        if self.record.updated == 0 {
            return; // Never written: nothing was frozen.
        }
        if let Err(e) = self.journal.set(&mut self.record, state, note) {
            tracing::error!("{e}");
        }
    }

    /// Puts shared storage back to its snapshot (once).
    fn rollback_storage(&mut self) {
        if std::mem::take(&mut self.snapshotted) {
            if let Err(e) = self.driver.storage_rollback() {
                tracing::error!("could not put the shared storage back to its snapshot: {e}");
            }
        }
    }
}

/// CRIU died while it held the frozen tree.
/// A tree that shares this host's network namespace and keeps no
/// established TCP connection (`--tcp-established` off) has nothing for
/// CRIU to lock, but CRIU's nftables lock still builds its table first:
/// about 0.35 s here, all of it inside the freeze. Skip it then.
fn skip_needless_network_lock(pid: i32, copts: &CriuOpts, o: &mut rpc::Opts) {
    let netns = |p: &str| {
        std::fs::metadata(format!("/proc/{p}/ns/net")).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
    };
    let shared = matches!((netns("self"), netns(&pid.to_string())), (Ok(a), Ok(b)) if a == b);
    if shared
        && !copts.tcp_established
        && o.network_lock == Some(rpc::NetworkLockMethod::Nftables as i32)
    {
        o.network_lock = Some(rpc::NetworkLockMethod::Skip as i32);
    }
}

fn stale_dump() -> HandOverError {
    HandOverError::Dump(
        "the source's CRIU exited while it held the frozen workload: the workload was released \
         and ran on from the dump, so the dump is stale"
            .into(),
    )
}

/// Iterations over the phaul protocol: the destination starts a page
/// server per pass and says when it listens.
struct ControlRemote<'c> {
    control: &'c mut Control,
    abort: &'c Abort,
    /// The pass is a lazy final dump (post-copy): no page server.
    lazy: bool,
}

impl Remote for ControlRemote<'_> {
    fn start_iter(&mut self, iter: u32, parent: Option<u32>) -> Result<(), String> {
        let e = |e: PeerError| match self.abort.reason() {
            Some(r) => r,
            None => e.to_string(),
        };
        self.control
            .send(&Msg::StartIter {
                iter,
                parent,
                lazy: self.lazy,
            })
            .map_err(e)?;
        match self.control.recv("IterReady") {
            Ok(Msg::IterReady { iter: i }) if i == iter => Ok(()),
            Ok(other) => Err(format!(
                "expected IterReady for pass {iter}, got {}",
                other.name()
            )),
            Err(err) => Err(e(err)),
        }
    }

    fn stop_iter(&mut self, _iter: u32) -> Result<(), String> {
        // The destination waits for the pass's page server to finish
        // before it starts the next one or restores.
        Ok(())
    }
}
