//! `phaul-workload`: the test workload for real CRIU live-migration tests and
//! benchmarks.
//!
//! CRIU checkpoints the workload (freeze, dump memory) and restores it
//! elsewhere, possibly as PID 1 of a new PID namespace; afterwards it must
//! keep running seamlessly. Tests talk to it only through signals and files,
//! because those survive checkpoint/restore.
//!
//! # Subcommands
//!
//! * `run --state-dir DIR [--mem-mib N] [--dirty-pct P] [--seed S] [--extras]
//!   [--linger-child] [--tcp-listen ADDR:PORT] [--objects KINDS]`: the workload itself, in the
//!   foreground. It maps N MiB of anonymous memory, fills every 4096-byte
//!   page with a deterministic pattern derived from (seed, page index, page
//!   generation), then ticks about once per millisecond, rewriting P% of all
//!   pages per second (round robin, each rewrite bumps the page's
//!   generation). `--objects` adds self-checking kernel objects (below).
//!   `--linger-child` forks a child that ignores SIGTERM and is left running
//!   when the workload exits (only SIGKILL ends it).
//! * `spawn [--pidns] [--netns] -- <run options...>`: starts `run` fully detached
//!   (double fork + setsid, optionally as PID 1 of a new PID namespace),
//!   prints its host PID and waits until it is ready.
//! * `tcp-client --connect ADDR:PORT --duration-ms D --out FILE
//!   [--interval-us U]`: request/response client for `run --tcp-listen`.
//! * `report --state-dir DIR --pid PID [--timeout-ms T]`: sends SIGUSR1 and
//!   prints the fresh status.
//!
//! # Kernel objects (`run --objects KINDS`)
//!
//! `KINDS` is a comma-separated list of the kinds below, or `all`. Each is a
//! small program inside the workload (module `objects`): set up at start-up,
//! before the first status, kept busy by the tick loop, and verified from
//! inside on every SIGUSR1, so that a report taken after a migration says
//! whether the object survived it. Path-named objects live in
//! `DIR/objects/` (emptied at start). Helper processes are forked before
//! the memory area exists, with stdio on /dev/null, no inherited
//! descriptor but their own pipes, and SIGKILL when their parent dies.
//!
//! | kind | the object | verified (ok only if all of it holds) |
//! |---|---|---|
//! | `unlinked-file` | `objects/unlinked`, 8 KiB, opened read-write, offset 1000, unlinked; a 32-byte record is written at the offset every 50 ticks | offset, every byte (against a copy in memory), nlink 0, the path still absent |
//! | `posix-lock` | `fcntl(F_SETLK)` F_WRLCK on bytes [100, 300) of `objects/lock-posix` | a forked child's `F_GETLK` sees exactly that lock, held by the workload; none past the range; fdinfo lists a POSIX lock |
//! | `flock` | `flock(LOCK_SH)` on `objects/lock-flock` | a child's own open file cannot take LOCK_EX but can take LOCK_SH; fdinfo lists a FLOCK |
//! | `ofd-lock` | `fcntl(F_OFD_SETLK)` F_RDLCK on [0, 512) of `objects/lock-ofd` | a child's `F_OFD_GETLK` sees that read lock (pid -1) and no conflict for a read lock; fdinfo lists an OFDLCK |
//! | `inotify` | IN_CREATE/IN_DELETE watch on `objects/watched/` | a file created and removed during the check produces both events, named; one watch in fdinfo |
//! | `eventfd` | counter 1000, +3 every 10 ticks, never consumed | fdinfo count and a read (written back) equal the expected value |
//! | `timerfd` | CLOCK_MONOTONIC, periodic 10 ms, drained every tick | still armed with a 10 ms interval, expires again within 500 ms |
//! | `signalfd` | for SIGRTMIN+5, blocked; a round trip every 100 ticks | still blocked, fdinfo mask; a signal queued now with a fresh value is read back with that value, SI_QUEUE, our pid |
//! | `epoll` | eventfd (readable), pipe read end with a byte, its write end, an empty pipe | exactly the three ready members are reported; the idle one only after a byte is written to it, and no more after it is read |
//! | `pipe`, `fifo` (`objects/fifo`), `unix-stream`, `unix-dgram`, `unix-seqpacket` | both ends held; one message (8–64 bytes, numbered) written per tick, read only while more than 16 are unread: 16 are always in flight | every message read in order, intact, one per read for dgram/seqpacket; 16 in flight; everything written by the previous check has arrived; still flowing |
//! | `unix-listen` | a helper whose cwd is `objects/`, listening on a socket bound to the relative name `obj.sock` | a connection to `objects/obj.sock` is accepted and answered; the socket's name is still `obj.sock`, the helper's cwd still `objects/` |
//! | `threads` | a helper with 3 threads, each blocking its own signals and with its own sigaltstack (64/96/128 KiB) | each thread: its mask, its sigaltstack, and a self-sent SA_ONSTACK signal runs on that stack; 4 tasks |
//! | `zombie` | a helper whose child exited with status 42, never reaped | `waitid(WNOWAIT)` in the helper: exited, status 42, unreaped; the zombie's pgid is the helper's |
//! | `session` | A (`setsid`) with B (own group) and C (in B's group); D in its own group in the workload's session | `getsid`/`getpgid` of the workload, A, B, C, D as set up; all exist |
//! | `shared-memory` | a MAP_SHARED anonymous page shared with a child that copies word 0 into word 1 and counts a heartbeat | a fresh value written here is copied back by the child within 2 s, heartbeat moves, mapping `rw-s` |
//! | `mprotect` | 8 KiB PROT_READ with known bytes; 3 pages whose middle one is PROT_NONE, the others get the counter every 10 ticks | /proc/self/maps: `r--p` region, exactly one `---p` guard page between `rw-p` pages; contents intact (no fault is taken) |
//!
//! # Signals understood by `run`
//!
//! * SIGUSR1: verify every page (and every `--objects` object), write
//!   `status.json` (with `report_seq` incremented), reset the window maximum
//!   gap.
//! * SIGTERM / SIGINT: write a final `status.json` with `"exiting": true` and
//!   exit 0.
//!
//! # The `status.json` contract
//!
//! Written atomically (`status.json.tmp`, then rename) into the state
//! directory: once with `report_seq` 0 when the workload is ready, once per
//! SIGUSR1 (`report_seq` 1, 2, ...), and once on exit. All fields are always
//! present:
//!
//! | field | meaning |
//! |---|---|
//! | `report_seq` | 0 = ready, n = n-th SIGUSR1 report (final status keeps the last n) |
//! | `pid` | `getpid()` (1 when the workload is a PID namespace init) |
//! | `counter` | ticks so far |
//! | `ticks_per_sec_estimate` | tick rate over the last ~1 s of running |
//! | `mem_mib`, `pages` | size of the memory area (pages of 4096 bytes) |
//! | `pages_verified`, `pages_bad`, `first_bad_page` | result of the verification done for this status (0, 0, -1 when none was done: ready and final statuses) |
//! | `dirtied_total`, `generation_sum` | page rewrites so far; sum of all page generations (equal unless a generation wrapped) |
//! | `max_gap_us` | largest time between two ticks since start (CLOCK_REALTIME) |
//! | `window_max_gap_us` | largest gap since the previous report |
//! | `gaps_over_10ms` | number of gaps longer than 10 ms |
//! | `uptime_ms`, `realtime_us` | realtime since start; realtime now (µs since the epoch) |
//! | `exiting` | true only in the final status |
//! | `seed`, `dirty_pct`, `extras_enabled`, `tcp_enabled` | the options in use |
//! | `extras_log_lines`, `pipe_msgs`, `pipe_seq_errors`, `child_pid`, `child_alive` | `--extras` state (0 / false when disabled) |
//! | `linger_pid` | the `--linger-child` (0 when disabled) |
//! | `tcp_requests`, `tcp_clients` | `--tcp-listen` state (0 when disabled) |
//! | `objects` | `--objects` state: one entry per kind, `{"ok": bool, "detail": "..."}` from the last SIGUSR1 check (`ok` false with "not verified yet" before the first); `{}` when disabled |
//!
//! Time spent verifying and writing a report is not counted as a tick gap,
//! and a long pause (e.g. frozen by CRIU) is not caught up afterwards: the
//! dirtying credit of one tick is capped at 10 ms worth of pages.

mod arena;
mod extras;
mod linger;
mod objects;
mod pattern;
mod report;
mod run;
mod signals;
mod spawn;
mod status;
mod sys;
mod tcp_client;
mod tcp_server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Test workload for CRIU live-migration tests and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "phaul-workload")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the workload in the foreground.
    Run(RunArgs),
    /// Start a detached workload, print its host PID, wait until it is ready.
    Spawn(SpawnArgs),
    /// Request/response client for `run --tcp-listen`.
    TcpClient(TcpClientArgs),
    /// Ask a running workload for a verified status report (SIGUSR1).
    Report(ReportArgs),
}

/// Options of `phaul-workload run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Directory for status.json (and extras.log); created if missing.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,

    /// Anonymous memory to allocate and fill, in MiB.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub mem_mib: u64,

    /// Percentage of all pages rewritten per second.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub dirty_pct: f64,

    /// Rewrite pages in a scattered order instead of address order (a
    /// post-copy migration then faults far ahead of its background push).
    #[arg(long)]
    pub dirty_scattered: bool,

    /// Seed of the memory pattern.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,

    /// Also exercise an open file, a pipe and a child process.
    #[arg(long)]
    pub extras: bool,

    /// Also fork a child that ignores SIGTERM and outlives the workload
    /// (only SIGKILL ends it).
    #[arg(long)]
    pub linger_child: bool,

    /// Also serve the line protocol "<u64>\n" -> "<u64+1>\n" on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp_listen: Option<SocketAddr>,

    /// Also hold and verify these kernel objects (comma separated, or `all`;
    /// see the module documentation).
    #[arg(long, value_name = "KINDS", value_delimiter = ',', value_enum)]
    pub objects: Vec<objects::Kind>,
}

/// Options of `phaul-workload spawn`.
#[derive(Debug, Args)]
struct SpawnArgs {
    /// Make the workload PID 1 of a new PID namespace.
    #[arg(long)]
    pidns: bool,

    /// Also give the workload a new, empty network namespace (`lo` is down);
    /// the caller plugs a veth into it (see the TCP migration test).
    #[arg(long)]
    netns: bool,

    /// Options passed to `phaul-workload run` (after `--`).
    #[arg(last = true, required = true, value_name = "RUN OPTIONS")]
    run_args: Vec<String>,
}

/// Options of `phaul-workload tcp-client`.
#[derive(Debug, Args)]
struct TcpClientArgs {
    /// Server address.
    #[arg(long, value_name = "ADDR:PORT")]
    connect: String,

    /// How long to send requests, in milliseconds.
    #[arg(long, value_name = "D")]
    duration_ms: u64,

    /// Where to write the JSON result.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Interval between requests, in microseconds.
    #[arg(long, value_name = "U", default_value_t = 2000)]
    interval_us: u64,
}

/// Options of `phaul-workload report`.
#[derive(Debug, Args)]
struct ReportArgs {
    /// State directory of the workload.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,

    /// PID of the workload, as seen from here.
    #[arg(long)]
    pid: i32,

    /// How long to wait for the new status.
    #[arg(long, value_name = "T", default_value_t = 30_000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Spawn(a) => {
            spawn::spawn(a.pidns, a.netns, &a.run_args).map(|()| ExitCode::SUCCESS)
        }
        Command::TcpClient(a) => tcp_client::run(&a.connect, a.duration_ms, a.interval_us, &a.out)
            .map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }),
        Command::Report(a) => {
            report::report(&a.state_dir, a.pid, a.timeout_ms).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("phaul-workload: error: {e:#}");
        ExitCode::FAILURE
    })
}
