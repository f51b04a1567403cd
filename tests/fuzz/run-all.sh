#!/usr/bin/env bash
# Runs every libFuzzer target in BIN_DIR for SECONDS each, seeded from tests/fuzz/corpus/<target>;
# new inputs go to a temporary directory (never into the repository). Crashes are kept in
# BIN_DIR/../fuzz-artifacts. Exit 1 when any target finds a problem.
# FUZZ_JOBS targets run at the same time (default: the number of cores), each for its full
# SECONDS on its own core: libFuzzer is single-threaded, so CI's 5 x 20 s take 60 s instead of 100.
# Results are printed in corpus order once all have finished.
set -euo pipefail

BIN_DIR=${1:?usage: run-all.sh BIN_DIR SECONDS}
SECONDS_EACH=${2:?usage: run-all.sh BIN_DIR SECONDS}
JOBS=${FUZZ_JOBS:-$(nproc)}
HERE=$(cd "$(dirname "$0")" && pwd)
ARTIFACTS=$(cd "$BIN_DIR/.." && pwd)/fuzz-artifacts
mkdir -p "$ARTIFACTS"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One target: its log in $work/<target>.log, its exit status in $work/<target>.rc.
fuzz_one() {
  local target=$1 bin=$2 corpus=$3 rc=0
  "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -print_final_stats=1 -artifact_prefix="$ARTIFACTS/$target-" \
    "$work/$target" "$corpus" >"$work/$target.log" 2>&1 || rc=$?
  echo "$rc" >"$work/$target.rc"
}

failed=()
targets=()
running=0
for corpus in "$HERE"/corpus/*/; do
  target=$(basename "$corpus")
  bin="$BIN_DIR/${target}_fuzz"
  if [ ! -x "$bin" ]; then
    echo "run-all: missing $bin (build with GS_FUZZ=ON)" >&2
    failed+=("$target(missing)")
    continue
  fi
  mkdir -p "$work/$target"
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true  # a target's status is in its .rc file
    running=$((running - 1))
  fi
  echo "== $target: ${SECONDS_EACH}s (started)"
  fuzz_one "$target" "$bin" "$corpus" &
  running=$((running + 1))
  targets+=("$target")
done
wait

ran=0
for target in "${targets[@]}"; do
  echo "== $target: ${SECONDS_EACH}s"
  if [ "$(cat "$work/$target.rc" 2>/dev/null || echo 1)" -eq 0 ]; then
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$work/$target.log" | tr '\n' ' '
    echo
  else
    echo "run-all: $target FAILED; last lines of its log:" >&2
    tail -40 "$work/$target.log" >&2
    failed+=("$target")
  fi
  ran=$((ran + 1))
done
if [ "$ran" -eq 0 ]; then
  echo "run-all: no corpus directories under $HERE/corpus" >&2
  exit 1
fi
if [ ${#failed[@]} -ne 0 ]; then
  echo "run-all: FAILED: ${failed[*]} (artifacts in $ARTIFACTS)" >&2
  exit 1
fi
echo "run-all: $ran fuzz targets ran ${SECONDS_EACH}s each without findings"
