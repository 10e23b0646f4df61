//! `phaul recover`: finish what the journal says a phaul that died (or
//! could not decide) left unfinished — resume, remove or keep each copy it
//! left stopped or held, saying which and why.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use phaul_core::engine::recover::{recover, Decision, RecoverOptions};
use phaul_core::journal::Journal;

use super::exit;

/// Arguments of `phaul recover`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  phaul recover                          settle every unfinished migration of this host
  phaul recover --json
  phaul recover --resume-source 3f2a9c0d1b2e4f60    the destination surely does not run it
  phaul recover --kill-source 3f2a9c0d1b2e4f60      the destination runs it

On the source, a migration whose commit was under way left its workload
STOPPED: recover asks the destination (at the address the journal recorded)
whether it runs it, then removes or resumes the stopped copy. On the
destination, a copy that was restored but never committed is killed, and a
committed one is kept. Nothing pending: says so and exits 0.

Exit status:
  0  nothing left pending
  1  the journal cannot be read
  5  a migration is still undecided (see the message)")]
pub struct RecoverArgs {
    /// This host's TLS files, to ask destinations reached over TLS.
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    /// The journal to read (the `--journal-dir` the migrations used).
    #[arg(long, value_name = "DIR", env = "PHAUL_JOURNAL_DIR", default_value = phaul_core::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// How long to keep asking an unreachable destination, seconds.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub timeout: u64,
    /// Resume the stopped source copy of SESSION without asking (you
    /// checked that the destination does not run it).
    #[arg(long, value_name = "SESSION")]
    pub resume_source: Vec<String>,
    /// Remove the stopped source copy of SESSION without asking (you
    /// checked that the destination runs it).
    #[arg(long, value_name = "SESSION")]
    pub kill_source: Vec<String>,
    /// Print what was done as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn session_id(s: &str) -> anyhow::Result<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .with_context(|| format!("`{s}` is not a session id (16 hex digits, as phaul prints it)"))
}

/// Runs `phaul recover`.
pub fn run(args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let mut decisions = Vec::new();
    for s in &args.resume_source {
        decisions.push((session_id(s)?, Decision::ResumeSource));
    }
    for s in &args.kill_source {
        decisions.push((session_id(s)?, Decision::KillSource));
    }
    if !args.journal_dir.exists() {
        if args.json {
            println!("{}", serde_json::json!({"pending": 0, "sessions": []}));
        } else {
            println!(
                "nothing to recover: no journal at {}",
                args.journal_dir.display()
            );
        }
        return Ok(ExitCode::from(exit::SUCCESS));
    }
    let journal = Journal::open(&args.journal_dir)?;
    let actions = recover(
        &journal,
        &RecoverOptions {
            timeout: Duration::from_secs(args.timeout),
            decisions,
            tls: match args.tls.files()? {
                Some(f) => Some(std::sync::Arc::new(phaul_core::transport::TlsClient::new(
                    &phaul_core::transport::Identity::load(&f)?,
                )?)),
                None => None,
            },
        },
    )?;
    let pending = actions.iter().filter(|a| a.pending).count();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"pending": pending, "sessions": actions})
        );
    } else if actions.is_empty() {
        println!(
            "nothing to recover: every migration in {} is finished",
            args.journal_dir.display()
        );
    } else {
        for a in &actions {
            println!("session {} ({}): {}", a.session, a.side, a.message);
        }
    }
    Ok(ExitCode::from(if pending > 0 {
        exit::AFTER_COMMIT
    } else {
        exit::SUCCESS
    }))
}
