//! Resuming a broken post-copy transfer (`phaul recover` on the source).
//!
//! While a transfer runs, the destination's pager writes what a later
//! pager needs into an event log in the journal directory: the keeper
//! (which holds every userfaultfd), each task's userfaultfd number in the
//! keeper and the ranges it still lacked at the switch, and every change
//! the workload made to its address space since (ranges dropped or moved,
//! forks). A resumed pager takes the userfaultfds back from the keeper
//! (`pidfd_getfd`), replays the log, and asks only for the pages that are
//! neither present in the copy now (`/proc/PID/pagemap`) nor dropped by
//! the workload since: a dropped range is never filled with stale data.
//! A workload that forked during the transfer is not resumed (the log
//! cannot name the child's task); the operator decides as before.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pager::{PagerEnd, PagerStats};
use super::uffd::PAGE;
use crate::conn::Conn;
use crate::journal::Task;

/// The event log of session `session` in `journal_dir`.
pub fn log_path(journal_dir: &Path, session: u64) -> PathBuf {
    journal_dir.join(format!("postcopy-{session:016x}.events"))
}

/// The pager's side: appends one line per event.
#[derive(Debug)]
pub struct EventLog(std::fs::File);

impl EventLog {
    /// Creates (truncates) the log.
    pub fn create(path: &Path) -> std::io::Result<EventLog> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map(EventLog)
    }

    /// One line (written at once: a dying pager leaves whole lines).
    pub fn line(&mut self, l: &str) {
        if let Err(e) = self.0.write_all(format!("{l}\n").as_bytes()) {
            tracing::warn!("post-copy event log: {e}");
        }
    }
}

/// A session is over on this side: its keeper (if the log names one that
/// still runs) lets go, and the log goes.
pub fn discard(journal_dir: &Path, session: u64) {
    let path = log_path(journal_dir, session);
    if let Ok(l) = parse_log(&path) {
        if let Some(k) = l.keeper {
            if crate::proc::task_state(&k) != crate::proc::TaskState::Gone {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(k.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

/// One task as the log describes it.
#[derive(Debug, Default)]
struct LoggedTask {
    fd: RawFd,
    vpid: i32,
    missing: BTreeRanges,
}

type BTreeRanges = std::collections::BTreeMap<u64, (u64, u64)>;

/// What the log says.
#[derive(Debug, Default)]
struct Logged {
    keeper: Option<Task>,
    tasks: Vec<LoggedTask>,
    forked: bool,
}

fn parse_log(path: &Path) -> Result<Logged, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut l = Logged::default();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> Result<u64, String> {
            w.get(i)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("a malformed line in {}: {line:?}", path.display()))
        };
        let task = |l: &mut Logged, i: u64| -> Result<usize, String> {
            let i = i as usize;
            match i < l.tasks.len() {
                true => Ok(i),
                false => Err(format!("the log names task {i}, which it never described")),
            }
        };
        match w.first().copied() {
            Some("K") => {
                l.keeper = Some(Task {
                    pid: n(1)? as i32,
                    start_time: n(2)?,
                })
            }
            Some("T") => l.tasks.push(LoggedTask {
                fd: n(2)? as RawFd,
                vpid: n(3)? as i32,
                ..Default::default()
            }),
            Some("r") => {
                let i = task(&mut l, n(1)?)?;
                l.tasks[i].missing.insert(n(2)?, (n(3)?, n(4)?));
            }
            Some("R") => {
                let i = task(&mut l, n(1)?)?;
                super::pager::cut(&mut l.tasks[i].missing, n(2)?, n(3)?);
            }
            Some("M") => {
                let i = task(&mut l, n(1)?)?;
                super::pager::move_ranges(&mut l.tasks[i].missing, n(2)?, n(3)?, n(4)?);
            }
            Some("F") => l.forked = true,
            _ => {}
        }
    }
    Ok(l)
}

/// Removes from `m` the pages present in `pid`'s address space now.
fn drop_present(pid: i32, m: &mut BTreeRanges) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
    let ranges: Vec<(u64, (u64, u64))> = m.iter().map(|(&s, &v)| (s, v)).collect();
    let mut buf = Vec::new();
    for (s, (e, _)) in ranges {
        let pages = ((e - s) / PAGE) as usize;
        buf.resize(pages * 8, 0);
        f.read_exact_at(&mut buf, s / PAGE * 8)
            .map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            // Present or swapped: the page is there.
            if v & (3 << 62) != 0 {
                let a = s + i as u64 * PAGE;
                super::pager::cut(m, a, a + PAGE);
            }
        }
    }
    Ok(())
}

fn pidfd_getfd(pidfd: RawFd, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// What a resumed pager starts from.
pub struct Resumable {
    /// The keeper, which still holds the userfaultfds.
    pub keeper: Task,
    /// Per task: the source's pid for it, its userfaultfd, what it lacks.
    tasks: Vec<(i32, OwnedFd, BTreeRanges)>,
}

impl Resumable {
    /// Pages still missing.
    pub fn missing(&self) -> u64 {
        self.tasks
            .iter()
            .flat_map(|t| t.2.iter())
            .map(|(&s, &(e, _))| (e - s) / PAGE)
            .sum()
    }
}

/// Gathers what a resumed pager needs for the copy whose root is `root`
/// (this host's pid), from the log at `log`.
pub fn prepare(log: &Path, root: &Task) -> Result<Resumable, String> {
    let l = parse_log(log)?;
    if l.forked {
        return Err(
            "the workload forked during the transfer; a resumed transfer could not name \
                    the child's memory"
                .into(),
        );
    }
    let keeper = l
        .keeper
        .ok_or("the transfer never reached the switch (no keeper in its log)")?;
    if crate::proc::task_state(&keeper) == crate::proc::TaskState::Gone {
        return Err(format!(
            "the keeper (pid {}) that held the copy's userfaultfds is gone: its missing pages \
             may have been made zero pages; the copy here cannot be trusted",
            keeper.pid
        ));
    }
    if crate::proc::task_state(root) == crate::proc::TaskState::Gone {
        return Err(format!("the copy (pid {}) is gone", root.pid));
    }
    let by_vpid: HashMap<i32, i32> = crate::proc::tree(root.pid)
        .into_iter()
        .filter_map(|p| Some((*crate::proc::ns_pids(p).last()?, p)))
        .collect();
    let kfd = crate::proc::pidfd_open(keeper.pid)
        .map_err(|e| format!("pidfd_open({}): {e}", keeper.pid))?;
    let mut tasks = Vec::new();
    for t in l.tasks {
        let Some(&host) = by_vpid.get(&t.vpid) else {
            // The task exited: nothing to fetch for it.
            continue;
        };
        let fd = pidfd_getfd(kfd.as_raw_fd(), t.fd)
            .map_err(|e| format!("taking userfaultfd {} from the keeper: {e}", t.fd))?;
        let mut missing = t.missing;
        drop_present(host, &mut missing)?;
        tasks.push((t.vpid, fd, missing));
    }
    Ok(Resumable { keeper, tasks })
}

/// Runs a resumed pager over `mem` until every page is in (or it breaks
/// again); the keeper is ended once every page is in.
pub fn run(r: Resumable, mem: Conn, stall: Duration) -> PagerEnd {
    let keeper = r.keeper;
    let end = super::pager::resumed(r.tasks, mem, stall);
    if matches!(end, PagerEnd::AllIn(_))
        && crate::proc::task_state(&keeper) != crate::proc::TaskState::Gone
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(keeper.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let mut status = 0;
        // SAFETY: reaps it if it is our child (ECHILD otherwise).
        unsafe { libc::waitpid(keeper.pid, &mut status, 0) };
    }
    end
}

/// A resumed transfer's outcome, in one line.
pub fn describe(end: &PagerEnd) -> String {
    match end {
        PagerEnd::AllIn(PagerStats { placed, .. }) => {
            format!("the page transfer resumed and finished ({placed} pages placed)")
        }
        PagerEnd::Broken { why, missing, .. } => {
            format!("the resumed page transfer broke again with {missing} pages missing: {why}")
        }
        PagerEnd::Stopped(why) => format!("the resumed page transfer stopped: {why}"),
    }
}

/// The destination's side of a resume request on `control` (a fresh
/// connection whose first frame was `ResumePages`): checks the session,
/// answers, then runs the resumed pager on the same connection.
pub fn destination(
    journal_dir: &Path,
    session: u64,
    mut control: crate::engine::session::Control,
    stall: Duration,
) -> Result<String, String> {
    use crate::journal::{Journal, Side, State};
    use crate::proto::{Msg, Refusal};
    let prepared = (|| -> Result<(Journal, crate::journal::Record, Resumable), String> {
        let journal = Journal::open(journal_dir).map_err(|e| e.to_string())?;
        let rec = journal
            .read(Side::Destination, session)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("this host has no record of session {session:016x}"))?;
        if rec.state != State::PostCopy {
            return Err(format!(
                "session {session:016x} is not a broken post-copy transfer here (it is {:?})",
                rec.state
            ));
        }
        let root = *rec.tasks.first().ok_or("the record names no copy")?;
        let r = prepare(&log_path(journal_dir, session), &root)?;
        Ok((journal, rec, r))
    })();
    let (journal, mut rec, r) = match prepared {
        Ok(p) => p,
        Err(reason) => {
            let _ = control.write(&Msg::Refused {
                kind: Refusal::Other,
                reason: reason.clone(),
            });
            return Err(reason);
        }
    };
    let missing = r.missing();
    tracing::info!(missing, "resuming the post-copy transfer");
    control
        .send(&Msg::ResumeReady { missing })
        .map_err(|e| e.to_string())?;
    let conn = control.conn().try_clone().map_err(|e| e.to_string())?;
    rec.owner = crate::proc::this_task();
    let end = run(r, conn, stall);
    let said = describe(&end);
    match end {
        PagerEnd::AllIn(_) => {
            journal
                .set(&mut rec, State::Migrated, &said)
                .map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(log_path(journal_dir, session));
            Ok(said)
        }
        _ => {
            let _ = journal.set(&mut rec, State::PostCopy, &said);
            Err(said)
        }
    }
}

/// The source's side (`phaul recover`): asks `remote` to resume session
/// `session` and serves the pages from the stopped tasks until every page
/// is in. `Ok(pages)` once the destination has them all (the caller then
/// removes the source copy and confirms with [`super::serve::released`]).
pub fn source(
    remote: &crate::transport::Remote,
    session: u64,
    tasks: &[Task],
    stall: Duration,
) -> Result<(u64, crate::engine::session::Control), String> {
    use crate::proto::Msg;
    let c = remote
        .dial(Duration::from_secs(3))
        .map_err(|e| format!("cannot reach {}: {e}", remote.addr))?;
    crate::proto::write_preamble(&mut &c).map_err(|e| e.to_string())?;
    let mut control =
        crate::engine::session::Control::with_peer(c, "destination").map_err(|e| e.to_string())?;
    control
        .send(&Msg::ResumePages { session })
        .map_err(|e| e.to_string())?;
    let _ = control
        .conn()
        .set_deadline(Some(std::time::Instant::now() + Duration::from_secs(30)));
    match control.recv("ResumeReady") {
        Ok(Msg::ResumeReady { missing }) => {
            tracing::info!(
                missing,
                "the destination waits for its missing pages: serving them"
            )
        }
        Ok(other) => return Err(format!("the destination answered {}", other.name())),
        Err(e) => return Err(format!("the destination refused to resume: {e}")),
    }
    let _ = control.conn().set_deadline(None);
    let pids = super::serve::vpid_map(tasks);
    let counts = super::serve::ServeCounts::default();
    match super::serve::serve(control.conn(), &pids, stall, &counts) {
        super::serve::Served::AllIn { pages } => Ok((pages, control)),
        super::serve::Served::Broken(why) => Err(why),
    }
}
