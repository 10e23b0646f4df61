//! The pre-copy loop: CRIU pre-dump passes while the workload runs, each
//! sent to a page server on the destination, until a stop rule ([`super::iter`])
//! fires. Shared by the engine's source and the library [`crate::api::Client`].

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_plugin_api::CriuOpts;

use super::criu_opts_to_rpc;
use super::iter::{decide, Decision, PassStats, StopReason, StopRules};
use super::report::{PassReport, Progress};
use crate::criu::rpc::{PageServerInfo, ReqType};
use crate::criu::{stats, Criu, Event};
use crate::memchan::MemChannel;

/// The destination half of an iteration, as the source sees it.
pub trait Remote {
    /// Have a page server ready for pass `iter` (building on `parent`).
    fn start_iter(&mut self, iter: u32, parent: Option<u32>) -> Result<(), String>;
    /// Pass `iter` has been sent completely.
    fn stop_iter(&mut self, iter: u32) -> Result<(), String>;
}

/// What the loop needs from its caller.
pub struct PreDumpLoop<'a> {
    /// The source's CRIU worker.
    pub criu: &'a mut dyn Criu,
    /// The root task.
    pub pid: i32,
    /// The page-server socket as the worker knows it.
    pub ps_fd: RawFd,
    /// The source image directory of pass `n` (pre-dumps leave their
    /// non-memory images there; later passes link to it as parent).
    pub images: &'a dyn Fn(u32) -> PathBuf,
    /// Lets the driver adjust each pass's options.
    pub adjust: &'a mut dyn FnMut(&mut CriuOpts) -> Result<(), String>,
    /// The stop rules.
    pub rules: StopRules,
    /// Restore cost assumed by the downtime rule.
    pub restore_estimate: Duration,
    /// The memory channel, when phaul owns it (progress, byte counts, and
    /// pushing CRIU's corked last bytes).
    pub channel: Option<&'a mut MemChannel>,
    /// Progress display.
    pub progress: Arc<dyn Progress>,
}

impl PreDumpLoop<'_> {
    /// Runs passes until a stop rule fires; returns the pass reports, the
    /// last pass number and why it stopped.
    pub fn run(
        &mut self,
        remote: &mut dyn Remote,
    ) -> Result<(Vec<PassReport>, u32, StopReason), String> {
        let mut history: Vec<PassStats> = Vec::new();
        let mut reports = Vec::new();
        let mut iter = 0;
        loop {
            iter += 1;
            let parent = (iter > 1).then(|| iter - 1);
            remote.start_iter(iter, parent)?;
            let dir = (self.images)(iter);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let log = format!("pre-dump-{iter}.log");
            let mut o = self.criu.opts(&dir, &log);
            o.pid = Some(self.pid);
            o.track_mem = Some(true);
            o.ps = Some(PageServerInfo {
                fd: Some(self.ps_fd),
                ..Default::default()
            });
            if let Some(p) = parent {
                o.parent_img = Some(format!("../{p}"));
            }
            let mut copts = CriuOpts::default();
            (self.adjust)(&mut copts)?;
            criu_opts_to_rpc(&copts, &mut o);
            let expected = history.last().map_or(0, |p| p.bytes);
            self.progress.pass_started(iter, "pre-dump", expected);
            let before = self.sent();
            let t = Instant::now();
            let progress = self.progress.clone();
            if let Some(c) = self.channel.as_deref_mut() {
                c.watch(progress, before);
            }
            self.criu
                .start(ReqType::PreDump, o)
                .map_err(|e| e.to_string())?;
            loop {
                match self
                    .criu
                    .next_event(ReqType::PreDump)
                    .map_err(|e| e.to_string())?
                {
                    Event::Notify { .. } => {
                        self.criu.answer_notify(true).map_err(|e| e.to_string())?
                    }
                    Event::Done(resp) => {
                        self.criu
                            .check_done(ReqType::PreDump, &resp, &log)
                            .map_err(|e| e.to_string())?;
                        break;
                    }
                }
            }
            if let Some(c) = self.channel.as_deref_mut() {
                c.unwatch();
            }
            remote.stop_iter(iter)?;
            let criu_stats = stats::read_dump(self.criu.work_dir()).ok();
            let pages = criu_stats.as_ref().map_or(0, |s| s.pages_written);
            let bytes = match self.channel.as_deref().is_some_and(|c| c.counts_bytes()) {
                true => self.sent() - before,
                false => pages * super::iter::PAGE_SIZE,
            };
            let pass = PassStats {
                pages_written: pages,
                bytes,
                duration: t.elapsed(),
            };
            self.progress.pass_finished(&pass);
            reports.push(PassReport::new(
                iter,
                "pre-dump",
                &pass,
                criu_stats.as_ref(),
            ));
            history.push(pass);
            match decide(&self.rules, &history, self.restore_estimate) {
                Decision::Continue { predicted_ms } => tracing::info!(
                    pass = iter,
                    pages = pass.pages_written,
                    rate_mib_s = pass.rate() / 1048576.0,
                    predicted_ms,
                    "pre-dump pass done; predicted frozen time above target, iterating again"
                ),
                Decision::Stop(reason) => {
                    tracing::info!(pass = iter, "stopping pre-dumps: {reason}");
                    return Ok((reports, iter, reason));
                }
            }
        }
    }

    fn sent(&self) -> u64 {
        self.channel.as_deref().map_or(0, |c| c.sent())
    }
}
