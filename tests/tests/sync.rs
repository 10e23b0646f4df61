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
    destination_after(h, plugins, allowed, "")
}

/// Like [`destination_allowing`], running the shell commands `first` in
/// its mount namespace before it starts (e.g. to hide a mount).
fn destination_after(h: &Hosts, plugins: &[(&str, &str)], allowed: &[&Path], first: &str) -> Serve {
    let mut extra = Vec::new();
    for a in allowed {
        extra.push("--allow-sync-root");
        extra.push(a.to_str().unwrap());
    }
    Serve::start_with_own_mounts(
        &format!(
            "{first}mount --bind '{}' '{}'",
            h.backing.display(),
            h.data.display()
        ),
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

/// The identity the identity tests give their workload: real and effective
/// ids that differ (the saved ids become the effective ones at exec),
/// supplementary groups (sorted, as the kernel lists them), a umask and a
/// lowered open-files limit.
const UIDS: (u32, u32) = (65534, 65533);
const GIDS: (u32, u32) = (65534, 65532);
const GROUPS: [u32; 3] = [100, 4242, 65534];
const UMASK: u32 = 0o027;
const NOFILE: (u64, u64) = (512, 4096);

/// A cgroup file system mounted at its root: (v2, its options, where).
fn cgroup_mounts() -> Vec<(bool, Vec<String>, PathBuf)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let fstype = *right.first()?;
            if left.get(3) != Some(&"/") || (fstype != "cgroup" && fstype != "cgroup2") {
                return None;
            }
            Some((
                fstype == "cgroup2",
                right.get(2)?.split(',').map(str::to_string).collect(),
                PathBuf::from(left.get(4)?),
            ))
        })
        .collect()
}

/// A cgroup this test makes in every hierarchy this process is in (v1,
/// v2 or both), as a child of its own cgroup there; whatever is still in it
/// is killed, and it is removed, on drop.
struct TestCgroup {
    /// Each hierarchy's controllers (empty for v2), its mount point, and
    /// the cgroup's directory.
    dirs: Vec<(String, PathBuf, PathBuf)>,
}

impl TestCgroup {
    fn new(tag: &str) -> TestCgroup {
        let name = format!("phaul-test-{tag}-{}", std::process::id());
        let mounts = cgroup_mounts();
        let mut dirs = Vec::new();
        for line in std::fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
        {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
            let mount = mounts.iter().find(|(v2, opts, _)| {
                if controllers.is_empty() {
                    *v2
                } else {
                    !*v2 && controllers.split(',').all(|c| opts.iter().any(|o| o == c))
                }
            });
            let (_, _, point) = mount.unwrap_or_else(|| panic!("no mount for cgroup {line}"));
            let parent = point.join(path.trim_start_matches('/'));
            let dir = parent.join(&name);
            std::fs::create_dir(&dir).unwrap();
            if controllers.split(',').any(|c| c == "cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    std::fs::write(dir.join(f), std::fs::read(parent.join(f)).unwrap()).unwrap();
                }
            }
            dirs.push((controllers.to_string(), point.clone(), dir));
        }
        assert!(!dirs.is_empty(), "this process is in no cgroup");
        TestCgroup { dirs }
    }

    /// Each `cgroup.procs`, open for writing (a child writes "0" into them
    /// to join).
    fn procs(&self) -> Vec<std::fs::File> {
        self.dirs
            .iter()
            .map(|(_, _, d)| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .unwrap()
            })
            .collect()
    }

    fn members(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|(_, _, d)| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort();
        pids.dedup();
        pids
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in self.members() {
            // SAFETY: kill with a plain signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_for(Duration::from_secs(5), || {
            self.members().iter().for_each(|&p| reap(p));
            self.members().is_empty()
        });
        for (_, _, d) in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("cannot remove the test cgroup {}: {e}", d.display());
            }
        }
    }
}

/// Makes `cmd` start as the test identity in `cg` (cgroups joined through
/// `procs`, which must stay open until the command started).
fn as_test_identity(cmd: &mut std::process::Command, procs: &[std::fs::File]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let groups: Vec<libc::gid_t> = GROUPS.to_vec();
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure only makes system calls on data prepared here.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let limit = libc::rlimit {
                rlim_cur: NOFILE.0,
                rlim_max: NOFILE.1,
            };
            check(libc::setrlimit(libc::RLIMIT_NOFILE, &limit))?;
            libc::umask(UMASK);
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setresgid(GIDS.0, GIDS.1, GIDS.1))?;
            check(libc::setresuid(UIDS.0, UIDS.1, UIDS.1))
        });
    }
}

/// The value of a `/proc/PID/status` field, its words.
fn status_field(pid: i32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Checks that `pid` runs as the test identity in the cgroups `cgroup`
/// (the text of `/proc/PID/cgroup`).
fn check_identity(pid: i32, cgroup: &str) -> Result<(), String> {
    let words = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>();
    let want = [
        ("Uid", words(&[UIDS.0, UIDS.1, UIDS.1, UIDS.1])),
        ("Gid", words(&[GIDS.0, GIDS.1, GIDS.1, GIDS.1])),
        ("Groups", words(&GROUPS)),
        ("Umask", vec![format!("{UMASK:04o}")]),
    ];
    for (field, want) in want {
        let got = status_field(pid, field);
        if got != want {
            return Err(format!("process {pid}: {field} is {got:?}, not {want:?}"));
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let nofile: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .map(|v| v.split_whitespace().take(2).collect())
        .unwrap_or_default();
    if nofile != [NOFILE.0.to_string(), NOFILE.1.to_string()] {
        return Err(format!("process {pid}: open-files limit {nofile:?}"));
    }
    let got = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if got != cgroup {
        return Err(format!("process {pid}: cgroups\n{got}not\n{cgroup}"));
    }
    Ok(())
}

/// The children of `pid` (every thread's).
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(c.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

/// A workload of two children (its `--extras` child and one that ignores
/// SIGTERM and would outlive it), started as the test identity in `cg`, its
/// state directory in the synced directory (owned by its user there).
fn identity_workload(h: &Hosts, cg: &TestCgroup) -> Workload {
    use std::os::unix::fs::PermissionsExt;
    // The test's directories are private to root; the workload's user must
    // reach its state directory on either side.
    let root = h.data.parent().unwrap();
    for d in [root, &h.data, &h.backing] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let state = h.data.join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(UIDS.1), Some(GIDS.1)).unwrap();
    let procs = cg.procs();
    let w = Workload::spawn_configured(
        &state,
        &[],
        &["--mem-mib", "8", "--extras", "--linger-child"],
        |cmd| as_test_identity(cmd, &procs),
    );
    drop(procs);
    w
}

/// The text of `/proc/PID/cgroup` of a workload started in `cg`, checked
/// to differ from this process's (and so from the destination service's).
fn cgroup_of(pid: i32, cg: &TestCgroup) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let name = cg.dirs[0]
        .2
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        text.lines().filter(|l| l.ends_with(&name)).count(),
        cg.dirs.len(),
        "the workload is in the test's cgroup in every hierarchy: {text}"
    );
    assert_ne!(text, own);
    text
}

/// Waits until the copy of the workload whose status is in `state` runs as
/// `pid` with both its children, and returns them.
fn started_with_children(state: &Path, pid: i32) -> Vec<i32> {
    assert!(
        wait_for(Duration::from_secs(10), || {
            std::fs::read(state.join("status.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|s| s["pid"] == pid)
        }),
        "workload {pid} became ready on {}",
        state.display()
    );
    let kids = children(pid);
    assert_eq!(
        kids.len(),
        2,
        "its --extras and lingering children: {kids:?}"
    );
    kids
}

#[test]
fn restart_mode_starts_the_workload_as_what_it_was_and_stops_all_of_it() {
    if !setup() {
        return;
    }
    let cg = TestCgroup::new("restart-identity");
    let (h, serve) = setup_hosts(PID);
    let mut w = identity_workload(&h, &cg);
    let old = w.pid;
    let cgroup = cgroup_of(old, &cg);
    // The source tree is what the test made: root and two children, each
    // as the test identity.
    let tree = phaul_core::proc::tasks(old);
    assert_eq!(tree.len(), 3, "root, --extras child, lingering child");
    for t in &tree {
        check_identity(t.pid, &cgroup).unwrap();
    }
    let src = plugin_dir(PID);
    let data = h.data.to_str().unwrap();
    let (out, json) = migrate(
        src.path(),
        "pid",
        old,
        &serve.addr,
        &["--mode", "restart", "--sync", data, "-o", "stop-timeout=1"],
    );
    assert_eq!(out.status.code(), Some(0), "restart-mode migration failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The driver stopped the whole tree itself (the engine's check found
    // nothing to kill).
    assert!(
        !stderr.contains("the driver's stop left processes"),
        "{stderr}"
    );
    // Nothing of the tree is left on the source: not the root, not the
    // --extras child, not the child that ignored SIGTERM.
    assert!(
        wait_for(Duration::from_secs(5), || {
            tree.iter().for_each(|t| reap(t.pid));
            !phaul_core::proc::any_exists(&tree)
        }),
        "processes of the source tree remain: {:?}",
        tree.iter()
            .filter(|t| phaul_core::proc::task_state(t) != phaul_core::proc::TaskState::Gone)
            .collect::<Vec<_>>()
    );
    let new = json.unwrap()["destination_pid"].as_i64().unwrap() as i32;
    w.moved_to(new);
    w.status_dir = h.backing.join("state");
    // On the destination it runs as what it was, and started its children
    // again itself, which inherited all of it.
    let kids = started_with_children(&h.backing.join("state"), new);
    check_identity(new, &cgroup).unwrap();
    for k in &kids {
        check_identity(*k, &cgroup).unwrap();
    }
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["child_alive"], true, "{after}");
    assert!(
        kids.contains(&(after["child_pid"].as_i64().unwrap() as i32))
            && kids.contains(&(after["linger_pid"].as_i64().unwrap() as i32)),
        "the children are the ones it reports: {kids:?} {after}"
    );
}

#[test]
fn restart_mode_starts_the_workload_again_on_the_source_as_what_it_was_when_the_destination_cannot_join_its_cgroup(
) {
    if !setup() {
        return;
    }
    let cg = TestCgroup::new("restart-nocgroup");
    let h = hosts();
    every_kind(&h.data.join("static"));
    // The destination does not mount the first hierarchy the workload is in.
    let (controllers, point, _) = &cg.dirs[0];
    let serve = destination_after(
        &h,
        PID,
        &[&h.data],
        &format!("umount -l '{}' && ", point.display()),
    );
    let mut w = identity_workload(&h, &cg);
    let old = w.pid;
    let cgroup = cgroup_of(old, &cg);
    let tree = phaul_core::proc::tasks(old);
    assert_eq!(tree.len(), 3);
    let src = plugin_dir(PID);
    let data = h.data.to_str().unwrap();
    let (out, _) = migrate(
        src.path(),
        "pid",
        old,
        &serve.addr,
        &["--mode", "restart", "--sync", data, "-o", "stop-timeout=1"],
    );
    assert_eq!(out.status.code(), Some(4), "rolled back");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let hierarchy = if controllers.is_empty() {
        "v2"
    } else {
        controllers.as_str()
    };
    assert!(
        stderr.contains(&format!("cannot join cgroup {hierarchy}:")),
        "{stderr}"
    );
    assert!(stderr.contains("started again on the source"), "{stderr}");
    assert!(wait_for(Duration::from_secs(5), || {
        tree.iter().for_each(|t| reap(t.pid));
        !phaul_core::proc::any_exists(&tree)
    }));
    // One copy runs: the one started again on the source, on the source's
    // files, as what it was, with its children.
    let copies = phaul_tests::harness::workload_copies(&h.data.join("state"));
    assert_eq!(copies.len(), 1, "{copies:?}");
    let again = copies[0];
    assert_ne!(again, old);
    w.moved_to(again);
    let kids = started_with_children(&h.data.join("state"), again);
    check_identity(again, &cgroup).unwrap();
    for k in &kids {
        check_identity(*k, &cgroup).unwrap();
    }
    w.assert_intact(&w.report());
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
