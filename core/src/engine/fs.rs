//! File-system sync inside a migration: on the source a thread runs
//! [`crate::fsync::Sender`] passes on the file connection while the
//! workload runs (in parallel with the memory passes), until the stop rules
//! say the changes no longer shrink; then it waits for the engine to freeze
//! (live) or stop (restart) the workload and runs the final pass. On the
//! destination a thread runs [`crate::fsync::Receiver`] until the source
//! finishes.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver as Rx, Sender as Tx};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::conn::Conn;
use crate::fsync::{should_stop, FsStopRules, PassStats, Receiver, Root, Sender};

/// What the sync thread reports.
enum Event {
    Converged(String),
    Failed(String),
}

/// The source's sync thread.
pub struct SourceSync {
    go_final: Tx<()>,
    events: Rx<Event>,
    thread: Option<JoinHandle<Result<Vec<PassStats>, String>>>,
    reason: Option<String>,
}

impl SourceSync {
    /// Starts live passes over `conn` for `roots`.
    pub fn start(mut conn: Conn, roots: Vec<PathBuf>, rules: FsStopRules) -> SourceSync {
        let (go_final, final_rx) = channel::<()>();
        let (ev_tx, events) = channel();
        let thread = std::thread::Builder::new()
            .name("fs-sync".into())
            .spawn(move || {
                let mut sender = Sender::new(roots);
                let mut passes = Vec::new();
                let fail = |e: String, ev_tx: &Tx<Event>| {
                    let _ = ev_tx.send(Event::Failed(e.clone()));
                    Err(e)
                };
                loop {
                    match sender.pass(&mut conn, false) {
                        Ok(p) => {
                            tracing::info!(
                                pass = p.pass,
                                files_sent = p.files_sent,
                                bytes = p.bytes_sent,
                                "file sync pass done"
                            );
                            passes.push(p);
                        }
                        Err(e) => return fail(format!("file sync: {e}"), &ev_tx),
                    }
                    if let Some(reason) = should_stop(&rules, &passes) {
                        tracing::info!("file sync converged: {reason}");
                        let _ = ev_tx.send(Event::Converged(reason));
                        break;
                    }
                }
                if final_rx.recv().is_err() {
                    return Err("file sync abandoned".into());
                }
                match sender.pass(&mut conn, true).and_then(|p| {
                    passes.push(p);
                    sender.finish(&mut conn)
                }) {
                    Ok(()) => Ok(passes),
                    Err(e) => fail(format!("file sync (final pass): {e}"), &ev_tx),
                }
            })
            .expect("spawn fs-sync thread");
        SourceSync {
            go_final,
            events,
            thread: Some(thread),
            reason: None,
        }
    }

    /// Waits until the live passes converged.
    pub fn wait_converged(&mut self) -> Result<(), String> {
        if self.reason.is_some() {
            return Ok(());
        }
        match self.events.recv() {
            Ok(Event::Converged(r)) => {
                self.reason = Some(r);
                Ok(())
            }
            Ok(Event::Failed(e)) => Err(e),
            Err(_) => Err("the file sync thread ended unexpectedly".into()),
        }
    }

    /// Runs the final pass (the workload must be frozen or stopped) and
    /// returns every pass's statistics and why the live passes stopped.
    pub fn final_pass(mut self) -> Result<(Vec<PassStats>, String), String> {
        self.wait_converged()?;
        let _ = self.go_final.send(());
        let t = self.thread.take().expect("sync thread");
        let passes = t
            .join()
            .map_err(|_| "the file sync thread panicked".to_string())??;
        Ok((passes, self.reason.take().unwrap_or_default()))
    }
}

/// The destination's sync thread.
pub struct DestSync {
    result: Rx<Result<Vec<PassStats>, String>>,
}

impl DestSync {
    /// Serves the source's passes on `conn` into `roots` (opened, and
    /// checked against the destination's policy, in its pre-flight).
    pub fn start(mut conn: Conn, roots: Vec<Root>) -> Result<DestSync, String> {
        let mut receiver = Receiver::with_roots(roots);
        let (tx, result) = channel();
        std::thread::Builder::new()
            .name("fs-sync".into())
            .spawn(move || {
                let r = receiver.serve(&mut conn).map_err(|e| e.to_string());
                let _ = tx.send(r);
            })
            .map_err(|e| e.to_string())?;
        Ok(DestSync { result })
    }

    /// Waits for the source to finish its final pass.
    pub fn finished(self, timeout: Duration) -> Result<Vec<PassStats>, String> {
        match self.result.recv_timeout(timeout) {
            Ok(r) => r.map_err(|e| format!("file sync: {e}")),
            Err(_) => Err("the file sync did not finish".into()),
        }
    }
}
