#!/usr/bin/env bash
# A Flower deployment on this machine (loopback): one SuperLink, NODES SuperNodes -- each with its persistent
# fedprune node worker -- and one `flwr run` of examples/flower with a fedprune YAML. Checks the run's
# summary.json (rounds done, pruning active), and stops exactly the processes it started (their PIDs, each
# with its children), on success, failure or Ctrl+C. Insecure (no TLS, no SuperNode authentication):
# loopback only; docs/flower.md has the flags of a real deployment.
#
#   bash scripts/flower_deployment.sh                                   # examples/quickstart.yaml, 3 nodes
#   bash scripts/flower_deployment.sh --config examples/asr/smoke.yaml --nodes 2
#   bash scripts/flower_deployment.sh --overrides "--trainer.max_steps=12" --out /tmp/fedprune-deploy
#
# Options: --config YAML (default examples/quickstart.yaml), --nodes N (2-3 is the point; default 3),
# --overrides "ARGS" (extra fedprune arguments), --rounds N (expected rounds; default: the run's max_steps),
# --out DIR (logs, Flower home, runs; default a new temporary directory), --timeout S (the whole run; default 900).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="$ROOT/examples/quickstart.yaml"
NODES=3
OVERRIDES=""
ROUNDS=""
OUT=""
TIMEOUT=900
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --overrides) OVERRIDES="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
PY="${PYTHON:-python}"
for tool in flower-superlink flower-supernode flwr setsid timeout "$PY"; do
  command -v "$tool" >/dev/null || { echo "[deploy] '$tool' not found: pip install 'lightning-fedprune[flower]'" >&2; exit 2; }
done
OUT="${OUT:-$(mktemp -d -t fedprune-deploy.XXXXXX)}"
mkdir -p "$OUT/home" "$OUT/logs" "$OUT/sockets"
chmod 700 "$OUT/sockets"
export FLWR_HOME="$OUT/home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # lightning-fedprune is installed here; nothing for uv to add
export PYTHONPATH="$ROOT/examples/flower:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
deadline=$(( $(date +%s) + TIMEOUT ))

PIDS=()
stop_all() {  # the processes this script started, each with its children (its own process group); nothing else
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  echo "[deploy] stopped PIDs ${PIDS[*]:-none} (logs: $OUT/logs)"
  exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start NAME CMD...: in its own process group, so that stopping it stops its children too
  local name="$1"; shift
  setsid "$@" >"$OUT/logs/$name.log" 2>&1 &
  PIDS+=("$!")
  echo "[deploy] $name: PID $! ($*)"
}

wait_for() {  # wait_for WHAT TEST...: until TEST succeeds, the deadline passes or a started process dies
  local what="$1"; shift
  until "$@"; do
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "[deploy] PID $pid exited while waiting for $what (logs: $OUT/logs)" >&2; exit 1; }
    done
    [ "$(date +%s)" -lt "$deadline" ] || { echo "[deploy] timed out waiting for $what" >&2; exit 1; }
    sleep 0.2
  done
}

port_open() { "$PY" -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('127.0.0.1', $1)))"; }

# free loopback ports: the SuperLink's, and one Runtime API port per SuperNode
read -r -a PORTS <<<"$("$PY" -c "
import socket
socks = [socket.socket() for _ in range($NODES + 1)]
for s in socks: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in socks))")"
LINK_PORT="${PORTS[0]}"

start superlink flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT"
for i in $(seq 0 $((NODES - 1))); do
  start "worker$i" "$PY" -m fedprune_flower.node_worker --socket "$OUT/sockets/node$i.sock"
done
wait_for "the SuperLink on port $LINK_PORT" port_open "$LINK_PORT"
for i in $(seq 0 $((NODES - 1))); do
  wait_for "node worker $i" test -S "$OUT/sockets/node$i.sock"
  start "supernode$i" flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --port "${PORTS[$((i + 1))]}" \
    --node-config "partition-id=$i num-partitions=$NODES worker=\"$OUT/sockets/node$i.sock\""
done

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$LINK_PORT"
insecure = true
EOF

grep -q "RunSummary" "$CONFIG" || OVERRIDES="$OVERRIDES --trainer.callbacks+=lightning_fedprune.callbacks.RunSummary"
RUN_CONFIG="config=\"$CONFIG\" overrides=\"$OVERRIDES --trainer.logger.init_args.save_dir=$OUT/runs\" node-timeout=120.0"
echo "[deploy] flwr run examples/flower loopback --run-config '$RUN_CONFIG'"
left=$(( deadline - $(date +%s) ))
timeout "$left" flwr run "$ROOT/examples/flower" loopback --stream --run-config "$RUN_CONFIG" 2>&1 | tee "$OUT/logs/flwr-run.log"

SUMMARY="$(find "$OUT/runs" -name summary.json 2>/dev/null | head -n 1)"
[ -n "$SUMMARY" ] || { echo "[deploy] FAILED: the run wrote no summary.json (logs: $OUT/logs)" >&2; exit 1; }
"$PY" - "$SUMMARY" "$ROUNDS" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
print(f"[deploy] {sys.argv[1]}: {json.dumps(summary)}")
problems = []
if sys.argv[2] and summary["rounds"] != int(sys.argv[2]):
    problems.append(f"{summary['rounds']} rounds, expected {sys.argv[2]}")
if not summary["rounds"] > 0:
    problems.append("no round was run")
if not summary["sparsity"] > 0:
    problems.append("pruning was not active (sparsity 0)")
if problems:
    sys.exit("[deploy] FAILED: " + "; ".join(problems))
print("[deploy] OK")
EOF
