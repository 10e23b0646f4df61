//! `phaul migrate --dry-run`: every check a real migration makes, and a
//! trial dump, without moving anything. The source's pre-flight (driver,
//! CRIU, the workload), the destination's (versions, htype, CPU, space,
//! process ids, addresses, its driver — without mounting anything or
//! recording a session), and a trial CRIU dump of the workload with
//! `leave_running` into a throw-away directory under the work root (the
//! workload pauses for the dump's duration, then runs on untouched). Every
//! check runs even when an earlier one failed, so one run shows every
//! problem.

use std::sync::Arc;
use std::time::Instant;

use phaul_plugin_api::CriuOpts;
use serde::Serialize;

use super::abort::Abort;
use super::criu_opts_to_rpc;
use super::error::PreflightError;
use super::report::Progress;
use super::session::{connect, handshake, hello, Control};
use super::source::{preflight, Env, SourceOptions};
use super::Connector;
use crate::criu::rpc::ReqType;
use crate::criu::{CriuBinary, Event, Launcher};
use crate::plugins::Registry;
use crate::proto::Hello;
use crate::proto::MigrationMode;
use crate::workdir::{free_bytes, WorkDir};

/// One check of a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub check: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found (the reason, when it failed).
    pub detail: String,
}

/// What a dry run found.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// Every check made, in order.
    pub checks: Vec<Check>,
    /// Whether a migration would be attempted (every check passed).
    pub would_migrate: bool,
}

impl DryRun {
    fn push(&mut self, check: &'static str, r: Result<String, String>) {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.checks.push(Check { check, ok, detail });
    }
}

/// Runs every check of a migration of `opts` to `connector`, and a trial
/// dump; changes nothing (the workload pauses for the trial dump).
pub fn dry_run(
    registry: &Registry,
    opts: &SourceOptions,
    connector: &Connector,
    progress: Arc<dyn Progress>,
    abort: &Abort,
) -> Result<DryRun, PreflightError> {
    let launcher: Arc<dyn Launcher> = Arc::new(CriuBinary(opts.criu.clone()));
    let env = Env::new(opts, connector, progress, abort, launcher);
    let session = env.session;
    let mut report = DryRun {
        checks: Vec::new(),
        would_migrate: false,
    };
    let mut driver = registry.instantiate(&opts.htype)?;
    driver.apply_deadlines(&opts.hook_deadlines)?;
    driver.interrupt_on(abort.flag());
    let mut work = WorkDir::create(&opts.work_root, &opts.log_dir, "src", session)?;
    let pre = match preflight(&env, driver, &work) {
        Ok(p) => {
            report.push(
                "source pre-flight",
                Ok(format!(
                    "{} {}: root task {}, {} MiB resident, CRIU {}; {}",
                    opts.htype,
                    opts.id,
                    p.prepared.pid,
                    p.need_bytes >> 20,
                    p.criu_version,
                    match &p.use_pre_dump {
                        Ok(()) => "pre-dumps on".to_string(),
                        Err(why) => format!("pre-dumps off: {why}"),
                    }
                )),
            );
            Some(p)
        }
        Err(e) => {
            report.push("source pre-flight", Err(e.to_string()));
            None
        }
    };
    // The destination's pre-flight, with what the source found.
    let dest = (|| -> Result<String, String> {
        let live = opts.mode == MigrationMode::Live;
        let roots = pre.as_ref().map(|p| p.roots.clone()).unwrap_or_default();
        let conns =
            connect(connector, session, live, !roots.is_empty()).map_err(|e| e.to_string())?;
        let mut control =
            Control::with_peer(conns.control, "destination").map_err(|e| e.to_string())?;
        control.set_deadline(Some(Instant::now() + std::time::Duration::from_secs(60)));
        let h = match &pre {
            Some(p) => Hello {
                criu_version: Some(p.criu_version),
                cpuinfo: p.cpuinfo.clone(),
                need_bytes: p.need_bytes,
                pids: p.pids.clone(),
                bound: p.bound.clone(),
                source_facts: p.prepared.facts.clone(),
                dry_run: true,
                ..hello(opts, session, &roots)
            },
            None => Hello {
                dry_run: true,
                ..hello(opts, session, &roots)
            },
        };
        let w = handshake(&mut control, h).map_err(|e| e.to_string())?;
        Ok(format!(
            "accepted by phaul {} (CRIU {}, {} MiB free for images)",
            w.phaul_version,
            w.criu_version.map_or("none".into(), |v| v.to_string()),
            w.free_bytes >> 20
        ))
    })();
    report.push("destination pre-flight", dest);
    let mut pre = pre;
    if let (Some(p), MigrationMode::Live) = (pre.as_mut(), opts.mode) {
        let trial = trial_dump(&env, p, &work);
        report.push("trial dump (workload left running)", trial);
    }
    report.would_migrate = report.checks.iter().all(|c| c.ok);
    if report.would_migrate {
        work.succeeded();
    }
    Ok(report)
}

/// A CRIU dump with `leave_running` into a throw-away directory.
fn trial_dump(
    env: &Env,
    pre: &mut super::source::Preflight,
    work: &WorkDir,
) -> Result<String, String> {
    let dir = work.path().join("trial");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let need = pre.need_bytes + pre.need_bytes / 10;
    let free = free_bytes(&dir);
    if free < need {
        return Err(format!(
            "not tried: {} has {} MiB free, the trial dump needs about {} MiB (use --work-dir)",
            dir.display(),
            free >> 20,
            need >> 20
        ));
    }
    let mut criu = env
        .launcher
        .spawn("trial", &work.criu(), &[])
        .map_err(|e| e.to_string())?;
    let mut copts = CriuOpts {
        tcp_established: env.opts.tcp_established,
        ..CriuOpts::default()
    };
    let defaults = pre.prepared.criu_defaults;
    defaults.apply(&mut copts);
    // The driver only adjusts the options: it must not act for a trial.
    pre.prepared
        .driver
        .adjust_dump_opts(&mut copts)
        .map_err(|e| e.to_string())?;
    let mut o = criu.opts(&dir, "trial-dump.log");
    o.pid = Some(pre.prepared.pid);
    o.leave_running = Some(true);
    criu_opts_to_rpc(&copts, &mut o);
    defaults.apply_rpc(&mut o);
    let t = Instant::now();
    criu.start(ReqType::Dump, o).map_err(|e| e.to_string())?;
    loop {
        match criu.next_event(ReqType::Dump).map_err(|e| e.to_string())? {
            Event::Notify { .. } => criu.answer_notify(true).map_err(|e| e.to_string())?,
            Event::Done(resp) => {
                criu.check_done(ReqType::Dump, &resp, "trial-dump.log")
                    .map_err(|e| e.to_string())?;
                break;
            }
        }
    }
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "CRIU dumped the workload in {} ms and left it running",
        took.as_millis()
    ))
}
