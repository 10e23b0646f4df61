//! Migrations that take their files along (`--sync DIR`), live and in
//! restart mode, between two "hosts" on one machine: the destination
//! service runs in its own mount namespace in which the synced path is a
//! bind mount of a different directory, so the same path names a different
//! tree on each side (what CRIU's restore and the restarted process see
//! there). The sync engine's own tests (every file kind, block deltas,
//! hostile senders) live with it in `core/src/fsync`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use phaul_tests::harness::{
    alive, assert_refused_in_preflight, migrate, reap, setup, shm_dir, wait_for, Serve, Workload,
};
use phaul_tests::plugin_dir;
use phaul_tests::trees::{assert_same, every_kind};

const PID: &[(&str, &str)] = &[("phaul_pid", "libphaul_pid.so")];
const FAULTY: &[(&str, &str)] = &[
    ("phaul_pid", "libphaul_pid.so"),
    ("phaul_test_faulty", "libfaulty.so"),
];

/// The synced directory (`data`) as the source sees it, and the directory
/// the destination sees at the same path (`backing`).
struct Hosts {
    _root: tempfile::TempDir,
    data: PathBuf,
    backing: PathBuf,
}

fn hosts() -> Hosts {
    let root = shm_dir("sync");
    let data = root.path().join("data");
    let backing = root.path().join("backing");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&backing).unwrap();
    Hosts {
        data,
        backing,
        _root: root,
    }
}

/// `phaul serve` in its own mount namespace where `data` shows `backing`,
/// allowed to sync into `data` only.
fn destination(h: &Hosts, plugins: &[(&str, &str)]) -> Serve {
    destination_allowing(h, plugins, &[&h.data])
}

/// Like [`destination`], with file syncs allowed into `allowed`.
fn destination_allowing(h: &Hosts, plugins: &[(&str, &str)], allowed: &[&Path]) -> Serve {
    let mut extra = Vec::new();
    for a in allowed {
        extra.push("--allow-sync-root");
        extra.push(a.to_str().unwrap());
    }
    let script = format!(
        "mount --bind '{}' '{}' && exec \"$0\" \"$@\"",
        h.backing.display(),
        h.data.display()
    );
    Serve::start_wrapped(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
        plugins,
        &extra,
    )
}

/// Both hosts, a tree of every kind in the synced directory, and the
/// destination service.
fn setup_hosts(plugins: &[(&str, &str)]) -> (Hosts, Serve) {
    let h = hosts();
    every_kind(&h.data.join("static"));
    let serve = destination(&h, plugins);
    (h, serve)
}

fn consecutive_lines(path: &Path) -> u64 {
    let log = std::fs::read_to_string(path).unwrap();
    for (i, l) in log.lines().enumerate() {
        assert_eq!(
            l.parse::<u64>().ok(),
            Some(i as u64 + 1),
            "{} breaks at line {}",
            path.display(),
            i + 1
        );
    }
    log.lines().count() as u64
}

#[test]
fn live_migration_takes_its_data_directory_along() {
    if !setup() {
        return;
    }
    let (h, serve) = setup_hosts(PID);
    let mut w = Workload::spawn_in(
        &h.data.join("state"),
        &["--pidns"],
        &["--mem-mib", "16", "--extras"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = w.report();
    let src = plugin_dir(PID);
    let old = w.pid;
    let data = h.data.to_str().unwrap();
    let (out, json) = migrate(src.path(), "pid", old, &serve.addr, &["--sync", data]);
    assert_eq!(out.status.code(), Some(0), "migration with --sync failed");
    let r = json.unwrap();
    let passes = r["fs_passes"].as_array().unwrap();
    assert!(passes.len() >= 2, "live passes and a final pass: {r}");
    assert_eq!(passes.last().unwrap()["final_pass"], true);
    assert!(
        passes[0]["bytes_sent"].as_u64().unwrap() >= 300_000,
        "the first pass copies everything"
    );
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));

    // The files arrived: identical, every kind of file.
    assert_same(&h.data.join("static"), &h.backing.join("static"));
    // The process arrived consistent with them: it runs on the
    // destination's copy of its state directory, and the log it kept
    // writing through the move (its open file and offset came along) is
    // one consecutive sequence with nothing lost or doubled at the freeze.
    w.moved_to(r["destination_pid"].as_i64().unwrap() as i32);
    w.status_dir = h.backing.join("state");
    std::thread::sleep(Duration::from_millis(300));
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(after["extras_log_lines"].as_u64() > before["extras_log_lines"].as_u64());
    let lines = consecutive_lines(&h.backing.join("state/extras.log"));
    assert!(lines >= after["extras_log_lines"].as_u64().unwrap());
    // The source's copy stopped where the freeze happened.
    let src_lines = consecutive_lines(&h.data.join("state/extras.log"));
    assert!(
        src_lines < lines,
        "the destination's log went on past the source's"
    );
}

/// The pid of a process running `phaul-workload run` on `state`, other
/// than `not`.
fn workload_on(state: &Path, not: i32) -> Option<i32> {
    let needle = state.to_string_lossy().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (pid != not && alive(pid) && cmd.contains(" run ") && cmd.contains(&needle)).then_some(pid)
    })
}

#[test]
fn restart_mode_stops_here_and_starts_there() {
    if !setup() {
        return;
    }
    // A root inside an allowed directory (not the directory itself).
    let h = hosts();
    every_kind(&h.data.join("static"));
    let parent = h.data.parent().unwrap().to_path_buf();
    let serve = destination_allowing(&h, PID, &[&parent]);
    let mut w = Workload::spawn_in(&h.data.join("state"), &[], &["--mem-mib", "8", "--extras"]);
    let src = plugin_dir(PID);
    let old = w.pid;
    let data = h.data.to_str().unwrap();
    let (out, json) = migrate(
        src.path(),
        "pid",
        old,
        &serve.addr,
        &["--mode", "restart", "--sync", data],
    );
    assert_eq!(out.status.code(), Some(0), "restart-mode migration failed");
    let r = json.unwrap();
    assert_eq!(r["mode"], "restart");
    assert!(r["criu_dump"].is_null(), "no CRIU in restart mode");
    let new = r["destination_pid"].as_i64().unwrap() as i32;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(new);
    assert_same(&h.data.join("static"), &h.backing.join("static"));
    // The same command runs on the destination, on the destination's files:
    // a restart (a new process whose counter starts again), not a live move.
    w.status_dir = h.backing.join("state");
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::read(h.backing.join("state/status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|s| s["pid"] == new)
    }));
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(
        after["extras_enabled"], true,
        "started with the recorded command line"
    );
    // The source's last status, synced in the final pass, says it exited.
    let last: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.data.join("state/status.json")).unwrap()).unwrap();
    assert_eq!(
        last["exiting"], true,
        "stopped with SIGTERM on the source: {last}"
    );
}

#[test]
fn restart_mode_starts_the_workload_again_on_the_source_when_the_destination_cannot() {
    if !setup() {
        return;
    }
    let h = hosts();
    let serve = destination(&h, FAULTY);
    let mut w = Workload::spawn_in(&h.data.join("state"), &[], &["--mem-mib", "8"]);
    let src = plugin_dir(FAULTY);
    let old = w.pid;
    let data = h.data.to_str().unwrap();
    let (out, _) = migrate(
        src.path(),
        "faulty",
        old,
        &serve.addr,
        &[
            "--mode",
            "restart",
            "--sync",
            data,
            "-o",
            "fail=start@destination",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "rolled back");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("injected failure in start"), "{stderr}");
    assert!(stderr.contains("started again on the source"), "{stderr}");
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    let again =
        workload_on(&h.data.join("state"), old).expect("the workload runs again on the source");
    w.moved_to(again);
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::read(h.data.join("state/status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|s| s["pid"] == again)
    }));
    w.assert_intact(&w.report());
    // Nothing runs on the destination.
    assert!(workload_on(&h.data.join("state"), again).is_none());
}

#[test]
fn restart_mode_with_no_start_leaves_the_workload_stopped_on_the_destination() {
    if !setup() {
        return;
    }
    let (h, serve) = setup_hosts(PID);
    let w = Workload::spawn_in(&h.data.join("state"), &[], &["--mem-mib", "8"]);
    let src = plugin_dir(PID);
    let old = w.pid;
    let data = h.data.to_str().unwrap();
    let (out, json) = migrate(
        src.path(),
        "pid",
        old,
        &serve.addr,
        &["--mode", "restart", "--sync", data, "--no-start"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json.unwrap()["destination_pid"], 0, "nothing was started");
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    assert_same(&h.data.join("static"), &h.backing.join("static"));
    assert!(
        workload_on(&h.data.join("state"), old).is_none(),
        "no copy runs anywhere"
    );
}

/// Nothing of `h.data` reached the destination (its `backing`).
fn nothing_arrived(h: &Hosts) {
    assert_eq!(
        std::fs::read_dir(&h.backing).unwrap().count(),
        0,
        "nothing was written on the destination"
    );
}

#[test]
fn a_sync_root_the_destination_does_not_allow_is_refused_before_anything_freezes() {
    if !setup() {
        return;
    }
    let h = hosts();
    every_kind(&h.data.join("static"));
    let data = h.data.to_str().unwrap();
    let w = Workload::spawn_in(&h.data.join("state"), &["--pidns"], &["--mem-mib", "8"]);
    // By default no file sync is allowed at all.
    let serve = destination_allowing(&h, PID, &[]);
    assert_refused_in_preflight(
        &w,
        &serve,
        &["--sync", data],
        &[
            "the destination refused (policy)",
            &format!("file sync into {data}"),
            "--allow-sync-root",
            "no --allow-sync-root was given",
        ],
    );
    nothing_arrived(&h);
    drop(serve);
    // Nor one outside the allowed directories.
    let other = shm_dir("sync-allowed");
    let serve = destination_allowing(&h, PID, &[other.path()]);
    assert_refused_in_preflight(
        &w,
        &serve,
        &["--sync", data],
        &[
            &format!("file sync into {data}"),
            &other.path().display().to_string(),
            "--allow-sync-root",
        ],
    );
    nothing_arrived(&h);
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0);
}

#[test]
fn dot_dot_and_symlinks_in_sync_roots_do_not_get_past_the_destination() {
    if !setup() {
        return;
    }
    let h = hosts();
    every_kind(&h.data.join("static"));
    let base = h.data.parent().unwrap().to_path_buf();
    let allowed = base.join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    // A symlink inside the allowed directory that leads to `data`.
    std::os::unix::fs::symlink(&h.data, allowed.join("link")).unwrap();
    let w = Workload::spawn_in(&h.data.join("state"), &["--pidns"], &["--mem-mib", "8"]);
    let serve = destination_allowing(&h, PID, &[&allowed]);
    let dotdot = format!("{}/../data", allowed.display());
    let link = format!("{}/link", allowed.display());
    for root in [&dotdot, &link] {
        assert_refused_in_preflight(
            &w,
            &serve,
            &["--sync", root],
            &[
                "the destination refused (policy)",
                &format!("file sync into {root} (resolved: {})", h.data.display()),
                "--allow-sync-root",
            ],
        );
        nothing_arrived(&h);
    }
    // The allowed directory itself got nothing either.
    let names: Vec<_> = std::fs::read_dir(&allowed)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("link")]);
}
