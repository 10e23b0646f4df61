//! Building crates outside the workspace, as a driver author would:
//! phaul-plugin-api copied elsewhere and packaged on its own, and the
//! example driver in `examples/hello-driver` (its own workspace). Their
//! sources and manifests are outside phaul's workspace; their build output
//! goes into the workspace's own target directory, where cargo reuses what
//! `cargo build --workspace` compiled with the same features (syn 1,
//! abi_stable's derive macros: a third of the critical path) and caches
//! the rest for later runs. abi_stable itself is compiled once more, since
//! the workspace enables more features of its dependencies (serde, libc)
//! than the example does: about 40 s on two idle cores, the first time
//! only. Builds are `--offline`: the registry crates are the workspace's,
//! already downloaded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use crate::profile_dir;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// The target directory of out-of-tree builds: the workspace's (the
/// parent of `target/<profile>`).
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf()
}

/// A `cargo` command (the one running the tests, if any) building into
/// [`target_dir`], offline, with the environment the tests run in (so the
/// compiler flags match the workspace build's and its artefacts are
/// reused, never rebuilt in place).
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args)
        .arg("--offline")
        .env("CARGO_TARGET_DIR", target_dir());
    cmd
}

/// Runs a cargo command, panicking with its output when it fails; logs how
/// long it took.
pub fn run_cargo(mut cmd: Command, what: &str) -> Output {
    let started = Instant::now();
    let out = cmd.output().expect("run cargo");
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The example driver's directory.
pub fn hello_driver_dir() -> PathBuf {
    workspace_root().join("examples/hello-driver")
}

/// Builds the example driver as its own package (`cargo build
/// --manifest-path examples/hello-driver/Cargo.toml`) and returns its
/// library.
pub fn hello_driver() -> PathBuf {
    let manifest = hello_driver_dir().join("Cargo.toml");
    let manifest = manifest.to_str().expect("UTF-8 path");
    run_cargo(
        cargo(&["build", "--manifest-path", manifest]),
        "building examples/hello-driver",
    );
    let lib = target_dir().join("debug/libphaul_hello.so");
    assert!(lib.exists(), "{} was not built", lib.display());
    lib
}
