//! The LXC commands the driver runs (`lxc-info`, `lxc-config`,
//! `lxc-start`, `lxc-stop`, `lxc-destroy`, `lxc-checkpoint -r`) and what it
//! reads of the host (LXC monitors and tools in /proc, veth bridges in
//! /sys): one place, each command line spelled out, failures quoting the
//! command and what it printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use phaul_plugin_api::{DriverError, DriverResult};

/// The line a command ran with, for messages.
fn line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An anonymous in-memory file (`memfd_create`) for a command's output.
fn memfd(name: &std::ffi::CStr) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a valid C string and flags; the new descriptor is owned by
    // the File from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The whole content of `f`, from the start.
fn read_all(mut f: std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut s = String::new();
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = f.read_to_string(&mut s);
    s
}

/// Runs `cmd` (stdin closed), returning its standard output; a failure
/// names the command and quotes its standard error. The output goes
/// through in-memory files, not pipes: an LXC tool that leaves a daemon
/// behind (a container's monitor) would otherwise keep the pipe, and this
/// call, open forever.
pub fn run(cmd: &mut Command) -> DriverResult<String> {
    let l = line(cmd);
    let io = |e: std::io::Error| DriverError::failed(format!("cannot run `{l}`: {e}"));
    let (out, err) = (memfd(c"stdout").map_err(io)?, memfd(c"stderr").map_err(io)?);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(io)?)
        .stderr(err.try_clone().map_err(io)?)
        .status()
        .map_err(io)?;
    if !status.success() {
        return Err(DriverError::failed(format!(
            "`{l}` failed ({status}): {}",
            read_all(err).trim()
        )));
    }
    Ok(read_all(out))
}

/// `prog`'s path on `PATH`, if it is there.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// This host's default lxcpath (`lxc-config lxc.lxcpath`: its
/// `/etc/lxc/lxc.conf`, or LXC's built-in `/var/lib/lxc`).
pub fn default_lxcpath() -> DriverResult<PathBuf> {
    let out = run(Command::new("lxc-config").arg("lxc.lxcpath"))?;
    let p = out.trim();
    if !p.starts_with('/') {
        return Err(DriverError::failed(format!(
            "`lxc-config lxc.lxcpath` answered {p:?}, not an absolute path"
        )));
    }
    Ok(PathBuf::from(p))
}

/// The containers LXC monitors run for on this host, as (lxcpath, name):
/// each running container has a `[lxc monitor] LXCPATH NAME` process.
pub fn running_monitors() -> Vec<(PathBuf, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let Some(rest) = cmd.trim().strip_prefix("[lxc monitor] ") else {
            continue;
        };
        if let Some((path, name)) = rest.rsplit_once(' ') {
            out.push((PathBuf::from(path), name.to_string()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A live `lxc-*` command (not a monitor) working on container `name` in
/// `lxcpath` (`lxc-checkpoint -P LXCPATH -n NAME ...`), e.g. a restore
/// left behind by a destination that died.
pub fn lxc_process_for(lxcpath: &Path, name: &str) -> Option<i32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    let want_path = lxcpath.as_os_str().to_string_lossy().into_owned();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_lxc = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("lxc-"));
        let names = args.windows(2).any(|w| w[0] == "-n" && w[1] == name);
        let in_path = args.windows(2).any(|w| w[0] == "-P" && w[1] == want_path);
        if is_lxc && names && in_path {
            return Some(pid);
        }
    }
    None
}

/// What `lxc-info` says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// `RUNNING`, `STOPPED`, `FROZEN`, ...
    pub state: String,
    /// The init's pid (as this host sees it), when it runs.
    pub pid: Option<i32>,
    /// The host-side ends of its veths (`Link:` lines).
    pub links: Vec<String>,
}

impl Info {
    /// Parses `lxc-info -H` output.
    pub fn parse(text: &str) -> Info {
        let mut info = Info {
            state: String::new(),
            pid: None,
            links: Vec::new(),
        };
        for l in text.lines() {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "State" => info.state = v.to_string(),
                "PID" => info.pid = v.parse().ok(),
                "Link" => info.links.push(v.to_string()),
                _ => {}
            }
        }
        info
    }
}

/// One container: `lxc-* -P LXCPATH -n NAME`.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its lxcpath.
    pub lxcpath: PathBuf,
    /// Its name.
    pub name: String,
}

impl Container {
    /// The container `name` in `lxcpath`.
    pub fn new(lxcpath: &Path, name: &str) -> Container {
        Container {
            lxcpath: lxcpath.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// Its directory (`LXCPATH/NAME`).
    pub fn dir(&self) -> PathBuf {
        self.lxcpath.join(&self.name)
    }

    /// Its configuration file (`LXCPATH/NAME/config`).
    pub fn config(&self) -> PathBuf {
        self.dir().join("config")
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.arg("-P").arg(&self.lxcpath).arg("-n").arg(&self.name);
        c
    }

    /// `lxc-info -P LXCPATH -n NAME -H`.
    pub fn info(&self) -> DriverResult<Info> {
        run(self.cmd("lxc-info").arg("-H")).map(|o| Info::parse(&o))
    }

    /// `lxc-start -P LXCPATH -n NAME` (daemonised), then its init's pid.
    pub fn start(&self) -> DriverResult<i32> {
        run(&mut self.cmd("lxc-start"))?;
        let info = self.info()?;
        match (info.state.as_str(), info.pid) {
            ("RUNNING", Some(pid)) => Ok(pid),
            _ => Err(DriverError::failed(format!(
                "lxc-start returned but {} is {} (see its log)",
                self.name, info.state
            ))),
        }
    }

    /// `lxc-stop -P LXCPATH -n NAME -t SECONDS` (a clean shutdown through
    /// `lxc.signal.halt`; LXC kills what is left after the timeout).
    pub fn stop(&self, timeout_s: u64) -> DriverResult<()> {
        run(self.cmd("lxc-stop").arg("-t").arg(timeout_s.to_string())).map(drop)
    }

    /// `lxc-stop -P LXCPATH -n NAME -k`: SIGKILL, no shutdown.
    pub fn kill(&self) -> DriverResult<()> {
        run(self.cmd("lxc-stop").arg("-k")).map(drop)
    }

    /// `lxc-destroy -P LXCPATH -n NAME`: its configuration and rootfs.
    pub fn destroy(&self) -> DriverResult<()> {
        run(&mut self.cmd("lxc-destroy")).map(drop)
    }

    /// Starts `lxc-checkpoint -r -P LXCPATH -n NAME -D IMAGES -l INFO -o
    /// LOG` without waiting: liblxc becomes the container's monitor and runs
    /// `criu restore --restore-detached --restore-sibling` with the
    /// container's root, cgroups, bind mounts and veths, reading
    /// `CRIU_CONFIG_FILE=criu_config` (the engine's action script, so the
    /// restored copy is held until the commit). `criu_dir` goes first on
    /// `PATH`: liblxc runs the first `criu` there.
    ///
    /// Its standard output and error go to `output` (a file: the monitor
    /// liblxc leaves behind inherits them, so a pipe would never end).
    pub fn spawn_restore(
        &self,
        images: &Path,
        criu_config: &Path,
        criu_dir: Option<&Path>,
        log: &Path,
        output: &Path,
    ) -> DriverResult<Child> {
        let out = std::fs::File::create(output)
            .map_err(|e| DriverError::failed(format!("creating {}: {e}", output.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| DriverError::failed(e.to_string()))?;
        let mut c = self.cmd("lxc-checkpoint");
        c.arg("-r")
            .arg("-D")
            .arg(images)
            .arg("-l")
            .arg("INFO")
            .arg("-o")
            .arg(log)
            .env("CRIU_CONFIG_FILE", criu_config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(dir) = criu_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path));
            if let Ok(joined) = std::env::join_paths(dirs) {
                c.env("PATH", joined);
            }
        }
        let l = line(&c);
        c.spawn()
            .map_err(|e| DriverError::failed(format!("cannot run `{l}`: {e}")))
    }
}

/// The bridge `dev` is attached to, if any (`/sys/class/net/DEV/master`).
pub fn link_master(dev: &str) -> Option<String> {
    let target = std::fs::read_link(Path::new("/sys/class/net").join(dev).join("master")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Whether `name` can be a network interface name (1-15 bytes, no `/`,
/// whitespace or `:`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parses_state_pid_and_links() {
        let i = Info::parse(
            "Name:           c1\nState:          RUNNING\nPID:            3277\n\
             IP:             10.253.0.10\nLink:           vethV0vGLt\n TX bytes:      90\n",
        );
        assert_eq!(i.state, "RUNNING");
        assert_eq!(i.pid, Some(3277));
        assert_eq!(i.links, vec!["vethV0vGLt".to_string()]);
        let s = Info::parse("Name: c1\nState:          STOPPED\n");
        assert_eq!((s.state.as_str(), s.pid), ("STOPPED", None));
    }
}
