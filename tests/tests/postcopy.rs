//! Post-copy (`--post-copy`) with real CRIU and real userfaultfds: the
//! workload runs on the destination before its memory has arrived, every
//! page verifies afterwards, and when the page transfer breaks after the
//! switch (the network stalls, either `phaul` is killed, the connection is
//! reset) no copy ever runs with a page made up, at most one copy runs,
//! and the source's stopped copy brings the workload back whole once the
//! operator decides.

use std::process::Command;
use std::time::Duration;

use phaul_tests::harness::{
    alive, assert_destination_clean, migrate, reap, recover, recover_with, setup, task_state,
    userfaultfds, wait_for, workload_copies, Migration, Serve, Workload,
};
use phaul_tests::plugin_dir;
use phaul_tests::proxy::{Fault, Proxy};

const PID: &[(&str, &str)] = &[("phaul_pid", "libphaul_pid.so")];
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// Processes named like the destination's userfaultfd keeper.
fn keepers() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "phaul-uffd-keep")
                })
                // A keeper whose service died is reparented to the test
                // (the subreaper): once it ends, reap it.
                .filter(|&p| {
                    reap(p);
                    task_state(p).is_some_and(|s| s != 'Z')
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A post-copy migration of a fresh workload (scattered writes, 20 % per
/// second) through a fault proxy, started.
struct Moving {
    proxy: Proxy,
    w: Workload,
    before: serde_json::Value,
    src: tempfile::TempDir,
    started: u64,
    m: Migration,
}

impl Moving {
    fn start(
        serve: &Serve,
        fault: Fault,
        mem_mib: &str,
        journal: &std::path::Path,
        extra: &[&str],
        log: Option<&std::path::Path>,
    ) -> Moving {
        let proxy = Proxy::start(&serve.addr, fault);
        let w = Workload::spawn(&[
            "--mem-mib",
            mem_mib,
            "--dirty-pct",
            "20",
            "--dirty-scattered",
        ]);
        let before = w.report();
        w.assert_intact(&before);
        let src = plugin_dir(PID);
        let started = start_time(w.pid);
        let m = Migration::start(src.path(), "pid", w.pid, &proxy.addr, journal, extra, log);
        Moving {
            proxy,
            w,
            before,
            src,
            started,
            m,
        }
    }
}

/// The keepers a test started (those that were not there before it),
/// killed when the test ends whatever its outcome.
struct NewKeepers(Vec<i32>);

impl NewKeepers {
    fn since_now() -> NewKeepers {
        NewKeepers(keepers())
    }
    fn get(&self) -> Vec<i32> {
        keepers()
            .into_iter()
            .filter(|k| !self.0.contains(k))
            .collect()
    }
}

impl Drop for NewKeepers {
    fn drop(&mut self) {
        for k in self.get() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k),
                nix::sys::signal::Signal::SIGKILL,
            );
            reap(k);
        }
    }
}

/// A process's start time (clock ticks since boot).
fn start_time(pid: i32) -> u64 {
    phaul_core::proc::start_time(pid).unwrap_or(0)
}

/// The copies of `w`: the source's, and any workload process started since
/// `since` that is the init of its own PID namespace (a restored copy).
/// By name, not command line: reading a restored copy's command line can
/// touch memory that has not arrived.
fn copies_since(w: &Workload, since: u64) -> Vec<i32> {
    let mut out = workload_copies(&w.state);
    for p in std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let ns_init = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .is_some_and(|l| l.split_whitespace().last() == Some("1"));
        let zombie = task_state(p) == Some('Z');
        if comm.trim() == "phaul-workload"
            && ns_init
            && !zombie
            && start_time(p) >= since
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

#[test]
fn post_copy_runs_the_workload_there_before_its_memory_arrives() {
    if !setup() {
        return;
    }
    // phaul raises the pipe limit CRIU's lazy dump needs, and says so.
    std::fs::write(PIPE_MAX_SIZE, "1048576").unwrap();
    let keepers = NewKeepers::since_now();
    let serve = Serve::start(PID, &[]);
    // Scattered writes: the workload faults on pages far ahead of the
    // background push as soon as it runs on the destination.
    let mut w = Workload::spawn(&["--mem-mib", "256", "--dirty-pct", "20", "--dirty-scattered"]);
    let before = w.report();
    w.assert_intact(&before);
    let src = plugin_dir(PID);
    let old = w.pid;
    let (out, json) = migrate(
        src.path(),
        "pid",
        old,
        &serve.addr,
        &["--post-copy", "--pre-copy=none"],
    );
    assert_eq!(out.status.code(), Some(0), "migration failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("raised fs.pipe-max-size from 1048576 to 4194304"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(PIPE_MAX_SIZE).unwrap().trim(),
        "4194304"
    );
    let r = json.expect("--json summary");
    let pc = &r["post_copy"];
    assert_eq!(pc["why"], "--post-copy", "{r}");
    // Every page of the arena crossed after the switch, some of them
    // because a thread was waiting for it.
    assert!(pc["pages_served"].as_u64().unwrap() >= 256 * 256, "{pc}");
    assert!(pc["pages_on_demand"].as_u64().unwrap() > 0, "{pc}");
    assert!(pc["pages_background"].as_u64().unwrap() > 0, "{pc}");
    assert!(pc["time_to_last_page_us"].as_u64().unwrap() > 0, "{pc}");
    // The final dump left the arena behind: it did not cross while frozen.
    assert_eq!(r["iterations"][0]["bytes"], 0, "{r}");
    let new = r["destination_pid"].as_i64().unwrap() as i32;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(new);
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["pid"], 1);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(after["dirtied_total"].as_u64() > before["dirtied_total"].as_u64());
    // Nothing holds the copy's userfaultfds any more.
    assert!(keepers.get().is_empty(), "keeper left: {:?}", keepers.get());
    assert_destination_clean(&serve);
}

#[test]
fn post_copy_auto_picks_single_shot_for_a_small_workload_and_post_copy_for_a_large_one() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &["--once"]);
    let src = plugin_dir(PID);
    let mut small = Workload::spawn(&["--mem-mib", "8"]);
    let (out, json) = migrate(
        src.path(),
        "pid",
        small.pid,
        &serve.addr,
        &[
            "--post-copy=auto",
            "--pre-copy=none",
            "--downtime-target",
            "5000",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let r = json.unwrap();
    assert!(r["post_copy"].is_null(), "{r}");
    let why = r["post_copy_decision"].as_str().unwrap();
    assert!(why.contains("within the 5000 ms target"), "{why}");
    assert!(r["criu_dump"]["pages_written"].as_u64().unwrap() >= 8 * 256);
    small.moved_to(r["destination_pid"].as_i64().unwrap() as i32);
    small.assert_intact(&small.report());
    drop(serve);

    let serve = Serve::start(PID, &["--once"]);
    let mut large = Workload::spawn(&["--mem-mib", "128"]);
    let (out, json) = migrate(
        src.path(),
        "pid",
        large.pid,
        &serve.addr,
        &[
            "--post-copy=auto",
            "--pre-copy=none",
            "--downtime-target",
            "10",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let r = json.unwrap();
    let why = r["post_copy"]["why"].as_str().unwrap();
    assert!(why.contains("above the 10 ms target"), "{r}");
    assert!(r["post_copy"]["pages_served"].as_u64().unwrap() >= 128 * 256);
    large.moved_to(r["destination_pid"].as_i64().unwrap() as i32);
    large.assert_intact(&large.report());
}

/// What breaks the page transfer once the workload runs on the
/// destination (the memory connection stalls after 32 MiB of pages
/// first, so that the break happens at a known point).
#[derive(Debug, Clone, Copy)]
enum Break {
    /// Nothing more: the network stays stalled.
    Stall,
    /// The source `phaul` is killed.
    KillSource,
    /// The destination `phaul serve` is killed.
    KillDestination,
    /// The connections are reset.
    Reset,
}

fn broken_transfer(how: Break) {
    if !setup() {
        return;
    }
    let keepers = NewKeepers::since_now();
    let journal = tempfile::tempdir().unwrap();
    let dst_journal = tempfile::tempdir().unwrap();
    let mut serve =
        Serve::start_journaled(PID, dst_journal.path(), &["--post-copy-stall", "2"], None);
    let log = tempfile::NamedTempFile::new().unwrap();
    let Moving {
        proxy,
        mut w,
        before,
        src,
        started,
        mut m,
    } = Moving::start(
        &serve,
        Fault::StallMemoryAfter(32 << 20),
        "128",
        journal.path(),
        &["--post-copy", "--pre-copy=none", "--post-copy-stall", "2"],
        Some(log.path()),
    );
    assert!(
        wait_for(Duration::from_secs(60), || proxy.triggered()),
        "the transfer never reached the stall"
    );
    // The destination's copy runs (the switch happened before any page
    // crossed): its keeper holds its userfaultfds.
    assert!(
        wait_for(Duration::from_secs(10), || !keepers.get().is_empty()),
        "no userfaultfd keeper"
    );
    match how {
        Break::Stall => {}
        Break::KillSource => m.kill(),
        Break::KillDestination => serve.kill(),
        Break::Reset => proxy.cut(),
    }
    let status = m.wait_timeout(Duration::from_secs(60));
    let log_text = std::fs::read_to_string(log.path()).unwrap_or_default();
    if !matches!(how, Break::KillSource) {
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(5),
            "a broken post-copy transfer is undecided: {log_text}"
        );
        assert!(
            log_text.contains("post-copy page transfer broke"),
            "{log_text}"
        );
    }
    let copies = copies_since(&w, started);
    if matches!(how, Break::KillDestination) && copies == vec![w.pid] {
        // The destination's phaul died before its CRIU had finished the
        // restore (the background push starts at the switch): that CRIU
        // killed the copy, which never got past its restorer. The
        // destination's journal says so once a service reads it again;
        // the source's stopped copy is the workload and resumes.
        assert!(
            wait_for(Duration::from_secs(10), || task_state(w.pid) == Some('T')),
            "the source copy is stopped"
        );
        serve.restart();
        proxy.heal();
        let rec = recover(src.path(), journal.path(), 5);
        let s = &rec.json.as_ref().unwrap()["sessions"][0];
        assert_eq!(s["action"], "resumed-source", "{}", rec.summary());
        let after = w.report();
        w.assert_intact(&after);
        assert_eq!(copies_since(&w, started), vec![w.pid]);
        assert!(
            wait_for(Duration::from_secs(5), || keepers.get().is_empty()),
            "the keeper of a discarded copy is ended: {:?}",
            keepers.get()
        );
        return;
    }
    // Both copies exist; the source's is stopped, whole, and cannot run;
    // the destination's waits on the pages it lacks, its keeper holding
    // every userfaultfd (so none of them becomes a zero page).
    assert_eq!(copies.len(), 2, "two copies, one per side: {copies:?}");
    let dst = *copies.iter().find(|&&p| p != w.pid).unwrap();
    w.seen(dst);
    // Stopped ('T'), once the source's CRIU (if it was still finishing
    // the lazy dump) let go of it ('t').
    assert!(
        wait_for(Duration::from_secs(10), || task_state(w.pid) == Some('T')),
        "the source copy is stopped: {:?}",
        task_state(w.pid)
    );
    let keeper = keepers.get();
    assert_eq!(keeper.len(), 1, "one keeper: {keeper:?}");
    assert!(
        userfaultfds(keeper[0]) >= 1,
        "the keeper holds the userfaultfds"
    );
    // Still stopped a moment later: nothing resumes it behind our back.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(task_state(w.pid), Some('T'), "the source copy is stopped");
    // The destination's copy never shows a page made up: asked to verify
    // its memory, it either cannot finish (a missing page blocks it) or
    // finds every page right.
    let probe = Command::new(phaul_tests::bin("phaul-workload"))
        .args(["report", "--state-dir"])
        .arg(&w.state)
        .args(["--pid", &dst.to_string(), "--timeout-ms", "1500"])
        .output()
        .unwrap();
    if probe.status.success() {
        let r: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
        Workload::check_intact(&r).expect("a destination copy with wrong memory");
    }
    if matches!(how, Break::KillDestination) {
        // The destination's phaul is gone; its recover keeps the copy.
        let d = recover(src.path(), dst_journal.path(), 2);
        let s = &d.json.as_ref().unwrap()["sessions"][0];
        assert_eq!(s["action"], "left-alone", "{}", d.summary());
        assert!(alive(dst), "the destination's copy is kept");
        serve.restart();
    }
    // The network works again for new connections.
    proxy.heal();
    // `phaul recover` on the source resumes the transfer: the destination
    // takes the userfaultfds back from the keeper and asks for what its
    // copy still lacks.
    let rec = recover(src.path(), journal.path(), 5);
    let s = &rec.json.as_ref().unwrap()["sessions"][0];
    assert_eq!(s["action"], "resumed-transfer", "{}", rec.summary());
    assert!(wait_for(Duration::from_secs(10), || {
        reap(w.pid);
        !alive(w.pid)
    }));
    w.moved_to(dst);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert_eq!(copies_since(&w, started), vec![dst]);
    assert!(
        wait_for(Duration::from_secs(5), || keepers.get().is_empty()),
        "the keeper is gone once every page arrived: {:?}",
        keepers.get()
    );
    // Nothing is pending on either side.
    let again = recover(src.path(), journal.path(), 2);
    assert_eq!(
        again.json.as_ref().unwrap()["pending"],
        0,
        "{}",
        again.summary()
    );
    drop(proxy);
}

/// Before the switch a post-copy migration rolls back like any other: the
/// destination's CRIU is killed while its lazily restored copy is held
/// (the copy never ran; no keeper was started), and the source, which
/// never hears `Restored`, resumes at its freeze deadline.
#[test]
fn the_destination_criu_killed_before_the_switch_rolls_back() {
    if !setup() {
        return;
    }
    let keepers = NewKeepers::since_now();
    let journal = tempfile::tempdir().unwrap();
    let serve = Serve::start(PID, &["--commit-timeout", "3"]);
    let Moving {
        proxy,
        mut w,
        before,
        started,
        mut m,
        // Held: the migration loads its plugins from it.
        src: _plugins,
    } = Moving::start(
        &serve,
        Fault::StallAt("Restored"),
        "64",
        journal.path(),
        &["--post-copy", "--pre-copy=none", "--freeze-timeout", "4"],
        None,
    );
    assert!(wait_for(Duration::from_secs(30), || proxy.triggered()));
    let restorer = serve
        .criu_workers()
        .into_iter()
        .find(|c| c.name == "restore")
        .expect("the destination's restore worker");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(restorer.pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(
        m.wait_timeout(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(4),
        "rolled back"
    );
    for c in copies_since(&w, started) {
        w.seen(c);
    }
    assert!(
        wait_for(Duration::from_secs(15), || copies_since(&w, started)
            == vec![w.pid]),
        "only the source's copy is left: {:?}",
        copies_since(&w, started)
    );
    assert!(keepers.get().is_empty(), "a keeper before the switch");
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    drop(proxy);
}

/// The operator's other choice: give the destination's copy up and resume
/// the source at its freeze point.
#[test]
fn after_a_broken_transfer_the_operator_can_resume_the_source_instead() {
    if !setup() {
        return;
    }
    let keepers = NewKeepers::since_now();
    let journal = tempfile::tempdir().unwrap();
    let serve = Serve::start(PID, &["--post-copy-stall", "2"]);
    let Moving {
        proxy,
        mut w,
        before,
        src,
        started,
        mut m,
    } = Moving::start(
        &serve,
        Fault::StallMemoryAfter(16 << 20),
        "64",
        journal.path(),
        &["--post-copy", "--pre-copy=none", "--post-copy-stall", "2"],
        None,
    );
    assert_eq!(
        m.wait_timeout(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(5)
    );
    let copies = copies_since(&w, started);
    let dst = *copies
        .iter()
        .find(|&&p| p != w.pid)
        .expect("a destination copy");
    w.seen(dst);
    phaul_core::proc::signal_tree(dst, nix::sys::signal::Signal::SIGKILL);
    drop(keepers);
    assert!(wait_for(Duration::from_secs(10), || {
        reap(dst);
        !alive(dst)
    }));
    let pending = recover_with(src.path(), journal.path(), 2, &[]);
    let sid = pending.json.as_ref().unwrap()["sessions"][0]["session"]
        .as_str()
        .unwrap()
        .to_string();
    let rec = recover_with(src.path(), journal.path(), 2, &["--resume-source", &sid]);
    assert_eq!(
        rec.json.as_ref().unwrap()["sessions"][0]["action"],
        "resumed-source",
        "{}",
        rec.summary()
    );
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert_eq!(copies_since(&w, started), vec![w.pid]);
    drop(proxy);
}

#[test]
fn a_stalled_transfer_is_detected_and_leaves_one_whole_copy() {
    broken_transfer(Break::Stall);
}

#[test]
fn a_source_phaul_killed_during_the_transfer_leaves_one_whole_copy() {
    broken_transfer(Break::KillSource);
}

#[test]
fn a_destination_phaul_killed_during_the_transfer_leaves_one_whole_copy() {
    broken_transfer(Break::KillDestination);
}

#[test]
fn a_reset_connection_during_the_transfer_leaves_one_whole_copy() {
    broken_transfer(Break::Reset);
}
