//! The container rows of `phaul-bench`: one LXC container (busybox, the
//! test workload inside with M MiB of memory, 1% of its pages rewritten per
//! second, a 1 ms heartbeat) moved between two lxcpaths on this machine,
//! by phaul and by hand with LXC's own tools, alternately in one run.
//!
//! - `lxc-phaul`: `phaul migrate lxc` (mutual TLS) to a `phaul serve`
//!   running in its own mount namespace whose `/etc/lxc/lxc.conf` names
//!   lxcpath B; the rootfs travels with phaul's file sync (live passes,
//!   then a final one while frozen);
//! - `lxc-checkpoint`: what a user does by hand: `rsync -aHAX` of the
//!   rootfs while it runs, `lxc-checkpoint -s` (dump and stop) into tmpfs,
//!   a final `rsync` of the rootfs, the images copied to the other "host"
//!   as a tar stream over a loopback TCP connection (what `scp` or `tar |
//!   nc` would do between hosts, without encryption), the configuration
//!   copied with its paths rewritten, then `lxc-checkpoint -r` in B.
//!
//! Downtime is the workload's own largest heartbeat gap across the move,
//! as for the process rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::methods::{Env, RunResult};

/// The container's name in both lxcpaths.
const NAME: &str = "phaul-bench";

/// How a container is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LxcMethod {
    /// `phaul migrate lxc`.
    Phaul,
    /// `lxc-checkpoint -s`, copies, `lxc-checkpoint -r`.
    ByHand,
}

impl LxcMethod {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            LxcMethod::Phaul => "lxc-phaul",
            LxcMethod::ByHand => "lxc-checkpoint",
        }
    }
}

/// Whether LXC is installed (the rows are skipped otherwise).
pub fn available() -> bool {
    ["lxc-create", "lxc-checkpoint", "busybox"]
        .iter()
        .all(|t| Path::new("/usr/bin").join(t).exists() || Path::new("/bin").join(t).exists())
}

/// Runs `cmd`, failing with what it printed. Its output goes through a
/// file, not a pipe: a daemon it leaves behind (liblxc's monitor after
/// `lxc-checkpoint -r`) inherits it and would keep a pipe open forever.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let what = format!(
        "{:?} {:?}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>()
    );
    let path = Path::new("/dev/shm/phaul-bench/lxc-command.out");
    let out = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let status = cmd
        .env("PATH", path_with_criu())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        .status()
        .with_context(|| format!("running {what}"))?;
    let mut text = String::new();
    use std::io::{Read, Seek};
    let mut out = out;
    out.seek(std::io::SeekFrom::Start(0))?;
    out.read_to_string(&mut text)?;
    if !status.success() {
        bail!("{what} failed: {}", text.trim());
    }
    Ok(text)
}

/// PATH with phaul's CRIU first (liblxc, runc and podman run the first
/// `criu` on it).
pub(crate) fn path_with_criu() -> String {
    format!(
        "/usr/local/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

fn lxc(tool: &str, lxcpath: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(tool);
    c.arg("-P").arg(lxcpath).args(["-n", NAME]).args(extra);
    c
}

/// The two lxcpaths and B's `/etc/lxc`, under the benchmark's tmpfs.
struct Hosts {
    root: PathBuf,
    a: PathBuf,
    b: PathBuf,
    etc_b: PathBuf,
}

impl Hosts {
    fn new(env: &Env) -> anyhow::Result<Hosts> {
        let root = env.shm.join("lxc");
        let h = Hosts {
            a: root.join("a"),
            b: root.join("b"),
            etc_b: root.join("etc-b"),
            root,
        };
        h.clean();
        let _ = std::fs::remove_dir_all(&h.root);
        for d in [&h.a, &h.b, &h.etc_b] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            h.etc_b.join("lxc.conf"),
            format!("lxc.lxcpath = {}\n", h.b.display()),
        )?;
        Ok(h)
    }

    /// Stops and removes the container on both sides.
    fn clean(&self) {
        for p in [&self.a, &self.b] {
            let _ = run(&mut lxc("lxc-stop", p, &["-k"]));
            let _ = run(&mut lxc("lxc-destroy", p, &[]));
        }
    }

    /// Creates and starts the container in A; returns the workload's pid.
    fn start(&self, env: &Env, mem: u64) -> anyhow::Result<i32> {
        let conf = self.root.join("create.conf");
        std::fs::write(
            &conf,
            "lxc.net.0.type = empty\nlxc.tty.max = 0\nlxc.console.path = none\n",
        )?;
        run(lxc("lxc-create", &self.a, &["-t", "busybox", "-f"]).arg(&conf))?;
        let dir = self.a.join(NAME);
        let config = std::fs::read_to_string(dir.join("config"))?
            .replace("lxc.tty.max = 5", "lxc.tty.max = 0")
            .replace(
                "lxc.mount.entry = /lib lib",
                "lxc.mount.entry = /usr/lib lib",
            )
            .replace(
                "lxc.mount.entry = /lib64 lib64",
                "lxc.mount.entry = /usr/lib64 lib64",
            );
        std::fs::write(dir.join("config"), config)?;
        let rootfs = dir.join("rootfs");
        std::fs::copy(
            env.bin.join("phaul-workload"),
            rootfs.join("bin/phaul-workload"),
        )?;
        std::fs::write(rootfs.join("etc/inittab"), "::sysinit:/etc/init.d/rcS\n")?;
        std::fs::write(
            rootfs.join("etc/init.d/rcS"),
            format!(
                "#!/bin/sh\n/bin/mount -a\nmkdir -p /state\nsetsid /bin/phaul-workload run \
                 --state-dir /state --mem-mib {mem} --dirty-pct 1 </dev/null >/dev/null 2>&1 &\n"
            ),
        )?;
        run(&mut lxc("lxc-start", &self.a, &[]))?;
        let status = rootfs.join("state/status.json");
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(pid) = workload_pid(&self.a) {
                if status.exists() {
                    return Ok(pid);
                }
            }
            if Instant::now() > until {
                bail!("the container's workload did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The host pid of the workload in the container of `lxcpath`.
fn workload_pid(lxcpath: &Path) -> Option<i32> {
    let out = run(&mut lxc("lxc-info", lxcpath, &["-p", "-H"])).ok()?;
    let init: i32 = out.trim().parse().ok()?;
    phaul_core::proc::tree(init).into_iter().find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm"))
            .is_ok_and(|c| c.trim() == "phaul-workload")
    })
}

/// Moves a fresh container with `method` and measures it.
pub fn measure(env: &Env, method: LxcMethod, mem: u64, run_no: u32) -> RunResult {
    let mut r = RunResult {
        method: method.name(),
        mem_mib: mem,
        dirty_pct: 1.0,
        run: run_no,
        ..Default::default()
    };
    let hosts = match Hosts::new(env) {
        Ok(h) => h,
        Err(e) => {
            r.error = Some(format!("{e:#}"));
            return r;
        }
    };
    let res = (|| -> anyhow::Result<()> {
        let pid = hosts.start(env, mem)?;
        let state_a = hosts.a.join(NAME).join("rootfs/state");
        std::thread::sleep(Duration::from_millis(300));
        // Resets the gap window: the next report covers the move.
        let before = env.report(&state_a, pid)?;
        let t = Instant::now();
        match method {
            LxcMethod::Phaul => by_phaul(env, &hosts, &mut r)?,
            LxcMethod::ByHand => by_hand(&hosts, &mut r)?,
        }
        r.total_ms = t.elapsed().as_secs_f64() * 1e3;
        let new = workload_pid(&hosts.b).ok_or_else(|| anyhow!("nothing runs in B"))?;
        r.record_after(
            &before,
            &env.report(&hosts.b.join(NAME).join("rootfs/state"), new)?,
        )
    })();
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    hosts.clean();
    let _ = std::fs::remove_dir_all(&hosts.root);
    r
}

fn by_phaul(env: &Env, h: &Hosts, r: &mut RunResult) -> anyhow::Result<()> {
    let phaul = env.bin.join("phaul");
    let plugins = env.bin.join("bench-plugins-lxc");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(
        env.bin.join("libphaul_lxc.so"),
        plugins.join("libphaul_lxc.so"),
    )?;
    let script = format!(
        "mount --bind '{}' /etc/lxc && exec \"$0\" \"$@\"",
        h.etc_b.display()
    );
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    let dst: Vec<std::ffi::OsString> = vec![
        "--tls-dir".into(),
        env.tls.join("dst").into(),
        "--allow-sync-root".into(),
        h.b.clone().into(),
    ];
    let (mut serve, addr) = env.serve(&phaul, &wrapper, &plugins, &dst)?;
    let out = Command::new(&phaul)
        .arg("--plugin-dir")
        .arg(&plugins)
        .args(["-q", "migrate", "lxc", NAME, "--to", &addr, "--json", "-o"])
        .arg(format!("lxcpath={}", h.a.display()))
        .arg("--work-dir")
        .arg(env.shm.join("phaul-work"))
        .arg("--tls-dir")
        .arg(env.tls.join("src"))
        .env("PATH", path_with_criu())
        .output()?;
    let _ = serve.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let j: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("phaul migrate said: {text}"))?;
    if !out.status.success() {
        bail!("phaul migrate lxc failed: {j}");
    }
    r.criu_frozen_ms = j["criu_dump"]["frozen_time"].as_u64().unwrap_or(0) as f64 / 1e3;
    r.bytes = j["bytes_on_wire"].as_u64().unwrap_or(0);
    r.phaul_report = Some(j);
    Ok(())
}

fn by_hand(h: &Hosts, r: &mut RunResult) -> anyhow::Result<()> {
    let (src, dst) = (h.a.join(NAME), h.b.join(NAME));
    std::fs::create_dir_all(&dst)?;
    let rsync = || {
        run(Command::new("rsync")
            .args(["-aHAX", "--delete"])
            .arg(format!("{}/rootfs/", src.display()))
            .arg(format!("{}/rootfs/", dst.display())))
    };
    rsync()?;
    let images = h.root.join("images");
    let copy = h.root.join("images-copy");
    std::fs::create_dir_all(&images)?;
    let conf = h.root.join("criu.conf");
    std::fs::write(&conf, "network-lock nftables\n")?;
    run(lxc("lxc-checkpoint", &h.a, &["-s", "-D"])
        .arg(&images)
        .env("CRIU_CONFIG_FILE", &conf))?;
    rsync()?;
    copy_over_tcp(&images, &copy)?;
    let config = std::fs::read_to_string(src.join("config"))?.replace(
        src.to_str().unwrap_or_default(),
        dst.to_str().unwrap_or_default(),
    );
    std::fs::write(dst.join("config"), config)?;
    run(lxc("lxc-checkpoint", &h.b, &["-r", "-D"])
        .arg(&copy)
        .env("CRIU_CONFIG_FILE", &conf))?;
    r.criu_frozen_ms = crate::methods::dump_frozen_ms(&images);
    r.bytes = crate::methods::dir_bytes(&images);
    Ok(())
}

/// Copies directory `from` to `to` as `tar c | TCP (loopback) | tar x`.
fn copy_over_tcp(from: &Path, to: &Path) -> anyhow::Result<()> {
    copy_over_tcp_with(from, to, &[])
}

/// [`copy_over_tcp`] with `tar_args` (e.g. `--xattrs`) given to both tars.
pub(crate) fn copy_over_tcp_with(from: &Path, to: &Path, tar_args: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let args: Vec<String> = tar_args.iter().map(|a| a.to_string()).collect();
    let untar_args = args.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let to = to.to_path_buf();
    let receiver = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut untar = Command::new("tar")
            .arg("x")
            .args(&untar_args)
            .arg("-C")
            .arg(&to)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let copied = std::io::copy(&mut conn, untar.stdin.as_mut().expect("piped"));
        drop(untar.stdin.take());
        let out = untar.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "tar x failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        copied?;
        Ok(())
    });
    let mut tar = Command::new("tar")
        .arg("c")
        .args(&args)
        .arg("-C")
        .arg(from)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut conn = std::net::TcpStream::connect(addr)?;
    let sent = std::io::copy(tar.stdout.as_mut().expect("piped"), &mut conn);
    drop(conn);
    let tar_ok = tar.wait()?.success();
    // The receiver's failure explains a sender's broken pipe: first.
    receiver
        .join()
        .map_err(|_| anyhow!("the receiving thread panicked"))?
        .context("receiving the images")?;
    sent.context("sending the images")?;
    if !tar_ok {
        bail!("tar c failed");
    }
    Ok(())
}
