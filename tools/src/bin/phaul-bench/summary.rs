//! The results as a Markdown table: min/median/max per method and
//! workload, the ratios phaul/floor and phaul/naive, TLS against
//! `--insecure`, the raw channels, and the targets.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::channel::Channel;
use crate::methods::RunResult;

/// What machine this ran on.
pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0.0, |k| k as f64 / (1 << 20) as f64);
    let criu = std::process::Command::new(phaul_core::criu::locate())
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    serde_json::json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "criu": criu,
        // Others may share the machine: the load when the run started.
        "loadavg": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// Today's date (UTC), YYYY-MM-DD.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// min, median, max.
pub fn mmm(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Some((v[0], med, v[v.len() - 1]))
}

fn cell(x: Option<(f64, f64, f64)>) -> String {
    x.map_or("-".into(), |(a, m, b)| format!("{m:.1} ({a:.1}–{b:.1})"))
}

type Key = (u64, i64);

/// The methods, in table order.
const METHODS: [&str; 6] = [
    "phaul",
    "phaul-post-copy",
    "phaul-baseline",
    "phaul-insecure",
    "naive",
    "floor",
];

/// The table.
pub fn markdown(
    machine: &Value,
    channel: &Channel,
    baseline: Option<&Channel>,
    runs: &[RunResult],
) -> String {
    let mut by: BTreeMap<(Key, &str), Vec<&RunResult>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.error.is_none()) {
        by.entry(((r.mem_mib, (r.dirty_pct * 100.0) as i64), r.method))
            .or_default()
            .push(r);
    }
    let failed = runs.iter().filter(|r| r.error.is_some()).count();
    let med = |key: Key, m: &str, f: &dyn Fn(&RunResult) -> f64| {
        by.get(&(key, m))
            .and_then(|v| mmm(v.iter().map(|r| f(r)).collect()))
            .map(|x| x.1)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# phaul benchmark\n\nMachine: {} ({} CPUs, {} GiB), Linux {}, {}. Date: {}. Load average at the start: {}.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["criu"].as_str().unwrap_or("?"),
        today(),
        machine["loadavg"].as_str().unwrap_or("?")
    );
    // A run of container methods only has no process rows.
    if !runs.is_empty() {
        let _ = writeln!(
            s,
            "Each cell: median (min–max) over the runs. Downtime is the largest gap in the \
             workload's own 1 ms heartbeat across the migration. phaul: live migration over \
             loopback with mutual TLS (its default); phaul-insecure: the same with --insecure \
             (plain TCP, CRIU writes into the TCP socket itself); naive: criu dump to disk, cp -a, \
             criu restore; floor: criu dump to tmpfs, criu restore from it (no copy). Channel: the \
             memory moved over CRIU's memwrite time in the final dump. Peak RSS: each phaul \
             process's own VmHWM (sampled every 5 ms), the largest over the runs; in brackets \
             wait4's ru_maxrss, which also covers the CRIU workers the process reaped. {failed} \
             run(s) failed.\n"
        );
        let _ = writeln!(
            s,
            "| MiB | dirty %/s | method | downtime ms | CRIU frozen ms | total ms | MiB moved | channel MiB/s | phaul overhead ms | phaul CPU ms | phaul peak RSS MiB (src/dst) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    }
    let keys: Vec<Key> = {
        let mut k: Vec<Key> = by.keys().map(|(k, _)| *k).collect();
        k.dedup();
        k
    };
    for key in &keys {
        for m in METHODS {
            let Some(v) = by.get(&(*key, m)) else {
                continue;
            };
            let col = |f: &dyn Fn(&RunResult) -> f64| cell(mmm(v.iter().map(|r| f(r)).collect()));
            let opt = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                let xs: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
                cell(mmm(xs))
            };
            let rss = if m.starts_with("phaul") {
                let peak = |f: &dyn Fn(&RunResult) -> Option<u64>| {
                    v.iter().filter_map(|r| f(r)).max().unwrap_or(0) as f64 / 1024.0
                };
                format!(
                    "{:.1} / {:.1} ({:.1} / {:.1})",
                    peak(&|r| r.phaul_src_hwm_kib),
                    peak(&|r| r.phaul_dst_hwm_kib),
                    peak(&|r| r.phaul_src_maxrss_kib),
                    peak(&|r| r.phaul_dst_maxrss_kib)
                )
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {m} | {} | {} | {} | {:.1} | {} | {} | {} | {rss} |",
                key.0,
                key.1 as f64 / 100.0,
                col(&|r| r.downtime_ms),
                col(&|r| r.criu_frozen_ms),
                col(&|r| r.total_ms),
                mmm(v
                    .iter()
                    .map(|r| r.bytes as f64 / (1 << 20) as f64)
                    .collect())
                .map_or(0.0, |x| x.1),
                opt(&|r| r.channel_mib_s),
                opt(&|r| r.overhead_ms),
                opt(&|r| r.phaul_cpu_ms),
            );
        }
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    if by.keys().any(|(_, m)| *m == "phaul-insecure") {
        let _ = writeln!(
            s,
            "\n## TLS against --insecure (medians; ratio TLS / insecure)\n"
        );
        let _ = writeln!(
            s,
            "Same workloads, runs interleaved. Channel: memory over CRIU's memwrite time; dump: \
             memory over CRIU's whole final dump (request to post-dump). CPU: both phaul \
             processes, user+system.\n"
        );
        let _ = writeln!(
            s,
            "| MiB | dirty %/s | downtime ms TLS / insecure | ratio | channel MiB/s TLS / insecure | ratio | dump MiB/s TLS / insecure | ratio | phaul CPU ms TLS / insecure | ratio | peak RSS MiB TLS / insecure (max of src, dst) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for key in &keys {
            let pair = |f: &dyn Fn(&RunResult) -> f64| {
                (med(*key, "phaul", f), med(*key, "phaul-insecure", f))
            };
            let show = |(a, b): (Option<f64>, Option<f64>)| {
                let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
                format!("{} / {} | {}", f(a), f(b), ratio(a, b))
            };
            let peak = |m: &str| {
                by.get(&(*key, m)).map_or(0.0, |v| {
                    v.iter()
                        .filter_map(|r| Some(r.phaul_src_hwm_kib?.max(r.phaul_dst_hwm_kib?)))
                        .max()
                        .unwrap_or(0) as f64
                        / 1024.0
                })
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.1} / {:.1} |",
                key.0,
                key.1 as f64 / 100.0,
                show(pair(&|r| r.downtime_ms)),
                show(pair(&|r| r.channel_mib_s.unwrap_or(0.0))),
                show(pair(&|r| r.dump_mib_s.unwrap_or(0.0))),
                show(pair(&|r| r.phaul_cpu_ms.unwrap_or(0.0))),
                peak("phaul"),
                peak("phaul-insecure"),
            );
        }
    }
    if by.keys().any(|(_, m)| *m == "phaul-baseline") {
        let _ = writeln!(
            s,
            "\n## This build against the baseline build (both TLS; ratio this / baseline)\n"
        );
        let _ = writeln!(
            s,
            "| MiB | dirty %/s | downtime ms this / baseline | ratio | channel MiB/s this / baseline | ratio | phaul CPU ms this / baseline | ratio |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for key in &keys {
            let show = |f: &dyn Fn(&RunResult) -> f64| {
                let (a, b) = (med(*key, "phaul", f), med(*key, "phaul-baseline", f));
                let g = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
                format!("{} / {} | {}", g(a), g(b), ratio(a, b))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                key.0,
                key.1 as f64 / 100.0,
                show(&|r| r.downtime_ms),
                show(&|r| r.channel_mib_s.unwrap_or(0.0)),
                show(&|r| r.phaul_cpu_ms.unwrap_or(0.0)),
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Raw channels ({} MiB, one stream, 1 MiB writes)\n",
        channel.bytes >> 20
    );
    let _ = writeln!(s, "| channel | MiB/s | CPU ms per GiB (all threads) |");
    let _ = writeln!(s, "|---|---|---|");
    let rows = |s: &mut String, c: &Channel, build: &str, tls: &str, of_tcp: &str| {
        let per_gib = |cpu: f64| cpu / (c.bytes as f64 / (1u64 << 30) as f64);
        let _ = writeln!(
            s,
            "| {build}loopback TCP | {:.0} | {:.0} |",
            c.tcp_mib_s,
            per_gib(c.tcp_cpu_ms)
        );
        let _ = writeln!(
            s,
            "| {build}{tls} | {:.0} ({:.0}% of {of_tcp}) | {:.0} |",
            c.tls_mib_s,
            100.0 * c.tls_mib_s / c.tcp_mib_s,
            per_gib(c.tls_cpu_ms)
        );
    };
    rows(
        &mut s,
        channel,
        "",
        "TLS relays (socketpair → relay → TLS/TCP → relay → socketpair)",
        "TCP",
    );
    if let Some(b) = baseline {
        rows(&mut s, b, "baseline build: ", "TLS relays", "its TCP");
    }
    if !keys.is_empty() {
        let _ = writeln!(s, "\n## Ratios (median downtime)\n");
        let _ = writeln!(
            s,
            "| MiB | dirty %/s | phaul / floor | phaul / naive | phaul-insecure / floor | phaul / phaul-insecure |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
    }
    for key in &keys {
        let p = med(*key, "phaul", &|r| r.downtime_ms);
        let i = med(*key, "phaul-insecure", &|r| r.downtime_ms);
        let f = med(*key, "floor", &|r| r.downtime_ms);
        let n = med(*key, "naive", &|r| r.downtime_ms);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            key.0,
            key.1 as f64 / 100.0,
            ratio(p, f),
            ratio(p, n),
            ratio(i, f),
            ratio(p, i)
        );
    }
    if by.keys().any(|(_, m)| *m == "phaul-post-copy") {
        let _ = writeln!(
            s,
            "\n## Post-copy against single-shot (medians)\n\nPause: the largest heartbeat gap (the \
             switch). All pages in: the whole migration's wall time, which for post-copy ends when \
             the last page arrived. Gaps: heartbeat gaps over 10 ms during the migration (post-copy: \
             the pause, then faults on pages not there yet).\n"
        );
        let _ = writeln!(
            s,
            "| MiB | dirty %/s | pause post-copy ms | pause single-shot ms | pause floor ms | post-copy / floor | last page after switch ms | all pages in: post-copy / single-shot | gaps > 10 ms post-copy / single-shot |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for key in &keys {
            let pc = |f: &dyn Fn(&RunResult) -> f64| med(*key, "phaul-post-copy", f);
            let ss = |f: &dyn Fn(&RunResult) -> f64| med(*key, "phaul", f);
            let fl = med(*key, "floor", &|r| r.downtime_ms);
            let num = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                key.0,
                key.1 as f64 / 100.0,
                num(pc(&|r| r.downtime_ms)),
                num(ss(&|r| r.downtime_ms)),
                num(fl),
                ratio(pc(&|r| r.downtime_ms), fl),
                num(pc(&|r| r.last_page_ms.unwrap_or(0.0))),
                ratio(pc(&|r| r.total_ms), ss(&|r| r.total_ms)),
                num(pc(&|r| r.gaps_over_10ms as f64)),
                num(ss(&|r| r.gaps_over_10ms as f64)),
            );
        }
    }
    if by.keys().any(|(_, m)| *m == "phaul-uffd") {
        let _ = writeln!(
            s,
            "\n## Userfaultfd pre-copy against post-copy and single-shot (medians)\n\nPause: the \
             largest heartbeat gap. Frozen MiB: what crossed while the workload was frozen (the \
             images of the final, lazy dump, and the last scan's word). After switch: memory the \
             source sent after the switch; last dirty set: what the last scan found written since \
             the last pass; last page: from the switch until every page was in place.\n"
        );
        let _ = writeln!(
            s,
            "| MiB | dirty %/s | pause uffd ms | pause post-copy ms | pause single-shot ms | pause floor ms | uffd / floor | total uffd / post-copy / single-shot ms | frozen MiB uffd | after switch MiB uffd / post-copy | last dirty set MiB | last page after switch uffd / post-copy ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for key in &keys {
            let m = |name: &str, f: &dyn Fn(&RunResult) -> f64| med(*key, name, f);
            let num = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let frozen = |r: &RunResult| {
                mib(r
                    .phaul_report
                    .as_ref()
                    .map_or(0, |j| j["image_bytes"].as_u64().unwrap_or(0)))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} / {} | {} | {} / {} |",
                key.0,
                key.1 as f64 / 100.0,
                num(m("phaul-uffd", &|r| r.downtime_ms)),
                num(m("phaul-post-copy", &|r| r.downtime_ms)),
                num(m("phaul", &|r| r.downtime_ms)),
                num(m("floor", &|r| r.downtime_ms)),
                ratio(
                    m("phaul-uffd", &|r| r.downtime_ms),
                    m("floor", &|r| r.downtime_ms)
                ),
                num(m("phaul-uffd", &|r| r.total_ms)),
                num(m("phaul-post-copy", &|r| r.total_ms)),
                num(m("phaul", &|r| r.total_ms)),
                num(m("phaul-uffd", &frozen)),
                num(m("phaul-uffd", &|r| mib(r.after_switch_bytes.unwrap_or(0)))),
                num(m("phaul-post-copy", &|r| mib(r
                    .after_switch_bytes
                    .unwrap_or(0)))),
                num(m("phaul-uffd", &|r| mib(
                    r.last_dirty_pages.unwrap_or(0) * 4096
                ))),
                num(m("phaul-uffd", &|r| r.last_page_ms.unwrap_or(0.0))),
                num(m("phaul-post-copy", &|r| r.last_page_ms.unwrap_or(0.0))),
            );
        }
    }
    let mut targets = Vec::new();
    let ratios: Vec<f64> = keys
        .iter()
        .filter_map(|k| {
            Some(med(*k, "phaul", &|r| r.downtime_ms)? / med(*k, "floor", &|r| r.downtime_ms)?)
        })
        .collect();
    // Only where both ran (a run of other methods says nothing about it).
    if !ratios.is_empty() {
        let worst_ratio = ratios.iter().copied().fold(0.0f64, f64::max);
        targets.push(format!(
            "- phaul downtime within 1.2x of the floor at every size: worst ratio {worst_ratio:.2} — {}",
            if worst_ratio <= 1.2 { "met" } else { "missed" }
        ));
    }
    let small: Vec<Key> = keys.iter().copied().filter(|k| k.0 == 64).collect();
    for k in &small {
        if let (Some(p), Some(f)) = (
            med(*k, "phaul", &|r| r.downtime_ms),
            med(*k, "floor", &|r| r.downtime_ms),
        ) {
            targets.push(format!(
                "- 64 MiB, {} %/s: phaul downtime {p:.1} ms vs floor {f:.1} ms (target: below) — {}",
                k.1 as f64 / 100.0,
                if p < f { "met" } else { "missed" }
            ));
        }
        if let Some(o) = med(*k, "phaul", &|r| r.overhead_ms.unwrap_or(0.0)) {
            targets.push(format!(
                "- 64 MiB, {} %/s: phaul orchestration overhead {o:.1} ms (target < 100 ms) — {}",
                k.1 as f64 / 100.0,
                if o < 100.0 { "met" } else { "missed" }
            ));
        }
    }
    for k in keys.iter().filter(|k| k.0 == 1024) {
        let pc = med(*k, "phaul-post-copy", &|r| r.downtime_ms);
        if let (Some(p), Some(f)) = (pc, med(*k, "floor", &|r| r.downtime_ms)) {
            targets.push(format!(
                "- 1 GiB, {} %/s: post-copy pause {p:.1} ms = {:.2}x the floor's {f:.1} ms (target <= 0.15x) — {}",
                k.1 as f64 / 100.0,
                p / f,
                if p <= 0.15 * f { "met" } else { "missed" }
            ));
        }
        let totals = (
            med(*k, "phaul-post-copy", &|r| r.total_ms),
            med(*k, "phaul", &|r| r.total_ms),
        );
        if let (Some(p), Some(s1)) = totals {
            targets.push(format!(
                "- 1 GiB, {} %/s: post-copy all pages in after {p:.0} ms = {:.2}x single-shot's total {s1:.0} ms (target <= 1.3x) — {}",
                k.1 as f64 / 100.0,
                p / s1,
                if p <= 1.3 * s1 { "met" } else { "missed" }
            ));
        }
    }
    // The channel's rate where it matters most: the largest workload.
    let largest = runs
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.mem_mib)
        .max()
        .unwrap_or(0);
    for m in ["phaul", "phaul-baseline", "phaul-insecure"] {
        let chan = mmm(runs
            .iter()
            .filter(|r| r.mem_mib == largest && r.error.is_none() && r.method == m)
            .filter_map(|r| r.channel_mib_s)
            .collect());
        if let Some((_, med, _)) = chan {
            let pct = 100.0 * med / channel.tcp_mib_s;
            targets.push(format!(
                "- {m}: memory channel during the dump ({largest} MiB, pages over CRIU's memwrite time): \
                 {med:.0} MiB/s vs plain loopback TCP {:.0} MiB/s = {pct:.0}% (target >= 80%) — {}",
                channel.tcp_mib_s,
                if pct >= 80.0 { "met" } else { "missed" }
            ));
        }
    }
    for m in ["phaul", "phaul-baseline", "phaul-insecure"] {
        let mine: Vec<&RunResult> = runs
            .iter()
            .filter(|r| r.method == m && r.error.is_none())
            .collect();
        if mine.is_empty() {
            continue;
        }
        let peak = mine
            .iter()
            .filter_map(|r| Some(r.phaul_src_hwm_kib?.max(r.phaul_dst_hwm_kib?)))
            .max()
            .unwrap_or(0);
        let with_criu = mine
            .iter()
            .filter_map(|r| Some(r.phaul_src_maxrss_kib?.max(r.phaul_dst_maxrss_kib?)))
            .max()
            .unwrap_or(0);
        targets.push(format!(
            "- {m}: peak memory per phaul process: {:.1} MiB at up to {largest} MiB of workload \
             (with the CRIU workers it reaped: {:.1} MiB) (target < 64 MiB at every size) — {}",
            peak as f64 / 1024.0,
            with_criu as f64 / 1024.0,
            if peak > 0 && peak < 64 * 1024 {
                "met"
            } else {
                "missed"
            }
        ));
    }
    if !targets.is_empty() {
        let _ = writeln!(s, "\n## Targets\n");
    }
    for t in targets {
        let _ = writeln!(s, "{t}");
    }
    s
}

/// The container table: LXC containers moved by phaul and by hand with
/// LXC's own checkpoint and restore, same run.
pub fn lxc_markdown(runs: &[RunResult]) -> String {
    let mut s = String::new();
    if runs.is_empty() {
        return s;
    }
    let failed = runs.iter().filter(|r| r.error.is_some()).count();
    let _ = writeln!(
        s,
        "\n## LXC containers\n\nA busybox container with the test workload inside (1% of its pages \
         rewritten per second) moved between two lxcpaths on this machine. lxc-phaul: phaul \
         migrate lxc (mutual TLS; rootfs by phaul's file sync; restored by lxc-checkpoint -r under \
         phaul's hold); lxc-checkpoint: by hand with LXC's tools (rsync of the rootfs, \
         lxc-checkpoint -s into tmpfs, a final rsync, the images as a tar stream over loopback TCP, \
         lxc-checkpoint -r). \
         Downtime is the workload's own largest heartbeat gap. {failed} run(s) failed.\n"
    );
    let _ = writeln!(
        s,
        "| MiB | lxc-phaul downtime ms | lxc-checkpoint downtime ms | ratio | lxc-phaul total ms | lxc-checkpoint total ms |\n|---|---|---|---|---|---|"
    );
    let mut sizes: Vec<u64> = runs.iter().map(|r| r.mem_mib).collect();
    sizes.sort();
    sizes.dedup();
    for mem in sizes {
        let of = |m: &str, f: &dyn Fn(&RunResult) -> f64| {
            mmm(runs
                .iter()
                .filter(|r| r.mem_mib == mem && r.method == m && r.error.is_none())
                .map(f)
                .collect())
        };
        let (pd, hd) = (
            of("lxc-phaul", &|r| r.downtime_ms),
            of("lxc-checkpoint", &|r| r.downtime_ms),
        );
        let ratio = match (pd, hd) {
            (Some(p), Some(h)) if h.1 > 0.0 => format!("{:.2}", p.1 / h.1),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {mem} | {} | {} | {ratio} | {} | {} |",
            cell(pd),
            cell(hd),
            cell(of("lxc-phaul", &|r| r.total_ms)),
            cell(of("lxc-checkpoint", &|r| r.total_ms)),
        );
    }
    s
}

/// The Docker table: a container moved by Docker's own checkpoint and
/// restore between two engines, by Podman's export and import, and by
/// phaul's docker htype, same run; then every run, failures with their
/// reason.
pub fn docker_markdown(runs: &[RunResult]) -> String {
    let mut s = String::new();
    if runs.is_empty() {
        return s;
    }
    let failed = runs.iter().filter(|r| r.error.is_some()).count();
    let _ = writeln!(
        s,
        "\n## Docker containers\n\nA container (busybox-static rootfs with the test workload, {} % \
         of its pages rewritten per second) moved between two Docker engines on this machine. \
         docker-engine: by hand with Docker's own checkpoint (B's container created first, docker \
         checkpoint create on A, the checkpoint directory and the writable layer copied into B's as \
         tar streams over loopback TCP, docker start --checkpoint on B); podman: podman container \
         checkpoint --export, then restore --import on the same host (nothing copied); \
         phaul-docker: phaul migrate docker (mutual TLS) to a phaul serve on engine B. Pause is the \
         workload's own largest heartbeat gap; total from the first step of the move until it runs \
         on the destination; steps are the commands' wall times (phaul-docker: phaul's own \
         split, CRIU's dump with the pages streamed meanwhile, and the destination's restore), \
         CRIU's own figures from its statistics where the tool leaves them. {failed} run(s) \
         failed.\n",
        runs[0].dirty_pct
    );
    let _ = writeln!(
        s,
        "| MiB | method | pause ms | total ms | checkpoint ms | copy ms | restore ms | CRIU frozen ms | CRIU restore ms | MiB moved | runs ok |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut sizes: Vec<u64> = runs.iter().map(|r| r.mem_mib).collect();
    sizes.sort();
    sizes.dedup();
    let mut methods: Vec<&str> = Vec::new();
    for r in runs {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let ok_of = |mem: u64, m: &str| -> Vec<&RunResult> {
        runs.iter()
            .filter(|r| r.mem_mib == mem && r.method == m && r.error.is_none())
            .collect()
    };
    for &mem in &sizes {
        for &m in &methods {
            let all = runs
                .iter()
                .filter(|r| r.mem_mib == mem && r.method == m)
                .count();
            let ok = ok_of(mem, m);
            let col = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                cell(mmm(ok.iter().filter_map(|r| f(r)).collect()))
            };
            let step = |name: &'static str| col(&|r| r.steps_ms.get(name).copied());
            let _ = writeln!(
                s,
                "| {mem} | {m} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{all} |",
                col(&|r| Some(r.downtime_ms)),
                col(&|r| Some(r.total_ms)),
                step("checkpoint"),
                step("copy"),
                step("restore"),
                col(&|r| Some(r.criu_frozen_ms).filter(|x| *x > 0.0)),
                step("criu_restore"),
                mmm(ok
                    .iter()
                    .map(|r| r.bytes as f64 / (1 << 20) as f64)
                    .collect())
                .map_or("-".into(), |x| format!("{:.1}", x.1)),
                ok.len(),
            );
        }
    }
    let med =
        |mem: u64, m: &str| mmm(ok_of(mem, m).iter().map(|r| r.downtime_ms).collect()).map(|x| x.1);
    for &mem in &sizes {
        for other in ["docker-engine", "podman"] {
            if let (Some(p), Some(o)) = (med(mem, "phaul-docker"), med(mem, other)) {
                let _ = writeln!(
                    s,
                    "\n{mem} MiB: phaul-docker / {other} median pause: {:.2}",
                    p / o
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\nEvery run:\n\n| MiB | method | run | pause ms | total ms | steps ms | result |\n|---|---|---|---|---|---|---|"
    );
    for r in runs {
        let steps = r
            .steps_ms
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let result = match &r.error {
            None => "ok".to_string(),
            Some(e) => {
                let e: String = e.replace(['|', '\n'], " ").chars().take(300).collect();
                format!("failed: {e}")
            }
        };
        let num = |ok: bool, x: f64| if ok { format!("{x:.1}") } else { "-".into() };
        let done = r.error.is_none();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {steps} | {result} |",
            r.mem_mib,
            r.method,
            r.run,
            num(done, r.downtime_ms),
            num(done && r.total_ms > 0.0, r.total_ms),
        );
    }
    s
}
