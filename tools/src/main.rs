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
            eprintln!("phaul: error: {e:#}");
            ExitCode::from(cli::exit::FAILURE)
        }
    }
}
