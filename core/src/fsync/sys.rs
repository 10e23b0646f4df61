//! Thin, safe wrappers over the Linux calls fs sync needs: the `*at`
//! family on directory descriptors, `openat2` confinement, extended
//! attributes, data/hole discovery, hole punching and in-kernel copies.
//! Every function returns `io::Result` and never follows a final symlink
//! unless its name says so.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `-1` → the last OS error.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Retries a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A C string from bytes (an error for an embedded NUL).
pub(crate) fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a name"))
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: a fresh descriptor returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    retry(|| {
        // SAFETY: valid descriptor and NUL-terminated name.
        owned(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })
    })
}

/// `open(path, flags | O_CLOEXEC)`.
pub(crate) fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: NUL-terminated path.
    retry(|| owned(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) }))
}

/// The kernel's `struct open_how` (openat2(2)).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens directory `path` (relative, several components) below `dir`
/// without ever leaving `dir` and without following any symlink or magic
/// link on the way: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS)`. ELOOP means a component is a symlink, EXDEV
/// that the path would leave `dir`.
pub(crate) fn open_dir_beneath(dir: BorrowedFd<'_>, path: &CStr) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    retry(|| {
        // SAFETY: valid descriptor, NUL-terminated path, `how` is a
        // properly laid out open_how of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        owned(r as libc::c_int)
    })
}

/// `fstat`.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor and out-pointer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, name and out-pointer.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `mkdirat`.
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid descriptor and name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mknodat`.
pub(crate) fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid descriptor and name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

/// `symlinkat(target, dir, name)`.
pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptor and strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat(odir, oname, ndir, nname, 0)` (a symlink is linked, not followed).
pub(crate) fn linkat(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
) -> io::Result<()> {
    // SAFETY: valid descriptors and names.
    cvt(unsafe {
        libc::linkat(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `renameat` (replaces the final name itself, never follows it).
pub(crate) fn renameat(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
) -> io::Result<()> {
    // SAFETY: valid descriptors and names.
    cvt(unsafe {
        libc::renameat(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
        )
    })
    .map(drop)
}

/// `unlinkat` (flags 0 or `AT_REMOVEDIR`).
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid descriptor and name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn lchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and name.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fchown`.
pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// `fchmod`.
pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

/// `fchmodat(dir, name, mode, 0)`: follows a final symlink, so only for
/// names the caller checked (or created) are not symlinks.
pub(crate) fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and name.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) })
        .map(drop)
}

fn mtime_times(sec: i64, nsec: u32) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as libc::c_long,
        },
    ]
}

/// Sets the mtime of an open file (atime untouched).
pub(crate) fn set_mtime_fd(fd: BorrowedFd<'_>, sec: i64, nsec: u32) -> io::Result<()> {
    let t = mtime_times(sec, nsec);
    // SAFETY: valid descriptor and a two-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(drop)
}

/// Sets the mtime of `name` in `dir` without following it (atime untouched).
pub(crate) fn set_mtime_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    sec: i64,
    nsec: u32,
) -> io::Result<()> {
    let t = mtime_times(sec, nsec);
    // SAFETY: valid descriptor, name and a two-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `ftruncate`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: valid descriptor.
    retry(|| cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop))
}

/// Writes all of `buf` at `off`.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: valid descriptor; pointer and length from a live slice.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwrite wrote nothing",
            ));
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

/// Fills `buf` from `off`; past the end of the file (the file shrank
/// under us) the rest is zeros. Returns how many bytes came from the file.
pub(crate) fn pread_fill(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: valid descriptor; pointer and length from a live slice.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// The data regions `[start, end)` of a file of `size` bytes, in order
/// (SEEK_DATA / SEEK_HOLE); the whole file if the filesystem cannot tell.
pub(crate) fn data_regions(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        // SAFETY: valid descriptor.
        let d = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() => {
                    Ok(vec![(0, size)])
                }
                _ => Err(e),
            };
        }
        let d = d as u64;
        if d >= size {
            break;
        }
        // SAFETY: valid descriptor.
        let h = unsafe { libc::lseek(fd.as_raw_fd(), d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let h = (h as u64).min(size);
        if h <= d {
            break;
        }
        out.push((d, h));
        off = h;
    }
    Ok(out)
}

/// Makes `[off, off + len)` a hole, keeping the size.
pub(crate) fn punch_hole(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid descriptor.
    retry(|| {
        cvt(unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        })
        .map(drop)
    })
}

/// Copies `[off, off + len)` of `src` to the same offsets of `dst`, in the
/// kernel when it can (`copy_file_range`), else through a buffer.
pub(crate) fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    off: u64,
    len: u64,
) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut oi = (off + done) as libc::loff_t;
        let mut oo = oi;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: valid descriptors and offset pointers.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut oi, dst.as_raw_fd(), &mut oo, want, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV)
                | Some(libc::EINVAL)
                | Some(libc::ENOSYS)
                | Some(libc::EOPNOTSUPP) => {
                    return copy_by_buffer(src, dst, off + done, len - done)
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            // The source shrank: the rest stays a hole.
            break;
        }
        done += n as u64;
    }
    Ok(())
}

fn copy_by_buffer(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let got = pread_fill(src, &mut buf[..n], off + done)?;
        if got == 0 {
            break;
        }
        pwrite_all(dst, &buf[..got], off + done)?;
        done += got as u64;
    }
    Ok(())
}

/// Where extended attributes are read or written.
#[derive(Clone, Copy)]
pub(crate) enum XTarget<'a> {
    /// An open file or directory (`f*xattr`).
    Fd(BorrowedFd<'a>),
    /// A path whose final component is not followed (`l*xattr`).
    Path(&'a CStr),
}

/// The path `/proc/self/fd/<dir>/<name>`: `l*xattr` on it reaches `name`
/// inside the directory `dir` without following `name`.
pub(crate) fn proc_path(dir: RawFd, name: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name.to_bytes());
    // The name has no NUL (it came from a CStr).
    CString::new(p).unwrap_or_default()
}

fn xattr_call(mut f: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    let mut cap = 256usize;
    loop {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        cap = cap.max(n as usize);
        let mut buf = vec![0u8; cap];
        let n = f(buf.as_mut_ptr(), buf.len());
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                // It grew between the two calls.
                cap *= 2;
                continue;
            }
            return Err(e);
        }
        buf.truncate(n as usize);
        return Ok(buf);
    }
}

/// The names of every extended attribute (none where unsupported).
pub(crate) fn list_xattrs(t: XTarget<'_>) -> io::Result<Vec<Vec<u8>>> {
    let r = xattr_call(|p, n| match t {
        // SAFETY: valid descriptor/path; buffer pointer and size (null/0 asks the size).
        XTarget::Fd(fd) => unsafe { libc::flistxattr(fd.as_raw_fd(), p.cast(), n) },
        // SAFETY: as above.
        XTarget::Path(path) => unsafe { libc::llistxattr(path.as_ptr(), p.cast(), n) },
    });
    match r {
        Ok(buf) => Ok(buf
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| s.to_vec())
            .collect()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// One extended attribute's value.
pub(crate) fn get_xattr(t: XTarget<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    xattr_call(|p, n| match t {
        // SAFETY: valid descriptor/path and name; buffer pointer and size.
        XTarget::Fd(fd) => unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), p.cast(), n) },
        // SAFETY: as above.
        XTarget::Path(path) => unsafe {
            libc::lgetxattr(path.as_ptr(), name.as_ptr(), p.cast(), n)
        },
    })
}

/// Sets one extended attribute.
pub(crate) fn set_xattr(t: XTarget<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: valid descriptor/path and name; value pointer and length from a slice.
    let r = match t {
        XTarget::Fd(fd) => unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        },
        // SAFETY: as above.
        XTarget::Path(path) => unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        },
    };
    cvt(r).map(drop)
}

/// Removes one extended attribute.
pub(crate) fn remove_xattr(t: XTarget<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptor/path and name.
    let r = match t {
        XTarget::Fd(fd) => unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) },
        // SAFETY: as above.
        XTarget::Path(path) => unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) },
    };
    cvt(r).map(drop)
}

/// 16 random hex digits (for temporary names).
pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 8];
    // SAFETY: valid buffer pointer and length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    let mut v = u64::from_le_bytes(b);
    if n != b.len() as isize {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        v ^= t ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    }
    format!("{v:016x}")
}

/// `readlinkat`: a symlink's target, as is.
pub(crate) fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut cap = 256usize;
    loop {
        let mut buf = vec![0u8; cap];
        // SAFETY: valid descriptor, name, and buffer pointer and length.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < cap {
            buf.truncate(n);
            return Ok(buf);
        }
        cap *= 2;
    }
}
