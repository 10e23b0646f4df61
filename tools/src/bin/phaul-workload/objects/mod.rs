//! `run --objects KINDS`: small self-checking programs, one per kind of
//! kernel object an ordinary program holds, set up before a migration,
//! exercised while the workload runs, and verified from inside on every
//! SIGUSR1 (the result of each is one entry of `status.json`'s `objects`).
//!
//! Each kind is an [`Object`]: it is created at start-up (before the big
//! memory area exists, so forked helpers stay small), gets the tick loop's
//! counter to keep itself busy, and answers [`Object::verify`] with a
//! [`Check`]: `ok` only when everything the kind promises still holds,
//! `detail` says what was seen. Path-named objects live in
//! `<state-dir>/objects/`, so a test syncing the state directory takes
//! them to the destination "host".

mod fds;
mod files;
mod helper;
mod memory;
mod procs;
mod streams;

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde::Serialize;

/// Directory of the path-named objects inside the state directory.
pub const OBJECTS_DIR: &str = "objects";

/// The kinds `--objects` accepts (comma separated; `all` = every kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Kind {
    /// Every kind below.
    All,
    /// A regular file opened, written, positioned and unlinked: its content
    /// and offset are kept (`objects/unlinked`, gone from the directory).
    UnlinkedFile,
    /// A POSIX (`fcntl F_SETLK`) write lock on bytes 100..300 of
    /// `objects/lock-posix`, seen by a child with `F_GETLK`.
    PosixLock,
    /// A shared `flock` on `objects/lock-flock`: a child cannot take it
    /// exclusively but can share it.
    Flock,
    /// An OFD (`F_OFD_SETLK`) read lock on bytes 0..512 of
    /// `objects/lock-ofd`, seen by a child with `F_OFD_GETLK`.
    OfdLock,
    /// An inotify watch on `objects/watched/`: a file created there during
    /// the check is reported.
    Inotify,
    /// An eventfd whose counter grows by 3 every 10 ticks: the value is kept.
    Eventfd,
    /// A periodic 10 ms CLOCK_MONOTONIC timerfd: still armed, still firing.
    Timerfd,
    /// A signalfd for a blocked real-time signal: a signal queued during the
    /// check (with a fresh value) is read from it.
    Signalfd,
    /// An epoll set of four fds: the three ready ones are reported, the idle
    /// one only after data is written to it.
    Epoll,
    /// A pipe with 16 messages always in flight.
    Pipe,
    /// A FIFO (`objects/fifo`) with 16 messages always in flight.
    Fifo,
    /// A connected unix stream socketpair with 16 messages in flight.
    UnixStream,
    /// A unix datagram socketpair with 16 datagrams of varying length queued.
    UnixDgram,
    /// A unix seqpacket socketpair with 16 records of varying length queued.
    UnixSeqpacket,
    /// A helper listening on a unix socket bound to the relative name
    /// `obj.sock` in its cwd `objects/`: it accepts a connection during the
    /// check.
    UnixListen,
    /// A helper process with three threads, each with its own signal mask
    /// and alternate signal stack, checked by each thread itself.
    Threads,
    /// A helper that keeps an unreaped child which exited with status 42.
    Zombie,
    /// A session of three processes in two process groups, and a fourth
    /// process in a group of its own in the workload's session.
    Session,
    /// A MAP_SHARED anonymous page shared with a child that echoes what the
    /// workload writes.
    SharedMemory,
    /// A PROT_READ region (contents kept) and a PROT_NONE guard page between
    /// two writable pages (checked in /proc/self/maps).
    Mprotect,
}

impl Kind {
    /// The name used on the command line and in `status.json`.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Every concrete kind (all but [`Kind::All`]).
    fn every() -> Vec<Kind> {
        Kind::value_variants()
            .iter()
            .copied()
            .filter(|k| *k != Kind::All)
            .collect()
    }
}

/// The result of one verification of one object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// Everything the object promises held.
    pub ok: bool,
    /// What was seen (or what went wrong).
    pub detail: String,
}

impl Check {
    /// A passed check.
    pub fn pass(detail: impl Into<String>) -> Check {
        Check {
            ok: true,
            detail: detail.into(),
        }
    }

    /// A failed check.
    pub fn fail(detail: impl Into<String>) -> Check {
        Check {
            ok: false,
            detail: detail.into(),
        }
    }

    /// Passed when every listed problem is absent: `problems` empty gives
    /// `pass(detail)`, else `fail` naming the problems, then the detail.
    pub fn unless(problems: Vec<String>, detail: impl Into<String>) -> Check {
        let detail = detail.into();
        if problems.is_empty() {
            Check::pass(detail)
        } else {
            Check::fail(format!("{}; {detail}", problems.join("; ")))
        }
    }
}

/// One kind of object, owned by the tick loop.
pub trait Object {
    /// Per-tick work (the tick counter is passed in).
    fn tick(&mut self, _counter: u64) {}
    /// Checks everything the object promises, from inside.
    fn verify(&mut self) -> Check;
    /// Ends helper processes before the workload exits.
    fn shutdown(&mut self) {}
}

/// Every object the workload holds, with the last verification of each.
pub struct Objects {
    items: Vec<(Kind, Box<dyn Object>)>,
    results: BTreeMap<String, Check>,
}

impl Objects {
    /// Creates the requested kinds (in their declaration order) under
    /// `<state_dir>/objects`, which is emptied first.
    pub fn start(state_dir: &Path, kinds: &[Kind]) -> Result<Objects> {
        let mut kinds: Vec<Kind> = if kinds.contains(&Kind::All) {
            Kind::every()
        } else {
            kinds.to_vec()
        };
        kinds.sort();
        kinds.dedup();
        let dir = state_dir.join(OBJECTS_DIR);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => {}
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = fs::canonicalize(&dir)?;
        let mut objects = Objects {
            items: Vec::new(),
            results: BTreeMap::new(),
        };
        for kind in kinds {
            let object = create(kind, &dir).with_context(|| format!("setting up {}", kind.name()));
            match object {
                Ok(o) => {
                    objects
                        .results
                        .insert(kind.name(), Check::fail("not verified yet"));
                    objects.items.push((kind, o));
                }
                Err(e) => {
                    objects.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(objects)
    }

    /// Per-tick work of every object.
    pub fn tick(&mut self, counter: u64) {
        for (_, o) in &mut self.items {
            o.tick(counter);
        }
    }

    /// Verifies every object and keeps the results for the status.
    pub fn verify(&mut self) {
        for (kind, o) in &mut self.items {
            self.results.insert(kind.name(), o.verify());
        }
    }

    /// The last verification of each kind ("not verified yet" before the
    /// first report).
    pub fn results(&self) -> BTreeMap<String, Check> {
        self.results.clone()
    }

    /// Stops the helper processes.
    pub fn shutdown(&mut self) {
        for (_, o) in &mut self.items {
            o.shutdown();
        }
    }
}

/// Sets up one kind in `dir`.
fn create(kind: Kind, dir: &Path) -> Result<Box<dyn Object>> {
    Ok(match kind {
        Kind::All => unreachable!("expanded by Objects::start"),
        Kind::UnlinkedFile => Box::new(files::UnlinkedFile::new(&dir.join("unlinked"))?),
        Kind::PosixLock => Box::new(files::Lock::new(files::LockKind::Posix, dir)?),
        Kind::Flock => Box::new(files::Lock::new(files::LockKind::Flock, dir)?),
        Kind::OfdLock => Box::new(files::Lock::new(files::LockKind::Ofd, dir)?),
        Kind::Inotify => Box::new(fds::Inotify::new(&dir.join("watched"))?),
        Kind::Eventfd => Box::new(fds::EventFd::new()?),
        Kind::Timerfd => Box::new(fds::TimerFd::new()?),
        Kind::Signalfd => Box::new(fds::SignalFd::new()?),
        Kind::Epoll => Box::new(fds::Epoll::new()?),
        Kind::Pipe => Box::new(streams::Stream::pipe()?),
        Kind::Fifo => Box::new(streams::Stream::fifo(&dir.join("fifo"))?),
        Kind::UnixStream => Box::new(streams::Stream::unix(libc::SOCK_STREAM)?),
        Kind::UnixDgram => Box::new(streams::Stream::unix(libc::SOCK_DGRAM)?),
        Kind::UnixSeqpacket => Box::new(streams::Stream::unix(libc::SOCK_SEQPACKET)?),
        Kind::UnixListen => Box::new(streams::UnixListen::new(dir, "obj.sock")?),
        Kind::Threads => Box::new(procs::Threads::new()?),
        Kind::Zombie => Box::new(procs::Zombie::new()?),
        Kind::Session => Box::new(procs::Session::new()?),
        Kind::SharedMemory => Box::new(memory::SharedMemory::new()?),
        Kind::Mprotect => Box::new(memory::Mprotect::new()?),
    })
}
