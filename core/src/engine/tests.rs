//! The engine's phases against a scripted CRIU ([`crate::criu::fake`]) and
//! an in-process test driver, source and destination in one process over
//! socketpairs, with a frame-level proxy between them: every phase x kind
//! of failure (CRIU error, CRIU dead, CRIU hung, driver error or panic,
//! connection cut at each message, timeout) in milliseconds, without root.
//! Each case asserts the outcome and which copy runs afterwards; the
//! workloads are real `sleep` processes, so "runs" and "stopped" are what
//! the kernel says. The real-CRIU tests (`tests/`) cover the same paths
//! end to end.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phaul_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use phaul_plugin_api::{
    Capabilities, DriverError, DriverInfo, DriverResult, FfiDriver_TO, GuardedDriver, InitContext,
};

use super::abort::Abort;
use super::dest::{serve_with, Control, DestOptions};
use super::iter::StopRules;
use super::recover::{recover, Decision, RecoverOptions};
use super::report::NoProgress;
use super::source::{migrate_with, SourceOptions};
use super::{Connector, MigrationError, PreDump};
use crate::conn::Conn;
use crate::criu::fake::{FakeLauncher, Fault};
use crate::criu::rpc::ReqType;
use crate::criu::Launcher;
use crate::journal::{self, Journal};
use crate::plugins::Driver;
use crate::proc::{self, TaskState};
use crate::proto::{read_preamble, FrameReader, FrameWriter, MigrationMode, Msg};

/// A driver that records its hooks and fails or panics on demand
/// (`fail=HOOK`, `panic=HOOK`, given per side).
struct TestDriver {
    pid: i32,
    fail: Vec<String>,
    panic: Vec<String>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl TestDriver {
    fn hook(&self, name: &str) -> DriverResult<()> {
        self.calls.lock().unwrap().push(name.to_string());
        if self.panic.iter().any(|h| h == name) {
            panic!("injected panic in {name}");
        }
        if self
            .fail
            .iter()
            .any(|h| h.strip_prefix("hang:") == Some(name))
        {
            std::thread::sleep(Duration::from_secs(3600));
        }
        if self.fail.iter().any(|h| h == name) {
            return Err(DriverError::failed(format!("injected failure in {name}")));
        }
        Ok(())
    }
}

impl phaul_plugin_api::Driver for TestDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            name: "test".into(),
            version: "0".into(),
            description: "unit-test driver".into(),
            capabilities: Capabilities::LIVE,
        }
    }
    fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
        self.pid = ctx.id.parse().unwrap_or(0);
        self.hook("init")
    }
    fn root_task_pid(&mut self) -> DriverResult<i32> {
        self.hook("root_task_pid").map(|()| self.pid)
    }
    fn net_lock(&mut self) -> DriverResult<()> {
        self.hook("net_lock")
    }
    fn dump(
        &mut self,
        _ctx: &phaul_plugin_api::DumpContext,
    ) -> DriverResult<phaul_plugin_api::HookOutcome> {
        self.hook("dump")
            .map(|()| phaul_plugin_api::HookOutcome::ENGINE_DEFAULT)
    }
    fn meta_files_in(&mut self, _dir: &str, _names: &[String]) -> DriverResult<()> {
        self.hook("meta_files_in")
    }
    fn meta_files_out(&mut self, _dir: &str) -> DriverResult<Vec<String>> {
        self.hook("meta_files_out").map(|()| Vec::new())
    }
    fn restore(
        &mut self,
        _ctx: &phaul_plugin_api::RestoreContext,
    ) -> DriverResult<phaul_plugin_api::HookOutcome> {
        self.hook("restore")
            .map(|()| phaul_plugin_api::HookOutcome::ENGINE_DEFAULT)
    }
    fn migration_complete(&mut self) -> DriverResult<()> {
        self.hook("migration_complete")
    }
    fn migration_fail(&mut self) -> DriverResult<()> {
        self.hook("migration_fail")
    }
}

fn driver(fail: &[&str], panic: &[&str]) -> (Driver, Arc<Mutex<Vec<String>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let d = TestDriver {
        pid: 0,
        fail: fail.iter().map(|s| s.to_string()).collect(),
        panic: panic.iter().map(|s| s.to_string()).collect(),
        calls: calls.clone(),
    };
    let boxed = FfiDriver_TO::from_value(GuardedDriver::new(d), TD_Opaque);
    (Driver::new("test".into(), boxed), calls)
}

/// Where the control channel breaks.
#[derive(Debug, Clone, Copy)]
enum Cut {
    None,
    /// Both directions are shut instead of forwarding this frame.
    Before(&'static str),
}

/// Forwards frames between `a` and `b` until `cut` fires.
fn proxy(a: UnixStream, b: UnixStream, cut: Cut) {
    let pump = move |from: UnixStream, to: UnixStream, other: (UnixStream, UnixStream)| {
        let mut r = FrameReader::new(from.try_clone().unwrap());
        let mut w = FrameWriter::new(to.try_clone().unwrap());
        while let Ok(m) = r.read::<Msg>() {
            if matches!(cut, Cut::Before(n) if n == m.name()) {
                break;
            }
            if w.write(&m).is_err() {
                break;
            }
        }
        for s in [&from, &to, &other.0, &other.1] {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    };
    let mut pre = [0u8; 8];
    std::io::Read::read_exact(&mut &a, &mut pre).unwrap();
    std::io::Write::write_all(&mut &b, &pre).unwrap();
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (a3, b3) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || pump(b2, a2, (a3, b3)));
    let (a4, b4) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    pump(a, b, (a4, b4));
}

/// One case: the faults on each side, where the connection breaks.
struct Case {
    name: &'static str,
    src_criu: Vec<Fault>,
    dst_criu: Vec<Fault>,
    src_fail: &'static [&'static str],
    src_panic: &'static [&'static str],
    dst_fail: &'static [&'static str],
    dst_panic: &'static [&'static str],
    cut: Cut,
    freeze_timeout: Option<Duration>,
}

impl Case {
    fn new(name: &'static str) -> Case {
        Case {
            name,
            src_criu: vec![],
            dst_criu: vec![],
            src_fail: &[],
            src_panic: &[],
            dst_fail: &[],
            dst_panic: &[],
            cut: Cut::None,
            freeze_timeout: None,
        }
    }
}

/// Which copy runs after a case, as the kernel says.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Runs {
    Source,
    Destination,
    /// Neither runs; the source copy exists, stopped (undecided).
    NoneSourceStopped,
    /// The destination's copy runs; the source copy exists, stopped
    /// (undecided: nobody told the source).
    DestinationSourceStopped,
}

struct Result_ {
    error: Option<MigrationError>,
    runs: Runs,
    src_journal: Journal,
    src_task: journal::Task,
    dst_copies: Vec<i32>,
    dst_calls: Vec<String>,
    _dirs: tempfile::TempDir,
}

fn run(case: Case) -> Result_ {
    let dirs = tempfile::tempdir().unwrap();
    // Its own session, as a detached workload is.
    let mut workload = std::process::Command::new("sleep");
    workload.arg("1000");
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut workload, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut workload = workload.spawn().unwrap();
    let pid = workload.id() as i32;
    let src_task = proc::task(pid).unwrap();
    let (ctl_src, ctl_px1) = UnixStream::pair().unwrap();
    let (ctl_px2, ctl_dst) = UnixStream::pair().unwrap();
    let (mem_src, mem_dst) = UnixStream::pair().unwrap();
    let cut = case.cut;
    std::thread::spawn(move || proxy(ctl_px1, ctl_px2, cut));

    // Hung hooks are given up on quickly.
    let deadlines: Vec<(String, Duration)> = [
        "net_lock",
        "restore",
        "dump",
        "meta_files_out",
        "meta_files_in",
    ]
    .iter()
    .map(|h| (h.to_string(), Duration::from_millis(300)))
    .collect();
    let dst_launcher = FakeLauncher::new(case.dst_criu.clone());
    let dst_log = dst_launcher.log.clone();
    let dst_opts = DestOptions {
        work_root: dirs.path().join("dst-work"),
        criu: "fake".into(),
        keep_images: false,
        commit_timeout: Duration::from_secs(2),
        journal_dir: dirs.path().join("dst-journal"),
        log_dir: dirs.path().join("dst-logs"),
        hook_deadlines: deadlines.clone(),
        policy: Default::default(),
        post_copy_stall: Duration::from_secs(15),
    };
    let (dst_fail, dst_panic) = (case.dst_fail, case.dst_panic);
    let dest = std::thread::spawn(move || {
        let (d, calls) = driver(dst_fail, dst_panic);
        let control = Conn::from(ctl_dst);
        let mem = Conn::from(mem_dst);
        if read_preamble(&mut &control).is_err() || read_preamble(&mut &mem).is_err() {
            return (calls, None);
        }
        let _attach: Result<Msg, _> = FrameReader::new(&mem).read();
        let mut control = Control::new(control).unwrap();
        let hello = match control.read() {
            Ok(Msg::Hello(h)) => h,
            _ => return (calls, None),
        };
        let launcher: Arc<dyn Launcher> = Arc::new(dst_launcher);
        let r = serve_with(
            Ok(d),
            &launcher,
            &dst_opts,
            &hello,
            control,
            Some(mem),
            None,
            &|_| {},
        );
        (calls, Some(r.is_ok()))
    });

    let (d, _src_calls) = driver(case.src_fail, case.src_panic);
    let opts = SourceOptions {
        htype: "test".into(),
        id: pid.to_string(),
        options: vec![],
        pre_dump: PreDump::Auto,
        rules: StopRules::default(),
        tcp_established: false,
        // The workload is a `sleep` in this host's PID namespace: its pid
        // is "taken" on the (same) destination.
        force: true,
        keep_images: false,
        work_root: dirs.path().join("src-work"),
        criu: "fake".into(),
        resolve_timeout: Duration::from_millis(300),
        restore_estimate: Duration::from_millis(10),
        mode: MigrationMode::Live,
        no_start: false,
        fs_rules: Default::default(),
        journal_dir: dirs.path().join("src-journal"),
        log_dir: dirs.path().join("src-logs"),
        hook_deadlines: deadlines,
        freeze_timeout: case.freeze_timeout.or(Some(Duration::from_secs(5))),
        post_copy: Default::default(),
        post_copy_stall: Duration::from_secs(15),
    };
    let connector = Connector::Given {
        control: Conn::from(ctl_src),
        mem: Conn::from(mem_src),
        fs: None,
    };
    let launcher: Arc<dyn Launcher> = Arc::new(FakeLauncher::new(case.src_criu.clone()));
    let result = migrate_with(
        d,
        launcher,
        &opts,
        &connector,
        Arc::new(NoProgress),
        &Abort::new(),
    );
    drop(connector);
    let (dst_calls, _) = dest.join().unwrap();
    // Reap the source process if the migration killed it.
    std::thread::sleep(Duration::from_millis(20));
    let _ = workload.try_wait();
    let dst_copies = dst_log.lock().unwrap().copies.clone();
    let dst_running: Vec<i32> = dst_copies
        .iter()
        .copied()
        .filter(|&p| proc::task(p).is_some_and(|t| proc::task_state(&t) == TaskState::Running))
        .collect();
    let src_state = proc::task_state(&src_task);
    let runs = match (src_state, dst_running.len()) {
        (TaskState::Running, 0) => Runs::Source,
        (TaskState::Gone, 1) => Runs::Destination,
        (TaskState::Stopped, 0) => Runs::NoneSourceStopped,
        (TaskState::Stopped, 1) => Runs::DestinationSourceStopped,
        other => panic!(
            "{}: the invariant is broken: source {:?}, {} destination copies running",
            case.name, other.0, other.1
        ),
    };
    let src_journal = Journal::open(&dirs.path().join("src-journal")).unwrap();
    let r = Result_ {
        error: result.err(),
        runs,
        src_journal,
        src_task,
        dst_copies,
        dst_calls: dst_calls.lock().unwrap().clone(),
        _dirs: dirs,
    };
    drop(workload);
    r
}

impl Drop for Result_ {
    /// Leaves nothing behind.
    fn drop(&mut self) {
        proc::kill_tasks(&[self.src_task], Duration::from_secs(2));
        for p in &self.dst_copies {
            if let Some(t) = proc::task(*p) {
                proc::kill_tasks(&[t], Duration::from_secs(2));
            }
        }
    }
}

fn kind(r: &Result_) -> &'static str {
    r.error.as_ref().map_or("migrated", MigrationError::kind)
}

#[test]
fn a_clean_migration_moves_the_workload_and_records_it_on_both_sides() {
    let r = run(Case::new("clean"));
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.runs, Runs::Destination);
    let (recs, _) = r.src_journal.all().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state, journal::State::Migrated);
    assert!(r.dst_calls.contains(&"migration_complete".to_string()));
}

#[test]
fn every_failure_before_the_commit_resumes_the_source_and_discards_the_copy() {
    let cases = vec![
        Case {
            src_criu: vec![Fault::Fail(ReqType::Dump)],
            ..Case::new("source CRIU dump fails")
        },
        Case {
            src_criu: vec![Fault::DieBefore("post-dump")],
            ..Case::new("source CRIU dies while dumping")
        },
        Case {
            src_criu: vec![Fault::HangAt("post-dump")],
            freeze_timeout: Some(Duration::from_millis(300)),
            ..Case::new("source CRIU hangs while dumping")
        },
        Case {
            src_criu: vec![Fault::DiesHolding("post-dump")],
            ..Case::new("source CRIU dies holding the frozen tree")
        },
        Case {
            src_fail: &["net_lock"],
            ..Case::new("source driver net_lock fails")
        },
        Case {
            src_panic: &["meta_files_out"],
            ..Case::new("source driver panics while frozen")
        },
        Case {
            src_fail: &["hang:net_lock"],
            ..Case::new("source driver net_lock hangs (frozen)")
        },
        Case {
            src_fail: &["hang:dump"],
            ..Case::new("source driver dump hangs")
        },
        Case {
            src_fail: &["hang:meta_files_out"],
            ..Case::new("source driver meta_files_out hangs (frozen)")
        },
        Case {
            dst_fail: &["hang:restore"],
            ..Case::new("destination driver restore hangs")
        },
        Case {
            dst_fail: &["hang:meta_files_in"],
            ..Case::new("destination driver meta_files_in hangs")
        },
        Case {
            dst_fail: &["restore"],
            ..Case::new("destination driver restore fails")
        },
        Case {
            dst_panic: &["restore"],
            ..Case::new("destination driver restore panics")
        },
        Case {
            dst_criu: vec![Fault::Fail(ReqType::Restore)],
            ..Case::new("destination CRIU restore fails")
        },
        Case {
            dst_criu: vec![Fault::DieBefore("post-restore")],
            ..Case::new("destination CRIU dies while restoring")
        },
        Case {
            dst_criu: vec![Fault::HangAt("post-restore")],
            freeze_timeout: Some(Duration::from_millis(500)),
            ..Case::new("destination CRIU hangs while restoring")
        },
        Case {
            cut: Cut::Before("Restore"),
            ..Case::new("connection cut before Restore")
        },
        Case {
            cut: Cut::Before("Restored"),
            ..Case::new("connection cut before Restored")
        },
        Case {
            cut: Cut::Before("IterReady"),
            ..Case::new("connection cut during the memory pass")
        },
    ];
    let mut table = Vec::new();
    for c in cases {
        let name = c.name;
        let t = std::time::Instant::now();
        let r = run(c);
        table.push(format!(
            "{name:45} -> {:12} runs: {:?} ({} ms)",
            kind(&r),
            r.runs,
            t.elapsed().as_millis()
        ));
        assert_eq!(r.runs, Runs::Source, "{name}: {:?}", r.error);
        assert!(
            matches!(r.error, Some(MigrationError::RolledBack(_))),
            "{name}: {:?}",
            r.error
        );
        // No destination copy survives.
        for p in &r.dst_copies {
            assert!(
                proc::task(*p).is_none_or(|t| proc::task_state(&t) == TaskState::Gone),
                "{name}: destination copy {p} still exists"
            );
        }
        let (recs, _) = r.src_journal.all().unwrap();
        assert!(
            recs.iter().all(|r| r.state == journal::State::RolledBack),
            "{name}: the journal must say rolled back: {recs:?}"
        );
    }
    eprintln!("{}", table.join("\n"));
}

#[test]
fn failures_after_the_commit_never_leave_two_copies_and_recover_settles_them() {
    // The connection is handed in, so the source cannot ask the destination
    // on a new one: after a broken commit it must stop and wait for a
    // decision.
    let cases = vec![
        (
            Case {
                cut: Cut::Before("Commit"),
                ..Case::new("connection cut before Commit")
            },
            Runs::NoneSourceStopped,
            Decision::ResumeSource,
            Runs::Source,
        ),
        (
            Case {
                cut: Cut::Before("Resumed"),
                ..Case::new("connection cut before Resumed")
            },
            Runs::DestinationSourceStopped,
            Decision::KillSource,
            Runs::Destination,
        ),
    ];
    for (c, runs, decision, after) in cases {
        let name = c.name;
        let r = run(c);
        assert_eq!(r.runs, runs, "{name}: {:?}", r.error);
        assert!(
            matches!(r.error, Some(MigrationError::Undecided { .. })),
            "{name}: {:?}",
            r.error
        );
        let msg = r.error.as_ref().unwrap().to_string();
        assert!(msg.contains("phaul recover"), "{name}: {msg}");
        let (recs, _) = r.src_journal.all().unwrap();
        assert_eq!(recs[0].state, journal::State::Committing);
        // Without an answer, recover leaves it stopped.
        let acts = recover(
            &r.src_journal,
            &RecoverOptions {
                timeout: Duration::from_millis(100),
                decisions: vec![],
                tls: None,
            },
        )
        .unwrap();
        assert!(acts[0].pending, "{name}: {acts:?}");
        assert_eq!(proc::task_state(&r.src_task), TaskState::Stopped);
        // The operator's decision settles it.
        let acts = recover(
            &r.src_journal,
            &RecoverOptions {
                timeout: Duration::from_millis(100),
                decisions: vec![(recs[0].session, decision)],
                tls: None,
            },
        )
        .unwrap();
        assert!(!acts[0].pending, "{name}: {acts:?}");
        let src = proc::task_state(&r.src_task);
        match after {
            Runs::Source => assert_eq!(src, TaskState::Running, "{name}"),
            _ => {
                assert!(
                    proc::kill_tasks(&[r.src_task], Duration::from_secs(1)),
                    "{name}"
                );
                let running = r
                    .dst_copies
                    .iter()
                    .filter(|&&p| {
                        proc::task(p).is_some_and(|t| proc::task_state(&t) == TaskState::Running)
                    })
                    .count();
                assert_eq!(running, 1, "{name}: the destination copy runs");
            }
        }
    }
}

#[test]
fn a_destination_that_cannot_let_its_copy_run_after_the_commit_gives_it_back() {
    // CRIU dies right after the commit's answer: its copy never ran; the
    // destination says so and the (stopped) source resumes.
    let r = run(Case {
        dst_criu: vec![Fault::DieAfter("post-restore")],
        ..Case::new("destination CRIU dies at the commit")
    });
    assert_eq!(r.runs, Runs::Source, "{:?}", r.error);
    assert!(
        matches!(r.error, Some(MigrationError::RolledBack(_))),
        "{:?}",
        r.error
    );
    let msg = r.error.as_ref().unwrap().to_string();
    assert!(msg.contains("discarded its copy"), "{msg}");
}

#[test]
fn the_engine_takes_its_criu_options_and_the_driver_gets_the_rest() {
    use super::CriuDefaults;
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    let (d, rest) = CriuDefaults::split(&[o("shell-job", ""), o("sync", "/srv")]).unwrap();
    assert_eq!(d, CriuDefaults::default());
    assert!(d.file_locks && d.link_remap && !d.evasive_devices);
    assert_eq!(rest, vec![o("shell-job", ""), o("sync", "/srv")]);
    let (d, rest) = CriuDefaults::split(&[
        o("file-locks", "false"),
        o("link-remap", "off"),
        o("ghost-limit", "1048576"),
        o("evasive-devices", ""),
    ])
    .unwrap();
    assert!(rest.is_empty());
    assert!(!d.file_locks && !d.link_remap && d.evasive_devices);
    assert_eq!(d.ghost_limit, 1 << 20);
    let e = CriuDefaults::split(&[o("file-locks", "maybe")]).unwrap_err();
    assert!(e.contains("file-locks=maybe"), "{e}");
    let mut c = phaul_plugin_api::CriuOpts::default();
    d.apply(&mut c);
    assert!(!c.file_locks && c.evasive_devices);
}

#[test]
fn driver_extra_criu_options_reach_the_rpc_request() {
    use phaul_plugin_api::{CriuOpts, KeyValue};
    let mut c = CriuOpts::default();
    for (k, v) in [
        ("cgroup-root", "freezer:/lxc.payload.c1"),
        ("cgroup-root", "/machine.slice/101"),
        ("auto-ext-mnt", ""),
        ("ext-sharing", ""),
        ("ext-masters", ""),
        ("tcp-skip-in-flight", ""),
        ("timeout", "180"),
        ("ghost-limit", "52428800"),
        ("cgroup-dump-controller", "ve"),
        ("no-such-option", "x"),
    ] {
        c.extra.push(KeyValue::new(k, v));
    }
    let mut o = crate::criu::rpc::Opts::default();
    super::criu_opts_to_rpc(&c, &mut o);
    let roots: Vec<(Option<&str>, &str)> = o
        .cg_root
        .iter()
        .map(|r| (r.ctrl.as_deref(), r.path.as_str()))
        .collect();
    assert_eq!(
        roots,
        [
            (Some("freezer"), "/lxc.payload.c1"),
            (None, "/machine.slice/101")
        ]
    );
    assert_eq!(o.auto_ext_mnt, Some(true));
    assert_eq!(o.ext_sharing, Some(true));
    assert_eq!(o.ext_masters, Some(true));
    assert_eq!(o.tcp_skip_in_flight, Some(true));
    assert_eq!(o.timeout, Some(180));
    assert_eq!(o.cgroup_dump_controller, ["ve"]);
    // The driver's larger ghost limit survives the user's default.
    super::CriuDefaults::split(&[]).unwrap().0.apply_rpc(&mut o);
    assert_eq!(o.ghost_limit, Some(52428800));
}
