//! Drivers that dump and restore through their own tooling (as container
//! drivers do, their engine running CRIU): the `faulty` test driver with
//! `PHAUL_TEST_FAULTY_OWN_CRIU=1` runs the `criu` command line itself, with
//! the action script the engine hands it, and the engine still holds the
//! frozen tree and the restored copy for the commit. Real CRIU, verified
//! memory, and a rollback on each side. (Its own test binary: the
//! environment variable must not reach other tests.)

use std::time::Duration;

use phaul_tests::harness::{alive, migrate, reap, setup, wait_for, Serve, Workload};
use phaul_tests::plugin_dir;
use phaul_tests::proxy::{Fault, Proxy};

const FAULTY: &[(&str, &str)] = &[
    ("phaul_pid", "libphaul_pid.so"),
    ("phaul_test_faulty", "libfaulty.so"),
];

fn own_criu() -> bool {
    if !setup() {
        return false;
    }
    // SAFETY: set before any thread of this test binary reads it.
    unsafe { std::env::set_var("PHAUL_TEST_FAULTY_OWN_CRIU", "1") };
    true
}

#[test]
fn a_driver_that_runs_criu_itself_is_held_for_the_commit() {
    if !own_criu() {
        return;
    }
    let serve = Serve::start(FAULTY, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "16", "--dirty-pct", "5"]);
    let before = w.report();
    let src = plugin_dir(FAULTY);
    let (out, json) = migrate(src.path(), "faulty", w.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(0), "migrated");
    let old = w.pid;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    let new = json.unwrap()["destination_pid"].as_i64().unwrap() as i32;
    let copies = w.restored_copies();
    assert_eq!(
        copies,
        vec![new],
        "exactly one copy runs, the one the driver restored"
    );
    w.moved_to(new);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
}

#[test]
fn a_failure_while_the_drivers_criu_holds_the_tree_resumes_it() {
    if !own_criu() {
        return;
    }
    let serve = Serve::start(FAULTY, &[]);
    let w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    let src = plugin_dir(FAULTY);
    let (out, _) = migrate(
        src.path(),
        "faulty",
        w.pid,
        &serve.addr,
        &["-o", "fail=meta_files_out@source"],
    );
    assert_eq!(out.status.code(), Some(4), "rolled back");
    assert!(alive(w.pid));
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["pid"], 1, "the same process runs on");
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(w.restored_copies().is_empty());
}

#[test]
fn a_copy_the_driver_restored_never_runs_without_the_commit() {
    if !own_criu() {
        return;
    }
    let serve = Serve::start(FAULTY, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    // The destination's copy is restored and held; the commit never
    // arrives: it must be discarded, and the source (asking on a new
    // connection) resumes.
    let proxy = Proxy::start(&serve.addr, Fault::CutBefore("Commit"));
    let src = plugin_dir(FAULTY);
    let (out, _) = migrate(
        src.path(),
        "faulty",
        w.pid,
        &proxy.addr,
        &["--resolve-timeout", "20"],
    );
    assert!(proxy.triggered());
    assert_eq!(out.status.code(), Some(4), "resolved as rolled back");
    assert!(wait_for(Duration::from_secs(10), || w
        .restored_copies()
        .is_empty()));
    assert!(alive(w.pid));
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    w.moved_to(w.pid);
}
