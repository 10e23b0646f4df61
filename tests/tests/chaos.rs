//! Chaos tests of phaul's commit protocol, with real CRIU: a live migration
//! is held at a protocol point (or run freely), one process dies (source
//! `phaul migrate`, destination `phaul serve`, either side's CRIU worker) or
//! the connection breaks, the survivors finish, a killed service comes back
//! on its address and journal, and `phaul recover` runs on both journals.
//! The invariant: at every look at most one copy of the workload runs and at
//! least one exists; after recovery exactly one runs, nothing else is left,
//! and its memory verifies page by page. Every cell runs to the end and the
//! whole matrix is printed before the test fails, so one broken cell does
//! not hide the others.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_tests::harness::{
    criu_workers, reap, reap_strays, recover, setup, temp_old_binaries, wait_for, Copies,
    CriuWorker, Migration, Recovery, Serve, Workload,
};
use phaul_tests::plugin_dir;
use phaul_tests::proxy::{Fault, Proxy};

const PID: &[(&str, &str)] = &[("phaul_pid", "libphaul_pid.so")];

/// The workload: small, so that a cell takes a second or two, and
/// verifiable page by page.
const WORKLOAD: &[&str] = &["--mem-mib", "16", "--dirty-pct", "5"];

/// How long a stall is left to settle before the victim dies (the stalled
/// peers reach their blocking reads).
const SETTLE: Duration = Duration::from_millis(200);

/// How long a surviving `phaul migrate`, or a surviving service's session,
/// may take to finish after the fault; a source still waiting then is
/// killed (and the cell says so).
const SURVIVOR_WAIT: Duration = Duration::from_secs(30);

/// `phaul migrate --resolve-timeout`: how long a source that lost its
/// connection after the commit asks an unreachable destination before it
/// gives up (leaving its copy stopped for `phaul recover`).
const RESOLVE_TIMEOUT: &str = "3";

/// `phaul recover --timeout`, seconds.
const RECOVER_TIMEOUT: u64 = 15;

/// The protocol points a cell can stall the proxy at (nothing is forwarded
/// from that frame on, in either direction).
const POINTS: [&str; 4] = ["Restore", "Restored", "Commit", "Resumed"];

/// What dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    SourcePhaul,
    DestPhaul,
    SourceCriu,
    DestCriu,
    Connection,
}

impl Victim {
    const ALL: [Victim; 5] = [
        Victim::SourcePhaul,
        Victim::DestPhaul,
        Victim::SourceCriu,
        Victim::DestCriu,
        Victim::Connection,
    ];

    fn name(self) -> &'static str {
        match self {
            Victim::SourcePhaul => "source phaul",
            Victim::DestPhaul => "destination phaul",
            Victim::SourceCriu => "source CRIU",
            Victim::DestCriu => "destination CRIU",
            Victim::Connection => "connection",
        }
    }
}

/// When the victim dies.
#[derive(Debug, Clone, Copy)]
enum When {
    /// Once the proxy stalled at this frame (and the stall settled); the
    /// connections are cut right after the kill.
    StallAt(&'static str),
    /// This long after `phaul migrate` started, with the proxy forwarding
    /// everything; only the connection victim cuts it.
    After(Duration),
    /// Nothing dies: a plain migration through the proxy.
    Never,
}

impl When {
    fn label(self) -> String {
        match self {
            When::StallAt(p) => format!("at {p}"),
            When::After(d) => format!("after {} ms", d.as_millis()),
            When::Never => "no fault".to_string(),
        }
    }
}

/// What became of one cell.
struct Cell {
    when: When,
    victim: Option<Victim>,
    /// One line for the matrix: what runs in the end, or the first failure.
    outcome: String,
    /// Every way this cell broke the invariant (empty: it held): a short
    /// tag for the matrix, and the details.
    failures: Vec<(&'static str, String)>,
    /// What happened on the way (exit codes, recover actions, notes).
    notes: Vec<String>,
    /// The logs, for a failed cell.
    logs: Vec<(String, PathBuf)>,
    took: Duration,
    /// `phaul migrate`'s exit code and how long it ran, when it exited by
    /// itself.
    migrate_exit: Option<(i32, Duration)>,
    _dir: Option<tempfile::TempDir>,
}

impl Cell {
    fn label(&self) -> String {
        format!(
            "{} x {}",
            self.when.label(),
            self.victim.map_or("nothing", Victim::name)
        )
    }

    fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// What the copy watcher saw while a cell ran.
#[derive(Debug, Default)]
struct Watch {
    looks: u64,
    /// Every copy's root pid ever seen (to clean up).
    seen: BTreeSet<i32>,
    /// Looks at which two or more copies ran.
    two_running: Vec<String>,
    /// Looks at which no copy existed.
    none_existing: Vec<String>,
}

/// Looks at the workload's copies over and over in a thread, from before
/// the migration until after recovery.
struct Watcher {
    stop: Arc<AtomicBool>,
    looks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Watch>>,
}

impl Watcher {
    fn start(state: PathBuf, t0: Instant) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let looks = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), looks.clone());
        let thread = std::thread::spawn(move || {
            let mut w = Watch::default();
            while !s.load(Ordering::SeqCst) {
                let c = Copies::observe(&state);
                w.looks = n.fetch_add(1, Ordering::SeqCst) + 1;
                w.seen.extend(c.pids());
                let at = format!("{:.2} s: {c}", t0.elapsed().as_secs_f64());
                if c.running().len() > 1 && w.two_running.len() < 5 {
                    w.two_running.push(at);
                } else if c.existing.is_empty() && w.none_existing.len() < 5 {
                    w.none_existing.push(at);
                }
            }
            w
        });
        Watcher {
            stop,
            looks,
            thread: Some(thread),
        }
    }

    /// Waits until a whole look began and ended after this call.
    fn look_again(&self) {
        let n = self.looks.load(Ordering::SeqCst);
        wait_for(Duration::from_secs(5), || {
            self.looks.load(Ordering::SeqCst) >= n + 2
        });
    }

    fn finish(mut self) -> Watch {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// SIGKILLs a process.
fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The worker to kill on a side: the first of `names` that runs, else any.
fn pick_worker(workers: Vec<CriuWorker>, names: &[&str]) -> Option<CriuWorker> {
    names
        .iter()
        .find_map(|n| workers.iter().find(|w| w.name == *n).cloned())
        .or_else(|| workers.into_iter().next())
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn exit_text(s: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match s {
        None => "still running".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "?".into(),
        },
    }
}

/// Runs one cell from a fresh workload, service, proxy and journals to the
/// final verification, and cleans up everything it started.
fn run_cell(when: When, victim: Option<Victim>) -> Cell {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("phaul-chaos-")
        .tempdir()
        .expect("cell directory");
    let src_journal = dir.path().join("journal-src");
    let dst_journal = dir.path().join("journal-dst");
    let serve_log = dir.path().join("serve.log");
    let migrate_log = dir.path().join("migrate.log");
    let mut cell = Cell {
        when,
        victim,
        outcome: String::new(),
        failures: Vec::new(),
        notes: Vec::new(),
        logs: vec![
            ("phaul migrate".into(), migrate_log.clone()),
            ("phaul serve".into(), serve_log.clone()),
        ],
        took: Duration::ZERO,
        migrate_exit: None,
        _dir: None,
    };

    // Declared first, dropped last: the workload's copies are killed after
    // everything that could still touch them.
    let mut w = Workload::spawn(WORKLOAD);
    let before = w.report();
    w.assert_intact(&before);
    let source_pid = w.pid;
    let mut serve = Serve::start_journaled(PID, &dst_journal, &[], Some(&serve_log));
    let fault = match when {
        When::StallAt(point) => Fault::StallAt(point),
        When::After(_) | When::Never => Fault::Forward,
    };
    let proxy = Proxy::start(&serve.addr, fault);
    let src_plugins = plugin_dir(PID);
    let t0 = Instant::now();
    let watcher = Watcher::start(w.state.clone(), t0);
    let mut mig = Migration::start(
        src_plugins.path(),
        "pid",
        source_pid,
        &proxy.addr,
        &src_journal,
        &["--resolve-timeout", RESOLVE_TIMEOUT],
        Some(&migrate_log),
    );

    // The moment.
    let mut strike = true;
    match when {
        When::StallAt(point) => {
            let reached = wait_for(SURVIVOR_WAIT, || {
                proxy.triggered() || mig.try_wait().is_some()
            });
            if !proxy.triggered() {
                cell.failures.push((
                    "never stalled",
                    format!(
                        "the migration never reached {point} ({})",
                        if reached {
                            exit_text(mig.try_wait())
                        } else {
                            "still running".into()
                        }
                    ),
                ));
                strike = false;
            } else {
                cell.notes.push(format!(
                    "stalled at {point} after {} ms",
                    t0.elapsed().as_millis()
                ));
                std::thread::sleep(SETTLE);
            }
        }
        When::After(d) => std::thread::sleep(d.saturating_sub(t0.elapsed())),
        When::Never => {}
    }
    let mut source_killed = false;
    if let (true, Some(v)) = (strike, victim) {
        let hit = match v {
            Victim::SourcePhaul => {
                let gone = mig.try_wait().is_some();
                mig.kill();
                source_killed = true;
                (!gone).then(|| format!("pid {}", mig.pid()))
            }
            Victim::DestPhaul => {
                let pid = serve.pid();
                serve.is_running().then(|| {
                    serve.kill();
                    format!("pid {pid}")
                })
            }
            Victim::SourceCriu => pick_worker(mig.criu_workers(), &["source"]).map(|k| {
                sigkill(k.pid);
                format!("{} worker, pid {}", k.name, k.pid)
            }),
            Victim::DestCriu => pick_worker(serve.criu_workers(), &["restore", "pages"]).map(|k| {
                sigkill(k.pid);
                format!("{} worker, pid {}", k.name, k.pid)
            }),
            Victim::Connection => Some("proxy cut".to_string()),
        };
        match hit {
            Some(what) => cell.notes.push(format!(
                "killed {} ({what}) at {} ms",
                v.name(),
                t0.elapsed().as_millis()
            )),
            None => cell
                .notes
                .push(format!("n/a: no {} to kill at that moment", v.name())),
        }
    }
    // Stalled peers must see their connections drop; a free-running
    // migration only loses it when that is the fault. Before the cut, the
    // copies are looked at once more: what the death alone did (e.g. a
    // source tree let go by its dying CRIU while the destination's copy
    // runs) must not hide behind what the cut makes the survivors do.
    if matches!(when, When::StallAt(_)) {
        if strike && victim.is_some_and(|v| v != Victim::Connection) {
            watcher.look_again();
        }
        proxy.cut_and_heal();
    } else if victim == Some(Victim::Connection) {
        proxy.cut_and_heal();
    }

    // The survivors finish.
    if !source_killed {
        match mig.wait_timeout(SURVIVOR_WAIT) {
            Some(status) => {
                cell.migrate_exit = status.code().map(|c| (c, t0.elapsed()));
            }
            None => {
                cell.notes.push(format!(
                    "source phaul still waiting {} s after the fault: killed",
                    SURVIVOR_WAIT.as_secs()
                ));
                mig.kill();
            }
        }
    }
    cell.notes
        .push(format!("phaul migrate: {}", exit_text(mig.try_wait())));
    if serve.is_running() {
        if !wait_for(SURVIVOR_WAIT, || serve.criu_workers().is_empty()) {
            cell.notes.push(format!(
                "destination CRIU workers still there {} s after the fault: {:?}",
                SURVIVOR_WAIT.as_secs(),
                serve.criu_workers()
            ));
        }
    } else {
        serve.restart();
        cell.notes.push("destination phaul restarted".into());
    }

    // Recovery, source first: it asks the destination.
    if temp_old_binaries() {
        cell.notes
            .push("TEMP: phaul recover skipped (old binaries)".into());
    } else {
        let recoveries = [
            (
                "source",
                recover(src_plugins.path(), &src_journal, RECOVER_TIMEOUT),
            ),
            (
                "destination",
                recover(serve.plugins.path(), &dst_journal, RECOVER_TIMEOUT),
            ),
        ];
        for (side, r) in recoveries {
            check_recovery(&mut cell, side, &r, dir.path());
        }
    }

    // The end state: exactly one copy, running, intact.
    let mut last = Copies::default();
    wait_for(Duration::from_secs(10), || {
        reap(source_pid);
        reap_strays();
        last = Copies::observe(&w.state);
        last.running().len() == 1 && last.existing.len() == 1
    });
    let running = last.running();
    let mut end = String::new();
    match running.as_slice() {
        [] => cell.failures.push((
            "none running",
            format!("no copy runs after recovery: {last}"),
        )),
        [pid] => {
            end = if *pid == source_pid {
                "source resumed".into()
            } else {
                "destination runs".into()
            };
            if last.existing.len() > 1 {
                cell.failures.push((
                    "stale copy left",
                    format!("a copy that does not run is left after recovery: {last}"),
                ));
            }
            if *pid != w.pid {
                w.moved_to(*pid);
            }
            match w.try_report() {
                Ok(r) => {
                    if let Err(e) = Workload::check_intact(&r) {
                        cell.failures.push(("memory bad", e));
                    }
                    if r["counter"].as_u64() <= before["counter"].as_u64() {
                        cell.failures.push((
                            "did not go on",
                            format!(
                                "the running copy did not go on from before the migration: \
                                 {before} -> {r}"
                            ),
                        ));
                    }
                }
                Err(e) => cell.failures.push(("no report", e)),
            }
        }
        _ => cell.failures.push((
            "two running",
            format!("two copies run after recovery: {last}"),
        )),
    }

    let watch = watcher.finish();
    for at in &watch.two_running {
        cell.failures
            .push(("two running", format!("two copies ran at {at}")));
    }
    for at in &watch.none_existing {
        cell.failures
            .push(("no copy existed", format!("no copy existed at {at}")));
    }
    cell.notes
        .push(format!("{} looks at the copies", watch.looks));

    // Clean up: the processes first, then every copy ever seen.
    mig.kill();
    serve.kill();
    for root in [mig.work.path(), serve.work.path()] {
        for k in criu_workers(root) {
            sigkill(k.pid);
        }
    }
    for &pid in watch.seen.iter().chain(last.pids().iter()) {
        w.seen(pid);
        phaul_core::proc::signal_tree(pid, nix::sys::signal::Signal::SIGKILL);
    }
    wait_for(Duration::from_secs(5), || {
        reap_strays();
        watch.seen.iter().all(|&p| {
            reap(p);
            !Path::new(&format!("/proc/{p}")).exists()
        })
    });
    drop(proxy);

    cell.outcome = outcome(&end, &cell.failures);
    cell.took = started.elapsed();
    if cell.failed() {
        // Keep the logs of a failed cell for the report.
        cell._dir = Some(dir);
    }
    cell
}

/// The matrix entry: what runs in the end, or the worst failure (several
/// tags when there are several kinds).
fn outcome(end: &str, failures: &[(&'static str, String)]) -> String {
    const WORST_FIRST: [&str; 3] = ["two running", "no copy existed", "none running"];
    let mut tags: Vec<&str> = Vec::new();
    for t in WORST_FIRST
        .iter()
        .copied()
        .chain(failures.iter().map(|f| f.0))
    {
        if failures.iter().any(|f| f.0 == t) && !tags.contains(&t) {
            tags.push(t);
        }
    }
    match tags.is_empty() {
        true => end.to_string(),
        false => format!("FAIL: {}", tags.join(", ")),
    }
}

/// Checks one side's `phaul recover`: it must finish with nothing pending
/// (both sides are up again, so everything can be decided).
fn check_recovery(cell: &mut Cell, side: &str, r: &Recovery, dir: &Path) {
    cell.notes
        .push(format!("phaul recover ({side}): {}", r.summary()));
    let log = dir.join(format!("recover-{side}.log"));
    let _ = std::fs::write(&log, &r.stderr);
    cell.logs.push((format!("phaul recover ({side})"), log));
    let pending = r.json.as_ref().and_then(|j| j["pending"].as_u64());
    if r.code != Some(0) || pending != Some(0) {
        cell.failures.push((
            "recover pending",
            format!("recover ({side}) left work undecided: {}", r.summary()),
        ));
    }
}

/// Runs the cells one after the other, each inside its own panic guard so
/// that a harness failure in one cell is reported like any other failure.
fn run_cells(cells: &[(When, Option<Victim>)]) -> Vec<Cell> {
    cells
        .iter()
        .map(|&(when, victim)| {
            eprintln!(
                "chaos: {} x {} ...",
                when.label(),
                victim.map_or("nothing", Victim::name)
            );
            let cell =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_cell(when, victim)))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".into());
                        Cell {
                            when,
                            victim,
                            outcome: outcome("", &[("harness panicked", String::new())]),
                            failures: vec![("harness panicked", msg)],
                            notes: Vec::new(),
                            logs: Vec::new(),
                            took: Duration::ZERO,
                            migrate_exit: None,
                            _dir: None,
                        }
                    });
            eprintln!(
                "chaos: {} -> {} ({:.1} s)",
                cell.label(),
                cell.outcome,
                cell.took.as_secs_f64()
            );
            cell
        })
        .collect()
}

/// Prints the stall cells as a point x victim table, then every cell's
/// notes, and the failed cells' failures and log tails.
fn print_report(title: &str, cells: &[Cell]) {
    let mut out = format!("\n===== {title} =====\n");
    let stalls: Vec<&Cell> = cells
        .iter()
        .filter(|c| matches!(c.when, When::StallAt(_)))
        .collect();
    if !stalls.is_empty() {
        let width = stalls
            .iter()
            .map(|c| c.outcome.len())
            .chain(Victim::ALL.iter().map(|v| v.name().len()))
            .max()
            .unwrap_or(10);
        out += &format!("{:<10}", "stall at");
        for v in Victim::ALL {
            out += &format!(" | {:<width$}", v.name());
        }
        out += "\n";
        for p in POINTS {
            let row: Vec<&&Cell> = stalls
                .iter()
                .filter(|c| matches!(c.when, When::StallAt(q) if q == p))
                .collect();
            if row.is_empty() {
                continue;
            }
            out += &format!("{p:<10}");
            for v in Victim::ALL {
                let o = row
                    .iter()
                    .find(|c| c.victim == Some(v))
                    .map_or("-", |c| c.outcome.as_str());
                out += &format!(" | {o:<width$}");
            }
            out += "\n";
        }
    }
    for c in cells.iter().filter(|c| !matches!(c.when, When::StallAt(_))) {
        out += &format!("{:<40} -> {}\n", c.label(), c.outcome);
    }
    out += "\n";
    for c in cells {
        out += &format!(
            "{} -> {} ({:.1} s)\n",
            c.label(),
            c.outcome,
            c.took.as_secs_f64()
        );
        for n in &c.notes {
            out += &format!("    {n}\n");
        }
        for (_, f) in &c.failures {
            out += &format!("    FAILURE: {f}\n");
        }
    }
    for c in cells.iter().filter(|c| c.failed()) {
        for (name, path) in &c.logs {
            let t = tail(path, 25);
            if !t.is_empty() {
                out += &format!("\n--- {}: {name}, last lines ---\n{t}\n", c.label());
            }
        }
    }
    eprintln!("{out}");
}

/// Fails the test if any cell broke the invariant, after the report.
fn assert_all_held(title: &str, cells: &[Cell]) {
    print_report(title, cells);
    let failed: Vec<String> = cells
        .iter()
        .filter(|c| c.failed())
        .map(|c| format!("{} -> {}", c.label(), c.outcome))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} chaos cells broke the invariant (details above):\n  {}",
        failed.len(),
        cells.len(),
        failed.join("\n  ")
    );
}

/// A small, seeded generator (splitmix64): the random kills can be
/// repeated from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// How many random-moment kills the full test makes.
const RANDOM_KILLS: usize = 6;

#[test]
fn chaos_every_victim_at_restored_and_commit() {
    if !setup() {
        return;
    }
    let cells: Vec<(When, Option<Victim>)> = ["Restored", "Commit"]
        .into_iter()
        .flat_map(|p| {
            Victim::ALL
                .into_iter()
                .map(move |v| (When::StallAt(p), Some(v)))
        })
        .collect();
    let results = run_cells(&cells);
    assert_all_held("chaos: every victim at Restored and at Commit", &results);
}

#[test]
#[ignore = "long: the full chaos matrix and random kills (scripts/chaos.sh)"]
fn chaos_full_matrix_and_random_kills() {
    if !setup() {
        return;
    }
    // A migration nothing breaks: the invariant holds on the happy path too,
    // and its duration bounds the random moments.
    let mut results = run_cells(&[(When::Never, None)]);
    let baseline = match results[0].migrate_exit {
        Some((0, took)) => took,
        _ => Duration::from_secs(2),
    };
    let mut cells: Vec<(When, Option<Victim>)> = Vec::new();
    for p in POINTS {
        for v in Victim::ALL {
            // After `Resumed` the destination's restore worker is done: no
            // destination CRIU is left to kill.
            if p == "Resumed" && v == Victim::DestCriu {
                continue;
            }
            cells.push((When::StallAt(p), Some(v)));
        }
    }
    let seed = std::env::var("PHAUL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!(
        "chaos: random kills with seed {seed} (PHAUL_CHAOS_SEED={seed} repeats them); \
         moments within {} ms",
        baseline.as_millis()
    );
    let mut rng = Rng(seed);
    for _ in 0..RANDOM_KILLS {
        let v = Victim::ALL[rng.below(Victim::ALL.len() as u64) as usize];
        let d = Duration::from_millis(rng.below(baseline.as_millis() as u64));
        cells.push((When::After(d), Some(v)));
    }
    results.extend(run_cells(&cells));
    assert_all_held(
        &format!("chaos: full matrix and random kills (seed {seed})"),
        &results,
    );
}
