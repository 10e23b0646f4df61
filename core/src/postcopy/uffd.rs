//! The userfaultfd interface the destination's pager uses (x86_64 and
//! aarch64 share these numbers): the ioctls that resolve a fault and the
//! messages a userfaultfd reports. Debian 12's libc crate has none of it.

use std::os::fd::RawFd;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}

const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);

/// A page fault in a registered range.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// The task forked: a new userfaultfd for the child.
pub const EVENT_FORK: u8 = 0x13;
/// `mremap` moved a range.
pub const EVENT_REMAP: u8 = 0x14;
/// `madvise(MADV_DONTNEED/REMOVE)` dropped a range.
pub const EVENT_REMOVE: u8 = 0x15;
/// `munmap` removed a range.
pub const EVENT_UNMAP: u8 = 0x16;

/// The page size the pager works in.
pub const PAGE: u64 = 4096;

/// One `struct uffd_msg`.
#[derive(Debug, Clone, Copy)]
pub struct Msg {
    /// `EVENT_*`.
    pub event: u8,
    /// The three 64-bit words of the event's argument union.
    pub arg: [u64; 3],
}

impl Msg {
    /// The faulting address (`EVENT_PAGEFAULT`).
    pub fn fault_address(&self) -> u64 {
        self.arg[1]
    }
    /// The child's new userfaultfd (`EVENT_FORK`).
    pub fn fork_fd(&self) -> RawFd {
        (self.arg[0] & 0xffff_ffff) as u32 as i32
    }
}

/// Reads one message; `Ok(None)` when none is pending.
pub fn read_msg(fd: RawFd) -> std::io::Result<Option<Msg>> {
    let mut buf = [0u8; 32];
    // SAFETY: a 32-byte buffer for one uffd_msg.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    if n != 32 {
        return Ok(None);
    }
    let w = |i: usize| u64::from_ne_bytes(buf[8 + i * 8..16 + i * 8].try_into().expect("8"));
    Ok(Some(Msg {
        event: buf[0],
        arg: [w(0), w(1), w(2)],
    }))
}

/// The outcome of resolving part of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every byte was placed.
    Done,
    /// `n` bytes were placed, then the next page already existed.
    Exists(u64),
    /// The range is no longer registered (unmapped or remapped away).
    Gone,
    /// The process has exited.
    Exited,
    /// The address space is changing; read the pending events, then retry.
    Again(u64),
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn outcome(ret: i32, done: i64, len: u64) -> std::io::Result<Fill> {
    if ret == 0 {
        return Ok(Fill::Done);
    }
    let placed = if done > 0 { done as u64 } else { 0 };
    match errno() {
        libc::EEXIST => Ok(Fill::Exists(placed)),
        libc::ENOENT | libc::EINVAL if placed == 0 => Ok(Fill::Gone),
        libc::ESRCH | libc::ENOSPC => Ok(Fill::Exited),
        libc::EAGAIN => Ok(Fill::Again(placed.min(len))),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// `UFFDIO_COPY`: places `data` at `dst` and wakes the faulting threads.
pub fn copy(fd: RawFd, dst: u64, data: &[u8]) -> std::io::Result<Fill> {
    #[repr(C)]
    struct UffdioCopy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    let mut c = UffdioCopy {
        dst,
        src: data.as_ptr() as u64,
        len: data.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: a valid uffdio_copy; `src` points at `len` readable bytes.
    let r = unsafe { libc::ioctl(fd, UFFDIO_COPY as _, &mut c) };
    outcome(r, c.copy, c.len)
}

/// `UFFDIO_ZEROPAGE` for one page at `dst` (the source had no page there).
pub fn zero(fd: RawFd, dst: u64) -> std::io::Result<Fill> {
    #[repr(C)]
    struct UffdioZero {
        start: u64,
        len: u64,
        mode: u64,
        zeropage: i64,
    }
    let mut z = UffdioZero {
        start: dst,
        len: PAGE,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: a valid uffdio_zeropage.
    let r = unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE as _, &mut z) };
    outcome(r, z.zeropage, PAGE)
}

/// `UFFDIO_WAKE` for one page: a thread that faulted on a page another
/// request already filled.
pub fn wake(fd: RawFd, dst: u64) {
    let range = [dst, PAGE];
    // SAFETY: a valid uffdio_range.
    unsafe { libc::ioctl(fd, UFFDIO_WAKE as _, range.as_ptr()) };
}
