//! Test helpers: a thorough comparison of two trees ([`compare_trees`]),
//! small wrappers to build trees with every kind of entry, and a
//! sender/receiver pair over a socketpair.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::{FsyncError, PassStats, Receiver, Sender};

/// What the comparison looks at in one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) fmt: u32,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Size (0 for directories, whose sizes are filesystem-specific).
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) rdev: u64,
    pub(crate) target: Option<Vec<u8>>,
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("test path without NUL")
}

/// All xattrs of a path (not followed), sorted.
pub(crate) fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = c(p);
    let t = super::sys::XTarget::Path(&cp);
    let mut out: Vec<_> = super::sys::list_xattrs(t)
        .expect("listxattr")
        .into_iter()
        .map(|n| {
            let v = super::sys::get_xattr(t, &CString::new(n.clone()).unwrap()).expect("getxattr");
            (n, v)
        })
        .collect();
    out.sort();
    out
}

/// Entries by relative path.
pub(crate) type Nodes = BTreeMap<Vec<u8>, Node>;
/// (dev, ino) of every non-directory, by relative path.
pub(crate) type Inodes = BTreeMap<Vec<u8>, (u64, u64)>;

/// Every entry of a tree (sockets left out: they are never copied), by
/// relative path, plus each path's (dev, ino) for the hard-link structure.
pub(crate) fn snapshot(root: &Path) -> (Nodes, Inodes) {
    let mut nodes = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.expect("walk");
        let m = e.metadata().expect("lstat");
        let fmt = m.mode() & libc::S_IFMT;
        if fmt == libc::S_IFSOCK {
            continue;
        }
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let target = (fmt == libc::S_IFLNK).then(|| {
            std::fs::read_link(e.path())
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        nodes.insert(
            rel.clone(),
            Node {
                fmt,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if fmt == libc::S_IFDIR { 0 } else { m.size() },
                mtime: (m.mtime(), m.mtime_nsec()),
                rdev: m.rdev(),
                target,
                xattrs: xattrs_of(e.path()),
            },
        );
        if fmt != libc::S_IFDIR {
            inodes.insert(rel, (m.dev(), m.ino()));
        }
    }
    (nodes, inodes)
}

/// The partition of non-directory paths into inodes, keeping only the
/// classes with more than one name.
fn link_classes(inodes: &Inodes) -> BTreeSet<Vec<Vec<u8>>> {
    let mut by: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    for (p, i) in inodes {
        by.entry(*i).or_default().push(p.clone());
    }
    by.into_values().filter(|v| v.len() > 1).collect()
}

fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Compares two trees: the set of paths, and for each its type, mode
/// (with setuid/setgid/sticky), uid, gid, size, mtime in ns, content,
/// symlink target, rdev and xattrs; and the hard-link structure (the
/// partition of paths into inodes). Also checks `b` holds no temporary
/// name. Err lists the differences (at most 30).
pub(crate) fn compare_trees(a: &Path, b: &Path) -> Result<(), String> {
    let (na, ia) = snapshot(a);
    let (nb, ib) = snapshot(b);
    let mut diffs = Vec::new();
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for (p, x) in &na {
        match nb.get(p) {
            None => diffs.push(format!("{}: missing in the copy", show(p))),
            Some(y) if x != y => diffs.push(format!("{}: {x:?} != {y:?}", show(p))),
            Some(_) => {
                if x.fmt == libc::S_IFREG {
                    let pa = a.join(std::ffi::OsStr::from_bytes(p));
                    let pb = b.join(std::ffi::OsStr::from_bytes(p));
                    match same_content(&pa, &pb) {
                        Ok(true) => {}
                        Ok(false) => diffs.push(format!("{}: content differs", show(p))),
                        Err(e) => diffs.push(format!("{}: {e}", show(p))),
                    }
                }
            }
        }
    }
    for p in nb.keys() {
        if !na.contains_key(p) {
            diffs.push(format!("{}: extra in the copy", show(p)));
        }
        if p.rsplit(|&c| c == b'/')
            .next()
            .is_some_and(|n| n.starts_with(super::receiver::TMP_PREFIX.as_bytes()))
        {
            diffs.push(format!("{}: temporary file left behind", show(p)));
        }
    }
    let (la, lb) = (link_classes(&ia), link_classes(&ib));
    if la != lb {
        let f = |s: &BTreeSet<Vec<Vec<u8>>>| {
            s.iter()
                .map(|c| c.iter().map(|p| show(p)).collect::<Vec<_>>().join("="))
                .collect::<Vec<_>>()
                .join(", ")
        };
        diffs.push(format!("hard links differ: [{}] != [{}]", f(&la), f(&lb)));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        diffs.truncate(30);
        Err(diffs.join("\n"))
    }
}

/// Panics with the differences unless the trees are identical.
#[track_caller]
pub(crate) fn assert_same(a: &Path, b: &Path) {
    if let Err(d) = compare_trees(a, b) {
        panic!("trees {} and {} differ:\n{d}", a.display(), b.display());
    }
}

fn check(r: libc::c_int, what: &str, p: &Path) {
    assert!(
        r == 0,
        "{what} {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// `lsetxattr`.
pub(crate) fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(r, "setxattr", p);
}

/// `lremovexattr`.
pub(crate) fn remove_xattr(p: &Path, name: &str) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings.
    let r = unsafe { libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) };
    check(r, "removexattr", p);
}

/// `lchown`.
pub(crate) fn lchown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: valid string.
    let r = unsafe { libc::lchown(c(p).as_ptr(), uid, gid) };
    check(r, "lchown", p);
}

/// `chmod` (full permission bits).
pub(crate) fn chmod(p: &Path, mode: u32) {
    // SAFETY: valid string.
    let r = unsafe { libc::chmod(c(p).as_ptr(), mode) };
    check(r, "chmod", p);
}

/// `mknod`.
pub(crate) fn mknod(p: &Path, mode: u32, rdev: u64) {
    // SAFETY: valid string.
    let r = unsafe { libc::mknod(c(p).as_ptr(), mode, rdev) };
    check(r, "mknod", p);
}

/// Sets a path's mtime (not followed).
pub(crate) fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid string and a two-element array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r, "utimensat", p);
}

/// Punches a hole in a file.
pub(crate) fn punch(p: &Path, off: u64, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    use std::os::fd::AsFd;
    super::sys::punch_hole(f.as_fd(), off, len).unwrap();
}

/// Bytes allocated to a file.
pub(crate) fn allocated(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().blocks() * 512
}

/// A scratch directory on tmpfs.
pub(crate) fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("phaul-fsync-")
        .tempdir_in("/dev/shm")
        .expect("tempdir in /dev/shm")
}

/// A receiver serving in a thread, and the sender's end of the socket.
pub(crate) struct Pair {
    pub(crate) conn: UnixStream,
    recv: Option<JoinHandle<Result<Vec<PassStats>, FsyncError>>>,
}

impl Pair {
    /// Starts a receiver on `roots`.
    pub(crate) fn start(roots: Vec<PathBuf>) -> Pair {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let recv = std::thread::spawn(move || Receiver::new(roots)?.serve(&mut b));
        Pair {
            conn: a,
            recv: Some(recv),
        }
    }

    /// One pass.
    pub(crate) fn pass(
        &mut self,
        s: &mut Sender,
        final_pass: bool,
    ) -> Result<PassStats, FsyncError> {
        s.pass(&mut self.conn, final_pass)
    }

    /// Finishes and returns the receiver's stats.
    pub(crate) fn finish(mut self, s: &mut Sender) -> Vec<PassStats> {
        s.finish(&mut self.conn).expect("finish");
        self.join().expect("receiver")
    }

    /// The receiver's result.
    pub(crate) fn join(&mut self) -> Result<Vec<PassStats>, FsyncError> {
        self.recv
            .take()
            .expect("joined once")
            .join()
            .expect("receiver thread panicked")
    }
}

/// A small deterministic PRNG (xorshift64*).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
