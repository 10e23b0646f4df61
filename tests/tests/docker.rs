//! The docker htype with two real, stock Docker engines on one machine
//! (`tests/src/docker.rs`): a workload container moves from engine A to
//! engine B, which then manages it as a normally running container; a
//! missing image is refused before anything freezes (and sent along with
//! `-o send-image`); a restore whose CRIU dies on B leaves A's container
//! running as before and nothing on B; either phaul killed during the
//! restore leaves exactly one copy running; an established TCP connection
//! survives; restart mode carries the writable layer. Neither daemon is
//! ever restarted (their pids are checked).
//!
//! The destination `phaul serve` reaches engine B through `DOCKER_HOST`
//! (its own setting, never the source's), writes only under B's data root
//! (`--allow-sync-root`), and the source names engine A with `-o
//! socket=`. The workload container's init is `phaul-workload` (memory
//! verified page by page through the merged rootfs), with a shell counter
//! appending to a file it holds open in the writable layer.

use std::time::Duration;

use phaul_tests::docker::{
    build_test_image, copy_image, run_workload, run_workload_with, Container, Engine, Engines,
    BEFORE_TXT,
};
use phaul_tests::harness::{
    ip, migrate, recover, setup, tcp_client, wait_for, Migration, Serve, Workload,
};
use phaul_tests::plugin_dir;
use serde_json::Value;

const DOCKER: &[(&str, &str)] = &[("phaul_docker", "libphaul_docker.so")];

/// runc's CRIU configuration, which the driver changes only during its
/// restore.
const RUNC_CONF: &str = "/etc/criu/runc.conf";

/// runc's CRIU configuration as the host's own: what the file says, or,
/// where a phaul killed during its restore left its own there (the first
/// line names that phaul, whose pid is gone), the host's that the driver
/// saved and the next migration to this host puts back.
fn runc_conf() -> Option<String> {
    let text = std::fs::read_to_string(RUNC_CONF).ok();
    let left_by = text
        .as_deref()
        .and_then(|t| t.lines().next())
        .and_then(|l| l.strip_prefix("# phaul docker driver restore, by pid "))
        .and_then(|p| p.trim().parse::<i32>().ok());
    match left_by {
        Some(pid) => {
            assert!(
                !phaul_tests::harness::alive(pid),
                "{RUNC_CONF} is phaul {pid}'s, which still runs"
            );
            std::fs::read_to_string("/var/lib/phaul/docker-runc.conf.orig").ok()
        }
        None => text,
    }
}

/// `phaul serve` for engine `b`: its `DOCKER_HOST`, its data root allowed
/// for the sync.
fn serve_for(b: &Engine) -> Serve {
    let host = format!("DOCKER_HOST={}", b.host());
    let root = b.root.display().to_string();
    Serve::start_wrapped(&["env", &host], DOCKER, &["--allow-sync-root", &root])
}

/// `phaul migrate docker NAME` from engine `a`.
fn migrate_from(a: &Engine, name: &str, serve: &Serve, extra: &[&str]) -> (i32, Option<Value>) {
    let args = source_args(a, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let src = plugin_dir(DOCKER);
    let (out, json) = migrate(src.path(), "docker", name, &serve.addr, &args);
    (out.status.code().unwrap_or(-1), json)
}

/// The source's arguments for engine `a`, then `extra`.
fn source_args(a: &Engine, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["-o".to_string(), format!("socket={}", a.sock.display())];
    args.extend(extra.iter().map(|x| x.to_string()));
    args
}

/// A `phaul migrate docker NAME` from engine `a` under way, with the
/// plugin and journal directories `phaul recover` needs afterwards.
struct Moving {
    m: Migration,
    plugins: tempfile::TempDir,
    journal: tempfile::TempDir,
}

/// Starts `phaul migrate docker NAME` from engine `a` in the background.
fn start_from(a: &Engine, name: &str, serve: &Serve, extra: &[&str]) -> Moving {
    let journal = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(DOCKER);
    let args = source_args(a, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = Migration::start(
        plugins.path(),
        "docker",
        name,
        &serve.addr,
        journal.path(),
        &args,
        None,
    );
    Moving {
        m,
        plugins,
        journal,
    }
}

/// The containers engine `e` has, running or not.
fn containers(e: &Engine) -> Vec<String> {
    e.docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Nothing of a migration left on the destination engine's side: no
/// staging directory, runc's configuration as it was.
fn assert_no_leftovers(b: &Engine, runc_conf_before: &Option<String>) {
    let staging = b.root.join("phaul");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "staging left on B: {left:?}");
    let copies: Vec<_> = std::fs::read_dir(b.root.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ctrd-checkpoint")
        })
        .map(|e| e.path())
        .collect();
    assert!(
        copies.is_empty(),
        "containerd's checkpoint copies left: {copies:?}"
    );
    assert_eq!(&runc_conf(), runc_conf_before, "{RUNC_CONF} changed");
}

/// Two engines with the test image on A (and on B unless `only_a`).
fn engines(tag: &str, octets: (u8, u8), only_a: bool) -> Option<(Engines, String)> {
    if !setup() {
        return None;
    }
    let e = Engines::start(tag, octets.0, octets.1);
    let image = build_test_image(&e.a);
    if !only_a {
        copy_image(&e.a, &e.b, &image);
    }
    Some((e, image))
}

/// The host path of container `name`'s volume at `destination`.
fn volume_path(e: &Engine, name: &str, destination: &str) -> std::path::PathBuf {
    let i = e.inspect(name).expect("inspect");
    let m = i["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["Destination"] == destination)
        .unwrap_or_else(|| panic!("no mount at {destination}: {}", i["Mounts"]));
    assert_eq!(m["Type"], "volume");
    m["Source"].as_str().unwrap().into()
}

/// runc's `criu` processes on engine `b` (the restore's), with their
/// command lines: its RPC worker and, until it becomes the workload, the
/// restored tree's root (runc's child too; both `criu: restore --rpc`).
fn runc_criu_of(b: &Engine) -> Vec<(i32, String)> {
    let exec_root = b.exec_root().display().to_string();
    let cmdline = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default()
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "criu")
                && phaul_tests::harness::task_state(pid).is_some_and(|s| s != 'Z')
                && phaul_tests::harness::parent(pid).is_some_and(|pp| {
                    let cmd = cmdline(pp);
                    cmd.contains("runc") && cmd.contains(&exec_root)
                })
        })
        .map(|pid| (pid, cmdline(pid)))
        .collect()
}

#[test]
fn a_container_moves_live_between_two_engines_and_b_manages_it() {
    let Some((e, image)) = engines("mv", (71, 72), false) else {
        return;
    };
    let (pid_a, pid_b) = (e.a.dockerd_pid(), e.b.dockerd_pid());
    let runc_conf = runc_conf();
    let src = run_workload(&e.a, "web", &image, 32, &["-v", "webdata:/srv/webdata"]);
    // A file in its named volume (written on A's side of it).
    let vol_a = volume_path(&e.a, "web", "/srv/webdata");
    std::fs::write(vol_a.join("site.txt"), "in the volume\n").unwrap();
    // A file of the image removed in the container: a whiteout in its
    // writable layer, which must hide the image's file on B too.
    e.a.docker_ok(&["exec", "web", "/bin/busybox", "rm", "/bin/date"]);
    assert!(!src.merged.join("bin/date").exists());
    let mut w = src.workload();
    w.assert_intact(&w.report());
    let before = src.counter();
    let serve = serve_for(&e.b);
    let (code, json) = migrate_from(&e.a, "web", &serve, &[]);
    assert_eq!(code, 0, "migration failed: {json:?}");
    let json = json.expect("summary");

    // B runs it: the memory verifies page by page, its heartbeat went on,
    // the files of its writable layer are there and still written.
    let dst = Container::of(&e.b, "web").expect("web runs on B");
    assert_eq!(
        json["destination_pid"].as_i64(),
        Some(i64::from(dst.pid)),
        "{json}"
    );
    w.moved_to(dst.pid);
    let w = dst.workload();
    let r = w.report();
    w.assert_intact(&r);
    assert_eq!(r["pid"], 1, "the workload is still the container's init");
    assert_eq!(dst.before_txt(), BEFORE_TXT);
    let moved = dst.counter();
    assert!(
        moved > before,
        "the counter moved with it: {before} -> {moved}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || dst.counter() > moved + 5),
        "the counter runs on B, appending to the file it kept open"
    );

    assert!(
        dst.merged.join("bin/true").exists() && !dst.merged.join("bin/date").exists(),
        "the writable layer's whiteout came along"
    );
    // Its volume came along, as a volume of B's engine.
    let vol_b = volume_path(&e.b, "web", "/srv/webdata");
    assert!(vol_b.starts_with(&e.b.root), "{}", vol_b.display());
    assert_eq!(
        std::fs::read_to_string(vol_b.join("site.txt")).unwrap(),
        "in the volume\n"
    );
    // Docker on B sees a normally running container...
    let ps = e.b.docker_ok(&["ps", "--format", "{{.Names}} {{.Status}}"]);
    assert!(ps.contains("web Up"), "docker ps on B: {ps}");
    let i = e.b.inspect("web").unwrap();
    assert_eq!(i["State"]["Status"], "running");
    assert_eq!(i["Config"]["Image"], image.as_str());
    // ... which `docker stop` stops.
    e.b.docker_ok(&["stop", "-t", "1", "web"]);
    assert_eq!(e.b.inspect("web").unwrap()["State"]["Status"], "exited");
    assert!(!phaul_tests::harness::alive(dst.pid), "its init is gone");

    // `phaul htypes` lists docker with the engine it reaches, or says that
    // it reaches none.
    let htypes = |host: &str| {
        let plugins = plugin_dir(DOCKER);
        let out = std::process::Command::new(phaul_tests::bin("phaul"))
            .arg("--plugin-dir")
            .arg(plugins.path())
            .args(["htypes", "--json"])
            .env("DOCKER_HOST", host)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = htypes(&e.b.host());
    assert!(
        listed.contains("\"docker\"") && listed.contains("[engine ") && listed.contains("live"),
        "{listed}"
    );
    let listed = htypes("unix:///nonexistent/docker.sock");
    assert!(listed.contains("no engine reachable here"), "{listed}");

    // A's is gone, neither daemon was restarted, nothing was left behind.
    assert!(containers(&e.a).is_empty(), "A: {:?}", containers(&e.a));
    assert_eq!((e.a.dockerd_pid(), e.b.dockerd_pid()), (pid_a, pid_b));
    assert_no_leftovers(&e.b, &runc_conf);
}

#[test]
fn a_missing_image_is_refused_before_the_freeze_and_sent_with_send_image() {
    let Some((e, image)) = engines("img", (73, 74), true) else {
        return;
    };
    let runc_conf = runc_conf();
    let src = run_workload(&e.a, "app", &image, 16, &[]);
    let w = src.workload();
    let serve = serve_for(&e.b);
    let (code, json) = migrate_from(&e.a, "app", &serve, &[]);
    assert_eq!(code, 3, "refused in pre-flight: {json:?}");
    let msg = json.as_ref().map(|j| j.to_string()).unwrap_or_default();
    assert!(
        msg.contains("is not on this host's engine") && msg.contains("send-image"),
        "{msg}"
    );
    // Nothing was frozen: the same init, never stopped, verifies.
    let r = w.report();
    w.assert_intact(&r);
    assert_eq!(Container::of(&e.a, "app").unwrap().pid, src.pid);
    assert!(containers(&e.b).is_empty(), "B: {:?}", containers(&e.b));

    // Containers that cannot move are refused before anything freezes,
    // with the reason: a stopped one, one with a TTY, an unknown name.
    e.a.docker_ok(&["create", "--name", "off", &image, "/bin/sleep", "60"]);
    e.a.docker_ok(&[
        "run",
        "-d",
        "-t",
        "--name",
        "tty",
        &image,
        "/bin/sleep",
        "60",
    ]);
    for (name, want) in [
        (
            "off",
            "only a running container can be migrated (docker start off)",
        ),
        ("tty", "it has a TTY"),
        ("nosuch", "no container \"nosuch\""),
    ] {
        let (code, json) = migrate_from(&e.a, name, &serve, &[]);
        let msg = json
            .and_then(|j| j["message"].as_str().map(str::to_string))
            .unwrap_or_default();
        assert_eq!(code, 3, "{name}: {msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    }
    e.a.docker_ok(&["rm", "-f", "off", "tty"]);

    // With the image sent along, it moves.
    let (code, json) = migrate_from(&e.a, "app", &serve, &["-o", "send-image"]);
    assert_eq!(code, 0, "{json:?}");
    let dst = Container::of(&e.b, "app").expect("app runs on B");
    let mut w = w;
    w.moved_to(dst.pid);
    let w = dst.workload();
    w.assert_intact(&w.report());
    assert!(containers(&e.a).is_empty());
    assert_no_leftovers(&e.b, &runc_conf);
}

/// Which of runc's CRIU processes on B dies.
enum Dies {
    /// The first one seen, the moment it appears.
    First,
    /// Its RPC worker while the restored tree's root is still CRIU's
    /// (both are runc's children then): the root holds runc's socket open,
    /// and runc would wait for an answer forever.
    RpcWorkerMidRestore,
    /// Its RPC worker while the restored copy is held for the commit.
    RpcWorkerWhileHeld,
}

/// B's restore dies (a CRIU process SIGKILLed): the migration rolls back,
/// A's container runs as before, nothing is left on B.
fn restore_dies(tag: &str, octets: (u8, u8), dies: Dies) {
    let Some((e, image)) = engines(tag, octets, false) else {
        return;
    };
    let runc_conf = runc_conf();
    let src = run_workload(&e.a, "db", &image, 16, &[]);
    let w = src.workload();
    let serve = serve_for(&e.b);
    // The directories live as long as the migration.
    let Moving {
        mut m,
        plugins: _plugins,
        journal: _journal,
    } = start_from(&e.a, "db", &serve, &[]);
    let mut killed = None;
    assert!(
        wait_for(Duration::from_secs(60), || {
            let criu = runc_criu_of(&e.b);
            killed = match dies {
                Dies::First => criu.first().map(|c| c.0),
                // Held: the copy exists (as the workload, in B's cgroup);
                // the one `criu` left under runc is its RPC worker.
                // The worker forked the root: the lower pid.
                Dies::RpcWorkerMidRestore => (criu.len() >= 2)
                    .then(|| criu.iter().map(|c| c.0).min())
                    .flatten(),
                Dies::RpcWorkerWhileHeld => (!copies(&e.b).is_empty())
                    .then(|| criu.first().map(|c| c.0))
                    .flatten(),
            };
            killed.is_some() || m.try_wait().is_some()
        }),
        "no restore on B"
    );
    let criu = killed.expect("the migration ended before B's CRIU ran");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(criu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = m
        .wait_timeout(Duration::from_secs(60))
        .expect("migrate ends");
    assert_eq!(status.code(), Some(4), "rolled back: {:?}", m.json());
    // A's container runs as before: the same init, memory intact, and
    // Docker on A still sees it running.
    let r = w.report();
    w.assert_intact(&r);
    let again = Container::of(&e.a, "db").expect("db still runs on A");
    assert_eq!(again.pid, src.pid);
    let c = again.counter();
    assert!(wait_for(Duration::from_secs(5), || again.counter() > c + 5));
    // Nothing on B.
    assert!(containers(&e.b).is_empty(), "B: {:?}", containers(&e.b));
    assert!(
        wait_for(Duration::from_secs(10), || runc_criu_of(&e.b).is_empty()),
        "B's CRIU went away"
    );
    assert_no_leftovers(&e.b, &runc_conf);
}

#[test]
fn a_restore_that_dies_on_b_leaves_a_running_as_before_and_nothing_on_b() {
    restore_dies("fail", (75, 76), Dies::First);
}

#[test]
fn b_criu_dying_mid_restore_does_not_leave_runc_waiting_and_a_resumes() {
    restore_dies("fork", (87, 88), Dies::RpcWorkerMidRestore);
}

#[test]
fn b_criu_dying_while_the_copy_is_held_rolls_back_and_a_resumes() {
    restore_dies("held", (89, 90), Dies::RpcWorkerWhileHeld);
}

#[test]
fn restart_mode_carries_the_writable_layer_and_starts_it_on_b() {
    let Some((e, image)) = engines("rst", (77, 78), false) else {
        return;
    };
    let src = run_workload(&e.a, "job", &image, 8, &[]);
    let before = src.counter();
    assert!(before > 0);
    let w = src.workload();
    let serve = serve_for(&e.b);
    let (code, json) = migrate_from(&e.a, "job", &serve, &["--mode", "restart"]);
    assert_eq!(code, 0, "{json:?}");
    drop(w);
    // Started afresh on B, with A's files: the counter continues from the
    // last number A's wrote.
    let dst = Container::of(&e.b, "job").expect("job runs on B");
    assert!(
        wait_for(Duration::from_secs(10), || dst.counter() > before),
        "the counter continued from A's file"
    );
    let log = std::fs::read_to_string(dst.counter_file()).unwrap();
    let first: u64 = log.lines().next().unwrap().parse().unwrap();
    assert_eq!(first, 1, "the whole file came across, from its first line");
    assert!(containers(&e.a).is_empty(), "A's was stopped and removed");
    let w = dst.workload();
    w.assert_intact(&w.report());
}

#[test]
fn an_established_connection_to_the_container_survives_with_tcp_established() {
    let Some((e, image)) = engines("tcp", (79, 80), false) else {
        return;
    };
    // The container's network on both hosts: the same subnet and its same
    // address (a user-defined network with --ip), each engine's on a
    // bridge of its own. On one machine both bridges' routes exist; the
    // address moves to B's when A's bridge goes down after the move, as a
    // network fabric would move it.
    let bridges = ["pdk-tcpa-net", "pdk-tcpb-net"];
    for (engine, br) in [(&e.a, bridges[0]), (&e.b, bridges[1])] {
        engine.docker_ok(&[
            "network",
            "create",
            "--subnet",
            "10.207.0.0/24",
            "--gateway",
            "10.207.0.1",
            "-o",
            &format!("com.docker.network.bridge.name={br}"),
            "tcpnet",
        ]);
    }
    ip(&["link", "set", bridges[1], "up"]);
    let src = run_workload_with(
        &e.a,
        "srv",
        &image,
        16,
        &["--network", "tcpnet", "--ip", "10.207.0.10"],
        &["--tcp-listen", "0.0.0.0:7000"],
    );
    let w = src.workload();
    let dir = tempfile::tempdir().unwrap();
    let report_file = dir.path().join("client.json");
    let mut client = tcp_client("10.207.0.10:7000", 10_000, &report_file);
    assert!(
        wait_for(Duration::from_secs(10), || w.report()["tcp_requests"]
            .as_u64()
            .unwrap_or(0)
            > 50),
        "the client talks to the container before the migration"
    );
    let serve = serve_for(&e.b);
    let (code, json) = migrate_from(&e.a, "srv", &serve, &["--tcp-established", "--keep-source"]);
    assert_eq!(code, 0, "{json:?}");
    // --keep-source: A's container stays, exited.
    assert_eq!(
        e.a.inspect("srv").expect("A keeps srv")["State"]["Status"],
        "exited"
    );
    ip(&["link", "set", bridges[0], "down"]);
    let dst = Container::of(&e.b, "srv").expect("srv runs on B");
    let i = e.b.inspect("srv").unwrap();
    assert_eq!(
        i["NetworkSettings"]["Networks"]["tcpnet"]["IPAddress"], "10.207.0.10",
        "the same address on B"
    );
    let mut w = w;
    w.moved_to(dst.pid);
    let wb = dst.workload();
    let served = wb.report()["tcp_requests"].as_u64().unwrap_or(0);
    let status = client.wait().unwrap();
    let r: Value = serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    assert!(status.success(), "the client saw an error: {r}");
    assert_eq!(r["connection_broken"], false, "{r}");
    assert_eq!(r["wrong_answers"], 0, "{r}");
    assert!(r["ok"].as_u64().unwrap() > 100, "{r}");
    let after = wb.report();
    wb.assert_intact(&after);
    assert!(
        after["tcp_requests"].as_u64().unwrap_or(0) > served,
        "B's copy kept answering on the same connection: {served} -> {after}"
    );
}

/// The test workload's processes in engine `e`'s containers (its cgroup
/// parent), with their state letters.
fn copies(e: &Engine) -> Vec<(i32, char)> {
    let cgroup = format!("/phaul-docker-{}/", e.name);
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|d| d.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "phaul-workload")
                && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .is_ok_and(|c| c.contains(&cgroup))
        })
        .filter_map(|pid| Some((pid, phaul_tests::harness::task_state(pid)?)))
        .collect()
}

/// Kills the source's or the destination's phaul once B holds a restored
/// copy, lets `phaul recover` settle what the journal left pending (the
/// destination service restarted if it was killed), and checks that
/// exactly one copy exists and runs, with its memory intact, and that
/// Docker runs the container on that side only.
fn kill_during_the_restore(tag: &str, octets: (u8, u8), kill_destination: bool, running: bool) {
    let Some((e, image)) = engines(tag, octets, false) else {
        return;
    };
    let runc_conf_before = runc_conf();
    let src = run_workload(&e.a, "kv", &image, 16, &[]);
    let w = src.workload();
    let mut serve = serve_for(&e.b);
    // A source that lost the destination after the commit asks it again
    // only so long, then leaves the decision to `phaul recover`.
    let Moving {
        mut m,
        plugins,
        journal,
    } = start_from(&e.a, "kv", &serve, &["--resolve-timeout", "3"]);
    // B has a copy: held for the commit (the moment varies: it may have
    // been released already), or with `running`, released and running
    // under B's engine (its start returned after the commit).
    assert!(
        wait_for(Duration::from_secs(60), || if running {
            Container::of(&e.b, "kv").is_some()
        } else {
            !copies(&e.b).is_empty()
        }),
        "B never restored a copy"
    );
    if kill_destination {
        serve.kill();
        let status = m.wait_timeout(Duration::from_secs(60));
        assert!(
            matches!(status.and_then(|s| s.code()), Some(4) | Some(5)),
            "never reported as migrated: {status:?}"
        );
        serve.restart();
    } else {
        m.kill();
    }
    let r = recover(plugins.path(), journal.path(), 10);
    assert_eq!(r.code, Some(0), "recover: {}", r.stderr);
    let one = || {
        let (a, b) = (copies(&e.a), copies(&e.b));
        match (a.as_slice(), b.as_slice()) {
            ([(pid, 'S' | 'R')], []) => Some(("A", *pid)),
            ([], [(pid, 'S' | 'R')]) => Some(("B", *pid)),
            _ => None,
        }
    };
    assert!(
        wait_for(Duration::from_secs(30), || one().is_some()),
        "exactly one copy, running: A {:?}, B {:?}",
        copies(&e.a),
        copies(&e.b)
    );
    let (on, pid) = one().unwrap();
    let (here, there) = if on == "A" {
        (&e.a, &e.b)
    } else {
        (&e.b, &e.a)
    };
    let ct = Container::of(here, "kv").expect("Docker runs it where it runs");
    assert_eq!(ct.pid, pid);
    assert!(
        Container::of(there, "kv").is_none(),
        "and Docker runs no copy on the other side"
    );
    if on == "A" {
        assert_eq!(pid, src.pid, "A's container as it was");
        w.assert_intact(&w.report());
    } else {
        let survivor = Workload::attach(pid, &ct.state_dir());
        survivor.assert_intact(&survivor.report());
    }
    // runc's configuration is the host's, or (a killed destination's)
    // phaul's left by a dead pid, which puts the host's back next time.
    assert_eq!(runc_conf(), runc_conf_before);
    eprintln!(
        "after killing the {} phaul: the copy on {on} runs",
        if kill_destination {
            "destination"
        } else {
            "source"
        }
    );
}

#[test]
fn killing_the_destination_phaul_while_b_holds_a_copy_leaves_exactly_one_running() {
    kill_during_the_restore("kd", (81, 82), true, false);
}

#[test]
fn killing_the_destination_phaul_once_b_runs_the_copy_leaves_exactly_one_running() {
    kill_during_the_restore("kr", (85, 86), true, true);
}

#[test]
fn killing_the_source_phaul_while_b_holds_a_copy_leaves_exactly_one_running() {
    kill_during_the_restore("ks", (83, 84), false, false);
}
