//! Helpers shared by phaul's integration tests: where the built binaries
//! and plugins are, and throw-away plugin directories holding chosen ones.
//!
//! The tests run the real artefacts of `cargo build --workspace`, which the
//! README's test command builds first.

use std::path::{Path, PathBuf};

pub mod docker;
pub mod harness;
pub mod out_of_tree;
pub mod pki;
pub mod proxy;
pub mod trees;

/// The cargo profile directory the tests were built into
/// (`target/debug` or `target/release`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A binary built by the workspace, e.g. `phaul`.
pub fn bin(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` first (the README's test command does)",
        p.display()
    );
    p
}

/// A plugin library built by the workspace, by crate lib name
/// (`phaul_pid` -> `libphaul_pid.so`).
pub fn plugin(lib_name: &str) -> PathBuf {
    let p = profile_dir().join(format!("lib{lib_name}.so"));
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// A temporary plugin directory holding copies of the named plugins, each
/// under the file name given (so a test can install one library twice).
pub fn plugin_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (lib, file_name) in files {
        std::fs::copy(plugin(lib), dir.path().join(file_name)).expect("copy plugin");
    }
    dir
}

/// A temporary plugin directory holding copies of the given library files
/// (built anywhere, e.g. by [`out_of_tree::hello_driver`]), each under the
/// file name given.
pub fn plugin_dir_of(files: &[(&Path, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, file_name) in files {
        std::fs::copy(path, dir.path().join(file_name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
    }
    dir
}

/// The directory holding only the production plugins (`pid`), as the
/// README's demo installs them.
pub fn production_plugin_dir() -> tempfile::TempDir {
    plugin_dir(&[("phaul_pid", "libphaul_pid.so")])
}
