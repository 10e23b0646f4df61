#!/usr/bin/env bash
# Set up a fresh machine (as root) and run phaul's whole test suite: format
# and lint checks, unit tests, and integration tests that migrate real
# processes with real CRIU. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "[test] building the workspace (binaries, plugins, test plugins)"
cargo build --workspace --all-targets --quiet
echo "[test] fuzzing: 20 s per target (longer by hand: ./scripts/fuzz.sh 600)"
./scripts/fuzz.sh 20

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
