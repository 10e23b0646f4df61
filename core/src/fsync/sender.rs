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

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::proto::frame::FrameReader;

use super::delta::{self, Sig, WholeHasher, BLOCK};
use super::msg::{Bytes, EntryKind, FsMsg, Meta, Wire};
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
#[derive(Debug)]
pub struct Sender {
    roots: Vec<PathBuf>,
    state: Vec<HashMap<Vec<u8>, Seen>>,
    passes: u32,
    poisoned: bool,
}

/// Writes data and hole punches of one file, coalescing contiguous data
/// into frames of at most [`CHUNK`] bytes.
struct Out<'a, 'c, W: Write> {
    w: &'a mut Wire<'c, W>,
    data_off: u64,
    data: Vec<u8>,
    punch: Option<(u64, u64)>,
    bytes: u64,
}

impl<'a, 'c, W: Write> Out<'a, 'c, W> {
    fn new(w: &'a mut Wire<'c, W>) -> Self {
        Out {
            w,
            data_off: 0,
            data: Vec::with_capacity(CHUNK),
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

    fn data(&mut self, off: u64, bytes: &[u8]) -> Result<(), FsyncError> {
        if !self.data.is_empty()
            && (self.data_off + self.data.len() as u64 != off
                || self.data.len() + bytes.len() > CHUNK)
        {
            self.flush_data()?;
        }
        if self.data.is_empty() {
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
        if self.data.is_empty() {
            return Ok(());
        }
        self.w.data(self.data_off, &self.data)?;
        self.bytes += self.data.len() as u64;
        self.data.clear();
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
        let scans = self
            .roots
            .iter()
            .map(|r| scan::scan(r))
            .collect::<Result<Vec<_>, _>>()?;

        let mut new_state: Vec<HashMap<Vec<u8>, Seen>> = Vec::with_capacity(scans.len());
        let sent = {
            let mut w = Wire::new(&mut *conn);
            self.send_pass(
                &mut w,
                &scans,
                &mut new_state,
                &mut ctx,
                roots_n,
                final_pass,
            )
        };
        if let Err(e) = sent {
            return Err(peer_error(conn, e));
        }
        let stats = ctx.stats;
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
        let mut stats = stats;
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
        scans: &[Vec<Entry>],
        new_state: &mut Vec<HashMap<Vec<u8>, Seen>>,
        ctx: &mut PassCtx,
        roots_n: u32,
        final_pass: bool,
    ) -> Result<(), FsyncError> {
        w.msg(&FsMsg::Begin {
            pass: ctx.stats.pass,
            final_pass,
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
        for (rid, scan) in scans.iter().enumerate() {
            let prev_state = &self.state[rid];
            let mut next = HashMap::with_capacity(scan.len());
            // (dev, ino) -> (name sent for it, whether the receiver got a new inode)
            let mut inodes: HashMap<(u64, u64), (Vec<u8>, bool)> = HashMap::new();
            for e in scan {
                ctx.stats.files_scanned += 1;
                let prev = prev_state.get(&e.rel).filter(|p| p.st.kind == e.st.kind);
                let sent = send_entry(w, rid as u32, e, prev, &mut inodes, ctx)?;
                match sent {
                    Some((seen, fresh)) => {
                        if e.st.kind != EntryKind::Dir && e.st.nlink > 1 && seen.link_to.is_none() {
                            inodes.insert((e.st.dev, e.st.ino), (e.rel.clone(), fresh));
                        }
                        next.insert(e.rel.clone(), seen);
                    }
                    None => {
                        // Vanished or replaced while we looked: the
                        // receiver keeps what it had.
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

fn send_entry<W: Write>(
    w: &mut Wire<'_, W>,
    root: u32,
    e: &Entry,
    prev: Option<&Seen>,
    inodes: &mut HashMap<(u64, u64), (Vec<u8>, bool)>,
    ctx: &mut PassCtx,
) -> Result<Sent, FsyncError> {
    let st = e.st;
    // A stat-identical, non-racy entry that was sent as itself is not even opened.
    let quiet = |p: &Seen| st.unchanged(&p.st) && !p.racy && p.link_to.is_none();

    if st.kind != EntryKind::Dir && st.nlink > 1 {
        if let Some((leader, fresh)) = inodes.get(&(st.dev, st.ino)) {
            let need = *fresh
                || prev.map_or(true, |p| {
                    !st.unchanged(&p.st) || p.link_to.as_ref() != Some(leader)
                });
            if need {
                w.msg(&FsMsg::Link {
                    root,
                    path: Bytes(e.rel.clone()),
                    target: Bytes(leader.clone()),
                })?;
                ctx.stats.files_sent += 1;
            }
            return Ok(Some((
                Seen {
                    st,
                    link_to: Some(leader.clone()),
                    blocks: None,
                    meta_hash: 0,
                    racy: false,
                },
                false,
            )));
        }
    }
    if let Some(p) = prev.filter(|p| quiet(p)) {
        return Ok(Some((p.clone(), false)));
    }
    // The receiver's version of this path as an entry of its own (not a link).
    let base = prev.filter(|p| p.link_to.is_none());
    let path = &e.path;
    match st.kind {
        EntryKind::Dir => {
            let xattrs = match scan::read_xattrs_path(path) {
                Ok(x) => x,
                // Gone: still sent, so that children that may have been
                // recreated meanwhile have a parent; the next pass sees.
                Err(err) if vanished(&err) => Vec::new(),
                Err(err) => return Err(FsyncError::io("reading the xattrs of", path, err)),
            };
            let meta = st.meta(xattrs);
            let mh = meta_hash(&meta, b"dir");
            if base.map_or(true, |p| p.meta_hash != mh) {
                w.msg(&FsMsg::Dir {
                    root,
                    path: Bytes(e.rel.clone()),
                    meta,
                })?;
                ctx.stats.files_sent += 1;
            }
            let racy = ctx.racy(&st);
            Ok(Some((
                Seen {
                    st,
                    link_to: None,
                    blocks: None,
                    meta_hash: mh,
                    racy,
                },
                false,
            )))
        }
        EntryKind::Symlink => {
            let target = match std::fs::read_link(path) {
                Ok(t) => t.into_os_string().into_vec(),
                Err(err) if vanished(&err) => return Ok(None),
                Err(err) => return Err(FsyncError::io("reading the symlink", path, err)),
            };
            let xattrs = match scan::read_xattrs_path(path) {
                Ok(x) => x,
                Err(err) if vanished(&err) => return Ok(None),
                Err(err) => return Err(FsyncError::io("reading the xattrs of", path, err)),
            };
            let meta = st.meta(xattrs);
            let mut extra = b"symlink:".to_vec();
            extra.extend_from_slice(&target);
            let mh = meta_hash(&meta, &extra);
            let racy = ctx.racy(&st);
            let seen = Seen {
                st,
                link_to: None,
                blocks: None,
                meta_hash: mh,
                racy,
            };
            if base.is_some_and(|p| p.meta_hash == mh) {
                return Ok(Some((seen, false)));
            }
            w.msg(&FsMsg::Symlink {
                root,
                path: Bytes(e.rel.clone()),
                target: Bytes(target),
                meta,
            })?;
            ctx.stats.files_sent += 1;
            Ok(Some((seen, true)))
        }
        EntryKind::Fifo | EntryKind::Char | EntryKind::Block => {
            let xattrs = match scan::read_xattrs_path(path) {
                Ok(x) => x,
                Err(err) if vanished(&err) => return Ok(None),
                Err(err) => return Err(FsyncError::io("reading the xattrs of", path, err)),
            };
            let meta = st.meta(xattrs);
            let extra = format!("{:?}:{}", st.kind, st.rdev);
            let mh = meta_hash(&meta, extra.as_bytes());
            let racy = ctx.racy(&st);
            let seen = Seen {
                st,
                link_to: None,
                blocks: None,
                meta_hash: mh,
                racy,
            };
            if base.is_some_and(|p| p.meta_hash == mh) {
                return Ok(Some((seen, false)));
            }
            w.msg(&FsMsg::Special {
                root,
                path: Bytes(e.rel.clone()),
                kind: st.kind,
                rdev: st.rdev,
                meta,
            })?;
            ctx.stats.files_sent += 1;
            Ok(Some((seen, true)))
        }
        EntryKind::File => send_file(w, root, e, base, ctx),
    }
}

/// Opens a regular file for reading without following a symlink and
/// without opening anything else (a FIFO or device put in its place):
/// O_PATH first, then a real open of that very inode through /proc.
fn open_regular(path: &Path) -> io::Result<Option<OwnedFd>> {
    let c = sys::cstring(path.as_os_str().as_bytes())?;
    let opath = match sys::open(&c, libc::O_PATH | libc::O_NOFOLLOW) {
        Ok(fd) => fd,
        Err(e) if vanished(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let st = sys::fstat(opath.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let proc = sys::cstring(
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&opath)).as_bytes(),
    )?;
    match sys::open(&proc, libc::O_RDONLY | libc::O_NOATIME) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            sys::open(&proc, libc::O_RDONLY).map(Some)
        }
        Err(e) => Err(e),
    }
}

fn send_file<W: Write>(
    w: &mut Wire<'_, W>,
    root: u32,
    e: &Entry,
    base: Option<&Seen>,
    ctx: &mut PassCtx,
) -> Result<Sent, FsyncError> {
    let path = &e.path;
    let Some(fd) = open_regular(path).map_err(|err| FsyncError::io("opening", path, err))? else {
        return Ok(None);
    };
    let fd = fd.as_fd();
    let raw = sys::fstat(fd).map_err(|err| FsyncError::io("reading", path, err))?;
    let Some(st) = Stat::from_libc(&raw) else {
        return Ok(None);
    };
    let xattrs = scan::read_xattrs(XTarget::Fd(fd))
        .map_err(|err| FsyncError::io("reading the xattrs of", path, err))?;
    let meta = st.meta(xattrs);
    let mh = meta_hash(&meta, b"file");
    let size = st.size;
    let racy = ctx.racy(&st);
    let regions =
        sys::data_regions(fd, size).map_err(|err| FsyncError::io("reading", path, err))?;
    let prev = base.and_then(|p| p.blocks.as_ref().map(|b| (b, p)));
    let delta = prev.is_some();
    let rel = Bytes(e.rel.clone());
    let header = FsMsg::File {
        root,
        path: rel.clone(),
        size,
        delta,
    };
    let mut header_sent = false;
    if !delta {
        w.msg(&header)?;
        header_sent = true;
    }

    let mut out = Out::new(w);
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
                .map_err(|err| FsyncError::io("reading", path, err))?;
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
                    root,
                    path: rel,
                    kind: EntryKind::File,
                    meta,
                })?;
                ctx.stats.files_sent += 1;
            }
            return Ok(Some((seen, false)));
        }
    }
    if !header_sent {
        out.w.msg(&header)?;
    }
    let bytes = out.finish()?;
    w.msg(&FsMsg::FileEnd { meta, hash })?;
    ctx.stats.bytes_sent += bytes;
    ctx.stats.files_sent += 1;
    Ok(Some((seen, true)))
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
