//! [`Receiver`]: applies the sender's passes to the destination roots,
//! confined to them ([`super::confine`]) whatever the sender says.
//!
//! Every file, symlink, node and hard link is made under a temporary name
//! (`.phaul-tmp-<random>`) in its final directory, given its metadata
//! there, then renamed over its real name: an interrupted sync never
//! leaves a half-written entry under a real name, and temporary names are
//! removed on any error. Nothing is fsync'd (the destination may well be
//! tmpfs; durability is the caller's business). Directory mtimes are set
//! at the end of each pass, deepest first, after their contents changed;
//! directories the pass modified without the sender sending them get their
//! earlier mtime back.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::proto::frame::{FrameReader, FrameWriter};

use super::confine::{remove_any, Resolved, Root};
use super::delta;
use super::msg::{EntryKind, FsMsg, Meta};
use super::sender::msg_name;
use super::sys::{self, XTarget};
use super::{FsyncError, PassStats};

/// Prefix of the receiver's temporary names.
pub const TMP_PREFIX: &str = ".phaul-tmp-";

/// The destination side of a tree synchronisation.
#[derive(Debug)]
pub struct Receiver {
    roots: Vec<Root>,
}

/// A temporary name in a directory, removed on drop unless installed.
struct TempName {
    dir: Arc<OwnedFd>,
    name: CString,
    armed: bool,
}

impl TempName {
    /// Creates something under a fresh temporary name with `create`.
    fn create<T>(
        dir: &Arc<OwnedFd>,
        mut create: impl FnMut(BorrowedFd<'_>, &CStr) -> io::Result<T>,
    ) -> io::Result<(TempName, T)> {
        let mut last = None;
        for _ in 0..16 {
            let name = sys::cstring(format!("{TMP_PREFIX}{}", sys::random_hex()).as_bytes())?;
            match create(dir.as_fd(), &name) {
                Ok(t) => {
                    return Ok((
                        TempName {
                            dir: dir.clone(),
                            name,
                            armed: true,
                        },
                        t,
                    ))
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EEXIST)))
    }
}

impl Drop for TempName {
    fn drop(&mut self) {
        if self.armed {
            let _ = sys::unlinkat(self.dir.as_fd(), &self.name, 0);
        }
    }
}

/// The regular file being received.
struct OpenFile {
    at: Resolved,
    root: u32,
    tmp: TempName,
    fd: OwnedFd,
    size: u64,
    delta: bool,
}

/// Where metadata is applied.
enum MetaTarget<'a> {
    /// An open regular file or directory.
    Fd(BorrowedFd<'a>),
    /// A name in a directory that is not followed (symlinks, nodes).
    At {
        dir: BorrowedFd<'a>,
        name: &'a CStr,
        symlink: bool,
    },
}

/// State of one pass being applied.
struct Apply<'a> {
    roots: &'a [Root],
    stats: PassStats,
    start: Instant,
    /// Per root: the last parent directory opened.
    cache: Vec<Option<(Vec<u8>, Arc<OwnedFd>)>>,
    /// Directory mtimes to set at the end: (root, path) -> mtime.
    dir_times: BTreeMap<(u32, Vec<u8>), (i64, u32)>,
    file: Option<OpenFile>,
}

enum Step {
    Pass(PassStats),
    Finish,
}

impl Receiver {
    /// `roots`: the same absolute paths as the sender's, on this host
    /// (resolved and created if missing, like `mkdir -p`; see [`Root`]).
    pub fn new(roots: Vec<PathBuf>) -> Result<Receiver, FsyncError> {
        let roots = roots
            .into_iter()
            .map(Root::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Receiver { roots })
    }

    /// A receiver for roots already opened (by a caller that checked them
    /// against its policy first: what it checked is what is written).
    pub fn with_roots(roots: Vec<Root>) -> Receiver {
        Receiver { roots }
    }

    /// The roots, in root-id order.
    pub fn roots(&self) -> Vec<&Path> {
        self.roots.iter().map(|r| r.path.as_path()).collect()
    }

    /// Serves passes until the sender's `finish` (Ok with the stats of
    /// every pass) or an error. On an error caused by the sender
    /// (malformed frame, path escape, protocol violation) or a local one,
    /// it tries to tell the sender (an error frame) and returns the error;
    /// temporary files it created are removed. The caller should then
    /// close the connection.
    pub fn serve<S: Read + Write>(&mut self, conn: &mut S) -> Result<Vec<PassStats>, FsyncError> {
        let mut all = Vec::new();
        loop {
            let step = {
                let mut rd = FrameReader::new(&mut *conn);
                self.next(&mut rd)
            };
            match step {
                Ok(Step::Finish) => return Ok(all),
                Ok(Step::Pass(stats)) => {
                    FrameWriter::new(&mut *conn).write(&FsMsg::Ack(stats.clone()))?;
                    all.push(stats);
                }
                Err(e) => {
                    if !e.is_connection() {
                        tracing::warn!("{e}");
                        let _ = FrameWriter::new(&mut *conn).write(&FsMsg::Error(e.to_string()));
                    }
                    return Err(e);
                }
            }
        }
    }

    fn next<R: Read>(&mut self, rd: &mut FrameReader<R>) -> Result<Step, FsyncError> {
        let (pass, final_pass) = match rd.read::<FsMsg>()? {
            FsMsg::Finish => return Ok(Step::Finish),
            FsMsg::Begin {
                pass,
                final_pass,
                roots,
            } => {
                if roots as usize != self.roots.len() {
                    return Err(FsyncError::Protocol(format!(
                        "the sender syncs {roots} roots, this receiver was given {}",
                        self.roots.len()
                    )));
                }
                (pass, final_pass)
            }
            FsMsg::Error(m) => return Err(FsyncError::Peer(m)),
            other => {
                return Err(FsyncError::Protocol(format!(
                    "expected Begin or Finish, got {}",
                    msg_name(&other)
                )))
            }
        };
        let mut a = Apply {
            roots: &self.roots,
            stats: PassStats {
                pass,
                final_pass,
                ..PassStats::default()
            },
            start: Instant::now(),
            cache: self.roots.iter().map(|_| None).collect(),
            dir_times: BTreeMap::new(),
            file: None,
        };
        loop {
            let msg = rd.read::<FsMsg>()?;
            if a.apply(msg)? {
                let mut stats = a.stats.clone();
                stats.duration_us = a.start.elapsed().as_micros() as u64;
                tracing::debug!(pass, final_pass, "fs sync: pass applied");
                return Ok(Step::Pass(stats));
            }
        }
    }
}

impl Apply<'_> {
    fn resolve(
        &mut self,
        root: u32,
        path: &[u8],
        allow_root: bool,
    ) -> Result<Resolved, FsyncError> {
        let roots = self.roots;
        let r = roots.get(root as usize).ok_or_else(|| {
            FsyncError::unsafe_path(
                path,
                format!("root id {root} out of range ({} roots)", roots.len()),
            )
        })?;
        let cache = &mut self.cache[root as usize];
        Resolved::open(r, path, allow_root, cache)
    }

    /// Remembers the mtime of a directory about to be modified (once per pass).
    fn touch(&mut self, root: u32, at: &Resolved) -> Result<(), FsyncError> {
        if let std::collections::btree_map::Entry::Vacant(v) =
            self.dir_times.entry((root, at.parent_rel.clone()))
        {
            let st = sys::fstat(at.dir())
                .map_err(|e| FsyncError::io("reading the parent directory of", &at.local, e))?;
            v.insert((st.st_mtime, st.st_mtime_nsec as u32));
        }
        Ok(())
    }

    /// Forgets pending mtimes at and below a removed path.
    fn forget(&mut self, root: u32, rel: &[u8]) {
        self.dir_times.remove(&(root, rel.to_vec()));
        let mut prefix = rel.to_vec();
        prefix.push(b'/');
        let doomed: Vec<_> = self
            .dir_times
            .range((root, prefix.clone())..)
            .take_while(|((r, p), _)| *r == root && p.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.dir_times.remove(&k);
        }
        for c in &mut self.cache {
            *c = None;
        }
    }

    /// Renames a temporary name over the real one, replacing whatever is
    /// there (a directory in the way is removed with its contents).
    /// A symlink or special file built under `tmp`: its metadata, then
    /// the rename into place.
    fn install_non_regular(
        &mut self,
        root: u32,
        at: &Resolved,
        tmp: &mut TempName,
        meta: &Meta,
        symlink: bool,
    ) -> Result<(), FsyncError> {
        let target = MetaTarget::At {
            dir: at.dir(),
            name: &tmp.name,
            symlink,
        };
        apply_meta(target, meta, true, true, &at.local)?;
        self.install(root, at, tmp)?;
        self.stats.files_sent += 1;
        Ok(())
    }

    fn install(&mut self, root: u32, at: &Resolved, tmp: &mut TempName) -> Result<(), FsyncError> {
        let name = at.name()?;
        match sys::renameat(at.dir(), &tmp.name, at.dir(), name) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST)
                ) =>
            {
                remove_any(at.dir(), name).map_err(|e| FsyncError::io("removing", &at.local, e))?;
                self.forget(root, &at.rel);
                sys::renameat(at.dir(), &tmp.name, at.dir(), name)
                    .map_err(|e| FsyncError::io("renaming into place", &at.local, e))?;
            }
            Err(e) => return Err(FsyncError::io("renaming into place", &at.local, e)),
        }
        tmp.armed = false;
        Ok(())
    }

    fn no_file(&self, what: &FsMsg) -> Result<(), FsyncError> {
        match &self.file {
            Some(f) => Err(FsyncError::Protocol(format!(
                "{} while file {} is incomplete",
                msg_name(what),
                f.at.local.display()
            ))),
            None => Ok(()),
        }
    }

    /// Applies one message; true at the end of the pass.
    fn apply(&mut self, msg: FsMsg) -> Result<bool, FsyncError> {
        if !matches!(
            msg,
            FsMsg::Data { .. } | FsMsg::Punch { .. } | FsMsg::FileEnd { .. }
        ) {
            self.no_file(&msg)?;
        }
        match msg {
            FsMsg::Delete { root, path } => {
                let at = self.resolve(root, &path.0, false)?;
                self.touch(root, &at)?;
                remove_any(at.dir(), at.name()?)
                    .map_err(|e| FsyncError::io("removing", &at.local, e))?;
                self.forget(root, &at.rel);
                self.stats.deleted += 1;
            }
            FsMsg::Dir { root, path, meta } => {
                self.dir(root, &path.0, &meta)?;
                self.stats.files_sent += 1;
            }
            FsMsg::File {
                root,
                path,
                size,
                delta,
            } => {
                self.begin_file(root, &path.0, size, delta)?;
                self.stats.files_sent += 1;
            }
            FsMsg::Data { offset, data } => {
                let f = self.file_for("Data")?;
                let len = data.0.len() as u64;
                if offset.checked_add(len).map_or(true, |end| end > f.size) {
                    return Err(FsyncError::Protocol(format!(
                        "data at {offset}+{len} beyond the {} bytes of {}",
                        f.size,
                        f.at.local.display()
                    )));
                }
                sys::pwrite_all(f.fd.as_fd(), &data.0, offset)
                    .map_err(|e| FsyncError::io("writing", &f.at.local, e))?;
                self.stats.bytes_sent += len;
            }
            FsMsg::Punch { offset, len } => {
                let f = self.file_for("Punch")?;
                if !f.delta || offset.checked_add(len).map_or(true, |end| end > f.size) {
                    return Err(FsyncError::Protocol(format!(
                        "hole at {offset}+{len} not within the delta of {}",
                        f.at.local.display()
                    )));
                }
                punch(f.fd.as_fd(), offset, len)
                    .map_err(|e| FsyncError::io("punching a hole in", &f.at.local, e))?;
            }
            FsMsg::FileEnd { meta, hash } => self.end_file(&meta, hash)?,
            FsMsg::Symlink {
                root,
                path,
                target,
                meta,
            } => {
                let at = self.resolve(root, &path.0, false)?;
                let target = sys::cstring(&target.0).map_err(|_| {
                    FsyncError::Protocol(format!(
                        "the target of symlink {} contains a NUL byte",
                        at.local.display()
                    ))
                })?;
                if target.as_bytes().is_empty() {
                    return Err(FsyncError::Protocol(format!(
                        "symlink {} has an empty target",
                        at.local.display()
                    )));
                }
                self.touch(root, &at)?;
                let (mut tmp, ()) = TempName::create(&at.dir, |d, n| sys::symlinkat(&target, d, n))
                    .map_err(|e| FsyncError::io("creating the symlink", &at.local, e))?;
                self.install_non_regular(root, &at, &mut tmp, &meta, true)?;
            }
            FsMsg::Special {
                root,
                path,
                kind,
                rdev,
                meta,
            } => {
                let at = self.resolve(root, &path.0, false)?;
                if !matches!(kind, EntryKind::Fifo | EntryKind::Char | EntryKind::Block) {
                    return Err(FsyncError::Protocol(format!(
                        "{}: {kind:?} is not a special file",
                        at.local.display()
                    )));
                }
                self.touch(root, &at)?;
                let mode = kind.mode_bits() | 0o600;
                let (mut tmp, ()) = TempName::create(&at.dir, |d, n| {
                    sys::mknodat(d, n, mode, rdev as libc::dev_t)
                })
                .map_err(|e| FsyncError::io("creating the node", &at.local, e))?;
                self.install_non_regular(root, &at, &mut tmp, &meta, false)?;
            }
            FsMsg::Link { root, path, target } => {
                self.link(root, &path.0, &target.0)?;
                self.stats.files_sent += 1;
            }
            FsMsg::Attr {
                root,
                path,
                kind,
                meta,
            } => {
                self.attr(root, &path.0, kind, &meta)?;
                self.stats.files_sent += 1;
            }
            FsMsg::End {
                files_scanned,
                files_sent,
                bytes_sent,
                deleted,
            } => {
                self.set_dir_times()?;
                let s = &mut self.stats;
                s.files_scanned = files_scanned;
                if (files_sent, bytes_sent, deleted) != (s.files_sent, s.bytes_sent, s.deleted) {
                    return Err(FsyncError::Protocol(format!(
                        "the sender counted {files_sent} entries, {bytes_sent} bytes, \
                         {deleted} deletions; {} entries, {} bytes, {} deletions arrived",
                        s.files_sent, s.bytes_sent, s.deleted
                    )));
                }
                return Ok(true);
            }
            FsMsg::Error(m) => return Err(FsyncError::Peer(m)),
            other @ (FsMsg::Begin { .. } | FsMsg::Finish | FsMsg::Ack(_)) => {
                return Err(FsyncError::Protocol(format!(
                    "unexpected {} inside a pass",
                    msg_name(&other)
                )))
            }
        }
        Ok(false)
    }

    fn file_for(&mut self, what: &str) -> Result<&mut OpenFile, FsyncError> {
        self.file
            .as_mut()
            .ok_or_else(|| FsyncError::Protocol(format!("{what} outside a file")))
    }

    fn dir(&mut self, root: u32, path: &[u8], meta: &Meta) -> Result<(), FsyncError> {
        let at = self.resolve(root, path, true)?;
        let mtime = (meta.mtime_sec, meta.mtime_nsec);
        let Some(name) = at.name.as_ref() else {
            // The root itself.
            apply_meta(MetaTarget::Fd(at.dir()), meta, false, false, &at.local)?;
            self.dir_times.insert((root, Vec::new()), mtime);
            return Ok(());
        };
        self.touch(root, &at)?;
        match sys::mkdirat(at.dir(), name, 0o700) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let st = sys::lstatat(at.dir(), name)
                    .map_err(|e| FsyncError::io("reading", &at.local, e))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    remove_any(at.dir(), name)
                        .map_err(|e| FsyncError::io("removing", &at.local, e))?;
                    self.forget(root, &at.rel);
                    sys::mkdirat(at.dir(), name, 0o700)
                        .map_err(|e| FsyncError::io("creating the directory", &at.local, e))?;
                }
            }
            Err(e) => return Err(FsyncError::io("creating the directory", &at.local, e)),
        }
        let fd = sys::openat(
            at.dir(),
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| FsyncError::io("opening the directory", &at.local, e))?;
        apply_meta(MetaTarget::Fd(fd.as_fd()), meta, false, false, &at.local)?;
        self.dir_times.insert((root, at.rel.clone()), mtime);
        Ok(())
    }

    fn begin_file(
        &mut self,
        root: u32,
        path: &[u8],
        size: u64,
        delta: bool,
    ) -> Result<(), FsyncError> {
        let at = self.resolve(root, path, false)?;
        let name = at.name()?.clone();
        self.touch(root, &at)?;
        let (tmp, fd) = TempName::create(&at.dir, |d, n| {
            sys::openat(
                d,
                n,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
        })
        .map_err(|e| FsyncError::io("creating a temporary file for", &at.local, e))?;
        if delta {
            let changed = |why: &str| FsyncError::Changed {
                path: at.local.clone(),
                why: why.into(),
            };
            // Never open anything but a regular file: a device node an
            // earlier message made could act on open (a watchdog, a tape).
            match sys::lstatat(at.dir(), &name) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {}
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                    return Err(changed("it is now a symlink"))
                }
                Ok(_) => return Err(changed("it is no longer a regular file")),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    return Err(changed("it is missing"))
                }
                Err(e) => return Err(FsyncError::io("reading", &at.local, e)),
            }
            let old = match sys::openat(
                at.dir(),
                &name,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
                0,
            ) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    return Err(changed("it is missing"))
                }
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    return Err(changed("it is now a symlink"))
                }
                Err(e) => return Err(FsyncError::io("opening", &at.local, e)),
            };
            let st =
                sys::fstat(old.as_fd()).map_err(|e| FsyncError::io("reading", &at.local, e))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(changed("it is no longer a regular file"));
            }
            let keep = (st.st_size as u64).min(size);
            let regions = sys::data_regions(old.as_fd(), keep)
                .map_err(|e| FsyncError::io("reading", &at.local, e))?;
            for (s, e) in regions {
                sys::copy_range(old.as_fd(), fd.as_fd(), s, e - s)
                    .map_err(|e| FsyncError::io("copying the old version of", &at.local, e))?;
            }
        }
        sys::ftruncate(fd.as_fd(), size).map_err(|e| FsyncError::io("sizing", &at.local, e))?;
        self.file = Some(OpenFile {
            at,
            root,
            tmp,
            fd,
            size,
            delta,
        });
        Ok(())
    }

    fn end_file(&mut self, meta: &Meta, hash: u128) -> Result<(), FsyncError> {
        let Some(mut f) = self.file.take() else {
            return Err(FsyncError::Protocol("FileEnd outside a file".into()));
        };
        if f.delta {
            let got = delta::whole_hash(f.fd.as_fd(), f.size)
                .map_err(|e| FsyncError::io("reading back", &f.at.local, e))?;
            if got != hash {
                return Err(FsyncError::Changed {
                    path: f.at.local.clone(),
                    why: "applying the changed blocks to it did not give the sender's content"
                        .into(),
                });
            }
        }
        apply_meta(MetaTarget::Fd(f.fd.as_fd()), meta, true, true, &f.at.local)?;
        let at = f.at.clone();
        self.install(f.root, &at, &mut f.tmp)?;
        Ok(())
    }

    fn link(&mut self, root: u32, path: &[u8], target: &[u8]) -> Result<(), FsyncError> {
        let t = self.resolve(root, target, false)?;
        let at = self.resolve(root, path, false)?;
        let tname = t.name()?;
        let name = at.name()?;
        let tst = match sys::lstatat(t.dir(), tname) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(FsyncError::Protocol(format!(
                    "hard link {} to {}, which was never sent",
                    at.local.display(),
                    t.local.display()
                )))
            }
            Err(e) => return Err(FsyncError::io("reading", &t.local, e)),
        };
        if tst.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(FsyncError::Protocol(format!(
                "hard link {} to directory {}",
                at.local.display(),
                t.local.display()
            )));
        }
        if let Ok(st) = sys::lstatat(at.dir(), name) {
            if st.st_dev == tst.st_dev && st.st_ino == tst.st_ino {
                return Ok(());
            }
        }
        self.touch(root, &at)?;
        let (mut tmp, ()) = TempName::create(&at.dir, |d, n| sys::linkat(t.dir(), tname, d, n))
            .map_err(|e| FsyncError::io("creating the hard link", &at.local, e))?;
        self.install(root, &at, &mut tmp)
    }

    fn attr(
        &mut self,
        root: u32,
        path: &[u8],
        kind: EntryKind,
        meta: &Meta,
    ) -> Result<(), FsyncError> {
        let at = self.resolve(root, path, false)?;
        let name = at.name()?;
        let changed = |why: String| FsyncError::Changed {
            path: at.local.clone(),
            why,
        };
        let st = match sys::lstatat(at.dir(), name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(changed("it is missing".into()))
            }
            Err(e) => return Err(FsyncError::io("reading", &at.local, e)),
        };
        if EntryKind::from_mode(st.st_mode) != Some(kind) {
            return Err(changed(format!("it is not a {kind:?} any more")));
        }
        match kind {
            EntryKind::File | EntryKind::Dir => {
                let flags = if kind == EntryKind::Dir {
                    libc::O_RDONLY | libc::O_DIRECTORY
                } else {
                    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY
                };
                let fd = sys::openat(at.dir(), name, flags | libc::O_NOFOLLOW, 0)
                    .map_err(|e| FsyncError::io("opening", &at.local, e))?;
                let is_dir = kind == EntryKind::Dir;
                apply_meta(MetaTarget::Fd(fd.as_fd()), meta, !is_dir, false, &at.local)?;
                if is_dir {
                    self.dir_times
                        .insert((root, at.rel.clone()), (meta.mtime_sec, meta.mtime_nsec));
                }
            }
            _ => apply_meta(
                MetaTarget::At {
                    dir: at.dir(),
                    name,
                    symlink: kind == EntryKind::Symlink,
                },
                meta,
                true,
                false,
                &at.local,
            )?,
        }
        Ok(())
    }

    /// Sets the directory mtimes of the pass, deepest first.
    fn set_dir_times(&mut self) -> Result<(), FsyncError> {
        let mut all: Vec<_> = std::mem::take(&mut self.dir_times).into_iter().collect();
        let depth = |p: &[u8]| {
            if p.is_empty() {
                0
            } else {
                1 + p.iter().filter(|&&b| b == b'/').count()
            }
        };
        all.sort_by_key(|((_, p), _)| std::cmp::Reverse(depth(p)));
        for ((root, rel), (sec, nsec)) in all {
            let at = self.resolve(root, &rel, true)?;
            let r = match at.name.as_ref() {
                None => sys::set_mtime_fd(at.dir(), sec, nsec),
                Some(name) => match sys::lstatat(at.dir(), name) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        sys::set_mtime_at(at.dir(), name, sec, nsec)
                    }
                    Ok(_) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                    Err(e) => Err(e),
                },
            };
            r.map_err(|e| FsyncError::io("setting the mtime of", &at.local, e))?;
        }
        Ok(())
    }
}

/// Punches a hole, or writes zeros where the filesystem cannot punch.
fn punch(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    match sys::punch_hole(fd, off, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                sys::pwrite_all(fd, &zeros[..n], off + done)?;
                done += n as u64;
            }
            Ok(())
        }
        r => r,
    }
}

/// Whether a failure to set or remove this xattr is only worth a warning
/// (the destination kernel or LSM owns these namespaces).
fn xattr_soft(name: &[u8], e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP))
        || name.starts_with(b"security.")
        || name.starts_with(b"system.")
}

/// Applies owner, xattrs, mode and (if `mtime`) the mtime, in that order
/// (a chown clears setuid/setgid and file capabilities, so it comes first).
/// `fresh`: the target was just created by us, so it has no xattrs to remove.
fn apply_meta(
    t: MetaTarget<'_>,
    meta: &Meta,
    mtime: bool,
    fresh: bool,
    local: &Path,
) -> Result<(), FsyncError> {
    let proc;
    let (xt, symlink) = match &t {
        MetaTarget::Fd(fd) => {
            sys::fchown(*fd, meta.uid, meta.gid)
                .map_err(|e| FsyncError::io("changing the owner of", local, e))?;
            (XTarget::Fd(*fd), false)
        }
        MetaTarget::At { dir, name, symlink } => {
            sys::lchownat(*dir, name, meta.uid, meta.gid)
                .map_err(|e| FsyncError::io("changing the owner of", local, e))?;
            proc = if fresh && meta.xattrs.is_empty() {
                CString::default()
            } else {
                sys::proc_path(dir.as_raw_fd(), name)
            };
            (XTarget::Path(&proc), *symlink)
        }
    };
    let have = if fresh {
        Vec::new()
    } else {
        sys::list_xattrs(xt).map_err(|e| FsyncError::io("listing the xattrs of", local, e))?
    };
    for name in have {
        if meta.xattrs.iter().any(|x| x.name.0 == name) {
            continue;
        }
        let c =
            sys::cstring(&name).map_err(|e| FsyncError::io("removing an xattr of", local, e))?;
        match sys::remove_xattr(xt, &c) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) if xattr_soft(&name, &e) => tracing::warn!(
                "fs sync: cannot remove xattr {} of {}: {e}",
                String::from_utf8_lossy(&name),
                local.display()
            ),
            Err(e) => return Err(FsyncError::io("removing an xattr of", local, e)),
        }
    }
    for x in &meta.xattrs {
        let c = sys::cstring(&x.name.0).map_err(|_| {
            FsyncError::Protocol(format!(
                "an xattr name of {} contains a NUL byte",
                local.display()
            ))
        })?;
        match sys::set_xattr(xt, &c, &x.value.0) {
            Ok(()) => {}
            Err(e) if xattr_soft(&x.name.0, &e) => tracing::warn!(
                "fs sync: cannot set xattr {} of {}: {e}",
                String::from_utf8_lossy(&x.name.0),
                local.display()
            ),
            Err(e) => {
                return Err(FsyncError::io(
                    "setting an xattr (the destination filesystem must support the source's) of",
                    local,
                    e,
                ))
            }
        }
    }
    if !symlink {
        let r = match &t {
            MetaTarget::Fd(fd) => sys::fchmod(*fd, meta.mode),
            MetaTarget::At { dir, name, .. } => sys::fchmodat(*dir, name, meta.mode),
        };
        r.map_err(|e| FsyncError::io("changing the mode of", local, e))?;
    }
    if mtime {
        let r = match &t {
            MetaTarget::Fd(fd) => sys::set_mtime_fd(*fd, meta.mtime_sec, meta.mtime_nsec),
            MetaTarget::At { dir, name, .. } => {
                sys::set_mtime_at(*dir, name, meta.mtime_sec, meta.mtime_nsec)
            }
        };
        r.map_err(|e| FsyncError::io("setting the mtime of", local, e))?;
    }
    Ok(())
}
