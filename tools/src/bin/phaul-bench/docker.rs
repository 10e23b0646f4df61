//! The Docker rows of `phaul-bench`: one container (a busybox-static rootfs
//! with the test workload and the shared libraries it needs, `docker
//! import`ed; M MiB of memory, 5% of its pages rewritten per second, a 1 ms
//! heartbeat) moved with each method in turn:
//!
//! - `docker-engine`: Docker's own path between two engines on this machine
//!   (`scripts/docker-engines.sh`: `bencha` and `benchb`), done by hand as
//!   ../shared/LAB.md describes it: the container created on B first (same
//!   image and command, so the same mount destinations), `docker checkpoint
//!   create` on A, A's checkpoint directory and the container's writable
//!   layer (UpperDir) copied into B's, each as a tar stream over a loopback
//!   TCP connection (the copy to the other host, unencrypted), then `docker
//!   start --checkpoint` on B. The copies containerd leaves in
//!   `/tmp/ctrd-checkpoint*` are removed (only those of these engines that
//!   appeared during the run);
//! - `podman`: `podman container checkpoint --export` and `podman container
//!   restore --import` on this one host (nothing copied: a lower bound for a
//!   move between hosts), its image `podman import`ed from the same rootfs;
//! - `phaul-docker`: `phaul migrate docker` (mutual TLS) from engine A to a
//!   `phaul serve` whose `DOCKER_HOST` is engine B.
//!
//! Downtime is the workload's own largest heartbeat gap across the move (its
//! status file is in the container's writable layer, read through the
//! host's view of the merged rootfs), as for the process rows; total is the
//! wall time from the move's first step until the container runs on the
//! destination. A method that fails is recorded as failed, the others run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use crate::lxc::{copy_over_tcp_with, path_with_criu};
use crate::methods::{dir_bytes, Env, Method, RunResult};

/// The workload's dirtying rate in every Docker row, % of pages per second.
pub const DIRTY_PCT: f64 = 5.0;
/// The container's name on every engine.
const NAME: &str = "phaul-bench";
/// Podman's name for the restored copy (the exited source keeps `NAME`).
const NAME_RESTORED: &str = "phaul-bench-restored";
const IMAGE: &str = "phaul-bench:workload";
const CHECKPOINT: &str = "cp";
/// The two engines: name and bridge subnet octet (10.204.OCTET.0/24).
const ENGINES: [(&str, u8); 2] = [("bencha", 41), ("benchb", 42)];
/// What these engines' cgroup parents and data roots are called: how
/// containerd's leftovers are recognised as ours.
const ENGINE_MARK: &[u8] = b"phaul-docker-bench";
const PODMAN_ARGS: [&str; 2] = ["--cgroup-manager=cgroupfs", "--events-backend=file"];
/// The defaults fail here with `error setting rlimit type 7`.
const PODMAN_ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn workload_command(mem: u64) -> Vec<String> {
    [
        "/bin/phaul-workload",
        "run",
        "--state-dir",
        "/data/state",
        "--mem-mib",
        &mem.to_string(),
        "--dirty-pct",
        &DIRTY_PCT.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Runs `cmd` with phaul's CRIU first on PATH (runc and podman run the
/// first `criu` there) and returns its stdout; fails with its stderr. The
/// output goes through files, not pipes: podman leaves `conmon` behind,
/// which would keep a pipe open.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let what = format!(
        "{:?} {:?}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>()
    );
    let dir = Path::new("/dev/shm/phaul-bench");
    let file = |name: &str| {
        std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join(name))
    };
    let (out, err) = (file("docker-command.out")?, file("docker-command.err")?);
    let status = cmd
        .env("PATH", path_with_criu())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .status()
        .with_context(|| format!("running {what}"))?;
    let read = |mut f: std::fs::File| -> anyhow::Result<String> {
        use std::io::{Read, Seek};
        let mut text = String::new();
        f.seek(std::io::SeekFrom::Start(0))?;
        f.read_to_string(&mut text)?;
        Ok(text)
    };
    let (out, err) = (read(out)?, read(err)?);
    if !status.success() {
        bail!("{what} failed: {} {}", err.trim(), out.trim());
    }
    Ok(out)
}

/// The JSON object in a command's output (podman's `--print-stats`).
fn json_in(text: &str) -> anyhow::Result<Value> {
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in {text:?}"))?;
    serde_json::from_str(&text[start..]).with_context(|| format!("parsing {text:?}"))
}

/// A container runtime's command line: `docker -H HOST` or `podman ...`.
#[derive(Clone, Copy)]
enum Cli<'a> {
    Docker(&'a Engine),
    Podman,
}

impl Cli<'_> {
    fn command(self) -> Command {
        match self {
            Cli::Docker(e) => {
                let mut c = Command::new("docker");
                c.arg("-H").arg(&e.host);
                c
            }
            Cli::Podman => {
                let mut c = Command::new("podman");
                c.args(PODMAN_ARGS);
                c
            }
        }
    }

    fn run(self, args: &[&str]) -> anyhow::Result<String> {
        Ok(run(self.command().args(args))?.trim().to_string())
    }

    /// Removes a container if it is there.
    fn remove(self, name: &str) {
        let _ = self.run(&["rm", "-f", name]);
    }

    /// Removes every container (on the benchmark's own engines only).
    fn remove_all(self) {
        if let Ok(ids) = self.run(&["ps", "-aq"]) {
            for id in ids.split_whitespace() {
                self.remove(id);
            }
        }
    }

    /// A container's id, host pid (0 unless running), merged rootfs and
    /// writable layer.
    fn inspect(self, name: &str) -> anyhow::Result<Container> {
        let fmt = "{{.Id}} {{.State.Pid}} {{.GraphDriver.Data.MergedDir}} \
                   {{.GraphDriver.Data.UpperDir}}";
        let out = self.run(&["inspect", "--format", fmt, name])?;
        let f: Vec<&str> = out.split_whitespace().collect();
        let [id, pid, merged, upper] = f[..] else {
            bail!("unexpected inspect output for {name}: {out}");
        };
        Ok(Container {
            id: id.to_string(),
            pid: pid.parse().unwrap_or(0),
            state: Path::new(merged).join("data/state"),
            upper: PathBuf::from(upper),
        })
    }

    /// Waits until `name` runs and its workload has written its first
    /// status (only then does it handle the report signal).
    fn wait_ready(self, name: &str) -> anyhow::Result<Container> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let c = self.inspect(name);
            if let Ok(c) = &c {
                if c.pid > 0 && c.state.join("status.json").exists() {
                    return Ok(c.clone());
                }
            }
            if Instant::now() > until {
                bail!("the workload in {name} did not start: {c:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A container as the host sees it.
#[derive(Debug, Clone)]
struct Container {
    id: String,
    pid: i32,
    /// The workload's state directory through the merged rootfs.
    state: PathBuf,
    /// The writable layer.
    upper: PathBuf,
}

/// One of the two engines.
struct Engine {
    name: &'static str,
    /// Its API socket's path.
    sock: PathBuf,
    /// `unix://` + the socket.
    host: String,
    /// `DockerRootDir`.
    root: PathBuf,
}

/// `scripts/docker-engines.sh`, next to the build or in the source tree.
fn engines_script(env: &Env) -> PathBuf {
    let near = env.bin.join("../../scripts/docker-engines.sh");
    if near.exists() {
        return near;
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/docker-engines.sh"
    ))
}

/// What the Docker rows share: the engines and images, set up once.
pub struct Docker {
    dir: PathBuf,
    script: PathBuf,
    /// A and B, when a method needs them (the error if they failed).
    engines: Option<Result<[Engine; 2], String>>,
    /// Whether the podman image is there (the error if not).
    podman: Option<Result<(), String>>,
    /// containerd's checkpoint copies that were there before us.
    ctrd_before: HashSet<PathBuf>,
}

fn ctrd_copies() -> HashSet<PathBuf> {
    std::fs::read_dir("/tmp").map_or_else(
        |_| HashSet::new(),
        |d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("ctrd-checkpoint")
                })
                .map(|e| e.path())
                .collect()
        },
    )
}

/// Whether a containerd checkpoint copy holds images of our engines'
/// containers (their cgroup paths and mounts name the engines).
fn is_ours(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        (name == "cgroup.img" || name.starts_with("mountpoints-"))
            && std::fs::read(e.path())
                .is_ok_and(|b| b.windows(ENGINE_MARK.len()).any(|w| w == ENGINE_MARK))
    })
}

impl Docker {
    /// Builds the image and starts what `methods` need; a part that fails
    /// fails only the rows that need it.
    pub fn setup(env: &Env, methods: &[Method]) -> Docker {
        let dir = env.shm.join("docker");
        let mut d = Docker {
            dir: dir.clone(),
            script: engines_script(env),
            engines: None,
            podman: None,
            ctrd_before: ctrd_copies(),
        };
        let tar = rootfs_tar(env, &dir);
        let needs_engines = methods
            .iter()
            .any(|m| matches!(m, Method::DockerEngine | Method::PhaulDocker));
        if needs_engines {
            let engines = match &tar {
                Ok(tar) => d.start_engines(tar),
                Err(e) => Err(anyhow!("building the image: {e:#}")),
            };
            d.engines = Some(engines.map_err(|e| format!("{e:#}")));
        }
        if methods.contains(&Method::Podman) {
            let podman = match &tar {
                Ok(tar) => podman_image(tar),
                Err(e) => Err(anyhow!("building the image: {e:#}")),
            };
            d.podman = Some(podman.map_err(|e| format!("{e:#}")));
        }
        d
    }

    fn start_engines(&self, tar: &Path) -> anyhow::Result<[Engine; 2]> {
        let start = |(name, octet): (&'static str, u8)| -> anyhow::Result<Engine> {
            let out = run(Command::new(&self.script)
                .args(["start", name])
                .arg(octet.to_string()))?;
            let sock = PathBuf::from(out.trim());
            let host = format!("unix://{}", sock.display());
            let mut e = Engine {
                name,
                sock,
                host,
                root: PathBuf::new(),
            };
            e.root =
                PathBuf::from(Cli::Docker(&e).run(&["info", "--format", "{{.DockerRootDir}}"])?);
            Ok(e)
        };
        let [a, b] = ENGINES;
        let (a, b) = (start(a)?, start(b)?);
        Cli::Docker(&a).run(&["import", &tar.to_string_lossy(), IMAGE])?;
        // docker save | docker -H B load: the same image id on both.
        let mut save = Cli::Docker(&a)
            .command()
            .args(["save", IMAGE])
            .stdout(Stdio::piped())
            .spawn()?;
        let load = Cli::Docker(&b)
            .command()
            .arg("load")
            .stdin(save.stdout.take().expect("piped"))
            .output()?;
        let saved = save.wait()?;
        if !saved.success() || !load.status.success() {
            bail!(
                "docker save | docker load: {}",
                String::from_utf8_lossy(&load.stderr).trim()
            );
        }
        Ok([a, b])
    }

    fn engines(&self) -> anyhow::Result<&[Engine; 2]> {
        match &self.engines {
            Some(Ok(e)) => Ok(e),
            Some(Err(e)) => bail!("the two Docker engines: {e}"),
            None => bail!("the Docker engines were not started"),
        }
    }

    /// Moves a fresh container with `method` and measures it.
    pub fn measure(&self, env: &Env, method: Method, mem: u64, run_no: u32) -> RunResult {
        let mut r = RunResult {
            method: method.name(),
            mem_mib: mem,
            dirty_pct: DIRTY_PCT,
            run: run_no,
            ..Default::default()
        };
        let res = match method {
            Method::DockerEngine => self
                .engines()
                .and_then(|[a, b]| by_engine(env, a, b, mem, &mut r)),
            Method::PhaulDocker => self
                .engines()
                .and_then(|[a, b]| by_phaul(env, a, b, mem, &mut r)),
            Method::Podman => match &self.podman {
                Some(Ok(())) => by_podman(env, &self.dir, mem, &mut r),
                Some(Err(e)) => Err(anyhow!("podman: {e}")),
                None => Err(anyhow!("podman was not set up")),
            },
            _ => Err(anyhow!("{} is not a container method", method.name())),
        };
        if let Err(e) = res {
            r.error = Some(format!("{e:#}"));
        }
        if let Ok(engines) = self.engines() {
            for e in engines {
                Cli::Docker(e).remove_all();
            }
        }
        if method == Method::Podman {
            Cli::Podman.remove(NAME);
            Cli::Podman.remove(NAME_RESTORED);
        }
        self.remove_ctrd_copies();
        r
    }

    /// Removes the `/tmp/ctrd-checkpoint*` copies of our engines'
    /// checkpoints that containerd left during this run (containerd issue
    /// #10166); others' are left alone.
    fn remove_ctrd_copies(&self) {
        for d in ctrd_copies() {
            if !self.ctrd_before.contains(&d) && is_ours(&d) {
                let _ = std::fs::remove_dir_all(&d);
            }
        }
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if self.engines.is_some() {
            // Their containers, images and checkpoints go with them.
            for (name, _) in ENGINES {
                let _ = run(Command::new(&self.script).args(["purge", name]));
            }
        }
        if self.podman.is_some() {
            Cli::Podman.remove(NAME);
            Cli::Podman.remove(NAME_RESTORED);
            let _ = Cli::Podman.run(&["rmi", "-f", &format!("localhost/{IMAGE}")]);
        }
        self.remove_ctrd_copies();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The image's rootfs as a tar: busybox (static) with a few applets,
/// `phaul-workload` and the shared libraries `ldd` lists for it.
fn rootfs_tar(env: &Env, dir: &Path) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    let root = dir.join("rootfs");
    for d in ["bin", "data/state", "dev", "etc", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("busybox is missing (apt-get install busybox-static)"))?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    for applet in ["sh", "ls", "cat", "mkdir", "ps", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let workload = env.bin.join("phaul-workload");
    std::fs::copy(&workload, root.join("bin/phaul-workload"))?;
    let ldd = Command::new("ldd").arg(&workload).output()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("a file in a directory"))?;
        // Follows the host's symlinks: the library itself lands there.
        std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
    }
    let tar = dir.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("c")
        .arg("-C")
        .arg(&root)
        .arg("-f")
        .arg(&tar)
        .arg(".")
        .status()?;
    if !st.success() {
        bail!("tar of the rootfs failed");
    }
    Ok(tar)
}

fn podman_image(tar: &Path) -> anyhow::Result<()> {
    Cli::Podman.run(&["import", &tar.to_string_lossy(), IMAGE])?;
    Ok(())
}

/// Starts the workload's container on engine `a`.
fn start_on(a: &Engine, mem: u64) -> anyhow::Result<Container> {
    let cli = Cli::Docker(a);
    cli.remove(NAME);
    let cmd = workload_command(mem);
    let mut args = vec!["run", "-d", "--name", NAME, IMAGE];
    args.extend(cmd.iter().map(String::as_str));
    cli.run(&args)?;
    cli.wait_ready(NAME)
}

/// Settles the workload and takes the report whose window the move's gap
/// falls into.
fn settle(env: &Env, c: &Container) -> anyhow::Result<Value> {
    std::thread::sleep(Duration::from_millis(300));
    env.report(&c.state, c.pid)
}

fn by_engine(env: &Env, a: &Engine, b: &Engine, mem: u64, r: &mut RunResult) -> anyhow::Result<()> {
    let (ca, cb) = (Cli::Docker(a), Cli::Docker(b));
    cb.remove(NAME);
    let src = start_on(a, mem)?;
    let before = settle(env, &src)?;
    let t = Instant::now();
    // B's container first, while A still runs: same image and command,
    // hence the same mount destinations for runc to map.
    let step = Instant::now();
    let cmd = workload_command(mem);
    let mut args = vec!["create", "--name", NAME, IMAGE];
    args.extend(cmd.iter().map(String::as_str));
    cb.run(&args)?;
    let dst = cb.inspect(NAME)?;
    r.steps_ms.insert("prepare", ms(step));
    let step = Instant::now();
    ca.run(&["checkpoint", "create", NAME, CHECKPOINT])?;
    r.steps_ms.insert("checkpoint", ms(step));
    let step = Instant::now();
    let checkpoints = |e: &Engine, id: &str| e.root.join("containers").join(id).join("checkpoints");
    let cp_a = checkpoints(a, &src.id).join(CHECKPOINT);
    copy_over_tcp_with(&cp_a, &checkpoints(b, &dst.id).join(CHECKPOINT), &[])
        .context("copying the checkpoint")?;
    copy_over_tcp_with(
        &src.upper,
        &dst.upper,
        &["--xattrs", "--xattrs-include=*", "--numeric-owner"],
    )
    .context("copying the writable layer")?;
    r.steps_ms.insert("copy", ms(step));
    let step = Instant::now();
    cb.run(&["start", "--checkpoint", CHECKPOINT, NAME])?;
    r.steps_ms.insert("restore", ms(step));
    r.total_ms = ms(t);
    r.bytes = dir_bytes(&cp_a) + dir_bytes(&src.upper);
    // runc's restore work directory keeps CRIU's statistics.
    let task = b
        .root
        .join("containerd/daemon/io.containerd.runtime.v2.task/moby")
        .join(&dst.id);
    if let Ok(s) = phaul_core::criu::stats::read_restore(&task) {
        r.steps_ms
            .insert("criu_restore", s.restore_time as f64 / 1e3);
    }
    let moved = cb.wait_ready(NAME)?;
    r.record_after(&before, &env.report(&moved.state, moved.pid)?)
}

fn by_podman(env: &Env, dir: &Path, mem: u64, r: &mut RunResult) -> anyhow::Result<()> {
    let p = Cli::Podman;
    p.remove(NAME);
    p.remove(NAME_RESTORED);
    let image = format!("localhost/{IMAGE}");
    let cmd = workload_command(mem);
    let mut args = vec!["run", "-d", "--name", NAME];
    args.extend(PODMAN_ULIMITS);
    args.push(&image);
    args.extend(cmd.iter().map(String::as_str));
    p.run(&args)?;
    let src = p.wait_ready(NAME)?;
    let before = settle(env, &src)?;
    let export = dir.join("podman-checkpoint.tar.zst");
    let _ = std::fs::remove_file(&export);
    let export_s = export.to_string_lossy();
    let t = Instant::now();
    let step = Instant::now();
    let out = p.run(&[
        "container",
        "checkpoint",
        "--export",
        &export_s,
        "--print-stats",
        NAME,
    ])?;
    r.steps_ms.insert("checkpoint", ms(step));
    let dump = json_in(&out)?;
    let step = Instant::now();
    let out = p.run(&[
        "container",
        "restore",
        "--import",
        &export_s,
        "--name",
        NAME_RESTORED,
        "--print-stats",
    ])?;
    r.steps_ms.insert("restore", ms(step));
    r.total_ms = ms(t);
    let restore = json_in(&out)?;
    let criu = |j: &Value, field: &str| {
        j["container_statistics"][0]["criu_statistics"][field]
            .as_u64()
            .map(|us| us as f64 / 1e3)
    };
    r.criu_frozen_ms = criu(&dump, "frozen_time").unwrap_or(0.0);
    if let Some(x) = criu(&restore, "restore_time") {
        r.steps_ms.insert("criu_restore", x);
    }
    r.bytes = std::fs::metadata(&export).map_or(0, |m| m.len());
    let _ = std::fs::remove_file(&export);
    let moved = p.wait_ready(NAME_RESTORED)?;
    r.record_after(&before, &env.report(&moved.state, moved.pid)?)
}

/// Waits up to `timeout` for `child` to exit, then kills it (a `phaul
/// serve --once` whose migration never connected waits forever).
fn reap(mut child: Child, timeout: Duration) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn by_phaul(env: &Env, a: &Engine, b: &Engine, mem: u64, r: &mut RunResult) -> anyhow::Result<()> {
    let phaul = env.bin.join("phaul");
    let so = env.bin.join("libphaul_docker.so");
    if !so.exists() {
        bail!(
            "{} is missing: the docker htype (plugins/docker) is not built",
            so.display()
        );
    }
    let plugins = env.bin.join("bench-plugins-docker");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(&so, plugins.join("libphaul_docker.so"))?;
    let cb = Cli::Docker(b);
    cb.remove(NAME);
    let src = start_on(a, mem)?;
    let before = settle(env, &src)?;
    let docker_host = format!("DOCKER_HOST={}", b.host);
    let path = format!("PATH={}", path_with_criu());
    let wrapper = ["env", docker_host.as_str(), path.as_str()];
    let dst_args: Vec<std::ffi::OsString> = vec![
        "--tls-dir".into(),
        env.tls.join("dst").into(),
        // The writable layer, if the driver syncs it with phaul's file sync.
        "--allow-sync-root".into(),
        b.root.clone().into(),
    ];
    let (serve, addr) = env.serve(&phaul, &wrapper, &plugins, &dst_args)?;
    let t = Instant::now();
    let out = Command::new(&phaul)
        .arg("--plugin-dir")
        .arg(&plugins)
        .args(["-q", "migrate", "docker", NAME, "--to", &addr, "-o"])
        .arg(format!("socket={}", a.sock.display()))
        .arg("--json")
        .arg("--work-dir")
        .arg(env.shm.join("phaul-work"))
        .arg("--tls-dir")
        .arg(env.tls.join("src"))
        .env("PATH", path_with_criu())
        .stdin(Stdio::null())
        .output();
    r.total_ms = ms(t);
    reap(serve, Duration::from_secs(60));
    let out = out.context("running phaul migrate docker")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let j: Option<Value> = serde_json::from_str(text.trim()).ok();
    if !out.status.success() || j.is_none() {
        bail!(
            "phaul migrate docker failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            text.trim()
        );
    }
    let j = j.expect("checked");
    r.criu_frozen_ms = j["criu_dump"]["frozen_time"].as_u64().unwrap_or(0) as f64 / 1e3;
    r.bytes = j["bytes_on_wire"].as_u64().unwrap_or(0);
    // phaul's own split: CRIU's dump (the pages streamed to B meanwhile)
    // and the destination's restore (the driver's, through engine B).
    for (step, field) in [
        ("checkpoint", "criu_dump_time_us"),
        ("restore", "restore_time_us"),
    ] {
        if let Some(us) = j[field].as_u64() {
            r.steps_ms.insert(step, us as f64 / 1e3);
        }
    }
    r.phaul_report = Some(j);
    // The driver keeps the name, presumably; else the one container on B.
    let name = match cb.inspect(NAME) {
        Ok(_) => NAME.to_string(),
        Err(_) => {
            let ids = cb.run(&["ps", "-q", "--no-trunc"])?;
            let ids: Vec<&str> = ids.split_whitespace().collect();
            match ids[..] {
                [one] => one.to_string(),
                _ => bail!(
                    "no container {NAME} on {} and {} running",
                    b.name,
                    ids.len()
                ),
            }
        }
    };
    let moved = cb.wait_ready(&name)?;
    r.record_after(&before, &env.report(&moved.state, moved.pid)?)
}
