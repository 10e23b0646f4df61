#!/usr/bin/env python3
"""Draws bench/results/results.json (written by phaul-bench) as PNGs:
application-observed downtime against memory size, one line per method
(median, with min-max error bars), one panel per dirtying rate; and, next
to it (channel.png), phaul's memory-channel rate with TLS and with
--insecure against the raw channels measured in the same run."""
import json
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json"
dst = sys.argv[2] if len(sys.argv) > 2 else src.rsplit("/", 1)[0] + "/downtime.png"
doc = json.load(open(src))
runs = [r for r in doc["runs"] if not r.get("error")]
if not runs:
    # A run of the container methods only (their rows are in results.md).
    print(f"{src}: no process runs to plot")
    sys.exit(0)
rates = sorted({r["dirty_pct"] for r in runs})
fig, axes = plt.subplots(1, len(rates), figsize=(max(8, 5 * len(rates)), 4.2), squeeze=False, sharey=True)
def plot_medians(ax, by):
    """One line per method: the median per size, whiskers to min and max."""
    for method, sizes in sorted(by.items()):
        xs = sorted(sizes)
        med = [statistics.median(sizes[x]) for x in xs]
        lo = [m - min(sizes[x]) for m, x in zip(med, xs)]
        hi = [max(sizes[x]) - m for m, x in zip(med, xs)]
        color, marker = styles.get(method, ("gray", "x"))
        label = "phaul (TLS)" if method == "phaul" else method
        ax.errorbar(xs, med, yerr=[lo, hi], label=label, color=color, marker=marker, capsize=3)


styles = {"phaul": ("tab:blue", "o"), "phaul-insecure": ("tab:purple", "D"), "phaul-baseline": ("tab:cyan", "v"), "naive": ("tab:red", "s"), "floor": ("tab:green", "^")}
for ax, rate in zip(axes[0], rates):
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["dirty_pct"] == rate:
            by[r["method"]][r["mem_mib"]].append(r["downtime_ms"])
    plot_medians(ax, by)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workload memory (MiB)")
    ax.set_title(f"{rate:g}% of pages dirtied per second")
    ax.grid(True, which="both", alpha=0.3)
axes[0][0].set_ylabel("downtime seen by the application (ms)")
axes[0][0].legend()
m = doc["machine"]
fig.suptitle(f"phaul vs dump-copy-restore vs the no-copy floor — {m['cpus']} CPUs, Linux {m['kernel']}, {doc['date']}", fontsize=10)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")

# The memory channel: TLS against --insecure, and the raw channels.
chan = [r for r in runs if r.get("channel_mib_s") and r["method"].startswith("phaul")]
if chan:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by = defaultdict(lambda: defaultdict(list))
    for r in chan:
        by[r["method"]][r["mem_mib"]].append(r["channel_mib_s"])
    plot_medians(ax, by)
    c = doc["channel"]
    ax.axhline(c["tcp_mib_s"], color="gray", ls="--", label="raw loopback TCP")
    if c.get("tls_mib_s"):
        ax.axhline(c["tls_mib_s"], color="tab:blue", ls=":", label="raw stream through the TLS relays")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("workload memory (MiB)")
    ax.set_ylabel("memory channel during the final dump (MiB/s)")
    ax.set_title(f"memory channel, TLS vs --insecure — {m['cpus']} CPUs, {doc['date']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    cdst = dst.rsplit("/", 1)[0] + "/channel.png" if "/" in dst else "channel.png"
    fig.savefig(cdst, dpi=110)
    print(f"wrote {cdst}")
