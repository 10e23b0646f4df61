//! `phaul`: live migration of process trees and containers between hosts,
//! on top of CRIU. This is the command-line front end of `phaul-core`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.quiet, args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("phaul: error: {}", chain(&e));
            ExitCode::from(cli::exit::FAILURE)
        }
    }
}

/// The error and its causes, each once: most of phaul's errors already say
/// their cause in their own message.
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.is_empty() {
            text = c;
        } else if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
    }
    text
}
