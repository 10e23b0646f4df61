//! The destination's page servers: one per memory pass, each a child of a
//! CRIU worker started before anything froze, reading one dump's pages from
//! the memory socket into that pass's image directory.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::criu::Criu;

/// Page servers for successive passes, sharing one CRIU worker and one
/// page-server socket (inherited by the worker as `ps_fd`).
pub struct PageServers {
    worker: Box<dyn Criu>,
    ps_fd: RawFd,
    images_root: PathBuf,
    last: u32,
    running: Option<(i32, OwnedFd)>,
}

impl std::fmt::Debug for PageServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServers")
            .field("last", &self.last)
            .finish()
    }
}

fn wait_pidfd(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

impl PageServers {
    /// Page servers writing under `images_root/<pass>`.
    pub fn new(worker: Box<dyn Criu>, ps_fd: RawFd, images_root: PathBuf) -> Self {
        Self {
            worker,
            ps_fd,
            images_root,
            last: 0,
            running: None,
        }
    }

    /// The worker (for checks before the first pass).
    pub fn worker(&mut self) -> &mut dyn Criu {
        &mut *self.worker
    }

    /// The directory of pass `iter`.
    pub fn dir(&self, iter: u32) -> PathBuf {
        self.images_root.join(iter.to_string())
    }

    /// The last pass started (0 before the first).
    pub fn last(&self) -> u32 {
        self.last
    }

    /// Starts the page server for pass `iter` (after the previous one
    /// finished); `parent` links the pass to the one it builds on. A lazy
    /// pass (post-copy) sends no pages now: only its directory is made.
    pub fn start(&mut self, iter: u32, parent: Option<u32>, lazy: bool) -> Result<(), String> {
        self.wait(Duration::from_secs(60))?;
        if iter != self.last + 1 || parent.is_some_and(|p| p != self.last) {
            return Err(format!("pass {iter} cannot follow pass {}", self.last));
        }
        let dir = self.dir(iter);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(p) = parent {
            std::os::unix::fs::symlink(format!("../{p}"), dir.join("parent"))
                .map_err(|e| e.to_string())?;
        }
        if lazy {
            self.last = iter;
            return Ok(());
        }
        let pid = self
            .worker
            .page_server(&dir, self.ps_fd, &format!("page-server-{iter}.log"))
            .map_err(|e| e.to_string())?;
        let fd = crate::proc::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        self.running = Some((pid, fd));
        self.last = iter;
        tracing::debug!(iter, page_server = pid, "page server started");
        Ok(())
    }

    /// Waits for the running page server (if any) to finish its pass.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        if let Some((pid, fd)) = self.running.take() {
            if !wait_pidfd(&fd, timeout) {
                kill(pid);
                return Err(format!(
                    "the page server (pid {pid}) did not finish receiving memory"
                ));
            }
        }
        Ok(())
    }

    /// Kills a running page server (rollback).
    pub fn kill(&mut self) {
        if let Some((pid, _)) = self.running.take() {
            kill(pid);
        }
    }
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

impl Drop for PageServers {
    fn drop(&mut self) {
        self.kill();
    }
}
