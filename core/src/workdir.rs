//! Per-migration work directories: the images, by default on tmpfs
//! (`/dev/shm/phaul`) so that no image byte touches a disk on either side;
//! and, apart from them, CRIU's logs and statistics under a log directory
//! (`/var/log/phaul/<side>-<session>/` by default), which a failed
//! migration keeps so that the message naming a log can be followed
//! afterwards. Old logs are swept by age.

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
    /// Creates `<root>/<side>-<session>` (mode 0700) with `images/` and
    /// `meta/` inside, and `<log_root>/<side>-<session>` for CRIU's logs.
    pub fn create(
        root: &Path,
        log_root: &Path,
        side: &str,
        session: u64,
    ) -> Result<WorkDir, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let path = root.join(format!("{side}-{session:016x}"));
        let logs = log_root.join(format!("{side}-{session:016x}"));
        let mk = |p: &Path| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(p)
                .map_err(|source| Error::Path {
                    what: "cannot create the work directory",
                    path: p.to_path_buf(),
                    source,
                })
        };
        mk(&logs)?;
        mk(&path.join("images"))?;
        mk(&path.join("driver"))?;
        mk(&path.join("meta"))?;
        std::fs::write(path.join(OWNER), std::process::id().to_string()).map_err(|source| {
            Error::Path {
                what: "cannot write to the work directory",
                path: path.clone(),
                source,
            }
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

/// Removes kept logs (`<side>-<session>` directories under `log_root`)
/// older than `max_age`.
pub fn sweep_logs(log_root: &Path, max_age: std::time::Duration) {
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
