//! Userfaultfd pre-copy (`--pre-copy=uffd`) with real CRIU on a kernel
//! without soft-dirty bits: passes of written pages while the workload
//! runs, then a lazy final dump whose memory comes from the pages the
//! destination already holds, only the last dirty set crossing after the
//! switch. Every page verifies afterwards, and the source's workload is
//! left with no userfaultfd and no write-protect bit on any path
//! (success, rollback, either `phaul` killed).

use std::time::Duration;

use phaul_tests::harness::{
    alive, assert_destination_clean, migrate, reap, setup, userfaultfds, wait_for, Migration,
    Serve, Workload,
};
use phaul_tests::plugin_dir;
use phaul_tests::proxy::{Fault, Proxy};

const PID: &[(&str, &str)] = &[("phaul_pid", "libphaul_pid.so")];

/// Pages of `pid`'s private anonymous memory whose pagemap entry has the
/// userfaultfd write-protect bit (57), and pages examined.
fn wp_marked(pid: i32) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let pm = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let (mut marked, mut seen) = (0, 0);
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 || f[4] != "0" || !f[1].starts_with("rw") || f.len() > 6 {
            continue;
        }
        let (a, b) = f[0].split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; ((b - a) / 4096 * 8) as usize];
        if pm.read_exact_at(&mut buf, a / 4096 * 8).is_err() {
            continue;
        }
        for c in buf.chunks_exact(8) {
            seen += 1;
            if u64::from_ne_bytes(c.try_into().unwrap()) & (1 << 57) != 0 {
                marked += 1;
            }
        }
    }
    (marked, seen)
}

fn assert_untracked(pid: i32) {
    assert_eq!(userfaultfds(pid), 0, "the workload holds a userfaultfd");
    let (marked, seen) = wp_marked(pid);
    assert!(seen > 0);
    assert_eq!(marked, 0, "{marked} of {seen} pages still write-protected");
}

/// A live migration with uffd pre-copy of a workload dirtying `pct` % of
/// its pages per second, scattered: every page verifies, the pre-copy
/// passes carried the memory, only the last dirty set followed.
fn moves_with(pct: &str, how: &[&str]) -> serde_json::Value {
    let serve = Serve::start(PID, &[]);
    let mut w = Workload::spawn(&["--mem-mib", "256", "--dirty-pct", pct, "--dirty-scattered"]);
    let before = w.report();
    w.assert_intact(&before);
    let src = plugin_dir(PID);
    let old = w.pid;
    let (out, json) = migrate(src.path(), "pid", old, &serve.addr, how);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json.expect("--json summary");
    let passes = r["iterations"].as_array().unwrap();
    let uffd: Vec<_> = passes.iter().filter(|p| p["kind"] == "uffd").collect();
    assert!(!uffd.is_empty(), "{r}");
    // Pass 1 carried the arena (as data; the workload fills it).
    assert!(
        uffd[0]["pages_written"].as_u64().unwrap() >= 256 * 256,
        "{r}"
    );
    assert!(uffd[0]["uffd"]["scan_us"].as_u64().is_some(), "{r}");
    let last = passes.iter().find(|p| p["kind"] == "uffd-last").unwrap();
    // After the switch only the last dirty set (and memory CRIU's lazy
    // dump found that no pass had) crossed: far less than the arena.
    let pc = &r["post_copy"];
    let served = pc["pages_served"].as_u64().unwrap();
    assert!(
        served < 256 * 256 / 4,
        "served {served} pages after the switch: {r}"
    );
    assert!(
        served >= last["pages_written"].as_u64().unwrap().min(1),
        "{r}"
    );
    let new = r["destination_pid"].as_i64().unwrap() as i32;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(new);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(after["dirtied_total"].as_u64() > before["dirtied_total"].as_u64());
    assert_destination_clean(&serve);
    r
}

#[test]
fn uffd_pre_copy_moves_a_workload_dirtying_1_percent_per_second() {
    if !setup() {
        return;
    }
    moves_with("1", &["--pre-copy=uffd"]);
}

#[test]
fn uffd_pre_copy_moves_a_workload_dirtying_10_percent_per_second() {
    if !setup() {
        return;
    }
    // Chosen by auto: no soft-dirty here, and a single-shot dump would
    // not fit a 10 ms target.
    let r = moves_with("10", &["--post-copy=auto", "--downtime-target", "10"]);
    let why = r["post_copy"]["why"].as_str().unwrap();
    assert!(why.contains("above the 10 ms target"), "{why}");
    assert!(why.contains("userfaultfd pre-copy ran first"), "{why}");
}

#[test]
fn post_copy_auto_leaves_a_small_workload_to_a_single_shot_dump() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &["--once"]);
    let mut w = Workload::spawn(&["--mem-mib", "8"]);
    let src = plugin_dir(PID);
    let args = ["--post-copy=auto", "--downtime-target", "5000"];
    let (out, json) = migrate(src.path(), "pid", w.pid, &serve.addr, &args);
    assert_eq!(out.status.code(), Some(0));
    let r = json.unwrap();
    assert!(r["post_copy"].is_null(), "{r}");
    assert!(
        r["iterations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["kind"] == "dump"),
        "{r}"
    );
    let why = r["stop_reason"]["why"].as_str().unwrap();
    assert!(why.contains("single-shot dump fits"), "{why}");
    assert!(r["criu_dump"]["pages_written"].as_u64().unwrap() >= 8 * 256);
    w.moved_to(r["destination_pid"].as_i64().unwrap() as i32);
    w.assert_intact(&w.report());
}

/// How a pre-copy is broken before the switch.
#[derive(Debug, Clone, Copy)]
enum Break {
    /// The destination service dies in the middle of a pass.
    KillDestination,
    /// The source `phaul` is killed while its pass is stuck on a stalled
    /// network.
    KillSource,
}

/// Breaks a uffd pre-copy in pass 1 (after 64 MiB of a 256 MiB
/// workload): the source's workload runs on, intact, untracked.
fn broken_pre_copy(how: Break) {
    let mut serve = Serve::start(PID, &[]);
    let fault = match how {
        Break::KillDestination => Fault::KillAfterMemoryBytes {
            bytes: 64 << 20,
            pid: serve.pid(),
        },
        Break::KillSource => Fault::StallMemoryAfter(64 << 20),
    };
    let proxy = Proxy::start(&serve.addr, fault);
    let w = Workload::spawn(&["--mem-mib", "256", "--dirty-pct", "10"]);
    let before = w.report();
    w.assert_intact(&before);
    let src = plugin_dir(PID);
    let journal = tempfile::tempdir().unwrap();
    let mut m = Migration::start(
        src.path(),
        "pid",
        w.pid,
        &proxy.addr,
        journal.path(),
        &["--pre-copy=uffd"],
        None,
    );
    assert!(
        wait_for(Duration::from_secs(60), || proxy.triggered()),
        "the pre-copy never reached 64 MiB"
    );
    // While tracked, the workload itself holds no userfaultfd (CRIU could
    // not dump it otherwise).
    assert_eq!(userfaultfds(w.pid), 0);
    let status = match how {
        Break::KillDestination => m.wait_timeout(Duration::from_secs(60)),
        Break::KillSource => {
            m.kill();
            m.wait_timeout(Duration::from_secs(10))
        }
    };
    if let Break::KillDestination = how {
        // Nothing was frozen: the migration failed and rolled back.
        assert_eq!(status.and_then(|s| s.code()), Some(4), "{:?}", m.json());
        serve.kill();
    }
    assert!(alive(w.pid));
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert_untracked(w.pid);
}

#[test]
fn a_destination_dying_in_a_pre_copy_pass_leaves_the_source_running_untracked() {
    if !setup() {
        return;
    }
    broken_pre_copy(Break::KillDestination);
}

#[test]
fn a_source_phaul_killed_in_a_pre_copy_pass_leaves_the_workload_running_untracked() {
    if !setup() {
        return;
    }
    broken_pre_copy(Break::KillSource);
}

#[test]
fn a_failure_after_the_last_scan_rolls_back_and_leaves_the_workload_untracked() {
    if !setup() {
        return;
    }
    // The destination restores but its answer never arrives: the freeze
    // deadline rolls the migration back after the last scan.
    let serve = Serve::start(PID, &["--commit-timeout", "3"]);
    let proxy = Proxy::start(&serve.addr, Fault::StallAt("Restored"));
    let w = Workload::spawn(&["--mem-mib", "64", "--dirty-pct", "10"]);
    let before = w.report();
    let src = plugin_dir(PID);
    let journal = tempfile::tempdir().unwrap();
    let mut m = Migration::start(
        src.path(),
        "pid",
        w.pid,
        &proxy.addr,
        journal.path(),
        &["--pre-copy=uffd", "--freeze-timeout", "4"],
        None,
    );
    assert_eq!(
        m.wait_timeout(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(4),
        "rolled back: {:?}",
        m.json()
    );
    assert!(proxy.triggered(), "the restore was reached");
    assert!(alive(w.pid));
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert_untracked(w.pid);
}
