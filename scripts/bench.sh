#!/usr/bin/env bash
# Set up a fresh machine (as root), build phaul in release mode, and run the
# benchmark: phaul (mutual TLS, certificates made for the run with
# `phaul certs`), phaul with --post-copy and with --pre-copy=uffd, and
# phaul --insecure against dump-copy-restore and the
# no-copy floor, side by side, and an LXC container moved by phaul and by
# hand with lxc-checkpoint (skipped without LXC), then draw the plots.
# Results go to bench/results/ (results.json, results.md, downtime.png,
# channel.png). Arguments are passed to phaul-bench, e.g.
#   ./scripts/bench.sh --sizes 64,256 --runs 3
# The container methods run only when named: a Docker container moved by
# Docker's own checkpoint between two engines (scripts/docker-engines.sh), by
# Podman's checkpoint export/import, and by phaul's docker htype:
#   ./scripts/bench.sh --methods docker-engine,podman,phaul-docker --sizes 64,256 \
#       --runs 3 --lxc-sizes 0
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib
command -v podman >/dev/null || apt-get install -y --no-install-recommends podman

echo "[bench] building (release)"
cargo build --release --quiet
target/release/phaul-bench --out bench/results "$@"
python3 bench/plot.py bench/results/results.json bench/results/downtime.png
