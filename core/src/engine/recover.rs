//! Recovery: finishing what the journal says a phaul that died (or could
//! not decide) left unfinished — `phaul recover`, and a restarted
//! `phaul serve` answering "what became of session S" truthfully.
//!
//! On the source, a session recorded as `Committing` has its tree stopped
//! (or frozen and about to be stopped): the destination is asked what
//! became of it, and the answer decides — it runs there: kill the source
//! copy; it was discarded there: resume the source copy; no answer: leave
//! it stopped and say so (an operator may decide explicitly with
//! [`Decision`]). A session recorded as `Started` never had `Commit` sent,
//! so CRIU resumed its tree when phaul died: nothing is left to do.
//!
//! On the destination the record alone decides: a copy that was only
//! restored (held, never ran) is killed; a copy whose commit arrived
//! runs if it is alive, and the session counts as migrated; a committed
//! copy that is gone counts as discarded (the source, still stopped,
//! resumes).

use std::time::Duration;

use serde::Serialize;

use super::session::{self, Verdict};
use crate::journal::{Journal, JournalError, Record, Side, State};
use crate::proc::{self, TaskState};
use crate::proto::Outcome;

/// An operator's explicit decision for a session nobody can decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Resume the stopped source copy (the destination certainly does not
    /// run it — the operator checked).
    ResumeSource,
    /// Remove the stopped source copy (the destination runs it).
    KillSource,
}

/// What `phaul recover` should do.
#[derive(Debug, Clone)]
pub struct RecoverOptions {
    /// How long to keep asking an unreachable destination, per session.
    pub timeout: Duration,
    /// Explicit decisions for sessions (by id).
    pub decisions: Vec<(u64, Decision)>,
    /// This host's TLS identity, to ask destinations that were reached
    /// over TLS (sessions that went over `--insecure` TCP need none).
    pub tls: Option<std::sync::Arc<crate::transport::TlsClient>>,
}

/// The destination a source record names, secured as the migration was.
fn remote_of(
    rec: &Record,
    peer: &str,
    opts: &RecoverOptions,
) -> Result<crate::transport::Remote, String> {
    use crate::transport::Remote;
    let addr = peer
        .parse()
        .map_err(|_| format!("the recorded destination {peer:?} is not an address"))?;
    match (&rec.peer_name, &opts.tls) {
        (Some(name), Some(tls)) => Ok(Remote::tls(addr, tls.clone(), name)),
        (Some(_), None) => Err(format!(
            "the migration to {peer} used TLS: pass --tls-dir to ask the destination"
        )),
        (None, _) => Remote::insecure(addr).map_err(|e| e.to_string()),
    }
}

/// What recovery did with one session.
#[derive(Debug, Clone, Serialize)]
pub struct Action {
    /// The session id (hex).
    pub session: String,
    /// `source` or `destination`.
    pub side: &'static str,
    /// What was done: `killed-source`, `resumed-source`, `killed-copy`,
    /// `kept-copy`, `nothing`, `left-stopped`, `left-alone`.
    pub action: &'static str,
    /// One line for people.
    pub message: String,
    /// Still undecided afterwards.
    pub pending: bool,
}

impl Action {
    fn new(rec: &Record, action: &'static str, message: String, pending: bool) -> Action {
        Action {
            session: rec.session_hex(),
            side: rec.side.name(),
            action,
            message,
            pending,
        }
    }
}

/// Whether the phaul that wrote `rec` still runs it (then nobody else
/// touches it).
pub fn owner_alive(rec: &Record) -> bool {
    rec.owner.is_some_and(|o| {
        o.pid != std::process::id() as i32 && proc::task_state(&o) != TaskState::Gone
    })
}

/// Finishes every unfinished session in `journal` (both sides' records).
pub fn recover(journal: &Journal, opts: &RecoverOptions) -> Result<Vec<Action>, JournalError> {
    let (records, bad) = journal.all()?;
    let mut actions = Vec::new();
    for e in bad {
        tracing::warn!("{e}");
    }
    for mut rec in records.into_iter().filter(|r| !r.state.is_final()) {
        if owner_alive(&rec) {
            let owner = rec.owner.map_or(0, |o| o.pid);
            actions.push(Action::new(
                &rec,
                "left-alone",
                format!("phaul (pid {owner}) is still running this migration"),
                true,
            ));
            continue;
        }
        let a = match rec.side {
            Side::Source => recover_source(journal, &mut rec, opts)?,
            Side::Destination => reconcile_destination(journal, &mut rec)?,
        };
        actions.push(a);
    }
    Ok(actions)
}

fn recover_source(
    journal: &Journal,
    rec: &mut Record,
    opts: &RecoverOptions,
) -> Result<Action, JournalError> {
    let root = rec.tasks.first().map_or(0, |t| t.pid);
    if rec.mode == "restart" {
        return Ok(Action::new(
            rec,
            "left-alone",
            "a restart-mode session: check the destination, then start the workload there or here"
                .into(),
            true,
        ));
    }
    if rec.state == State::Started {
        // `Commit` was never sent: CRIU resumed the tree when phaul died.
        let msg = match proc::any_exists(&rec.tasks) {
            true => format!(
                "the migration never committed; the source copy (pid {root}) runs as before"
            ),
            false => format!(
                "the migration never committed; the source copy (pid {root}) is gone (it exited by itself)"
            ),
        };
        proc::signal_tasks(&rec.tasks, nix::sys::signal::Signal::SIGCONT);
        journal.set(rec, State::RolledBack, &msg)?;
        return Ok(Action::new(rec, "nothing", msg, false));
    }
    // Committing: the tree is stopped; the destination's answer decides.
    let explicit = opts
        .decisions
        .iter()
        .find(|(s, _)| *s == rec.session)
        .map(|(_, d)| *d);
    let mut decided: Option<Verdict> = None;
    if rec.state == State::PostCopy && explicit.is_none() {
        // The destination's copy runs on memory only this stopped copy
        // holds in full: resume the page transfer, or leave the decision
        // to the operator.
        if !proc::any_exists(&rec.tasks) {
            return Ok(Action::new(
                rec,
                "left-alone",
                format!(
                    "the post-copy page transfer broke and the stopped source copy (pid {root}) is \
                     gone: the pages the destination's copy still lacks exist nowhere else, so \
                     that copy cannot be completed ({})",
                    rec.note
                ),
                true,
            ));
        }
        let why = match rec.peer.as_deref() {
            Some(peer) => match remote_of(rec, peer, opts) {
                Ok(remote) => {
                    let stall = opts.timeout.max(Duration::from_secs(5));
                    match crate::postcopy::resume::source(&remote, rec.session, &rec.tasks, stall) {
                        Ok((pages, control)) => {
                            let gone = proc::kill_tasks(&rec.tasks, Duration::from_secs(10));
                            let _ = crate::postcopy::serve::released(control.conn());
                            let msg = format!(
                                "resumed the post-copy page transfer: the destination has every \
                                 page now ({pages} placed); removed the stopped source copy \
                                 (pid {root}){}",
                                if gone { "" } else { ", but it did not go away" }
                            );
                            journal.set(rec, State::Migrated, &msg)?;
                            return Ok(Action::new(rec, "resumed-transfer", msg, !gone));
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            },
            None => "the connections were handed in by an embedder".into(),
        };
        // The destination may have discarded its copy (its CRIU kills a
        // copy whose restore its phaul did not see through): then this
        // stopped copy is the workload, and resumes below.
        let asked = match rec.peer.as_deref().map(|p| remote_of(rec, p, opts)) {
            Some(Ok(remote)) => session::ask(&remote, rec.session, opts.timeout, None),
            _ => Verdict::NoAnswer(String::new()),
        };
        if asked == Verdict::Discarded {
            decided = Some(Verdict::Discarded);
        } else {
            return Ok(Action::new(
                rec,
                "left-stopped",
                format!(
                "the post-copy page transfer broke: the destination's copy runs but waits on pages \
                 that only this stopped copy (pid {root}) holds ({note}), and resuming the \
                 transfer failed: {why}. Run `phaul recover` again once the destination is \
                 reachable, or decide: `phaul recover --resume-source {s}` once the destination's \
                 copy is killed there (the workload then continues from its freeze point here, \
                 forgetting what it did there), or `--kill-source {s}` to give the missing pages \
                 up (the destination's copy then waits on them forever)",
                note = rec.note,
                s = rec.session_hex()
            ),
                true,
            ));
        }
    }
    let verdict = match (decided, explicit, rec.peer.as_deref()) {
        (Some(v), ..) => v,
        (None, Some(Decision::KillSource), _) => Verdict::Runs,
        (None, Some(Decision::ResumeSource), _) => Verdict::Discarded,
        (None, None, Some(peer)) => match remote_of(rec, peer, opts) {
            Ok(remote) => session::ask(&remote, rec.session, opts.timeout, None),
            Err(why) => Verdict::NoAnswer(why),
        },
        (None, None, None) => {
            Verdict::NoAnswer("the connections were handed in by an embedder".into())
        }
    };
    let how = if explicit.is_some() {
        "as the operator decided"
    } else {
        "the destination says so"
    };
    Ok(match verdict {
        Verdict::Runs => {
            let gone = proc::kill_tasks(&rec.tasks, Duration::from_secs(10));
            let msg = format!(
                "the workload runs on the destination ({how}): removed the stopped source copy (pid {root}){}",
                if gone { "" } else { ", but it did not go away" }
            );
            journal.set(rec, State::Migrated, &msg)?;
            Action::new(rec, "killed-source", msg, !gone)
        }
        Verdict::Discarded => {
            let exists = proc::any_exists(&rec.tasks);
            proc::signal_tasks(&rec.tasks, nix::sys::signal::Signal::SIGCONT);
            let msg = match exists {
                true => format!(
                    "the destination does not run the workload ({how}): resumed the source copy (pid {root})"
                ),
                false => format!(
                    "the destination does not run the workload ({how}), and the source copy (pid {root}) is gone: the workload is lost"
                ),
            };
            journal.set(rec, State::RolledBack, &msg)?;
            Action::new(rec, "resumed-source", msg, false)
        }
        Verdict::Unknown => Action::new(
            rec,
            "left-stopped",
            format!(
                "the destination ({}) has no record of this migration; the source copy (pid {root}) stays stopped: \
                 check the destination, then `phaul recover --resume-source {s}` or `--kill-source {s}`",
                rec.peer.as_deref().unwrap_or("?"),
                s = rec.session_hex()
            ),
            true,
        ),
        Verdict::NoAnswer(why) => Action::new(
            rec,
            "left-stopped",
            format!(
                "cannot tell whether the destination runs the workload ({why}); the source copy (pid {root}) stays \
                 stopped: run `phaul recover` again when the destination is reachable, or decide with \
                 `--resume-source {s}` / `--kill-source {s}`",
                s = rec.session_hex()
            ),
            true,
        ),
    })
}

/// Settles a destination record whose phaul is gone, from the record and
/// the state of the copy it names.
pub fn reconcile_destination(journal: &Journal, rec: &mut Record) -> Result<Action, JournalError> {
    let root = rec.tasks.first().copied();
    let pid = root.map_or(0, |t| t.pid);
    let state = root.map_or(TaskState::Gone, |t| proc::task_state(&t));
    let (final_state, action, msg) = match rec.state {
        State::Started => (
            State::RolledBack,
            "nothing",
            "nothing was restored here; the session is discarded".to_string(),
        ),
        State::Restored => {
            let killed = root.is_some_and(|t| proc::kill_tasks(&[t], Duration::from_secs(10)));
            (
                State::RolledBack,
                if state == TaskState::Gone { "nothing" } else { "killed-copy" },
                match (state, killed) {
                    (TaskState::Gone, _) => "the held copy never ran and is gone; the session is discarded".into(),
                    (_, true) => format!("killed the held copy (pid {pid}), which never ran; the session is discarded"),
                    (_, false) => format!("the held copy (pid {pid}) did not go away"),
                },
            )
        }
        State::Committing | State::Migrated if state != TaskState::Gone => (
            State::Migrated,
            "kept-copy",
            format!("the source committed and the copy (pid {pid}) runs here"),
        ),
        State::PostCopy if state != TaskState::Gone => {
            return Ok(Action::new(
                rec,
                "left-alone",
                format!(
                    "the copy (pid {pid}) runs here but its memory was still arriving when the \
                     transfer broke ({}); its threads wait on the missing pages (a keeper process \
                     holds its userfaultfds, so none becomes a zero page). Decide on the source \
                     with `phaul recover`; to give this copy up, kill it (pid {pid})",
                    rec.note
                ),
                true,
            ))
        }
        State::PostCopy => (
            State::RolledBack,
            "nothing",
            format!("the post-copy copy (pid {pid}) is gone; the source's stopped copy is the workload"),
        ),
        State::Committing => (
            State::RolledBack,
            "nothing",
            format!("the source committed but the copy (pid {pid}) is gone; the session is discarded (the source resumes)"),
        ),
        State::Migrated | State::RolledBack => {
            return Ok(Action::new(rec, "nothing", "finished".into(), false))
        }
    };
    journal.set(rec, final_state, &msg)?;
    // A post-copy keeper of a session that is over holds nothing anyone
    // needs.
    crate::postcopy::resume::discard(journal.dir(), rec.session);
    Ok(Action::new(rec, action, msg, false))
}

/// What the destination answers about a session from its journal
/// (settling it first if the phaul that ran it is gone).
pub fn destination_outcome(journal: &Journal, session: u64) -> Outcome {
    let mut rec = match journal.read(Side::Destination, session) {
        Ok(Some(r)) => r,
        Ok(None) => return Outcome::Unknown,
        Err(e) => {
            tracing::warn!("{e}");
            return Outcome::InProgress;
        }
    };
    if rec.state == State::PostCopy {
        // The copy runs here (its memory still arriving or waiting for a
        // resumed transfer): the source must never resume its own.
        return Outcome::Resumed;
    }
    if !rec.state.is_final() {
        if owner_alive(&rec) {
            return Outcome::InProgress;
        }
        if let Err(e) = reconcile_destination(journal, &mut rec) {
            tracing::warn!("{e}");
            return Outcome::InProgress;
        }
    }
    match rec.state {
        State::Migrated => Outcome::Resumed,
        State::RolledBack => Outcome::RolledBack,
        _ => Outcome::InProgress,
    }
}
