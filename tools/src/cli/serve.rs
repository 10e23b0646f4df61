//! `phaul serve`: the destination service.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use phaul_core::conn::Conn;
use phaul_core::engine::dest::DestOptions;
use phaul_core::plugins::Registry;
use phaul_core::policy::DestPolicy;
use phaul_core::server::{serve_connections, Server};
use phaul_core::transport::{Acceptor, TlsServer};
use phaul_core::workdir;

use super::{exit, load_registry};

/// Arguments of `phaul serve`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  phaul serve --listen 0.0.0.0:7070 --tls-dir /etc/phaul/tls
  phaul serve --listen 10.0.0.2:7070 --tls-dir /etc/phaul/tls --allow-peer src.example
  phaul serve --listen 127.0.0.1:0 --tls-dir tls --once   # one migration, print the port first
  phaul serve --listen 127.0.0.1:7070 --insecure          # plain TCP, loopback, root only
  phaul serve --fd-rpc 3 --fd-mem 4            # connections handed in by the caller
  phaul serve --fd-rpc 3 --fd-fs 5             # a restart-mode migration with files
  phaul serve --listen 10.0.0.2:7070 --tls-dir /etc/phaul/tls --allow-htype pid --allow-sync-root /srv
                                               # pid workloads only; file syncs into /srv and below

The destination decides what it accepts, not the source: --allow-htype (default:
every loaded htype) and --allow-sync-root (default: none, so a migration that
syncs files is refused until its directories are allowed). Sync roots are
resolved (symlinks, `..`) before they are compared, and refused in pre-flight,
before the source freezes anything.

The service restores what it accepts as root, so it accepts only peers whose
certificates chain to its CA (--tls-dir; make them with `phaul certs`), and
with --allow-peer only those names. --insecure (plain TCP) is refused off
loopback and accepts only connections from root's sockets.")]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "fd_rpc")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    /// Accept only peers whose certificate carries this name (repeatable;
    /// default: any certificate the CA signed).
    #[arg(long = "allow-peer", value_name = "NAME")]
    pub allow_peers: Vec<String>,
    /// Migrations received at once; more are refused until one finishes.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_concurrent: u32,
    /// Serve one migration over an already-connected control socket (fd N).
    #[arg(long, value_name = "N", conflicts_with = "listen")]
    pub fd_rpc: Option<RawFd>,
    /// The already-connected memory socket (fd N; live mode).
    #[arg(long, value_name = "N", requires = "fd_rpc")]
    pub fd_mem: Option<RawFd>,
    /// The already-connected file-sync socket (fd N; when files are synced).
    #[arg(long, value_name = "N", requires = "fd_rpc")]
    pub fd_fs: Option<RawFd>,
    /// Exit after the first migration (success or not).
    #[arg(long)]
    pub once: bool,
    /// Root of the per-migration work directories (tmpfs keeps images off disk).
    #[arg(long, value_name = "DIR", default_value = phaul_core::workdir::DEFAULT_ROOT)]
    pub work_dir: PathBuf,
    /// Keep the images after each migration.
    #[arg(long)]
    pub keep_images: bool,
    /// How long a restored workload waits for the source's commit, seconds.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub commit_timeout: u64,
    /// Post-copy: declare the page transfer broken after this many seconds
    /// without progress (the copy then keeps waiting on its missing pages).
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    pub post_copy_stall: u64,
    /// How long a driver hook may take on this side, HOOK=SECONDS
    /// (repeatable; see `phaul migrate --help`).
    #[arg(long = "hook-timeout", value_name = "HOOK=S", value_parser = super::migrate::parse_hook_timeout)]
    pub hook_timeouts: Vec<(String, Duration)>,
    /// Where CRIU's logs go: kept after a failed migration (the error names
    /// them), removed after a successful one, swept after a week.
    #[arg(long, value_name = "DIR", env = "PHAUL_LOG_DIR", default_value = phaul_core::workdir::DEFAULT_LOG_ROOT)]
    pub log_dir: PathBuf,
    /// Where this side durably records its decisions (a restarted service
    /// answers for earlier sessions from it; `phaul recover` reads it).
    #[arg(long, value_name = "DIR", env = "PHAUL_JOURNAL_DIR", default_value = phaul_core::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// Accept migrations of this htype only (repeatable; default: every
    /// loaded htype).
    #[arg(long = "allow-htype", value_name = "NAME")]
    pub allow_htypes: Vec<String>,
    /// Let file syncs write into DIR and below (repeatable, absolute;
    /// default: none, so a migration that syncs files is refused).
    #[arg(long = "allow-sync-root", value_name = "DIR")]
    pub allow_sync_roots: Vec<PathBuf>,
}

/// Runs `phaul serve`.
pub fn run(dirs: &[PathBuf], args: ServeArgs) -> anyhow::Result<ExitCode> {
    let acceptor = match args.fd_rpc {
        Some(_) => None,
        None => Some(match args.tls.identity()? {
            Some(id) => Acceptor::Tls(Arc::new(TlsServer::new(&id, args.allow_peers.clone())?)),
            None => {
                if !args.allow_peers.is_empty() {
                    bail!("--allow-peer needs TLS (it checks the peer's certificate)");
                }
                Acceptor::Insecure
            }
        }),
    };
    if let (Some(a), Some(addr)) = (&acceptor, args.listen) {
        a.check_listen(addr)
            .with_context(|| format!("refusing to listen on {addr}"))?;
    }
    let registry = load_registry(dirs);
    registry.warn_skipped();
    if registry.plugins().next().is_none() {
        bail!("no htype driver could be loaded; pass --plugin-dir DIR");
    }
    let policy = policy(&registry, &args)?;
    // Refuse unsafe roots now, with what to do, rather than in every
    // migration's pre-flight.
    workdir::open_root(&args.work_dir, "work directory root", workdir::FIX_WORK)?;
    workdir::open_root(&args.log_dir, "log directory root", workdir::FIX_LOGS)?;
    phaul_core::workdir::sweep_stale(&args.work_dir, "dst");
    phaul_core::workdir::sweep_logs(&args.log_dir, phaul_core::workdir::LOG_MAX_AGE);
    let opts = DestOptions {
        work_root: args.work_dir,
        criu: phaul_core::criu::locate(),
        keep_images: args.keep_images,
        commit_timeout: Duration::from_secs(args.commit_timeout),
        journal_dir: args.journal_dir,
        log_dir: args.log_dir.clone(),
        hook_deadlines: args.hook_timeouts.clone(),
        policy,
        post_copy_stall: Duration::from_secs(args.post_copy_stall.max(1)),
    };
    if let Some(rpc) = args.fd_rpc {
        phaul_core::server::open_journal(&opts)?;
        let take = |fd: RawFd, what: &str| {
            // SAFETY: the caller handed these descriptors to us.
            unsafe { Conn::from_raw(fd) }.with_context(|| format!("{what} {fd}"))
        };
        let control = take(rpc, "--fd-rpc")?;
        let mem = args.fd_mem.map(|fd| take(fd, "--fd-mem")).transpose()?;
        let fs = args.fd_fs.map(|fd| take(fd, "--fd-fs")).transpose()?;
        return Ok(
            match serve_connections(&registry, &opts, control, mem, fs) {
                Ok(s) => {
                    tracing::info!(
                        pid = s.pid,
                        restore_ms = s.restore_time.as_millis() as u64,
                        "migration complete"
                    );
                    ExitCode::from(exit::SUCCESS)
                }
                Err(e) => {
                    eprintln!("phaul: migration failed: {e}");
                    ExitCode::from(exit::ROLLED_BACK)
                }
            },
        );
    }
    let addr = args
        .listen
        .expect("clap requires --listen without --fd-rpc");
    let acceptor = acceptor.expect("an acceptor without --fd-rpc");
    let server = Server::bind(
        addr,
        acceptor,
        args.max_concurrent as usize,
        Arc::new(registry),
        opts,
    )?;
    let local = server.local_addr();
    // The first line of standard output is the address, for scripts.
    println!("listening on {local}");
    tracing::info!(%local, "phaul serve ready");
    let once = args.once;
    server.run(move |session, r| {
        match r {
            Ok(s) => tracing::info!(
                session = %format!("{session:016x}"),
                pid = s.pid,
                restore_ms = s.restore_time.as_millis() as u64,
                "migration complete: the workload runs here"
            ),
            Err(e) => tracing::warn!(session = %format!("{session:016x}"), "migration failed: {e}"),
        }
        if once {
            std::process::exit(if r.is_ok() {
                0
            } else {
                exit::ROLLED_BACK as i32
            });
        }
    });
    Ok(ExitCode::from(exit::SUCCESS))
}

/// This side's policy from `--allow-htype` and `--allow-sync-root`, each
/// checked: an htype must be loaded, a directory absolute.
fn policy(registry: &Registry, args: &ServeArgs) -> anyhow::Result<DestPolicy> {
    for h in &args.allow_htypes {
        if registry.get(h).is_none() {
            bail!("--allow-htype {h}: no such htype is loaded (see `phaul htypes`)");
        }
    }
    for d in &args.allow_sync_roots {
        if !d.is_absolute() {
            bail!(
                "--allow-sync-root {}: must be an absolute path",
                d.display()
            );
        }
    }
    Ok(DestPolicy {
        allow_htypes: (!args.allow_htypes.is_empty()).then(|| args.allow_htypes.clone()),
        allow_sync_roots: args.allow_sync_roots.clone(),
    })
}
