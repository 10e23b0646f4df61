//! `hello`: an example phaul htype driver, built out of tree.
//!
//! It moves a single process (no children; threads are fine), named by its
//! pid, live: the engine does the CRIU work, the driver checks the workload,
//! names the root task, carries one file of its own from the source to the
//! destination, and logs each step through the engine's [`Host`].
//!
//! ```sh
//! cargo build --release
//! phaul --plugin-dir target/release htypes
//! phaul --plugin-dir target/release migrate hello 4242 --to 127.0.0.1:7070
//! ```
//!
//! Hooks, in the order the engine calls them (see `phaul_plugin_api::driver`
//! for when each runs and what a failure does):
//!
//! - `info`: the htype's name and what it can do (live migration).
//! - `init` (both sides): the workload id must be a pid; the source checks
//!   that the process exists and is alone (the `pid` htype moves trees).
//! - `root_task_pid` (source): the pid CRIU dumps.
//! - `meta_files_out` (source, workload frozen): writes `hello.txt`, the
//!   process's name and source pid, which the engine sends along.
//! - `meta_files_in` (destination, before the restore): reads it back.
//! - `migration_complete` / `migration_fail` (both sides): says how it
//!   ended.
//!
//! Every other hook keeps its default: no files to sync, no mounts, CRIU
//! options as the engine sets them, the engine's own dump and restore.

use std::path::Path;

use phaul_plugin_api::{
    export_driver, Capabilities, Driver, DriverError, DriverInfo, DriverResult, HostBox, HostExt,
    InitContext, LogLevel, Side,
};

/// The file this driver sends from the source to the destination.
const META_FILE: &str = "hello.txt";

/// One instance per migration and side.
#[derive(Default)]
pub struct Hello {
    host: Option<HostBox>,
    side: Option<Side>,
    pid: i32,
    /// The process's name (`/proc/PID/comm`), known on the source and,
    /// after `meta_files_in`, on the destination.
    comm: String,
}

impl Hello {
    fn log(&self, level: LogLevel, message: &str) {
        if let Some(host) = &self.host {
            host.log_str(level, &format!("hello: {message}"));
        }
    }
}

/// The children of every thread of `pid`, from `/proc/PID/task/*/children`.
fn children(pid: i32) -> DriverResult<Vec<String>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| DriverError::failed(format!("cannot list the threads of {pid}: {e}")))?;
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().map(String::from));
    }
    Ok(out)
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Source => "source",
        Side::Destination => "destination",
    }
}

impl Driver for Hello {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            name: "hello".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "example driver: a single process, moved live".into(),
            capabilities: Capabilities::LIVE,
        }
    }

    fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
        if let Some(kv) = ctx.options.first() {
            return Err(DriverError::invalid(format!(
                "unknown option `{}`: the hello htype takes none",
                kv.key
            )));
        }
        self.pid = match ctx.id.parse::<i32>() {
            Ok(pid) if pid > 1 => pid,
            _ => {
                return Err(DriverError::invalid(format!(
                    "`{}` is not a process id (the hello htype takes the pid of one process)",
                    ctx.id
                )))
            }
        };
        if ctx.side == Side::Source {
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).map_err(|_| {
                    DriverError::not_found(format!("no process with pid {} on this host", self.pid))
                })?;
            self.comm = comm.trim().to_string();
            let kids = children(self.pid)?;
            if !kids.is_empty() {
                return Err(DriverError::invalid(format!(
                    "process {} has children ({}): the hello htype moves a single process, \
                     use the pid htype for a tree",
                    self.pid,
                    kids.join(", ")
                )));
            }
        }
        self.side = Some(ctx.side);
        self.host = Some(ctx.host);
        self.log(
            LogLevel::Info,
            &format!(
                "ready on the {} side for pid {}",
                side_name(ctx.side),
                self.pid
            ),
        );
        Ok(())
    }

    fn root_task_pid(&mut self) -> DriverResult<i32> {
        self.log(
            LogLevel::Info,
            &format!("moving `{}` (pid {})", self.comm, self.pid),
        );
        Ok(self.pid)
    }

    fn meta_files_out(&mut self, dir: &str) -> DriverResult<Vec<String>> {
        let path = Path::new(dir).join(META_FILE);
        std::fs::write(&path, format!("{}\n{}\n", self.comm, self.pid))
            .map_err(|e| DriverError::failed(format!("write {}: {e}", path.display())))?;
        Ok(vec![META_FILE.to_string()])
    }

    fn meta_files_in(&mut self, dir: &str, names: &[String]) -> DriverResult<()> {
        if !names.iter().any(|n| n == META_FILE) {
            return Err(DriverError::failed(format!(
                "the source sent no {META_FILE} (got {names:?})"
            )));
        }
        let path = Path::new(dir).join(META_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DriverError::failed(format!("read {}: {e}", path.display())))?;
        self.comm = text.lines().next().unwrap_or_default().to_string();
        self.log(
            LogLevel::Info,
            &format!("received `{}` (pid {} on the source)", self.comm, self.pid),
        );
        Ok(())
    }

    fn migration_complete(&mut self) -> DriverResult<()> {
        let msg = match self.side {
            Some(Side::Destination) => format!("`{}` runs here now", self.comm),
            _ => format!("`{}` left this host", self.comm),
        };
        self.log(LogLevel::Info, &msg);
        Ok(())
    }

    fn migration_fail(&mut self) -> DriverResult<()> {
        self.log(
            LogLevel::Warn,
            &format!("the migration of `{}` was rolled back", self.comm),
        );
        Ok(())
    }
}

export_driver!(Hello);
