//! The vz driver as `phaul htypes` lists it: loaded from its plugin file,
//! with its capabilities, and with a note in its description when `vzctl`
//! is not installed (as on these machines). The driver's own logic is
//! tested in its crate, against a stand-in for Virtuozzo's tools
//! (`plugins/vz/src/standin.rs`), not on a Virtuozzo host.

use std::process::Command;

use phaul_tests::harness::htypes_json;
use phaul_tests::{bin, plugin_dir};

fn vzctl_on_path() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("vzctl").is_file()))
        .unwrap_or(false)
}

#[test]
fn htypes_lists_vz_with_a_note_when_vzctl_is_missing() {
    let dir = plugin_dir(&[
        ("phaul_pid", "libphaul_pid.so"),
        ("phaul_vz", "libphaul_vz.so"),
    ]);
    let v = htypes_json(dir.path(), None);
    let vz = v["htypes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "vz")
        .unwrap_or_else(|| panic!("vz is listed: {v:#}"));
    let caps: Vec<&str> = vz["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for cap in ["live", "restart", "shared-storage", "own-restore"] {
        assert!(caps.contains(&cap), "vz lacks {cap}: {caps:?}");
    }
    let description = vz["description"].as_str().unwrap();
    assert_eq!(
        description.contains("vzctl is not installed on this host"),
        !vzctl_on_path(),
        "{description}"
    );

    // The table says the same.
    let out = Command::new(bin("phaul"))
        .args(["htypes", "--plugin-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("vz "))
        .unwrap_or_else(|| panic!("a vz row: {table}"));
    if !vzctl_on_path() {
        assert!(line.contains("vzctl is not installed"), "{table}");
    }
}
