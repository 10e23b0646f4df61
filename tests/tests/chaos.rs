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
    describe_processes_under, processes_with_cwd_under, reap, reap_strays, recover_settled,
    restore_underway, setup, side_workers, wait_for, workload_copies, Copies, CriuWorker,
    Migration, Recovery, Serve, Workload,
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
    /// While the destination's CRIU restores (it forked the first task of
    /// the copy, which is not the workload yet), with the proxy forwarding
    /// everything; only the connection victim cuts it. No protocol frame
    /// marks this moment: it is caught by watching the destination.
    Restoring,
    /// This long after `phaul migrate` started, with the proxy forwarding
    /// everything; only the connection victim cuts it.
    After(Duration),
    /// Nothing dies: a plain migration through the proxy.
    Never,
}

/// The matrix rows, in protocol order: the stall points, and the restore
/// between `Restore` and `Restored`.
const ROWS: [&str; 5] = ["Restore", "restoring", "Restored", "Commit", "Resumed"];

impl When {
    /// The matrix row of a cell at a protocol moment.
    fn row(self) -> Option<&'static str> {
        match self {
            When::StallAt(p) => Some(p),
            When::Restoring => Some("restoring"),
            When::After(_) | When::Never => None,
        }
    }

    fn label(self) -> String {
        match self {
            When::StallAt(p) => format!("at {p}"),
            When::Restoring => "while restoring".to_string(),
            When::After(d) => format!("after {} ms", d.as_millis()),
            When::Never => "no fault".to_string(),
        }
    }
}

/// A cell's name: `at Commit x source CRIU`.
fn label(when: When, victim: Option<Victim>) -> String {
    format!(
        "{} x {}",
        when.label(),
        victim.map_or("nothing", Victim::name)
    )
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
    /// Remarks shown in the matrix next to the outcome (a survivor that hung,
    /// a moment not caught).
    marks: Vec<&'static str>,
    /// The logs, for a failed cell.
    logs: Vec<(String, PathBuf)>,
    took: Duration,
    /// `phaul migrate`'s exit code and how long it ran, when it exited by
    /// itself.
    migrate_exit: Option<(i32, Duration)>,
    _dir: Option<tempfile::TempDir>,
}

impl Cell {
    fn new(when: When, victim: Option<Victim>) -> Cell {
        Cell {
            when,
            victim,
            outcome: String::new(),
            failures: Vec::new(),
            notes: Vec::new(),
            marks: Vec::new(),
            logs: Vec::new(),
            took: Duration::ZERO,
            migrate_exit: None,
            _dir: None,
        }
    }

    fn label(&self) -> String {
        label(self.when, self.victim)
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
    /// Looks at which two or more copies ran: how many, and the first few.
    two_running: (u64, Vec<String>),
    /// Looks at which no copy existed: how many, and the first few.
    none_existing: (u64, Vec<String>),
}

/// Counts a look and keeps the first few as examples.
fn record(what: &mut (u64, Vec<String>), at: String) {
    what.0 += 1;
    if what.1.len() < 3 {
        what.1.push(at);
    }
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
                if c.running().len() > 1 {
                    record(&mut w.two_running, at);
                } else if c.existing.is_empty() {
                    record(&mut w.none_existing, at);
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

/// The worker to kill on a side: the first of `names` that runs (`""`: a
/// worker whose role cannot be told, e.g. an idle one), else any.
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

/// Kills whatever a cell may have left: every CRIU process under the
/// roots (workers, and tasks a dead CRIU left half restored) and every copy
/// of the workload whose state directory is `state`, then reaps them (this
/// test process is their subreaper).
fn kill_leftovers(state: &Path, roots: &[&Path]) {
    for root in roots {
        for pid in processes_with_cwd_under(root) {
            sigkill(pid);
        }
    }
    let copies = workload_copies(state);
    for &pid in &copies {
        phaul_core::proc::signal_tree(pid, nix::sys::signal::Signal::SIGKILL);
    }
    wait_for(Duration::from_secs(5), || {
        reap_strays();
        copies.iter().all(|&p| {
            reap(p);
            !Path::new(&format!("/proc/{p}")).exists()
        }) && workload_copies(state).is_empty()
    });
}

/// One cell's processes. Dropping it (also when the cell panics) stops the
/// watcher, kills the commands and the service, closes the proxy and then
/// takes down every copy and CRIU process left.
struct Run {
    watcher: Option<Watcher>,
    mig: Migration,
    serve: Serve,
    proxy: Proxy,
    w: Workload,
    src_plugins: tempfile::TempDir,
    src_journal: PathBuf,
    dst_journal: PathBuf,
    /// The workload's report before the migration.
    before: serde_json::Value,
    /// The source copy's root.
    source_pid: i32,
    /// When `phaul migrate` started.
    t0: Instant,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.finish();
        }
        self.mig.kill();
        self.serve.kill();
        self.proxy.cut();
        kill_leftovers(&self.w.state, &self.roots());
    }
}

impl Run {
    /// Where the two sides' CRIU processes work.
    fn roots(&self) -> [&Path; 4] {
        [
            self.mig.work.path(),
            self.mig.logs.path(),
            self.serve.work.path(),
            self.serve.logs.path(),
        ]
    }

    /// A fresh workload, a journaled service behind a proxy (stalling at
    /// the cell's point, if it has one), the copy watcher, and the
    /// migration started in the background.
    fn start(when: When, dir: &Path) -> Run {
        let w = Workload::spawn(WORKLOAD);
        let before = w.report();
        w.assert_intact(&before);
        let src_journal = dir.join("journal-src");
        let dst_journal = dir.join("journal-dst");
        let serve = Serve::start_journaled(PID, &dst_journal, &[], Some(&dir.join("serve.log")));
        let fault = match when {
            When::StallAt(point) => Fault::StallAt(point),
            When::Restoring | When::After(_) | When::Never => Fault::Forward,
        };
        let proxy = Proxy::start(&serve.addr, fault);
        let src_plugins = plugin_dir(PID);
        let t0 = Instant::now();
        let watcher = Watcher::start(w.state.clone(), t0);
        let mig = Migration::start(
            src_plugins.path(),
            "pid",
            w.pid,
            &proxy.addr,
            &src_journal,
            &["--resolve-timeout", RESOLVE_TIMEOUT],
            Some(&dir.join("migrate.log")),
        );
        Run {
            watcher: Some(watcher),
            source_pid: w.pid,
            mig,
            serve,
            proxy,
            w,
            src_plugins,
            src_journal,
            dst_journal,
            before,
            t0,
        }
    }

    /// Waits for the cell's moment and kills its victim; a stall is then
    /// cut (and healed, so that later connections get through).
    fn strike(&mut self, cell: &mut Cell) {
        let strike = match cell.when {
            When::StallAt(point) => {
                let (proxy, mig) = (&self.proxy, &mut self.mig);
                wait_for(SURVIVOR_WAIT, || {
                    proxy.triggered() || mig.try_wait().is_some()
                });
                if self.proxy.triggered() {
                    cell.notes.push(format!(
                        "stalled at {point} after {} ms",
                        self.t0.elapsed().as_millis()
                    ));
                    std::thread::sleep(SETTLE);
                    true
                } else {
                    cell.failures.push((
                        "never stalled",
                        format!(
                            "the migration never reached {point} (phaul migrate: {})",
                            exit_text(self.mig.try_wait())
                        ),
                    ));
                    false
                }
            }
            When::Restoring => {
                let (serve, mig) = (&self.serve, &mut self.mig);
                let end = Instant::now() + SURVIVOR_WAIT;
                let caught = loop {
                    // Only the service's children: one quick look at /proc.
                    if restore_underway(&side_workers(serve.pid(), &[])) {
                        break true;
                    }
                    if mig.try_wait().is_some() || Instant::now() > end {
                        break false;
                    }
                    // The restore lasts some tens of milliseconds.
                    std::thread::sleep(Duration::from_millis(1));
                };
                if caught {
                    cell.notes.push(format!(
                        "destination restoring at {} ms",
                        self.t0.elapsed().as_millis()
                    ));
                } else {
                    cell.notes.push(format!(
                        "n/a: the restore was not caught (phaul migrate: {})",
                        exit_text(self.mig.try_wait())
                    ));
                    cell.marks.push("restore not caught");
                }
                caught
            }
            When::After(d) => {
                std::thread::sleep(d.saturating_sub(self.t0.elapsed()));
                true
            }
            When::Never => false,
        };
        if let (true, Some(v)) = (strike, cell.victim) {
            match self.kill(v) {
                Some(what) => cell.notes.push(format!(
                    "killed {} ({what}) at {} ms",
                    v.name(),
                    self.t0.elapsed().as_millis()
                )),
                None => cell
                    .notes
                    .push(format!("n/a: no {} to kill at that moment", v.name())),
            }
        }
        // Stalled peers must see their connections drop; a free-running
        // migration only loses it when that is the fault. Before the cut the
        // copies are looked at once more: what the death alone did (e.g. a
        // source tree let go by its dying CRIU while the destination's copy
        // runs) must not hide behind what the cut makes the survivors do.
        let process_died = strike && cell.victim.is_some_and(|v| v != Victim::Connection);
        match cell.when {
            When::StallAt(_) => {
                if process_died {
                    self.watcher.as_ref().expect("watching").look_again();
                }
                self.proxy.cut_and_heal();
            }
            _ if cell.victim == Some(Victim::Connection) => self.proxy.cut_and_heal(),
            _ => {}
        }
    }

    /// SIGKILLs the victim; what was killed, or `None` when it was not
    /// there.
    fn kill(&mut self, v: Victim) -> Option<String> {
        match v {
            Victim::SourcePhaul => {
                let pid = self.mig.pid();
                let there = self.mig.try_wait().is_none();
                self.mig.kill();
                there.then(|| format!("pid {pid}"))
            }
            Victim::DestPhaul => {
                let pid = self.serve.pid();
                let there = self.serve.is_running();
                self.serve.kill();
                there.then(|| format!("pid {pid}"))
            }
            Victim::SourceCriu => {
                pick_worker(self.mig.criu_workers(), &["source", "dump"]).map(|k| {
                    sigkill(k.pid);
                    format!("{} worker, pid {}", k.name, k.pid)
                })
            }
            Victim::DestCriu => pick_worker(self.serve.criu_workers(), &["restore", "", "pages"])
                .map(|k| {
                    sigkill(k.pid);
                    format!("{} worker, pid {}", k.name, k.pid)
                }),
            Victim::Connection => Some("proxy cut".to_string()),
        }
    }

    /// Lets the surviving phaul processes finish (a source still waiting
    /// after [`SURVIVOR_WAIT`] is killed), and brings a dead service back on
    /// its address and journal.
    fn survivors(&mut self, cell: &mut Cell) {
        if cell.victim != Some(Victim::SourcePhaul) || self.mig.try_wait().is_some() {
            match self.mig.wait_timeout(SURVIVOR_WAIT) {
                Some(status) => {
                    cell.migrate_exit = status.code().map(|c| (c, self.t0.elapsed()));
                }
                None => {
                    cell.notes.push(format!(
                        "source phaul still waiting {} s after the fault: killed",
                        SURVIVOR_WAIT.as_secs()
                    ));
                    cell.marks.push("source phaul hung");
                    self.mig.kill();
                }
            }
        }
        cell.notes
            .push(format!("phaul migrate: {}", exit_text(self.mig.try_wait())));
        if self.serve.is_running() {
            // Its session is over when nothing works in its work root any
            // more (CRIU workers, or tasks a dead CRIU left half restored).
            let serve = &self.serve;
            if !wait_for(SURVIVOR_WAIT, || serve.criu_processes().is_empty()) {
                cell.notes.push(format!(
                    "destination CRIU processes still there {} s after the fault: {:?}",
                    SURVIVOR_WAIT.as_secs(),
                    [serve.work.path(), serve.logs.path()]
                        .iter()
                        .flat_map(|r| describe_processes_under(r))
                        .collect::<Vec<_>>()
                ));
                cell.marks.push("destination CRIU hung");
            }
        } else {
            self.serve.restart();
            cell.notes.push("destination phaul restarted".into());
        }
    }

    /// `phaul recover` on the source journal (it asks the destination),
    /// then on the destination journal.
    fn recover(&mut self, cell: &mut Cell, dir: &Path) {
        let src = recover_settled(self.src_plugins.path(), &self.src_journal, RECOVER_TIMEOUT);
        check_recovery(cell, "source", &src, dir);
        let dst = recover_settled(
            self.serve.plugins.path(),
            &self.dst_journal,
            RECOVER_TIMEOUT,
        );
        check_recovery(cell, "destination", &dst, dir);
    }

    /// The end state: exactly one copy exists, it runs, it went on from
    /// before the migration and its memory verifies. Returns which copy
    /// runs.
    fn verify(&mut self, cell: &mut Cell) -> String {
        let mut last = Copies::default();
        let (w, source_pid) = (&self.w, self.source_pid);
        wait_for(Duration::from_secs(10), || {
            reap(source_pid);
            reap_strays();
            last = Copies::observe(&w.state);
            last.running().len() == 1 && last.existing.len() == 1
        });
        let pid = match last.running().as_slice() {
            [] => {
                cell.failures.push((
                    "none running",
                    format!("no copy runs after recovery: {last}"),
                ));
                return String::new();
            }
            [pid] => *pid,
            _ => {
                cell.failures.push((
                    "two running",
                    format!("two copies run after recovery: {last}"),
                ));
                return String::new();
            }
        };
        if last.existing.len() > 1 {
            cell.failures.push((
                "stale copy left",
                format!("a copy that does not run is left after recovery: {last}"),
            ));
        }
        if pid != self.w.pid {
            self.w.moved_to(pid);
        }
        match self.w.try_report() {
            Ok(r) => {
                if let Err(e) = Workload::check_intact(&r) {
                    cell.failures.push(("memory bad", e));
                }
                if r["counter"].as_u64() <= self.before["counter"].as_u64() {
                    cell.failures.push((
                        "did not go on",
                        format!(
                            "the running copy did not go on from before the migration: {} -> {r}",
                            self.before
                        ),
                    ));
                }
            }
            Err(e) => cell.failures.push(("no report", e)),
        }
        match pid == self.source_pid {
            true => "source resumed".into(),
            false => "destination runs".into(),
        }
    }

    /// Stops the watcher and adds what it saw to the cell.
    fn watched(&mut self, cell: &mut Cell) {
        let watch = self.watcher.take().expect("watching").finish();
        let looks = watch.looks;
        let mut report = |tag: &'static str, (n, examples): &(u64, Vec<String>), what: &str| {
            if *n > 0 {
                cell.failures.push((
                    tag,
                    format!(
                        "{what} in {n} of {looks} looks, e.g. at {}",
                        examples.join("; ")
                    ),
                ));
            }
        };
        report("two running", &watch.two_running, "two copies ran");
        report("no copy existed", &watch.none_existing, "no copy existed");
        cell.notes
            .push(format!("{} looks at the copies", watch.looks));
        for &pid in &watch.seen {
            self.w.seen(pid);
        }
        let leftover: Vec<String> = self
            .roots()
            .iter()
            .flat_map(|root| describe_processes_under(root))
            .collect();
        if !leftover.is_empty() {
            cell.notes
                .push(format!("CRIU processes left after recovery: {leftover:?}"));
        }
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
    let mut cell = Cell::new(when, victim);
    cell.logs = vec![
        ("phaul migrate".into(), dir.path().join("migrate.log")),
        ("phaul serve".into(), dir.path().join("serve.log")),
    ];
    let mut run = Run::start(when, dir.path());
    run.strike(&mut cell);
    run.survivors(&mut cell);
    run.recover(&mut cell, dir.path());
    let end = run.verify(&mut cell);
    run.watched(&mut cell);
    drop(run);
    cell.outcome = outcome(&end, &cell.failures);
    if !cell.marks.is_empty() {
        cell.outcome += &format!(" [{}]", cell.marks.join(", "));
    }
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
/// (both sides are up again, so everything can be decided), and say so in
/// the agreed JSON shape.
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
    if let Err(e) = r
        .json
        .as_ref()
        .ok_or("no JSON".to_string())
        .and_then(|j| recovery_shape(j, side))
    {
        cell.failures
            .push(("recover JSON", format!("recover ({side}) --json: {e}")));
    }
}

/// `{"pending": N, "sessions": [{"session": "<16 hex>", "side": <side>,
/// "action": "...", "message": "..."}]}`.
fn recovery_shape(j: &serde_json::Value, side: &str) -> Result<(), String> {
    j["pending"]
        .as_u64()
        .ok_or_else(|| format!("no numeric \"pending\" in {j}"))?;
    let sessions = j["sessions"]
        .as_array()
        .ok_or_else(|| format!("no \"sessions\" array in {j}"))?;
    for s in sessions {
        let id = s["session"].as_str().unwrap_or_default();
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("session id is not 16 hex digits: {s}"));
        }
        if s["side"] != side {
            return Err(format!(
                "a session of the {side} journal names another side: {s}"
            ));
        }
        if !s["action"].is_string() || !s["message"].is_string() {
            return Err(format!("a session without action or message: {s}"));
        }
    }
    Ok(())
}

/// Runs the cells one after the other, each inside its own panic guard so
/// that a harness failure in one cell is reported like any other failure.
/// `PHAUL_CHAOS_ONLY=TEXT` runs only the cells whose label contains TEXT
/// (e.g. `at Commit x source CRIU`), to look at one closely.
fn run_cells(cells: &[(When, Option<Victim>)]) -> Vec<Cell> {
    let only = std::env::var("PHAUL_CHAOS_ONLY").ok();
    cells
        .iter()
        .filter(|&&(when, victim)| {
            only.as_ref()
                .map_or(true, |o| label(when, victim).contains(o.as_str()))
        })
        .map(|&(when, victim)| {
            eprintln!("chaos: {} ...", label(when, victim));
            let cell =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_cell(when, victim)))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".into());
                        let mut cell = Cell::new(when, victim);
                        cell.failures.push(("harness panicked", msg));
                        cell.outcome = outcome("", &cell.failures);
                        cell
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

/// Prints the cells at protocol moments as a moment x victim table, then every cell's
/// notes, and the failed cells' failures and log tails.
fn print_report(title: &str, cells: &[Cell]) {
    let mut out = format!("\n===== {title} =====\n");
    let stalls: Vec<&Cell> = cells.iter().filter(|c| c.when.row().is_some()).collect();
    if !stalls.is_empty() {
        let width = stalls
            .iter()
            .map(|c| c.outcome.len())
            .chain(Victim::ALL.iter().map(|v| v.name().len()))
            .max()
            .unwrap_or(10);
        out += &format!("{:<10}", "moment");
        for v in Victim::ALL {
            out += &format!(" | {:<width$}", v.name());
        }
        out += "\n";
        for p in ROWS {
            let row: Vec<&&Cell> = stalls.iter().filter(|c| c.when.row() == Some(p)).collect();
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
    for c in cells.iter().filter(|c| c.when.row().is_none()) {
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

/// One chaos test at a time even under `cargo test` (threads of one
/// process): they share this process as the subreaper of what they start,
/// and cells must not compete for the two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How many random-moment kills the full test makes.
const RANDOM_KILLS: usize = 6;

#[test]
fn chaos_every_victim_at_restored_and_commit() {
    if !setup() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
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
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // A migration nothing breaks: the invariant holds on the happy path too,
    // and its duration bounds the random moments.
    let mut results = run_cells(&[(When::Never, None)]);
    let baseline = match results.first().and_then(|c| c.migrate_exit) {
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
        if p == "Restore" {
            cells.extend(Victim::ALL.map(|v| (When::Restoring, Some(v))));
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
