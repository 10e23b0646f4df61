//! rustls configurations for phaul's mutual TLS (TLS 1.3 only, ring's
//! primitives), the handshake on a blocking TCP socket under a deadline,
//! and the destination's acceptance line: once the handshake is done the
//! destination writes `ok` or `no REASON` inside TLS, so a source that
//! is refused learns why before it sends anything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{check_key_mode, relay, TlsError, TlsFiles};
use crate::conn::Conn;

/// The longest acceptance line.
const MAX_LINE: usize = 512;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: rustls::Error) -> TlsError {
    TlsError::Handshake(format!("TLS configuration: {e}"))
}

/// A host's identity: the CA it trusts, its certificate and its key.
#[derive(Debug)]
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The names this host's certificate carries.
    pub names: Vec<String>,
}

fn certs_in(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |what: String| TlsError::Bad {
        path: path.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| match e {
            rustls_pki_types::pem::Error::Io(source) => TlsError::Read {
                path: path.to_path_buf(),
                source,
            },
            e => bad(e.to_string()),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The DNS names and IP addresses of a certificate (its common name if
/// it has none).
pub(crate) fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("4")).to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).expect("16")).to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
        {
            names.push(cn.to_string());
        }
    }
    names
}

impl Identity {
    /// Reads and checks `files`: the key must not be readable by others.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certs_in(&files.ca)? {
            roots.add(c).map_err(|e| TlsError::Bad {
                path: files.ca.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let chain = certs_in(&files.cert)?;
        check_key_mode(&files.key)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Bad {
            path: files.key.clone(),
            what: format!("no usable private key: {e}"),
        })?;
        let names = cert_names(&chain[0]);
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key,
            names,
        })
    }
}

/// A source's TLS configuration.
#[derive(Debug)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl TlsClient {
    /// Presents `id`'s certificate, trusts `id`'s CA.
    pub fn new(id: &Identity) -> Result<Self, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(id.roots.clone())
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(config_err)?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Secures a connected socket: the handshake (the destination's
    /// certificate must be valid for `server_name`), then the
    /// destination's acceptance, all by `deadline`.
    pub(super) fn connect(
        &self,
        mut tcp: TcpStream,
        server_name: &str,
        deadline: Instant,
    ) -> Result<Conn, TlsError> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
            TlsError::Handshake(format!(
                "{server_name:?} is not a host name or an IP address (--peer-name)"
            ))
        })?;
        let mut tls =
            Connection::from(ClientConnection::new(self.config.clone(), name).map_err(config_err)?);
        handshake(&mut tls, &mut tcp, deadline)
            .map_err(|e| TlsError::Handshake(explain(e, server_name)))?;
        let line = read_line(&mut tls, &mut tcp, deadline).map_err(|e| {
            let s = e.to_string();
            match s.contains("alert") {
                true => TlsError::Refused(format!(
                    "it rejected this host's certificate ({s}); is it signed by the CA the \
                     destination trusts?"
                )),
                false => TlsError::Handshake(format!("waiting for the destination's answer: {s}")),
            }
        })?;
        match line.strip_prefix("ok") {
            Some("") => relay::spawn(tls, tcp).map_err(TlsError::Io),
            _ => Err(TlsError::Refused(
                line.strip_prefix("no ").unwrap_or(&line).to_string(),
            )),
        }
    }
}

/// A destination's TLS configuration and peer policy.
#[derive(Debug)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    allow: Vec<String>,
}

impl TlsServer {
    /// Presents `id`'s certificate; accepts clients whose certificates
    /// chain to `id`'s CA and, when `allow_peers` is not empty, carry one
    /// of those names.
    pub fn new(id: &Identity, allow_peers: Vec<String>) -> Result<Self, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Handshake(format!("TLS configuration: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain.clone(), id.key.clone_key())
            .map_err(config_err)?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
            allow: allow_peers,
        })
    }

    /// The handshake and the peer check on an accepted socket, by
    /// `deadline`; the connection and the peer's name.
    pub(super) fn accept(
        &self,
        mut tcp: TcpStream,
        deadline: Instant,
    ) -> Result<(Conn, String), TlsError> {
        let mut tls = Connection::from(
            rustls::ServerConnection::new(self.config.clone()).map_err(config_err)?,
        );
        if let Err(e) = handshake(&mut tls, &mut tcp, deadline) {
            linger(&mut tcp);
            return Err(TlsError::Handshake(e.to_string()));
        }
        let names = tls
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| cert_names(c))
            .unwrap_or_default();
        let allowed = self.allow.is_empty()
            || names
                .iter()
                .any(|n| self.allow.iter().any(|a| a.eq_ignore_ascii_case(n)));
        if !allowed {
            let why = format!(
                "its certificate names {names:?}, and this service accepts only {:?} \
                 (--allow-peer)",
                self.allow
            );
            let _ = write_line(&mut tls, &mut tcp, &format!("no {why}"), deadline);
            return Err(TlsError::NotAllowed(format!("refused a peer: {why}")));
        }
        write_line(&mut tls, &mut tcp, "ok", deadline)?;
        let conn = relay::spawn(tls, tcp)?;
        Ok((conn, names.first().cloned().unwrap_or_default()))
    }
}

/// A handshake failure seen by the source, with what to do about it.
fn explain(e: std::io::Error, server_name: &str) -> String {
    use rustls::CertificateError as C;
    let hint = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                " (the destination's certificate is not issued for {server_name:?}; pass \
                 --peer-name with a name it was issued for)"
            ),
            C::UnknownIssuer | C::BadSignature => " (the destination's certificate is not \
                 signed by the CA this host trusts: check ca.pem on both hosts)"
                .to_string(),
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => {
                " (check both hosts' clocks, or issue a new certificate)".to_string()
            }
            _ => String::new(),
        },
        _ => String::new(),
    };
    format!("{e}{hint}")
}

/// Closes a connection whose handshake failed so that the alert rustls
/// wrote reaches the peer: closing with its unread bytes still queued would
/// send a reset, which can destroy the alert before the peer reads it (a
/// plain-TCP phaul then sees "connection reset" instead of the reason).
fn linger(tcp: &mut TcpStream) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match tcp.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

fn set_deadline(tcp: &TcpStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(std::time::Duration::from_millis(1));
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))
}

fn timed_out(e: std::io::Error) -> std::io::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer did not complete the handshake in time",
        ),
        _ => e,
    }
}

fn handshake(tls: &mut Connection, tcp: &mut TcpStream, deadline: Instant) -> std::io::Result<()> {
    while tls.is_handshaking() {
        set_deadline(tcp, deadline)?;
        tls.complete_io(tcp).map_err(timed_out)?;
    }
    while tls.wants_write() {
        set_deadline(tcp, deadline)?;
        tls.write_tls(tcp).map_err(timed_out)?;
    }
    Ok(())
}

fn write_line(
    tls: &mut Connection,
    tcp: &mut TcpStream,
    line: &str,
    deadline: Instant,
) -> std::io::Result<()> {
    let mut line: String = line.chars().take(MAX_LINE - 1).collect();
    line.push('\n');
    tls.writer().write_all(line.as_bytes())?;
    while tls.wants_write() {
        set_deadline(tcp, deadline)?;
        tls.write_tls(tcp).map_err(timed_out)?;
    }
    Ok(())
}

/// Reads one acceptance line, byte by byte (what follows it stays in
/// rustls's buffer for the relay).
fn read_line(
    tls: &mut Connection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8];
        match tls.reader().read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) if line.len() < MAX_LINE => line.push(b[0]),
            Ok(1) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the answer is too long",
                ))
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the destination closed the connection",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                set_deadline(tcp, deadline)?;
                if tls.read_tls(tcp).map_err(timed_out)? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the destination closed the connection",
                    ));
                }
                tls.process_new_packets()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}
