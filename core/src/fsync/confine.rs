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
//!
//! The roots themselves are resolved once ([`resolve_root`]: symlinks and
//! `..` in the configured path resolved, which is what a destination's
//! policy checks) and opened along that resolved path without following
//! any symlink ([`Root`]), so the directory the receiver writes into is
//! the one that was checked.

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

/// Where the absolute directory `path` really is on this host: its
/// longest existing prefix canonicalised (every symlink and `..` in it
/// resolved), followed by the rest, which does not exist yet and must be
/// plain names (a `..` there cannot be resolved, so it is refused).
pub fn resolve_root(path: &Path) -> Result<PathBuf, FsyncError> {
    use std::path::Component;
    let why = |why: &str| FsyncError::Root {
        path: path.to_path_buf(),
        why: why.into(),
    };
    if !path.is_absolute() {
        return Err(why("not an absolute path"));
    }
    let comps: Vec<Component<'_>> = path.components().collect();
    let mut n = comps.len();
    loop {
        let prefix: PathBuf = comps[..n].iter().collect();
        match std::fs::canonicalize(&prefix) {
            Ok(mut real) => {
                for c in &comps[n..] {
                    match c {
                        Component::Normal(name) => real.push(name),
                        Component::CurDir => {}
                        _ => {
                            return Err(why(
                                "`..` after a part that does not exist cannot be resolved",
                            ))
                        }
                    }
                }
                return Ok(real);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && n > 1 => n -= 1,
            Err(e) => return Err(FsyncError::io("resolving", path, e)),
        }
    }
}

/// A receiver root: its path and an open descriptor on it.
///
/// Opened by walking its resolved path ([`resolve_root`]) from `/` one
/// name at a time with `O_NOFOLLOW` (creating what is missing with
/// `mkdirat`), so the directory opened is the one at that path, with no
/// symlink anywhere on the way: a path checked against a policy and then
/// changed (a component swapped for a symlink) fails to open instead of
/// leading elsewhere. Everything the receiver does afterwards is relative
/// to the descriptor.
#[derive(Debug)]
pub struct Root {
    pub(crate) path: PathBuf,
    pub(crate) fd: Arc<OwnedFd>,
}

impl Root {
    /// Resolves `path` ([`resolve_root`]), creates what is missing (like
    /// `mkdir -p`, mode 0755) and opens it without following symlinks.
    pub fn open(path: PathBuf) -> Result<Root, FsyncError> {
        let resolved = resolve_root(&path)?;
        Root::open_resolved(resolved)
    }

    /// Opens (creating what is missing) an already resolved absolute path:
    /// one that has only plain names, none of them a symlink.
    pub fn open_resolved(path: PathBuf) -> Result<Root, FsyncError> {
        use std::path::Component;
        let bad = |why: String| FsyncError::Root {
            path: path.clone(),
            why,
        };
        let mut fd = sys::open(c"/", libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| FsyncError::io("opening", "/", e))?;
        let mut here = PathBuf::from("/");
        for c in path.components() {
            let name = match c {
                Component::RootDir => continue,
                Component::Normal(name) => name,
                _ => return Err(bad("not a resolved path (`.` or `..` in it)".into())),
            };
            here.push(name);
            let cname =
                sys::cstring(name.as_bytes()).map_err(|e| FsyncError::io("opening", &here, e))?;
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let mut r = sys::openat(fd.as_fd(), &cname, flags, 0);
            if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
                match sys::mkdirat(fd.as_fd(), &cname, 0o755) {
                    Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                        return Err(FsyncError::io("creating", &here, e))
                    }
                    _ => {}
                }
                r = sys::openat(fd.as_fd(), &cname, flags, 0);
            }
            fd = r.map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => bad(format!(
                    "{} is a symlink or not a directory (a root is never reached through a symlink)",
                    here.display()
                )),
                _ => FsyncError::io("opening", &here, e),
            })?;
        }
        Ok(Root {
            path,
            fd: Arc::new(fd),
        })
    }

    /// The root's resolved path.
    pub fn path(&self) -> &Path {
        &self.path
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
