//! The driver contract as the engine keeps it: a test driver (`faulty
//! -o record=FILE`) records every hook call of real migrations with its
//! side and whether the source workload was frozen at that moment, and
//! each test asserts the recorded order against the lifecycle documented
//! in `plugin-api/src/driver.rs` — live mode, rollback, shared storage and
//! restart mode — so the documentation and the engine cannot drift apart.

use std::path::Path;

use phaul_tests::harness::{migrate, reap, setup, Serve, Workload};
use phaul_tests::plugin_dir;

const FAULTY: &[(&str, &str)] = &[
    ("phaul_pid", "libphaul_pid.so"),
    ("phaul_test_faulty", "libfaulty.so"),
];

/// The recorded calls of one side, as `hook frozen` strings.
fn calls(record: &Path, side: &str) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{side} ")).map(str::to_string))
        .collect()
}

/// Migrates a small workload with the recording driver and `options`;
/// returns the exit code and each side's calls.
fn record(options: &[&str], extra: &[&str]) -> Option<(i32, Vec<String>, Vec<String>)> {
    if !setup() {
        return None;
    }
    let serve = Serve::start(FAULTY, &[]);
    let w = Workload::spawn(&["--mem-mib", "8"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calls");
    let rec = format!("record={}", file.display());
    let mut args = vec!["-o", rec.as_str()];
    for o in options {
        args.extend(["-o", o]);
    }
    args.extend_from_slice(extra);
    let src = plugin_dir(FAULTY);
    let (out, json) = migrate(src.path(), "faulty", w.pid, &serve.addr, &args);
    if let Some(pid) = json
        .as_ref()
        .and_then(|j| j["destination_pid"].as_i64())
        .filter(|p| *p > 0)
    {
        phaul_core::proc::signal_tree(pid as i32, nix::sys::signal::Signal::SIGKILL);
        reap(pid as i32);
    }
    drop(serve);
    Some((
        out.status.code().unwrap_or(-1),
        calls(&file, "source"),
        calls(&file, "destination"),
    ))
}

fn expect(side: &str, got: &[String], want: &[&str]) {
    let got: Vec<&str> = got.iter().map(String::as_str).collect();
    eprintln!("{side}: {got:?}");
    assert_eq!(
        got, want,
        "the {side}'s hook calls, in order, with the source frozen or not"
    );
}

#[test]
fn live_mode_calls_the_hooks_in_the_documented_order() {
    let Some((code, src, dst)) = record(&[], &[]) else {
        return;
    };
    assert_eq!(code, 0);
    expect(
        "source",
        &src,
        &[
            "init running",
            "root_task_pid running",
            "fs_sync running",
            "describe running",
            "adjust_dump_opts running",
            "adjust_dump_opts running",
            "dump running",
            "meta_files_out frozen",
            "umount running",
            "migration_complete running",
        ],
    );
    // `umount` and `migration_complete` run once the source tree is gone
    // (its pid no longer names a stopped task: "running").
    expect(
        "destination",
        &dst,
        &[
            "init -",
            "fs_sync -",
            "mount -",
            "meta_files_in -",
            "adjust_restore_opts -",
            "restore -",
            "restored -",
            "migration_complete -",
        ],
    );
}

#[test]
fn a_rollback_calls_migration_fail_on_both_sides() {
    let Some((code, src, dst)) = record(&["fail=restore@destination"], &[]) else {
        return;
    };
    assert_eq!(code, 4);
    expect(
        "source",
        &src,
        &[
            "init running",
            "root_task_pid running",
            "fs_sync running",
            "describe running",
            "adjust_dump_opts running",
            "adjust_dump_opts running",
            "dump running",
            "meta_files_out frozen",
            "migration_fail running",
        ],
    );
    expect(
        "destination",
        &dst,
        &[
            "init -",
            "fs_sync -",
            "mount -",
            "meta_files_in -",
            "adjust_restore_opts -",
            "restore -",
            "umount -",
            "migration_fail -",
        ],
    );
}

#[test]
fn shared_storage_is_snapshotted_while_frozen_and_committed_after() {
    let Some((code, src, _)) = record(&["shared-storage"], &[]) else {
        return;
    };
    assert_eq!(code, 0);
    expect(
        "source",
        &src,
        &[
            "init running",
            "root_task_pid running",
            "fs_sync running",
            "describe running",
            "adjust_dump_opts running",
            "adjust_dump_opts running",
            "dump running",
            "storage_snapshot frozen",
            "meta_files_out frozen",
            "umount running",
            "storage_commit running",
            "migration_complete running",
        ],
    );
}

#[test]
fn restart_mode_stops_here_and_starts_there() {
    let Some((code, src, dst)) = record(&[], &["--mode", "restart"]) else {
        return;
    };
    assert_eq!(code, 0);
    expect(
        "source",
        &src,
        &[
            "init running",
            "root_task_pid running",
            "fs_sync running",
            "describe running",
            "net_lock running",
            "stop running",
            "meta_files_out running",
            "migration_complete running",
        ],
    );
    expect(
        "destination",
        &dst,
        &[
            "init -",
            "fs_sync -",
            "mount -",
            "meta_files_in -",
            "start -",
            "migration_complete -",
        ],
    );
}
