#!/bin/bash
# S1 on the GPU machine: `vlmdeploy serve api_server` on a random-weight checkpoint and
# benchmarks/serving.py against it; its rows are appended to $OUT/results.csv (merge them into
# docs/results.csv with `python -m benchmarks.results merge`), stamped with BENCH_COMMIT.
# Needs the web stack as wheels: ../shared/device/wheels.sh fastapi uvicorn pydantic prometheus_client httpx
# then a device call with carry [".whl"] running: bash benchmarks/s1_device.sh [CKPT]
#
# CKPT (argument or env, default /tmp/ivl8b-hf): the checkpoint to serve; written first (PRESET=8b,
# FMT=hf, DTYPE=bfloat16, DEVICE=cuda|cpu) unless a complete one is there. Other env: S1_ARGS (extra
# serving.py flags, e.g. "--num-requests 8 --concurrency 4"), S1_SMALL_ARGS (the warm-up run's),
# S1_TIMEOUT (s, main run), START_TIMEOUT (s), PORT, SERVER_ARGS. The server is stopped on the way out;
# its pid is in $OUT/server.pid while it runs.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1  # the project root: benchmarks.serving runs as a module
source benchmarks/device_lib.sh
mkdir -p "$OUT"
CKPT=${1:-${CKPT:-/tmp/ivl${PRESET:-8b}-hf}}
PORT=${PORT:-23333}
URL=http://127.0.0.1:$PORT
has_gpu && DEVICE=${DEVICE:-cuda} || DEVICE=${DEVICE:-cpu}
export DEVICE

install_wheels || exit 1
export PYTHONPATH=$SITE:$PWD
DEV=$(device_line)
echo "$DEV" | tee "$OUT/device.txt"
write_checkpoint "$CKPT" || exit 2

SPID=
stop_server() {
  [ -n "$SPID" ] || return 0
  kill "$SPID" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 "$SPID" 2>/dev/null || break; sleep 1; done
  kill -9 "$SPID" 2>/dev/null
  wait "$SPID" 2>/dev/null
  say "server stopped (exit code $?)"
  rm -f "$OUT/server.pid"
  SPID=
}
trap stop_server EXIT

# shellcheck disable=SC2086
python3 -m vlmdeploy serve api_server "$CKPT" --server-name 127.0.0.1 --server-port "$PORT" \
  --session-len 8192 --log-level INFO ${SERVER_ARGS:-} > "$OUT/server.log" 2>&1 &
SPID=$!
echo "$SPID" > "$OUT/server.pid"
health() { python3 -c "import httpx,sys; sys.exit(httpx.get('$URL/health', timeout=5).status_code!=200)" 2>/dev/null; }
up=0
for _ in $(seq 1 "${START_TIMEOUT:-240}"); do
  health && { up=1; break; }
  kill -0 "$SPID" 2>/dev/null || break
  sleep 1
done
if [ $up != 1 ]; then say "server did not come up"; tail -40 "$OUT/server.log"; exit 3; fi
say "server up"

# shellcheck disable=SC2086
timeout -k 5 120 python3 -m benchmarks.serving --url "$URL" ${S1_SMALL_ARGS:---num-requests 8 --concurrency 8 --warmup 2} \
  --json "$OUT/s1_small.json" > "$OUT/s1_small.log" 2>&1
say "S1 warm-up run: exit code $? ($(tail -1 "$OUT/s1_small.log"))"
# shellcheck disable=SC2086
timeout -k 5 "${S1_TIMEOUT:-300}" python3 -m benchmarks.serving --url "$URL" --device-line "$DEV" \
  --model-shape "${SHAPE:-}" --json "$OUT/s1.json" --csv "$OUT/results.csv" ${S1_ARGS:-} 2>&1 \
  | tee "$OUT/s1.log"
rc=$?
say "S1 done: exit code $rc"
timeout 30 python3 - <<PY > "$OUT/metrics.txt" 2>&1
import httpx
for line in httpx.get("$URL/metrics", timeout=10).text.splitlines():
    if line.startswith("vllm:") and "bucket" not in line:
        print(line)
PY
head -30 "$OUT/metrics.txt"
stop_server
tail -15 "$OUT/server.log"
exit $rc
