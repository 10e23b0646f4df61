//! The three ways of moving the workload, each timed and checked: phaul
//! over loopback, dump-copy-restore with the CRIU command line, and the
//! no-copy floor.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::Value;

/// A migration method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// phaul serve + phaul migrate over loopback.
    Phaul,
    /// criu dump to disk, cp -a, criu restore.
    Naive,
    /// criu dump to tmpfs, criu restore from it.
    Floor,
}

impl Method {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Phaul => "phaul",
            Method::Naive => "naive",
            Method::Floor => "floor",
        }
    }
}

/// One migration's measurements.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RunResult {
    /// The method.
    pub method: &'static str,
    /// Workload memory, MiB.
    pub mem_mib: u64,
    /// Dirtying rate, % of pages per second.
    pub dirty_pct: f64,
    /// Run number.
    pub run: u32,
    /// The largest heartbeat gap the workload saw across the migration.
    pub downtime_ms: f64,
    /// CRIU's frozen time from its dump statistics.
    pub criu_frozen_ms: f64,
    /// Wall time of the whole migration.
    pub total_ms: f64,
    /// Bytes moved (phaul: on the wire; others: the image directory).
    pub bytes: u64,
    /// phaul only: total time minus CRIU's own dump and restore work.
    pub overhead_ms: Option<f64>,
    /// phaul only: the memory channel's rate during the dump (bytes over
    /// CRIU's memwrite time), MiB/s.
    pub channel_mib_s: Option<f64>,
    /// phaul only: user+system CPU of `phaul migrate` and `phaul serve`.
    pub phaul_cpu_ms: Option<f64>,
    /// phaul only: peak RSS of `phaul migrate`, KiB.
    pub phaul_src_maxrss_kib: Option<u64>,
    /// phaul only: peak RSS of `phaul serve`, KiB.
    pub phaul_dst_maxrss_kib: Option<u64>,
    /// Every page of the workload verified after the move.
    pub verified: bool,
    /// phaul only: its whole `--json` summary (CRIU's own dump and restore
    /// statistics, passes, bytes), for analysis.
    pub phaul_report: Option<Value>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

/// Paths of the tools and the scratch directories.
pub struct Env {
    bin: PathBuf,
    criu: PathBuf,
    plugins: PathBuf,
    disk: PathBuf,
    shm: PathBuf,
}

/// Free memory (MemAvailable), MiB.
pub fn free_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// A child's exit status and resource usage.
struct Usage {
    ok: bool,
    cpu_ms: f64,
    maxrss_kib: u64,
}

fn wait_usage(pid: u32) -> anyhow::Result<Usage> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Ok(Usage {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        cpu_ms: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss_kib: ru.ru_maxrss as u64,
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    walk(dir)
}

fn walk(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn dump_frozen_ms(dir: &Path) -> f64 {
    phaul_core::criu::stats::read_dump(dir).map_or(0.0, |s| s.frozen_time as f64 / 1e3)
}

fn kill_tree(pid: i32) {
    phaul_core::proc::signal_tree(pid, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..500 {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Env {
    /// Finds the sibling binaries and prepares scratch directories.
    pub fn new(disk: &Path) -> anyhow::Result<Env> {
        let bin = std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no binary directory"))?
            .to_path_buf();
        for b in ["phaul", "phaul-workload", "libphaul_pid.so"] {
            if !bin.join(b).exists() {
                bail!(
                    "{} is missing: build the workspace first (cargo build --release)",
                    bin.join(b).display()
                );
            }
        }
        let plugins = bin.join("bench-plugins");
        std::fs::create_dir_all(&plugins)?;
        std::fs::copy(bin.join("libphaul_pid.so"), plugins.join("libphaul_pid.so"))?;
        let shm = PathBuf::from("/dev/shm/phaul-bench");
        std::fs::create_dir_all(&shm)?;
        std::fs::create_dir_all(disk)?;
        Ok(Env {
            criu: phaul_core::criu::locate(),
            bin,
            plugins,
            disk: disk.to_path_buf(),
            shm,
        })
    }

    fn workload(&self, state: &Path, mem: u64, rate: f64) -> anyhow::Result<i32> {
        let out = Command::new(self.bin.join("phaul-workload"))
            .args(["spawn", "--pidns", "--", "--state-dir"])
            .arg(state)
            .args([
                "--mem-mib",
                &mem.to_string(),
                "--dirty-pct",
                &rate.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!("workload: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    fn report(&self, state: &Path, pid: i32) -> anyhow::Result<Value> {
        let out = Command::new(self.bin.join("phaul-workload"))
            .args(["report", "--state-dir"])
            .arg(state)
            .args(["--pid", &pid.to_string(), "--timeout-ms", "120000"])
            .output()?;
        if !out.status.success() {
            bail!("report: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Runs one migration of a fresh workload with `method`.
    pub fn run(&self, method: Method, mem: u64, rate: f64, run: u32) -> RunResult {
        let mut r = RunResult {
            method: method.name(),
            mem_mib: mem,
            dirty_pct: rate,
            run,
            ..Default::default()
        };
        let state = self.shm.join(format!("state-{}", method.name()));
        let _ = std::fs::remove_dir_all(&state);
        let mut pids = Vec::new();
        let res = (|| -> anyhow::Result<()> {
            let pid = self.workload(&state, mem, rate)?;
            pids.push(pid);
            std::thread::sleep(std::time::Duration::from_millis(300));
            // Resets the workload's gap window: the next report's window
            // covers exactly the migration.
            self.report(&state, pid)?;
            let new = match method {
                Method::Phaul => self.phaul(pid, &mut r)?,
                Method::Naive => self.criu_cli(pid, true, &mut r)?,
                Method::Floor => self.criu_cli(pid, false, &mut r)?,
            };
            pids.push(new);
            let after = self.report(&state, new)?;
            r.downtime_ms = after["window_max_gap_us"].as_u64().unwrap_or(0) as f64 / 1e3;
            r.verified = after["pages_bad"] == 0 && after["pages_verified"] == after["pages"];
            if !r.verified {
                bail!("the workload's memory did not verify after the move: {after}");
            }
            Ok(())
        })();
        if let Err(e) = res {
            r.error = Some(format!("{e:#}"));
        }
        for p in pids {
            kill_tree(p);
        }
        r
    }

    fn phaul(&self, pid: i32, r: &mut RunResult) -> anyhow::Result<i32> {
        let work = self.shm.join("phaul-work");
        let mut serve = Command::new(self.bin.join("phaul"))
            .arg("--plugin-dir")
            .arg(&self.plugins)
            .args([
                "-q",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--once",
                "--work-dir",
            ])
            .arg(&work)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(serve.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_default()
            .to_string();
        let t = Instant::now();
        let migrate = Command::new(self.bin.join("phaul"))
            .arg("--plugin-dir")
            .arg(&self.plugins)
            .args([
                "-q",
                "migrate",
                "pid",
                &pid.to_string(),
                "--to",
                &addr,
                "--json",
                "--work-dir",
            ])
            .arg(&work)
            .stdout(Stdio::piped())
            .spawn()?;
        let mid = migrate.id();
        let mut out = String::new();
        use std::io::Read;
        migrate.stdout.expect("piped").read_to_string(&mut out)?;
        let src = wait_usage(mid)?;
        r.total_ms = t.elapsed().as_secs_f64() * 1e3;
        let dst = wait_usage(serve.id())?;
        let j: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("phaul migrate said: {out}"))?;
        if !src.ok {
            bail!("phaul migrate failed: {j}");
        }
        r.criu_frozen_ms = j["criu_dump"]["frozen_time"].as_u64().unwrap_or(0) as f64 / 1e3;
        r.bytes = j["bytes_on_wire"].as_u64().unwrap_or(0);
        let memwrite_s = j["criu_dump"]["memwrite_time"].as_u64().unwrap_or(0) as f64 / 1e6;
        if memwrite_s > 0.0 {
            r.channel_mib_s = Some(
                j["memory_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64 / memwrite_s,
            );
        }
        let criu_us = j["criu_dump_time_us"].as_u64().unwrap_or(0)
            + j["restore_time_us"].as_u64().unwrap_or(0);
        r.overhead_ms = Some(
            j["total_time_us"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(criu_us) as f64
                / 1e3,
        );
        r.phaul_cpu_ms = Some(src.cpu_ms + dst.cpu_ms);
        r.phaul_src_maxrss_kib = Some(src.maxrss_kib);
        r.phaul_dst_maxrss_kib = Some(dst.maxrss_kib);
        let new = j["destination_pid"].as_i64().unwrap_or(0) as i32;
        r.phaul_report = Some(j);
        Ok(new)
    }

    fn criu_cli(&self, pid: i32, copy: bool, r: &mut RunResult) -> anyhow::Result<i32> {
        let base = if copy {
            self.disk.join("naive")
        } else {
            self.shm.join("floor")
        };
        let _ = std::fs::remove_dir_all(&base);
        let dump = base.join("dump");
        let restore_from = if copy {
            base.join("copy")
        } else {
            dump.clone()
        };
        std::fs::create_dir_all(&dump)?;
        let criu = |args: &[&str], dir: &Path| -> anyhow::Result<()> {
            let out = Command::new(&self.criu)
                .args(args)
                .arg("-D")
                .arg(dir)
                .output()?;
            if !out.status.success() {
                bail!(
                    "criu {}: {}",
                    args[0],
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        let t = Instant::now();
        criu(
            &[
                "dump",
                "-t",
                &pid.to_string(),
                "--network-lock",
                "nftables",
                "-o",
                "dump.log",
            ],
            &dump,
        )?;
        if copy {
            let st = Command::new("cp")
                .arg("-a")
                .arg(&dump)
                .arg(&restore_from)
                .status()?;
            if !st.success() {
                bail!("cp -a failed");
            }
        }
        let pidfile = base.join("restored.pid");
        criu(
            &[
                "restore",
                "-d",
                "-o",
                "restore.log",
                "--pidfile",
                pidfile.to_str().unwrap_or_default(),
            ],
            &restore_from,
        )?;
        r.total_ms = t.elapsed().as_secs_f64() * 1e3;
        r.criu_frozen_ms = dump_frozen_ms(&dump);
        r.bytes = dir_bytes(&dump);
        let new: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
        let _ = std::fs::remove_dir_all(&base);
        Ok(new)
    }
}
