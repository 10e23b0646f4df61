//! `phaul migrate`: move a workload to a destination service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use phaul_core::engine::abort::Abort;
use phaul_core::engine::iter::StopRules;
use phaul_core::engine::report::{NoProgress, Progress, Report};
use phaul_core::engine::source::{migrate, SourceOptions};
use phaul_core::engine::{Connector, MigrationError, PreDump};
use phaul_core::fsync::FsStopRules;
use phaul_core::postcopy::PostCopy;
use phaul_core::proto::MigrationMode;

use super::progress::Bars;
use super::{exit, load_registry};

/// Migration modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Checkpoint with CRIU and restore: the processes keep their state.
    Live,
    /// Sync the files, stop the workload here, start it there afresh (a
    /// restart, not a live move; no CRIU involved).
    Restart,
}

/// `--pre-copy` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreCopyArg {
    /// Soft-dirty if the kernel has it, else uffd with --post-copy, else
    /// none.
    Auto,
    /// CRIU pre-dumps (the kernel must have soft-dirty bits).
    SoftDirty,
    /// Userfaultfd write-protect tracking (Linux 6.7+, x86_64).
    Uffd,
    /// No pre-copy: all memory moves in the final dump.
    None,
}

/// `--post-copy` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PostCopyArg {
    /// Always: the workload runs on the destination after a short pause,
    /// its memory following on demand.
    On,
    /// Only when a single-shot dump would freeze longer than
    /// --downtime-target.
    Auto,
    /// Never (the default).
    Off,
}

/// Arguments of `phaul migrate`.
#[derive(Debug, Args)]
#[command(after_help = concat!("\
Examples:
  phaul migrate pid 4242 --to dst.example:7070 --tls-dir /etc/phaul/tls
  phaul migrate pid 4242 --to 10.0.0.2:7070 --tls-dir /etc/phaul/tls --peer-name dst.example
  export PHAUL_TLS_DIR=/etc/phaul/tls                   # or once for the examples below
  phaul migrate pid 4242 --to dst.example:7070 --tcp-established --json
  phaul migrate pid 4242 --to dst.example:7070 -o shell-job --downtime-target 100
  phaul migrate pid 4242 --to dst.example:7070 --sync /srv/data     # with its files
  phaul migrate pid 4242 --to dst.example:7070 --mode restart --sync /srv/app
  phaul migrate pid 4242 --to dst.example:7070 --post-copy      # run there at once, memory follows
  phaul migrate pid 4242 --to dst.example:7070 --post-copy=auto --downtime-target 300
  phaul migrate pid 4242 --to dst.example:7070 --pre-copy=uffd  # pre-copy without soft-dirty
  phaul migrate pid 4242 --to dst.example:7070 --dry-run        # check only, move nothing
  phaul migrate pid 4242 --to 127.0.0.1:7070 --insecure         # plain TCP, one machine only
  phaul migrate lxc web1 --to dst.example:7070 --tcp-established # an LXC container
  phaul migrate lxc web1 --to dst.example:7070 --dst-id web2 -o lxcpath=/srv/lxc

", "CRIU options for every htype (-o KEY[=VALUE], like driver options):
  file-locks=BOOL       dump and restore file locks (default true; off, CRIU refuses a
                        tree holding a lock)
  link-remap=BOOL       re-link files removed while open but still linked elsewhere
                        (default true; off, CRIU refuses such a tree)
  ghost-limit=BYTES     copy deleted-but-open files up to this size into the images
                        (default 16777216; CRIU's own 1 MiB refuses a larger one)
  evasive-devices=BOOL  use another path to a device whose path is gone (default false)
Options of the pid htype: shell-job, ext-unix-sk, external=SPEC, veth=IN=OUT[@BR],
sync=DIR, shared-storage, stop-timeout=S (see the README).
Options of the lxc htype: lxcpath=DIR (the source's; the destination uses its own
lxc.lxcpath), dst-id=NAME (--dst-id), bridge=BR, shared-storage, keep-source,
stop-timeout=S (see the README).

", "Exit status:
  0  migrated
  1  error before starting (bad arguments, no plugins, no CRIU)
  2  usage error
  3  refused by pre-flight checks: nothing was frozen, nothing changed
  4  failed and rolled back: the source workload runs as before
  5  the source workload does not run again: failed after the point of no
     return, or undecided (the source copy is left stopped; run `phaul recover`)"))]
pub struct MigrateArgs {
    /// The kind of workload (see `phaul htypes`).
    pub htype: String,
    /// The workload: a pid for the pid htype, a container name for others.
    pub id: String,
    /// The destination `phaul serve` address (a name or an IP address).
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// The name the destination's certificate must carry (default: HOST
    /// of --to).
    #[arg(long, value_name = "NAME")]
    pub peer_name: Option<String>,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    /// How to move it.
    #[arg(long, value_enum, default_value = "live")]
    pub mode: ModeArg,
    /// A driver option, key=value or key (repeatable).
    #[arg(short = 'o', long = "option", value_name = "KEY[=VALUE]")]
    pub options: Vec<String>,
    /// A directory the workload needs on the destination: synced while it
    /// runs, then once more while it is frozen (repeatable; the pid htype's
    /// `-o sync=DIR`).
    #[arg(long, value_name = "DIR")]
    pub sync: Vec<PathBuf>,
    /// The workload's files are on storage both hosts see: nothing to copy
    /// (the pid htype's `-o shared-storage`).
    #[arg(long, conflicts_with = "sync")]
    pub shared_storage: bool,
    /// Restart mode: leave the workload stopped on the destination.
    #[arg(long)]
    pub no_start: bool,
    /// The workload's name on the destination, for htypes that name their
    /// workloads (a container); default: the same name (the driver's
    /// `-o dst-id=NAME`).
    #[arg(long, value_name = "NAME")]
    pub dst_id: Option<String>,
    /// After a successful move, leave the source's workload stopped but
    /// defined (a container's configuration and files stay) instead of
    /// removing it (the driver's `-o keep-source`).
    #[arg(long)]
    pub keep_source: bool,
    /// Stop the live file-sync passes when one sends less than this many
    /// bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub fs_min_bytes: u64,
    /// Stop the live file-sync passes when one grows by more than this
    /// percentage.
    #[arg(long, value_name = "PCT", default_value_t = 10)]
    pub fs_max_growth: u32,
    /// At most this many live file-sync passes.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub fs_max_passes: u32,
    /// Dump and restore established TCP connections (peers see a pause,
    /// not a reset).
    #[arg(long)]
    pub tcp_established: bool,
    /// How to copy memory while the workload runs: `soft-dirty` (CRIU
    /// pre-dumps), `uffd` (userfaultfd write-protect tracking, for kernels
    /// without soft-dirty; the pages written after its last pass follow
    /// after the switch, as with --post-copy), `none`, or `auto` (soft-dirty
    /// if the kernel has it, else uffd when --post-copy is given, else
    /// none).
    #[arg(long, value_enum, value_name = "HOW", default_value = "auto",
          conflicts_with_all = ["pre_dump", "no_pre_dump"])]
    pub pre_copy: PreCopyArg,
    /// Same as --pre-copy=soft-dirty.
    #[arg(long, conflicts_with = "no_pre_dump")]
    pub pre_dump: bool,
    /// Same as --pre-copy=none.
    #[arg(long)]
    pub no_pre_dump: bool,
    /// Post-copy: run on the destination first, move the memory after. At
    /// risk: from the switch until the last page, the workload needs both
    /// hosts and the link between them.
    #[arg(long, value_enum, value_name = "WHEN", num_args = 0..=1, require_equals = true,
          default_missing_value = "on", default_value = "off")]
    pub post_copy: PostCopyArg,
    /// Post-copy: declare the page transfer broken after this many seconds
    /// without progress.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    pub post_copy_stall: u64,
    /// Stop pre-dumping after this many passes.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_iterations: u32,
    /// Stop pre-dumping when a pass writes at most this many pages.
    #[arg(long, value_name = "PAGES", default_value_t = 64)]
    pub min_pages: u64,
    /// Stop pre-dumping when a pass grows by more than this percentage.
    #[arg(long, value_name = "PCT", default_value_t = 10)]
    pub max_growth: u32,
    /// Stop pre-dumping when the predicted frozen time is below this.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub downtime_target: u64,
    /// Skip the CPU, version, process-id and address checks of the
    /// destination (try anyway).
    #[arg(long)]
    pub force: bool,
    /// Keep the images on both sides.
    #[arg(long)]
    pub keep_images: bool,
    /// Root of the work directories (tmpfs keeps images off disk).
    #[arg(long, value_name = "DIR", default_value = phaul_core::workdir::DEFAULT_ROOT)]
    pub work_dir: PathBuf,
    /// After a broken connection past the commit, how long to keep asking
    /// the destination whether it runs the workload, seconds.
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub resolve_timeout: u64,
    /// The longest the workload may stay frozen, seconds: before the
    /// commit its expiry rolls the migration back, after it the outcome is
    /// resolved by asking the destination. Default: 10 s plus 4 s per GiB
    /// of the workload's resident memory (a few seconds above a dump and
    /// restore of that size).
    #[arg(long, value_name = "S")]
    pub freeze_timeout: Option<f64>,
    /// How long a driver hook may take, HOOK=SECONDS (repeatable): a hook
    /// that does not return in time is given up (the migration rolls back
    /// while it can) and the driver is not called again. Defaults: net_lock
    /// and net_unlock 10 s, questions and option hooks 30 s, hooks acting
    /// on the workload or its storage 60 s, a driver's own dump/restore
    /// 300 s; a driver may declare longer needs.
    #[arg(long = "hook-timeout", value_name = "HOOK=S", value_parser = parse_hook_timeout)]
    pub hook_timeouts: Vec<(String, Duration)>,
    /// Where CRIU's logs go: kept after a failed migration (the error names
    /// them), removed after a successful one, swept after a week.
    #[arg(long, value_name = "DIR", env = "PHAUL_LOG_DIR", default_value = phaul_core::workdir::DEFAULT_LOG_ROOT)]
    pub log_dir: PathBuf,
    /// Where this side durably records its decisions, for `phaul recover`.
    #[arg(long, value_name = "DIR", env = "PHAUL_JOURNAL_DIR", default_value = phaul_core::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// Move nothing: run every check a migration makes (both sides'
    /// pre-flight) and a trial CRIU dump with the workload left running
    /// into a throw-away directory — the workload pauses for the dump's
    /// duration (like the freeze of a real migration, about a second per
    /// GiB) and then runs on untouched. Exit 0 when a migration would be
    /// attempted, 3 when a check fails.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as one JSON object on standard output.
    #[arg(long)]
    pub json: bool,
}

/// `-o key=value` options, plus `--sync`/`--shared-storage` as the driver
/// options they stand for.
fn driver_options(args: &MigrateArgs) -> Vec<(String, String)> {
    let mut opts: Vec<(String, String)> = args
        .options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (o.clone(), String::new()),
        })
        .collect();
    opts.extend(
        args.sync
            .iter()
            .map(|d| ("sync".to_string(), d.display().to_string())),
    );
    if args.shared_storage {
        opts.push(("shared-storage".to_string(), String::new()));
    }
    if let Some(name) = &args.dst_id {
        opts.push(("dst-id".to_string(), name.clone()));
    }
    if args.keep_source {
        opts.push(("keep-source".to_string(), String::new()));
    }
    opts
}

/// `--hook-timeout HOOK=SECONDS`.
pub fn parse_hook_timeout(s: &str) -> Result<(String, Duration), String> {
    phaul_core::plugins::HookDeadlines::parse_override(s)
}

/// Runs `phaul migrate`.
pub fn run(dirs: &[PathBuf], quiet: bool, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let registry = load_registry(dirs);
    registry.warn_skipped();
    if registry.get(&args.htype).is_none() {
        bail!(
            "no driver for htype `{}` (see `phaul htypes`; pass --plugin-dir DIR)",
            args.htype
        );
    }
    phaul_core::workdir::sweep_stale(&args.work_dir, "src");
    phaul_core::workdir::sweep_logs(&args.log_dir, phaul_core::workdir::LOG_MAX_AGE);
    let opts = SourceOptions {
        htype: args.htype.clone(),
        id: args.id.clone(),
        options: driver_options(&args),
        pre_dump: match args.pre_copy {
            _ if args.pre_dump => PreDump::Force,
            _ if args.no_pre_dump => PreDump::Never,
            PreCopyArg::Auto => PreDump::Auto,
            PreCopyArg::SoftDirty => PreDump::Force,
            PreCopyArg::Uffd => PreDump::Uffd,
            PreCopyArg::None => PreDump::Never,
        },
        rules: StopRules {
            max_iterations: args.max_iterations,
            min_pages: args.min_pages,
            max_growth_pct: args.max_growth,
            downtime_target: Duration::from_millis(args.downtime_target),
        },
        tcp_established: args.tcp_established,
        force: args.force,
        keep_images: args.keep_images,
        work_root: args.work_dir,
        criu: phaul_core::criu::locate(),
        resolve_timeout: Duration::from_secs(args.resolve_timeout),
        restore_estimate: Duration::from_millis(150),
        mode: match args.mode {
            ModeArg::Live => MigrationMode::Live,
            ModeArg::Restart => MigrationMode::Restart,
        },
        no_start: args.no_start,
        fs_rules: FsStopRules {
            min_bytes: args.fs_min_bytes,
            max_growth_pct: args.fs_max_growth,
            max_passes: args.fs_max_passes,
        },
        journal_dir: args.journal_dir,
        log_dir: args.log_dir.clone(),
        hook_deadlines: args.hook_timeouts.clone(),
        freeze_timeout: args
            .freeze_timeout
            .map(|s| Duration::from_secs_f64(s.max(0.1))),
        post_copy: match args.post_copy {
            PostCopyArg::On => PostCopy::On,
            PostCopyArg::Auto => PostCopy::Auto,
            PostCopyArg::Off => PostCopy::Off,
        },
        post_copy_stall: Duration::from_secs(args.post_copy_stall.max(1)),
    };
    let connector = Connector::Tcp(super::tls::remote(
        &args.to,
        args.peer_name.as_deref(),
        &args.tls,
    )?);
    let abort = Arc::new(Abort::new());
    watch_signals(abort.clone()).context("installing signal handlers")?;
    let progress: Arc<dyn Progress> = if quiet || args.json {
        Arc::new(NoProgress)
    } else {
        Arc::new(Bars::new())
    };
    if args.dry_run {
        let r = phaul_core::engine::dryrun::dry_run(
            &registry,
            &opts,
            &connector,
            progress.clone(),
            &abort,
        );
        drop(progress);
        return match r {
            Ok(report) => {
                if args.json {
                    let mut v = serde_json::to_value(&report)?;
                    v["dry_run"] = serde_json::Value::Bool(true);
                    println!("{v}");
                } else {
                    for c in &report.checks {
                        println!(
                            "{}  {}: {}",
                            if c.ok { "ok  " } else { "FAIL" },
                            c.check,
                            c.detail
                        );
                    }
                    let failed = report.checks.iter().filter(|c| !c.ok).count();
                    match failed {
                        0 => println!("dry run: a migration would be attempted"),
                        n => println!("dry run: a migration would fail ({n} check(s) failed)"),
                    }
                }
                Ok(ExitCode::from(if report.would_migrate {
                    exit::SUCCESS
                } else {
                    exit::REFUSED
                }))
            }
            Err(e) => {
                eprintln!("phaul: dry run: {e}");
                Ok(ExitCode::from(exit::REFUSED))
            }
        };
    }
    let result = migrate(&registry, &opts, &connector, progress.clone(), &abort);
    drop(progress);
    match result {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else if !quiet {
                print_summary(&report);
            }
            Ok(ExitCode::from(exit::SUCCESS))
        }
        Err(e) => {
            let code = match &e {
                MigrationError::Refused(_) => exit::REFUSED,
                MigrationError::RolledBack(_) => exit::ROLLED_BACK,
                MigrationError::AfterCommit(_) | MigrationError::Undecided { .. } => {
                    exit::AFTER_COMMIT
                }
            };
            let d = e.diagnosis();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "error": e.kind(),
                        "source_runs": e.source_runs(),
                        "phase": d.phase,
                        "side": d.side,
                        "criu_log": d.criu_log,
                        "hint": d.hint,
                        "message": e.to_string(),
                    })
                );
            }
            let message = e.to_string();
            eprintln!("phaul: migration {message}");
            if let Some(h) = d.hint.as_deref().filter(|h| !message.contains(h)) {
                eprintln!("phaul: what to do: {h}");
            }
            Ok(ExitCode::from(code))
        }
    }
}

/// Ctrl-C / SIGTERM abort the migration (rolled back unless it already
/// committed).
fn watch_signals(abort: Arc<Abort>) -> std::io::Result<()> {
    use phaul_core::engine::abort::Triggered;
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let name = match sig {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            match abort.trigger(&format!("interrupted by {name}")) {
                Triggered::RollingBack => tracing::warn!(
                    "{name}: aborting the migration; the source workload will be resumed"
                ),
                Triggered::Resolving => tracing::warn!(
                    "{name}: the migration has committed; asking the destination what became of it \
                     (again to stop asking and leave the source copy stopped for `phaul recover`)"
                ),
                Triggered::GivingUp => tracing::warn!(
                    "{name}: no longer asking; the source copy stays stopped, run `phaul recover`"
                ),
            }
        }
    });
    Ok(())
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn print_summary(r: &Report) {
    println!(
        "migrated {} {} to {} (pid {} there) in {}",
        r.htype,
        r.id,
        r.destination,
        r.destination_pid,
        ms(r.total_time_us)
    );
    if r.mode == "restart" {
        println!(
            "  stopped for {} (stop, final sync, start there)",
            ms(r.frozen_time_us)
        );
    } else {
        println!(
            "  frozen for {} (restore on the destination: {})",
            ms(r.frozen_time_us),
            ms(r.restore_time_us)
        );
    }
    if let Some(d) = &r.criu_dump {
        println!(
            "  CRIU dump: freezing {}, frozen {}, memdump {}, memwrite {}",
            ms(d.freezing_time),
            ms(d.frozen_time),
            ms(d.memdump_time),
            ms(d.memwrite_time)
        );
    }
    if let Some(s) = &r.criu_restore {
        println!(
            "  CRIU restore: forking {}, restore {}",
            ms(s.forking_time),
            ms(s.restore_time)
        );
    }
    for p in &r.iterations {
        match &p.uffd {
            Some(u) => println!(
                "  pass {} ({}): {} pages sent, {} zero, {} dropped, {} in {} ({:.0} MiB/s), \
                 scan {}, {:.0} pages/s dirtied",
                p.iteration,
                p.kind,
                p.pages_written,
                u.zero_pages,
                u.dropped_pages,
                mib(p.bytes),
                ms(p.duration_us),
                p.rate_mib_s,
                ms(u.scan_us),
                u.dirty_pages_s
            ),
            None => println!(
                "  pass {} ({}): {} pages written, {} skipped, {} in {} ({:.0} MiB/s)",
                p.iteration,
                p.kind,
                p.pages_written,
                p.pages_skipped_parent,
                mib(p.bytes),
                ms(p.duration_us),
                p.rate_mib_s
            ),
        }
    }
    println!("  iterations stopped: {}", r.stop_reason);
    if let (None, Some(d)) = (&r.post_copy, &r.post_copy_decision) {
        println!("  single-shot: {d}");
    }
    if let Some(p) = &r.post_copy {
        println!(
            "  post-copy ({}): {} pages after the switch ({} faulted on demand, {} pushed), \
             last page after {} ({:.0} MiB/s)",
            p.why,
            p.pages_served,
            p.pages_on_demand,
            p.pages_background,
            ms(p.time_to_last_page_us),
            p.rate_mib_s
        );
    }
    for p in &r.fs_passes {
        println!(
            "  file sync pass {}{}: {} files scanned, {} sent, {} deleted, {} in {}",
            p.pass,
            if p.final_pass { " (final)" } else { "" },
            p.files_scanned,
            p.files_sent,
            p.deleted,
            mib(p.bytes_sent),
            ms(p.duration_us)
        );
    }
    if let Some(reason) = &r.fs_stop_reason {
        println!("  file sync passes stopped: {reason}");
    }
    println!("  transport: {}", r.transport);
    println!(
        "  on the wire: {} ({} memory, {} images)",
        mib(r.bytes_on_wire),
        mib(r.memory_bytes),
        mib(r.image_bytes)
    );
}
