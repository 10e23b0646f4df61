//! What a migration reports at the end (the summary and `--json`), and the
//! progress callbacks while it runs.

use serde::Serialize;

use super::iter::{PassStats, StopReason, PAGE_SIZE};
use crate::criu::stats::{DumpStats, RestoreStats};

/// One memory pass.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    /// Pass number, from 1.
    pub iteration: u32,
    /// `pre-dump` (workload running) or `dump` (the final, frozen one).
    pub kind: &'static str,
    /// Pages CRIU wrote.
    pub pages_written: u64,
    /// Pages CRIU skipped because an earlier pass had sent them.
    pub pages_skipped_parent: u64,
    /// Pages CRIU examined.
    pub pages_scanned: u64,
    /// Bytes over the memory channel.
    pub bytes: u64,
    /// Transfer time, microseconds.
    pub duration_us: u64,
    /// Transfer rate, MiB/s.
    pub rate_mib_s: f64,
    /// Userfaultfd pre-copy: what the pass measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uffd: Option<UffdPass>,
}

/// What a userfaultfd pre-copy pass measured.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct UffdPass {
    /// Pages sent as zero marks (no data).
    pub zero_pages: u64,
    /// Pages the destination was told to forget (unmapped, replaced).
    pub dropped_pages: u64,
    /// Time the write-protect scans took, microseconds.
    pub scan_us: u64,
    /// Pages written per second since the previous scan.
    pub dirty_pages_s: f64,
    /// Predicted frozen time had the migration switched now, ms.
    pub predicted_ms: f64,
}

impl PassReport {
    /// Builds a pass report from the engine's measurement and CRIU's stats.
    pub fn new(
        iteration: u32,
        kind: &'static str,
        pass: &PassStats,
        criu: Option<&DumpStats>,
    ) -> Self {
        Self {
            iteration,
            kind,
            pages_written: criu.map_or(pass.bytes / PAGE_SIZE, |c| c.pages_written),
            pages_skipped_parent: criu.map_or(0, |c| c.pages_skipped_parent),
            pages_scanned: criu.map_or(0, |c| c.pages_scanned),
            bytes: pass.bytes,
            duration_us: pass.duration.as_micros() as u64,
            rate_mib_s: pass.rate() / (1 << 20) as f64,
            uffd: None,
        }
    }
}

/// The summary of a successful migration.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Session id (hex), as logged on both sides.
    pub session: String,
    /// The htype.
    pub htype: String,
    /// The workload id on the source.
    pub id: String,
    /// `live` or `restart`.
    pub mode: &'static str,
    /// Where it went.
    pub destination: String,
    /// How the connections were secured ([`crate::engine::Connector::transport`]).
    pub transport: String,
    /// The root pid on the destination.
    pub destination_pid: i32,
    /// From start to finish, microseconds.
    pub total_time_us: u64,
    /// From the freeze (CRIU's network-lock) until the destination reported
    /// the workload running, microseconds: the downtime phaul caused.
    pub frozen_time_us: u64,
    /// How long the destination's CRIU worked on the restore (the restore
    /// request's wall time, less the wait for the commit), microseconds.
    pub restore_time_us: u64,
    /// How long the source's CRIU worked on the final dump (from the
    /// request to the `post-dump` notification), microseconds. With
    /// `restore_time_us`, what phaul itself adds is `total_time_us` minus
    /// both.
    pub criu_dump_time_us: u64,
    /// Whether memory was pre-copied while the workload ran (CRIU
    /// pre-dumps or userfaultfd passes).
    pub pre_dump: bool,
    /// Why the iteration loop stopped.
    pub stop_reason: StopReason,
    /// Every memory pass.
    pub iterations: Vec<PassReport>,
    /// Bytes on the memory channel.
    pub memory_bytes: u64,
    /// Bytes of image and meta files on the control channel.
    pub image_bytes: u64,
    /// Total bytes phaul sent to the destination.
    pub bytes_on_wire: u64,
    /// CRIU's dump statistics for the final dump (CRIU's field names).
    pub criu_dump: Option<DumpStats>,
    /// CRIU's restore statistics (CRIU's field names).
    pub criu_restore: Option<RestoreStats>,
    /// The file-sync passes (empty when nothing is synced); the last one
    /// ran while the workload was frozen (live) or stopped (restart).
    pub fs_passes: Vec<crate::fsync::PassStats>,
    /// Why the live file-sync passes stopped.
    pub fs_stop_reason: Option<String>,
    /// The memory that followed after the switch (`--post-copy`); `None`
    /// for a single-shot or pre-copied migration.
    pub post_copy: Option<PostCopyReport>,
    /// `--post-copy=auto`: what it predicted and chose.
    pub post_copy_decision: Option<String>,
}

/// Post-copy: what crossed after the workload ran on the destination.
#[derive(Debug, Clone, Serialize)]
pub struct PostCopyReport {
    /// Why post-copy was used (`--post-copy`, or what `auto` predicted).
    pub why: String,
    /// Pages the source served after the switch.
    pub pages_served: u64,
    /// Pages the destination placed (the rest were dropped or replaced by
    /// the workload before they arrived).
    pub pages_placed: u64,
    /// Pages a thread on the destination was blocked on (faulted on
    /// demand).
    pub pages_on_demand: u64,
    /// Pages pushed in the background.
    pub pages_background: u64,
    /// From the switch until every page had arrived, microseconds.
    pub time_to_last_page_us: u64,
    /// The page transfer's rate, MiB/s.
    pub rate_mib_s: f64,
}

/// Progress callbacks; the CLI draws bars from them.
pub trait Progress: Send + Sync {
    /// A memory pass starts; `expected_bytes` is a rough size.
    fn pass_started(&self, _iteration: u32, _kind: &str, _expected_bytes: u64) {}
    /// Bytes sent so far in the current pass.
    fn pass_progress(&self, _bytes: u64) {}
    /// The pass is over.
    fn pass_finished(&self, _stats: &PassStats) {}
    /// A phase of the migration starts ("frozen", "restoring", ...).
    fn phase(&self, _what: &str) {}
}

/// Progress that shows nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
