//! `phaul-workload report`: SIGUSR1 the workload and print its fresh status.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{status, sys};

/// Sends SIGUSR1 to `pid` and prints the first status with a larger
/// `report_seq` than before.
pub fn report(state_dir: &Path, pid: i32, timeout_ms: u64) -> Result<()> {
    if !sys::process_alive(pid) {
        bail!("workload process {pid} does not exist");
    }
    let before = status::read_report_seq(state_dir).unwrap_or(0);
    kill(Pid::from_raw(pid), Signal::SIGUSR1)
        .with_context(|| format!("sending SIGUSR1 to {pid}"))?;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if let Some((text, value)) = status::read(state_dir) {
            let seq = value.get("report_seq").and_then(|v| v.as_u64());
            if seq.is_some_and(|s| s > before) {
                print!("{text}");
                return Ok(());
            }
        }
        if !sys::process_alive(pid) {
            bail!("workload process {pid} exited before reporting");
        }
        if Instant::now() >= deadline {
            bail!(
                "no new report from workload {pid} within {timeout_ms} ms \
                 ({} still has report_seq {before})",
                status::status_path(state_dir).display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
