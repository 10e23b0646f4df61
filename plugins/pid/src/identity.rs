//! Restart mode: who a process is — its user and group ids, supplementary
//! groups, umask, resource limits and cgroups — recorded on the source from
//! /proc and applied on the destination to the restarted process, in the
//! child between fork and exec.
//!
//! Ids are numbers, as the kernel (and the synced files' ownership) knows
//! them: a uid needs no passwd entry on the destination, and none is looked
//! up. The saved set-user/group-ids are recorded and set, but `execve` makes
//! them equal to the effective ids again, as it did when the original was
//! started.
//!
//! Cgroups are named by hierarchy (its controllers, `name=...` for a named
//! v1 hierarchy, empty for v2) and path, as `/proc/PID/cgroup` lists them:
//! v1 with several hierarchies, v2, or both (hybrid). The destination joins
//! the same path in the hierarchy mounted with the same controllers,
//! creating the missing directories (a new v1 cpuset cgroup gets its
//! parent's `cpuset.cpus` and `cpuset.mems`, without which nothing could
//! join it); a hierarchy it does not mount, or a cgroup it cannot join,
//! fails the start.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use phaul_plugin_api::mountinfo::unescape;
use serde::{Deserialize, Serialize};

/// Why an identity could not be recorded or prepared.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A /proc file could not be read.
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Read {
        /// The process.
        pid: i32,
        /// The file.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A /proc file did not say what it should.
    #[error("/proc/{pid}/{what} has no usable {field} line")]
    Parse {
        /// The process.
        pid: i32,
        /// The file.
        what: &'static str,
        /// The missing or malformed field.
        field: &'static str,
    },
    /// A recorded limit this host does not know.
    #[error("unknown resource limit `{0}` (this driver knows: {names})", names = names())]
    UnknownLimit(String),
    /// A cgroup cannot be joined on this host.
    #[error("cannot join cgroup {cgroup}: {why}")]
    Cgroup {
        /// `hierarchy:path`.
        cgroup: String,
        /// Why.
        why: String,
    },
}

/// Real, effective and saved ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ids {
    /// The real id.
    pub real: u32,
    /// The effective id.
    pub effective: u32,
    /// The saved set-id.
    pub saved: u32,
}

/// One resource limit; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// The resource, by its lower-case name without `RLIMIT_` (`nofile`).
    pub resource: String,
    /// The soft limit.
    pub soft: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

/// One line of `/proc/PID/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    /// The hierarchy's controllers as listed (`cpu,cpuacct`,
    /// `name=systemd`), empty for cgroup v2.
    pub controllers: String,
    /// The cgroup's path in that hierarchy.
    pub path: String,
}

impl std::fmt::Display for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.controllers.is_empty() {
            write!(f, "v2:{}", self.path)
        } else {
            write!(f, "{}:{}", self.controllers, self.path)
        }
    }
}

/// Who a process is, as far as starting it again goes.
///
/// Everything comes from /proc: `status` (Uid, Gid, Groups, Umask),
/// `limits` and `cgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// User ids.
    pub uid: Ids,
    /// Group ids.
    pub gid: Ids,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The file mode creation mask.
    pub umask: u32,
    /// Every resource limit.
    pub rlimits: Vec<Limit>,
    /// Its cgroup in every hierarchy.
    pub cgroups: Vec<Cgroup>,
}

/// The resource limits: name, `/proc/PID/limits` label, resource.
const RLIMITS: &[(&str, &str, libc::__rlimit_resource_t)] = &[
    ("cpu", "Max cpu time", libc::RLIMIT_CPU),
    ("fsize", "Max file size", libc::RLIMIT_FSIZE),
    ("data", "Max data size", libc::RLIMIT_DATA),
    ("stack", "Max stack size", libc::RLIMIT_STACK),
    ("core", "Max core file size", libc::RLIMIT_CORE),
    ("rss", "Max resident set", libc::RLIMIT_RSS),
    ("nproc", "Max processes", libc::RLIMIT_NPROC),
    ("nofile", "Max open files", libc::RLIMIT_NOFILE),
    ("memlock", "Max locked memory", libc::RLIMIT_MEMLOCK),
    ("as", "Max address space", libc::RLIMIT_AS),
    ("locks", "Max file locks", libc::RLIMIT_LOCKS),
    ("sigpending", "Max pending signals", libc::RLIMIT_SIGPENDING),
    ("msgqueue", "Max msgqueue size", libc::RLIMIT_MSGQUEUE),
    ("nice", "Max nice priority", libc::RLIMIT_NICE),
    ("rtprio", "Max realtime priority", libc::RLIMIT_RTPRIO),
    ("rttime", "Max realtime timeout", libc::RLIMIT_RTTIME),
];

fn names() -> String {
    RLIMITS
        .iter()
        .map(|(n, _, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn ids(line: Option<&str>) -> Option<Ids> {
    let v: Vec<u32> = line?
        .split_whitespace()
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    // Real, effective, saved, filesystem.
    (v.len() == 4).then(|| Ids {
        real: v[0],
        effective: v[1],
        saved: v[2],
    })
}

fn to_rlim(v: Option<u64>) -> libc::rlim_t {
    v.unwrap_or(libc::RLIM_INFINITY)
}

#[cfg(test)]
fn from_rlim(v: libc::rlim_t) -> Option<u64> {
    (v != libc::RLIM_INFINITY).then_some(v)
}

/// Parses `/proc/PID/limits` (read rather than asked with `prlimit`,
/// which needs CAP_SYS_RESOURCE for another user's process): every limit
/// must be there; the error names the missing one.
pub fn parse_limits(text: &str) -> Result<Vec<Limit>, &'static str> {
    let value = |v: Option<&str>| match v {
        Some("unlimited") => Some(None),
        Some(n) => n.parse().ok().map(Some),
        None => None,
    };
    RLIMITS
        .iter()
        .map(|&(name, label, _)| {
            let rest = text
                .lines()
                .find_map(|l| l.strip_prefix(label).filter(|r| r.starts_with(' ')))
                .ok_or(name)?;
            let mut w = rest.split_whitespace();
            Ok(Limit {
                resource: name.to_string(),
                soft: value(w.next()).ok_or(name)?,
                hard: value(w.next()).ok_or(name)?,
            })
        })
        .collect()
}

/// Parses `/proc/PID/cgroup`.
pub fn parse_cgroups(text: &str) -> Vec<Cgroup> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            Some(Cgroup {
                controllers: controllers.to_string(),
                path: path.to_string(),
            })
        })
        .collect()
}

impl Identity {
    /// Records the identity of `pid` from /proc and its resource limits.
    pub fn record(pid: i32) -> Result<Identity, IdentityError> {
        let read = |what: &'static str| {
            std::fs::read_to_string(format!("/proc/{pid}/{what}"))
                .map_err(|source| IdentityError::Read { pid, what, source })
        };
        let status = read("status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        };
        let bad = |field| IdentityError::Parse {
            pid,
            what: "status",
            field,
        };
        let uid = ids(field("Uid")).ok_or_else(|| bad("Uid"))?;
        let gid = ids(field("Gid")).ok_or_else(|| bad("Gid"))?;
        let groups = field("Groups")
            .ok_or_else(|| bad("Groups"))?
            .split_whitespace()
            .map(|g| g.parse().map_err(|_| bad("Groups")))
            .collect::<Result<_, _>>()?;
        let umask = field("Umask")
            .and_then(|u| u32::from_str_radix(u.trim(), 8).ok())
            .ok_or_else(|| bad("Umask"))?;
        let rlimits = parse_limits(&read("limits")?).map_err(|field| IdentityError::Parse {
            pid,
            what: "limits",
            field,
        })?;
        let cgroups = parse_cgroups(&read("cgroup")?);
        Ok(Identity {
            uid,
            gid,
            groups,
            umask,
            rlimits,
            cgroups,
        })
    }

    /// Everything the child needs to take this identity, resolved and
    /// opened before the fork (so that the child only makes system calls):
    /// each cgroup's directory created and its `cgroup.procs` opened.
    pub fn prepare(&self) -> Result<Prepared, IdentityError> {
        let mut limits = Vec::with_capacity(self.rlimits.len());
        for l in &self.rlimits {
            let resource = RLIMITS
                .iter()
                .find(|(n, _, _)| *n == l.resource)
                .map(|(_, _, r)| *r)
                .ok_or_else(|| IdentityError::UnknownLimit(l.resource.clone()))?;
            limits.push((
                resource,
                libc::rlimit {
                    rlim_cur: to_rlim(l.soft),
                    rlim_max: to_rlim(l.hard),
                },
            ));
        }
        let mounts =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| IdentityError::Cgroup {
                cgroup: "(any)".into(),
                why: format!("cannot read /proc/self/mountinfo: {e}"),
            })?;
        let mounts = parse_mounts(&mounts);
        let mut cgroups = Vec::with_capacity(self.cgroups.len());
        for c in &self.cgroups {
            let fail = |why: String| IdentityError::Cgroup {
                cgroup: c.to_string(),
                why,
            };
            let mount = find_hierarchy(&mounts, &c.controllers).ok_or_else(|| {
                fail(if c.controllers.is_empty() {
                    "no cgroup v2 hierarchy is mounted on this host".into()
                } else {
                    format!(
                        "no cgroup v1 hierarchy with {} is mounted on this host",
                        c.controllers
                    )
                })
            })?;
            let cpuset = c.controllers.split(',').any(|x| x == "cpuset");
            let dir = create(mount, &c.path, cpuset).map_err(fail)?;
            let procs = dir.join("cgroup.procs");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| fail(format!("cannot open {}: {e}", procs.display())))?;
            cgroups.push(OwnedFd::from(file));
        }
        Ok(Prepared {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.iter().map(|&g| g as libc::gid_t).collect(),
            umask: self.umask as libc::mode_t,
            limits,
            cgroups,
            names: self.cgroups.iter().map(Cgroup::to_string).collect(),
        })
    }
}

/// A cgroup mount: its mount point and the file system's options.
struct Mount {
    point: PathBuf,
    v2: bool,
    options: Vec<String>,
}

/// The cgroup file systems mounted at their root, from mountinfo.
fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, point) = (*left.get(3)?, *left.get(4)?);
            let (fstype, superopts) = (*right.first()?, *right.get(2)?);
            if root != "/" || (fstype != "cgroup" && fstype != "cgroup2") {
                return None;
            }
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                v2: fstype == "cgroup2",
                options: superopts.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The mount of the hierarchy with `controllers` (empty: v2).
fn find_hierarchy<'a>(mounts: &'a [Mount], controllers: &str) -> Option<&'a Mount> {
    mounts.iter().find(|m| {
        if controllers.is_empty() {
            m.v2
        } else {
            !m.v2
                && controllers
                    .split(',')
                    .all(|c| m.options.iter().any(|o| o == c))
        }
    })
}

/// Creates `path` under the hierarchy's mount (each missing directory in
/// turn; a new cpuset cgroup gets its parent's cpus and mems) and returns
/// its directory. The path comes from the other host: only plain
/// components are accepted.
fn create(mount: &Mount, path: &str, cpuset: bool) -> Result<PathBuf, String> {
    let rel = Path::new(path);
    if !rel.is_absolute() {
        return Err(format!("the recorded path {path:?} is not absolute"));
    }
    let mut dir = mount.point.clone();
    for c in rel.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => {
                let parent = dir.clone();
                dir.push(n);
                match std::fs::create_dir(&dir) {
                    Ok(()) if cpuset => {
                        for f in ["cpuset.cpus", "cpuset.mems"] {
                            let v = std::fs::read(parent.join(f))
                                .and_then(|v| std::fs::write(dir.join(f), v));
                            if let Err(e) = v {
                                return Err(format!(
                                    "cannot give the new {} its parent's {f}: {e}",
                                    dir.display()
                                ));
                            }
                        }
                    }
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
                }
            }
            _ => return Err(format!("the recorded path {path:?} is not a plain path")),
        }
    }
    Ok(dir)
}

/// An [`Identity`] ready to be taken by a forked child.
pub struct Prepared {
    uid: Ids,
    gid: Ids,
    groups: Vec<libc::gid_t>,
    umask: libc::mode_t,
    limits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    /// `cgroup.procs` of each cgroup, open for writing.
    cgroups: Vec<OwnedFd>,
    /// Each cgroup's name, for messages.
    names: Vec<String>,
}

/// The step of [`Prepared::apply`] that failed, and `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Which step (see [`Prepared::describe`]).
    pub step: i32,
    /// Which item of that step (the cgroup or limit index).
    pub index: i32,
    /// `errno`.
    pub errno: i32,
}

const STEP_CGROUP: i32 = 1;
const STEP_RLIMIT: i32 = 2;
const STEP_GROUPS: i32 = 3;
const STEP_GID: i32 = 4;
const STEP_UID: i32 = 5;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Prepared {
    /// Takes the identity: joins every cgroup, sets every limit and the
    /// umask, then the supplementary groups, the gids and last the uids
    /// (after which it could change none of the others). Only
    /// async-signal-safe system calls on data prepared before the fork: this
    /// runs in a forked child of a multithreaded process.
    ///
    /// # Safety
    /// Call only in a forked child about to exec (it changes the calling
    /// process's credentials and cgroups).
    pub unsafe fn apply(&self) -> Result<(), Failure> {
        let fail = |step, index: usize| Failure {
            step,
            index: index as i32,
            errno: errno(),
        };
        for (i, fd) in self.cgroups.iter().enumerate() {
            // SAFETY: writes two bytes from a static buffer to an open fd.
            if unsafe { libc::write(fd.as_raw_fd(), b"0\n".as_ptr().cast(), 2) } < 0 {
                return Err(fail(STEP_CGROUP, i));
            }
        }
        for (i, (resource, limit)) in self.limits.iter().enumerate() {
            // SAFETY: sets a limit from a prepared struct.
            if unsafe { libc::setrlimit(*resource, limit) } != 0 {
                return Err(fail(STEP_RLIMIT, i));
            }
        }
        // SAFETY: the plain system calls, on prepared values.
        unsafe {
            libc::umask(self.umask);
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0 {
                return Err(fail(STEP_GROUPS, 0));
            }
            let (g, u) = (self.gid, self.uid);
            if libc::setresgid(g.real, g.effective, g.saved) != 0 {
                return Err(fail(STEP_GID, 0));
            }
            if libc::setresuid(u.real, u.effective, u.saved) != 0 {
                return Err(fail(STEP_UID, 0));
            }
        }
        Ok(())
    }

    /// What a [`Failure`] of [`Prepared::apply`] means, for a message.
    pub fn describe(&self, f: Failure) -> String {
        let err = std::io::Error::from_raw_os_error(f.errno);
        let i = f.index as usize;
        match f.step {
            STEP_CGROUP => format!(
                "cannot join cgroup {}: {err}",
                self.names.get(i).map_or("?", String::as_str)
            ),
            STEP_RLIMIT => format!(
                "cannot set the {} limit to {:?}: {err}",
                self.limits
                    .get(i)
                    .and_then(|(r, _)| RLIMITS.iter().find(|(_, _, x)| x == r))
                    .map_or("?", |(n, _, _)| n),
                self.limits.get(i).map(|(_, l)| (l.rlim_cur, l.rlim_max)),
            ),
            STEP_GROUPS => format!("cannot set the groups {:?}: {err}", self.groups),
            STEP_GID => format!("cannot set the gids {:?}: {err}", self.gid),
            STEP_UID => format!("cannot set the uids {:?}: {err}", self.uid),
            _ => format!("step {}: {err}", f.step),
        }
    }
}

/// Writes a [`Failure`] to `fd` (async-signal-safe).
///
/// # Safety
/// `fd` must be open.
pub unsafe fn report(fd: i32, f: Failure) {
    let v = [f.step, f.index, f.errno];
    // SAFETY: writes 12 bytes from the stack.
    unsafe { libc::write(fd, v.as_ptr().cast(), std::mem::size_of_val(&v)) };
}

/// Reads what [`report`] wrote: `None` at end of file (the exec
/// happened).
pub fn read_report(file: &mut File) -> Option<Failure> {
    use std::io::Read;
    let mut b = [0u8; 12];
    file.read_exact(&mut b).ok()?;
    let n = |i: usize| i32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Some(Failure {
        step: n(0),
        index: n(4),
        errno: n(8),
    })
}

/// Writes `bytes` to `file` (a helper for tests of cgroup files).
#[cfg(test)]
fn put(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)?
        .write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_lines_of_v1_v2_and_hybrid() {
        let c = parse_cgroups("12:cpu,cpuacct:/a/b\n1:name=systemd:/user.slice\n0::/x y\n");
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].controllers, "cpu,cpuacct");
        assert_eq!(c[0].path, "/a/b");
        assert_eq!(c[1].to_string(), "name=systemd:/user.slice");
        assert_eq!(c[2].controllers, "");
        assert_eq!(c[2].path, "/x y");
    }

    #[test]
    fn limits_are_read_with_unlimited_ones() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n";
        let mut text = text.to_string();
        for (_, label, _) in RLIMITS {
            let v = if *label == "Max open files" {
                "512                  4096"
            } else {
                "unlimited            unlimited"
            };
            text.push_str(&format!("{label:<26}{v}                 units\n"));
        }
        let l = parse_limits(&text).unwrap();
        assert_eq!(l.len(), RLIMITS.len());
        let nofile = l.iter().find(|l| l.resource == "nofile").unwrap();
        assert_eq!((nofile.soft, nofile.hard), (Some(512), Some(4096)));
        assert!(l
            .iter()
            .filter(|l| l.resource != "nofile")
            .all(|l| l.soft.is_none() && l.hard.is_none()));
        // "Max file size" is not "Max file locks"; a missing line is named.
        let short = text.replace("Max file locks", "Max gone");
        assert_eq!(parse_limits(&short).unwrap_err(), "locks");
    }

    #[test]
    fn mounts_are_found_by_controllers() {
        let m = parse_mounts(
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             31 25 0:27 / /sys/fs/cgroup/uni\\040fied rw - cgroup2 cgroup2 rw\n\
             32 25 0:28 /sub /mnt/cpuset rw - cgroup cgroup rw,cpuset\n\
             33 25 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n",
        );
        assert_eq!(m.len(), 3, "the bind mount of a subtree is not a hierarchy");
        let p = |c| find_hierarchy(&m, c).map(|m| m.point.display().to_string());
        assert_eq!(p("cpu").as_deref(), Some("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(
            p("cpu,cpuacct").as_deref(),
            Some("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(p("").as_deref(), Some("/sys/fs/cgroup/uni fied"));
        assert_eq!(p("name=systemd").as_deref(), Some("/sys/fs/cgroup/systemd"));
        assert_eq!(p("cpuset"), None);
        assert_eq!(p("memory"), None);
    }

    #[test]
    fn recorded_paths_stay_in_their_hierarchy() {
        let m = Mount {
            point: PathBuf::from("/nonexistent-phaul-mount"),
            v2: true,
            options: Vec::new(),
        };
        assert!(create(&m, "/../etc", false).unwrap_err().contains("plain"));
        assert!(create(&m, "relative", false)
            .unwrap_err()
            .contains("absolute"));
    }

    #[test]
    fn own_identity_is_recorded() {
        let me = std::process::id() as i32;
        let id = Identity::record(me).unwrap();
        // SAFETY: plain getters.
        let (uid, gid, mask) = unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            (libc::geteuid(), libc::getegid(), m)
        };
        assert_eq!(id.uid.effective, uid);
        assert_eq!(id.gid.effective, gid);
        assert_eq!(id.umask, mask);
        assert_eq!(id.rlimits.len(), RLIMITS.len());
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads a limit.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
        let nofile = id.rlimits.iter().find(|l| l.resource == "nofile").unwrap();
        assert_eq!(nofile.soft, from_rlim(l.rlim_cur));
        assert_eq!(nofile.hard, from_rlim(l.rlim_max));
        assert!(!id.cgroups.is_empty());
    }

    /// A missing cgroup is created in each hierarchy (a cpuset one with its
    /// parent's cpus and mems, so that it can be joined), under this
    /// process's own cgroup. Needs root and a cgroup file system.
    #[test]
    fn missing_cgroups_are_created_and_can_be_joined() {
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root");
            return;
        }
        let me = std::process::id();
        let own = parse_cgroups(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        let mounts = parse_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
        let name = format!("phaul-identity-test-{me}");
        let mut made = Vec::new();
        for c in &own {
            let Some(m) = find_hierarchy(&mounts, &c.controllers) else {
                continue;
            };
            let path = format!("{}/{name}/inner", c.path.trim_end_matches('/'));
            let cpuset = c.controllers.split(',').any(|x| x == "cpuset");
            let dir = create(m, &path, cpuset).unwrap();
            assert!(dir.is_dir(), "{} was created", dir.display());
            made.push((dir, c.clone(), m.point.clone()));
        }
        assert!(!made.is_empty(), "no cgroup hierarchy to test with");
        // A child joins each: only a joinable cgroup takes it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut joined = Ok(());
        for (dir, _, _) in &made {
            if let Err(e) = put(&dir.join("cgroup.procs"), pid.to_string().as_bytes()) {
                joined = Err(format!("{}: {e}", dir.display()));
                break;
            }
        }
        let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        for (dir, _, _) in &made {
            let _ = std::fs::remove_dir(dir);
            let _ = std::fs::remove_dir(dir.parent().unwrap());
        }
        joined.unwrap();
        for (_, c, _) in &made {
            let want = format!("{}/{name}/inner", c.path.trim_end_matches('/'));
            assert!(
                parse_cgroups(&seen)
                    .iter()
                    .any(|s| s.controllers == c.controllers && s.path == want),
                "the child is in {c} /{name}/inner: {seen}"
            );
        }
    }
}
