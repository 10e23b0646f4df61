//! The docker htype's test plumbing on its own (no phaul involved): two
//! engines of `scripts/docker-engines.sh` start, the test image is built
//! in one and copied to the other, a workload container runs and its
//! memory verifies page by page from the host, and dropping the engines
//! leaves no process and no mount of theirs behind.

use std::time::Duration;

use phaul_tests::docker::{
    build_test_image, copy_image, have_docker, run_workload, Engines, BEFORE_TXT,
};
use phaul_tests::harness::{alive, setup, wait_for};

#[test]
fn two_engines_start_run_and_stop() {
    if !setup() || !have_docker() {
        return;
    }
    let engines = Engines::start("eng", 61, 62);
    let (a, b) = (engines.a.clone(), engines.b.clone());
    for e in [&a, &b] {
        assert!(alive(e.dockerd_pid()), "dockerd {} runs", e.name);
        let info = e.docker_ok(&["info", "--format", "{{.DockerRootDir}} {{.Driver}}"]);
        assert_eq!(info, format!("{} overlay2", e.root.display()));
    }
    assert_ne!(a.dockerd_pid(), b.dockerd_pid());

    let image = build_test_image(&a);
    copy_image(&a, &b, &image);
    let id = |e: &phaul_tests::docker::Engine| e.inspect(&image).expect("the image")["Id"].clone();
    assert_eq!(id(&a), id(&b), "the copy keeps the image ID");

    let c = run_workload(&a, "wl", &image, 16, &[]);
    assert_eq!(
        a.inspect("wl").unwrap()["State"]["Pid"],
        c.pid,
        "the workload is the container's init"
    );
    let w = c.workload();
    let r = w.report();
    w.assert_intact(&r);
    assert_eq!(r["pid"], 1, "pid 1 of the container's PID namespace");
    assert_eq!(r["mem_mib"], 16);
    assert_eq!(c.before_txt(), BEFORE_TXT);
    // The counter loop runs as the workload's child, its file open.
    let n = c.counter();
    assert!(
        wait_for(Duration::from_secs(5), || c.counter() > n + 5),
        "the counter moves"
    );
    let children = phaul_core::proc::tree(c.pid);
    assert!(
        children.len() > 1,
        "the counter loop is a child: {children:?}"
    );
    assert!(
        children.iter().any(|p| {
            std::fs::read_link(format!("/proc/{p}/fd/3"))
                .is_ok_and(|l| l.ends_with("data/open.log"))
        }),
        "a process of the container holds /data/open.log open"
    );
    assert!(!a.mounts().is_empty() && !a.processes().is_empty());

    drop(w);
    drop(engines);
    for e in [&a, &b] {
        assert!(
            wait_for(Duration::from_secs(5), || e.processes().is_empty()),
            "processes of engine {} left: {:?}",
            e.name,
            e.processes()
        );
        assert!(e.mounts().is_empty(), "mounts left: {:?}", e.mounts());
        assert!(!e.root.exists() && !e.sock.exists());
        let bridge = format!("pdk-{}", e.name);
        assert!(
            !std::path::Path::new("/sys/class/net")
                .join(&bridge)
                .exists(),
            "bridge {bridge} left"
        );
    }
    assert!(!alive(c.pid), "the container's workload is gone");
}
