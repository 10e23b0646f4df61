//! A fault-injecting TCP proxy between `phaul migrate` and `phaul serve`:
//! it forwards both connections of a migration and, at a chosen moment,
//! kills the destination or cuts the connections. Control frames are decoded
//! with phaul's own frame reader, so faults hit exact protocol points.
//! A test can also cut every connection on demand ([`Proxy::cut`]) and let
//! later connections through untouched ([`Proxy::heal`]), as a network that
//! failed and came back. It ends TLS on both sides with the test PKI's
//! certificates ([`crate::pki`]), as a network element holding both
//! hosts' keys would: the frames in between are plain.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use phaul_core::conn::Conn;
use phaul_core::proto::{FrameReader, FrameWriter, Msg};
use phaul_core::transport::{Acceptor, Identity, Remote, TlsClient, TlsFiles, TlsServer};

/// What to break, and when.
#[derive(Debug, Clone)]
pub enum Fault {
    /// No fault: forward everything (a test breaks things itself, e.g.
    /// with [`Proxy::cut`]).
    Forward,
    /// Kill `pid` (SIGKILL) and cut everything once this many page bytes
    /// went from the source to the destination.
    KillAfterMemoryBytes {
        /// Bytes of memory traffic before the fault.
        bytes: u64,
        /// The process to kill (the destination service).
        pid: i32,
    },
    /// Cut every connection instead of forwarding the first control frame
    /// with this name (e.g. `File`: right after the final dump).
    CutBefore(&'static str),
    /// Forward the first control frame with this name, then cut everything.
    CutAfter(&'static str),
    /// Stop forwarding (but keep the connections open) at the first control
    /// frame with this name.
    StallAt(&'static str),
    /// Send a frame of garbage instead of the first control frame with this
    /// name, then keep forwarding.
    GarbleAt(&'static str),
    /// Stop forwarding the memory connection from the source (but keep it
    /// open) once this many bytes went through: a network that stalls in
    /// the middle of a transfer.
    StallMemoryAfter(u64),
}

struct State {
    fault: Fault,
    triggered: AtomicBool,
    /// No more faults: new connections and frames pass untouched.
    healed: AtomicBool,
    /// The proxy was dropped: stop accepting.
    closed: AtomicBool,
    mem_bytes: AtomicU64,
    sockets: Mutex<Vec<Conn>>,
    /// How it is reached, and how it reaches the destination.
    acceptor: Acceptor,
    remote: Remote,
}

impl State {
    fn cut(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        for s in self.sockets.lock().unwrap().iter() {
            s.shutdown();
        }
    }
}

/// The test PKI's identity in `dir`.
fn identity(dir: &std::path::Path) -> Identity {
    Identity::load(&TlsFiles::in_dir(dir)).expect("test TLS identity")
}

/// A running proxy.
pub struct Proxy {
    /// Where the source should connect.
    pub addr: String,
    state: Arc<State>,
}

impl Proxy {
    /// Proxies to `target` with `fault`. The proxy ends TLS on both sides:
    /// the source sees the destination's certificate, the destination the
    /// source's (so it can act on the protocol's frames in between).
    pub fn start(target: &str, fault: Fault) -> Proxy {
        let pki = crate::pki::pki();
        let acceptor = Acceptor::Tls(Arc::new(
            TlsServer::new(&identity(&pki.dst), Vec::new()).expect("proxy TLS server"),
        ));
        let client = Arc::new(TlsClient::new(&identity(&pki.src)).expect("proxy TLS client"));
        let remote = Remote::tls(target.parse().expect("target address"), client, "dst");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            fault,
            triggered: AtomicBool::new(false),
            healed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            mem_bytes: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
            acceptor,
            remote,
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if st.closed.load(Ordering::SeqCst) {
                    return;
                }
                let st = st.clone();
                std::thread::spawn(move || connect(client, st));
            }
        });
        Proxy { addr, state }
    }

    /// Whether the fault happened.
    pub fn triggered(&self) -> bool {
        self.state.triggered.load(Ordering::SeqCst)
    }

    /// Cuts every connection proxied so far (both directions shut down),
    /// so stalled peers see them drop. Marks the fault as triggered.
    pub fn cut(&self) {
        self.state.cut();
    }

    /// From now on the fault is over: connections made after this are
    /// forwarded untouched (e.g. a source asking the destination what
    /// became of a session). Connections cut before stay cut.
    pub fn heal(&self) {
        self.state.healed.store(true, Ordering::SeqCst);
    }

    /// [`Proxy::cut`], then [`Proxy::heal`]: the network failed and came
    /// back.
    pub fn cut_and_heal(&self) {
        self.cut();
        self.heal();
    }
}

impl Drop for Proxy {
    /// Closes every proxied connection, as if the network came back and
    /// the peers saw each other's closes.
    fn drop(&mut self) {
        self.state.cut();
        // Wake the accept loop so that it sees `closed` and lets the port go.
        self.state.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Ends TLS for a new connection and opens one to the destination.
fn connect(client: TcpStream, st: Arc<State>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let Ok((client, _)) = st.acceptor.accept(client, deadline) else {
        return;
    };
    let Ok(server) = st.remote.dial(std::time::Duration::from_secs(10)) else {
        return;
    };
    {
        let mut socks = st.sockets.lock().unwrap();
        socks.push(client.try_clone().unwrap());
        socks.push(server.try_clone().unwrap());
    }
    // After a cut the "network" works again for new connections; a stall
    // keeps holding everything.
    if st.triggered.load(Ordering::SeqCst)
        && matches!(st.fault, Fault::StallAt(_))
        && !st.healed.load(Ordering::SeqCst)
    {
        st.cut();
    }
    handle(client, server, st);
}

/// A connection the proxy cannot forward any more (its peer went away) is
/// closed for the other peer too, as the network would show it; the copies
/// kept for [`Proxy::cut`] would otherwise hold it open, and a writer
/// blocked on it would wait forever.
fn close_both(a: &Conn, b: &Conn) {
    a.shutdown();
    b.shutdown();
}

fn handle(mut client: Conn, mut server: Conn, st: Arc<State>) {
    let mut preamble = [0u8; 8];
    if client.read_exact(&mut preamble).is_err() || server.write_all(&preamble).is_err() {
        close_both(&client, &server);
        return;
    }
    let mut reader = FrameReader::new(client.try_clone().unwrap());
    let Ok(first) = reader.read::<Msg>() else {
        close_both(&client, &server);
        return;
    };
    if FrameWriter::new(&mut server).write(&first).is_err() {
        close_both(&client, &server);
        return;
    }
    let mut back_preamble_client = client.try_clone().unwrap();
    let back_server = server.try_clone().unwrap();
    if let Msg::AttachMemory { .. } | Msg::AttachFs { .. } | Msg::ResumePages { .. } = first {
        // Memory (and the file sync's own protocol, and a resumed
        // post-copy transfer's page protocol): raw bytes, counted (the
        // memory only), in both directions.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut &back_server, &mut back_preamble_client);
            back_preamble_client.shutdown_write();
        });
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => {
                    server.shutdown_write();
                    return;
                }
                Ok(n) => n,
            };
            let counted = if matches!(first, Msg::AttachMemory { .. }) {
                n as u64
            } else {
                0
            };
            let total = st.mem_bytes.fetch_add(counted, Ordering::SeqCst) + counted;
            if let Fault::KillAfterMemoryBytes { bytes, pid } = st.fault {
                if total >= bytes && !st.triggered.load(Ordering::SeqCst) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    st.cut();
                    return;
                }
            }
            if let Fault::StallMemoryAfter(bytes) = st.fault {
                if total >= bytes && !st.healed.load(Ordering::SeqCst) {
                    st.triggered.store(true, Ordering::SeqCst);
                    // Nobody forwards any more; the copies in `sockets`
                    // keep both connections open.
                    return;
                }
            }
            if server.write_all(&buf[..n]).is_err() {
                close_both(&client, &server);
                return;
            }
        }
    }
    // Control: frame by frame in both directions.
    let st2 = st.clone();
    let back_client = client.try_clone().unwrap();
    std::thread::spawn(move || pump_frames(back_server, back_client, &st2));
    let first_name = first.name();
    if !check(&st, first_name, &mut server, None) {
        return;
    }
    pump_frames_from(reader, server, &st);
}

/// Applies the fault for a frame named `name`; `false` means stop.
fn check(st: &State, name: &str, to: &mut Conn, msg: Option<&Msg>) -> bool {
    if st.healed.load(Ordering::SeqCst) {
        return true;
    }
    if st.triggered.load(Ordering::SeqCst) {
        return !matches!(st.fault, Fault::StallAt(_));
    }
    match st.fault {
        Fault::CutBefore(n) if n == name => {
            st.cut();
            false
        }
        Fault::CutAfter(n) if n == name => {
            if let Some(m) = msg {
                let _ = FrameWriter::new(&mut *to).write(m);
            }
            st.cut();
            false
        }
        Fault::StallAt(n) if n == name => {
            st.triggered.store(true, Ordering::SeqCst);
            false
        }
        Fault::GarbleAt(n) if n == name => {
            st.triggered.store(true, Ordering::SeqCst);
            // A frame whose message tag names no message at all.
            let mut junk = 64u32.to_le_bytes().to_vec();
            junk.push(0x7f);
            junk.extend([0xffu8; 63]);
            let _ = to.write_all(&junk);
            // Keep the connection: the receiver must notice by itself.
            true
        }
        _ => true,
    }
}

fn pump_frames(from: Conn, to: Conn, st: &State) {
    pump_frames_from(FrameReader::new(from), to, st)
}

fn pump_frames_from(mut reader: FrameReader<Conn>, mut to: Conn, st: &State) {
    loop {
        let Ok(msg) = reader.read::<Msg>() else {
            to.shutdown_write();
            return;
        };
        if !check(st, msg.name(), &mut to, Some(&msg)) {
            return;
        }
        if FrameWriter::new(&mut to).write(&msg).is_err() {
            close_both(reader.get_ref(), &to);
            return;
        }
    }
}
