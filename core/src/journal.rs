//! The journal: each side's durable record of the decisions it took in a
//! migration, written (and fsynced) *before* the decision is acted on, so
//! that a phaul that died can be followed by one that knows the truth.
//!
//! One small JSON file per session and side (`src-<session>.json`,
//! `dst-<session>.json`) in the journal directory
//! ([`DEFAULT_DIR`]); every update replaces the file atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the
//! directory). A restarted `phaul serve` answers "what became of session S"
//! from it, and `phaul recover` finishes what the records say is
//! unfinished ([`crate::engine::recover`]).
//!
//! The states, in the order a migration writes them:
//!
//! - source: [`State::Started`] (the tree is about to freeze) ->
//!   [`State::Committing`] (written before SIGSTOP is queued to the frozen
//!   tree and `Commit` is sent: from here the source copy never runs again
//!   without a decision) -> [`State::Migrated`] or [`State::RolledBack`];
//! - destination: [`State::Started`] (accepted) -> [`State::Restored`]
//!   (restored and held, never ran) -> [`State::Committing`] (the source's
//!   `Commit` arrived; written before CRIU is told to let the copy run) ->
//!   [`State::Migrated`] (the copy runs here) or [`State::RolledBack`].

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the journal lives unless `--journal-dir` or `$PHAUL_JOURNAL_DIR`
/// says otherwise (persistent storage, so that it survives a reboot).
pub const DEFAULT_DIR: &str = "/var/lib/phaul/journal";

/// The journal directory: `$PHAUL_JOURNAL_DIR`, else [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os("PHAUL_JOURNAL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Which side wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The host the workload leaves.
    Source,
    /// The host the workload moves to.
    Destination,
}

impl Side {
    fn prefix(self) -> &'static str {
        match self {
            Side::Source => "src",
            Side::Destination => "dst",
        }
    }

    /// `source` or `destination`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// How far a migration got, as one side recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Under way; nothing is decided yet.
    Started,
    /// Destination only: its copy is restored and held (it never ran).
    Restored,
    /// The commit is under way: on the source the tree may be stopped
    /// (SIGSTOP) and `Commit` may have been sent; on the destination the
    /// `Commit` arrived and the copy may be running.
    Committing,
    /// Post-copy: the destination's copy runs while its memory still
    /// arrives. The source's copy is stopped and serves the pages; the
    /// destination's copy waits on any page it lacks. Neither side may
    /// discard its copy on its own.
    PostCopy,
    /// Finished: the workload runs on the destination.
    Migrated,
    /// Finished: the workload runs on the source (or, on the destination,
    /// this side's copy was discarded).
    RolledBack,
}

impl State {
    /// Whether the migration is finished on this side.
    pub fn is_final(self) -> bool {
        matches!(self, State::Migrated | State::RolledBack)
    }
}

/// A process of the workload, named so that a reused pid is not mistaken
/// for it: its start time (clock ticks since boot, `/proc/PID/stat` field
/// 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The pid in this host's PID namespace.
    pub pid: i32,
    /// Its start time.
    pub start_time: u64,
}

/// One side's record of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The session id.
    pub session: u64,
    /// Who wrote it.
    pub side: Side,
    /// How far it got.
    pub state: State,
    /// The htype and workload id.
    pub htype: String,
    /// The workload id on the source.
    pub id: String,
    /// Live or restart (`live`, `restart`).
    pub mode: String,
    /// Source only: the destination's address, to ask it later (none for
    /// connections an embedder handed in).
    pub peer: Option<String>,
    /// Source only: the name the destination's TLS certificate was checked
    /// against (none over `--insecure` TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// The workload's processes on this side (source: the frozen tree;
    /// destination: the restored root, once known).
    pub tasks: Vec<Task>,
    /// The phaul process that runs the session (while it lives, nobody
    /// else acts on the record).
    pub owner: Option<Task>,
    /// A note on the last change, for people reading the file.
    pub note: String,
    /// Seconds since the epoch of the last change.
    pub updated: u64,
}

impl Record {
    /// A new record in [`State::Started`].
    pub fn new(session: u64, side: Side, htype: &str, id: &str, mode: &str) -> Record {
        Record {
            session,
            side,
            state: State::Started,
            htype: htype.into(),
            id: id.into(),
            mode: mode.into(),
            peer: None,
            peer_name: None,
            tasks: Vec::new(),
            owner: None,
            note: String::new(),
            updated: 0,
        }
    }

    /// The session id as phaul prints it.
    pub fn session_hex(&self) -> String {
        format!("{:016x}", self.session)
    }
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal {}: {source} (check --journal-dir)", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record could not be parsed.
    #[error("journal {}: not a phaul journal record ({detail})", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The directory is not safe to trust (others may write it).
    #[error("journal directory {}: {why}", path.display())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// A journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    /// Opens (creating it, mode 0700) the journal in `dir`. A directory
    /// that others can write, that belongs to another user, or that is not
    /// a directory (a symlink included) is refused: the journal decides
    /// what happens to workloads. The checks are those of the work root
    /// ([`crate::workdir::open_root`]: made with `mkdir`, opened with
    /// `O_NOFOLLOW`, checked on the open descriptor).
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        crate::workdir::open_root(
            dir,
            "journal directory",
            "remove it (phaul creates it itself) or pass --journal-dir DIR",
        )
        .map_err(|e| match e {
            crate::Error::UnsafeDir { why, .. } => JournalError::Unsafe {
                path: dir.to_path_buf(),
                why,
            },
            crate::Error::Path { source, path, .. } => JournalError::Io { path, source },
            other => JournalError::Unsafe {
                path: dir.to_path_buf(),
                why: other.to_string(),
            },
        })?;
        Ok(Journal {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, side: Side, session: u64) -> PathBuf {
        self.dir
            .join(format!("{}-{session:016x}.json", side.prefix()))
    }

    /// Writes `rec` durably (replacing the previous version): when this
    /// returns `Ok`, the record survives a crash of this process or of the
    /// machine.
    pub fn write(&self, rec: &mut Record) -> Result<(), JournalError> {
        rec.updated = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = self.path(rec.side, rec.session);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(rec).expect("a record serialises");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&text).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// Sets the state (and note) of `rec` and writes it.
    pub fn set(&self, rec: &mut Record, state: State, note: &str) -> Result<(), JournalError> {
        rec.state = state;
        rec.note = note.to_string();
        self.write(rec)
    }

    /// Reads the record of `session` written by `side`, if there is one.
    pub fn read(&self, side: Side, session: u64) -> Result<Option<Record>, JournalError> {
        let path = self.path(side, session);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| JournalError::Corrupt {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(JournalError::Io { path, source: e }),
        }
    }

    /// Every record in the journal, oldest change first. Files that are
    /// not records are reported, not fatal.
    pub fn all(&self) -> Result<(Vec<Record>, Vec<JournalError>), JournalError> {
        let mut recs = Vec::new();
        let mut bad = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            let path = e.path();
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with("src-") || name.starts_with("dst-")) || !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(&path) {
                Ok(b) => match serde_json::from_slice::<Record>(&b) {
                    Ok(r) => recs.push(r),
                    Err(err) => bad.push(JournalError::Corrupt {
                        path,
                        detail: err.to_string(),
                    }),
                },
                Err(source) => bad.push(JournalError::Io { path, source }),
            }
        }
        recs.sort_by_key(|r| (r.updated, r.session));
        Ok((recs, bad))
    }

    /// Removes finished records older than `max_age` seconds, keeping the
    /// journal small; unfinished ones are never removed.
    pub fn prune(&self, max_age: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Ok((recs, _)) = self.all() {
            for r in recs
                .iter()
                .filter(|r| r.state.is_final() && now.saturating_sub(r.updated) > max_age)
            {
                let _ = std::fs::remove_file(self.path(r.side, r.session));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_updates_replace_them() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(&d.path().join("j")).unwrap();
        let mut r = Record::new(0xabc, Side::Source, "pid", "42", "live");
        r.peer = Some("127.0.0.1:7070".into());
        r.tasks = vec![Task {
            pid: 42,
            start_time: 7,
        }];
        j.write(&mut r).unwrap();
        j.set(&mut r, State::Committing, "stopping the tree")
            .unwrap();
        let j2 = Journal::open(&d.path().join("j")).unwrap();
        let back = j2.read(Side::Source, 0xabc).unwrap().unwrap();
        assert_eq!(back.state, State::Committing);
        assert_eq!(back.tasks, r.tasks);
        assert_eq!(back.peer.as_deref(), Some("127.0.0.1:7070"));
        assert!(j2.read(Side::Destination, 0xabc).unwrap().is_none());
        let (all, bad) = j2.all().unwrap();
        assert_eq!(all.len(), 1);
        assert!(bad.is_empty());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(j2.dir()).unwrap().count(), 1);
    }

    #[test]
    fn a_corrupt_record_is_reported_and_others_still_read() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let mut r = Record::new(1, Side::Destination, "pid", "1", "live");
        j.write(&mut r).unwrap();
        std::fs::write(d.path().join("src-0000000000000002.json"), b"{not json").unwrap();
        let (all, bad) = j.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("not a phaul journal record"));
        assert!(j.read(Side::Source, 2).is_err());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Journal::open(d.path()).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
    }

    #[test]
    fn a_symlink_as_the_journal_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("j")).unwrap();
        let e = Journal::open(&d.path().join("j")).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    #[test]
    fn pruning_keeps_unfinished_records() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let mut done = Record::new(1, Side::Source, "pid", "1", "live");
        j.set(&mut done, State::Migrated, "").unwrap();
        let mut open = Record::new(2, Side::Source, "pid", "2", "live");
        j.set(&mut open, State::Committing, "").unwrap();
        // Age both artificially.
        for (side, s) in [(Side::Source, 1u64), (Side::Source, 2)] {
            let mut r = j.read(side, s).unwrap().unwrap();
            let path = j.path(side, s);
            r.updated = 1;
            std::fs::write(path, serde_json::to_vec(&r).unwrap()).unwrap();
        }
        j.prune(60);
        assert!(j.read(Side::Source, 1).unwrap().is_none());
        assert!(j.read(Side::Source, 2).unwrap().is_some());
    }
}
