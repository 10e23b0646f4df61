#!/usr/bin/env bash
# Set up a fresh machine (as root), build phaul in release mode, install the
# driver plugins next to the binary, and show what phaul can migrate.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "[demo] building phaul (release)"
cargo build --release --quiet
bin=target/release
mkdir -p "$bin/plugins"
cp "$bin"/libphaul_pid.so "$bin/plugins/"

echo "[demo] phaul htypes"
"$bin/phaul" htypes
