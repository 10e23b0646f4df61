//! Per-migration work directories: CRIU's logs and statistics, and the
//! images. By default they live on tmpfs (`/dev/shm/phaul`), so no image
//! byte touches a disk on either side.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// The default root of work directories.
pub const DEFAULT_ROOT: &str = "/dev/shm/phaul";

/// One side's directory for one migration; removed on drop unless kept.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// Creates `<root>/<side>-<session>` (mode 0700) with `criu/` and
    /// `images/` inside.
    pub fn create(root: &Path, side: &str, session: u64) -> Result<WorkDir, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let path = root.join(format!("{side}-{session:016x}"));
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
        mk(&path.join("criu"))?;
        mk(&path.join("images"))?;
        mk(&path.join("meta"))?;
        if !is_tmpfs(root) {
            tracing::warn!(
                root = %root.display(),
                "work directory is not on tmpfs: images will touch the disk (use --work-dir on a tmpfs)"
            );
        }
        Ok(WorkDir { path, keep: false })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where CRIU workers write logs and statistics.
    pub fn criu(&self) -> PathBuf {
        self.path.join("criu")
    }

    /// Images of memory pass `iter`.
    pub fn images(&self, iter: u32) -> PathBuf {
        self.path.join("images").join(iter.to_string())
    }

    /// Files from and for the driver's meta hooks.
    pub fn meta(&self) -> PathBuf {
        self.path.join("meta")
    }

    /// Keep the directory after the migration (`--keep-images`).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            tracing::info!(path = %self.path.display(), "kept the work directory");
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove the work directory: {e}");
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
