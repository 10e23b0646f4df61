//! The results as a Markdown table: min/median/max per method and
//! workload, the ratios phaul/floor and phaul/naive, and the targets.

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

/// The table.
pub fn markdown(machine: &Value, channel: &Channel, runs: &[RunResult]) -> String {
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
        "# phaul benchmark\n\nMachine: {} ({} CPUs, {} GiB), Linux {}, {}. Date: {}.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["criu"].as_str().unwrap_or("?"),
        today()
    );
    let _ = writeln!(
        s,
        "Each cell: median (min–max) over the runs. Downtime is the largest gap in the workload's own \
         1 ms heartbeat across the migration. phaul: live migration over loopback; naive: criu dump to \
         disk, cp -a, criu restore; floor: criu dump to tmpfs, criu restore from it (no copy). \
         {failed} run(s) failed.\n"
    );
    let _ = writeln!(
        s,
        "| MiB | dirty %/s | method | downtime ms | CRIU frozen ms | total ms | MiB moved | phaul overhead ms | phaul CPU ms | phaul peak RSS MiB (src/dst) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let keys: Vec<Key> = {
        let mut k: Vec<Key> = by.keys().map(|(k, _)| *k).collect();
        k.dedup();
        k
    };
    for key in &keys {
        for m in ["phaul", "naive", "floor"] {
            let Some(v) = by.get(&(*key, m)) else {
                continue;
            };
            let col = |f: &dyn Fn(&RunResult) -> f64| cell(mmm(v.iter().map(|r| f(r)).collect()));
            let opt = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                let xs: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
                cell(mmm(xs))
            };
            let rss = if m == "phaul" {
                let src = v
                    .iter()
                    .filter_map(|r| r.phaul_src_maxrss_kib)
                    .max()
                    .unwrap_or(0);
                let dst = v
                    .iter()
                    .filter_map(|r| r.phaul_dst_maxrss_kib)
                    .max()
                    .unwrap_or(0);
                format!("{:.1} / {:.1}", src as f64 / 1024.0, dst as f64 / 1024.0)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {m} | {} | {} | {} | {:.1} | {} | {} | {rss} |",
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
                opt(&|r| r.overhead_ms),
                opt(&|r| r.phaul_cpu_ms),
            );
        }
    }
    let _ = writeln!(s, "\n## Ratios (median downtime)\n");
    let _ = writeln!(s, "| MiB | dirty %/s | phaul / floor | phaul / naive |");
    let _ = writeln!(s, "|---|---|---|---|");
    for key in &keys {
        let p = med(*key, "phaul", &|r| r.downtime_ms);
        let f = med(*key, "floor", &|r| r.downtime_ms);
        let n = med(*key, "naive", &|r| r.downtime_ms);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            key.0,
            key.1 as f64 / 100.0,
            ratio(p, f),
            ratio(p, n)
        );
    }
    let _ = writeln!(s, "\n## Targets\n");
    let mut targets = Vec::new();
    let worst_ratio = keys
        .iter()
        .filter_map(|k| {
            Some(med(*k, "phaul", &|r| r.downtime_ms)? / med(*k, "floor", &|r| r.downtime_ms)?)
        })
        .fold(0.0f64, f64::max);
    targets.push(format!(
        "- phaul downtime within 1.2x of the floor at every size: worst ratio {worst_ratio:.2} — {}",
        if worst_ratio <= 1.2 { "met" } else { "missed" }
    ));
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
    // The channel's rate where it matters most: the largest workload.
    let largest = runs
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.mem_mib)
        .max()
        .unwrap_or(0);
    let chan = mmm(runs
        .iter()
        .filter(|r| r.mem_mib == largest && r.error.is_none())
        .filter_map(|r| r.channel_mib_s)
        .collect());
    if let Some((_, med, _)) = chan {
        let pct = 100.0 * med / channel.tcp_mib_s;
        targets.push(format!(
            "- memory channel during the dump ({largest} MiB, pages over CRIU's memwrite time): {med:.0} MiB/s vs \
             plain loopback TCP {:.0} MiB/s = {pct:.0}% (target >= 80%) — {}",
            channel.tcp_mib_s,
            if pct >= 80.0 { "met" } else { "missed" }
        ));
    }
    let peak = runs
        .iter()
        .filter_map(|r| Some(r.phaul_src_maxrss_kib?.max(r.phaul_dst_maxrss_kib?)))
        .max()
        .unwrap_or(0);
    targets.push(format!(
        "- phaul peak memory per process: {:.1} MiB (target < 64 MiB at every size) — {}",
        peak as f64 / 1024.0,
        if peak < 64 * 1024 { "met" } else { "missed" }
    ));
    for t in targets {
        let _ = writeln!(s, "{t}");
    }
    s
}
