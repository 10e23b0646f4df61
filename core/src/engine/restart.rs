//! Restart (cold) migration: sync the files while the workload runs, stop
//! it on the source (driver `stop`), do the final sync, start it on the
//! destination (driver `start`). No CRIU is involved and the processes
//! start afresh — this is a restart, not a live move. If the destination
//! cannot start it, the source starts it again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abort::Abort;
use super::fs::SourceSync;
use super::iter::StopReason;
use super::report::{Progress, Report};
use super::source::{
    connect, fs_bytes, fs_roots, handshake, hello, open_control, prepare, query, recv, refused,
    send_file, Prepared, SourceOptions,
};
use super::{Connector, MigrationError};
use crate::plugins::Driver;
use crate::proc;
use crate::proto::{Msg, Outcome};
use crate::workdir::WorkDir;

/// The source side of a restart-mode migration.
#[allow(clippy::too_many_arguments)]
pub(crate) fn source(
    opts: &SourceOptions,
    connector: &Connector,
    progress: Arc<dyn Progress>,
    abort: &Abort,
    session: u64,
    driver: Driver,
    mut work: WorkDir,
    started: Instant,
) -> Result<Report, MigrationError> {
    work.keep(opts.keep_images);
    let Prepared {
        mut driver,
        pid,
        fs,
        ..
    } = prepare(driver, opts, &work, "none")?;
    let roots = fs_roots(&fs);
    let shared = fs.kind == phaul_plugin_api::FsSyncKind::SharedStorage;
    let mut snapshotted = false;
    let conns = connect(connector, session, false, !roots.is_empty()).map_err(refused)?;
    for c in std::iter::once(&conns.control).chain(conns.fs.iter()) {
        abort.watch(c);
    }
    let mut control = open_control(conns.control);
    handshake(&mut control, hello(opts, session, &roots))?;
    let mut sync = conns
        .fs
        .map(|c| SourceSync::start(c, roots.iter().map(PathBuf::from).collect(), opts.fs_rules));

    // Live passes: nothing has stopped yet, a failure just abandons.
    let live = (|| -> Result<(), String> {
        if let Some(s) = sync.as_mut() {
            progress.phase("syncing files");
            s.wait_converged()?;
        }
        match abort.reason() {
            Some(r) => Err(r),
            None => Ok(()),
        }
    })();
    if let Err(e) = live {
        let _ = control.1.write(&Msg::Abort { reason: e.clone() });
        if let Err(e) = driver.migration_fail() {
            tracing::warn!("{e}");
        }
        return Err(MigrationError::RolledBack(e));
    }

    // Stop, final sync, hand over.
    progress.phase("stopping the workload");
    let stopped_at = Instant::now();
    let mut fs_report = None;
    let mut image_bytes = 0;
    // Err((why, safe)): `safe` says whether the destination certainly does
    // not run the workload, so the source may start it again.
    let handed = (|| -> Result<i32, (String, bool)> {
        let safe = |e: String| (e, true);
        driver.net_lock().map_err(|e| safe(e.to_string()))?;
        driver.stop().map_err(|e| safe(e.to_string()))?;
        if let Some(s) = sync.take() {
            progress.phase("final file sync");
            fs_report = Some(s.final_pass().map_err(safe)?);
        }
        if shared {
            driver.storage_snapshot().map_err(|e| safe(e.to_string()))?;
            snapshotted = true;
        }
        let meta_dir = work.meta();
        let meta = driver
            .meta_files_out(&meta_dir.display().to_string())
            .map_err(|e| safe(e.to_string()))?;
        for m in &meta {
            image_bytes += send_file(&mut control, &meta_dir.join(m)).map_err(safe)?;
        }
        if !abort.commit() {
            return Err(safe(abort.reason().unwrap_or_else(|| "aborted".into())));
        }
        progress.phase("starting on the destination");
        if let Err(e) = control.1.write(&Msg::Start { meta_files: meta }) {
            return resolve(
                connector,
                session,
                opts.resolve_timeout,
                format!("sending Start: {e}"),
            );
        }
        match recv(&mut control, abort, "Started") {
            Ok(Msg::Started { pid }) => Ok(pid),
            Ok(other) => Err(safe(format!("expected Started, got {}", other.name()))),
            Err(e) if e.starts_with("the destination aborted") => Err(safe(e)),
            Err(e) => resolve(connector, session, opts.resolve_timeout, e),
        }
    })();
    match handed {
        Ok(new_pid) => {
            if snapshotted {
                if let Err(e) = driver.storage_commit() {
                    tracing::warn!("{e}");
                }
            }
            if let Err(e) = driver.migration_complete() {
                tracing::warn!("{e}");
            }
            Ok(Report {
                session: format!("{session:016x}"),
                htype: opts.htype.clone(),
                id: opts.id.clone(),
                mode: "restart",
                destination: connector.describe(),
                destination_pid: new_pid,
                total_time_us: started.elapsed().as_micros() as u64,
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
            })
        }
        Err((e, false)) => Err(MigrationError::AfterCommit(format!(
            "{e}. The workload is stopped on the source (its files are synced); if the \
             destination runs it, nothing is left to do; otherwise start it again there or here"
        ))),
        Err((e, true)) => {
            let _ = control.1.write(&Msg::Abort { reason: e.clone() });
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
                    Ok(p) => Err(MigrationError::RolledBack(format!(
                        "{e}; the workload was started again on the source (pid {p})"
                    ))),
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

/// The connection broke after `Start`: ask the destination whether it
/// started the workload (its answer decides whether the source restarts
/// it).
fn resolve(
    connector: &Connector,
    session: u64,
    timeout: Duration,
    why: String,
) -> Result<i32, (String, bool)> {
    tracing::warn!("{why}; asking the destination whether it started the workload");
    let Connector::Tcp(addr) = connector else {
        return Err((why, false));
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match query(addr, session) {
            Ok(Outcome::Resumed) => return Ok(0),
            Ok(Outcome::RolledBack) | Ok(Outcome::Unknown) => return Err((why, true)),
            Ok(Outcome::InProgress) | Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    Err((
        format!("{why}; the destination did not say whether it started the workload"),
        false,
    ))
}
