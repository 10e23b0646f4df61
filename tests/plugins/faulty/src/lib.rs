//! Test plugin `faulty`: the pid driver with failures injected on demand,
//! for the loader's and the engine's negative tests.
//!
//! - `-o panic=HOOK`: the hook panics (caught by the export guard).
//! - `-o fail=HOOK`: the hook returns an error.
//! - `-o hang=HOOK`: the hook never returns (sleeps for an hour); it first
//!   creates the file named by `$PHAUL_TEST_FAULTY_HUNG`, if set, so a test
//!   knows it hangs now.
//! - `HOOK@source` / `HOOK@destination` limits either to one side.
//! - `-o record=FILE`: every hook call appends a line `SIDE HOOK FROZEN` to
//!   FILE (`FROZEN` is `frozen` when the source's root task is stopped by
//!   CRIU at that moment, `running` otherwise, `-` on the destination), so
//!   a test can check the engine's calls against the documented lifecycle.
//! - `-o break-restore`: the destination truncates the restored tree's
//!   `core` image before CRIU reads it, so the real CRIU restore fails (as
//!   it would on a corrupted image).
//! - `PHAUL_TEST_FAULTY_OWN_CRIU=1` in the environment: the driver dumps
//!   and restores through "its own tooling" — the `criu` command line, run
//!   with the action script the engine hands it — and declares the
//!   own-dump and own-restore capabilities, as a container driver whose
//!   engine runs CRIU does.
//! - `PHAUL_TEST_FAULTY_INFO=panic` in the environment: `info` panics, so
//!   the plugin fails to initialise and the loader must skip it.
//!
//! Every other option and every hook behave as in the pid driver.

// The pid driver's source, compiled into this plugin (a cdylib cannot be
// linked as a library, and its entry points would clash with ours).
#[path = "../../../../plugins/pid/src/identity.rs"]
mod identity;
#[path = "../../../../plugins/pid/src/driver.rs"]
mod pid_driver;
#[path = "../../../../plugins/pid/src/restart.rs"]
mod restart;

use phaul_plugin_api::abi_stable::std_types::RVec;
use phaul_plugin_api::*;
use pid_driver::PidDriver;

#[derive(Default)]
pub struct FaultyDriver {
    inner: PidDriver,
    panic_in: Vec<String>,
    fail_in: Vec<String>,
    hang_in: Vec<String>,
    record: Option<std::path::PathBuf>,
    side: &'static str,
    pid: i32,
    /// The `criu` command line under way ("own tooling").
    tool: Option<std::process::Child>,
    pidfile: Option<String>,
    break_restore: bool,
}

impl FaultyDriver {
    fn inject(&self, hook: &str) -> DriverResult<()> {
        if let Some(path) = &self.record {
            use std::io::Write;
            let frozen = match self.side {
                "source" => std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
                    .map_or("running", |c| {
                        if c == 't' || c == 'T' {
                            "frozen"
                        } else {
                            "running"
                        }
                    }),
                _ => "-",
            };
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{} {hook} {frozen}", self.side);
            }
        }
        if self.panic_in.iter().any(|h| h == hook) {
            panic!("injected panic in {hook}");
        }
        if self.hang_in.iter().any(|h| h == hook) {
            if let Ok(mark) = std::env::var("PHAUL_TEST_FAULTY_HUNG") {
                let _ = std::fs::write(mark, hook);
            }
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        if self.fail_in.iter().any(|h| h == hook) {
            return Err(DriverError::failed(format!("injected failure in {hook}")));
        }
        Ok(())
    }
}

fn own_criu() -> bool {
    std::env::var("PHAUL_TEST_FAULTY_OWN_CRIU").as_deref() == Ok("1")
}

/// Starts the `criu` command line, as a driver's own tooling would.
fn start_criu(args: &[String]) -> DriverResult<std::process::Child> {
    let bin = std::env::var("PHAUL_CRIU").unwrap_or_else(|_| "/usr/local/sbin/criu".into());
    std::process::Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| DriverError::failed(format!("{bin}: {e}")))
}

/// Waits for a `criu` started by [`start_criu`].
fn wait_criu(child: Option<std::process::Child>, what: &str) -> DriverResult<()> {
    let Some(child) = child else {
        return Err(DriverError::failed(format!("no criu {what} was started")));
    };
    let out = child
        .wait_with_output()
        .map_err(|e| DriverError::failed(e.to_string()))?;
    if !out.status.success() {
        return Err(DriverError::failed(format!(
            "criu {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Driver for FaultyDriver {
    fn info(&self) -> DriverInfo {
        if std::env::var("PHAUL_TEST_FAULTY_INFO").as_deref() == Ok("panic") {
            panic!("injected panic in info");
        }
        let mut info = self.inner.info();
        if own_criu() {
            info.capabilities =
                info.capabilities | Capabilities::OWN_DUMP | Capabilities::OWN_RESTORE;
        }
        info.name = "faulty".into();
        info.description = "test driver: the pid driver with injected failures".into();
        info
    }

    fn init(&mut self, mut ctx: InitContext) -> DriverResult<()> {
        let mut rest = RVec::new();
        let side = match ctx.side {
            Side::Source => "source",
            Side::Destination => "destination",
        };
        // `hook@side` applies on that side only.
        let here = |v: &str| match v.split_once('@') {
            Some((hook, s)) if s == side => Some(hook.to_string()),
            Some(_) => None,
            None => Some(v.to_string()),
        };
        for kv in ctx.options.iter() {
            match kv.key.as_str() {
                "panic" => self.panic_in.extend(here(kv.value.as_str())),
                "fail" => self.fail_in.extend(here(kv.value.as_str())),
                "hang" => self.hang_in.extend(here(kv.value.as_str())),
                "record" => self.record = Some(kv.value.as_str().into()),
                "break-restore" => self.break_restore = true,
                _ => rest.push(kv.clone()),
            }
        }
        ctx.options = rest;
        self.side = side;
        self.pid = ctx.id.parse().unwrap_or(0);
        self.inject("init")?;
        self.inner.init(ctx)
    }

    fn root_task_pid(&mut self) -> DriverResult<i32> {
        self.inject("root_task_pid")?;
        self.inner.root_task_pid()
    }
    fn adjust_dump_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        self.inject("adjust_dump_opts")?;
        self.inner.adjust_dump_opts(opts)
    }
    fn adjust_restore_opts(&mut self, opts: &mut CriuOpts) -> DriverResult<()> {
        self.inject("adjust_restore_opts")?;
        self.inner.adjust_restore_opts(opts)
    }
    fn dump(&mut self, ctx: &DumpContext) -> DriverResult<HookOutcome> {
        self.inject("dump")?;
        if !own_criu() {
            return self.inner.dump(ctx);
        }
        let dir = ctx.images_dir.as_str();
        let mut args: Vec<String> = vec![
            "dump".into(),
            "-t".into(),
            ctx.pid.to_string(),
            "-D".into(),
            dir.into(),
            "-o".into(),
            "dump.log".into(),
            "-v2".into(),
            "--action-script".into(),
            ctx.action_script.to_string(),
        ];
        if ctx.opts.file_locks {
            args.push("--file-locks".into());
        }
        if ctx.opts.link_remap {
            args.push("--link-remap".into());
        }
        if ctx.opts.tcp_established {
            args.push("--tcp-established".into());
        }
        self.tool = Some(start_criu(&args)?);
        Ok(HookOutcome::handled(0))
    }
    fn dump_wait(&mut self) -> DriverResult<()> {
        wait_criu(self.tool.take(), "dump")
    }
    fn restore(&mut self, ctx: &RestoreContext) -> DriverResult<HookOutcome> {
        self.inject("restore")?;
        if self.break_restore {
            let dir = std::path::Path::new(ctx.images_dir.as_str());
            for e in std::fs::read_dir(dir).map_err(|e| DriverError::failed(e.to_string()))? {
                let p = e.map_err(|e| DriverError::failed(e.to_string()))?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if name.starts_with("core-") {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .map_err(|e| DriverError::failed(e.to_string()))?;
                    f.set_len(12)
                        .map_err(|e| DriverError::failed(e.to_string()))?;
                }
            }
        }
        if !own_criu() {
            return self.inner.restore(ctx);
        }
        let dir = ctx.images_dir.as_str();
        let pidfile = format!("{dir}/restored.pid");
        let mut args: Vec<String> = vec![
            "restore".into(),
            "-D".into(),
            dir.into(),
            "-d".into(),
            "-o".into(),
            "restore.log".into(),
            "-v2".into(),
            "--pidfile".into(),
            pidfile.clone(),
            "--action-script".into(),
            ctx.action_script.to_string(),
        ];
        if ctx.opts.file_locks {
            args.push("--file-locks".into());
        }
        if ctx.opts.tcp_established {
            args.push("--tcp-established".into());
        }
        self.tool = Some(start_criu(&args)?);
        self.pidfile = Some(pidfile);
        Ok(HookOutcome::handled(0))
    }
    fn restore_wait(&mut self) -> DriverResult<i32> {
        wait_criu(self.tool.take(), "restore")?;
        Ok(self
            .pidfile
            .take()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0))
    }
    fn fs_sync(&mut self) -> DriverResult<FsSyncSpec> {
        self.inject("fs_sync")?;
        self.inner.fs_sync()
    }
    fn describe(&mut self) -> DriverResult<Vec<KeyValue>> {
        self.inject("describe")?;
        self.inner.describe()
    }
    fn net_lock(&mut self) -> DriverResult<()> {
        self.inject("net_lock")?;
        self.inner.net_lock()
    }
    fn net_unlock(&mut self) -> DriverResult<()> {
        self.inject("net_unlock")?;
        self.inner.net_unlock()
    }
    fn mount(&mut self) -> DriverResult<()> {
        self.inject("mount")?;
        self.inner.mount()
    }
    fn umount(&mut self) -> DriverResult<()> {
        self.inject("umount")?;
        self.inner.umount()
    }
    fn stop(&mut self) -> DriverResult<()> {
        self.inject("stop")?;
        self.inner.stop()
    }
    fn start(&mut self) -> DriverResult<i32> {
        self.inject("start")?;
        self.inner.start()
    }
    fn meta_files_out(&mut self, dir: &str) -> DriverResult<Vec<String>> {
        self.inject("meta_files_out")?;
        self.inner.meta_files_out(dir)
    }
    fn meta_files_in(&mut self, dir: &str, names: &[String]) -> DriverResult<()> {
        self.inject("meta_files_in")?;
        self.inner.meta_files_in(dir, names)
    }
    fn storage_snapshot(&mut self) -> DriverResult<()> {
        self.inject("storage_snapshot")?;
        self.inner.storage_snapshot()
    }
    fn storage_rollback(&mut self) -> DriverResult<()> {
        self.inject("storage_rollback")?;
        self.inner.storage_rollback()
    }
    fn storage_commit(&mut self) -> DriverResult<()> {
        self.inject("storage_commit")?;
        self.inner.storage_commit()
    }
    fn migration_complete(&mut self) -> DriverResult<()> {
        self.inject("migration_complete")?;
        self.inner.migration_complete()
    }
    fn migration_fail(&mut self) -> DriverResult<()> {
        self.inject("migration_fail")?;
        self.inner.migration_fail()
    }
    fn restored(&mut self, pid: i32) -> DriverResult<()> {
        self.inject("restored")?;
        self.inner.restored(pid)
    }
}

export_driver!(FaultyDriver);
