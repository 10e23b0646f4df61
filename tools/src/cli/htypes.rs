//! `phaul htypes`: what drivers are available, from which files, and what
//! they can do.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::{exit, load_registry};
use phaul_core::plugins::{LoadedPlugin, Skipped};

/// Arguments of `phaul htypes`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  phaul htypes
  phaul htypes --plugin-dir /opt/vendor/phaul-plugins --json

Exit status: 0 when at least one driver loads, 1 when none does. Libraries
that are refused are listed on standard error, one line each.")]
pub struct HtypesArgs {
    /// Print one JSON object (htypes, skipped, searched directories).
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Listing<'a> {
    /// The phaul-plugin-api version this phaul speaks (each htype's
    /// `abi_version` is the one its plugin was built against).
    phaul_abi_version: &'static str,
    htypes: Vec<&'a LoadedPlugin>,
    skipped: &'a [Skipped],
    plugin_dirs: &'a [PathBuf],
}

/// Runs `phaul htypes`.
pub fn run(dirs: &[PathBuf], args: HtypesArgs) -> anyhow::Result<ExitCode> {
    let reg = load_registry(dirs);
    let plugins: Vec<&LoadedPlugin> = reg.plugins().collect();
    if args.json {
        let listing = Listing {
            phaul_abi_version: phaul_core::ABI_VERSION,
            htypes: plugins.clone(),
            skipped: reg.skipped(),
            plugin_dirs: reg.dirs(),
        };
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        for s in reg.skipped() {
            eprintln!("phaul: {s}");
        }
        if !plugins.is_empty() {
            print_table(&plugins);
        }
    }
    if plugins.is_empty() {
        let searched: Vec<String> = reg.dirs().iter().map(|d| d.display().to_string()).collect();
        eprintln!(
            "phaul: error: no htype driver could be loaded (searched: {}); \
             build the plugins (cargo build) and pass --plugin-dir DIR or set PHAUL_PLUGIN_DIR",
            if searched.is_empty() {
                "nothing".to_string()
            } else {
                searched.join(", ")
            }
        );
        return Ok(ExitCode::from(exit::FAILURE));
    }
    Ok(ExitCode::from(exit::SUCCESS))
}

fn print_table(plugins: &[&LoadedPlugin]) {
    let rows: Vec<[String; 6]> = plugins
        .iter()
        .map(|p| {
            [
                p.summary.name.clone(),
                p.summary.version.clone(),
                p.summary.abi_version.clone(),
                p.summary.capabilities.join(","),
                p.summary.description.clone(),
                p.path.display().to_string(),
            ]
        })
        .collect();
    let header = [
        "HTYPE",
        "VERSION",
        "ABI",
        "CAPABILITIES",
        "DESCRIPTION",
        "PATH",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 5 {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
}
