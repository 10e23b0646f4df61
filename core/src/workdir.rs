//! Per-migration work directories: the images, by default on tmpfs
//! (`/dev/shm/phaul`) so that no image byte touches a disk on either side;
//! and, apart from them, CRIU's logs and statistics under a log directory
//! (`/var/log/phaul/<side>-<session>/` by default), which a failed
//! migration keeps so that the message naming a log can be followed
//! afterwards. Old logs are swept by age.
//!
//! Both roots are trusted by a phaul running as root, so they must not be
//! anybody else's ([`open_root`]): created if missing (mode 0700), then
//! opened with `O_DIRECTORY|O_NOFOLLOW` and checked on the open descriptor
//! (a directory, not a symlink, owned by root or the user phaul runs as,
//! not writable by group or others); an existing root that is not is
//! refused with what to do. A session's directories are then created
//! relative to that descriptor (`mkdirat`, and `openat` with `O_NOFOLLOW`),
//! so a symlink planted under a session's name is refused, never followed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::Error;

/// The default root of work directories.
pub const DEFAULT_ROOT: &str = "/dev/shm/phaul";

/// The default root of the kept CRIU logs.
pub const DEFAULT_LOG_ROOT: &str = "/var/log/phaul";

/// How long kept logs of failed migrations stay (a week).
pub const LOG_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// One side's directory for one migration; removed on drop unless kept.
/// Its CRIU logs are removed only after a success.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    logs: PathBuf,
    keep: bool,
    succeeded: bool,
}

impl WorkDir {
    /// Creates `<root>/<side>-<session>` (mode 0700) with `images/`,
    /// `driver/` and `meta/` inside, and `<log_root>/<side>-<session>` for
    /// CRIU's logs. Both roots must be safe ([`open_root`]); the session
    /// directories are made relative to them without following symlinks.
    pub fn create(
        root: &Path,
        log_root: &Path,
        side: &str,
        session: u64,
    ) -> Result<WorkDir, Error> {
        let name = format!("{side}-{session:016x}");
        let path = root.join(&name);
        let logs = log_root.join(&name);
        let root_fd = open_root(root, "work directory root", FIX_WORK)?;
        let logs_fd = open_root(log_root, "log directory root", FIX_LOGS)?;
        subdir(&logs_fd, log_root, &name)?;
        let dir = subdir(&root_fd, root, &name)?;
        for sub in ["images", "driver", "meta"] {
            subdir(&dir, &path, sub)?;
        }
        write_owner(&dir).map_err(|source| Error::Path {
            what: "cannot write to the work directory",
            path: path.clone(),
            source,
        })?;
        if !is_tmpfs(root) {
            tracing::warn!(
                root = %root.display(),
                "work directory is not on tmpfs: images will touch the disk (use --work-dir on a tmpfs)"
            );
        }
        Ok(WorkDir {
            path,
            logs,
            keep: false,
            succeeded: false,
        })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where CRIU workers write logs and statistics (kept after a
    /// failure).
    pub fn criu(&self) -> PathBuf {
        self.logs.clone()
    }

    /// Images of memory pass `iter`.
    pub fn images(&self, iter: u32) -> PathBuf {
        self.path.join("images").join(iter.to_string())
    }

    /// The driver's private scratch directory (empty at first).
    pub fn driver(&self) -> PathBuf {
        self.path.join("driver")
    }

    /// Files from and for the driver's meta hooks.
    pub fn meta(&self) -> PathBuf {
        self.path.join("meta")
    }

    /// Keep the directory after the migration (`--keep-images`).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// The migration succeeded: its CRIU logs need not stay (unless the
    /// directory is kept).
    pub fn succeeded(&mut self) {
        self.succeeded = true;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            tracing::info!(path = %self.path.display(), logs = %self.logs.display(), "kept the work directory");
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove the work directory: {e}");
        }
        if self.succeeded {
            let _ = std::fs::remove_dir_all(&self.logs);
        } else {
            tracing::info!(logs = %self.logs.display(), "kept CRIU's logs of the failed migration");
        }
    }
}

/// What to do about an unsafe work root.
pub const FIX_WORK: &str = "remove it (phaul creates it itself) or pass --work-dir DIR";
/// What to do about an unsafe log root.
pub const FIX_LOGS: &str = "remove it (phaul creates it itself) or pass --log-dir DIR";

/// Why a root or session directory cannot be trusted.
fn unsafe_dir(what: &'static str, path: &Path, why: String) -> Error {
    Error::UnsafeDir {
        what,
        path: path.to_path_buf(),
        why,
    }
}

/// Checks an open directory: owned by root or by the user phaul runs as,
/// and not writable by group or others.
fn check_owner(fd: &OwnedFd, what: &'static str, path: &Path, fix: &str) -> Result<(), Error> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| Error::Path {
        what: "cannot inspect",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(unsafe_dir(
            what,
            path,
            format!("owned by uid {}, not by root; {fix}", st.st_uid),
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(unsafe_dir(
            what,
            path,
            format!(
                "writable by group or others (mode {:o}); chmod 700 it, or {fix}",
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Opens `name` in `dir` as a directory without following a symlink;
/// ELOOP/ENOTDIR become a refusal naming `path`.
fn open_dir_at(
    dir: Option<&OwnedFd>,
    name: &Path,
    what: &'static str,
    path: &Path,
    fix: &str,
) -> Result<OwnedFd, Error> {
    use nix::fcntl::OFlag;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match nix::fcntl::openat(
        dir.map(|d| d.as_raw_fd()),
        name,
        flags,
        nix::sys::stat::Mode::empty(),
    ) {
        // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(nix::errno::Errno::ELOOP) | Err(nix::errno::Errno::ENOTDIR) => Err(unsafe_dir(
            what,
            path,
            format!("a symlink or not a directory (phaul never follows one here); {fix}"),
        )),
        Err(e) => Err(Error::Path {
            what: "cannot open",
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Opens a root phaul keeps its directories in (`what`, e.g. "work
/// directory root"; `fix`, what to do about an unsafe one, e.g. [`FIX_WORK`]): creates it if
/// missing (mode 0700; missing parents as `mkdir -p` would), then opens it
/// with `O_DIRECTORY|O_NOFOLLOW` and checks the open directory: owned by
/// root (or the user phaul runs as) and not writable by group or others.
/// A symlink, a directory of another user or one others can write is
/// refused, naming the path and what to do.
pub fn open_root(path: &Path, what: &'static str, fix: &str) -> Result<OwnedFd, Error> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| Error::Path {
            what: "cannot create",
            path: parent.to_path_buf(),
            source,
        })?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(Error::Path {
                what: "cannot create",
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let fd = open_dir_at(None, path, what, path, fix)?;
    check_owner(&fd, what, path, fix)?;
    Ok(fd)
}

/// Creates (mode 0700) or opens the directory `name` in the open directory
/// `dir` (whose path is `dir_path`) without following a symlink; an
/// existing one must pass the same checks as a root.
fn subdir(dir: &OwnedFd, dir_path: &Path, name: &str) -> Result<OwnedFd, Error> {
    let path = dir_path.join(name);
    let what = "session directory";
    let fix = "remove it";
    match nix::sys::stat::mkdirat(
        Some(dir.as_raw_fd()),
        name,
        nix::sys::stat::Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => {
            return Err(Error::Path {
                what: "cannot create the work directory",
                path,
                source: e.into(),
            })
        }
    }
    let fd = open_dir_at(Some(dir), Path::new(name), what, &path, fix)?;
    check_owner(&fd, what, &path, fix)?;
    Ok(fd)
}

/// Writes this process's pid into the session directory's owner file
/// (never through a symlink).
fn write_owner(dir: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::OFlag;
    use std::io::Write;
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        OWNER,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )?;
    // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(std::process::id().to_string().as_bytes())
}

/// Removes kept logs (`<side>-<session>` directories under `log_root`)
/// older than `max_age`.
pub fn sweep_logs(log_root: &Path, max_age: std::time::Duration) {
    if !trusted(log_root, "log directory root", FIX_LOGS) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(log_root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with("src-") || n.starts_with("dst-"));
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > max_age);
        if ours && old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The file naming the process that owns a work directory.
const OWNER: &str = "owner";

/// Removes `<side>-*` work directories under `root` whose owning process
/// is gone (a phaul that was killed cannot clean up after itself).
/// Directories of running phauls, and kept ones without an owner file, are
/// left alone. Returns the directories removed.
pub fn sweep_stale(root: &Path, side: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if !trusted(root, "work directory root", FIX_WORK) {
        return removed;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return removed;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_ours = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&format!("{side}-")));
        let Ok(owner) = std::fs::read_to_string(path.join(OWNER)) else {
            continue;
        };
        let dead = owner
            .trim()
            .parse::<i32>()
            .is_ok_and(|pid| pid != std::process::id() as i32 && !crate::proc::alive(pid));
        if is_ours && dead && std::fs::remove_dir_all(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed the work directory of an interrupted migration");
            removed.push(path);
        }
    }
    removed
}

/// Whether an existing root may be swept (one that is not safe is left
/// alone, with a warning: its contents are not phaul's).
fn trusted(root: &Path, what: &'static str, fix: &str) -> bool {
    if std::fs::symlink_metadata(root).is_err() {
        return false;
    }
    match open_root(root, what, fix) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("not sweeping: {e}");
            false
        }
    }
}

/// Whether `path` (or its nearest existing ancestor) is on tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    let mut p = path;
    loop {
        if let Ok(s) = nix::sys::statfs::statfs(p) {
            return s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC;
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return false,
        }
    }
}

/// Free bytes for unprivileged-or-root writers at `path` (or its nearest
/// existing ancestor).
pub fn free_bytes(path: &Path) -> u64 {
    let mut p = path;
    loop {
        if let Ok(s) = nix::sys::statvfs::statvfs(p) {
            return s.blocks_available() * s.fragment_size();
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, symlink, PermissionsExt};

    fn create(root: &Path, logs: &Path) -> Result<WorkDir, Error> {
        WorkDir::create(root, logs, "dst", 7)
    }

    #[test]
    fn a_missing_root_is_created_private_and_used() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let (root, logs) = (d.path().join("a/work"), d.path().join("logs"));
        let w = create(&root, &logs).unwrap();
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&logs).unwrap().mode() & 0o777, 0o700);
        assert!(w.path().join("images").is_dir() && w.path().join("owner").is_file());
        assert_eq!(w.path(), root.join("dst-0000000000000007"));
    }

    #[test]
    fn a_symlink_as_root_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let root = d.path().join("root");
        symlink(&real, &root).unwrap();
        let e = create(&root, &d.path().join("logs"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("work directory root") && e.contains(&root.display().to_string()),
            "{e}"
        );
        assert!(e.contains("symlink") && e.contains("--work-dir"), "{e}");
        assert_eq!(
            std::fs::read_dir(&real).unwrap().count(),
            0,
            "nothing made there"
        );
        // The log root likewise.
        let e = create(&d.path().join("w"), &root).unwrap_err().to_string();
        assert!(
            e.contains("log directory root") && e.contains("symlink"),
            "{e}"
        );
    }

    #[test]
    fn a_root_owned_by_another_user_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        if chown(&root, Some(65534), None).is_err() {
            eprintln!("skipped: cannot chown (not root)");
            return;
        }
        let e = create(&root, &d.path().join("logs"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("owned by uid 65534") && e.contains("remove it"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn a_world_writable_root_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = create(&root, &d.path().join("logs"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by group or others") && e.contains("1777"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        // Nor are such roots swept.
        let planted = root.join("dst-dead");
        std::fs::create_dir(&planted).unwrap();
        std::fs::write(planted.join(OWNER), "2147483646").unwrap();
        assert!(sweep_stale(&root, "dst").is_empty() && planted.exists());
    }

    #[test]
    fn a_symlink_planted_as_a_session_directory_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (root, logs) = (d.path().join("root"), d.path().join("logs"));
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let target = d.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        symlink(&target, root.join("dst-0000000000000007")).unwrap();
        let e = create(&root, &logs).unwrap_err().to_string();
        assert!(
            e.contains("session directory") && e.contains("symlink"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(&target).unwrap().count(),
            0,
            "nothing made there"
        );
        // Likewise in the log root (another session).
        symlink(&target, logs.join("dst-0000000000000008")).unwrap();
        let e = WorkDir::create(&root, &logs, "dst", 8)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("session directory") && e.contains("symlink"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    }

    #[test]
    fn stale_work_directories_of_dead_owners_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let live = WorkDir::create(root.path(), &root.path().join("logs"), "dst", 1).unwrap();
        let dead = root.path().join("dst-dead");
        std::fs::create_dir_all(dead.join("images")).unwrap();
        // A pid that cannot exist.
        std::fs::write(dead.join(OWNER), "2147483646").unwrap();
        let other_side = root.path().join("src-dead");
        std::fs::create_dir_all(&other_side).unwrap();
        std::fs::write(other_side.join(OWNER), "2147483646").unwrap();
        let removed = sweep_stale(root.path(), "dst");
        assert_eq!(removed, vec![dead.clone()]);
        assert!(live.path().exists() && other_side.exists() && !dead.exists());
    }
}
