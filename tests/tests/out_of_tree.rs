//! phaul-plugin-api as a driver author meets it: the crate builds and
//! packages on its own outside the workspace, and the example driver in
//! `examples/hello-driver` (its own package, depending on the API alone)
//! builds, loads, is listed by `phaul htypes`, and migrates a real workload
//! live with CRIU (that test runs in the serialised `criu` group).

use std::process::Command;
use std::time::Duration;

use phaul_core::plugins::{EngineHost, Registry};
use phaul_plugin_api::{InitContext, Mode, Side};
use phaul_tests::harness::{alive, htypes_json, migrate, reap, setup, wait_for, Serve, Workload};
use phaul_tests::out_of_tree::{cargo, hello_driver, hello_driver_dir, run_cargo, workspace_root};
use phaul_tests::plugin_dir_of;

/// Copies `from` into `to`, recursively.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn plugin_api_packages_and_builds_on_its_own_outside_the_workspace() {
    // Outside any workspace: a temporary directory, no Cargo.toml above it.
    let tmp = tempfile::Builder::new()
        .prefix("phaul-plugin-api-copy-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let api = workspace_root().join("plugin-api");
    for item in ["Cargo.toml", "README.md", "src"] {
        let from = api.join(item);
        if from.is_dir() {
            copy_tree(&from, &tmp.path().join(item));
        } else {
            std::fs::copy(&from, tmp.path().join(item)).unwrap();
        }
    }
    let manifest = std::fs::read_to_string(tmp.path().join("Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("workspace = true") && !manifest.contains(".workspace"),
        "plugin-api/Cargo.toml inherits from the workspace:\n{manifest}"
    );
    // `cargo package` checks the metadata crates.io needs, then builds the
    // packaged sources as a user of the crate would get them.
    let mut cmd = cargo(&["package"]);
    cmd.current_dir(tmp.path());
    let out = run_cargo(cmd, "cargo package in a copy of plugin-api");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Verifying phaul-plugin-api"),
        "the package was built: {stderr}"
    );
    assert!(
        !stderr.contains("warning"),
        "packaging plugin-api warns (missing metadata?):\n{stderr}"
    );
}

#[test]
fn hello_driver_builds_alone_loads_and_is_listed() {
    // Its own package: an empty [workspace] table, phaul-plugin-api by path
    // and nothing else (abi_stable comes re-exported).
    let manifest = std::fs::read_to_string(hello_driver_dir().join("Cargo.toml")).unwrap();
    assert!(
        manifest.lines().any(|l| l.trim() == "[workspace]"),
        "{manifest}"
    );
    let deps: Vec<&str> = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect();
    assert_eq!(
        deps,
        ["phaul-plugin-api = { path = \"../../plugin-api\" }"],
        "the example depends on the API alone"
    );

    let lib = hello_driver();
    let dir = plugin_dir_of(&[(&lib, "libphaul_hello.so")]);
    let v = htypes_json(dir.path(), None);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 0, "{v}");
    let hello = &v["htypes"][0];
    assert_eq!(hello["name"], "hello", "{v}");
    assert_eq!(hello["abi_version"], phaul_plugin_api::ABI_VERSION);
    assert_eq!(hello["capabilities"], serde_json::json!(["live"]));

    // Its hooks, through the engine's loader: a tree is refused by name.
    let reg = Registry::load(&[dir.path().to_path_buf()]);
    let mut parent = Command::new("sh")
        .args(["-c", "sleep 60 & wait"])
        .spawn()
        .unwrap();
    let children = || {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", parent.id()))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<i32>>()
    };
    assert!(
        wait_for(Duration::from_secs(5), || !children().is_empty()),
        "sh started its child"
    );
    let child = children()[0];
    let ctx = |id: String| InitContext {
        side: Side::Source,
        mode: Mode::Live,
        id: id.as_str().into(),
        options: Default::default(),
        source_facts: Default::default(),
        work_dir: "/tmp".into(),
        host: EngineHost::new(
            "hello",
            "/usr/local/sbin/criu",
            "test",
            std::sync::Arc::new(|_| Ok(false)),
        )
        .into_box(),
    };
    let err = reg
        .instantiate("hello")
        .unwrap()
        .init(ctx(parent.id().to_string()))
        .unwrap_err()
        .to_string();
    // SAFETY: kill(2) on the pid of the child this test's shell started.
    unsafe { libc::kill(child, libc::SIGKILL) };
    let _ = parent.kill();
    let _ = parent.wait();
    assert!(err.contains("moves a single process"), "{err}");
    let err = reg
        .instantiate("hello")
        .unwrap()
        .init(ctx("init".into()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a process id"), "{err}");
}

#[test]
fn hello_driver_migrates_a_process_live_with_its_memory_intact() {
    if !setup() {
        return;
    }
    let lib = hello_driver();
    let logs = tempfile::tempdir().unwrap();
    let serve_log = logs.path().join("serve.log");
    let serve = Serve::start_in(
        &[],
        plugin_dir_of(&[(&lib, "libphaul_hello.so")]),
        "127.0.0.1:0",
        &[],
        Some(&serve_log),
    );
    let mut w = Workload::spawn(&["--mem-mib", "32", "--dirty-pct", "5"]);
    let before = w.report();
    w.assert_intact(&before);
    let src = plugin_dir_of(&[(&lib, "libphaul_hello.so")]);
    let old = w.pid;
    let (out, json) = migrate(src.path(), "hello", old, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(0), "migration with hello failed");
    let r = json.expect("--json summary");
    let new = r["destination_pid"].as_i64().unwrap() as i32;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(new);
    assert!(alive(new), "the workload runs on the destination");
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["pid"], 1, "the same process, restored");
    assert!(
        after["counter"].as_u64() > before["counter"].as_u64(),
        "{before} -> {after}"
    );

    // The driver's hooks ran on both sides and logged through the Host.
    let source = String::from_utf8_lossy(&out.stderr);
    for line in [
        "hello: moving `phaul-workload`",
        "hello: `phaul-workload` left this host",
    ] {
        assert!(
            source.contains(line),
            "source log lacks {line:?}:\n{source}"
        );
    }
    let dest = std::fs::read_to_string(&serve_log).unwrap();
    for line in [
        "hello: received `phaul-workload`",
        "hello: `phaul-workload` runs here now",
    ] {
        assert!(
            dest.contains(line),
            "destination log lacks {line:?}:\n{dest}"
        );
    }
    assert!(
        wait_for(Duration::from_secs(5), || serve.criu_processes().is_empty()),
        "CRIU left running on the destination"
    );
}
