//! The `status.json` record and its atomic writing and tolerant reading.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::objects::Check;

/// File name of the status inside the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Everything `status.json` holds (see the crate documentation).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub report_seq: u64,
    pub pid: i32,
    pub counter: u64,
    pub ticks_per_sec_estimate: f64,
    pub mem_mib: u64,
    pub pages: u64,
    pub pages_verified: u64,
    pub pages_bad: u64,
    pub first_bad_page: i64,
    pub dirtied_total: u64,
    pub generation_sum: u64,
    pub max_gap_us: u64,
    pub window_max_gap_us: u64,
    pub gaps_over_10ms: u64,
    pub uptime_ms: u64,
    pub realtime_us: u64,
    pub exiting: bool,
    pub seed: u64,
    pub dirty_pct: f64,
    pub extras_enabled: bool,
    pub extras_log_lines: u64,
    pub pipe_msgs: u64,
    pub pipe_seq_errors: u64,
    pub child_pid: i32,
    pub child_alive: bool,
    pub linger_pid: i32,
    pub tcp_enabled: bool,
    pub tcp_requests: u64,
    pub tcp_clients: u64,
    pub objects: BTreeMap<String, Check>,
}

/// Path of `status.json` in `state_dir`.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATUS_FILE)
}

/// Writes `status.json.tmp`, then renames it over `status.json`, so readers
/// never see a partial file.
pub fn write_atomic(state_dir: &Path, status: &Status) -> Result<()> {
    let tmp = state_dir.join(format!("{STATUS_FILE}.tmp"));
    let mut text = serde_json::to_vec_pretty(status).context("serialising the status")?;
    text.push(b'\n');
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&text)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    let dest = status_path(state_dir);
    fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

/// Reads `status.json` as raw text plus parsed JSON; `None` if it is missing
/// or not valid JSON.
pub fn read(state_dir: &Path) -> Option<(String, serde_json::Value)> {
    let text = fs::read_to_string(status_path(state_dir)).ok()?;
    let value = serde_json::from_str(&text).ok()?;
    Some((text, value))
}

/// The `report_seq` of the current `status.json`, if any.
pub fn read_report_seq(state_dir: &Path) -> Option<u64> {
    read(state_dir).and_then(|(_, v)| v.get("report_seq")?.as_u64())
}
