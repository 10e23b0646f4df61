//! The destination service: accepts connections, authenticates each
//! ([`Acceptor`]: mutual TLS, or root-only loopback TCP with
//! `--insecure`), routes it to a new migration, to the memory or file
//! channel of a running one, or to a status query, and runs at most
//! `max_concurrent` migrations at once.
//!
//! It survives its clients: the handshake (TLS, preamble, first frame) has
//! one deadline, connections still in their handshake are bounded (the
//! oldest is closed to make room for a new one), accept errors back off
//! instead of spinning, and a refusal says nothing about other sessions.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::engine::dest::{serve_session, Control, DestOptions, DestSummary};
use crate::engine::recover;
use crate::journal::{Journal, JournalError};
use crate::plugins::Registry;
use crate::proto::{read_preamble, FrameReader, MigrationMode, Msg, Outcome, Refusal};
use crate::transport::{Acceptor, TlsError};

/// How long a new connection has for its whole handshake: TLS, the
/// preamble and its first message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in their handshake at once; beyond it the one that has
/// waited longest is closed to make room (a legitimate handshake takes
/// milliseconds, so idle or trickling clients are the ones that go).
pub const MAX_HANDSHAKING: usize = 128;
/// Memory and file connections waiting for their control connection.
const MAX_PENDING: usize = 64;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An address the acceptor may not listen on (`--insecure` off
    /// loopback).
    #[error("refusing to listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: TlsError,
    },
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Outcomes of sessions, for sources that lost their connection: the ones
/// this service ran, from memory; older ones (a service that was
/// restarted), from the journal, settled first if their phaul is gone.
#[derive(Debug, Clone)]
pub struct Outcomes {
    recent: Arc<Mutex<HashMap<u64, Outcome>>>,
    journal: Journal,
}

impl Outcomes {
    /// Outcomes backed by `journal`.
    pub fn new(journal: Journal) -> Self {
        Self {
            recent: Arc::default(),
            journal,
        }
    }

    /// Records a session's outcome.
    pub fn set(&self, session: u64, o: Outcome) {
        let mut m = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 1024 {
            m.clear();
        }
        m.insert(session, o);
    }

    /// A session's outcome.
    pub fn get(&self, session: u64) -> Outcome {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session)
            .copied();
        match recent {
            // A session under way may be further than its start: a
            // post-copy copy runs here while its memory still arrives.
            Some(Outcome::InProgress) => {
                match recover::destination_outcome(&self.journal, session) {
                    Outcome::Resumed => Outcome::Resumed,
                    _ => Outcome::InProgress,
                }
            }
            Some(o) => o,
            None => recover::destination_outcome(&self.journal, session),
        }
    }
}

/// Memory connections waiting for their session's control connection
/// (the two arrive in either order).
#[derive(Debug, Default)]
struct Pending {
    conns: Mutex<HashMap<(u64, Channel), (Instant, Conn)>>,
    arrived: Condvar,
}

/// The extra connections of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Channel {
    Memory,
    Files,
}

impl Pending {
    fn put(&self, session: (u64, Channel), conn: Conn) {
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Forget memory connections nobody claimed for a minute, and the
        // oldest beyond the bound.
        m.retain(|_, (t, _)| t.elapsed() < Duration::from_secs(60));
        while m.len() >= MAX_PENDING {
            let oldest = m.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| *k);
            match oldest {
                Some(k) => drop(m.remove(&k)),
                None => break,
            }
        }
        m.insert(session, (Instant::now(), conn));
        self.arrived.notify_all();
    }

    fn take(&self, session: (u64, Channel), timeout: Duration) -> Option<Conn> {
        let deadline = Instant::now() + timeout;
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((_, c)) = m.remove(&session) {
                return Some(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            m = self
                .arrived
                .wait_timeout(m, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A listening destination service.
pub struct Server {
    listener: TcpListener,
    ctx: Ctx,
    handshaking: Arc<Handshakes>,
}

/// Connections in their handshake, oldest first.
#[derive(Debug, Default)]
struct Handshakes {
    conns: Mutex<std::collections::VecDeque<(u64, std::net::TcpStream)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Handshakes {
    /// Counts `s` in until the guard drops, closing the oldest connection
    /// in its handshake if there are too many.
    fn admit(self: &Arc<Self>, s: &std::net::TcpStream) -> Option<Guard> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let clone = s.try_clone().ok()?;
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        while c.len() >= MAX_HANDSHAKING {
            if let Some((_, old)) = c.pop_front() {
                tracing::debug!(
                    peer = ?old.peer_addr().ok(),
                    "closed the connection that waited longest in its handshake"
                );
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
        }
        c.push_back((id, clone));
        Some(Guard {
            handshakes: self.clone(),
            id,
        })
    }
}

/// The migrations running at once, up to a bound.
#[derive(Debug)]
struct Slots {
    running: Mutex<Vec<u64>>,
    max: usize,
}

impl Slots {
    /// Takes a slot for `session`; None when all are taken.
    fn take(self: &Arc<Self>, session: u64) -> Option<Slot> {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= self.max || r.contains(&session) {
            return None;
        }
        r.push(session);
        Some(Slot {
            slots: self.clone(),
            session,
        })
    }
}

struct Slot {
    slots: Arc<Slots>,
    session: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut r = self.slots.running.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|s| *s != self.session);
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Server {
    /// Binds `addr`; every connection is checked by `acceptor`, and at most
    /// `max_concurrent` migrations run at once.
    pub fn bind(
        addr: SocketAddr,
        acceptor: Acceptor,
        max_concurrent: usize,
        registry: Arc<Registry>,
        opts: DestOptions,
    ) -> Result<Server, ServeError> {
        acceptor
            .check_listen(addr)
            .map_err(|source| ServeError::Listen { addr, source })?;
        let listener =
            TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        let journal = open_journal(&opts)?;
        Ok(Server {
            listener,
            ctx: Ctx {
                acceptor,
                registry,
                opts,
                outcomes: Outcomes::new(journal),
                pending: Arc::default(),
                slots: Arc::new(Slots {
                    running: Mutex::default(),
                    max: max_concurrent.max(1),
                }),
            },
            handshaking: Arc::default(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Serves forever; `on_done` hears about every finished migration.
    pub fn run(&self, on_done: impl Fn(u64, &Result<DestSummary, String>) + Send + Sync + 'static) {
        let on_done = Arc::new(on_done);
        let mut backoff = Duration::from_millis(5);
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => {
                    backoff = Duration::from_millis(5);
                    s
                }
                Err(e) => {
                    // Out of descriptors or memory: wait for some to be
                    // freed rather than spin.
                    tracing::warn!("accept: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let peer = stream.peer_addr().ok();
            let Some(handshaking) = self.handshaking.admit(&stream) else {
                continue;
            };
            let ctx = self.ctx.clone();
            let on_done = on_done.clone();
            let spawned = std::thread::Builder::new()
                .name("phaul-conn".into())
                .spawn(move || {
                    if let Err(e) = route(stream, &ctx, handshaking, &*on_done) {
                        tracing::warn!(?peer, "{e}");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(?peer, "cannot start a thread for a connection: {e}");
            }
        }
    }
}

/// Counts a connection in its handshake until dropped.
struct Guard {
    handshakes: Arc<Handshakes>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut c = self
            .handshakes
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.retain(|(id, _)| *id != self.id);
    }
}

/// What a connection's thread needs.
#[derive(Clone)]
struct Ctx {
    acceptor: Acceptor,
    registry: Arc<Registry>,
    opts: DestOptions,
    outcomes: Outcomes,
    pending: Arc<Pending>,
    slots: Arc<Slots>,
}

fn route(
    stream: std::net::TcpStream,
    ctx: &Ctx,
    handshaking: Guard,
    on_done: &(dyn Fn(u64, &Result<DestSummary, String>) + Send + Sync),
) -> Result<(), String> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (conn, who) = ctx
        .acceptor
        .accept(stream, deadline)
        .map_err(|e| e.to_string())?;
    conn.set_deadline(Some(deadline))
        .map_err(|e| e.to_string())?;
    read_preamble(&mut &conn).map_err(|e| format!("{who}: {e}"))?;
    let first: Msg = FrameReader::new(&conn)
        .read()
        .map_err(|e| format!("{who}: {e}"))?;
    conn.set_deadline(None).map_err(|e| e.to_string())?;
    drop(handshaking);
    let Ctx {
        registry,
        opts,
        outcomes,
        pending,
        slots,
        ..
    } = ctx;
    match first {
        Msg::AttachMemory { session } => {
            pending.put((session, Channel::Memory), conn);
            Ok(())
        }
        Msg::AttachFs { session } => {
            pending.put((session, Channel::Files), conn);
            Ok(())
        }
        Msg::Query { session } => {
            let mut control = Control::new(conn).map_err(|e| e.to_string())?;
            control
                .write(&Msg::Status {
                    session,
                    outcome: outcomes.get(session),
                })
                .map_err(|e| e.to_string())
        }
        Msg::ResumePages { session } => {
            let span = tracing::info_span!("serve", session = %format!("{session:016x}"));
            let _g = span.enter();
            tracing::info!(peer = %who, "the source asks to resume a post-copy transfer");
            let control = Control::new(conn).map_err(|e| e.to_string())?;
            let r = crate::postcopy::resume::destination(
                &opts.journal_dir,
                session,
                control,
                opts.post_copy_stall,
            );
            match &r {
                Ok(said) => {
                    outcomes.set(session, Outcome::Resumed);
                    tracing::info!("{said}");
                }
                Err(e) => tracing::warn!("{e}"),
            }
            r.map(drop)
        }
        Msg::Hello(hello) => {
            let session = hello.session;
            let mut control = Control::new(conn).map_err(|e| e.to_string())?;
            let Some(_slot) = slots.take(session) else {
                let reason = format!(
                    "this service is running as many migrations as it allows ({}); try again \
                     when one has finished",
                    slots.max
                );
                let _ = control.write(&Msg::Refused {
                    kind: Refusal::Busy,
                    reason: reason.clone(),
                });
                return Err(format!(
                    "refused session {session:016x} from {who}: {reason}"
                ));
            };
            let wait = |ch: Channel, what: &str| -> Result<Conn, String> {
                pending
                    .take((session, ch), Duration::from_secs(30))
                    .ok_or_else(|| format!("the {what} connection did not arrive within 30 s"))
            };
            let extra = (|| -> Result<(Option<Conn>, Option<Conn>), String> {
                let mem = match hello.mode {
                    MigrationMode::Live => Some(wait(Channel::Memory, "memory")?),
                    MigrationMode::Restart => None,
                };
                let fs = match hello.fs_roots.is_empty() {
                    true => None,
                    false => Some(wait(Channel::Files, "file")?),
                };
                Ok((mem, fs))
            })();
            let (mem, fs) = extra.inspect_err(|reason| {
                let _ = control.write(&Msg::Refused {
                    kind: Refusal::Other,
                    reason: reason.clone(),
                });
            })?;
            let span = tracing::info_span!("serve", session = %format!("{session:016x}"));
            let _g = span.enter();
            tracing::info!(htype = %hello.htype, id = %hello.id, peer = %who, "migration starting");
            let r = serve_session(registry, opts, &hello, control, mem, fs, &|o| {
                outcomes.set(session, o)
            });
            if hello.dry_run {
                match &r {
                    Err(e) => tracing::info!("dry run from the source: {e}"),
                    Ok(_) => tracing::warn!("a dry run migrated something"),
                }
                return Ok(());
            }
            on_done(session, &r);
            r.map(drop)
        }
        other => Err(format!("unexpected first message {}", other.name())),
    }
}

/// Opens the journal and settles the sessions a previous service left
/// unfinished (their copies held, or committed and running).
pub fn open_journal(opts: &DestOptions) -> Result<Journal, JournalError> {
    let journal = Journal::open(&opts.journal_dir)?;
    let (records, _) = journal.all()?;
    for mut rec in records.into_iter().filter(|r| {
        r.side == crate::journal::Side::Destination
            && !r.state.is_final()
            && !recover::owner_alive(r)
    }) {
        match recover::reconcile_destination(&journal, &mut rec) {
            Ok(a) => {
                tracing::info!(session = %a.session, "settled an unfinished migration: {}", a.message)
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(journal)
}

/// Embedded mode (`phaul serve --fd-rpc N --fd-mem N`): one migration over
/// connections the caller already has.
pub fn serve_connections(
    registry: &Registry,
    opts: &DestOptions,
    control: Conn,
    mem: Option<Conn>,
    fs: Option<Conn>,
) -> Result<DestSummary, String> {
    read_preamble(&mut &control).map_err(|e| e.to_string())?;
    let extra = mem
        .iter()
        .map(|c| (c, "AttachMemory"))
        .chain(fs.iter().map(|c| (c, "AttachFs")));
    for (c, want) in extra {
        read_preamble(&mut &*c).map_err(|e| e.to_string())?;
        let m = FrameReader::new(c)
            .read::<Msg>()
            .map_err(|e| e.to_string())?;
        if m.name() != want {
            return Err(format!(
                "expected {want} first on its connection, got {}",
                m.name()
            ));
        }
    }
    let mut control = Control::new(control).map_err(|e| e.to_string())?;
    let hello = match control.read().map_err(|e| e.to_string())? {
        Msg::Hello(h) => h,
        other => return Err(format!("expected Hello, got {}", other.name())),
    };
    serve_session(registry, opts, &hello, control, mem, fs, &|_| {})
}
