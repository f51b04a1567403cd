# shellcheck shell=bash
# Shell functions shared by tools/demo/demo.sh (`make demo`) and bench/run-all.sh (`make bench`):
# step bookkeeping, starting and stopping the daemons, the [hsm]/[store] configuration block and
# the simulated fleet export. Sourced, never run. The caller sets BIN (the programs) and DIR (the
# state directory, which the configurations' relative paths are resolved against).

NAMES=()    # step names, in order
RESULTS=()  # PASS, FAIL or the text to print instead
DETAILS=()
FAILED=0    # 1 once a step failed (read by the caller)
PIDS=()     # daemons we started

say() { printf '\n== %s\n' "$*"; }

record() {  # record NAME RESULT DETAIL
  NAMES+=("$1")
  RESULTS+=("$2")
  DETAILS+=("$3")
  if [ "$2" = FAIL ]; then FAILED=1; fi
}

# step NAME DETAIL COMMAND...: runs the command (output to the terminal), records the result.
step() {
  local name="$1" detail="$2"
  shift 2
  local t0=$SECONDS
  if "$@"; then
    record "$name" PASS "$detail ($((SECONDS - t0)) s)"
    return 0
  fi
  record "$name" FAIL "$detail ($((SECONDS - t0)) s)"
  return 1
}

# Stops the daemons in PIDS (SIGTERM: they drain, then exit; SIGKILL after 15 s).
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}

# Waits (bounded) for "listening on ADDR:PORT" in a log; prints the port.
port_of() {  # port_of LOGFILE PID
  local i line
  for i in $(seq 1 300); do
    line="$(grep -o 'listening on [0-9.]*:[0-9]*' "$1" 2>/dev/null | head -n1)"
    if [ -n "$line" ]; then
      echo "${line##*:}"
      return 0
    fi
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

start_daemon() {  # start_daemon NAME LOG COMMAND... ; sets STARTED_PORT and STARTED_PID
  local name="$1" log="$2"
  shift 2
  "$@" >"$log" 2>"${log%.out}.err" &
  local pid=$!
  PIDS+=("$pid")
  STARTED_PID=$pid
  if STARTED_PORT="$(port_of "$log" "$pid")"; then
    echo "$name: pid $pid, port $STARTED_PORT"
    return 0
  fi
  echo "$name did not start; its log:" >&2
  tail -n 20 "${log%.out}.err" >&2
  return 1
}

# stop_one PID: stops one daemon started by start_daemon and forgets it.
stop_one() {
  local keep=() p
  for p in "${PIDS[@]}"; do
    if [ "$p" != "$1" ]; then keep+=("$p"); fi
  done
  PIDS=("$1")
  stop_all
  PIDS=("${keep[@]}")
}

# The top of every configuration: base OID, the SoftHSM2 token in DIR/hsm and the store
# DIR/gridseal.db (both relative to the configuration file); EXTRA: more [hsm] lines.
hsm_store_config() {  # hsm_store_config TOKEN_LABEL [EXTRA]
  cat <<EOF
base_oid = "2.16.124.113620.1.22.0"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
softhsm_dir = "hsm"
token_label = "$1"
pin_file = "hsm/user.pin"
so_pin_file = "hsm/so.pin"
${2:-}
[store]
path = "gridseal.db"
EOF
}

# The SES policy of the demo and the bench (every key: conf/policy.toml): reads are not
# rate-limited, disconnects generously (repeated disconnect/connect pairs; production limits are
# far lower), and the test PKI's client certificate is the head-end client NAME.
base_policy() {  # base_policy NAME > FILE
  cat <<POLICY
clock_skew = 60
[classes.read]
window = 300
[classes.connect_disconnect]
window = 300
fleet = { count = 60000, per = 60 }
meter = { count = 120, per = 60 }
[classes.demand_response]
window = 3600
fleet = { count = 10, per = 60 }
[procedures]
byte_order = "little"
unlisted = "refuse"
connect_disconnect = ["SP-26"]
[table_writes]
demand_response = ["MT-40"]
[[client]]
name = "$1"
subject = "CN=head-end-test,O=gridseal test"
classes = ["read", "connect_disconnect", "demand_response"]
[[demand_response_group]]
name = "feeder-3"
title = ".3.1"
max_event_window = 3600
POLICY
}

# export_fleet METERS CSV STATE: a simulated fleet (meters .7.1...7.METERS) that trusts the
# token's gs-cmd-1/gs-cmd-2 keys, initial keys derived by ECDH with gs-provision; writes the
# gs-cmd-1 public key to DIR/gs-cmd-1.hex. Needs DIR/ses.toml (the token).
export_fleet() {
  local cmd1 cmd2 prov
  cmd1="$("$BIN/gridseal" hsm export-pubkey gs-cmd-1 --hex --config "$DIR/ses.toml")" || return 1
  cmd2="$("$BIN/gridseal" hsm export-pubkey gs-cmd-2 --hex --config "$DIR/ses.toml")" || return 1
  prov="$("$BIN/gridseal" hsm export-pubkey gs-provision --hex --config "$DIR/ses.toml")" || return 1
  echo "$cmd1" >"$DIR/gs-cmd-1.hex"
  "$BIN/gridseal-metersim" export --meters "$1" --keys ecdh --provision-pub "$prov" \
    --trust-cmd1 "$cmd1" --trust-cmd2 "$cmd2" --out "$2" --state "$3"
}
