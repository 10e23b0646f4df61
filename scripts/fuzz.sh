#!/usr/bin/env bash
# Build every cargo-fuzz target in fuzz/ and run each for SECONDS (default
# 30), starting from the seed corpus in fuzz/corpus/<target>/. Prints the
# executions per target; exits non-zero on any crash (the input is left in
# fuzz/artifacts/<target>/). Installs cargo-fuzz if it is missing.
#
#   ./scripts/fuzz.sh          # 30 s per target
#   ./scripts/fuzz.sh 600      # longer, by hand
#
# New inputs the fuzzer finds go to fuzz/corpus-run/<target>/ (not
# committed; reused by the next run), never into the seed corpus.
# Needs a nightly toolchain (`cargo +nightly`); without one it uses the
# stable toolchain with RUSTC_BOOTSTRAP=1 for the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 2; }
CARGO_FUZZ_VERSION=0.13.2
targets=(frame hello criu_rpc fsync_receiver)

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
fi
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  echo "[fuzz] no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

cd fuzz
start=$SECONDS
echo "[fuzz] building ${#targets[@]} targets"
"${fuzz[@]}" build
echo "[fuzz] built in $((SECONDS - start)) s; running each for ${secs} s"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus-run/$t" "artifacts/$t"
  log="artifacts/$t/last-run.log"
  rc=0
  # -max_len: the largest seed is a few hundred bytes; 64 KiB leaves room
  # for several frames and a CRIU packet of the 64 KiB the worker accepts.
  "${fuzz[@]}" run "$t" "corpus-run/$t" "corpus/$t" -- \
    -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  if [ "$rc" -eq 0 ]; then
    echo "[fuzz] $t: ${runs:-?} executions in ${secs} s, ${cov:-cov: ?}, no crash"
  else
    echo "[fuzz] $t: FAILED after ${runs:-?} executions (exit $rc); log $PWD/$log:" >&2
    grep -E -A12 'panicked at|ERROR: (libFuzzer|AddressSanitizer)' "$log" | head -40 >&2 || tail -30 "$log" >&2
    ls artifacts/"$t"/crash-* artifacts/"$t"/timeout-* artifacts/"$t"/oom-* 2>/dev/null >&2 || true
    failed+=("$t")
  fi
done

echo "[fuzz] total $((SECONDS - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "[fuzz] crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
