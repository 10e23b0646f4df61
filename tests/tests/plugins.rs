//! The plugin loader and the driver ABI, against real plugin libraries:
//! the pid driver, a library that is not a plugin, a plugin built against
//! an older ABI, plugins built against modified copies of the API (the next
//! minor version, a field of another type, a constant with another value),
//! a driver whose hooks panic, and a duplicated htype.

use std::process::Command;

use phaul_core::plugins::{EngineHost, Registry};
use phaul_core::Error;
use phaul_plugin_api::{ErrorCode, InitContext, Mode, Side};
use phaul_tests::harness::htypes_json;
use phaul_tests::{bin, plugin_dir};

/// What this phaul speaks: `MAJOR.MINOR` of phaul-plugin-api.
fn speaks() -> String {
    let mut parts = phaul_plugin_api::ABI_VERSION.split('.');
    format!("{}.{}", parts.next().unwrap(), parts.next().unwrap())
}

/// `phaul htypes` over a plugin directory: the refusal line printed for
/// `file` (exactly one), and the output as JSON.
fn htypes_refusal(dir: &std::path::Path, file: &str) -> (String, serde_json::Value) {
    let out = Command::new(bin("phaul"))
        .args(["htypes", "--plugin-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(file)).collect();
    assert_eq!(lines.len(), 1, "one line for {file}: {stderr}");
    let json = Command::new(bin("phaul"))
        .args(["htypes", "--json", "--plugin-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    (lines[0].to_string(), v)
}

fn host(htype: &str) -> phaul_plugin_api::HostBox {
    EngineHost::new(
        htype,
        "/usr/local/sbin/criu",
        "test",
        std::sync::Arc::new(|_| Ok(false)),
    )
    .into_box()
}

fn ctx(htype: &str, id: &str, options: &[(&str, &str)]) -> InitContext {
    InitContext {
        side: Side::Source,
        mode: Mode::Live,
        id: id.into(),
        options: options
            .iter()
            .map(|(k, v)| phaul_plugin_api::KeyValue::new(*k, *v))
            .collect(),
        work_dir: "/tmp".into(),
        host: host(htype),
        source_facts: Default::default(),
    }
}

#[test]
fn pid_plugin_loads_and_reports_capabilities() {
    let dir = plugin_dir(&[("phaul_pid", "libphaul_pid.so")]);
    let reg = Registry::load(&[dir.path().to_path_buf()]);
    assert!(reg.skipped().is_empty(), "{:?}", reg.skipped());
    let pid = reg.get("pid").expect("pid htype loaded");
    assert_eq!(pid.summary.abi_version, phaul_plugin_api::ABI_VERSION);
    for cap in [
        "live",
        "restart",
        "shared-storage",
        "tcp-established",
        "pre-dump",
    ] {
        assert!(
            pid.summary.capabilities.iter().any(|c| c == cap),
            "pid lacks {cap}: {:?}",
            pid.summary.capabilities
        );
    }

    // A real instance: it validates its workload id and options.
    let mut d = reg.instantiate("pid").unwrap();
    let me = std::process::id().to_string();
    d.init(ctx("pid", &me, &[("shell-job", "")])).unwrap();
    assert_eq!(d.root_task_pid().unwrap(), std::process::id() as i32);
    let mut opts = phaul_plugin_api::CriuOpts::default();
    d.adjust_dump_opts(&mut opts).unwrap();
    assert!(opts.shell_job);

    let mut d = reg.instantiate("pid").unwrap();
    let err = d
        .init(ctx("pid", &me, &[("no-such-option", "1")]))
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown option `no-such-option`"),
        "{err}"
    );
    let mut d = reg.instantiate("pid").unwrap();
    let err = d.init(ctx("pid", "999999999", &[])).unwrap_err();
    assert!(
        err.to_string().contains("no process with pid 999999999"),
        "{err}"
    );
}

#[test]
fn refused_libraries_get_one_clear_line_each_and_the_rest_load() {
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_test_not_a_plugin", "libnot_a_plugin.so"),
        ("phaul_test_old_abi", "libold_abi.so"),
        ("phaul_pid", "libzz_pid_again.so"),
    ]);
    let reg = Registry::load(&[dir.path().to_path_buf()]);
    assert!(reg.get("pid").is_some(), "the good plugin still loads");
    let reason = |file: &str| {
        reg.skipped()
            .iter()
            .find(|s| s.path.ends_with(file))
            .unwrap_or_else(|| panic!("{file} not reported: {:?}", reg.skipped()))
            .reason
            .clone()
    };
    assert!(reason("libnot_a_plugin.so").contains("not a phaul plugin"));
    let old = reason("libold_abi.so");
    assert!(
        old.starts_with(&format!(
            "built against phaul-plugin-api 0.0.7, this phaul speaks {} (rebuild the driver \
             against phaul-plugin-api {})",
            speaks(),
            speaks()
        )),
        "{old}"
    );
    let dup = reason("libzz_pid_again.so");
    assert!(
        dup.contains("declares htype `pid`") && dup.contains("libphaul_pid.so"),
        "{dup}"
    );
    assert_eq!(reg.skipped().len(), 3);
}

#[test]
fn panicking_hook_returns_an_error_and_the_engine_keeps_running() {
    let dir = plugin_dir(&[("phaul_test_faulty", "libfaulty.so")]);
    let reg = Registry::load(&[dir.path().to_path_buf()]);
    assert!(reg.skipped().is_empty(), "{:?}", reg.skipped());
    let me = std::process::id().to_string();

    let mut d = reg.instantiate("faulty").unwrap();
    d.init(ctx("faulty", &me, &[("panic", "root_task_pid")]))
        .unwrap();
    let err = d.root_task_pid().unwrap_err();
    match &err {
        Error::Driver { hook, source, .. } => {
            assert_eq!(*hook, "root_task_pid");
            assert_eq!(source.code, ErrorCode::PANICKED);
            assert!(
                source.message.contains("injected panic in root_task_pid"),
                "{err}"
            );
        }
        other => panic!("unexpected error {other}"),
    }
    // The instance is poisoned; the engine and other instances are fine.
    let again = d.fs_sync().unwrap_err().to_string();
    assert!(again.contains("unusable after an earlier panic"), "{again}");
    let mut fresh = reg.instantiate("faulty").unwrap();
    fresh.init(ctx("faulty", &me, &[])).unwrap();
    assert_eq!(fresh.root_task_pid().unwrap(), std::process::id() as i32);

    // An injected plain failure is an ordinary error.
    let mut d = reg.instantiate("faulty").unwrap();
    let err = d.init(ctx("faulty", &me, &[("fail", "init")])).unwrap_err();
    assert!(
        err.to_string().contains("injected failure in init"),
        "{err}"
    );
}

#[test]
fn plugin_that_fails_to_initialise_is_skipped() {
    let dir = plugin_dir(&[
        ("phaul_test_faulty", "libfaulty.so"),
        ("phaul_pid", "libphaul_pid.so"),
    ]);
    let out = Command::new(bin("phaul"))
        .args(["htypes", "--plugin-dir"])
        .arg(dir.path())
        .env("PHAUL_TEST_FAULTY_INFO", "panic")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("libfaulty.so"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for the bad plugin: {stderr}");
    assert!(
        lines[0].contains("failed to initialise: driver panicked in info"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("stack backtrace"),
        "no panic noise: {stderr}"
    );
}

#[test]
fn htypes_command_lists_pid_and_exit_codes_follow_the_result() {
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_test_old_abi", "libold.so"),
    ]);
    let v = htypes_json(dir.path(), None);
    assert_eq!(v["htypes"][0]["name"], "pid");
    assert_eq!(v["htypes"][0]["abi_version"], phaul_plugin_api::ABI_VERSION);
    assert_eq!(v["phaul_abi_version"], phaul_plugin_api::ABI_VERSION);
    assert_eq!(v["skipped"][0]["kind"], "version");
    assert!(v["skipped"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("libold.so"));

    let table = Command::new(bin("phaul"))
        .args(["htypes", "--plugin-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&table.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("pid ")), "{stdout}");

    let empty = tempfile::tempdir().unwrap();
    let none = Command::new(bin("phaul"))
        .args(["htypes", "--plugin-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no htype driver could be loaded"));
}

#[test]
fn plugin_built_against_the_next_minor_version_is_refused_naming_both() {
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_test_newer_minor", "libnewer.so"),
    ]);
    let (line, v) = htypes_refusal(dir.path(), "libnewer.so");
    let (major, minor) = speaks()
        .split_once('.')
        .map(|(a, b)| (a.to_string(), b.parse::<u32>().unwrap()))
        .unwrap();
    let next = format!("{major}.{}", minor + 1);
    assert!(
        line.ends_with(&format!(
            "libnewer.so: built against phaul-plugin-api {next}.0, this phaul speaks {} (the \
             driver is newer than this phaul: use a phaul that speaks {next}, or rebuild the \
             driver against phaul-plugin-api {})",
            speaks(),
            speaks()
        )),
        "{line}"
    );
    assert!(
        !line.contains("layout"),
        "not reported as a layout mismatch: {line}"
    );
    assert_eq!(v["skipped"][0]["kind"], "version");
    assert_eq!(v["htypes"][0]["name"], "pid", "the other plugin loads");
}

#[test]
fn layout_mismatch_at_the_same_version_names_the_field_in_one_line() {
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_test_layout_mismatch", "liblayout.so"),
    ]);
    let (line, v) = htypes_refusal(dir.path(), "liblayout.so");
    let api = phaul_plugin_api::ABI_VERSION;
    assert!(
        line.ends_with(&format!(
            "liblayout.so: built against phaul-plugin-api {api}, but its types differ from this \
             phaul's: CriuOpts.empty_ns is u64 in the plugin, u32 here (the plugin or this phaul \
             was built against a modified phaul-plugin-api {api}: rebuild the driver against the \
             released one)"
        )),
        "{line}"
    );
    assert_eq!(v["skipped"][0]["kind"], "layout");
    assert_eq!(v["htypes"][0]["name"], "pid", "the other plugin loads");

    // The full abi_stable report stays available in the debug log.
    let out = Command::new(bin("phaul"))
        .args(["-v", "htypes", "--plugin-dir"])
        .arg(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugin loading error") && stderr.contains("Layout of expected type"),
        "-v keeps abi_stable's report"
    );
}

#[test]
fn plugin_with_a_changed_constant_is_refused_naming_it() {
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_test_changed_constant", "libconstant.so"),
    ]);
    let (line, v) = htypes_refusal(dir.path(), "libconstant.so");
    let api = phaul_plugin_api::ABI_VERSION;
    assert!(
        line.ends_with(&format!(
            "libconstant.so: built against phaul-plugin-api {api}, but its constants differ \
             from this phaul's: Capabilities::LIVE is 1 << 12 in the plugin, 1 << 3 here (the \
             plugin or this phaul was built against a modified phaul-plugin-api {api}: rebuild \
             the driver against the released one)"
        )),
        "{line}"
    );
    assert_eq!(v["skipped"][0]["kind"], "constants");
    assert_eq!(v["htypes"].as_array().unwrap().len(), 1, "only pid loads");

    // In the library API too, with the refusal as a value.
    let reg = Registry::load(&[dir.path().to_path_buf()]);
    let skipped = &reg.skipped()[0];
    assert!(matches!(
        &skipped.refusal,
        phaul_core::plugins::Refusal::Constants { mismatch, .. }
            if mismatch.starts_with("Capabilities::LIVE")
    ));
}

#[test]
fn htypes_shows_the_abi_each_plugin_was_built_against() {
    // A later patch release of the API loads (the 0.x rule compares
    // major and minor), and is listed with its own version, not phaul's.
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_test_newer_patch", "libpatch.so"),
    ]);
    let mut v = phaul_plugin_api::ABI_VERSION.split('.');
    let (major, minor) = (v.next().unwrap(), v.next().unwrap());
    let patch: u32 = v.next().unwrap().parse().unwrap();
    let theirs = format!("{major}.{minor}.{}", patch + 7);

    let v = htypes_json(dir.path(), None);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["phaul_abi_version"], phaul_plugin_api::ABI_VERSION);
    let abi = |name: &str| {
        v["htypes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {v}"))["abi_version"]
            .clone()
    };
    assert_eq!(abi("newer-patch"), theirs.as_str());
    assert_eq!(abi("pid"), phaul_plugin_api::ABI_VERSION);

    let table = Command::new(bin("phaul"))
        .args(["htypes", "--plugin-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&table.stdout);
    let row = stdout
        .lines()
        .find(|l| l.starts_with("newer-patch "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        row.split_whitespace().nth(2) == Some(theirs.as_str()),
        "the ABI column shows {theirs}: {stdout}"
    );
}
