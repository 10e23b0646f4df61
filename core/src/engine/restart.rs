//! Restart (cold) migration: sync the files while the workload runs, stop
//! it on the source (driver `stop`), do the final sync, start it on the
//! destination (driver `start`). No CRIU is involved and the processes
//! start afresh — this is a restart, not a live move. If the destination
//! cannot start it, the source starts it again.
//!
//! Before the final sync the engine checks that nothing of the tree it
//! recorded when the stop began still exists (the root, its descendants,
//! those that reparented away, and what they forked since): the driver's
//! `stop` should have stopped them all; what it left is killed, and what
//! survives even that fails the hand-over (the source starts it again).
//!
//! The phases: live passes (nothing stopped; a failure abandons), the
//! stop and final sync (a failure starts the workload again here), `Start`
//! (the commit: from here only the destination's answer, or its answer to
//! a query, decides whether the source starts it again).

use std::path::PathBuf;
use std::time::Instant;

use super::error::{
    CommitError, CopyError, HandOverError, MigrationError, PeerError, RollbackCause,
};
use super::fs::SourceSync;
use super::iter::StopReason;
use super::report::Report;
use super::session::{
    self, connect, fs_bytes, fs_roots, handshake, hello, prepare, send_file, unexpected, Control,
    Prepared, Verdict,
};
use super::source::Env;
use super::Connector;
use crate::plugins::Driver;
use crate::proc;
use crate::proto::{Hello, Msg};
use crate::workdir::WorkDir;

/// How the hand-over ended when it did not succeed.
enum Failed {
    /// The destination certainly does not run the workload.
    Safe(RollbackCause),
    /// Nobody can tell.
    Unsure(CommitError),
}

/// The source side of a restart-mode migration.
pub(crate) fn source(
    env: &Env,
    driver: Driver,
    mut work: WorkDir,
) -> Result<Report, MigrationError> {
    let opts = env.opts;
    work.keep(opts.keep_images);
    let Prepared {
        mut driver,
        pid,
        fs,
        facts,
        ..
    } = prepare(driver, opts, &work, &env.launcher, "none")?;
    let roots = fs_roots(&fs);
    let shared = fs.kind == phaul_plugin_api::FsSyncKind::SharedStorage;
    let conns = connect(env.connector, env.session, false, !roots.is_empty())
        .map_err(super::error::PreflightError::from)?;
    for c in std::iter::once(&conns.control).chain(conns.fs.iter()) {
        env.abort.watch(c);
    }
    let mut control = Control::with_peer(conns.control, "destination").map_err(|e| {
        super::error::PreflightError::Check(format!("cannot use the control connection: {e}"))
    })?;
    handshake(
        &mut control,
        Hello {
            source_facts: facts,
            ..hello(opts, env.session, &roots)
        },
    )?;
    let mut sync = conns
        .fs
        .map(|c| SourceSync::start(c, roots.iter().map(PathBuf::from).collect(), opts.fs_rules));

    // Live passes: nothing has stopped yet, a failure just abandons.
    let live = (|| -> Result<(), CopyError> {
        if let Some(s) = sync.as_mut() {
            env.progress.phase("syncing files");
            s.wait_converged().map_err(CopyError::FileSync)?;
        }
        match env.abort.reason() {
            Some(r) => Err(CopyError::Interrupted(r)),
            None => Ok(()),
        }
    })();
    if let Err(e) = live {
        control.abort(&e.to_string());
        if let Err(e) = driver.migration_fail() {
            tracing::warn!("{e}");
        }
        return Err(e.into());
    }

    // Stop, final sync, hand over.
    env.progress.phase("stopping the workload");
    let stopped_at = Instant::now();
    let mut fs_report = None;
    let mut image_bytes = 0;
    let mut snapshotted = false;
    let handed = (|| -> Result<i32, Failed> {
        let safe = |e: HandOverError| Failed::Safe(e.into());
        driver.net_lock().map_err(|e| safe(e.into()))?;
        let tree = proc::tasks(pid);
        driver.stop().map_err(|e| safe(e.into()))?;
        ensure_stopped(&tree).map_err(safe)?;
        if let Some(s) = sync.take() {
            env.progress.phase("final file sync");
            fs_report = Some(
                s.final_pass()
                    .map_err(|e| safe(HandOverError::FileSync(e)))?,
            );
        }
        if shared {
            driver.storage_snapshot().map_err(|e| safe(e.into()))?;
            snapshotted = true;
        }
        let meta_dir = work.meta();
        let meta = driver
            .meta_files_out(&meta_dir.display().to_string())
            .map_err(|e| safe(e.into()))?;
        for m in &meta {
            image_bytes += send_file(&mut control, &meta_dir.join(m)).map_err(safe)?;
        }
        if !env.abort.commit() {
            let r = env.abort.reason().unwrap_or_else(|| "aborted".into());
            return Err(safe(HandOverError::Interrupted(r)));
        }
        env.progress.phase("starting on the destination");
        if let Err(e) = control.send(&Msg::Start { meta_files: meta }) {
            return resolve(env, format!("{e}"));
        }
        match control.recv("Started") {
            Ok(Msg::Started { pid }) => Ok(pid),
            // The destination says it did not start it.
            Err(PeerError::Aborted { reason, .. }) => {
                Err(Failed::Safe(CommitError::Discarded(reason).into()))
            }
            Ok(other) => resolve(
                env,
                unexpected(&other, "Started", "destination").to_string(),
            ),
            Err(e) => resolve(env, e.to_string()),
        }
    })();
    match handed {
        Ok(new_pid) => {
            work.succeeded();
            if snapshotted {
                if let Err(e) = driver.storage_commit() {
                    tracing::warn!("{e}");
                }
            }
            if let Err(e) = driver.migration_complete() {
                tracing::warn!("{e}");
            }
            Ok(Report {
                session: format!("{:016x}", env.session),
                htype: opts.htype.clone(),
                id: opts.id.clone(),
                mode: "restart",
                destination: env.connector.describe(),
                transport: env.connector.transport(),
                destination_pid: new_pid,
                total_time_us: env.started.elapsed().as_micros() as u64,
                frozen_time_us: stopped_at.elapsed().as_micros() as u64,
                restore_time_us: 0,
                criu_dump_time_us: 0,
                pre_dump: false,
                stop_reason: StopReason::NoPreDump {
                    why: "restart mode: the processes are restarted, not checkpointed".into(),
                },
                iterations: Vec::new(),
                memory_bytes: 0,
                image_bytes,
                bytes_on_wire: image_bytes + fs_bytes(&fs_report),
                criu_dump: None,
                criu_restore: None,
                fs_passes: fs_report.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
                fs_stop_reason: fs_report.map(|r| r.1),
                post_copy: None,
                post_copy_decision: None,
            })
        }
        Err(Failed::Unsure(e)) => Err(MigrationError::AfterCommit(format!(
            "{e}. The workload is stopped on the source (its files are synced); if the \
             destination runs it, nothing is left to do; otherwise start it again there or here"
        ))),
        Err(Failed::Safe(e)) => {
            control.abort(&e.to_string());
            if snapshotted {
                if let Err(e) = driver.storage_rollback() {
                    tracing::error!("could not put the shared storage back to its snapshot: {e}");
                }
            }
            if let Err(e) = driver.net_unlock() {
                tracing::warn!("{e}");
            }
            let result = if proc::alive(pid) {
                Err(MigrationError::RolledBack(e))
            } else {
                match driver.start() {
                    Ok(p) => {
                        tracing::warn!("the workload was started again on the source (pid {p})");
                        Err(MigrationError::RolledBack(e))
                    }
                    Err(e2) => Err(MigrationError::AfterCommit(format!(
                        "{e}; and starting the workload again on the source failed: {e2}"
                    ))),
                }
            };
            if let Err(e) = driver.migration_fail() {
                tracing::warn!("{e}");
            }
            result
        }
    }
}

/// Checks that nothing of `tree` (recorded before the driver's `stop`)
/// exists any more; kills what does (with a warning: the driver should
/// have stopped it).
fn ensure_stopped(tree: &[crate::journal::Task]) -> Result<(), HandOverError> {
    for _ in 0..3 {
        let left = proc::remaining(tree);
        if left.is_empty() {
            return Ok(());
        }
        let pids: Vec<i32> = left.iter().map(|t| t.pid).collect();
        tracing::warn!("the driver's stop left processes {pids:?} of the tree: killing them");
        proc::kill_tasks(&left, std::time::Duration::from_secs(5));
    }
    match proc::remaining(tree) {
        left if left.is_empty() => Ok(()),
        left => Err(HandOverError::NotStopped(
            left.iter().map(|t| t.pid).collect(),
        )),
    }
}

/// The connection broke after `Start`: ask the destination whether it
/// started the workload (its answer decides whether the source restarts
/// it).
fn resolve(env: &Env, why: String) -> Result<i32, Failed> {
    tracing::warn!("{why}; asking the destination whether it started the workload");
    let Connector::Tcp(addr) = env.connector else {
        return Err(Failed::Unsure(CommitError::Undecided { why }));
    };
    match session::ask(addr, env.session, env.opts.resolve_timeout, Some(env.abort)) {
        Verdict::Runs => Ok(0),
        Verdict::Discarded => Err(Failed::Safe(
            CommitError::Discarded(format!("{why}; the destination did not start it")).into(),
        )),
        Verdict::Unknown => Err(Failed::Unsure(CommitError::Unknown { why })),
        Verdict::NoAnswer(last) => Err(Failed::Unsure(CommitError::Undecided {
            why: format!("{why} ({last})"),
        })),
    }
}
