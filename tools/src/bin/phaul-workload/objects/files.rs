//! File objects: an open-and-unlinked regular file, and one file lock of
//! each kind (POSIX, flock, OFD), checked from a second process.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::helper::{check_in_child, cvt, fdinfo};
use super::{Check, Object};

/// Initial size of the unlinked file.
const UNLINKED_INITIAL: usize = 8192;
/// Its offset after set-up (inside the file, not at its end).
const UNLINKED_OFFSET: u64 = 1000;
/// A record is written at the current offset every this many ticks...
const UNLINKED_EVERY_TICKS: u64 = 50;
/// ...until the file is this large (CRIU keeps unlinked files' content in
/// its images up to a limit of 1 MiB).
const UNLINKED_MAX: usize = 64 << 10;

/// The byte at `i` of the initial content.
fn initial_byte(i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

/// A file opened read-write, filled, positioned at [`UNLINKED_OFFSET`] and
/// unlinked; records keep being written at its offset. The expected
/// content lives in memory.
pub struct UnlinkedFile {
    file: File,
    path: PathBuf,
    expected: Vec<u8>,
    offset: u64,
    records: u64,
    errors: Vec<String>,
}

impl UnlinkedFile {
    pub fn new(path: &Path) -> Result<UnlinkedFile> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let expected: Vec<u8> = (0..UNLINKED_INITIAL).map(initial_byte).collect();
        file.write_all(&expected)?;
        file.seek(SeekFrom::Start(UNLINKED_OFFSET))?;
        fs::remove_file(path).with_context(|| format!("unlinking {}", path.display()))?;
        Ok(UnlinkedFile {
            file,
            path: path.to_path_buf(),
            expected,
            offset: UNLINKED_OFFSET,
            records: 0,
            errors: Vec::new(),
        })
    }

    /// Writes the next 32-byte record at the current offset.
    fn write_record(&mut self) {
        let rec = format!("record {:>12} at {:>8}\n", self.records + 1, self.offset);
        let rec = rec.as_bytes();
        if let Err(e) = self.file.write_all(rec) {
            self.errors.push(format!("write: {e}"));
            return;
        }
        let start = self.offset as usize;
        let end = start + rec.len();
        if self.expected.len() < end {
            self.expected.resize(end, 0);
        }
        self.expected[start..end].copy_from_slice(rec);
        self.offset = end as u64;
        self.records += 1;
    }
}

impl Object for UnlinkedFile {
    fn tick(&mut self, counter: u64) {
        if counter % UNLINKED_EVERY_TICKS == 0
            && self.expected.len() < UNLINKED_MAX
            && self.errors.is_empty()
        {
            self.write_record();
        }
    }

    fn verify(&mut self) -> Check {
        let mut problems = self.errors.clone();
        // The offset is where the last record ended.
        match self.file.stream_position() {
            Ok(pos) if pos == self.offset => {}
            Ok(pos) => problems.push(format!("offset {pos}, expected {}", self.offset)),
            Err(e) => problems.push(format!("lseek: {e}")),
        }
        // Still unlinked, and its content is what was written.
        let meta = self.file.metadata();
        match &meta {
            Ok(m) if m.nlink() == 0 => {}
            Ok(m) => problems.push(format!("{} links (expected 0)", m.nlink())),
            Err(e) => problems.push(format!("fstat: {e}")),
        }
        let mut content = vec![0u8; self.expected.len() + 1];
        let mut got = 0;
        while got < content.len() {
            match self.file.read_at(&mut content[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => {
                    problems.push(format!("pread: {e}"));
                    break;
                }
            }
        }
        if got != self.expected.len() {
            problems.push(format!("size {got}, expected {}", self.expected.len()));
        } else if let Some(i) = (0..got).find(|&i| content[i] != self.expected[i]) {
            problems.push(format!("content differs from byte {i}"));
        }
        if self.path.exists() {
            problems.push(format!("{} exists again", self.path.display()));
        }
        let link = fs::read_link(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        Check::unless(
            problems,
            format!(
                "{} bytes intact, offset {}, {} records written, nlink 0, fd -> {link}",
                self.expected.len(),
                self.offset,
                self.records
            ),
        )
    }
}

/// The three kinds of file lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `fcntl(F_SETLK)`, owned by the process: F_WRLCK on [100, 300).
    Posix,
    /// `flock(LOCK_SH)`, owned by the open file description.
    Flock,
    /// `fcntl(F_OFD_SETLK)`, owned by the open file description: F_RDLCK on
    /// [0, 512).
    Ofd,
}

const POSIX_START: i64 = 100;
const POSIX_LEN: i64 = 200;
const OFD_LEN: i64 = 512;

impl LockKind {
    fn file_name(self) -> &'static str {
        match self {
            LockKind::Posix => "lock-posix",
            LockKind::Flock => "lock-flock",
            LockKind::Ofd => "lock-ofd",
        }
    }

    /// The word /proc/.../fdinfo uses for this kind.
    fn fdinfo_word(self) -> &'static str {
        match self {
            LockKind::Posix => "POSIX",
            LockKind::Flock => "FLOCK",
            LockKind::Ofd => "OFDLCK",
        }
    }
}

/// A `struct flock` for `type_` on [start, start + len).
fn flock_struct(type_: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: an all-zero flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = type_ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

fn type_name(t: libc::c_short) -> &'static str {
    match t as libc::c_int {
        libc::F_RDLCK => "F_RDLCK",
        libc::F_WRLCK => "F_WRLCK",
        libc::F_UNLCK => "F_UNLCK",
        _ => "?",
    }
}

/// One lock held by the workload on its own 4 KiB file.
pub struct Lock {
    kind: LockKind,
    file: File,
    path: PathBuf,
}

impl Lock {
    pub fn new(kind: LockKind, dir: &Path) -> Result<Lock> {
        let path = dir.join(kind.file_name());
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&[b'L'; 4096])?;
        let fd = file.as_raw_fd();
        match kind {
            LockKind::Posix => {
                let fl = flock_struct(libc::F_WRLCK, POSIX_START, POSIX_LEN);
                // SAFETY: a valid flock struct.
                cvt(unsafe { libc::fcntl(fd, libc::F_SETLK, &fl) }).context("F_SETLK")?;
            }
            LockKind::Flock => {
                // SAFETY: plain flock call.
                cvt(unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) }).context("flock")?;
            }
            LockKind::Ofd => {
                let fl = flock_struct(libc::F_RDLCK, 0, OFD_LEN);
                // SAFETY: a valid flock struct (l_pid 0, as OFD locks need).
                cvt(unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) }).context("F_OFD_SETLK")?;
            }
        }
        Ok(Lock { kind, file, path })
    }
}

/// What a second process sees of the lock on `path` (run in a child).
fn probe_from_other_process(kind: LockKind, path: &CString) -> Check {
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Check::fail(format!("open: {}", std::io::Error::last_os_error()));
    }
    let getlk = |cmd: libc::c_int, type_: libc::c_int, start: i64, len: i64| {
        let mut fl = flock_struct(type_, start, len);
        // SAFETY: a valid flock struct.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
        (r, fl)
    };
    // SAFETY: plain getppid call.
    let parent = unsafe { libc::getppid() };
    let mut problems = Vec::new();
    let detail = match kind {
        LockKind::Posix => {
            let (r, fl) = getlk(libc::F_GETLK, libc::F_WRLCK, 0, 0);
            if r < 0 {
                problems.push(format!("F_GETLK: {}", std::io::Error::last_os_error()));
            } else if fl.l_type as libc::c_int != libc::F_WRLCK
                || fl.l_start != POSIX_START
                || fl.l_len != POSIX_LEN
                || fl.l_pid != parent
            {
                problems.push("not the lock that was taken".to_string());
            }
            let (_, outside) = getlk(libc::F_GETLK, libc::F_WRLCK, POSIX_START + POSIX_LEN, 100);
            if outside.l_type as libc::c_int != libc::F_UNLCK {
                problems.push("bytes past the range are locked too".to_string());
            }
            format!(
                "F_GETLK from a child: {} [{}, +{}) held by pid {} (the workload is {parent})",
                type_name(fl.l_type),
                fl.l_start,
                fl.l_len,
                fl.l_pid
            )
        }
        LockKind::Ofd => {
            let (r, fl) = getlk(libc::F_OFD_GETLK, libc::F_WRLCK, 0, 0);
            if r < 0 {
                problems.push(format!("F_OFD_GETLK: {}", std::io::Error::last_os_error()));
            } else if fl.l_type as libc::c_int != libc::F_RDLCK
                || fl.l_start != 0
                || fl.l_len != OFD_LEN
                || fl.l_pid != -1
            {
                problems.push("not the lock that was taken".to_string());
            }
            let (_, shared) = getlk(libc::F_OFD_GETLK, libc::F_RDLCK, 0, 0);
            if shared.l_type as libc::c_int != libc::F_UNLCK {
                problems.push("a read lock conflicts: it is not a read lock".to_string());
            }
            format!(
                "F_OFD_GETLK from a child: {} [{}, +{}) pid {}",
                type_name(fl.l_type),
                fl.l_start,
                fl.l_len,
                fl.l_pid
            )
        }
        LockKind::Flock => {
            // SAFETY: plain flock calls on our descriptor.
            let ex = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            let ex_err = std::io::Error::last_os_error();
            if ex == 0 {
                problems.push("a child could take it exclusively: not held".to_string());
            } else if ex_err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                problems.push(format!("flock(LOCK_EX): {ex_err}"));
            }
            // SAFETY: as above.
            let sh = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
            if sh != 0 {
                problems.push("a child cannot share it: not a shared lock".to_string());
            }
            format!(
                "flock from a child: LOCK_EX {}, LOCK_SH {}",
                if ex == 0 { "granted" } else { "refused" },
                if sh == 0 { "granted" } else { "refused" }
            )
        }
    };
    Check::unless(problems, detail)
}

impl Object for Lock {
    fn verify(&mut self) -> Check {
        let path = CString::new(self.path.as_os_str().as_bytes()).unwrap_or_default();
        let kind = self.kind;
        let seen = check_in_child(c"obj-lockcheck", move || {
            probe_from_other_process(kind, &path)
        });
        // The kernel's own record of the locks on our descriptor.
        let word = self.kind.fdinfo_word();
        let info = fdinfo(self.file.as_raw_fd());
        let lock_line = info
            .lines()
            .find(|l| l.starts_with("lock:") && l.contains(word))
            .map(|l| l.trim_start_matches("lock:").trim().to_string());
        let mut problems = Vec::new();
        if !seen.ok {
            problems.push("the second process does not see the lock".to_string());
        }
        if lock_line.is_none() {
            problems.push(format!("no {word} lock in fdinfo"));
        }
        Check::unless(
            problems,
            format!(
                "{}; fdinfo: {}",
                seen.detail,
                lock_line.unwrap_or_else(|| "-".into())
            ),
        )
    }
}
