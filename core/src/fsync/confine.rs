//! Receiver safety against a hostile sender: wire paths are checked
//! ([`check_path`]) and resolved (`Resolved::open`) so that nothing
//! outside a root can ever be touched.
//!
//! A wire path is relative to a root and made of plain names: no leading
//! `/`, no `.`, `..` or empty component, no NUL. Its parent directory is
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` relative to the root's descriptor, so neither
//! `..` nor a symlink planted inside the tree (by an earlier message) can
//! lead out of it; every operation is then an `*at` call on that
//! directory descriptor and the final name, none of which follows it.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::sys;
use super::FsyncError;

/// Longest wire path accepted (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest name accepted (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Checks a wire path; `allow_root` accepts the empty path (the root
/// itself). Returns its components.
pub fn check_path(path: &[u8], allow_root: bool) -> Result<Vec<&[u8]>, FsyncError> {
    let bad = |why: &str| Err(FsyncError::unsafe_path(path, why));
    if path.is_empty() {
        return if allow_root {
            Ok(Vec::new())
        } else {
            bad("empty path")
        };
    }
    if path.len() > MAX_PATH {
        return bad("longer than 4096 bytes");
    }
    if path.contains(&0) {
        return bad("contains a NUL byte");
    }
    if path[0] == b'/' {
        return bad("absolute path (paths must be relative to the root)");
    }
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    for c in &comps {
        match *c {
            b"" => return bad("empty component (`//` or a trailing `/`)"),
            b"." => return bad("`.` component"),
            b".." => return bad("`..` component (would leave the root)"),
            c if c.len() > MAX_NAME => return bad("a component is longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(comps)
}

/// A receiver root: its path and an open descriptor on it.
#[derive(Debug)]
pub(crate) struct Root {
    pub(crate) path: PathBuf,
    pub(crate) fd: Arc<OwnedFd>,
}

impl Root {
    /// Creates the directory if missing (like `mkdir -p`) and opens it.
    pub(crate) fn open(path: PathBuf) -> Result<Root, FsyncError> {
        if !path.is_absolute() {
            return Err(FsyncError::Root {
                path,
                why: "not an absolute path".into(),
            });
        }
        std::fs::create_dir_all(&path).map_err(|e| FsyncError::io("creating", &path, e))?;
        let c = sys::cstring(path.as_os_str().as_bytes())
            .map_err(|e| FsyncError::io("opening", &path, e))?;
        let fd = sys::open(&c, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| FsyncError::io("opening", &path, e))?;
        Ok(Root {
            path,
            fd: Arc::new(fd),
        })
    }
}

/// A checked wire path resolved to its parent directory (open) and final
/// name. For the root itself (empty path) `name` is None and `dir` is the
/// root's descriptor.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// The parent directory (or the root itself when `name` is None).
    pub(crate) dir: Arc<OwnedFd>,
    /// The final component.
    pub(crate) name: Option<CString>,
    /// The wire path (checked).
    pub(crate) rel: Vec<u8>,
    /// The parent's wire path (empty for the root).
    pub(crate) parent_rel: Vec<u8>,
    /// Root path joined with the wire path, for messages.
    pub(crate) local: PathBuf,
}

impl Resolved {
    /// The final name (the root itself has none: a protocol error here).
    pub(crate) fn name(&self) -> Result<&CString, FsyncError> {
        self.name.as_ref().ok_or_else(|| {
            FsyncError::Protocol("this message cannot apply to a root itself".into())
        })
    }

    /// The parent directory descriptor.
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Checks `path` and opens its parent beneath `root`. `cache` holds
    /// the last parent opened (reused when the next path has the same one).
    pub(crate) fn open(
        root: &Root,
        path: &[u8],
        allow_root: bool,
        cache: &mut Option<(Vec<u8>, Arc<OwnedFd>)>,
    ) -> Result<Resolved, FsyncError> {
        let comps = check_path(path, allow_root)?;
        let local = root.path.join(Path::new(OsStr::from_bytes(path)));
        let Some((last, parents)) = comps.split_last() else {
            return Ok(Resolved {
                dir: root.fd.clone(),
                name: None,
                rel: Vec::new(),
                parent_rel: Vec::new(),
                local,
            });
        };
        // The parent's wire path is a prefix of `path`.
        let parent_rel: Vec<u8> = if parents.is_empty() {
            Vec::new()
        } else {
            path[..path.len() - last.len() - 1].to_vec()
        };
        let name =
            sys::cstring(last).map_err(|_| FsyncError::unsafe_path(path, "contains a NUL byte"))?;
        let dir = if parents.is_empty() {
            root.fd.clone()
        } else if let Some((p, fd)) = cache.as_ref().filter(|(p, _)| *p == parent_rel) {
            debug_assert_eq!(p, &parent_rel);
            fd.clone()
        } else {
            let c = sys::cstring(&parent_rel)
                .map_err(|_| FsyncError::unsafe_path(path, "contains a NUL byte"))?;
            let fd =
                sys::open_dir_beneath(root.fd.as_fd(), &c).map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => FsyncError::unsafe_path(
                        path,
                        "a parent component is a symlink (never followed on the receiver)",
                    ),
                    Some(libc::EXDEV) => FsyncError::unsafe_path(path, "would leave the root"),
                    Some(libc::ENOTDIR) => FsyncError::Protocol(format!(
                        "{}: a parent component is not a directory",
                        local.display()
                    )),
                    Some(libc::ENOENT) => FsyncError::Protocol(format!(
                        "{}: the parent directory was never sent",
                        local.display()
                    )),
                    _ => FsyncError::io("opening the parent directory of", &local, e),
                })?;
            let fd = Arc::new(fd);
            *cache = Some((parent_rel.clone(), fd.clone()));
            fd
        };
        Ok(Resolved {
            dir,
            name: Some(name),
            rel: path.to_vec(),
            parent_rel,
            local,
        })
    }
}

/// Removes `name` in `dir` whatever it is; a directory is removed with
/// everything below it, never following a symlink. Missing is fine.
pub(crate) fn remove_any(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<()> {
    match sys::unlinkat(dir, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) => return Ok(()),
            Some(libc::EISDIR) | Some(libc::EPERM) => {}
            _ => return Err(e),
        },
    }
    match sys::unlinkat(dir, name, libc::AT_REMOVEDIR) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
            let sub = sys::openat(
                dir,
                name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let names = list_dir(sub.as_fd())?;
            for n in names {
                remove_any(sub.as_fd(), &n)?;
            }
            sys::unlinkat(dir, name, libc::AT_REMOVEDIR)
        }
        Err(e) => Err(e),
    }
}

/// The names in a directory (without `.` and `..`).
fn list_dir(dir: BorrowedFd<'_>) -> std::io::Result<Vec<CString>> {
    let fd = sys::openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut d = nix::dir::Dir::from(fd).map_err(std::io::Error::from)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e.map_err(std::io::Error::from)?;
        let n = e.file_name();
        if n.to_bytes() == b"." || n.to_bytes() == b".." {
            continue;
        }
        out.push(n.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            check_path(b"a/b/c", false).unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(check_path(b"", true).unwrap().is_empty());
        assert!(check_path(b".hidden/..x/x..", false).is_ok());
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"../escape",
            b"a/../../x",
            b"a/./b",
            b".",
            b"a//b",
            b"a/",
            b"a\0b",
        ] {
            let e = check_path(bad, false).unwrap_err();
            assert!(matches!(e, FsyncError::Unsafe { .. }), "{bad:?}: {e}");
        }
        let long = vec![b'x'; 256];
        assert!(check_path(&long, false).is_err());
    }
}
