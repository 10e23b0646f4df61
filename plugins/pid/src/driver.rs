//! The pid driver itself (exported as a plugin by `lib.rs`).
//!
//! The engine does the CRIU work; this driver validates the pid, turns the
//! user's `-o key=value` options into CRIU options, and says which
//! directories travel with the tree (`-o sync=DIR`, or `-o shared-storage`).
//!
//! Options (both sides receive the same ones; the engine's own CRIU
//! options `file-locks`, `link-remap`, `ghost-limit` and `evasive-devices`
//! never reach the driver):
//! - `shell-job`: the tree has a controlling terminal (CRIU `--shell-job`)
//! - `ext-unix-sk`: allow unix sockets connected to the outside
//! - `external=SPEC`: a CRIU `--external` resource (repeatable)
//! - `veth=IN=OUT[@BRIDGE]`: on restore, recreate the tree's veth `IN` with
//!   host-side end `OUT`, attached to `BRIDGE` (the tree has its own network
//!   namespace; repeatable)
//! - `sync=DIR`: a directory subtree to copy to the destination (repeatable)
//! - `shared-storage`: the tree's files are on storage both hosts see
//! - `stop-timeout=SECONDS`: restart mode, how long the tree gets to exit
//!   after SIGTERM before SIGKILL (default 10)
//!
//! In restart mode (`--mode restart`) the driver records the root process's
//! program, arguments, working directory, environment and identity (uids,
//! gids, groups, umask, resource limits, cgroups) on the source, stops every
//! process of the tree (`stop`), and starts the same command as the same
//! identity on the destination (`start`): a restart, not a live move. See
//! [`crate::restart`] and [`crate::identity`].

use std::time::Duration;

use phaul_plugin_api::abi_stable::std_types::RString;
use phaul_plugin_api::{
    Capabilities, CriuOpts, Driver, DriverError, DriverInfo, DriverResult, FsSyncSpec, HostBox,
    HostExt, InitContext, LogLevel, Mode, Side,
};

use crate::restart::{self, Launch, META_FILE};

const KNOWN_OPTIONS: &[&str] = &[
    "shell-job",
    "ext-unix-sk",
    "external",
    "veth",
    "sync",
    "shared-storage",
    "stop-timeout",
];

/// Settings parsed from the driver options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PidOptions {
    /// CRIU `--shell-job`.
    pub shell_job: bool,
    /// CRIU `--ext-unix-sk`.
    pub ext_unix_sk: bool,
    /// CRIU `--external` entries.
    pub external: Vec<String>,
    /// Restore-side veth pairs: (inside name, outside name[@bridge]).
    pub veth: Vec<(String, String)>,
    /// Directories to sync.
    pub sync: Vec<String>,
    /// Files are on shared storage.
    pub shared_storage: bool,
    /// Restart mode: seconds between SIGTERM and SIGKILL.
    pub stop_timeout: Option<u64>,
}

impl PidOptions {
    /// Parses `key=value` pairs; an unknown key or malformed value is an
    /// error naming it.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> DriverResult<Self> {
        let mut o = PidOptions::default();
        for (key, value) in pairs {
            match key {
                "shell-job" => o.shell_job = phaul_plugin_api::flag_option(key, value)?,
                "ext-unix-sk" => o.ext_unix_sk = phaul_plugin_api::flag_option(key, value)?,
                "shared-storage" => o.shared_storage = phaul_plugin_api::flag_option(key, value)?,
                "stop-timeout" => {
                    o.stop_timeout = Some(value.parse().map_err(|_| {
                        DriverError::invalid(format!(
                            "option stop-timeout={value}: expected seconds"
                        ))
                    })?)
                }
                "external" if !value.is_empty() => o.external.push(value.to_string()),
                "veth" => match value.split_once('=') {
                    Some((inside, outside)) if !inside.is_empty() && !outside.is_empty() => {
                        o.veth.push((inside.to_string(), outside.to_string()))
                    }
                    _ => {
                        return Err(DriverError::invalid(format!(
                            "option veth={value}: expected IN=OUT or IN=OUT@BRIDGE"
                        )))
                    }
                },
                "sync" => {
                    if !value.starts_with('/') {
                        return Err(DriverError::invalid(format!(
                            "option sync={value}: the directory must be an absolute path"
                        )));
                    }
                    o.sync.push(value.trim_end_matches('/').to_string());
                }
                "external" => {
                    return Err(DriverError::invalid("option external needs a value"));
                }
                _ => {
                    return Err(DriverError::invalid(format!(
                        "unknown option `{key}` for the pid htype (known: {}; and for every \
                         htype file-locks, link-remap, ghost-limit, evasive-devices)",
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        if o.shared_storage && !o.sync.is_empty() {
            return Err(DriverError::invalid(
                "options sync and shared-storage exclude each other",
            ));
        }
        Ok(o)
    }
}

/// The pid driver.
#[derive(Default)]
pub struct PidDriver {
    side: Option<Side>,
    pid: i32,
    options: PidOptions,
    host: Option<HostBox>,
    launch: Option<Launch>,
}

impl PidDriver {
    fn log(&self, level: LogLevel, msg: &str) {
        if let Some(host) = &self.host {
            host.log_str(level, msg);
        }
    }
}

/// Parses the workload id of the pid htype.
pub fn parse_pid(id: &str) -> DriverResult<i32> {
    match id.parse::<i32>() {
        Ok(pid) if pid > 1 => Ok(pid),
        _ => Err(DriverError::invalid(format!(
            "`{id}` is not a process id (the pid htype takes the pid of the tree's root, > 1)"
        ))),
    }
}

impl Driver for PidDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            name: RString::from("pid"),
            version: RString::from(env!("CARGO_PKG_VERSION")),
            description: RString::from("a plain process tree, named by the pid of its root"),
            capabilities: Capabilities::PRE_DUMP
                | Capabilities::TCP_ESTABLISHED
                | Capabilities::LIVE
                | Capabilities::RESTART
                | Capabilities::SHARED_STORAGE,
        }
    }

    fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
        self.options = PidOptions::parse(
            ctx.options
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_str())),
        )?;
        self.pid = parse_pid(ctx.id.as_str())?;
        if ctx.side == Side::Source {
            let proc = format!("/proc/{}", self.pid);
            if !std::path::Path::new(&proc).exists() {
                return Err(DriverError::not_found(format!(
                    "no process with pid {} on this host",
                    self.pid
                )));
            }
        }
        if ctx.side == Side::Source && ctx.mode == Mode::Restart {
            self.launch = Some(Launch::record(self.pid)?);
        }
        self.side = Some(ctx.side);
        self.host = Some(ctx.host);
        self.log(
            LogLevel::Debug,
            &format!("pid driver ready for {} ({:?})", self.pid, self.options),
        );
        Ok(())
    }

    fn root_task_pid(&mut self) -> DriverResult<i32> {
        Ok(self.pid)
    }

    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        self.apply(opts);
        Ok(())
    }

    fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        self.apply(opts);
        for (inside, outside) in &self.options.veth {
            opts.external
                .push(RString::from(format!("veth[{inside}]:{outside}")));
        }
        Ok(())
    }

    fn stop(&mut self) -> DriverResult<()> {
        let grace = Duration::from_secs(self.options.stop_timeout.unwrap_or(10));
        restart::stop(self.pid, grace)
    }

    fn start(&mut self) -> DriverResult<i32> {
        let launch = self.launch.as_ref().ok_or_else(|| {
            DriverError::failed("nothing to start: no command line was recorded or received")
        })?;
        if launch.identity.is_none() {
            self.log(
                LogLevel::Warn,
                &format!(
                    "the source recorded no identity (a version-{} description, from an older \
                     phaul): starting {} as this service's user, in its cgroups",
                    launch.version, launch.exe
                ),
            );
        }
        let pid = launch.start()?;
        let who = match &launch.identity {
            Some(id) => format!(
                " (uid {}, gid {}, groups {:?}, umask {:04o})",
                id.uid.effective, id.gid.effective, id.groups, id.umask
            ),
            None => String::new(),
        };
        self.log(
            LogLevel::Info,
            &format!("started {} as pid {pid}{who}", launch.exe),
        );
        self.pid = pid;
        Ok(pid)
    }

    fn meta_files_out(&mut self, dir: &str) -> DriverResult<Vec<String>> {
        match &self.launch {
            Some(l) => {
                l.save(dir)?;
                Ok(vec![META_FILE.to_string()])
            }
            None => Ok(Vec::new()),
        }
    }

    fn meta_files_in(&mut self, dir: &str, names: &[String]) -> DriverResult<()> {
        if names.iter().any(|n| n == META_FILE) {
            self.launch = Some(Launch::load(dir)?);
        }
        Ok(())
    }

    fn fs_sync(&mut self) -> DriverResult<FsSyncSpec> {
        Ok(if self.options.shared_storage {
            FsSyncSpec::shared_storage()
        } else if !self.options.sync.is_empty() {
            FsSyncSpec::paths(self.options.sync.iter().cloned())
        } else {
            FsSyncSpec::nothing()
        })
    }
}

impl PidDriver {
    fn apply(&self, opts: &mut CriuOpts) {
        let o = &self.options;
        opts.shell_job |= o.shell_job;
        opts.ext_unix_sk |= o.ext_unix_sk;
        for e in &o.external {
            opts.external.push(RString::from(e.as_str()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject() {
        let o = PidOptions::parse([
            ("shell-job", ""),
            ("sync", "/srv/data/"),
            ("external", "mnt[/x]:x"),
            ("veth", "eth0=vt1@br0"),
        ])
        .unwrap();
        assert_eq!(o.veth, vec![("eth0".to_string(), "vt1@br0".to_string())]);
        assert!(PidOptions::parse([("veth", "eth0")]).is_err());
        assert!(o.shell_job);
        assert_eq!(o.sync, vec!["/srv/data".to_string()]);
        assert_eq!(o.external, vec!["mnt[/x]:x".to_string()]);
        let e = PidOptions::parse([("bogus", "1")]).unwrap_err();
        assert!(
            e.message.contains("unknown option `bogus`"),
            "{}",
            e.message
        );
        assert!(PidOptions::parse([("sync", "relative")]).is_err());
        assert!(PidOptions::parse([("sync", "/a"), ("shared-storage", "")]).is_err());
        assert!(PidOptions::parse([("shell-job", "maybe")]).is_err());
    }

    #[test]
    fn pid_must_be_a_number_above_one() {
        assert_eq!(parse_pid("4242").unwrap(), 4242);
        assert!(parse_pid("1").is_err());
        assert!(parse_pid("abc").is_err());
    }
}
