#!/usr/bin/env bash
# Build the workspace and run the full chaos matrix of phaul's commit
# protocol with real CRIU (as root): every victim (source/destination phaul,
# source/destination CRIU worker, the connection) at every stall point
# (Restore, Restored, Commit, Resumed), then seeded random-moment kills;
# then the same points with LXC containers (source/destination phaul, the
# connection).
# The matrix is printed at the end; PHAUL_CHAOS_SEED=N repeats a run's
# random kills. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
echo "[chaos] building the workspace (binaries, plugins, tests)"
cargo build --workspace --all-targets --quiet

# The process matrix (tests/tests/chaos.rs), then the LXC one
# (tests/tests/lxc.rs: every victim at every point, with real containers).
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run -p phaul-tests --test chaos --test lxc --run-ignored only --no-capture "$@"
else
  cargo test -p phaul-tests --test chaos --test lxc -- --ignored --nocapture "$@"
fi
