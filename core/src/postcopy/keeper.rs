//! The userfaultfd keeper: a small process, forked from the destination's
//! phaul at the switch, that holds a reference to every userfaultfd of the
//! restored workload until every page has arrived.
//!
//! Why: when the last reference to a userfaultfd closes, the kernel drops
//! the registration and every page not yet placed faults in as a zero
//! page — the workload would run on with silently wrong memory. With the
//! keeper, a dying phaul leaves the faulting threads blocked instead (the
//! workload waits, its memory intact), and whoever resumes the transfer
//! takes the descriptors back with `pidfd_getfd`. The keeper ignores the
//! terminal's signals, has its own session and no other descriptor, and
//! exits only when told the transfer is complete (or when killed by the
//! operator, which `phaul recover` does only after deciding).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A running keeper.
#[derive(Debug)]
pub struct Keeper {
    pid: i32,
    ctl: OwnedFd,
}

/// The message that ends the keeper.
const RELEASE: u8 = b'R';
/// The message that carries one more descriptor.
const ADD: u8 = b'F';

impl Keeper {
    /// Forks a keeper holding `fds` (same numbers in the keeper).
    pub fn spawn(fds: &[RawFd]) -> std::io::Result<Keeper> {
        let mut sv = [0i32; 2];
        // SAFETY: a two-int array for socketpair.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: socketpair returned two fresh descriptors.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let mut keep: Vec<u32> = fds.iter().map(|&f| f as u32).collect();
        keep.push(theirs.as_raw_fd() as u32);
        keep.sort_unstable();
        keep.dedup();
        let ctl = theirs.as_raw_fd();
        let name = c"phaul-uffd-keep";
        // SAFETY: fork; the child only makes async-signal-safe system
        // calls on memory prepared before the fork, then never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; every call is a plain system call.
            unsafe { keeper_main(&keep, ctl, name.as_ptr()) }
        }
        drop(theirs);
        Ok(Keeper { pid, ctl: ours })
    }

    /// The keeper's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Hands the keeper one more descriptor (a forked task's userfaultfd).
    pub fn add(&self, fd: RawFd) -> std::io::Result<()> {
        let byte = [ADD];
        let iov = [std::io::IoSlice::new(&byte)];
        let fds = [fd];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(
            self.ctl.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }

    /// Every page has arrived: the keeper lets go and exits.
    pub fn release(self) {
        // SAFETY: one byte from a valid buffer.
        unsafe { libc::send(self.ctl.as_raw_fd(), [RELEASE].as_ptr().cast(), 1, 0) };
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }

    /// Leaves the keeper holding the descriptors (the transfer broke): it
    /// outlives this process; only an operator's decision ends it.
    pub fn abandon(self) {
        std::mem::forget(self.ctl);
    }
}

/// The keeper process. Never returns.
///
/// # Safety
/// Runs in a freshly forked child of a multi-threaded process: only
/// system calls, on memory that was prepared before the fork.
unsafe fn keeper_main(keep: &[u32], ctl: RawFd, name: *const libc::c_char) -> ! {
    // SAFETY: see the function's contract.
    unsafe {
        libc::setsid();
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
            libc::SIGQUIT,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, name as libc::c_ulong, 0, 0, 0);
        // Close every descriptor but the kept ones.
        let mut from = 0u32;
        for &k in keep {
            if k > from {
                libc::syscall(libc::SYS_close_range, from, k - 1, 0);
            }
            from = k + 1;
        }
        libc::syscall(libc::SYS_close_range, from, u32::MAX, 0);
        let mut byte = [0u8; 1];
        let mut cbuf = [0u64; 8];
        loop {
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
            let n = libc::recvmsg(ctl, &mut msg, 0);
            if n == 1 && byte[0] == RELEASE {
                libc::_exit(0);
            }
            if n == 1 {
                // A descriptor arrived: it is now in this process's table.
                continue;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // phaul is gone: hold everything until an operator decides.
            loop {
                libc::pause();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds_of(pid: i32) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_keeper_holds_exactly_what_it_was_given_and_exits_on_release() {
        let a = std::fs::File::open("/proc/self/status").unwrap();
        let extra = std::fs::File::open("/proc/self/stat").unwrap();
        let k = Keeper::spawn(&[a.as_raw_fd()]).unwrap();
        let b = std::fs::File::open("/proc/self/cmdline").unwrap();
        k.add(b.as_raw_fd()).unwrap();
        let pid = k.pid();
        let mut held = Vec::new();
        for _ in 0..200 {
            held = fds_of(pid);
            if held.iter().any(|f| f.ends_with("/cmdline")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(held.iter().any(|f| f.ends_with("/status")), "{held:?}");
        assert!(held.iter().any(|f| f.ends_with("/cmdline")), "{held:?}");
        assert!(!held.iter().any(|f| f.ends_with("/stat")), "{held:?}");
        // Its control socket and the two descriptors: nothing else.
        assert_eq!(held.len(), 3, "{held:?}");
        drop(extra);
        k.release();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
