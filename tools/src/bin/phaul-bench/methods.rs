//! The ways of moving the workload, each timed and checked: phaul over
//! loopback with mutual TLS (its default) and with `--insecure` (plain TCP,
//! CRIU gets the socket itself), dump-copy-restore with the CRIU command
//! line, and the no-copy floor.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::Value;

/// A migration method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// phaul serve + phaul migrate over loopback, mutual TLS (certificates
    /// made by `phaul certs` for this run).
    Phaul,
    /// The same with `--insecure` on both sides: plain TCP, the memory
    /// socket handed to CRIU without a relay.
    PhaulInsecure,
    /// `phaul` (TLS) from another build (`--baseline DIR`).
    PhaulBaseline,
    /// `phaul` (TLS) with `--post-copy --pre-copy=none`: the workload
    /// runs on the destination after a short pause, all its memory
    /// following.
    PhaulPostCopy,
    /// `phaul` (TLS) with `--pre-copy=uffd`: userfaultfd write-protect
    /// pre-copy passes while the workload runs, then post-copy of the
    /// last dirty set.
    PhaulUffd,
    /// criu dump to disk, cp -a, criu restore.
    Naive,
    /// criu dump to tmpfs, criu restore from it.
    Floor,
    /// A Docker container, Docker's own way between two engines:
    /// `docker checkpoint create`, the checkpoint and the writable layer
    /// copied, `docker start --checkpoint` (see [`crate::docker`]).
    DockerEngine,
    /// A Podman container: `podman container checkpoint --export` and
    /// `restore --import` on this host.
    Podman,
    /// A Docker container moved by `phaul migrate docker` between two
    /// engines.
    PhaulDocker,
}

impl Method {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Phaul => "phaul",
            Method::PhaulInsecure => "phaul-insecure",
            Method::PhaulBaseline => "phaul-baseline",
            Method::PhaulPostCopy => "phaul-post-copy",
            Method::PhaulUffd => "phaul-uffd",
            Method::Naive => "naive",
            Method::Floor => "floor",
            Method::DockerEngine => "docker-engine",
            Method::Podman => "podman",
            Method::PhaulDocker => "phaul-docker",
        }
    }

    /// Whether it moves a container ([`crate::docker`]) rather than the
    /// process workload: such methods run once per size, at their own
    /// dirtying rate, not for every `--rates`.
    pub fn is_container(self) -> bool {
        matches!(
            self,
            Method::DockerEngine | Method::Podman | Method::PhaulDocker
        )
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
    /// phaul only: the memory moved over CRIU's whole final dump (request
    /// to `post-dump`: freezing, collecting and writing the pages), MiB/s.
    pub dump_mib_s: Option<f64>,
    /// phaul only: user+system CPU of `phaul migrate` and `phaul serve`.
    pub phaul_cpu_ms: Option<f64>,
    /// phaul only: peak RSS of the `phaul migrate` process itself (its
    /// VmHWM, sampled every 5 ms until it exits), KiB.
    pub phaul_src_hwm_kib: Option<u64>,
    /// phaul only: the same for `phaul serve`, KiB.
    pub phaul_dst_hwm_kib: Option<u64>,
    /// phaul only: `ru_maxrss` of `phaul migrate` from `wait4`: the largest
    /// peak of it and the children it reaped (its CRIU workers), KiB.
    pub phaul_src_maxrss_kib: Option<u64>,
    /// phaul only: the same for `phaul serve`, KiB.
    pub phaul_dst_maxrss_kib: Option<u64>,
    /// Every page of the workload verified after the move.
    pub verified: bool,
    /// Post-copy only: from the switch until the last page arrived.
    pub last_page_ms: Option<f64>,
    /// Post-copy only: bytes of memory the source sent after the switch.
    pub after_switch_bytes: Option<u64>,
    /// Userfaultfd pre-copy only: pages the last scan found written since
    /// the last pass (the dirty set left to follow).
    pub last_dirty_pages: Option<u64>,
    /// Heartbeat gaps over 10 ms the workload saw during the migration
    /// (the pause itself is one; with post-copy, the rest are faults on
    /// pages that had not arrived yet).
    pub gaps_over_10ms: u64,
    /// phaul only: its whole `--json` summary (CRIU's own dump and restore
    /// statistics, passes, bytes), for analysis.
    pub phaul_report: Option<Value>,
    /// Container rows only: the wall time of each step of the move, ms
    /// (e.g. `checkpoint`, `copy`, `restore`, and the runtime's or CRIU's
    /// own figures where it reports them).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub steps_ms: BTreeMap<&'static str, f64>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

impl RunResult {
    /// Records the workload's report after the move: the largest
    /// heartbeat gap it saw, and whether every page verified (an error if
    /// not).
    pub(crate) fn record_after(&mut self, before: &Value, after: &Value) -> anyhow::Result<()> {
        self.downtime_ms = after["window_max_gap_us"].as_u64().unwrap_or(0) as f64 / 1e3;
        let gaps = |v: &Value| v["gaps_over_10ms"].as_u64().unwrap_or(0);
        self.gaps_over_10ms = gaps(after).saturating_sub(gaps(before));
        self.verified = after["pages_bad"] == 0 && after["pages_verified"] == after["pages"];
        if !self.verified {
            bail!("the workload's memory did not verify after the move: {after}");
        }
        Ok(())
    }
}

/// Paths of the tools and the scratch directories.
pub struct Env {
    pub(crate) bin: PathBuf,
    criu: PathBuf,
    plugins: PathBuf,
    disk: PathBuf,
    pub(crate) shm: PathBuf,
    /// The certificates of this run (`phaul certs`): `src/` and `dst/`,
    /// each a `--tls-dir`.
    pub(crate) tls: PathBuf,
    /// Another build's `phaul` (`--baseline`).
    baseline: Option<PathBuf>,
    /// `--link-mbit`: the service runs in [`LINK_NS`].
    link: bool,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tls);
        if self.link {
            // Its end of the veth pair goes with it.
            let _ = ip(&["netns", "del", LINK_NS]);
        }
    }
}

/// Free memory (MemAvailable), MiB.
pub fn free_memory_mib() -> u64 {
    phaul_core::proc::mem_available() >> 20
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

/// Waits until our child `pid` has exited, leaving it a zombie (so its pid
/// cannot be reused while the sampler still looks at it); SIGKILLs it if it
/// is still there after `timeout`.
fn wait_exited(pid: u32, timeout: std::time::Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: zeroed siginfo is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: looking at our own child, without reaping it.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                bail!("waitid: {e}");
            }
        // SAFETY: filled in by waitid; 0 while the child still runs.
        } else if unsafe { info.si_pid() } != 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A process's own peak resident memory so far (VmHWM), KiB; None once
/// it has exited (a zombie has no memory).
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples the VmHWM of a few child processes every 5 ms until stopped:
/// their own peak memory (`wait4`'s `ru_maxrss` also covers the children
/// they reaped, CRIU's workers among them). The kernel keeps the peak, so
/// only growth in the last 5 ms before an exit can be missed.
struct HwmSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl HwmSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            loop {
                let last = flag.load(std::sync::atomic::Ordering::Relaxed);
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    if let Some(k) = vm_hwm_kib(*pid) {
                        *p = (*p).max(k);
                    }
                }
                if last {
                    return peak;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        Self { stop, thread }
    }

    /// The peaks, in the order of the pids; call while the processes are
    /// still unreaped.
    fn finish(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

pub(crate) fn dir_bytes(dir: &Path) -> u64 {
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

pub(crate) fn dump_frozen_ms(dir: &Path) -> f64 {
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

/// A CA and two host certificates for this run, made with `phaul certs`
/// as an operator would: `dir/src` for `phaul migrate`, `dir/dst` (valid
/// for 127.0.0.1) for `phaul serve`.
fn make_certs(phaul: &Path, dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let ca = dir.join("ca");
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
        let out = Command::new(phaul).arg("certs").args(args).output()?;
        if !out.status.success() {
            bail!(
                "phaul certs {:?}: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    run(&["init".as_ref(), "--dir".as_ref(), ca.as_os_str()])?;
    for (name, also) in [("src", "localhost"), ("dst", "127.0.0.1")] {
        let out = dir.join(name);
        run(&[
            "issue".as_ref(),
            "--dir".as_ref(),
            ca.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--also".as_ref(),
            also.as_ref(),
            "--also".as_ref(),
            LINK_DST.as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ])?;
    }
    Ok(())
}

/// `--link-mbit`: the destination's network namespace.
pub const LINK_NS: &str = "phaul-bench-dst";
const LINK_SRC: &str = "10.203.0.1";
const LINK_DST: &str = "10.203.0.2";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tbf(netns: Option<&str>, dev: &str, mbit: u64) -> anyhow::Result<()> {
    let rate = format!("{mbit}mbit");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => Command::new("tc"),
    };
    let out = cmd
        .args(["qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate])
        .args(["burst", "256kb", "latency", "50ms"])
        .output()?;
    if !out.status.success() {
        bail!(
            "tc on {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Env {
    /// `--link-mbit`: a network namespace for the destination service,
    /// joined by a veth pair whose ends are each limited to `mbit`.
    pub fn set_link(&mut self, mbit: u64) -> anyhow::Result<()> {
        let _ = ip(&["netns", "del", LINK_NS]);
        ip(&["netns", "add", LINK_NS])?;
        self.link = true;
        ip(&[
            "link", "add", "pb-src", "type", "veth", "peer", "name", "pb-dst",
        ])?;
        ip(&["link", "set", "pb-dst", "netns", LINK_NS])?;
        ip(&["addr", "add", &format!("{LINK_SRC}/30"), "dev", "pb-src"])?;
        ip(&["link", "set", "pb-src", "up"])?;
        let ns = |a: &[&str]| {
            let mut v = vec!["netns", "exec", LINK_NS, "ip"];
            v.extend_from_slice(a);
            ip(&v)
        };
        ns(&["addr", "add", &format!("{LINK_DST}/30"), "dev", "pb-dst"])?;
        ns(&["link", "set", "pb-dst", "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        tbf(None, "pb-src", mbit)?;
        tbf(Some(LINK_NS), "pb-dst", mbit)?;
        Ok(())
    }

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
        let tls = shm.join(format!("tls-{}", std::process::id()));
        make_certs(&bin.join("phaul"), &tls)?;
        Ok(Env {
            criu: phaul_core::criu::locate(),
            bin,
            plugins,
            disk: disk.to_path_buf(),
            shm,
            tls,
            baseline: None,
            link: false,
        })
    }

    /// Uses `dir/phaul` for the `phaul-baseline` method.
    pub fn set_baseline(&mut self, dir: &Path) -> anyhow::Result<()> {
        let phaul = dir.join("phaul");
        if !phaul.exists() {
            bail!("{} is missing", phaul.display());
        }
        self.baseline = Some(phaul);
        Ok(())
    }

    /// The certificates' directory (`ca/`, `src/`, `dst/`).
    pub fn tls_dir(&self) -> &Path {
        &self.tls
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

    pub(crate) fn report(&self, state: &Path, pid: i32) -> anyhow::Result<Value> {
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
            let before = self.report(&state, pid)?;
            let phaul = self.bin.join("phaul");
            let new = match method {
                Method::Phaul => self.phaul(pid, &phaul, true, &[], &mut r)?,
                Method::PhaulInsecure => self.phaul(pid, &phaul, false, &[], &mut r)?,
                Method::PhaulPostCopy => {
                    let plain = ["--post-copy", "--pre-copy=none"];
                    self.phaul(pid, &phaul, true, &plain, &mut r)?
                }
                Method::PhaulUffd => self.phaul(pid, &phaul, true, &["--pre-copy=uffd"], &mut r)?,
                Method::PhaulBaseline => {
                    let phaul = self
                        .baseline
                        .clone()
                        .ok_or_else(|| anyhow!("phaul-baseline needs --baseline DIR"))?;
                    self.phaul(pid, &phaul, true, &[], &mut r)?
                }
                Method::Naive => self.criu_cli(pid, true, &mut r)?,
                Method::Floor => self.criu_cli(pid, false, &mut r)?,
                Method::DockerEngine | Method::Podman | Method::PhaulDocker => {
                    bail!(
                        "{} moves a container: docker::measure runs it",
                        method.name()
                    )
                }
            };
            pids.push(new);
            r.record_after(&before, &self.report(&state, new)?)
        })();
        if let Err(e) = res {
            r.error = Some(format!("{e:#}"));
        }
        for p in pids {
            kill_tree(p);
        }
        r
    }

    /// `phaul serve` + `phaul migrate`, with TLS (`secure`) or
    /// `--insecure` on both sides, and `extra` migrate arguments.
    fn phaul(
        &self,
        pid: i32,
        phaul: &Path,
        secure: bool,
        extra: &[&str],
        r: &mut RunResult,
    ) -> anyhow::Result<i32> {
        let work = self.shm.join("phaul-work");
        let security = |side: &str| -> Vec<std::ffi::OsString> {
            match secure {
                true => vec!["--tls-dir".into(), self.tls.join(side).into()],
                false => vec!["--insecure".into()],
            }
        };
        let (serve, addr) = self.serve(phaul, &[], &self.plugins, &security("dst"))?;
        let t = Instant::now();
        let migrate = Command::new(phaul)
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
            .args(security("src"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()?;
        let mid = migrate.id();
        let hwm = HwmSampler::start(vec![mid, serve.id()]);
        let mut out = String::new();
        use std::io::Read;
        migrate.stdout.expect("piped").read_to_string(&mut out)?;
        wait_exited(mid, std::time::Duration::from_secs(600))?;
        r.total_ms = t.elapsed().as_secs_f64() * 1e3;
        wait_exited(serve.id(), std::time::Duration::from_secs(30))?;
        let peaks = hwm.finish();
        let src = wait_usage(mid)?;
        let dst = wait_usage(serve.id())?;
        r.phaul_src_hwm_kib = peaks.first().copied();
        r.phaul_dst_hwm_kib = peaks.get(1).copied();
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
        let dump_s = j["criu_dump_time_us"].as_u64().unwrap_or(0) as f64 / 1e6;
        if dump_s > 0.0 {
            r.dump_mib_s =
                Some(j["memory_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64 / dump_s);
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
        r.last_page_ms = j["post_copy"]["time_to_last_page_us"]
            .as_u64()
            .map(|us| us as f64 / 1e3);
        r.after_switch_bytes = j["post_copy"]["pages_served"].as_u64().map(|p| p * 4096);
        r.last_dirty_pages = j["iterations"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["kind"] == "uffd-last"))
            .and_then(|p| p["pages_written"].as_u64());
        let new = j["destination_pid"].as_i64().unwrap_or(0) as i32;
        r.phaul_report = Some(j);
        Ok(new)
    }

    /// Starts `phaul serve --once` on a free loopback port (under
    /// `wrapper`, e.g. `unshare -m ...`, if not empty) and returns it with
    /// its address.
    pub(crate) fn serve(
        &self,
        phaul: &Path,
        wrapper: &[&str],
        plugins: &Path,
        extra: &[std::ffi::OsString],
    ) -> anyhow::Result<(std::process::Child, String)> {
        let in_ns = ["ip", "netns", "exec", LINK_NS];
        let wrapper = match (self.link, wrapper.is_empty()) {
            (true, true) => &in_ns[..],
            _ => wrapper,
        };
        let listen = match self.link && wrapper == &in_ns[..] {
            true => format!("{LINK_DST}:0"),
            false => "127.0.0.1:0".to_string(),
        };
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(phaul);
                c
            }
            None => Command::new(phaul),
        };
        let mut serve = cmd
            .arg("--plugin-dir")
            .arg(plugins)
            .args(["-q", "serve", "--listen", &listen, "--once", "--work-dir"])
            .arg(self.shm.join("phaul-work"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(serve.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_default()
            .to_string();
        if addr.is_empty() {
            let _ = serve.kill();
            let _ = serve.wait();
            bail!("phaul serve did not start");
        }
        Ok((serve, addr))
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
