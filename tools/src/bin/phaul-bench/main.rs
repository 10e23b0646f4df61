//! `phaul-bench`: phaul against the alternatives, measured side by side in
//! one run on this machine.
//!
//! For each workload (the test workload: M MiB of memory, D% of its pages
//! rewritten per second, a heartbeat every millisecond) and each run, it
//! migrates the workload with every method in turn:
//!
//! - `phaul`: `phaul serve` + `phaul migrate` over loopback with mutual
//!   TLS, phaul's default (images on tmpfs, pages streamed through the
//!   memory channel: CRIU writes into a socketpair, a relay thread in each
//!   phaul encrypts or decrypts); the certificates are made for the run
//!   with `phaul certs` in a temporary directory;
//! - `phaul-insecure`: the same with `--insecure` on both sides (plain TCP,
//!   CRIU gets the memory socket itself, no relay), to show what TLS costs;
//! - `naive`: `criu dump` to a directory on disk, `cp -a` of the directory,
//!   `criu restore` from the copy;
//! - `floor`: `criu dump` to tmpfs and `criu restore` from the same tmpfs,
//!   no copy at all — no CRIU-based one-shot migration can freeze for less.
//!
//! It records the downtime the application itself saw (the largest gap in
//! its heartbeat), CRIU's frozen time, the total time, the bytes moved, and
//! phaul's own CPU time and peak memory (each phaul process's VmHWM,
//! sampled; and `wait4`'s figure, which also covers the CRIU workers it
//! reaped), then writes every run as JSON, a Markdown table with
//! min/median/max, the ratios phaul/floor, phaul/naive and TLS/insecure,
//! and the data for the plot (`bench/plot.py` draws it). It also measures
//! a plain loopback TCP stream and the same stream through phaul's TLS
//! relays, the baselines for phaul's memory channel, and moves an LXC
//! container by phaul and by hand with LXC's own tools (see [`lxc`]).
//!
//! The methods `docker-engine`, `podman` and `phaul-docker` (not run unless
//! named in `--methods`) move a Docker or Podman container with the
//! workload inside instead, once per size and run at their own dirtying
//! rate (see [`docker`]).

mod channel;
mod docker;
mod lxc;
mod methods;
mod summary;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;

use methods::{Method, RunResult};

/// Benchmark phaul against dump-copy-restore and the no-copy floor.
#[derive(Debug, Parser)]
#[command(after_help = "\
Examples:
  phaul-bench --sizes 64,256,1024 --rates 0,1,10 --runs 5 --out bench/results
  phaul-bench --methods docker-engine,podman,phaul-docker --sizes 64,256 --runs 3 \
      --lxc-sizes 0 --out bench/results/docker

Writes <out>/results.json (every run), <out>/results.md (the table) and
prints the table; bench/plot.py turns results.json into a PNG.")]
struct Args {
    /// Workload memory sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
    sizes: Vec<u64>,
    /// Dirtying rates, % of pages per second.
    #[arg(long, value_delimiter = ',', default_value = "0,1,10")]
    rates: Vec<f64>,
    /// Runs per method and workload.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Output directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Methods to run. The container methods (docker-engine: docker
    /// checkpoint/start --checkpoint between two engines by hand; podman:
    /// checkpoint --export/restore --import; phaul-docker: phaul migrate
    /// docker) run once per size at 5 %/s, whatever --rates says.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "phaul,phaul-post-copy,phaul-uffd,phaul-insecure,naive,floor"
    )]
    methods: Vec<Method>,
    /// Where the naive method dumps and copies (a disk directory).
    #[arg(long, default_value = "/var/tmp/phaul-bench")]
    disk_dir: PathBuf,
    /// Bytes streamed by the memory-channel measurement, MiB.
    #[arg(long, default_value_t = 2048)]
    channel_mib: u64,
    /// Only measure the raw channels and print them as JSON.
    #[arg(long)]
    channel_only: bool,
    /// Container sizes for the LXC rows, MiB (`0`: none; skipped where
    /// LXC is not installed).
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    lxc_sizes: Vec<u64>,
    /// A directory with another build of phaul (`phaul`, `phaul-bench`),
    /// e.g. before a transport change: adds the method `phaul-baseline`
    /// (that build's phaul, with TLS) and its raw channels, measured in the
    /// same run.
    #[arg(long, value_name = "DIR")]
    baseline: Option<PathBuf>,
    /// Run the destination service in a network namespace of its own,
    /// reached over a veth pair limited to this many Mbit/s each way (tc
    /// tbf), instead of over loopback.
    #[arg(long, value_name = "MBIT")]
    link_mbit: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phaul-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("phaul-bench runs CRIU and needs root");
    }
    // Detached and restored workloads are reparented to us, so we reap them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut env = methods::Env::new(&args.disk_dir)?;
    if let Some(mbit) = args.link_mbit {
        env.set_link(mbit)?;
        eprintln!(
            "phaul-bench: the destination service runs in network namespace {} behind a {mbit} \
             Mbit/s veth link",
            methods::LINK_NS
        );
    }
    let free_mib = methods::free_memory_mib();
    let mut sizes = Vec::new();
    for &m in &args.sizes {
        // The source, the images and the restored copy coexist.
        if m * 4 > free_mib {
            eprintln!("phaul-bench: skipping {m} MiB: {free_mib} MiB of free memory is not enough");
        } else {
            sizes.push(m);
        }
    }

    eprintln!(
        "phaul-bench: measuring the memory channel ({} MiB)",
        args.channel_mib
    );
    let channel = channel::measure(args.channel_mib << 20, env.tls_dir())?;
    eprintln!(
        "phaul-bench: plain loopback TCP: {:.0} MiB/s; through the TLS relays: {:.0} MiB/s",
        channel.tcp_mib_s, channel.tls_mib_s
    );
    if args.channel_only {
        println!("{}", serde_json::to_string(&channel)?);
        return Ok(());
    }
    let baseline_channel = match &args.baseline {
        Some(dir) => {
            let out = std::process::Command::new(dir.join("phaul-bench"))
                .args(["--channel-only", "--channel-mib"])
                .arg(args.channel_mib.to_string())
                .arg("--out")
                .arg(&args.out)
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}/phaul-bench", dir.display()))?;
            if !out.status.success() {
                bail!("{}/phaul-bench --channel-only failed", dir.display());
            }
            let c: channel::Channel = serde_json::from_slice(&out.stdout)?;
            eprintln!(
                "phaul-bench: baseline build: loopback TCP {:.0} MiB/s; through its TLS relays {:.0} MiB/s",
                c.tcp_mib_s, c.tls_mib_s
            );
            Some(c)
        }
        None => None,
    };
    let mut methods = args.methods.clone();
    if let Some(dir) = &args.baseline {
        env.set_baseline(dir)?;
        if !methods.contains(&Method::PhaulBaseline) {
            methods.insert(1, Method::PhaulBaseline);
        }
    }

    let (container_methods, methods): (Vec<Method>, Vec<Method>) =
        methods.into_iter().partition(|m| m.is_container());

    let mut results: Vec<RunResult> = Vec::new();
    for &mem in &sizes {
        for &rate in &args.rates {
            for run in 1..=args.runs {
                // Methods interleave so that drift hits them alike.
                for &method in &methods {
                    let r = env.run(method, mem, rate, run);
                    match &r.error {
                        None => eprintln!(
                            "phaul-bench: {mem} MiB {rate}%/s run {run} {}: downtime {:.1} ms, total {:.1} ms",
                            method.name(),
                            r.downtime_ms,
                            r.total_ms
                        ),
                        Some(e) => eprintln!(
                            "phaul-bench: {mem} MiB {rate}%/s run {run} {}: FAILED: {e}",
                            method.name()
                        ),
                    }
                    results.push(r);
                }
            }
        }
    }

    let mut docker_runs: Vec<RunResult> = Vec::new();
    if !container_methods.is_empty() {
        eprintln!("phaul-bench: setting up the container rows (image, engines)");
        let d = docker::Docker::setup(&env, &container_methods);
        for &mem in &sizes {
            for run in 1..=args.runs {
                for &method in &container_methods {
                    let r = d.measure(&env, method, mem, run);
                    match &r.error {
                        None => eprintln!(
                            "phaul-bench: docker {mem} MiB run {run} {}: downtime {:.1} ms, total {:.1} ms",
                            method.name(),
                            r.downtime_ms,
                            r.total_ms
                        ),
                        Some(e) => eprintln!(
                            "phaul-bench: docker {mem} MiB run {run} {}: FAILED: {e}",
                            method.name()
                        ),
                    }
                    docker_runs.push(r);
                }
            }
        }
        // Stops the engines, removes images and leftovers.
        drop(d);
    }

    let mut containers: Vec<RunResult> = Vec::new();
    let lxc_sizes: Vec<u64> = args.lxc_sizes.iter().copied().filter(|&m| m > 0).collect();
    if !lxc_sizes.is_empty() && !lxc::available() {
        eprintln!("phaul-bench: skipping the LXC rows: LXC is not installed");
    } else {
        for &mem in &lxc_sizes {
            for run in 1..=args.runs {
                for method in [lxc::LxcMethod::Phaul, lxc::LxcMethod::ByHand] {
                    let r = lxc::measure(&env, method, mem, run);
                    match &r.error {
                        None => eprintln!(
                            "phaul-bench: container {mem} MiB run {run} {}: downtime {:.1} ms, total {:.1} ms",
                            method.name(),
                            r.downtime_ms,
                            r.total_ms
                        ),
                        Some(e) => eprintln!(
                            "phaul-bench: container {mem} MiB run {run} {}: FAILED: {e}",
                            method.name()
                        ),
                    }
                    containers.push(r);
                }
            }
        }
    }

    let machine = summary::machine();
    let doc = serde_json::json!({
        "machine": machine,
        "date": summary::today(),
        "channel": channel,
        "baseline_channel": baseline_channel,
        "runs": results,
        "containers": containers,
        "docker": docker_runs,
    });
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    let mut table = summary::markdown(&machine, &channel, baseline_channel.as_ref(), &results);
    if let Some(mbit) = args.link_mbit {
        table.insert_str(
            0,
            &format!(
                "Link: the destination service ran in its own network namespace, reached over a \
                 veth pair limited to {mbit} Mbit/s each way (tc tbf); the raw channel figures \
                 below are loopback.\n\n"
            ),
        );
    }
    table.push_str(&summary::lxc_markdown(&containers));
    table.push_str(&summary::docker_markdown(&docker_runs));
    std::fs::write(args.out.join("results.md"), &table)?;
    println!("{table}");
    eprintln!("phaul-bench: wrote {} and results.md", json_path.display());
    Ok(())
}
