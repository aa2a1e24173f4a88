#!/usr/bin/env bash
# A whole swarm on this machine: a bootstrap and two workers (layers 0-15 and 15-30 of
# the default model) on 127.0.0.1, one `p2pserve query`, then everything is stopped.
#
#   bash scripts/local-swarm.sh ["PROMPT"] [query flags, e.g. --max-new-tokens 32 --stats]
#
# The peers keep their identities in a private P2PSERVE_HOME under a temporary directory,
# so this never touches ~/.p2pserve or a swarm you run yourself. Ports are chosen by the
# kernel (tcp/0). Exit code: the query's; 1 if the swarm did not come up within
# LOCAL_SWARM_TIMEOUT seconds (default 180), with the peers' logs shown.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
P2PSERVE=${LOCAL_SWARM_P2PSERVE:-"$ROOT/.venv/bin/p2pserve"}  # the tests put a stand-in here
TIMEOUT=${LOCAL_SWARM_TIMEOUT:-180}
PROMPT=${1:-"What is the capital of France?"}
shift $(( $# > 0 ? 1 : 0 ))

if [ ! -x "$P2PSERVE" ]; then
  echo "error: $P2PSERVE not found: run \`bash scripts/setup.sh\` first" >&2
  exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/p2pserve-local-swarm.XXXXXX")
export P2PSERVE_HOME="$WORK/home" PYTHONUNBUFFERED=1
PIDS=()
QUERY_PID=

cleanup() {
  trap - EXIT INT TERM HUP
  # Each peer runs in its own session (setsid), so its process group holds it and
  # any children it started (TP ranks). TERM first (workers leave cleanly), then KILL.
  local pid
  [ -n "$QUERY_PID" ] && kill -TERM "$QUERY_PID" 2>/dev/null
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap 'cleanup; exit "${RC:-1}"' EXIT
trap 'RC=130; exit 130' INT
trap 'RC=143; exit 143' TERM
trap 'RC=129; exit 129' HUP

# start NAME ARGS...: one peer in its own session, its output in $WORK/NAME.log
start() {
  local name=$1
  shift
  setsid "$P2PSERVE" "$@" >"$WORK/$name.log" 2>&1 </dev/null &
  PIDS+=($!)
}

show_logs_and_fail() {
  echo "error: $1" >&2
  local log
  for log in "$WORK"/*.log; do
    echo "----- $(basename "$log")" >&2
    cat "$log" >&2
  done
  RC=1
  exit 1
}

# wait_for LOG PATTERN PID: until LOG matches PATTERN; fail if PID exits or time runs out
wait_for() {
  while ! grep -q "$2" "$WORK/$1" 2>/dev/null; do
    kill -0 "$3" 2>/dev/null || show_logs_and_fail "$1 exited before it was ready"
    [ "$SECONDS" -lt "$TIMEOUT" ] || show_logs_and_fail "the swarm was not ready within $TIMEOUT s"
    sleep 0.5
  done
}

SECONDS=0
echo "local swarm in $WORK: starting the bootstrap…" >&2
start bootstrap bootstrap --listen /ip4/127.0.0.1/tcp/0 --hetero-config 1 1 --pp-partition 15 15
wait_for bootstrap.log "/ip4/127.0.0.1/tcp/.*/p2p/" "${PIDS[0]}"
PEER=$(grep -o -m1 "/ip4/127\.0\.0\.1/tcp/[0-9]*/p2p/[A-Za-z0-9]*" "$WORK/bootstrap.log")
echo "bootstrap at $PEER; starting two workers…" >&2

# The two workers divide the machine's cores between them by themselves (ranks/cores.py).
start worker0 worker --peer "$PEER" --stage 0 --group-id w0 --listen /ip4/127.0.0.1/tcp/0
start worker1 worker --peer "$PEER" --stage 1 --group-id w1 --listen /ip4/127.0.0.1/tcp/0
wait_for worker0.log "serving layers" "${PIDS[1]}"
wait_for worker1.log "serving layers" "${PIDS[2]}"
echo "both workers serving after ${SECONDS} s; asking: $PROMPT" >&2

# A worker announces itself right after it prints "serving layers"; if the bootstrap has
# not seen that announcement yet the query is refused at once (nothing printed), so
# retry that one case for a few seconds.
# (In the background plus `wait`, so that a signal to this script is handled at once.)
for attempt in $(seq 10); do
  "$P2PSERVE" query --peer "$PEER" "$@" -- "$PROMPT" 2>"$WORK/query.err" &
  QUERY_PID=$!
  wait "$QUERY_PID"
  RC=$?
  QUERY_PID=
  if [ "$RC" -ne 0 ] && grep -q "no_pipeline" "$WORK/query.err" && [ "$attempt" -lt 10 ]; then
    sleep 1
    continue
  fi
  break
done
cat "$WORK/query.err" >&2
exit "$RC"
