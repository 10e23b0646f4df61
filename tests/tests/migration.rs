//! Live migrations with real CRIU between a `phaul serve` and a
//! `phaul migrate` on this machine (loopback), of a real test workload in
//! its own PID namespace: memory verified page by page, counters continued,
//! the source gone; and the failure paths, each of which must leave the
//! source workload running and verifying, and nothing on the destination.

use std::process::{Command, Stdio};
use std::time::Duration;

use phaul_tests::harness::{
    alive, assert_destination_clean, assert_refused_in_preflight, migrate,
    processes_with_cwd_under, reap, setup, wait_for, Serve, Workload,
};
use phaul_tests::plugin_dir;
use phaul_tests::proxy::{Fault, Proxy};

const PID: &[(&str, &str)] = &[("phaul_pid", "libphaul_pid.so")];
const FAULTY: &[(&str, &str)] = &[
    ("phaul_pid", "libphaul_pid.so"),
    ("phaul_test_faulty", "libfaulty.so"),
];

/// After a failed migration: the source runs and verifies, its counter
/// moves on, and nothing of the migration runs on the destination.
fn assert_rolled_back(w: &Workload, before: &serde_json::Value, serve: &Serve) {
    assert!(alive(w.pid), "the source workload must still run");
    let after = w.report();
    w.assert_intact(&after);
    assert!(
        after["counter"].as_u64() > before["counter"].as_u64(),
        "the source counter must go on: {before} -> {after}"
    );
    assert_eq!(after["pid"], 1, "still the same (namespace init) process");
    assert!(
        wait_for(Duration::from_secs(10), || serve
            .criu_processes()
            .is_empty()),
        "CRIU processes left on the destination: {:?}",
        serve.criu_processes()
    );
    assert!(
        wait_for(Duration::from_secs(10), || w.restored_copies().is_empty()),
        "a restored copy runs on the destination: {:?}",
        w.restored_copies()
    );
}

#[test]
fn live_migration_moves_the_workload_with_its_memory_intact() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "64", "--dirty-pct", "5"]);
    let before = w.report();
    w.assert_intact(&before);
    let src = plugin_dir(PID);
    let old = w.pid;
    let (out, json) = migrate(src.path(), "pid", old, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(0), "migration failed");
    let r = json.expect("--json summary");
    let new = r["destination_pid"].as_i64().unwrap() as i32;
    assert_ne!(new, old);
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(new);
    assert!(alive(new), "the workload runs on the destination");
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["pid"], 1);
    assert!(
        after["counter"].as_u64() > before["counter"].as_u64(),
        "{before} -> {after}"
    );
    assert!(after["dirtied_total"].as_u64() > before["dirtied_total"].as_u64());
    // The summary carries the numbers a user needs.
    assert!(r["frozen_time_us"].as_u64().unwrap() > 0);
    assert!(r["criu_dump"]["pages_written"].as_u64().unwrap() >= 64 * 256);
    assert!(r["criu_restore"]["restore_time"].as_u64().is_some());
    assert!(r["memory_bytes"].as_u64().unwrap() >= 64 << 20);
    assert_eq!(r["stop_reason"]["reason"], "no-pre-dump");
    // Nothing is left behind on either side.
    assert_destination_clean(&serve);
}

#[test]
fn open_file_pipe_and_child_process_migrate_intact() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "16", "--extras"]);
    std::thread::sleep(Duration::from_millis(300));
    let before = w.report();
    assert!(before["child_alive"].as_bool().unwrap());
    assert!(before["pipe_msgs"].as_u64().unwrap() > 0);
    let src = plugin_dir(PID);
    let (out, json) = migrate(src.path(), "pid", w.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(0));
    w.moved_to(json.unwrap()["destination_pid"].as_i64().unwrap() as i32);
    std::thread::sleep(Duration::from_millis(300));
    let after = w.report();
    w.assert_intact(&after);
    assert!(
        after["child_alive"].as_bool().unwrap(),
        "the child process came along: {after}"
    );
    assert!(
        after["pipe_msgs"].as_u64() > before["pipe_msgs"].as_u64(),
        "the pipe still flows"
    );
    assert_eq!(
        after["pipe_seq_errors"], 0,
        "no pipe message lost or duplicated"
    );
    assert!(after["extras_log_lines"].as_u64() > before["extras_log_lines"].as_u64());
    // The open file kept its offset: one consecutive sequence, no gap, no
    // rewrite.
    let log = std::fs::read_to_string(w.state.join("extras.log")).unwrap();
    let numbers: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert!(numbers.len() as u64 >= after["extras_log_lines"].as_u64().unwrap());
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "extras.log is not one consecutive sequence at line {}",
            i + 1
        );
    }
}

#[test]
fn killing_the_destination_during_the_transfer_rolls_back() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let w = Workload::spawn(&["--mem-mib", "128", "--dirty-pct", "2"]);
    let before = w.report();
    let proxy = Proxy::start(
        &serve.addr,
        Fault::KillAfterMemoryBytes {
            bytes: 16 << 20,
            pid: serve.pid(),
        },
    );
    let src = plugin_dir(PID);
    let (out, json) = migrate(src.path(), "pid", w.pid, &proxy.addr, &[]);
    assert!(proxy.triggered(), "the destination was killed mid-transfer");
    assert_eq!(out.status.code(), Some(4), "rolled back");
    assert_eq!(json.unwrap()["error"], "rolled-back");
    assert_rolled_back(&w, &before, &serve);
    // The killed service could not clean up; the next one does.
    let leftovers = || std::fs::read_dir(serve.work.path()).unwrap().count();
    assert_eq!(leftovers(), 1, "the killed service left its work directory");
    // (Started on a port that is taken, so it sweeps and then exits.)
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(phaul_tests::bin("phaul"))
        .arg("--plugin-dir")
        .arg(serve.plugins.path())
        .args([
            "serve",
            "--listen",
            &taken.local_addr().unwrap().to_string(),
            "--work-dir",
        ])
        .arg(serve.work.path())
        .arg("--tls-dir")
        .arg(&phaul_tests::pki::pki().dst)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the port is taken");
    assert_eq!(
        leftovers(),
        0,
        "a new service removes an interrupted migration's work directory"
    );
}

/// The faulty driver, given `options`, breaks the migration; the source
/// must roll back and say `expect`. Returns the `--json` failure, and the
/// service (its kept logs live as long as it does).
fn faulty_migration_rolls_back(
    options: &[&str],
    mem_mib: &str,
    expect: &str,
) -> Option<(serde_json::Value, Serve)> {
    if !setup() {
        return None;
    }
    let serve = Serve::start(FAULTY, &[]);
    let w = Workload::spawn(&["--mem-mib", mem_mib]);
    let before = w.report();
    let src = plugin_dir(FAULTY);
    let args: Vec<&str> = options.iter().flat_map(|o| ["-o", *o]).collect();
    let (out, json) = migrate(src.path(), "faulty", w.pid, &serve.addr, &args);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expect),
        "the message says {expect:?}: {stderr}"
    );
    assert_rolled_back(&w, &before, &serve);
    Some((json?, serve))
}

#[test]
fn a_failing_restore_on_the_destination_rolls_back() {
    let Some((j, _serve)) = faulty_migration_rolls_back(&["break-restore"], "32", "restore failed")
    else {
        return;
    };
    // The failure says where and why, and the log it names still exists
    // (the destination's, named by its path there).
    assert_eq!(j["error"], "rolled-back");
    assert_eq!(j["source_runs"], true);
    assert_eq!(j["phase"], "hand-over");
    assert_eq!(j["side"], "destination");
    let log = j["criu_log"].as_str().expect("the destination's CRIU log");
    assert!(log.ends_with("restore.log"), "{j}");
    let text = std::fs::read_to_string(log).expect("the named log exists afterwards");
    assert!(text.contains("Error"), "the log explains the failure");
    let msg = j["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("CRIU log on the destination: {log}")),
        "{msg}"
    );
    assert!(
        !msg.contains("RLIMIT_NOFILE"),
        "not the harmless complaint: {msg}"
    );
}

#[test]
fn a_failing_driver_hook_on_the_destination_rolls_back() {
    faulty_migration_rolls_back(
        &["panic=meta_files_in"],
        "16",
        "driver panicked in meta_files_in",
    );
}

/// A hook that hangs on one side while the workload is frozen: the engine
/// gives up on it at its deadline, the workload runs again, and the
/// message names the hook and the driver.
fn hung_hook_rolls_back(option: &str, serve_extra: &[&str], migrate_extra: &[&str], expect: &str) {
    if !setup() {
        return;
    }
    let serve = Serve::start(FAULTY, serve_extra);
    // Its own network namespace too: CRIU asks the driver to lock the
    // network only for a tree that has one.
    let w = Workload::spawn_with(&["--pidns", "--netns"], &["--mem-mib", "16"]);
    let before = w.report();
    let src = plugin_dir(FAULTY);
    let mut args = vec!["-o", option];
    args.extend_from_slice(migrate_extra);
    let t = std::time::Instant::now();
    let (out, _) = migrate(src.path(), "faulty", w.pid, &serve.addr, &args);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(4), "rolled back");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expect),
        "the message says {expect:?}: {stderr}"
    );
    // Bounded by the 1 s deadline (plus the dump and the rollback), never
    // by the hook's hour.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_rolled_back(&w, &before, &serve);
}

#[test]
fn a_hung_net_lock_on_the_frozen_source_is_given_up_at_its_deadline() {
    // CRIU locks the network (and asks the driver) for TCP connections.
    hung_hook_rolls_back(
        "hang=net_lock@source",
        &[],
        &["--hook-timeout", "net_lock=1"],
        "faulty driver: net_lock did not return within 1s (hung)",
    );
}

#[test]
fn a_hung_restore_hook_on_the_destination_is_given_up_at_its_deadline() {
    hung_hook_rolls_back(
        "hang=restore@destination",
        &["--hook-timeout", "restore=1"],
        &[],
        "faulty driver: restore did not return within 1s (hung)",
    );
}

#[test]
fn a_hung_dump_hook_on_the_source_is_given_up_at_its_deadline() {
    hung_hook_rolls_back(
        "hang=dump@source",
        &[],
        &["--hook-timeout", "dump=1"],
        "faulty driver: dump did not return within 1s (hung)",
    );
}

#[test]
fn ctrl_c_during_a_hung_hook_rolls_back_at_once() {
    if !setup() {
        return;
    }
    let serve = Serve::start(FAULTY, &[]);
    let w = Workload::spawn_with(&["--pidns", "--netns"], &["--mem-mib", "16"]);
    let before = w.report();
    let src = plugin_dir(FAULTY);
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("hung");
    let work = phaul_tests::harness::shm_dir("src");
    let journal = tempfile::tempdir().unwrap();
    let child = Command::new(phaul_tests::bin("phaul"))
        .env("PHAUL_TEST_FAULTY_HUNG", &mark)
        .arg("--plugin-dir")
        .arg(src.path())
        .args(["migrate", "faulty", &w.pid.to_string(), "--to", &serve.addr])
        .arg("--tls-dir")
        .arg(&phaul_tests::pki::pki().src)
        .args([
            "-o",
            "hang=net_lock@source",
            "--tcp-established",
            "--work-dir",
        ])
        .arg(work.path())
        .arg("--journal-dir")
        .arg(journal.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || mark.exists()),
        "the hook hangs (the workload is frozen)"
    );
    let t = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "Ctrl-C does not wait for the hook's 10 s deadline"
    );
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("net_lock was abandoned on an interrupt"),
        "{stderr}"
    );
    assert_rolled_back(&w, &before, &serve);
}

#[test]
fn shared_storage_is_snapshotted_before_the_hand_over() {
    // The storage snapshot is taken while the workload is frozen; when it
    // fails, the migration rolls back before anything is restored.
    faulty_migration_rolls_back(
        &["shared-storage", "fail=storage_snapshot@source"],
        "16",
        "injected failure in storage_snapshot",
    );
}

#[test]
fn dropping_the_connection_after_the_final_dump_rolls_back() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let w = Workload::spawn(&["--mem-mib", "32"]);
    let before = w.report();
    // The first image file travels right after CRIU's final dump, while
    // the workload is frozen.
    let proxy = Proxy::start(&serve.addr, Fault::CutBefore("File"));
    let src = plugin_dir(PID);
    let (out, _) = migrate(src.path(), "pid", w.pid, &proxy.addr, &[]);
    assert!(proxy.triggered());
    assert_eq!(out.status.code(), Some(4));
    assert_rolled_back(&w, &before, &serve);
}

#[test]
fn a_malformed_frame_mid_migration_rolls_back_on_both_sides() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    // Garbage where the restore request should be, while the workload is
    // frozen.
    let proxy = Proxy::start(&serve.addr, Fault::GarbleAt("Restore"));
    let src = plugin_dir(PID);
    let (out, _) = migrate(src.path(), "pid", w.pid, &proxy.addr, &[]);
    assert!(proxy.triggered());
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("malformed frame"),
        "the destination's reason reaches the source: {stderr}"
    );
    assert_rolled_back(&w, &before, &serve);
}

#[test]
fn losing_the_connection_after_the_commit_is_resolved_by_asking_the_destination() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    // The destination gets the commit and resumes its copy, but its answer
    // never arrives: the source must find out on a new connection, then
    // drop its own copy. Exactly one copy may run afterwards.
    let proxy = Proxy::start(&serve.addr, Fault::CutAfter("Commit"));
    let src = plugin_dir(PID);
    let old = w.pid;
    let (out, _) = migrate(
        src.path(),
        "pid",
        old,
        &proxy.addr,
        &["--resolve-timeout", "20"],
    );
    assert!(proxy.triggered());
    assert_eq!(out.status.code(), Some(0), "resolved as migrated");
    assert!(String::from_utf8_lossy(&out.stderr).contains("asking the destination"));
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    let copies = w.restored_copies();
    assert_eq!(copies.len(), 1, "exactly one copy runs: {copies:?}");
    w.moved_to(copies[0]);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
}

/// A `phaul migrate` held by a proxy at the restore request: the
/// workload is frozen and waiting.
struct Held {
    proxy: Proxy,
    child: std::process::Child,
    _work: tempfile::TempDir,
}

impl Held {
    /// Presses Ctrl-C and returns the exit code.
    fn interrupt(mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let code = self.child.wait().unwrap().code();
        drop(self.proxy);
        code
    }
}

fn migrate_held_at_restore(serve: &Serve, pid: i32) -> Held {
    let proxy = Proxy::start(&serve.addr, Fault::StallAt("Restore"));
    let src = plugin_dir(PID);
    let work = phaul_tests::harness::shm_dir("src");
    let child = Command::new(phaul_tests::bin("phaul"))
        .arg("--plugin-dir")
        .arg(src.path())
        .args([
            "migrate",
            "pid",
            &pid.to_string(),
            "--to",
            &proxy.addr,
            "--work-dir",
        ])
        .arg(work.path())
        .arg("--tls-dir")
        .arg(&phaul_tests::pki::pki().src)
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || proxy.triggered()),
        "the migration reached its restore request"
    );
    Held {
        proxy,
        child,
        _work: work,
    }
}

#[test]
fn ctrl_c_on_the_source_while_frozen_rolls_back() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    // The workload is frozen and waiting when the user presses Ctrl-C.
    let held = migrate_held_at_restore(&serve, w.pid);
    assert_eq!(held.interrupt(), Some(4));
    assert_rolled_back(&w, &before, &serve);
}

#[test]
fn ctrl_c_after_the_commit_resolves_instead_of_rolling_back() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    // The destination resumed its copy, but its answer is held up; the user
    // presses Ctrl-C. The source must not resume (that would be two
    // copies): it asks the destination on a new connection instead.
    let proxy = Proxy::start(&serve.addr, Fault::StallAt("Resumed"));
    let src = plugin_dir(PID);
    let journal = tempfile::tempdir().unwrap();
    let mut m = phaul_tests::harness::Migration::start(
        src.path(),
        "pid",
        w.pid,
        &proxy.addr,
        journal.path(),
        &[],
        None,
    );
    assert!(wait_for(Duration::from_secs(30), || proxy.triggered()));
    // New connections get through; the stalled one stays stalled.
    proxy.heal();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(m.pid()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = m.wait_timeout(Duration::from_secs(30)).expect("it exits");
    assert_eq!(status.code(), Some(0), "resolved as migrated");
    let old = w.pid;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    let copies = w.restored_copies();
    assert_eq!(copies.len(), 1, "exactly one copy runs: {copies:?}");
    w.moved_to(copies[0]);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
}

#[test]
fn preflight_refusals_touch_nothing() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    // Pre-dumps cannot work on a kernel without soft-dirty tracking.
    let src = plugin_dir(FAULTY);
    let (out, json) = migrate(src.path(), "pid", w.pid, &serve.addr, &["--pre-dump"]);
    let probe = Command::new("/usr/local/sbin/criu")
        .args(["check", "--feature", "mem_dirty_track"])
        .output();
    let soft_dirty = probe.map(|o| o.status.success()).unwrap_or(false);
    if !soft_dirty {
        assert_eq!(out.status.code(), Some(3), "refused");
        assert_eq!(json.unwrap()["error"], "refused");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot track dirty memory"));
    }
    // The destination lacks the htype.
    let (out, _) = migrate(src.path(), "faulty", w.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no driver for htype `faulty`"), "{stderr}");
    // A destination that does not exist.
    let (out, _) = migrate(src.path(), "pid", w.pid, "127.0.0.1:1", &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to 127.0.0.1:1"));
    // A workload that does not exist.
    let (out, _) = migrate(src.path(), "pid", 999_999_999, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(3));
    assert_rolled_back(&w, &before, &serve);
    assert!(processes_with_cwd_under(serve.work.path()).is_empty());
}

#[test]
fn an_htype_the_destination_does_not_allow_is_refused() {
    if !setup() {
        return;
    }
    // Both drivers are loaded there, but only `faulty` is accepted.
    let serve = Serve::start(FAULTY, &["--allow-htype", "faulty"]);
    let w = Workload::spawn(&["--mem-mib", "16"]);
    assert_refused_in_preflight(
        &w,
        &serve,
        &[],
        &[
            "does not accept htype `pid`",
            "--allow-htype pid",
            "the destination refused (policy)",
        ],
    );
}

#[test]
fn a_tree_in_the_host_pid_namespace_is_refused_where_its_pids_are_taken() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    // No --pidns: CRIU would restore the same pids, which the source holds
    // on this one machine.
    let w = Workload::spawn_with(&[], &["--mem-mib", "16"]);
    assert_refused_in_preflight(
        &w,
        &serve,
        &[],
        &[
            &format!(
                "process id {} of the workload is in use on the destination",
                w.pid
            ),
            "own PID namespace",
        ],
    );
}

#[test]
fn a_listening_address_taken_on_the_destination_is_refused_before_the_freeze() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // Its own PID namespace, but the host's network: its listener is
    // re-bound on the destination, where (on this one machine) the source's
    // listener holds it.
    let w = Workload::spawn(&["--mem-mib", "16", "--tcp-listen", &listen]);
    assert_refused_in_preflight(
        &w,
        &serve,
        &[],
        &[&format!("TCP {listen} is in use on the destination")],
    );
}

#[test]
fn a_program_started_from_a_shell_is_refused_unless_it_moves_with_its_terminal() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    // A program a shell started: the shell leads its session and process
    // group, and is not in the tree rooted at the program. (Made explicitly
    // with setsid: the test's own session may be anything, even session 0
    // under a CI runner.)
    let mut child = Command::new("setsid")
        .args(["sh", "-c", "sleep 1000 & echo $!; wait"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    let src = plugin_dir(PID);
    let (out, json) = migrate(src.path(), "pid", pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(3));
    let j = json.unwrap();
    assert_eq!(
        (j["phase"].as_str(), j["side"].as_str()),
        (Some("preflight"), Some("source"))
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("session leader") && stderr.contains("-o shell-job"),
        "{stderr}"
    );
    assert!(alive(pid), "untouched");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn dry_run_checks_everything_and_moves_nothing() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    let src = plugin_dir(PID);
    // A migratable workload: every check passes, it keeps running here.
    let w = Workload::spawn(&["--mem-mib", "16", "--dirty-pct", "5"]);
    let before = w.report();
    let (out, json) = migrate(src.path(), "pid", w.pid, &serve.addr, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "a migration would be attempted");
    let r = json.expect("--json");
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["would_migrate"], true);
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
    assert!(checks
        .iter()
        .any(|c| c["check"].as_str().unwrap().starts_with("trial dump")));
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["pid"], 1, "the same process runs on");
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(w.restored_copies().is_empty(), "nothing was restored");
    assert!(wait_for(Duration::from_secs(5), || serve
        .criu_processes()
        .is_empty()));
    assert_eq!(
        std::fs::read_dir(serve.journal.path()).unwrap().count(),
        0,
        "the destination recorded no session"
    );
    // One that would fail: its process ids are taken there.
    let host = Workload::spawn_with(&[], &["--mem-mib", "16"]);
    let (out, json) = migrate(src.path(), "pid", host.pid, &serve.addr, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(3), "a migration would fail");
    let r = json.expect("--json");
    assert_eq!(r["would_migrate"], false);
    let failed: Vec<_> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["check"], "destination pre-flight");
    assert!(failed[0]["detail"].as_str().unwrap().contains(&format!(
        "process id {} of the workload is in use",
        host.pid
    )));
    w.assert_intact(&host.report());
}

#[test]
fn serve_needs_tls_and_keeps_insecure_tcp_on_loopback() {
    let serve = |args: &[&str]| {
        let out = Command::new(phaul_tests::bin("phaul"))
            .args(["serve", "--listen"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = serve(&["0.0.0.0:7070", "--insecure"]);
    assert!(
        e.contains("refusing to listen on 0.0.0.0:7070") && e.contains("loopback"),
        "{e}"
    );
    let e = serve(&["127.0.0.1:7070"]);
    assert!(e.contains("--tls-dir") && e.contains("--insecure"), "{e}");
    let e = serve(&["127.0.0.1:7070", "--insecure", "--allow-peer", "src"]);
    assert!(e.contains("--allow-peer needs TLS"), "{e}");
}

#[test]
fn the_service_runs_one_migration_at_a_time_and_survives_garbage() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    // Garbage: not a phaul peer, then a phaul peer with an oversized frame.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&serve.addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let mut s = std::net::TcpStream::connect(&serve.addr).unwrap();
        let mut bad = b"phaul\0".to_vec();
        bad.extend_from_slice(&phaul_core::proto::PROTOCOL_VERSION.to_le_bytes());
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&bad).unwrap();
        let _ = s.read_to_end(&mut buf);
    }
    // Hold one migration at its restore request (workload frozen) ...
    let first = Workload::spawn(&["--mem-mib", "8"]);
    let first_before = first.report();
    let held = migrate_held_at_restore(&serve, first.pid);
    let src = plugin_dir(PID);
    // ... and a second one is refused, touching nothing.
    let second = Workload::spawn(&["--mem-mib", "8"]);
    let (out, _) = migrate(src.path(), "pid", second.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("phaul:")
            && l.contains("as many migrations as it allows (1)")
            && !l.contains("session")),
        "refused without a word about the other session: {stderr}"
    );
    assert!(alive(second.pid));
    // Abort the held one; both workloads still run, and the service takes
    // the next migration.
    assert_eq!(held.interrupt(), Some(4));
    assert_rolled_back(&first, &first_before, &serve);
    let mut second = second;
    let (out, json) = migrate(src.path(), "pid", second.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(0), "the service is usable again");
    second.moved_to(json.unwrap()["destination_pid"].as_i64().unwrap() as i32);
    second.assert_intact(&second.report());
}

#[test]
fn a_destination_without_room_for_the_images_refuses() {
    if !setup() {
        return;
    }
    // A 4 MiB tmpfs as the destination's work root; the workload has 32 MiB.
    let small = phaul_tests::harness::shm_dir("small");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(small.path())
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(small.path().to_path_buf());
    let work = small.path().to_str().unwrap().to_string();
    let serve = Serve::start(PID, &["--work-dir", &work]);
    let w = Workload::spawn(&["--mem-mib", "32"]);
    let before = w.report();
    let src = plugin_dir(PID);
    let (out, _) = migrate(src.path(), "pid", w.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("disk space") && stderr.contains("MiB free"),
        "{stderr}"
    );
    assert_rolled_back(&w, &before, &serve);
}
