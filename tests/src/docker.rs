//! Two stock Docker engines on one machine as two "hosts" for the docker
//! htype's tests (../shared/LAB.md, "Docker"): started and purged with
//! `scripts/docker-engines.sh`, a registry-free test image (static busybox
//! plus the test workload), and a workload container whose memory a test
//! verifies page by page through the container's merged rootfs.
//!
//! Tests run in parallel processes: each gives its engines a tag and
//! subnet octets of its own (engine names are at most 11 characters, so a
//! tag at most 10; the script refuses a subnet another interface has).
//! Taken: 1 and 2 (engines `a` and `b`, started by hand), 41 and 42 (the
//! benchmark's `bencha` and `benchb`), 61 and 62 (tests/tests/docker_engines.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::bin;
use crate::harness::{parent, reap, task_state, wait_for, Workload};

/// The image [`build_test_image`] makes.
pub const TEST_IMAGE: &str = "phaul-test:1";

/// What a [`run_workload`] container writes to `/data/before.txt` when it
/// starts (a file in its writable layer written before any migration).
pub const BEFORE_TXT: &str = "written in the container before the migration\n";

/// The busybox applets the test image has as `/bin` symlinks.
const APPLETS: &[&str] = &[
    "sh", "cat", "sleep", "echo", "ls", "seq", "tail", "mkdir", "true", "wc", "date",
];

/// `scripts/docker-engines.sh` in this repository.
pub fn engines_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/docker-engines.sh")
        .canonicalize()
        .expect("scripts/docker-engines.sh")
}

/// Whether Docker is here (`dockerd` and the `docker` client on PATH;
/// setup installs them).
pub fn have_docker() -> bool {
    ["dockerd", "docker"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// One engine of `scripts/docker-engines.sh` (named as the script names
/// it: data root `/var/lib/phaul-docker-NAME`, socket
/// `/run/phaul-docker-NAME.sock`).
#[derive(Debug, Clone)]
pub struct Engine {
    /// The engine's name.
    pub name: String,
    /// Its API socket.
    pub sock: PathBuf,
    /// Its data root (`DockerRootDir`).
    pub root: PathBuf,
}

impl Engine {
    /// The engine called `name` (whether it runs or not).
    pub fn named(name: &str) -> Engine {
        Engine {
            name: name.to_string(),
            sock: PathBuf::from(format!("/run/phaul-docker-{name}.sock")),
            root: PathBuf::from(format!("/var/lib/phaul-docker-{name}")),
        }
    }

    /// Its exec root (containerd's state, runc's root under
    /// `runtime-runc/moby`, network namespaces).
    pub fn exec_root(&self) -> PathBuf {
        PathBuf::from(format!("/run/phaul-docker-{}", self.name))
    }

    /// Its log file (dockerd's and its containerd's output).
    pub fn log(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/phaul-docker-{}.log", self.name))
    }

    /// Its address for `DOCKER_HOST` or `docker -H` (`unix:///run/...sock`).
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// Runs the `docker` client against this engine: its output.
    pub fn docker_output(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(["-H", &self.host()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run docker {}: {e}", args.join(" ")))
    }

    /// Runs `docker -H unix://SOCK ARGS...`: (success, stdout + stderr).
    pub fn docker(&self, args: &[&str]) -> (bool, String) {
        let out = self.docker_output(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Like [`Engine::docker`], which must succeed: its standard output,
    /// trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker_output(args);
        assert!(
            out.status.success(),
            "docker -H {} {}: {}{}",
            self.host(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The pid of its dockerd (from `/run/phaul-docker-NAME.pid`).
    pub fn dockerd_pid(&self) -> i32 {
        let f = format!("/run/phaul-docker-{}.pid", self.name);
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("read {f}: {e}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{f}: not a pid: {e}"))
    }

    /// `docker inspect CONTAINER`'s first element; `None` when there is no
    /// such container (or image, or other object).
    pub fn inspect(&self, container: &str) -> Option<Value> {
        let out = self.docker_output(&["inspect", container]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get(0).cloned()
    }

    /// Removes every container of this engine (`docker rm -f`), quietly.
    pub fn remove_all_containers(&self) {
        let out = self.docker_output(&["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&out.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if out.status.success() && !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = self.docker_output(&args);
        }
    }

    /// Processes of this engine that still run: its dockerd, containerd
    /// and shims (any process with an argument naming its exec root or
    /// its socket).
    pub fn processes(&self) -> Vec<i32> {
        let exec_root = self.exec_root();
        let exec_root = exec_root.as_os_str().as_encoded_bytes();
        let host = self.host();
        let mentions = |arg: &[u8]| {
            arg == exec_root
                || arg.starts_with(exec_root) && arg.get(exec_root.len()) == Some(&b'/')
                || arg == host.as_bytes()
                || arg == self.sock.as_os_str().as_encoded_bytes()
        };
        all_pids()
            .filter(|&pid| {
                task_state(pid).is_some_and(|s| !matches!(s, 'Z' | 'X' | 'x'))
                    && std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split(|b| *b == 0).any(mentions))
            })
            .collect()
    }

    /// Mount points of this machine's mount namespace at or under its data
    /// root or exec root.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let roots = [self.root.clone(), self.exec_root()];
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|m| roots.iter().any(|r| m.starts_with(r)))
            .collect()
    }

    /// Runs `scripts/docker-engines.sh CMD NAME [ARGS]`: (success, its
    /// output).
    fn script(&self, cmd: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(engines_script())
            .args([cmd, &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run docker-engines.sh {cmd} {}: {e}", self.name));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Starts it afresh (whatever an earlier run left is purged first),
    /// panicking with the end of its log when it does not come up.
    fn start(&self, octet: u8) {
        self.remove_all_containers();
        let _ = self.script("purge", &[]);
        let (ok, out) = self.script("start", &[&octet.to_string()]);
        if !ok {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            panic!(
                "docker engine {} did not start: {}\n{} ends:\n{}",
                self.name,
                out.trim(),
                self.log().display(),
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
    }

    /// Removes its containers, stops it and deletes its data root.
    fn purge(&self) {
        if self.sock.exists() {
            self.remove_all_containers();
        }
        let (ok, out) = self.script("purge", &[]);
        if !ok {
            eprintln!("docker-engines.sh purge {}: {}", self.name, out.trim());
        }
    }
}

/// Every pid in /proc.
fn all_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
}

/// Reaps zombie engine processes (dockerd, containerd, shims) that were
/// reparented to this process: a test process is often a subreaper
/// ([`crate::harness::setup`]).
fn reap_engine_zombies() {
    let me = std::process::id() as i32;
    for pid in all_pids() {
        if task_state(pid) == Some('Z') && parent(pid) == Some(me) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "dockerd" || comm.trim().starts_with("containerd") {
                reap(pid);
            }
        }
    }
}

/// Two engines, `{tag}a` and `{tag}b`, running for one test; purged (with
/// their containers) on drop.
pub struct Engines {
    /// The first ("source") engine.
    pub a: Engine,
    /// The second ("destination") engine.
    pub b: Engine,
}

impl Engines {
    /// Starts engines `{tag}a` (bridge `10.204.{octet_a}.1/24`) and
    /// `{tag}b` (`10.204.{octet_b}.1/24`) afresh with
    /// `scripts/docker-engines.sh`; panics with the end of the log of one
    /// that fails (both are purged then). `tag` and the octets must be the
    /// test's own.
    pub fn start(tag: &str, octet_a: u8, octet_b: u8) -> Engines {
        assert!(
            octet_a != octet_b,
            "two engines need two subnets ({octet_a})"
        );
        let engines = Engines {
            a: Engine::named(&format!("{tag}a")),
            b: Engine::named(&format!("{tag}b")),
        };
        // A panic here drops `engines`, which purges both.
        engines.a.start(octet_a);
        engines.b.start(octet_b);
        engines
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        self.a.purge();
        self.b.purge();
        reap_engine_zombies();
    }
}

/// Builds [`TEST_IMAGE`] in `engine` without a registry: a rootfs with
/// the static busybox (and [`APPLETS`] as symlinks), `/bin/phaul-workload`
/// and the shared libraries it needs (at the paths `ldd` names), imported
/// with `tar c | docker import`. Returns the image reference.
pub fn build_test_image(engine: &Engine) -> String {
    let rootfs = tempfile::Builder::new()
        .prefix("phaul-test-rootfs-")
        .tempdir()
        .expect("rootfs dir");
    let r = rootfs.path();
    for d in ["bin", "data", "dev", "proc", "sys", "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox"))
        .expect("copy /bin/busybox (apt-get install busybox-static)");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(a)).unwrap();
    }
    let workload = bin("phaul-workload");
    std::fs::copy(&workload, r.join("bin/phaul-workload")).expect("copy phaul-workload");
    for lib in shared_libraries(&workload) {
        let to = r.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &to).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
    }
    let mut tar = Command::new("tar")
        .arg("c")
        .arg("-C")
        .arg(r)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let import = Command::new("docker")
        .args(["-H", &engine.host(), "import", "-", TEST_IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    assert!(
        tar.wait().expect("wait for tar").success(),
        "tar the rootfs"
    );
    assert!(
        import.status.success(),
        "docker import into {}: {}",
        engine.name,
        String::from_utf8_lossy(&import.stderr)
    );
    TEST_IMAGE.to_string()
}

/// The shared libraries `ldd` lists for `exe` (the vDSO left out).
fn shared_libraries(exe: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(exe).output().expect("run ldd");
    assert!(out.status.success(), "ldd {}", exe.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `image` from one engine to another (`docker save | docker
/// load`), keeping its image ID.
pub fn copy_image(from: &Engine, to: &Engine, image: &str) {
    let mut save = Command::new("docker")
        .args(["-H", &from.host(), "save", image])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker save");
    let load = Command::new("docker")
        .args(["-H", &to.host(), "load", "-q"])
        .stdin(save.stdout.take().unwrap())
        .output()
        .expect("run docker load");
    let saved = save.wait_with_output().expect("wait for docker save");
    assert!(
        saved.status.success(),
        "docker save {image} from {}: {}",
        from.name,
        String::from_utf8_lossy(&saved.stderr)
    );
    assert!(
        load.status.success(),
        "docker load {image} into {}: {}",
        to.name,
        String::from_utf8_lossy(&load.stderr)
    );
}

/// A running container, as the host sees it.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its name.
    pub name: String,
    /// Its full id.
    pub id: String,
    /// The host pid of its init (`State.Pid`): in a [`run_workload`]
    /// container, the workload itself.
    pub pid: i32,
    /// Its merged rootfs on the host (`GraphDriver.Data.MergedDir`).
    pub merged: PathBuf,
    /// Its writable layer on the host (`GraphDriver.Data.UpperDir`).
    pub upper: PathBuf,
}

impl Container {
    /// Container `name` of `engine`, if it runs (and has a merged rootfs).
    pub fn of(engine: &Engine, name: &str) -> Option<Container> {
        let v = engine.inspect(name)?;
        if v["State"]["Running"] != true {
            return None;
        }
        let pid = v["State"]["Pid"].as_i64().filter(|p| *p > 0)? as i32;
        let data = &v["GraphDriver"]["Data"];
        Some(Container {
            name: name.to_string(),
            id: v["Id"].as_str()?.to_string(),
            pid,
            merged: PathBuf::from(data["MergedDir"].as_str()?),
            upper: PathBuf::from(data["UpperDir"].as_str()?),
        })
    }

    /// Its workload's state directory on the host (`/data/state` in the
    /// merged rootfs).
    pub fn state_dir(&self) -> PathBuf {
        self.merged.join("data/state")
    }

    /// The test's handle on its workload: `Workload::attach(pid,
    /// state_dir)` (dropping it kills the container's init).
    pub fn workload(&self) -> Workload {
        Workload::attach(self.pid, &self.state_dir())
    }

    /// The file its counter loop holds open and appends to
    /// (`/data/open.log`, one number per line, every 50 ms).
    pub fn counter_file(&self) -> PathBuf {
        self.merged.join("data/open.log")
    }

    /// The counter's last value (the file's last line; 0 when empty).
    pub fn counter(&self) -> u64 {
        last_number(&self.counter_file())
    }

    /// `/data/before.txt` as the container has it now.
    pub fn before_txt(&self) -> String {
        std::fs::read_to_string(self.merged.join("data/before.txt")).unwrap_or_default()
    }
}

/// The last complete line of `file` as a number (0 when there is none).
pub fn last_number(file: &Path) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// The shell a [`run_workload`] container runs: `/data/before.txt`, the
/// counter loop (continuing from `/data/open.log`'s last line, the file
/// held open as fd 3 and appended to every 50 ms) and then the workload
/// exec'd as the container's init (the loop its child).
fn workload_script(mem_mib: u32, workload_args: &[&str]) -> String {
    let before = BEFORE_TXT.trim_end();
    format!(
        "mkdir -p /data/state\n\
         echo '{before}' > /data/before.txt\n\
         (\n\
         \x20 i=$(tail -n 1 /data/open.log 2>/dev/null); i=${{i:-0}}\n\
         \x20 exec 3>>/data/open.log\n\
         \x20 while :; do i=$((i+1)); echo $i >&3; sleep 0.05; done\n\
         ) </dev/null >/dev/null 2>&1 &\n\
         exec /bin/phaul-workload run --state-dir /data/state --mem-mib {mem_mib} --dirty-pct 5 {}\n",
        workload_args.join(" ")
    )
}

/// Runs a detached container `name` of `image` in `engine` (`docker run
/// -d --name NAME EXTRA... IMAGE sh -c SCRIPT`) whose init is the test
/// workload (`--mem-mib mem_mib --dirty-pct 5`, state in `/data/state`)
/// with a counter loop as its child (see [`Container::counter`]), after
/// writing [`BEFORE_TXT`] to `/data/before.txt`. Waits until the workload
/// is ready (its `status.json` in the merged rootfs).
pub fn run_workload(
    engine: &Engine,
    name: &str,
    image: &str,
    mem_mib: u32,
    extra_docker_args: &[&str],
) -> Container {
    run_workload_with(engine, name, image, mem_mib, extra_docker_args, &[])
}

/// [`run_workload`] with more arguments for the workload (`phaul-workload
/// run ... WORKLOAD_ARGS`, e.g. `--tcp-listen 0.0.0.0:7000`).
pub fn run_workload_with(
    engine: &Engine,
    name: &str,
    image: &str,
    mem_mib: u32,
    extra_docker_args: &[&str],
    workload_args: &[&str],
) -> Container {
    let script = workload_script(mem_mib, workload_args);
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra_docker_args);
    args.extend([image, "/bin/sh", "-c", &script]);
    engine.docker_ok(&args);
    let mut c = None;
    let ready = wait_for(Duration::from_secs(30), || {
        c = Container::of(engine, name).filter(|c| {
            c.state_dir().join("status.json").exists()
                && std::fs::read_to_string(format!("/proc/{}/comm", c.pid))
                    .is_ok_and(|comm| comm.trim() == "phaul-workload")
        });
        c.is_some()
            || engine
                .inspect(name)
                .is_some_and(|v| v["State"]["Running"] == false)
    });
    let Some(c) = c.filter(|_| ready) else {
        let (_, logs) = engine.docker(&["logs", "--tail", "20", name]);
        let state = engine
            .inspect(name)
            .map_or("no such container".to_string(), |v| v["State"].to_string());
        panic!(
            "container {name} in {}: its workload did not start ({state}); its log:\n{logs}",
            engine.name
        );
    };
    c
}
