//! A `criu swrk` worker: one CRIU process serving RPC requests over a
//! SOCK_SEQPACKET socketpair, one protobuf message per packet.
//!
//! Workers are started early (before anything is frozen) so that CRIU's
//! process start-up stays out of the migration's downtime. Simple requests
//! (VERSION, FEATURE_CHECK, CPUINFO_*, PAGE_SERVER_CHLD) keep the worker
//! open; DUMP and RESTORE must be a worker's last request (CRIU refuses
//! `keep_open` for them) and report progress as notifications
//! ([`Event::Notify`]) that the caller answers with
//! [`Worker::answer_notify`] — or deliberately does not answer yet, which
//! is how the engine holds a frozen tree at `post-dump`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use prost::Message;

use super::rpc::{Features, Opts, Req, ReqType, Resp};
use super::{CriuError, CriuVersion, MIN_VERSION};

/// What a running DUMP/RESTORE/PRE_DUMP request reports next.
#[derive(Debug)]
pub enum Event {
    /// CRIU reached an action-script point (`network-lock`, `post-dump`,
    /// `post-restore`, ...) and waits for [`Worker::answer_notify`].
    Notify {
        /// The script name.
        script: String,
        /// The pid CRIU attached (root task for some scripts).
        pid: Option<i32>,
    },
    /// The request finished; `success` says how.
    Done(Resp),
}

/// One `criu swrk` process.
pub struct Worker {
    name: String,
    child: Child,
    sock: OwnedFd,
    work_dir: PathBuf,
    work_fd: OwnedFd,
    deadline: Option<Instant>,
    /// Readable once the worker exited.
    pidfd: Option<OwnedFd>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

fn req_name(t: ReqType) -> &'static str {
    match t {
        ReqType::Dump => "dump",
        ReqType::Restore => "restore",
        ReqType::PreDump => "pre-dump",
        ReqType::PageServer | ReqType::PageServerChld => "page-server",
        ReqType::CpuinfoDump => "cpuinfo dump",
        ReqType::CpuinfoCheck => "cpuinfo check",
        ReqType::FeatureCheck => "feature check",
        ReqType::Version => "version",
        ReqType::WaitPid => "wait-pid",
        ReqType::Notify => "notify",
        ReqType::Check => "check",
        ReqType::SinglePreDump => "single pre-dump",
        ReqType::Empty => "request",
    }
}

/// CRIU's log level: `$PHAUL_CRIU_LOG_LEVEL` (0-4), default 2 (errors and
/// warnings; 4 is CRIU's full debug log, which slows dumps down).
fn log_level() -> i32 {
    std::env::var("PHAUL_CRIU_LOG_LEVEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|l| (0..=4).contains(l))
        .unwrap_or(2)
}

// What phaul makes of CRIU's answers, apart from the socket: pure
// functions of the bytes CRIU sent, so that a confused or hostile worker
// (or a CRIU of another version) can only cause an error, never a panic.
// The fuzz target `criu_rpc` runs them on arbitrary packets.

/// Decodes one packet from the worker's socket.
pub(crate) fn decode_resp(packet: &[u8], during: &str) -> Result<Resp, CriuError> {
    Resp::decode(packet).map_err(|e| CriuError::Protocol {
        during: during.to_string(),
        detail: e.to_string(),
    })
}

/// Checks that an answer is of the type of the request `sent` (a raw
/// [`ReqType`]); CRIU answers PAGE_SERVER_CHLD with the PAGE_SERVER type.
pub(crate) fn check_answer_type(sent: i32, resp: &Resp) -> Result<(), CriuError> {
    let t = ReqType::try_from(sent).unwrap_or(ReqType::Empty);
    let same = resp.r#type == sent
        || (t == ReqType::PageServerChld && resp.r#type == ReqType::PageServer as i32);
    if same {
        Ok(())
    } else {
        let during = req_name(t);
        Err(CriuError::Protocol {
            during: during.to_string(),
            detail: format!("answer of type {} to a {during} request", resp.r#type),
        })
    }
}

/// A started request's next answer: a notification or its final answer.
pub(crate) fn event(resp: Resp) -> Event {
    if resp.r#type == ReqType::Notify as i32 {
        let n = resp.notify.unwrap_or_default();
        return Event::Notify {
            script: n.script.unwrap_or_default(),
            pid: n.pid,
        };
    }
    Event::Done(resp)
}

/// The version in an answer to VERSION; an error if it is missing or
/// older than [`MIN_VERSION`].
pub(crate) fn version_of(resp: &Resp) -> Result<CriuVersion, CriuError> {
    let v = resp.version.as_ref().ok_or_else(|| CriuError::Protocol {
        during: "version".into(),
        detail: "no version in the answer".into(),
    })?;
    let found = CriuVersion {
        major: v.major_number.max(0) as u32,
        minor: v.minor_number.max(0) as u32,
        sublevel: v.sublevel.unwrap_or(0).max(0) as u32,
    };
    if found < MIN_VERSION {
        return Err(CriuError::TooOld { found });
    }
    Ok(found)
}

/// The page server's pid in an answer to PAGE_SERVER_CHLD.
pub(crate) fn page_server_pid(resp: &Resp) -> Result<i32, CriuError> {
    resp.ps
        .as_ref()
        .and_then(|p| p.pid)
        .ok_or_else(|| CriuError::Protocol {
            during: "page-server".into(),
            detail: "no page server pid in the answer".into(),
        })
}

/// The line of a failed answer's `cr_errmsg` that says what failed (used
/// when the request's log cannot be read).
pub(crate) fn errmsg_line(resp: &Resp) -> Option<String> {
    resp.cr_errmsg.as_deref().and_then(|m| {
        super::diagnose::failing_line(m).or_else(|| {
            (!m.contains("RLIMIT_NOFILE") && !m.trim().is_empty()).then(|| m.trim().to_string())
        })
    })
}

impl Worker {
    /// Starts `criu swrk`. `inherit` are descriptors the worker must see
    /// under the same numbers (page-server sockets named in `ps.fd`).
    /// CRIU's own stderr goes to `<work_dir>/criu-<name>.stderr`; its logs
    /// are written into `work_dir` under the names requests give.
    pub fn spawn(
        binary: &Path,
        name: &str,
        work_dir: &Path,
        inherit: &[RawFd],
    ) -> Result<Self, CriuError> {
        let spawn_err = |source| CriuError::Spawn {
            binary: binary.display().to_string(),
            source,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| spawn_err(io::Error::from(e)))?;
        let stderr = std::fs::File::create(work_dir.join(format!("criu-{name}.stderr")))
            .map_err(spawn_err)?;
        let mut keep: Vec<RawFd> = inherit.to_vec();
        keep.push(theirs.as_raw_fd());
        let mut cmd = Command::new(binary);
        cmd.arg("swrk")
            .arg(theirs.as_raw_fd().to_string())
            .current_dir(work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: only async-signal-safe fcntl calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let work_fd: OwnedFd = std::fs::File::open(work_dir).map_err(spawn_err)?.into();
        let child = cmd.spawn().map_err(spawn_err)?;
        drop(theirs);
        // SAFETY: plain syscall; the result is a new descriptor we own.
        let pidfd = match unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) } {
            fd if fd >= 0 => {
                Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
            }
            _ => None,
        };
        tracing::debug!(worker = name, pid = child.id(), "started criu swrk");
        Ok(Self {
            name: name.to_string(),
            child,
            sock: ours,
            work_dir: work_dir.to_path_buf(),
            work_fd,
            deadline: None,
            pidfd,
        })
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The RPC socket, for polling.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn send(&self, req: &Req, during: &str) -> Result<(), CriuError> {
        let buf = req.encode_to_vec();
        send(self.sock.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL).map_err(|e| CriuError::Io {
            during: during.to_string(),
            source: e.into(),
        })?;
        Ok(())
    }

    fn recv(&self, during: &str) -> Result<Resp, CriuError> {
        // Wait for an answer, for the deadline, or for CRIU to exit: its
        // socket does not close when it dies while restoring (the copies it
        // forked hold it until they become the workload), so its death is
        // watched through a pidfd.
        let timeout = self.deadline.map_or(-1, |d| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32
        });
        let mut p = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.pidfd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds (a negative fd is ignored).
            let n = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout) };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n == 0 {
                return Err(CriuError::Timeout {
                    during: during.to_string(),
                });
            }
            break;
        }
        if p[0].revents == 0 && p[1].revents != 0 {
            return Err(CriuError::Io {
                during: during.to_string(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "CRIU exited"),
            });
        }
        let mut buf = vec![0u8; 1 << 16];
        let n = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC).map_err(|e| {
            CriuError::Io {
                during: during.to_string(),
                source: e.into(),
            }
        })?;
        if n == 0 {
            return Err(CriuError::Io {
                during: during.to_string(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "CRIU exited"),
            });
        }
        if n > buf.len() {
            return Err(CriuError::Protocol {
                during: during.to_string(),
                detail: format!("message of {n} bytes exceeds the 64 KiB limit"),
            });
        }
        decode_resp(&buf[..n], during)
    }

    fn failure(&self, t: ReqType, resp: &Resp, log: Option<&str>) -> CriuError {
        let log_path = log.map(|l| self.work_dir.join(l));
        CriuError::Failed {
            request: req_name(t),
            errno: resp.cr_errno.filter(|e| *e != 0),
            // CRIU's own errmsg is the first error it logged — here, the
            // harmless RLIMIT complaint; the log says what failed.
            line: log_path
                .as_deref()
                .and_then(super::diagnose::failing_line_in)
                .or_else(|| errmsg_line(resp)),
            log: log_path,
        }
    }

    /// Sends a request that completes with one response and checks it.
    pub fn call(
        &mut self,
        t: ReqType,
        opts: Option<Opts>,
        keep_open: bool,
    ) -> Result<Resp, CriuError> {
        self.call_with(
            Req {
                r#type: t as i32,
                opts,
                keep_open: Some(keep_open),
                ..Default::default()
            },
            None,
        )
    }

    fn call_with(&mut self, req: Req, log: Option<&str>) -> Result<Resp, CriuError> {
        let t = ReqType::try_from(req.r#type).unwrap_or(ReqType::Empty);
        let during = req_name(t);
        self.send(&req, during)?;
        let resp = self.recv(during)?;
        check_answer_type(req.r#type, &resp)?;
        if !resp.success {
            return Err(self.failure(t, &resp, log));
        }
        Ok(resp)
    }

    /// Starts a long request (DUMP, PRE_DUMP, RESTORE): follow it with
    /// [`Worker::next_event`] until [`Event::Done`].
    pub fn start(&mut self, t: ReqType, opts: Opts) -> Result<(), CriuError> {
        self.send(
            &Req {
                r#type: t as i32,
                opts: Some(opts),
                ..Default::default()
            },
            req_name(t),
        )
    }

    /// The next notification or the final answer of a started request.
    pub fn next_event(&mut self, t: ReqType) -> Result<Event, CriuError> {
        Ok(event(self.recv(req_name(t))?))
    }

    /// Turns a failed final answer into an error quoting CRIU's log.
    pub fn check_done(&self, t: ReqType, resp: &Resp, log: &str) -> Result<(), CriuError> {
        if resp.success {
            Ok(())
        } else {
            Err(self.failure(t, resp, Some(log)))
        }
    }

    /// Answers the pending notification: `false` makes CRIU abort the
    /// request (a dump then resumes the tree, a restore kills its tree).
    pub fn answer_notify(&mut self, success: bool) -> Result<(), CriuError> {
        self.send(
            &Req {
                r#type: ReqType::Notify as i32,
                notify_success: Some(success),
                ..Default::default()
            },
            "notify answer",
        )
    }

    /// CRIU's version; an error if it is older than [`MIN_VERSION`].
    pub fn version(&mut self) -> Result<CriuVersion, CriuError> {
        let resp = self.call(ReqType::Version, None, true)?;
        version_of(&resp)
    }

    /// Whether the kernel can track dirty memory (needed for pre-dumps).
    pub fn mem_track(&mut self) -> Result<bool, CriuError> {
        self.feature(Features {
            mem_track: Some(true),
            ..Default::default()
        })
        .map(|f| f.mem_track.unwrap_or(false))
    }

    /// Asks CRIU about the features set to `true` in `query`.
    pub fn feature(&mut self, query: Features) -> Result<Features, CriuError> {
        let resp = self.call_with(
            Req {
                r#type: ReqType::FeatureCheck as i32,
                features: Some(query),
                keep_open: Some(true),
                ..Default::default()
            },
            None,
        )?;
        Ok(resp.features.unwrap_or_default())
    }

    /// Writes `cpuinfo.img` describing this CPU into `dir`.
    pub fn cpuinfo_dump(&mut self, dir: &Path) -> Result<(), CriuError> {
        self.call_with(
            Req {
                r#type: ReqType::CpuinfoDump as i32,
                opts: Some(self.opts(dir, "cpuinfo-dump.log")),
                keep_open: Some(true),
                ..Default::default()
            },
            Some("cpuinfo-dump.log"),
        )
        .map(drop)
    }

    /// Checks that a process described by `dir/cpuinfo.img` can run on this
    /// CPU.
    pub fn cpuinfo_check(&mut self, dir: &Path) -> Result<(), CriuError> {
        self.call_with(
            Req {
                r#type: ReqType::CpuinfoCheck as i32,
                opts: Some(self.opts(dir, "cpuinfo-check.log")),
                keep_open: Some(true),
                ..Default::default()
            },
            Some("cpuinfo-check.log"),
        )
        .map(drop)
    }

    /// Starts a page server (a child of the worker) that reads one dump's
    /// pages from the inherited socket `ps_fd` into `images_dir`; returns
    /// its pid. It exits when the dumping CRIU closes the session.
    pub fn page_server(
        &mut self,
        images_dir: &Path,
        ps_fd: RawFd,
        log: &str,
    ) -> Result<i32, CriuError> {
        let mut opts = self.opts(images_dir, log);
        opts.ps = Some(super::rpc::PageServerInfo {
            fd: Some(ps_fd),
            ..Default::default()
        });
        let resp = self.call_with(
            Req {
                r#type: ReqType::PageServerChld as i32,
                opts: Some(opts),
                keep_open: Some(true),
                ..Default::default()
            },
            Some(log),
        )?;
        page_server_pid(&resp)
    }

    /// Options naming an images directory; CRIU's working directory (logs,
    /// statistics) is this worker's work directory.
    pub fn opts(&self, images_dir: &Path, log: &str) -> Opts {
        Opts {
            images_dir_fd: -1,
            images_dir: Some(images_dir.display().to_string()),
            work_dir_fd: Some(self.work_fd.as_raw_fd()),
            log_file: Some(log.to_string()),
            log_level: Some(log_level()),
            ..Default::default()
        }
    }

    /// Bounds every later wait for an answer (`None`: no bound).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// This worker's work directory (CRIU logs and statistics).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Whether the worker process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)) | Err(_))
    }

    /// Waits up to `timeout` for the worker to exit after its last request.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) if Instant::now() >= end => return false,
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

impl Drop for Worker {
    /// Closing the socket makes CRIU abandon whatever it was doing the way
    /// it does on a failed request (a dump resumes its tree, a restore kills
    /// its tree). The process is killed only if it does not exit promptly.
    fn drop(&mut self) {
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if !self.wait_exit(Duration::from_secs(10)) {
            tracing::warn!(worker = %self.name, "CRIU worker did not exit; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
