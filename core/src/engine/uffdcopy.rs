//! The userfaultfd pre-copy loop on the source (the counterpart of
//! [`super::predump`] for kernels without soft-dirty): passes of written
//! pages while the workload runs, each announced on the control
//! connection (`PreCopy`), streamed on the memory channel and confirmed
//! by the destination (`PreCopied`), until a stop rule ([`super::iter`])
//! fires; then, with the tree frozen by the final dump, the last scan
//! that tells the destination which of its pages no longer hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abort::Abort;
use super::error::CopyError;
use super::iter::{decide, predicted_downtime, Decision, PassStats, StopReason, StopRules};
use super::report::{PassReport, Progress, UffdPass};
use super::session::{unexpected, Control};
use crate::memchan::MemChannel;
use crate::precopy::tracker::Tracker;
use crate::precopy::{send_final, send_pass, Sent};
use crate::proto::Msg;

/// What the loop needs.
pub(super) struct UffdLoop<'a> {
    pub tracker: &'a mut Tracker,
    pub pid: i32,
    pub rules: StopRules,
    pub restore_estimate: Duration,
    pub need_bytes: u64,
    pub control: &'a mut Control,
    pub mem: &'a mut MemChannel,
    pub progress: Arc<dyn Progress>,
    pub abort: &'a Abort,
}

/// One pass on the wire: announced, streamed by `send`, confirmed.
fn exchange(
    control: &mut Control,
    mem: &MemChannel,
    pass: u32,
    send: &mut dyn FnMut(&mut std::io::BufWriter<crate::conn::Conn>) -> std::io::Result<Sent>,
) -> Result<Sent, CopyError> {
    control.send(&Msg::PreCopy { pass })?;
    let conn = mem
        .conn()
        .try_clone()
        .map_err(|e| CopyError::Pass(format!("the memory channel: {e}")))?;
    // Frame headers and single pages coalesce into large writes.
    let mut w = std::io::BufWriter::with_capacity(1 << 20, conn);
    let sent = send(&mut w).map_err(|e| {
        CopyError::Pass(format!(
            "the memory channel broke in userfaultfd pre-copy pass {pass} ({e}): the destination \
             service died or the network failed (its log says which); nothing was frozen"
        ))
    })?;
    match control.recv("PreCopied")? {
        Msg::PreCopied { pass: p, .. } if p == pass => Ok(sent),
        other => Err(unexpected(&other, "PreCopied", "destination").into()),
    }
}

impl UffdLoop<'_> {
    /// Passes until a stop rule fires: their reports, the last pass
    /// number and why it stopped.
    pub fn run(&mut self) -> Result<(Vec<PassReport>, u32, StopReason), CopyError> {
        let mut history: Vec<PassStats> = Vec::new();
        let mut reports = Vec::new();
        let mut last_scan: Option<Instant> = None;
        let mut iter = 0;
        loop {
            if let Some(r) = self.abort.reason() {
                return Err(CopyError::Interrupted(r));
            }
            iter += 1;
            let expected = history.last().map_or(self.need_bytes, |p| p.bytes);
            self.progress.pass_started(iter, "uffd pre-copy", expected);
            let t = Instant::now();
            let pass = self
                .tracker
                .pass(self.pid, false)
                .map_err(CopyError::Pass)?;
            let since = last_scan.map(|s| s.elapsed());
            last_scan = Some(Instant::now());
            for (pid, why) in &pass.untracked {
                tracing::warn!(
                    pid,
                    "not tracked (its memory follows after the switch): {why}"
                );
            }
            let before = self.mem.sent();
            self.mem.watch(self.progress.clone(), before);
            let tracker = &*self.tracker;
            let sent = exchange(self.control, self.mem, iter, &mut |c| {
                send_pass(tracker, &pass, c)
            });
            self.mem.unwatch();
            let sent = sent?;
            let stats = PassStats {
                pages_written: sent.written,
                bytes: self.mem.sent().saturating_sub(before),
                duration: t.elapsed(),
            };
            self.progress.pass_finished(&stats);
            history.push(stats);
            let decision = decide(&self.rules, &history, self.restore_estimate);
            let predicted = predicted_downtime(&stats, self.restore_estimate);
            let mut report = PassReport::new(iter, "uffd", &stats, None);
            report.pages_written = sent.pages;
            report.uffd = Some(UffdPass {
                zero_pages: sent.zero,
                dropped_pages: sent.dropped,
                scan_us: pass.scan_time.as_micros() as u64,
                dirty_pages_s: since.map_or(0.0, |d| sent.written as f64 / d.as_secs_f64()),
                predicted_ms: predicted.map_or(f64::INFINITY, |p| p.as_secs_f64() * 1e3),
            });
            reports.push(report);
            match decision {
                Decision::Continue { predicted_ms } => tracing::info!(
                    pass = iter,
                    written = sent.written,
                    sent = sent.pages,
                    zero = sent.zero,
                    scan_ms = pass.scan_time.as_secs_f64() * 1e3,
                    predicted_ms,
                    "uffd pre-copy pass done; iterating again"
                ),
                Decision::Stop(reason) => {
                    tracing::info!(pass = iter, "stopping uffd pre-copy: {reason}");
                    return Ok((reports, iter, reason));
                }
            }
        }
    }

    /// With the tree frozen: the last scan; the destination forgets every
    /// page written since the last pass (they follow after the switch).
    pub fn last(&mut self, pass: u32) -> Result<(Sent, Duration), CopyError> {
        let t = Instant::now();
        let scan = self.tracker.pass(self.pid, true).map_err(CopyError::Pass)?;
        let tracker = &*self.tracker;
        let sent = exchange(self.control, self.mem, pass, &mut |c| {
            send_final(tracker, &scan, c)
        })?;
        tracing::info!(
            written = sent.written,
            dropped = sent.dropped,
            scan_ms = scan.scan_time.as_secs_f64() * 1e3,
            "last scan: these pages follow after the switch"
        );
        Ok((sent, t.elapsed()))
    }
}
