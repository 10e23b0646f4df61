//! The destination service: accepts connections, routes each to a new
//! migration, to the memory channel of a running one, or to a status query,
//! and runs one migration at a time.
//!
//! Until the transport is authenticated, plain TCP is only offered on
//! loopback addresses: the service restores whatever it is sent, as root.

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

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without authentication.
    #[error(
        "refusing to listen on {0}: phaul serve restores whatever it is sent, as root, and this \
         version has no peer authentication; listen on a loopback address (127.0.0.1, ::1) or \
         tunnel the connection"
    )]
    NotLoopback(SocketAddr),
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

/// Whether the service may listen on `addr` (loopback only, until the
/// transport is authenticated).
pub fn check_listen_addr(addr: SocketAddr) -> Result<(), ServeError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ServeError::NotLoopback(addr))
    }
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
        recent.unwrap_or_else(|| recover::destination_outcome(&self.journal, session))
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
        // Forget memory connections nobody claimed for a minute.
        m.retain(|_, (t, _)| t.elapsed() < Duration::from_secs(60));
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
    registry: Arc<Registry>,
    opts: DestOptions,
    outcomes: Outcomes,
    pending: Arc<Pending>,
    busy: Arc<Mutex<Option<u64>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Server {
    /// Binds `addr` (loopback only).
    pub fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        opts: DestOptions,
    ) -> Result<Server, ServeError> {
        check_listen_addr(addr)?;
        let listener =
            TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        let journal = open_journal(&opts)?;
        Ok(Server {
            listener,
            registry,
            opts,
            outcomes: Outcomes::new(journal),
            pending: Arc::default(),
            busy: Arc::default(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Serves forever; `on_done` hears about every finished migration.
    pub fn run(&self, on_done: impl Fn(u64, &Result<DestSummary, String>) + Send + Sync + 'static) {
        let on_done = Arc::new(on_done);
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            };
            let peer = stream.peer_addr().ok();
            let conn = Conn::from(stream);
            conn.set_nodelay();
            let registry = self.registry.clone();
            let opts = self.opts.clone();
            let outcomes = self.outcomes.clone();
            let pending = self.pending.clone();
            let busy = self.busy.clone();
            let on_done = on_done.clone();
            std::thread::spawn(move || {
                if let Err(e) = route(
                    conn, &registry, &opts, &outcomes, &pending, &busy, &*on_done,
                ) {
                    tracing::warn!(?peer, "{e}");
                }
            });
        }
    }
}

fn route(
    conn: Conn,
    registry: &Registry,
    opts: &DestOptions,
    outcomes: &Outcomes,
    pending: &Pending,
    busy: &Mutex<Option<u64>>,
    on_done: &(dyn Fn(u64, &Result<DestSummary, String>) + Send + Sync),
) -> Result<(), String> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    read_preamble(&mut &conn).map_err(|e| e.to_string())?;
    let first: Msg = FrameReader::new(&conn).read().map_err(|e| e.to_string())?;
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
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
        Msg::Hello(hello) => {
            let session = hello.session;
            let mut control = Control::new(conn).map_err(|e| e.to_string())?;
            {
                let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(other) = *b {
                    let reason = format!(
                        "another migration (session {other:016x}) is in progress; this service runs one at a time"
                    );
                    let _ = control.write(&Msg::Refused {
                        kind: Refusal::Busy,
                        reason: reason.clone(),
                    });
                    return Err(format!("refused session {session:016x}: {reason}"));
                }
                *b = Some(session);
            }
            let _busy = BusyGuard(busy);
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
            tracing::info!(htype = %hello.htype, id = %hello.id, "migration starting");
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

struct BusyGuard<'a>(&'a Mutex<Option<u64>>);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
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
