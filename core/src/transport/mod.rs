//! How two phauls reach each other: mutual TLS on every connection
//! (control, memory, files, status queries), or, with `--insecure`, plain
//! TCP on loopback between root-owned sockets only.
//!
//! The engine and CRIU keep working on plain sockets: after the TLS
//! handshake a relay thread ([`relay`]) carries the bytes between the TLS
//! connection and one end of a local socketpair, and the engine gets the
//! other end as its [`Conn`]. CRIU's page stream thus passes through phaul
//! (this kernel has no kernel TLS to keep it in the kernel, see
//! [`kernel_tls`]), through bounded buffers.
//!
//! - [`certs`]: the CA and host certificates (`phaul certs`);
//! - [`TlsFiles`], [`Identity`]: a host's CA, certificate and key;
//! - [`Remote`]: the source's way to a destination ([`Remote::dial`]);
//! - [`Acceptor`]: the destination's check of every accepted connection.

pub mod certs;
mod loopback;
mod relay;
#[cfg(test)]
mod tests;
mod tls;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::Conn;

pub use tls::{Identity, TlsClient, TlsServer};

/// What went wrong with certificates, keys or a TLS connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file would be overwritten.
    #[error("{0} exists already; remove it first to replace it")]
    Exists(PathBuf),
    /// A file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A private key others can read.
    #[error(
        "the private key {path} can be read by others (mode {mode:03o}); \
         `chmod 600 {path}` and make sure root owns it"
    )]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Generating a key or certificate failed.
    #[error("{0}")]
    Generate(String),
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Handshake(String),
    /// The handshake succeeded but the peer is not one this side accepts.
    #[error("{0}")]
    NotAllowed(String),
    /// The other side refused this one after the handshake.
    #[error("the destination refused this host: {0}")]
    Refused(String),
    /// `--insecure` outside loopback.
    #[error(
        "--insecure (plain TCP) only works on loopback addresses, not {0}: use TLS \
         (`phaul certs`, --tls-dir) between hosts"
    )]
    InsecureNotLoopback(SocketAddr),
    /// An `--insecure` peer whose socket is not root's.
    #[error("{0}")]
    NotRoot(String),
    /// Reading or writing the connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A host's TLS files: the CA certificate both sides trust, and this
/// host's certificate and private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA's certificate (`ca.pem`).
    pub ca: PathBuf,
    /// This host's certificate, signed by that CA (`cert.pem`).
    pub cert: PathBuf,
    /// This host's private key (`key.pem`, mode 0600).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `phaul certs issue --out DIR` writes into `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join(certs::CA_CERT),
            cert: dir.join(certs::CERT),
            key: dir.join(certs::KEY),
        }
    }
}

pub(crate) fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses a key file that group or others may read or write.
pub(crate) fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = m.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Whether this kernel can encrypt TLS in the kernel (kTLS), so that CRIU
/// could be handed an encrypted socket directly. Tested by attaching the
/// `tls` upper-layer protocol to a fresh TCP socket.
pub fn kernel_tls() -> bool {
    loopback::ulp_tls_available()
}

/// How a source talks to destinations.
#[derive(Clone)]
pub enum ClientSecurity {
    /// Mutual TLS; the destination's certificate must be valid for
    /// `server_name`.
    Tls {
        /// This host's identity.
        client: Arc<TlsClient>,
        /// The name (or IP address) the destination's certificate must
        /// carry.
        server_name: String,
    },
    /// Plain TCP (`--insecure`): loopback only.
    Insecure,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientSecurity::Tls { server_name, .. } => write!(f, "Tls({server_name})"),
            ClientSecurity::Insecure => f.write_str("Insecure"),
        }
    }
}

/// A destination service, as the source reaches it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Its address.
    pub addr: SocketAddr,
    /// How connections to it are secured.
    pub security: ClientSecurity,
}

impl Remote {
    /// A destination reached with mutual TLS; its certificate must be
    /// valid for `server_name`.
    pub fn tls(addr: SocketAddr, client: Arc<TlsClient>, server_name: &str) -> Self {
        Self {
            addr,
            security: ClientSecurity::Tls {
                client,
                server_name: server_name.to_string(),
            },
        }
    }

    /// A destination reached over plain TCP: refused unless `addr` is a
    /// loopback address.
    pub fn insecure(addr: SocketAddr) -> Result<Self, TlsError> {
        if !addr.ip().is_loopback() {
            return Err(TlsError::InsecureNotLoopback(addr));
        }
        Ok(Self {
            addr,
            security: ClientSecurity::Insecure,
        })
    }

    /// Whether connections are encrypted.
    pub fn encrypted(&self) -> bool {
        matches!(self.security, ClientSecurity::Tls { .. })
    }

    /// The name the destination's certificate must carry (None over
    /// `--insecure` TCP).
    pub fn server_name(&self) -> Option<&str> {
        match &self.security {
            ClientSecurity::Tls { server_name, .. } => Some(server_name),
            ClientSecurity::Insecure => None,
        }
    }

    /// Opens one connection: TCP within `timeout`, then (with TLS) the
    /// handshake and the destination's acceptance within the same bound.
    pub fn dial(&self, timeout: Duration) -> Result<Conn, DialError> {
        let deadline = Instant::now() + timeout;
        let tcp = TcpStream::connect_timeout(&self.addr, timeout).map_err(DialError::Connect)?;
        crate::conn::tune_tcp(&tcp);
        match &self.security {
            ClientSecurity::Insecure => Ok(Conn::from(tcp)),
            ClientSecurity::Tls {
                client,
                server_name,
            } => client
                .connect(tcp, server_name, deadline)
                .map_err(DialError::Tls),
        }
    }
}

/// Why a connection to a destination could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP did not connect.
    #[error(transparent)]
    Connect(std::io::Error),
    /// TLS failed, or the destination refused this host.
    #[error(transparent)]
    Tls(TlsError),
}

/// How a destination service checks the connections it accepts.
#[derive(Clone)]
pub enum Acceptor {
    /// Mutual TLS with peers whose certificates chain to the CA (and, if
    /// given, carry one of the allowed names).
    Tls(Arc<TlsServer>),
    /// Plain TCP (`--insecure`): loopback only, and only from sockets
    /// that belong to root.
    Insecure,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Acceptor::Tls(_) => f.write_str("Tls"),
            Acceptor::Insecure => f.write_str("Insecure"),
        }
    }
}

impl Acceptor {
    /// Whether the service may listen on `addr` with this acceptor.
    pub fn check_listen(&self, addr: SocketAddr) -> Result<(), TlsError> {
        match self {
            Acceptor::Insecure if !addr.ip().is_loopback() => {
                Err(TlsError::InsecureNotLoopback(addr))
            }
            _ => Ok(()),
        }
    }

    /// Checks an accepted connection: the TLS handshake and the peer's
    /// name, or (insecure) that the other end is a root-owned loopback
    /// socket. Bounded by `deadline`. Returns the connection the engine
    /// uses and the peer's name for the logs.
    pub fn accept(&self, tcp: TcpStream, deadline: Instant) -> Result<(Conn, String), TlsError> {
        crate::conn::tune_tcp(&tcp);
        match self {
            Acceptor::Tls(server) => server.accept(tcp, deadline),
            Acceptor::Insecure => {
                let peer = tcp.peer_addr()?;
                let local = tcp.local_addr()?;
                match loopback::owner(peer, local) {
                    Some(0) => Ok((Conn::from(tcp), format!("root@{peer}"))),
                    Some(uid) => Err(TlsError::NotRoot(format!(
                        "refused a plain-TCP connection from {peer}: its socket belongs to uid \
                         {uid}, not root (--insecure accepts root's connections only)"
                    ))),
                    None => Err(TlsError::NotRoot(format!(
                        "refused a plain-TCP connection from {peer}: its owner cannot be found \
                         (--insecure accepts root's loopback connections only)"
                    ))),
                }
            }
        }
    }
}
