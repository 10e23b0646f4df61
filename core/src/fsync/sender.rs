//! [`Sender`]: walks the roots, sends what changed since its previous pass
//! and remembers what it sent.
//!
//! A pass scans every root first (lstat only), sends the deletions
//! (paths of the previous pass that are gone or changed kind, deepest
//! first), then the entries in walk order: a path whose stat (size,
//! mtime, ctime, mode, owner, inode, device number) is unchanged is not
//! even opened, unless it was "racy" — changed less than [`RACY_SECS`]
//! before the previous pass looked at it, where a later change in the same
//! timestamp tick would be invisible — in which case it is re-read and
//! compared by content and metadata hashes. Regular files the receiver
//! already has go as deltas (changed blocks only); others whole, data
//! regions only.
//!
//! What is read is read confined to the root, like the receiver writes:
//! each entry is reached from the root's descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) and `*at` calls, so a workload
//! that swaps a directory for a symlink during the walk cannot make phaul
//! copy files from outside its tree; such an entry (and what is below it)
//! is skipped in that pass like one that vanished, and the next pass sees
//! the tree as it then is.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::proto::frame::FrameReader;

use super::delta::{self, Sig, WholeHasher, BLOCK};
use super::msg::{Bytes, EntryKind, FsMsg, Meta, Wire, DATA_HEADROOM};
use super::scan::{self, Entry, Stat};
use super::sys::{self, XTarget};
use super::{FsyncError, PassStats, CHUNK};

/// An entry whose ctime is less than this many seconds before the scan
/// started is re-checked by content in the next pass.
pub const RACY_SECS: i64 = 2;

/// What the sender remembers of one path: what the receiver has there.
#[derive(Debug, Clone)]
struct Seen {
    st: Stat,
    /// For a hard link: the name of the inode it was linked to.
    link_to: Option<Vec<u8>>,
    /// Block signatures of the content sent (regular files that carry data).
    blocks: Option<Vec<Sig>>,
    /// Hash of the metadata sent (plus a symlink's target or a node's rdev).
    meta_hash: u128,
    /// Changed so recently that a further change might not show in its stat.
    racy: bool,
}

/// The source side of a tree synchronisation.
pub struct Sender {
    roots: Vec<PathBuf>,
    state: Vec<HashMap<Vec<u8>, Seen>>,
    passes: u32,
    poisoned: bool,
    /// Test hook: runs between the walk and the reading of a pass.
    #[cfg(test)]
    pub(crate) after_scan: Option<Box<dyn FnMut() + Send>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("roots", &self.roots)
            .field("passes", &self.passes)
            .field("paths", &self.state.iter().map(HashMap::len).sum::<usize>())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// Writes data and hole punches of one file, coalescing contiguous data
/// into frames of at most [`CHUNK`] bytes.
struct Out<'a, 'c, W: Write> {
    w: &'a mut Wire<'c, W>,
    data_off: u64,
    /// [`DATA_HEADROOM`] spare bytes, then the pending data.
    data: Vec<u8>,
    punch: Option<(u64, u64)>,
    bytes: u64,
}

impl<'a, 'c, W: Write> Out<'a, 'c, W> {
    fn new(w: &'a mut Wire<'c, W>) -> Self {
        Out {
            w,
            data_off: 0,
            data: {
                let mut v = Vec::with_capacity(DATA_HEADROOM + CHUNK);
                v.resize(DATA_HEADROOM, 0);
                v
            },
            punch: None,
            bytes: 0,
        }
    }

    fn punch(&mut self, off: u64, len: u64) -> Result<(), FsyncError> {
        match &mut self.punch {
            Some((_, end)) if *end == off => *end += len,
            _ => {
                self.flush_punch()?;
                self.punch = Some((off, off + len));
            }
        }
        Ok(())
    }

    fn pending(&self) -> usize {
        self.data.len() - DATA_HEADROOM
    }

    fn data(&mut self, off: u64, bytes: &[u8]) -> Result<(), FsyncError> {
        if self.pending() > 0
            && (self.data_off + self.pending() as u64 != off
                || self.pending() + bytes.len() > CHUNK)
        {
            self.flush_data()?;
        }
        if self.pending() == 0 {
            self.data_off = off;
        }
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    fn flush_punch(&mut self) -> Result<(), FsyncError> {
        if let Some((s, e)) = self.punch.take() {
            self.w.msg(&FsMsg::Punch {
                offset: s,
                len: e - s,
            })?;
        }
        Ok(())
    }

    /// Sends pending data (after any pending punch, which may cover it).
    fn flush_data(&mut self) -> Result<(), FsyncError> {
        self.flush_punch()?;
        let n = self.pending();
        if n == 0 {
            return Ok(());
        }
        self.w.data_in_place(self.data_off, &mut self.data)?;
        self.bytes += n as u64;
        self.data.truncate(DATA_HEADROOM);
        Ok(())
    }

    fn finish(mut self) -> Result<u64, FsyncError> {
        self.flush_data()?;
        self.flush_punch()?;
        Ok(self.bytes)
    }
}

/// Hash of wire metadata plus kind-specific extras.
fn meta_hash(meta: &Meta, extra: &[u8]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    match postcard::to_allocvec(meta) {
        Ok(v) => h.update(&v),
        Err(_) => h.update(b"unencodable"),
    }
    h.update(extra);
    h.digest128()
}

fn vanished(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::EINVAL)
    )
}

/// What sending one entry produced: what the receiver now has, and whether
/// the receiver got a new inode for it (its hard links must be redone).
type Sent = Option<(Seen, bool)>;

/// Per-pass context.
struct PassCtx {
    stats: PassStats,
    /// Entries whose ctime is at or after this are racy.
    racy_after: (i64, u32),
}

impl PassCtx {
    fn racy(&self, st: &Stat) -> bool {
        st.ctime >= self.racy_after
    }
}

impl Sender {
    /// `roots`: absolute directory paths on this host (index = root id on
    /// the wire).
    pub fn new(roots: Vec<PathBuf>) -> Sender {
        let state = roots.iter().map(|_| HashMap::new()).collect();
        Sender {
            roots,
            state,
            passes: 0,
            poisoned: false,
            #[cfg(test)]
            after_scan: None,
        }
    }

    /// The roots, in root-id order.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// How many passes completed.
    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// Runs one pass over `conn` (a connected stream; frames written and
    /// the receiver's answer read on it): walks every root, sends what
    /// changed since the previous pass (everything on the first),
    /// deletions, then waits for the receiver's acknowledgement of the
    /// pass. `final_pass` is informational (logged, in stats). After an
    /// error this sender refuses further passes ([`FsyncError::Poisoned`]).
    pub fn pass<S: Read + Write>(
        &mut self,
        conn: &mut S,
        final_pass: bool,
    ) -> Result<PassStats, FsyncError> {
        if self.poisoned {
            return Err(FsyncError::Poisoned);
        }
        let r = self.run_pass(conn, final_pass);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Tells the receiver there will be no more passes (it then returns
    /// from `serve`).
    pub fn finish<S: Read + Write>(&mut self, conn: &mut S) -> Result<(), FsyncError> {
        if self.poisoned {
            return Err(FsyncError::Poisoned);
        }
        Wire::new(&mut *conn).msg(&FsMsg::Finish)?;
        Ok(())
    }

    fn run_pass<S: Read + Write>(
        &mut self,
        conn: &mut S,
        final_pass: bool,
    ) -> Result<PassStats, FsyncError> {
        let start = Instant::now();
        let pass = self.passes + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut ctx = PassCtx {
            stats: PassStats {
                pass,
                final_pass,
                ..PassStats::default()
            },
            racy_after: (now.as_secs() as i64 - RACY_SECS, now.subsec_nanos()),
        };
        let roots_n = u32::try_from(self.roots.len())
            .map_err(|_| FsyncError::Protocol("too many roots".into()))?;
        let mut srcs = Vec::with_capacity(self.roots.len());
        let mut scans = Vec::with_capacity(self.roots.len());
        for r in &self.roots {
            let src = Src::open(r)?;
            scans.push(scan::scan(&src.path)?);
            srcs.push(src);
        }
        #[cfg(test)]
        if let Some(hook) = self.after_scan.as_mut() {
            hook();
        }

        let mut new_state: Vec<HashMap<Vec<u8>, Seen>> = Vec::with_capacity(scans.len());
        let sent = {
            let mut w = Wire::new(&mut *conn);
            self.send_pass(&mut w, &mut srcs, &scans, &mut new_state, &mut ctx, roots_n)
        };
        if let Err(e) = sent {
            return Err(peer_error(conn, e));
        }
        let mut stats = ctx.stats;
        match FrameReader::new(&mut *conn).read::<FsMsg>()? {
            FsMsg::Ack(theirs) => {
                if theirs.pass != pass
                    || theirs.bytes_sent != stats.bytes_sent
                    || theirs.files_sent != stats.files_sent
                    || theirs.deleted != stats.deleted
                {
                    return Err(FsyncError::Protocol(format!(
                        "the receiver acknowledged pass {} with {} entries, {} bytes, {} deletions; \
                         pass {pass} sent {} entries, {} bytes, {} deletions",
                        theirs.pass,
                        theirs.files_sent,
                        theirs.bytes_sent,
                        theirs.deleted,
                        stats.files_sent,
                        stats.bytes_sent,
                        stats.deleted
                    )));
                }
            }
            FsMsg::Error(m) => return Err(FsyncError::Peer(m)),
            other => {
                return Err(FsyncError::Protocol(format!(
                    "expected the receiver's acknowledgement, got {}",
                    msg_name(&other)
                )))
            }
        }
        self.state = new_state;
        self.passes = pass;
        stats.duration_us = start.elapsed().as_micros() as u64;
        tracing::info!(
            pass,
            final_pass,
            scanned = stats.files_scanned,
            sent = stats.files_sent,
            bytes = stats.bytes_sent,
            deleted = stats.deleted,
            ms = stats.duration_us / 1000,
            "fs sync pass done"
        );
        Ok(stats)
    }

    fn send_pass<W: Write>(
        &self,
        w: &mut Wire<'_, W>,
        srcs: &mut [Src],
        scans: &[Vec<Entry>],
        new_state: &mut Vec<HashMap<Vec<u8>, Seen>>,
        ctx: &mut PassCtx,
        roots_n: u32,
    ) -> Result<(), FsyncError> {
        w.msg(&FsMsg::Begin {
            pass: ctx.stats.pass,
            final_pass: ctx.stats.final_pass,
            roots: roots_n,
        })?;
        // Deletions first, deepest first (a child sorts after its parent),
        // so that a path changing kind is free when it is sent again.
        for (rid, scan) in scans.iter().enumerate() {
            let present: HashMap<&[u8], EntryKind> =
                scan.iter().map(|e| (&e.rel[..], e.st.kind)).collect();
            let mut gone: Vec<&Vec<u8>> = self.state[rid]
                .iter()
                .filter(|(p, s)| present.get(&p[..]) != Some(&s.st.kind))
                .map(|(p, _)| p)
                .collect();
            gone.sort_unstable_by(|a, b| b.cmp(a));
            for p in gone {
                w.msg(&FsMsg::Delete {
                    root: rid as u32,
                    path: Bytes(p.clone()),
                })?;
                ctx.stats.deleted += 1;
            }
        }
        for ((rid, scan), src) in scans.iter().enumerate().zip(srcs.iter_mut()) {
            let prev_state = &self.state[rid];
            let mut next = HashMap::with_capacity(scan.len());
            let mut inodes = Inodes::new();
            // Below a directory that could not be sent, nothing is sent.
            let mut skip_under: Option<Vec<u8>> = None;
            for e in scan {
                ctx.stats.files_scanned += 1;
                let prev = prev_state.get(&e.rel).filter(|p| p.st.kind == e.st.kind);
                if skip_under.as_ref().is_some_and(|s| !e.rel.starts_with(s)) {
                    skip_under = None;
                }
                let sent = match skip_under {
                    Some(_) => None,
                    None => {
                        let mut one = One {
                            w: &mut *w,
                            src: &mut *src,
                            ctx: &mut *ctx,
                            root: rid as u32,
                            e,
                        };
                        one.send(prev, &mut inodes)?
                    }
                };
                match sent {
                    Some((seen, fresh)) => {
                        if e.st.kind != EntryKind::Dir && e.st.nlink > 1 && seen.link_to.is_none() {
                            inodes.insert((e.st.dev, e.st.ino), (e.rel.clone(), fresh));
                        }
                        next.insert(e.rel.clone(), seen);
                    }
                    None => {
                        // Vanished, replaced, or reachable only through a
                        // symlink while we looked: the receiver keeps what
                        // it had, and the next pass looks again.
                        if e.st.kind == EntryKind::Dir && skip_under.is_none() {
                            let mut s = e.rel.clone();
                            s.push(b'/');
                            skip_under = Some(s);
                        }
                        if let Some(p) = prev {
                            next.insert(e.rel.clone(), p.clone());
                        }
                    }
                }
            }
            new_state.push(next);
        }
        w.msg(&FsMsg::End {
            files_scanned: ctx.stats.files_scanned,
            files_sent: ctx.stats.files_sent,
            bytes_sent: ctx.stats.bytes_sent,
            deleted: ctx.stats.deleted,
        })?;
        Ok(())
    }
}

/// (dev, ino) -> (the name sent for the inode, whether the receiver got a
/// new inode for it in this pass).
type Inodes = HashMap<(u64, u64), (Vec<u8>, bool)>;

/// A source root opened for confined reading: every entry the sender reads
/// is reached from the root's descriptor without following any symlink
/// (`openat2` beneath the root, then `*at` calls on the final name), so a
/// workload that swaps a directory for a symlink while the walk runs
/// cannot make phaul copy files from outside the tree.
struct Src {
    /// The canonical root path (walked).
    path: PathBuf,
    fd: Arc<OwnedFd>,
    /// The last parent directory opened.
    cache: Option<(Vec<u8>, Arc<OwnedFd>)>,
}

/// Where an entry is, once reached without symlinks.
enum Place {
    /// The root itself.
    Root,
    /// A name in an open parent directory.
    At(Arc<OwnedFd>, CString),
}

impl Src {
    fn open(root: &Path) -> Result<Src, FsyncError> {
        if !root.is_absolute() {
            return Err(FsyncError::Root {
                path: root.to_path_buf(),
                why: "not an absolute path".into(),
            });
        }
        // A root given as a symlink is the directory it points to.
        let path = std::fs::canonicalize(root).map_err(|e| FsyncError::io("reading", root, e))?;
        let c = sys::cstring(path.as_os_str().as_bytes())
            .map_err(|e| FsyncError::io("opening", &path, e))?;
        let fd = sys::open(&c, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                FsyncError::Root {
                    path: path.clone(),
                    why: "not a directory".into(),
                }
            } else {
                FsyncError::io("opening", &path, e)
            }
        })?;
        Ok(Src {
            path,
            fd: Arc::new(fd),
            cache: None,
        })
    }

    /// Reaches `rel` without symlinks; None if it cannot be (gone, or a
    /// parent is no longer a directory of the tree).
    fn locate(&mut self, rel: &[u8]) -> io::Result<Option<Place>> {
        if rel.is_empty() {
            return Ok(Some(Place::Root));
        }
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&rel[..0], rel),
        };
        let name = sys::cstring(name)?;
        if parent.is_empty() {
            return Ok(Some(Place::At(self.fd.clone(), name)));
        }
        if let Some((p, fd)) = &self.cache {
            if p == parent {
                return Ok(Some(Place::At(fd.clone(), name)));
            }
        }
        let fd = match sys::open_dir_beneath(self.fd.as_fd(), &sys::cstring(parent)?) {
            Ok(fd) => Arc::new(fd),
            Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::EXDEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.cache = Some((parent.to_vec(), fd.clone()));
        Ok(Some(Place::At(fd, name)))
    }
}

/// Sending one entry.
struct One<'a, 'c, W: Write> {
    w: &'a mut Wire<'c, W>,
    src: &'a mut Src,
    ctx: &'a mut PassCtx,
    root: u32,
    e: &'a Entry,
}

/// Wraps a local I/O error with what was being done and the path.
fn ioe<'p>(path: &'p Path, what: &'static str) -> impl Fn(io::Error) -> FsyncError + 'p {
    move |e| FsyncError::io(what, path, e)
}

/// Maps "gone or not reachable without a symlink" to None.
fn found<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) if vanished(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

impl<W: Write> One<'_, '_, W> {
    fn send(&mut self, prev: Option<&Seen>, inodes: &mut Inodes) -> Result<Sent, FsyncError> {
        let st = self.e.st;
        if st.kind != EntryKind::Dir && st.nlink > 1 {
            if let Some((leader, fresh)) = inodes.get(&(st.dev, st.ino)) {
                return self.follower(prev, leader, *fresh);
            }
        }
        // A stat-identical, non-racy entry that was sent as itself is not
        // even opened.
        if let Some(p) = prev.filter(|p| st.unchanged(&p.st) && !p.racy && p.link_to.is_none()) {
            return Ok(Some((p.clone(), false)));
        }
        // The receiver's version of this path as an entry of its own.
        let base = prev.filter(|p| p.link_to.is_none());
        let Some(place) = self
            .src
            .locate(&self.e.rel)
            .map_err(ioe(&self.e.path, "reaching"))?
        else {
            return Ok(None);
        };
        match (st.kind, place) {
            (EntryKind::Dir, place) => self.dir(place, base),
            (_, Place::Root) => Ok(None),
            (EntryKind::File, Place::At(dir, name)) => self.file(dir.as_fd(), &name, base),
            (kind, Place::At(dir, name)) => self.other(kind, dir.as_fd(), &name, base),
        }
    }

    /// Another name of an inode already sent in this pass.
    fn follower(
        &mut self,
        prev: Option<&Seen>,
        leader: &[u8],
        fresh: bool,
    ) -> Result<Sent, FsyncError> {
        let Some(Place::At(dir, name)) = self
            .src
            .locate(&self.e.rel)
            .map_err(ioe(&self.e.path, "reaching"))?
        else {
            return Ok(None);
        };
        let Some(raw) =
            found(sys::lstatat(dir.as_fd(), &name)).map_err(ioe(&self.e.path, "reading"))?
        else {
            return Ok(None);
        };
        let Some(st) =
            Stat::from_libc(&raw).filter(|s| (s.dev, s.ino) == (self.e.st.dev, self.e.st.ino))
        else {
            return Ok(None);
        };
        let need = fresh
            || prev.map_or(true, |p| {
                !st.unchanged(&p.st) || p.link_to.as_deref() != Some(leader)
            });
        if need {
            self.w.msg(&FsMsg::Link {
                root: self.root,
                path: Bytes(self.e.rel.clone()),
                target: Bytes(leader.to_vec()),
            })?;
            self.ctx.stats.files_sent += 1;
        }
        let seen = Seen {
            st,
            link_to: Some(leader.to_vec()),
            blocks: None,
            meta_hash: 0,
            racy: false,
        };
        Ok(Some((seen, false)))
    }

    fn dir(&mut self, place: Place, base: Option<&Seen>) -> Result<Sent, FsyncError> {
        let owned;
        let fd = match place {
            Place::Root => self.src.fd.as_fd(),
            Place::At(dir, name) => {
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                match found(sys::openat(dir.as_fd(), &name, flags, 0))
                    .map_err(ioe(&self.e.path, "opening"))?
                {
                    Some(fd) => {
                        owned = fd;
                        owned.as_fd()
                    }
                    None => return Ok(None),
                }
            }
        };
        let raw = sys::fstat(fd).map_err(ioe(&self.e.path, "reading"))?;
        let Some(st) = Stat::from_libc(&raw).filter(|s| s.kind == EntryKind::Dir) else {
            return Ok(None);
        };
        let xattrs = scan::read_xattrs(XTarget::Fd(fd))
            .map_err(ioe(&self.e.path, "reading the xattrs of"))?;
        let meta = st.meta(xattrs);
        let mh = meta_hash(&meta, b"dir");
        if base.map_or(true, |p| p.meta_hash != mh) {
            self.w.msg(&FsMsg::Dir {
                root: self.root,
                path: Bytes(self.e.rel.clone()),
                meta,
            })?;
            self.ctx.stats.files_sent += 1;
        }
        let seen = Seen {
            st,
            link_to: None,
            blocks: None,
            meta_hash: mh,
            racy: self.ctx.racy(&st),
        };
        Ok(Some((seen, false)))
    }

    /// A symlink, FIFO or device node.
    fn other(
        &mut self,
        kind: EntryKind,
        dir: BorrowedFd<'_>,
        name: &CStr,
        base: Option<&Seen>,
    ) -> Result<Sent, FsyncError> {
        let Some(raw) = found(sys::lstatat(dir, name)).map_err(ioe(&self.e.path, "reading"))?
        else {
            return Ok(None);
        };
        let Some(st) = Stat::from_libc(&raw).filter(|s| s.kind == kind) else {
            return Ok(None);
        };
        let target = if kind == EntryKind::Symlink {
            match found(sys::readlinkat(dir, name))
                .map_err(ioe(&self.e.path, "reading the symlink"))?
            {
                Some(t) => Some(t),
                None => return Ok(None),
            }
        } else {
            None
        };
        let proc = sys::proc_path(dir.as_raw_fd(), name);
        let Some(xattrs) = found(scan::read_xattrs(XTarget::Path(&proc)))
            .map_err(ioe(&self.e.path, "reading the xattrs of"))?
        else {
            return Ok(None);
        };
        let meta = st.meta(xattrs);
        let extra = match &target {
            Some(t) => [&b"symlink:"[..], t].concat(),
            None => format!("{kind:?}:{}", st.rdev).into_bytes(),
        };
        let mh = meta_hash(&meta, &extra);
        let seen = Seen {
            st,
            link_to: None,
            blocks: None,
            meta_hash: mh,
            racy: self.ctx.racy(&st),
        };
        if base.is_some_and(|p| p.meta_hash == mh) {
            return Ok(Some((seen, false)));
        }
        let path = Bytes(self.e.rel.clone());
        let msg = match target {
            Some(t) => FsMsg::Symlink {
                root: self.root,
                path,
                target: Bytes(t),
                meta,
            },
            None => FsMsg::Special {
                root: self.root,
                path,
                kind,
                rdev: st.rdev,
                meta,
            },
        };
        self.w.msg(&msg)?;
        self.ctx.stats.files_sent += 1;
        Ok(Some((seen, true)))
    }

    /// A regular file: whole (data regions) if the receiver does not have
    /// it, else the changed blocks; only metadata if the content is the
    /// same.
    fn file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        base: Option<&Seen>,
    ) -> Result<Sent, FsyncError> {
        let Some(fd) = open_regular(dir, name).map_err(ioe(&self.e.path, "opening"))? else {
            return Ok(None);
        };
        let fd = fd.as_fd();
        let raw = sys::fstat(fd).map_err(ioe(&self.e.path, "reading"))?;
        let Some(st) = Stat::from_libc(&raw) else {
            return Ok(None);
        };
        let xattrs = scan::read_xattrs(XTarget::Fd(fd))
            .map_err(ioe(&self.e.path, "reading the xattrs of"))?;
        let meta = st.meta(xattrs);
        let mh = meta_hash(&meta, b"file");
        let size = st.size;
        let racy = self.ctx.racy(&st);
        let regions = sys::data_regions(fd, size).map_err(ioe(&self.e.path, "reading"))?;
        let prev = base.and_then(|p| p.blocks.as_ref().map(|b| (b, p)));
        let delta = prev.is_some();
        let rel = Bytes(self.e.rel.clone());
        let header = FsMsg::File {
            root: self.root,
            path: rel.clone(),
            size,
            delta,
        };
        let mut header_sent = false;
        if !delta {
            self.w.msg(&header)?;
            header_sent = true;
        }

        let path = &self.e.path;
        let mut out = Out::new(&mut *self.w);
        let mut cursor = delta::RegionCursor::new(&regions);
        let mut subs = Vec::new();
        let mut buf = vec![0u8; BLOCK as usize];
        let mut sigs: Vec<Sig> = Vec::with_capacity(delta::block_count(size) as usize);
        let mut whole = WholeHasher::new();
        for i in 0..delta::block_count(size) {
            let start = i * BLOCK;
            let len = (size - start).min(BLOCK);
            cursor.data_in(start, start + len, &mut subs);
            let block = &mut buf[..len as usize];
            let sig = if subs.is_empty() {
                whole.add(delta::zero_hash(len as usize));
                None
            } else {
                sys::pread_fill(fd, block, start)
                    .map_err(|e| FsyncError::io("reading", path, e))?;
                // What was a hole when the regions were mapped stays one
                // (only the data regions are sent), even if the workload
                // wrote there since: the signature must describe exactly
                // what the receiver will have.
                delta::zero_outside(block, start, &subs);
                let h = delta::block_hash(block);
                whole.add(h);
                Some(h)
            };
            let changed = match prev {
                None => true,
                Some((old, _)) => match old.get(i as usize) {
                    Some(o) => *o != sig,
                    // Beyond the old end a hole needs nothing: the new size makes it.
                    None => sig.is_some(),
                },
            };
            if changed {
                if !header_sent {
                    out.w.msg(&header)?;
                    header_sent = true;
                }
                let covered: u64 = subs.iter().map(|(s, e)| e - s).sum();
                if delta && covered < len {
                    out.punch(start, len)?;
                }
                for &(s, e) in &subs {
                    out.data(s, &block[(s - start) as usize..(e - start) as usize])?;
                }
            }
            sigs.push(sig);
        }
        let hash = whole.finish();
        let seen = Seen {
            st,
            link_to: None,
            blocks: Some(sigs),
            meta_hash: mh,
            racy,
        };
        if let Some((_, p)) = prev {
            if !header_sent && p.st.size == size {
                // Same content: at most the metadata changed.
                if p.meta_hash != mh {
                    out.w.msg(&FsMsg::Attr {
                        root: self.root,
                        path: rel,
                        kind: EntryKind::File,
                        meta,
                    })?;
                    self.ctx.stats.files_sent += 1;
                }
                return Ok(Some((seen, false)));
            }
        }
        if !header_sent {
            out.w.msg(&header)?;
        }
        let bytes = out.finish()?;
        self.w.msg(&FsMsg::FileEnd { meta, hash })?;
        self.ctx.stats.bytes_sent += bytes;
        self.ctx.stats.files_sent += 1;
        Ok(Some((seen, true)))
    }
}

/// Opens a regular file for reading without following a symlink and
/// without opening anything else (a FIFO or device put in its place):
/// O_PATH first, then a real open of that very inode through /proc.
fn open_regular(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<OwnedFd>> {
    let Some(opath) = found(sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0))? else {
        return Ok(None);
    };
    let st = sys::fstat(opath.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let proc = sys::cstring(format!("/proc/self/fd/{}", opath.as_raw_fd()).as_bytes())?;
    match sys::open(&proc, libc::O_RDONLY | libc::O_NOATIME) {
        // O_NOATIME needs ownership or CAP_FOWNER.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            sys::open(&proc, libc::O_RDONLY).map(Some)
        }
        r => r.map(Some),
    }
}

/// After a failure to write: the receiver may have said why it stopped
/// reading (an error frame) before closing.
fn peer_error<S: Read + Write>(conn: &mut S, e: FsyncError) -> FsyncError {
    if !e.is_connection() {
        return e;
    }
    match FrameReader::new(&mut *conn).read::<FsMsg>() {
        Ok(FsMsg::Error(m)) => FsyncError::Peer(m),
        _ => e,
    }
}

/// A message's variant name, for protocol errors.
pub(crate) fn msg_name(m: &FsMsg) -> &'static str {
    match m {
        FsMsg::Begin { .. } => "Begin",
        FsMsg::Delete { .. } => "Delete",
        FsMsg::Dir { .. } => "Dir",
        FsMsg::File { .. } => "File",
        FsMsg::Data { .. } => "Data",
        FsMsg::Punch { .. } => "Punch",
        FsMsg::FileEnd { .. } => "FileEnd",
        FsMsg::Symlink { .. } => "Symlink",
        FsMsg::Special { .. } => "Special",
        FsMsg::Link { .. } => "Link",
        FsMsg::Attr { .. } => "Attr",
        FsMsg::End { .. } => "End",
        FsMsg::Finish => "Finish",
        FsMsg::Ack(_) => "Ack",
        FsMsg::Error(_) => "Error",
    }
}
