#!/usr/bin/env bash
# `make bench`, second half: reproduces every row of the README "Performance (measured)" table
# on this machine, with the options the README shows, and the raw HSM limits measured in the
# same run. `make bench` installs the packages, builds (Release) and runs the Google Benchmark
# micro-benchmarks first; this script can also be run alone on a build: BUILD=build bench/run-all.sh
#
# In a fresh state directory BUILD/bench/state/ (wiped first) it initialises a SoftHSM2 token
# (bootstrap mode: no operator is enrolled, so `gridseal-bench rollover` can start its campaign
# unsigned), writes a throw-away TLS PKI (ca.pem, client.pem, ... next to the configurations,
# the names the README's commands use), imports three fleets:
#   .7.1 .. .7.10000       simulated meters (ECDH keys) served by gridseal-metersim, for the SES
#                          rows and the end-to-end rows (read, rollover)
#   .7.10001 .. .7.100000  more meters with plain keys, only so the SES rows see 100,000 meters
#   .8.1 .. .8.100000      `gridseal-bench make-fleet` (fleet.csv), for the DKUS rows: the DKUS
#                          bench's meter ids (from the clock) must not touch the simulated meters'
#                          replay marks
# then runs the rows phase by phase, each against the daemons that row needs (loopback, ports
# chosen by the kernel):
#   codec     gs_bench codec micro-benchmarks (no daemon)
#   SES       gridseal-sesd (TLS 1.3): raw HSM composite, SES closed and open loop
#   chain     + gridseal-metersim serve (5 ms latency) + gridseal-dkusd with [rollover] towards
#             it, the `make demo` set-up: end-to-end reads, key rollover under read load
#   DKUS      gridseal-dkusd with processes = 2, io_threads = 1, key_cache = 100000 (meter
#             records: the defaults, kept fresh by the change feed), plain TCP, after 3 warm passes: 16 x 16 (raw EAX' open
#             measured by the row), raw EAX' open alone, 16 x 64, open loop 2,000/s; the same
#             over TLS 1.3 (its own warm passes); then the DKUS defaults (key_cache = 4096).
# Each phase's dkus.toml is a link to dkus-<phase>.toml, so the commands read as in the README.
# Prints a table (row, figure, raw limit, ratio; then the commands), writes it to
# BUILD/bench/results.md and results.json (with every row's gridseal-bench --json output, the
# load average before each row, nproc and the CPU model), stops every daemon it started (also on
# failure or Ctrl-C) and exits 1 when a set-up step or a row failed.
#
# Environment: BUILD (default build), BENCH_QUICK=1 (a smoke run: small fleets, 1-3 s per row,
# 2-3 minutes), BENCH_WARM_PASSES (DKUS warm passes, default 3; 1 quick), BENCH_ROW_TIMEOUT
# (seconds one row may take before it is stopped and failed; default 900, quick 240).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
BUILD="${BUILD:-build}"
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
BIN="$BUILD/bin"
OUT="$BUILD/bench"        # results.md, results.json (the CMake binary dir of bench/ too)
DIR="$OUT/state"          # wiped and recreated
ROWS="$DIR/rows"          # per row: ID.json (the program's JSON), ID.err (its stderr)
QUICK="${BENCH_QUICK:-0}"

# shellcheck source=tools/demo/lib.sh
. "$ROOT/tools/demo/lib.sh"

q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }  # q FULL QUICK

# The README's figures; BENCH_QUICK shrinks fleets and durations, never the shape of a row.
SES_BIG=$(q 100000 4000)         # meters of the SES rows
SES_SMALL=$(q 3000 1000)         # "every meter key cached"
SES_DUR=$(q 15 2)
SES_WARM=$(q 3 1)
SES_WARM_SMALL=$(q 5 1)
SES_SWEEP=6                      # copies of each meter in the tuned SES's warm sweep
HSM_S=$(q 5 1)                   # --hsm-seconds
CHAIN_METERS=$(q 10000 500)      # simulated meters served by the relay, read and rekeyed
CHAIN_DUR=$(q 10 2)
ROLL_AFTER=$(q 5 1)
DKUS_METERS=$(q 100000 4000)
WARM_PASSES="${BENCH_WARM_PASSES:-$(q 3 1)}"
DKUS_BIND_PASSES=$(q 8 3)        # at most, after the warm passes (see dkus_phase)
DKUS_WARMUP=$(q 10 1)
DKUS_DUR=$(q 20 2)
ECHO_DUR=$(q 2 1)                 # the echo ceiling row: 1.1-1.5 M/s on 2 cores, so 6 M
ECHO_PER_METER=$(q 60 1200)       # messages (4,800,000 quick) cover 1 s warm-up + ECHO_DUR
DKUS_PER_METER=$(q 60 200)       # enough pre-sealed messages for the closed-loop rows (123,940 /s seen at 16 x 64)
DKUS_OL_WARMUP=$(q 5 2)          # closed loop (the caches are warm from the rows above), last second drains
DKUS_OL_DUR=$(q 30 3)
DKUS_DEF_WARMUP=$(q 3 1)
DKUS_DEF_DUR=$(q 20 2)
ROW_TIMEOUT="${BENCH_ROW_TIMEOUT:-$(q 900 240)}"
if [ "$CHAIN_METERS" -gt "$SES_BIG" ]; then CHAIN_METERS=$SES_BIG; fi

T_START=$SECONDS
on_exit() {
  stop_all
}
ROW_PID=
on_signal() {  # the row running (its own process group, under timeout) first, then the daemons
  echo "bench: interrupted" >&2
  if [ -n "$ROW_PID" ]; then
    kill -TERM "$ROW_PID" 2>/dev/null
    wait "$ROW_PID" 2>/dev/null
  fi
  exit 130
}
trap on_exit EXIT
trap on_signal INT TERM

finish() {
  stop_all
  local i
  printf '\n== set-up steps\n'
  for i in "${!NAMES[@]}"; do
    printf '  %-44s %-6s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${DETAILS[$i]}"
  done
  python3 "$ROOT/bench/report.py" --rows "$ROWS/rows.tsv" --setup-failed "$FAILED" \
    --quick "$QUICK" --seconds "$((SECONDS - T_START))" --md "$OUT/results.md" \
    --json "$OUT/results.json"
  local rc=$?
  if [ "$FAILED" -ne 0 ] || [ "$rc" -ne 0 ]; then
    printf '\nBENCH FAILED: see the rows and steps marked FAIL (state and logs in %s)\n' "$DIR"
    exit 1
  fi
  printf '\nBENCH PASSED in %d s (results in %s/results.{md,json}, logs in %s)\n' \
    "$((SECONDS - T_START))" "$OUT" "$DIR"
  exit 0
}

for b in gridseal gridseal-sesd gridseal-dkusd gridseal-metersim gridseal-bench gs_bench; do
  if [ ! -x "$BIN/$b" ]; then
    echo "bench: missing $BIN/$b (make build first)" >&2
    exit 1
  fi
done

# ---- rows -------------------------------------------------------------------------------------
# row ID KIND WHAT PROGRAM ARGS...: runs PROGRAM ARGS in DIR (gridseal-bench with --json,
# gs_bench with JSON output), bounded by ROW_TIMEOUT; one line per row in rows.tsv for
# report.py: id, kind, exit code, seconds, load average before, the command as shown.
quote() {  # a shell word as a reader would type it
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
row() {
  local id="$1" kind="$2" what="$3" prog="$4"
  shift 4
  local shown="$prog" a extra=()
  for a in "$@"; do shown+=" $(quote "$a")"; done
  if [ "$prog" = gs_bench ]; then
    shown="$(basename "$BUILD")/bin/$shown"
    extra=(--benchmark_format=json)
  else
    extra=(--json --quiet)
  fi
  say "[$id] $what"
  echo "  \$ $shown"
  local load t0=$SECONDS rc
  load="$(cut -d' ' -f1-3 /proc/loadavg)"
  # In the background and waited for, so that Ctrl-C or a TERM reaches on_signal at once.
  (cd "$DIR" && exec timeout --kill-after=30 "$ROW_TIMEOUT" "$BIN/$prog" "$@" "${extra[@]}") \
    >"$ROWS/$id.json" 2>"$ROWS/$id.err" &
  ROW_PID=$!
  wait "$ROW_PID"
  rc=$?
  ROW_PID=
  if [ "$rc" -eq 124 ]; then echo "  timed out after $ROW_TIMEOUT s" >>"$ROWS/$id.err"; fi
  # A warm pass (--until-done) can outlast the DKUS's idle timeout (60 s) for a connection that
  # has sent its share: gridseal-bench counts that close as a lost connection. Every message
  # answered and opened with no error is what the pass is for.
  if [ "$kind" = warm ] && [ "$rc" -eq 1 ] && python3 - "$ROWS/$id.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if d["count"] == d["answered"] == d["presealed"] and d["errors_total"] == 0
         and d["unanswered"] == 0 and d["exhausted"] == 0 else 1)
EOF
  then
    echo "  every message opened; $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["connection_errors"])' "$ROWS/$id.json") connection(s) closed after sending their share: not an error for a warm pass" |
      tee -a "$ROWS/$id.err"
    rc=0
  fi
  if [ "$rc" -ne 0 ]; then tail -n 5 "$ROWS/$id.err" | sed 's/^/  /'; fi
  python3 "$ROOT/bench/report.py" --one "$ROWS/$id.json" --kind "$kind" | sed 's/^/  /'
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$kind" "$rc" "$((SECONDS - t0))" "$load" \
    "$what" "$shown" >>"$ROWS/rows.tsv"
  echo "  exit $rc, $((SECONDS - t0)) s, load before: $load"
  return "$rc"
}

# ---- 1. state ---------------------------------------------------------------------------------
say "state directory $DIR (wiped and recreated)"
rm -rf "$DIR"
mkdir -p "$ROWS"
chmod 700 "$DIR"
: >"$ROWS/rows.tsv"
rm -f "$OUT/results.md" "$OUT/results.json"

# ses_config [HSM_LINES]: gridseal-sesd for the benchmarks, as in make demo, plus HSM_LINES.
ses_config() {
  cat <<EOF
# gridseal-sesd for the benchmarks (every key: conf/ses.toml), as in make demo.
$(hsm_store_config gridseal-bench "${1:-}")
[server]
address = "127.0.0.1"
port = 0
tls_ca = "ca.pem"
tls_cert = "server.pem"
tls_key = "server.key"
processes = 2
drain_ms = 3000
[ses]
head_end_title = ".1.9"
ses_title = ".1.10"
policy = "policy.toml"
command_key = 1
metrics_port = 0
EOF
}
write_configs() {
  ses_config >"$DIR/ses.toml"
  # Every key of the SES fleet cached in each handler's session (README "Performance").
  ses_config "key_cache = $SES_BIG" >"$DIR/ses-tuned.toml"
  # The policy of make demo, without its quorum rule (tools/demo/lib.sh).
  base_policy bench-head-end >"$DIR/policy.toml"
}
step "configuration (ses.toml, policy.toml)" "$DIR" write_configs || finish
say "SoftHSM2 token (gridseal hsm init, bootstrap mode)"
step "SoftHSM2 token (gridseal hsm init)" "no operator enrolled (bootstrap mode)" \
  "$BIN/gridseal" hsm init --config "$DIR/ses.toml" || finish
say "TLS certificates (gridseal-bench make-pki)"
step "TLS 1.3 test PKI (gridseal-bench make-pki)" "ca.pem, server.pem, client.pem in $DIR" \
  "$BIN/gridseal-bench" make-pki "$DIR" || finish

say "fleets: $CHAIN_METERS simulated (ECDH), $((SES_BIG - CHAIN_METERS)) more for the SES, $DKUS_METERS for the DKUS"
step "simulated fleet export ($CHAIN_METERS meters, ecdh)" ".7.1..7.$CHAIN_METERS" \
  export_fleet "$CHAIN_METERS" "$DIR/sim-fleet.csv" "$DIR/sim-fleet.state" || finish
step "simulated fleet import" "keys derived in the HSM" \
  "$BIN/gridseal" meters import "$DIR/sim-fleet.csv" --config "$DIR/ses.toml" || finish
if [ "$SES_BIG" -gt "$CHAIN_METERS" ]; then
  step "SES-only meters export ($((SES_BIG - CHAIN_METERS)), plain)" ".7.$((CHAIN_METERS + 1))..7.$SES_BIG" \
    "$BIN/gridseal-metersim" export --meters "$((SES_BIG - CHAIN_METERS))" \
    --first "$((CHAIN_METERS + 1))" --keys plain --out "$DIR/ses-extra.csv" \
    --state "$DIR/ses-extra.state" || finish
  step "SES-only meters import" "keys wrapped in the HSM" \
    "$BIN/gridseal" meters import "$DIR/ses-extra.csv" --config "$DIR/ses.toml" || finish
fi
step "DKUS fleet (gridseal-bench make-fleet, $DKUS_METERS)" ".8.1..8.$DKUS_METERS, fleet.csv" \
  "$BIN/gridseal-bench" make-fleet --meters "$DKUS_METERS" --title-prefix .8 \
  --out "$DIR/fleet.csv" || finish
step "DKUS fleet import" "keys wrapped in the HSM" \
  "$BIN/gridseal" meters import "$DIR/fleet.csv" --config "$DIR/ses.toml" || finish

TLS=(--ca ca.pem --cert client.pem --key client.key)

# ---- 2. codec (no daemon) ---------------------------------------------------------------------
row codec codec "codec (no HSM): decode / seal mode 2 / open mode 2" gs_bench \
  "--benchmark_filter=BM_Decode|BM_Seal|BM_Open"

# ---- 3. SES -----------------------------------------------------------------------------------
say "starting gridseal-sesd (TLS 1.3)"
step "start gridseal-sesd" "2 workers, TLS 1.3" \
  start_daemon gridseal-sesd "$DIR/sesd.out" "$BIN/gridseal-sesd" --config "$DIR/ses.toml" || finish
SES_PORT=$STARTED_PORT
SES_PID=$STARTED_PID
# ses_load METERS CONNECTIONS DEPTH: the README's SES command up to --duration.
ses_load() {
  SES=(ses --host 127.0.0.1 --port "$SES_PORT" "${TLS[@]}" --meters "$1" --title-prefix .7
    --connections "$2" --depth "$3" --duration "$SES_DUR")
}
row ses-raw ses-raw "raw HSM composite (C_Sign with a session copy of gs-cmd-1 + EAX' seal, 2 processes)" gridseal-bench \
  ses --hsm-config ses.toml --hsm-only --hsm-processes 2 --hsm-threads 1 --hsm-seconds "$HSM_S"
ses_load "$SES_BIG" 32 16
row ses-closed ses "SES, $SES_BIG meters, TLS 1.3, 32 x 16, closed loop" gridseal-bench \
  "${SES[@]}" --warmup "$SES_WARM"
ses_load "$SES_SMALL" 32 16
row ses-cached ses "SES, $SES_SMALL meters (every key cached), same load" gridseal-bench \
  "${SES[@]}" --warmup "$SES_WARM_SMALL"
ses_load "$SES_BIG" 64 32
row ses-open-2000 ses-open "SES open loop, $SES_BIG meters, 2,000 /s" gridseal-bench \
  "${SES[@]}" --warmup "$SES_WARM" --rate 2000
row ses-open-1500 ses-open "SES open loop, $SES_BIG meters, 1,500 /s" gridseal-bench \
  "${SES[@]}" --warmup "$SES_WARM" --rate 1500

# The cost of the audit trail (README "Audit trail", issue 7): the cached-keys load against this
# SES (audit on, the defaults) and, back to back, against one with `[audit] enabled = false`.
ses_load "$SES_SMALL" 32 16
row ses-audit-on ses "SES audit on (defaults), $SES_SMALL meters, 32 x 16" gridseal-bench \
  "${SES[@]}" --warmup "$SES_WARM_SMALL"
stop_one "$SES_PID"
{ cat "$DIR/ses.toml"; printf '[audit]\nenabled = false\n'; } >"$DIR/ses-noaudit.toml"
step "start gridseal-sesd, audit off" "2 workers, TLS 1.3, [audit] enabled = false" \
  start_daemon gridseal-sesd "$DIR/sesd-noaudit.out" "$BIN/gridseal-sesd" \
  --config "$DIR/ses-noaudit.toml" || finish
SES_PORT=$STARTED_PORT
ses_load "$SES_SMALL" 32 16
row ses-audit-off ses "SES audit off, same load (ses-noaudit.toml)" gridseal-bench \
  "${SES[@]}" --warmup "$SES_WARM_SMALL"
stop_one "$STARTED_PID"

# The SES with a fleet-sized key cache (`key_cache = SES_BIG`, ses-tuned.toml), warmed by one
# sweep that sends every meter SES_SWEEP times, each copy on another connection (so nearly every
# meter reaches both workers); then the closed-loop row, and the open loop at 80 % of its peak.
step "start gridseal-sesd, tuned" "2 workers, TLS 1.3, key_cache = $SES_BIG" \
  start_daemon gridseal-sesd "$DIR/sesd-tuned.out" "$BIN/gridseal-sesd" \
  --config "$DIR/ses-tuned.toml" || finish
SES_PORT=$STARTED_PORT
ses_load "$SES_BIG" 32 16
if row warm-ses-sweep ses-warm "sweep: every one of $SES_BIG meters $SES_SWEEP times (tuned SES)" \
  gridseal-bench ses --host 127.0.0.1 --port "$SES_PORT" "${TLS[@]}" --meters "$SES_BIG" \
  --title-prefix .7 --connections 32 --depth 16 --sweep "$SES_SWEEP" --warmup 0 --duration 1800; then
  row ses-tuned-closed ses "SES, $SES_BIG meters, key_cache = $SES_BIG (ses-tuned.toml), 32 x 16" \
    gridseal-bench "${SES[@]}" --warmup "$SES_WARM"
  PEAK80=$(python3 -c 'import json,sys; print(max(100, int(0.8 * json.load(open(sys.argv[1]))["secured_per_s"])))' \
    "$ROWS/ses-tuned-closed.json" 2>/dev/null || echo 0)
  if [ "$PEAK80" -gt 0 ]; then
    # The peak's own shape (32 x 16): 80 % of what that client reached closed loop. Then the
    # same rate over 64 x 32, as this row was run before session 16: twice the connections
    # carry one request per TLS record and per send/recv each, which cost the SES 4 us and the
    # load generator (on the same 2 cores) 4.5 us more per command in 4 of 4 pairs.
    ses_load "$SES_BIG" 32 16
    row ses-tuned-open-80 ses-tuned-open "SES open loop, tuned, 80 % of the row above ($PEAK80 /s), 32 x 16" \
      gridseal-bench "${SES[@]}" --warmup "$SES_WARM" --rate "$PEAK80"
    ses_load "$SES_BIG" 64 32
    row ses-tuned-open-80-wide ses-tuned-open "SES open loop, tuned, the same rate over 64 x 32" \
      gridseal-bench "${SES[@]}" --warmup "$SES_WARM" --rate "$PEAK80"
  fi
fi
stop_one "$STARTED_PID"
step "restart gridseal-sesd (audit on)" "2 workers, TLS 1.3" \
  start_daemon gridseal-sesd "$DIR/sesd-2.out" "$BIN/gridseal-sesd" --config "$DIR/ses.toml" || finish
SES_PORT=$STARTED_PORT
SES_PID=$STARTED_PID

# ---- 4. end to end: SES -> relay/meter -> DKUS (the make demo set-up) -------------------------
# dkus_config NAME HSM_LINES SERVER_LINES DKUS_LINES [MORE]: writes dkus-NAME.toml and points
# dkus.toml at it (the README's commands say dkus.toml).
dkus_config() {
  cat >"$DIR/dkus-$1.toml" <<EOF
# gridseal-dkusd for the benchmarks, phase $1 (every key: conf/dkus.toml).
$(hsm_store_config gridseal-bench "$2")
[server]
address = "127.0.0.1"
port = 0
drain_ms = 3000
$3
[dkus]
dkus_title = ".1.11"
head_end_title = ".1.9"
metrics_port = 0
$4
${5:-}
EOF
  ln -sfn "dkus-$1.toml" "$DIR/dkus.toml"
}
TLS_SERVER='tls_ca = "ca.pem"
tls_cert = "server.pem"
tls_key = "server.key"'

say "starting gridseal-metersim serve and gridseal-dkusd (TLS 1.3, [rollover] towards the relay)"
CHAIN_OK=1
step "start gridseal-metersim serve" "relay + $CHAIN_METERS meters, 5 ms latency, TLS 1.3" \
  start_daemon gridseal-metersim "$DIR/metersim.out" "$BIN/gridseal-metersim" serve \
  --state "$DIR/sim-fleet.state" --listen 127.0.0.1:0 --tls-ca "$DIR/ca.pem" \
  --tls-cert "$DIR/server.pem" --tls-key "$DIR/server.key" --latency-ms 5 || CHAIN_OK=0
RELAY_PORT=$STARTED_PORT
if [ "$CHAIN_OK" = 1 ]; then
  # The rollover engine's settings of make demo: 2 relay connections x 16.
  dkus_config chain "" "$TLS_SERVER
processes = 2" "" "[rollover]
enabled = true
relay_address = \"127.0.0.1\"
relay_port = $RELAY_PORT
relay_tls_ca = \"ca.pem\"
relay_tls_cert = \"client.pem\"
relay_tls_key = \"client.key\"
command_key = 1
connections = 2
pipeline_depth = 16
answer_timeout_ms = 5000
backoff_initial_ms = 500"
  step "start gridseal-dkusd (chain)" "2 workers, TLS 1.3, rollover engine -> relay" \
    start_daemon gridseal-dkusd "$DIR/dkusd-chain.out" "$BIN/gridseal-dkusd" \
    --config "$DIR/dkus.toml" || CHAIN_OK=0
  DKUS_PID=$STARTED_PID
fi
if [ "$CHAIN_OK" = 1 ]; then
  CHAIN=(--ses "127.0.0.1:$SES_PORT" --relay "127.0.0.1:$RELAY_PORT" --dkus "127.0.0.1:$STARTED_PORT"
    "${TLS[@]}")
  row read chain "end to end (SES -> relay/meter -> DKUS), $CHAIN_METERS meters, TLS, 4 x 8" \
    gridseal-bench read "${CHAIN[@]}" --meters "$CHAIN_METERS" --connections 4 --depth 8 \
    --duration "$CHAIN_DUR"
  row rollover rollover "key rollover of all $CHAIN_METERS meters under end-to-end reads, 4 x 8" \
    gridseal-bench rollover "${CHAIN[@]}" --config dkus.toml --meters "$CHAIN_METERS" \
    --connections 4 --depth 8 --duration "$CHAIN_DUR" --after "$ROLL_AFTER"
  stop_one "$DKUS_PID"
fi
stop_all  # the SES and the relay: the DKUS rows have the cores to themselves

# ---- 5. DKUS alone ----------------------------------------------------------------------------
# dkus_phase NAME "DESCRIPTION" TRANSPORT...: starts gridseal-dkusd on dkus.toml, runs the warm
# passes (one reading of every meter each, filling both workers' key and meter caches; the
# kernel spreads connections over the workers by hash, hence several passes) when WARM=1.
DKUS_BASE=()
dkus_phase() {
  local name="$1" desc="$2"
  shift 2
  say "starting gridseal-dkusd ($desc)"
  step "start gridseal-dkusd ($name)" "$desc" start_daemon gridseal-dkusd \
    "$DIR/dkusd-$name.out" "$BIN/gridseal-dkusd" --config "$DIR/dkus.toml" || return 1
  DKUS_PID=$STARTED_PID
  # --store: each meter's ids start above the replay mark the DKUS stored for it. The ids
  # otherwise come from the clock (10 a second), and a fast row of a small fleet (BENCH_QUICK)
  # runs them ahead of it, so that the next phase's first pass was refused as replays.
  DKUS_BASE=(dkus --host 127.0.0.1 --port "$STARTED_PORT" "$@" --fleet fleet.csv --store gridseal.db)
  local i
  for i in $(seq 1 "$WARM"); do
    row "warm-$name-$i" warm "warm pass $i/$WARM ($name): one reading of each of $DKUS_METERS meters" \
      gridseal-bench "${DKUS_BASE[@]}" --connections 16 --depth 16 --per-meter 1 --until-done \
      --duration 600 --warmup 0 || return 1
  done
  # A key gets its bound AES operations on its second use in a worker, and every bench run's
  # connections land on the workers anew, so after those passes some keys are still unbound in
  # some worker; binding them opens two PKCS#11 sessions each, which SoftHSM2 does in time linear
  # in the sessions it already has (100-300 us with 100,000-200,000 open). Measured rows would
  # pay that warm-up. So: passes of two readings per meter until every worker has 99 % of the
  # keys bound (gridseal_hsm_bound_aes_sessions in_use / 2), at most DKUS_BIND_PASSES. Each pass
  # lands each meter on a worker at random, so the unbound share about halves per pass and all
  # 100 % would take some 17 passes.
  [ "$WARM" -gt 0 ] || return 0
  local metrics_port
  metrics_port=$(grep -o 'metrics on [0-9.:]*' "$DIR/dkusd-$name.out" | tail -1 | awk -F: '{print $NF}')
  for i in $(seq 1 "$DKUS_BIND_PASSES"); do
    all_bound "$metrics_port" "$DKUS_METERS" && return 0
    row "warm-$name-bind-$i" warm "bind pass $i ($name): two readings of each of $DKUS_METERS meters" \
      gridseal-bench "${DKUS_BASE[@]}" --connections 16 --depth 16 --per-meter 2 --until-done \
      --duration 600 --warmup 0 || return 1
  done
  all_bound "$metrics_port" "$DKUS_METERS" ||
    say "note: after $DKUS_BIND_PASSES bind passes some worker has under 99 % of the keys bound"
  return 0
}
# all_bound METRICS_PORT METERS: true when every worker has bound operations (two sessions each) for
# at least 99 % of METERS keys.
all_bound() {
  python3 - "$1" "$2" <<'EOF_PY'
import re, sys, urllib.request
port, meters = sys.argv[1], int(sys.argv[2])
try:
    text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % port, timeout=5).read().decode()
except Exception as e:
    print("  bound keys: metrics unreadable (%s)" % e)
    sys.exit(1)
used = {w: int(float(v)) for w, v in re.findall(
    r'^gridseal_hsm_bound_aes_sessions\{worker="(\d+)",state="in_use"\} (\S+)', text, re.M)}
print("  bound keys per worker: %s (of %d)" % (
    ", ".join("%s: %d" % (w, n // 2) for w, n in sorted(used.items())) or "none", meters))
sys.exit(0 if used and all(n // 2 >= 0.99 * meters for n in used.values()) else 1)
EOF_PY
}
# The README's DKUS set-up: every key of the 100,000 meters cached in each worker.
TUNED_HSM='key_cache = 100000'
TUNED_SERVER='processes = 2
io_threads = 1'
# Meter records: the defaults (meter_cache_ttl_ms = 300000, refreshed from the store's change feed
# every meter_cache_poll_ms = 100), no longer a 10-minute TTL as before the feed.
TUNED_DKUS=''
dkus_load() {  # the README's DKUS command after --fleet fleet.csv, DEPTH as given
  DKUS=("${DKUS_BASE[@]}" --connections 16 --depth "$1" --warmup "$DKUS_WARMUP"
    --duration "$DKUS_DUR" --per-meter "$DKUS_PER_METER" --hsm-config dkus.toml --hsm-seconds "$HSM_S")
}

dkus_config tuned "$TUNED_HSM" "plain_tcp = true
$TUNED_SERVER" "$TUNED_DKUS"
WARM=$WARM_PASSES
if dkus_phase tuned "processes 2 x io_threads 1, key_cache 100000, plain TCP" --plain; then
  dkus_load 16
  row dkus-16x16 dkus "DKUS, $DKUS_METERS meters, plain TCP, 16 x 16, closed loop, keys cached" \
    gridseal-bench "${DKUS[@]}"
  row dkus-raw dkus-raw "raw HSM EAX' open (200 bytes, key handle and subkeys cached, 2 x 1)" \
    gridseal-bench dkus --hsm-config dkus.toml --hsm-only --hsm-processes 2 --hsm-threads 1 \
    --hsm-seconds "$HSM_S"
  # The same raw open with one C_EncryptInit per step, as a PKCS#11 client without bound
  # operations makes it (hsm.bound_aes = false).
  sed 's/^\[hsm\]$/[hsm]\nbound_aes = false/' "$DIR/dkus.toml" > "$DIR/dkus-init.toml"
  row dkus-raw-init dkus-raw \
    "raw HSM EAX' open, one C_EncryptInit per step (hsm.bound_aes = false), 2 x 1" \
    gridseal-bench dkus --hsm-config dkus-init.toml --hsm-only --hsm-processes 2 --hsm-threads 1 \
    --hsm-seconds "$HSM_S"
  # The ceiling of these rows on this machine: the 16 x 16 load against `gridseal-bench echo`,
  # a loopback server that only writes back what it reads (no framing, crypto or state), the
  # raw open measured after it. No server doing the DKUS's work can pass what the load
  # generator and loopback TCP leave here (README, "Against the goals").
  step "start gridseal-bench echo" "loopback echo server, 2 threads" \
    start_daemon gridseal-bench-echo "$DIR/echo.out" "$BIN/gridseal-bench" echo --threads 2 &&
    row dkus-echo dkus-echo "ceiling: the 16 x 16 load against gridseal-bench echo (no server work)" \
      gridseal-bench dkus --host 127.0.0.1 --port "$STARTED_PORT" --plain --fleet fleet.csv --echo \
      --connections 16 --depth 16 --warmup 1 --duration "$ECHO_DUR" --per-meter "$ECHO_PER_METER" \
      --hsm-config dkus.toml --hsm-seconds "$HSM_S" &&
    stop_one "$STARTED_PID" && say "echo server: $(tail -n 1 "$DIR/echo.out")"
  dkus_load 64
  row dkus-16x64 dkus "DKUS, same, 16 x 64" gridseal-bench "${DKUS[@]}"
  row dkus-open-2000 dkus-open "DKUS open loop, same set-up, 2,000 /s" gridseal-bench \
    "${DKUS_BASE[@]}" --connections 16 --depth 32 --rate 2000 --warmup "$DKUS_OL_WARMUP" \
    --duration "$DKUS_OL_DUR" --hsm-config dkus.toml --hsm-seconds "$HSM_S"
fi
stop_all

dkus_config tuned-tls "$TUNED_HSM" "$TLS_SERVER
$TUNED_SERVER" "$TUNED_DKUS"
if dkus_phase tuned-tls "the same over TLS 1.3" "${TLS[@]}"; then
  dkus_load 16
  row dkus-tls dkus "DKUS, same, TLS 1.3, 16 x 16" gridseal-bench "${DKUS[@]}"
fi
stop_all

dkus_config defaults "" "plain_tcp = true
processes = 2" ""
WARM=0
if dkus_phase defaults "the defaults: 2 processes x 2 io_threads, key_cache 4096, plain TCP" --plain; then
  row dkus-defaults dkus "DKUS with the defaults, $DKUS_METERS meters, 16 x 16 (key-cache misses)" \
    gridseal-bench "${DKUS_BASE[@]}" --connections 16 --depth 16 --warmup "$DKUS_DEF_WARMUP" \
    --duration "$DKUS_DEF_DUR" --per-meter "$DKUS_PER_METER" --hsm-config dkus.toml \
    --hsm-seconds "$HSM_S"
fi
stop_all

finish
