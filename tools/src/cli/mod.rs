//! Command-line parsing (clap) and dispatch to the subcommands.

pub mod exit;
mod htypes;
mod migrate;
mod progress;
mod recover;
mod serve;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use phaul_core::plugins::{default_plugin_dirs, Registry};

const AFTER_HELP: &str = "\
Examples:
  phaul htypes                                   list the available drivers
  phaul certs init --dir ca                      a CA for the hosts' certificates
  phaul certs issue --dir ca --name dst --out dst-tls
  phaul serve --listen 0.0.0.0:7070 --tls-dir /etc/phaul/tls
                                                 run the destination service
  phaul migrate pid 4242 --to dst:7070 --tls-dir /etc/phaul/tls
                                                 move process tree 4242 there, live
  phaul recover                                  settle migrations a killed phaul left
  phaul --plugin-dir ./target/release/plugins htypes --json

Logs go to standard error; set RUST_LOG (e.g. RUST_LOG=phaul=debug) for more.";

/// Live migration of Linux process trees and containers between hosts, on
/// top of CRIU.
#[derive(Debug, Parser)]
#[command(name = "phaul", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Directory to load htype driver plugins (*.so) from; repeatable.
    /// Default: $PHAUL_PLUGIN_DIR, else the plugins installed with phaul.
    #[arg(long = "plugin-dir", value_name = "DIR", global = true)]
    pub plugin_dirs: Vec<PathBuf>,

    /// Print only errors (no progress bars, no info logs).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the available htypes (workload drivers) and their capabilities.
    Htypes(htypes::HtypesArgs),
    /// Run the destination service that receives migrations.
    Serve(serve::ServeArgs),
    /// Migrate a workload to a destination service.
    Migrate(migrate::MigrateArgs),
    /// Settle migrations a phaul that died left unfinished (from the journal).
    Recover(recover::RecoverArgs),
    /// Make the certificates phaul's mutual TLS needs (a CA, host certificates).
    Certs(tls::CertsArgs),
}

/// Sets up `tracing` to standard error, honouring RUST_LOG.
pub fn init_logging(quiet: bool, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn,phaul=info,phaul_core=info",
        (false, 1) => "info,phaul=debug,phaul_core=debug",
        _ => "debug,phaul=trace,phaul_core=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Loads the plugins from the user's directories or the defaults.
pub fn load_registry(dirs: &[PathBuf]) -> Registry {
    if dirs.is_empty() {
        Registry::load(&default_plugin_dirs())
    } else {
        Registry::load(dirs)
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Htypes(args) => htypes::run(&cli.plugin_dirs, args),
        Command::Serve(args) => serve::run(&cli.plugin_dirs, args),
        Command::Migrate(args) => migrate::run(&cli.plugin_dirs, cli.quiet, args),
        Command::Recover(args) => recover::run(args),
        Command::Certs(args) => tls::run(args),
    }
}
