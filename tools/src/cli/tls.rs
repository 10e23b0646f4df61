//! The TLS options `phaul serve`, `phaul migrate` and `phaul recover`
//! share, and `phaul certs` (a CA and host certificates).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use phaul_core::transport::{certs, Identity, Remote, TlsClient, TlsFiles};

use super::exit;

/// Where this host's certificate, key and CA are.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Directory holding ca.pem, cert.pem and key.pem (what
    /// `phaul certs issue --out DIR` writes).
    #[arg(long, value_name = "DIR", env = "PHAUL_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The CA certificate peers must chain to (instead of DIR/ca.pem).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (instead of DIR/cert.pem).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key, mode 0600 (instead of DIR/key.pem).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plain TCP instead of TLS: loopback addresses only, and the service
    /// accepts only root's connections. Both sides must pass it.
    #[arg(long, conflicts_with_all = ["tls_dir", "tls_ca", "tls_cert", "tls_key"])]
    pub insecure: bool,
}

impl TlsArgs {
    /// The files, from --tls-dir and the explicit options (None without
    /// any).
    pub fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        let from_dir = self.tls_dir.as_deref().map(TlsFiles::in_dir);
        let pick = |explicit: &Option<PathBuf>, dir: Option<PathBuf>, what: &str| {
            explicit.clone().or(dir).with_context(|| {
                format!("--tls-{what} FILE is needed (or --tls-dir DIR holding it)")
            })
        };
        if from_dir.is_none()
            && self.tls_ca.is_none()
            && self.tls_cert.is_none()
            && self.tls_key.is_none()
        {
            return Ok(None);
        }
        let d = from_dir.clone();
        Ok(Some(TlsFiles {
            ca: pick(&self.tls_ca, d.clone().map(|f| f.ca), "ca")?,
            cert: pick(&self.tls_cert, d.clone().map(|f| f.cert), "cert")?,
            key: pick(&self.tls_key, d.map(|f| f.key), "key")?,
        }))
    }

    /// This host's identity; an error naming both ways when neither TLS
    /// files nor --insecure were given. None with --insecure.
    pub fn identity(&self) -> anyhow::Result<Option<Identity>> {
        match (self.files()?, self.insecure) {
            (Some(f), _) => Ok(Some(Identity::load(&f)?)),
            (None, true) => {
                tracing::warn!(
                    "--insecure: plain TCP, unencrypted and unauthenticated (loopback, root only)"
                );
                Ok(None)
            }
            (None, false) => bail!(
                "phaul connects with mutual TLS: pass --tls-dir DIR (a directory made with \
                 `phaul certs issue`), or --insecure for plain TCP on loopback"
            ),
        }
    }
}

/// Resolves `--to HOST:PORT` and secures it: TLS checks the destination's
/// certificate against `peer_name`, or HOST.
pub fn remote(to: &str, peer_name: Option<&str>, tls: &TlsArgs) -> anyhow::Result<Remote> {
    let addr: SocketAddr = to
        .to_socket_addrs()
        .with_context(|| format!("--to {to}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("--to {to}: the name has no address"))?;
    let host = to
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(to);
    match tls.identity()? {
        Some(id) => Ok(Remote::tls(
            addr,
            Arc::new(TlsClient::new(&id)?),
            peer_name.unwrap_or(host),
        )),
        None => Ok(Remote::insecure(addr)?),
    }
}

/// Arguments of `phaul certs`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  phaul certs init --dir /etc/phaul/ca                 # once, on a safe machine
  phaul certs issue --dir /etc/phaul/ca --name src.example --out /tmp/src
  phaul certs issue --dir /etc/phaul/ca --name dst.example --also 10.0.0.2 --out /tmp/dst
  # copy each --out directory to its host (e.g. /etc/phaul/tls), then:
  phaul serve --listen 0.0.0.0:7070 --tls-dir /etc/phaul/tls --allow-peer src.example
  phaul migrate pid 4242 --to dst.example:7070 --tls-dir /etc/phaul/tls

The CA's key (ca-key.pem) never leaves the CA directory; keys are written 0600.")]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a certificate authority in DIR (ca.pem, ca-key.pem).
    Init {
        /// The CA directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "phaul CA")]
        name: String,
    },
    /// Issue a host's certificate and key, signed by the CA in DIR, into
    /// OUT with the CA's certificate (not its key): ready for --tls-dir.
    Issue {
        /// The CA directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The host's name (or IP address): what --allow-peer and a source's
        /// --to / --peer-name match.
        #[arg(long, value_name = "HOST")]
        name: String,
        /// Another name or IP address the host answers to (repeatable).
        #[arg(long, value_name = "NAME")]
        also: Vec<String>,
        /// Where to write cert.pem, key.pem and ca.pem.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Runs `phaul certs`.
pub fn run(args: CertsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CertsCommand::Init { dir, name } => {
            let cert = certs::init_ca(&dir, &name)?;
            println!(
                "created the CA {} (its key: {})",
                cert.display(),
                dir.join(certs::CA_KEY).display()
            );
        }
        CertsCommand::Issue {
            dir,
            name,
            also,
            out,
        } => {
            certs::issue(
                &dir,
                &certs::HostNames {
                    name: name.clone(),
                    also,
                },
                &out,
            )?;
            println!(
                "issued {name}: {} (use it with --tls-dir {})",
                out.join(certs::CERT).display(),
                out.display()
            );
        }
    }
    Ok(ExitCode::from(exit::SUCCESS))
}
