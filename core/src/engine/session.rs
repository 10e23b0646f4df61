//! What both modes of a migration share, on both sides: the control
//! channel, the source's connections and handshake, the source driver's
//! preparation, sending files, and asking the destination what became of
//! a session (after a broken commit, and in `phaul recover`). Live mode
//! ([`super::source`]) and restart mode ([`super::restart`]) build on this
//! module and never on each other.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_plugin_api::{Capabilities, FsSyncKind, Side};

use super::abort::Abort;
use super::error::{HandOverError, PeerError, PreflightError};
use super::source::SourceOptions;
use super::Connector;
use crate::conn::Conn;
use crate::criu::{rpc, Launcher};
use crate::plugins::{Driver, EngineHost};
use crate::proto::{
    FrameError, FrameReader, FrameWriter, Hello, MigrationMode, Msg, Outcome, Refusal, Welcome,
};
use crate::transport::{DialError, Remote};
use crate::workdir::WorkDir;
use crate::{proc, ABI_VERSION, PHAUL_VERSION};

/// Size of the chunks image files travel in.
const CHUNK: usize = 1 << 20;

/// A session's control channel: length-prefixed frames in both directions,
/// every wait bounded by the deadline in force.
pub struct Control {
    reader: FrameReader<Conn>,
    writer: FrameWriter<Conn>,
    peer: &'static str,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("peer", &self.peer).finish()
    }
}

impl Control {
    /// The destination's end of a control connection whose preamble has
    /// been read (its peer is the source).
    pub fn new(conn: Conn) -> std::io::Result<Self> {
        Self::with_peer(conn, "source")
    }

    /// A control connection to `peer` (`source` or `destination`, for
    /// messages).
    pub fn with_peer(conn: Conn, peer: &'static str) -> std::io::Result<Self> {
        Ok(Self {
            reader: FrameReader::new(conn.try_clone()?),
            writer: FrameWriter::new(conn),
            peer,
        })
    }

    /// Reads the next frame as it is.
    pub fn read(&mut self) -> Result<Msg, FrameError> {
        self.reader.read()
    }

    /// Sends a frame as it is.
    pub fn write(&mut self, m: &Msg) -> Result<(), FrameError> {
        self.writer.write(m)
    }

    /// Sends `m`.
    pub fn send(&mut self, m: &Msg) -> Result<(), PeerError> {
        self.writer.write(m).map_err(|source| PeerError::Send {
            what: m.name(),
            peer: self.peer,
            source,
        })
    }

    /// The next message, `waiting_for` naming it for errors; an `Abort`
    /// from the peer is an error.
    pub fn recv(&mut self, waiting_for: &'static str) -> Result<Msg, PeerError> {
        match self.reader.read::<Msg>() {
            Ok(Msg::Abort {
                reason,
                criu_log,
                hint,
            }) => Err(PeerError::Aborted {
                peer: self.peer,
                reason,
                criu_log,
                hint,
            }),
            Ok(m) => Ok(m),
            Err(source) => Err(PeerError::Recv {
                waiting_for,
                peer: self.peer,
                source,
            }),
        }
    }

    /// Bounds every later read and write by `deadline` (None: no bound).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        if let Err(e) = self.conn().set_deadline(deadline) {
            tracing::warn!("cannot set a deadline on the control connection: {e}");
        }
    }

    /// The connection.
    pub fn conn(&self) -> &Conn {
        self.writer.get_ref()
    }

    /// Tells the peer the migration is abandoned (best effort: it may be
    /// gone).
    pub fn abort(&mut self, reason: &str) {
        self.abort_with(reason, None, None)
    }

    /// Like [`Control::abort`], naming this side's CRIU log and hint.
    pub fn abort_with(
        &mut self,
        reason: &str,
        criu_log: Option<&std::path::Path>,
        hint: Option<String>,
    ) {
        let _ = self.writer.write(&Msg::Abort {
            reason: reason.to_string(),
            criu_log: criu_log.map(|p| p.display().to_string()),
            hint,
        });
    }
}

/// Fails with `expected` if `m` is not the message the protocol expects.
pub(crate) fn unexpected(m: &Msg, expected: &'static str, peer: &'static str) -> PeerError {
    PeerError::Unexpected {
        expected,
        got: m.name(),
        peer,
    }
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
) -> Result<Conns, PeerError> {
    let dial = |what: &'static str| -> Result<Conn, PeerError> {
        let Connector::Tcp(remote) = connector else {
            unreachable!("given connections are not dialled")
        };
        let addr = remote.addr.to_string();
        remote
            .dial(Duration::from_secs(10))
            .map_err(|e| match (e, what) {
                (DialError::Tls(source), _) => PeerError::Tls { addr, source },
                (DialError::Connect(source), "control") => PeerError::Connect { addr, source },
                (DialError::Connect(source), _) => PeerError::Channel { what, addr, source },
            })
    };
    let given = |c: Option<&Conn>, what: &'static str| -> Result<Conn, PeerError> {
        c.ok_or(PeerError::Missing(what))?
            .try_clone()
            .map_err(|source| PeerError::Io {
                what: format!("the {what} connection"),
                source,
            })
    };
    let (control, mem, fs) = match connector {
        Connector::Tcp(_) => (
            dial("control")?,
            mem.then(|| dial("memory")).transpose()?,
            fs.then(|| dial("file")).transpose()?,
        ),
        Connector::Given {
            control,
            mem: m,
            fs: f,
        } => (
            given(Some(control), "control")?,
            mem.then(|| given(Some(m), "memory")).transpose()?,
            fs.then(|| given(f.as_ref(), "file")).transpose()?,
        ),
    };
    let send_err = |what: &'static str| {
        move |source| PeerError::Send {
            what,
            peer: "destination",
            source,
        }
    };
    for c in std::iter::once(&control).chain(mem.iter()).chain(fs.iter()) {
        c.set_nodelay();
        crate::proto::write_preamble(&mut &*c).map_err(send_err("the preamble"))?;
    }
    if let Some(m) = &mem {
        FrameWriter::new(m)
            .write(&Msg::AttachMemory { session })
            .map_err(send_err("AttachMemory"))?;
    }
    if let Some(f) = &fs {
        FrameWriter::new(f)
            .write(&Msg::AttachFs { session })
            .map_err(send_err("AttachFs"))?;
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
        pids: Vec::new(),
        bound: Vec::new(),
        dry_run: false,
        post_copy: false,
        source_facts: Vec::new(),
    }
}

/// Most pairs a driver's `describe` may send.
pub(crate) const MAX_FACTS: usize = 256;
/// Most bytes (keys and values) a driver's `describe` may send.
pub(crate) const MAX_FACT_BYTES: usize = 1 << 20;

/// The limits of a driver's description (both sides check them).
pub(crate) fn check_facts(facts: &[(String, String)]) -> Result<(), String> {
    let bytes: usize = facts.iter().map(|(k, v)| k.len() + v.len()).sum();
    if facts.len() > MAX_FACTS || bytes > MAX_FACT_BYTES {
        return Err(format!(
            "{} pairs, {bytes} bytes: more than {MAX_FACTS} pairs or {MAX_FACT_BYTES} bytes",
            facts.len()
        ));
    }
    if let Some((k, _)) = facts.iter().find(|(k, _)| k.is_empty()) {
        return Err(format!("an empty key ({k:?})"));
    }
    Ok(())
}

/// Sends the handshake and reads the answer.
pub(crate) fn handshake(control: &mut Control, hello: Hello) -> Result<Welcome, PreflightError> {
    control.send(&Msg::Hello(Box::new(hello)))?;
    match control.recv("Welcome")? {
        Msg::Welcome(w) => {
            tracing::info!(
                destination_phaul = %w.phaul_version,
                destination_criu = %w.criu_version.map_or("none".to_string(), |v| v.to_string()),
                free_mib = w.free_bytes >> 20,
                "destination accepted the migration"
            );
            Ok(w)
        }
        Msg::Refused { kind, reason } => Err(PeerError::Refused {
            kind: refusal_name(kind),
            reason,
        }
        .into()),
        other => Err(unexpected(&other, "Welcome", "destination").into()),
    }
}

fn refusal_name(k: Refusal) -> &'static str {
    match k {
        Refusal::Version => "version mismatch",
        Refusal::Criu => "CRIU version",
        Refusal::Htype => "htype",
        Refusal::Cpu => "CPU",
        Refusal::Space => "disk space",
        Refusal::Busy => "busy",
        Refusal::InUse => "in use",
        Refusal::Driver => "driver",
        Refusal::Other => "error",
        Refusal::Policy => "policy",
    }
}

/// The source driver, initialised, with what the engine needs from it.
pub(crate) struct Prepared {
    pub driver: Driver,
    pub info: phaul_plugin_api::DriverInfo,
    pub pid: i32,
    pub fs: phaul_plugin_api::FsSyncSpec,
    /// The engine's CRIU options, taken out of the user's `-o` options.
    pub criu_defaults: super::CriuDefaults,
    /// The driver's `describe` answer, for the destination's driver.
    pub facts: Vec<(String, String)>,
}

/// Initialises the source driver and asks it about the workload.
pub(crate) fn prepare(
    mut driver: Driver,
    opts: &SourceOptions,
    work: &WorkDir,
    launcher: &Arc<dyn Launcher>,
    criu_version: &str,
) -> Result<Prepared, PreflightError> {
    let (criu_defaults, driver_options) =
        super::CriuDefaults::split(&opts.options).map_err(PreflightError::Check)?;
    let host = EngineHost::new(
        &opts.htype,
        &launcher.binary().display().to_string(),
        criu_version,
        feature_checker(launcher.clone(), work.criu()),
    );
    driver.init(super::init_context(
        Side::Source,
        opts.mode,
        &opts.id,
        &driver_options,
        &[],
        work,
        host,
    ))?;
    let info = driver.info()?;
    let needed = match opts.mode {
        MigrationMode::Live => (Capabilities::LIVE, "live"),
        MigrationMode::Restart => (Capabilities::RESTART, "restart"),
    };
    if !info.capabilities.contains(needed.0) {
        return Err(PreflightError::Check(format!(
            "the {} driver does not support {} mode",
            opts.htype, needed.1
        )));
    }
    let pid = driver.root_task_pid()?;
    if !proc::alive(pid) {
        return Err(PreflightError::Check(format!(
            "the workload's root task {pid} does not exist"
        )));
    }
    let fs = driver.fs_sync()?;
    if fs.kind == FsSyncKind::SharedStorage
        && !info.capabilities.contains(Capabilities::SHARED_STORAGE)
    {
        return Err(PreflightError::Check(format!(
            "the {} driver names shared storage but does not declare the shared-storage \
             capability (it cannot snapshot it for a rollback)",
            opts.htype
        )));
    }
    let facts = driver.describe()?;
    check_facts(&facts).map_err(|e| {
        PreflightError::Check(format!("the {} driver's description: {e}", opts.htype))
    })?;
    Ok(Prepared {
        driver,
        info,
        pid,
        fs,
        criu_defaults,
        facts,
    })
}

/// The roots the driver wants synced (empty unless it names paths).
pub(crate) fn fs_roots(fs: &phaul_plugin_api::FsSyncSpec) -> Vec<String> {
    match fs.kind {
        FsSyncKind::Paths => fs.paths.iter().map(|p| p.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// `criu_feature` for drivers: a short-lived worker per question.
fn feature_checker(launcher: Arc<dyn Launcher>, dir: PathBuf) -> crate::plugins::FeatureCheck {
    Arc::new(move |name: &str| {
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
        let mut w = launcher
            .spawn("feature", &dir, &[])
            .map_err(|e| e.to_string())?;
        let f = w.feature(q).map_err(|e| e.to_string())?;
        Ok(f.mem_track
            .or(f.lazy_pages)
            .or(f.pidfd_store)
            .unwrap_or(false))
    })
}

/// A random session id.
pub(crate) fn rand_session() -> u64 {
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

/// Sends one file (an image or a meta file) in chunks; returns its size.
pub(crate) fn send_file(control: &mut Control, path: &Path) -> Result<u64, HandOverError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| HandOverError::Io {
        what: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| HandOverError::Dump(format!("bad file name {}", path.display())))?
        .to_string();
    let mut f = std::fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    control.send(&Msg::File {
        name,
        mode: meta.permissions().mode() & 0o7777,
        size: meta.len(),
    })?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        control.send(&Msg::Chunk(buf[..n].to_vec()))?;
    }
    if sent != meta.len() {
        return Err(HandOverError::Dump(format!(
            "{} changed size while being sent",
            path.display()
        )));
    }
    Ok(sent)
}

/// File bytes sent by the sync passes.
pub(crate) fn fs_bytes(r: &Option<(Vec<crate::fsync::PassStats>, String)>) -> u64 {
    r.as_ref()
        .map_or(0, |(p, _)| p.iter().map(|s| s.bytes_sent).sum())
}

/// Asks the destination `remote` what became of `session`, once.
pub fn query(remote: &Remote, session: u64) -> Result<Outcome, String> {
    let c = remote
        .dial(Duration::from_secs(3))
        .map_err(|e| e.to_string())?;
    c.set_deadline(Some(Instant::now() + Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    crate::proto::write_preamble(&mut &c).map_err(|e| e.to_string())?;
    let mut control = Control::with_peer(c, "destination").map_err(|e| e.to_string())?;
    control
        .send(&Msg::Query { session })
        .map_err(|e| e.to_string())?;
    match control.recv("Status").map_err(|e| e.to_string())? {
        Msg::Status { outcome, .. } => Ok(outcome),
        other => Err(format!("unexpected {}", other.name())),
    }
}

/// What the destination says became of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its copy runs: the source copy must go.
    Runs,
    /// It discarded its copy (or never let it run): the source copy may
    /// resume.
    Discarded,
    /// It has no record of the session.
    Unknown,
    /// No answer before the deadline (unreachable, or still deciding).
    NoAnswer(String),
}

/// Asks the destination `remote` about `session` until it gives a final
/// answer, `timeout` passes, or `abort` gives up.
pub fn ask(remote: &Remote, session: u64, timeout: Duration, abort: Option<&Abort>) -> Verdict {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match query(remote, session) {
            Ok(Outcome::Resumed) => return Verdict::Runs,
            Ok(Outcome::RolledBack) => return Verdict::Discarded,
            Ok(Outcome::Unknown) => return Verdict::Unknown,
            Ok(Outcome::InProgress) => "the destination is still deciding".to_string(),
            Err(e) => format!("cannot ask {}: {e}", remote.addr),
        };
        if Instant::now() >= deadline || abort.is_some_and(Abort::giving_up) {
            return Verdict::NoAnswer(last);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
