//! The sender's walk of a root: every entry's `lstat` (symlinks are never
//! followed, parents come before children, names in byte order) and the
//! reading of extended attributes.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::msg::{Bytes, EntryKind, Meta, Xattr};
use super::sys::{self, XTarget};
use super::FsyncError;

/// What change detection looks at in an entry's `lstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) kind: EntryKind,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, u32),
    pub(crate) ctime: (i64, u32),
    /// Full `st_mode`.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) ino: u64,
    pub(crate) dev: u64,
    pub(crate) nlink: u64,
    pub(crate) rdev: u64,
}

impl Stat {
    /// From std metadata (None for a socket).
    pub(crate) fn from_metadata(m: &std::fs::Metadata) -> Option<Stat> {
        Some(Stat {
            kind: EntryKind::from_mode(m.mode())?,
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec() as u32),
            ctime: (m.ctime(), m.ctime_nsec() as u32),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            ino: m.ino(),
            dev: m.dev(),
            nlink: m.nlink(),
            rdev: m.rdev(),
        })
    }

    /// From a libc `stat` (None for a socket).
    pub(crate) fn from_libc(st: &libc::stat) -> Option<Stat> {
        Some(Stat {
            kind: EntryKind::from_mode(st.st_mode)?,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime, st.st_ctime_nsec as u32),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            ino: st.st_ino,
            dev: st.st_dev,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
        })
    }

    /// Whether nothing a pass must send changed: kind, size, mtime, ctime,
    /// mode, owner, inode and device number are all the same.
    pub(crate) fn unchanged(&self, prev: &Stat) -> bool {
        self.kind == prev.kind
            && self.size == prev.size
            && self.mtime == prev.mtime
            && self.ctime == prev.ctime
            && self.mode == prev.mode
            && self.uid == prev.uid
            && self.gid == prev.gid
            && self.ino == prev.ino
            && self.dev == prev.dev
            && self.rdev == prev.rdev
    }

    /// The wire metadata of this stat with these xattrs.
    pub(crate) fn meta(&self, xattrs: Vec<Xattr>) -> Meta {
        Meta {
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime_sec: self.mtime.0,
            mtime_nsec: self.mtime.1,
            xattrs,
        }
    }
}

/// One walked entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Path relative to the root (empty for the root).
    pub(crate) rel: Vec<u8>,
    /// Absolute local path.
    pub(crate) path: PathBuf,
    pub(crate) st: Stat,
}

/// Walks a root (an absolute, canonical directory path). Entries that
/// vanish during the walk are left out (the workload may be running);
/// sockets are skipped.
pub(crate) fn scan(root: &Path) -> Result<Vec<Entry>, FsyncError> {
    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    for item in walk {
        let ent = match item {
            Ok(e) => e,
            Err(e) => {
                let path = e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.to_path_buf());
                if e.depth() > 0
                    && e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound)
                {
                    tracing::debug!("fs sync: {} vanished during the walk", path.display());
                    continue;
                }
                let source = e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("walk error"));
                return Err(FsyncError::io("walking", path, source));
            }
        };
        let m = match ent.metadata() {
            Ok(m) => m,
            Err(e)
                if ent.depth() > 0
                    && e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) =>
            {
                continue
            }
            Err(e) => {
                let source = e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("walk error"));
                return Err(FsyncError::io("reading", ent.path(), source));
            }
        };
        let Some(st) = Stat::from_metadata(&m) else {
            tracing::debug!("fs sync: skipping socket {}", ent.path().display());
            continue;
        };
        let rel = match ent.path().strip_prefix(root) {
            Ok(r) => r.as_os_str().as_bytes().to_vec(),
            Err(_) => continue,
        };
        out.push(Entry {
            rel,
            path: ent.into_path(),
            st,
        });
    }
    Ok(out)
}

/// Every extended attribute, sorted by name. Attributes removed while
/// they are read are left out.
pub(crate) fn read_xattrs(t: XTarget<'_>) -> io::Result<Vec<Xattr>> {
    let mut out = Vec::new();
    for name in sys::list_xattrs(t)? {
        let c = match CString::new(name.clone()) {
            Ok(c) => c,
            Err(_) => continue,
        };
        match sys::get_xattr(t, &c) {
            Ok(v) => out.push(Xattr {
                name: Bytes(name),
                value: Bytes(v),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.0.cmp(&b.name.0));
    Ok(out)
}
