#!/usr/bin/env bash
# Set up a fresh machine (as root), build phaul, and run the main job: a
# live migration of a running workload (256 MiB of memory, 5% of it
# rewritten per second, a heartbeat every millisecond) from this host to a
# `phaul serve` on loopback over mutual TLS (the demo makes its own CA and
# two host certificates), with real CRIU. The workload checks every page
# of its memory after the move and reports the longest pause it noticed.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "[demo] building phaul (release)"
cargo build --release --quiet
bin=target/release
mkdir -p "$bin/plugins"
cp "$bin"/libphaul_pid.so "$bin/plugins/"
phaul="$bin/phaul"

echo "[demo] available htypes:"
"$phaul" htypes

state=$(mktemp -d /dev/shm/phaul-demo.XXXXXX)
serve_log="$state/serve.log"
cleanup() {
  [ -n "${new_pid:-}" ] && kill -KILL "$new_pid" 2>/dev/null || true
  [ -n "${pid:-}" ] && kill -KILL "$pid" 2>/dev/null || true
  [ -n "${serve_pid:-}" ] && kill "$serve_pid" 2>/dev/null || true
  rm -rf "$state"
}
trap cleanup EXIT

echo "[demo] certificates: a CA, then one certificate per host (phaul certs)"
"$phaul" certs init --dir "$state/ca" >/dev/null
"$phaul" certs issue --dir "$state/ca" --name dst --also 127.0.0.1 --out "$state/dst-tls" >/dev/null
"$phaul" certs issue --dir "$state/ca" --name src --out "$state/src-tls" >/dev/null

echo "[demo] starting the destination: phaul serve --listen 127.0.0.1:7070 --tls-dir dst-tls --allow-peer src --once"
"$phaul" serve --listen 127.0.0.1:7070 --tls-dir "$state/dst-tls" --allow-peer src --once \
  >"$state/serve.out" 2>"$serve_log" &
serve_pid=$!
for _ in $(seq 50); do grep -q listening "$state/serve.out" 2>/dev/null && break; sleep 0.1; done

echo "[demo] starting the workload (256 MiB, 5%/s dirtied) in its own PID namespace"
pid=$("$bin/phaul-workload" spawn --pidns -- --state-dir "$state" --mem-mib 256 --dirty-pct 5)
sleep 1
before=$("$bin/phaul-workload" report --state-dir "$state" --pid "$pid")
echo "[demo] workload pid $pid: $(echo "$before" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("counter %d, %d pages verified, %d bad" % (s["counter"], s["pages_verified"], s["pages_bad"]))')"

echo "[demo] phaul migrate pid $pid --to 127.0.0.1:7070 --tls-dir src-tls"
"$phaul" migrate pid "$pid" --to 127.0.0.1:7070 --tls-dir "$state/src-tls" | tee "$state/summary.txt"
new_pid=$(sed -n 's/.*(pid \([0-9]*\) there).*/\1/p' "$state/summary.txt")
wait "$serve_pid" || true
serve_pid=

after=$("$bin/phaul-workload" report --state-dir "$state" --pid "$new_pid")
echo "$after" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("[demo] after the move: pid %d in its namespace, counter %d (it kept counting)," % (s["pid"], s["counter"]))
print("       %d pages verified, %d bad;" % (s["pages_verified"], s["pages_bad"]))
print("       longest pause the workload itself saw: %.1f ms" % (s["window_max_gap_us"] / 1000))
'
if kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; then
  echo "[demo] error: the source copy still runs" >&2; exit 1
fi
echo "[demo] the source copy is gone; the workload runs as pid $new_pid. Done."
