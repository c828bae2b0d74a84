#!/bin/bash
# Mixed traffic, vlmdeploy beside LMDeploy 0.18 on the same random-weight checkpoint (PRESET, -HF
# format, bf16, written on the GPU), stage by stage (STAGES, in this order, each skipped when the
# budget left is too small for it):
#   w4         W4 offline: benchmarks.lmdeploy_w4, then benchmarks.engine --workloads w4
#   s2         S2: each system's api_server (ours: vlmdeploy serve api_server; LMDeploy's: lmdeploy
#              serve api_server --backend pytorch), both with their defaults and session_len 8192,
#              then benchmarks.s2 at RATES against it (SYSTEMS picks which, in order)
# and the report (benchmarks.mixed): mixed.md, the tables and the targets of both. About 6-8 min
# per stage at the 8B shape on one H100: one stage per call, e.g.
#   once, here: cp -r ../shared/anchors ./anchors && bash anchors/lmdeploy/prepare.sh
#               bash ../shared/device/wheels.sh fastapi uvicorn pydantic prometheus_client httpx  # .whl
#   device call 1, carry ["anchors", ".whl"]: BENCH_COMMIT=<hash> STAGES=w4 bash benchmarks/mixed_device.sh
#   device call 2, the same carry:            BENCH_COMMIT=<hash> STAGES=s2 bash benchmarks/mixed_device.sh
#   (then python -m benchmarks.mixed --w4 ... --s2 ... over both calls' files, as mixed.md shows)
#   CPU dry run: OUT=/tmp/mixdry PRESET=tiny SYSTEMS=vlmdeploy STAGES=w4,s2 N4=4 S2_N=4 \
#                RATES=4,inf SESSION_LEN=2048 bash benchmarks/mixed_device.sh
# Results in $OUT: w4.json, lmdeploy_w4.json, s2.json, lmdeploy_s2.json, mixed.md, results.csv
# (python -m benchmarks.results merge), logs. Env: PRESET [8b], CKPT [/tmp/ivl-$PRESET-hf],
# SYSTEMS [lmdeploy,vlmdeploy], RATES [2,4,8,inf], N4 [256], S2_N [128 per rate], BUDGET [570 s],
# SESSION_LEN [8192] (a shorter one scales W4 down, for dry runs).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlmdeploy_out}
mkdir -p "$OUT"
source benchmarks/device_lib.sh
has_gpu && DEVICE=${DEVICE:-cuda} || DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-8b}
STAGES=${STAGES:-w4,s2}
SYSTEMS=${SYSTEMS:-lmdeploy,vlmdeploy}
RATES=${RATES:-2,4,8,inf}
N4=${N4:-256}
S2_N=${S2_N:-128}
BUDGET=${BUDGET:-570}
PORT=${PORT:-23333}
SESSION_LEN=${SESSION_LEN:-8192}
CKPT=${CKPT:-/tmp/ivl-$PRESET-hf}
SHAPE=$(shape_of "$PRESET")
[ "$DEVICE" = cpu ] && DTYPE=${DTYPE:-float32}
export DEVICE PRESET DTYPE
has() { [[ ",$1," == *",$2,"* ]]; }
left() { echo $(( BUDGET - $(elapsed) )); }
DEV=$(device_line)
say "device: $DEV; $SHAPE at $CKPT; stages $STAGES; systems $SYSTEMS; commit ${BENCH_COMMIT:-not given}"

install_wheels || exit 1
LMD_SITE=/tmp/site  # LMDeploy's own wheels (the anchors' harness puts them here too)
if has "$SYSTEMS" lmdeploy; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$LMD_SITE" anchors/.whl/*.whl > "$OUT/pip_lmdeploy.log" 2>&1 || tail -5 "$OUT/pip_lmdeploy.log"
fi
LMD_PATH=$LMD_SITE:$PWD/anchors/.site:$SITE:$PWD
OUR_PATH=$SITE:$PWD
write_checkpoint "$CKPT" || exit 1

if has "$STAGES" w4 && [ "$(left)" -gt 120 ]; then
  if has "$SYSTEMS" lmdeploy; then
    wait_gpu_free 30
    say "LMDeploy W4 ($N4 requests)"
    PYTHONPATH=$LMD_PATH timeout -k 10 $(( $(left) / 2 )) python3 -m benchmarks.lmdeploy_w4 \
      --model "$CKPT" --n4 "$N4" --json "$OUT/lmdeploy_w4.json" > "$OUT/lmdeploy_w4.log" 2>&1
    say "rc $?"; tail -2 "$OUT/lmdeploy_w4.log"
  fi
  wait_gpu_free 30
  say "vlmdeploy W4 ($N4 requests)"
  PYTHONPATH=$OUR_PATH timeout -k 10 $(( $(left) - 20 )) python3 -m benchmarks.engine --model "$CKPT" \
    --model-shape "$SHAPE" --workloads w4 --n4 "$N4" --repeats 1 --session-len "$SESSION_LEN" \
    --json "$OUT/w4.json" > "$OUT/w4.log" 2>&1
  say "rc $?"; grep -E "^w4|w4:" "$OUT/w4.log" | tail -1
fi

SPID=
stop_server() {
  [ -n "$SPID" ] || return 0
  kill "$SPID" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 "$SPID" 2>/dev/null || break; sleep 1; done
  kill -9 "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null
  SPID=
}
trap stop_server EXIT
up() {  # wait for the server at $PORT (either system answers /v1/models once it serves)
  local i
  for i in $(seq 1 "$1"); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/v1/models', timeout=5).status_code!=200)" \
      2>/dev/null && return 0
    kill -0 "$SPID" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
if has "$STAGES" s2; then
  for sys in ${SYSTEMS//,/ }; do
    [ "$(left)" -lt 150 ] && { say "no time for S2 on $sys"; continue; }
    wait_gpu_free 30
    if [ "$sys" = lmdeploy ]; then
      json=$OUT/lmdeploy_s2.json; label=lmdeploy-0.18
      PYTHONPATH=$LMD_PATH python3 -m lmdeploy serve api_server "$CKPT" --backend pytorch \
        --server-name 127.0.0.1 --server-port "$PORT" --session-len "$SESSION_LEN" > "$OUT/lmdeploy_server.log" 2>&1 &
    else
      json=$OUT/s2.json; label=vlmdeploy
      PYTHONPATH=$OUR_PATH python3 -m vlmdeploy serve api_server "$CKPT" --server-name 127.0.0.1 \
        --server-port "$PORT" --session-len "$SESSION_LEN" > "$OUT/server.log" 2>&1 &
    fi
    SPID=$!
    if ! up 240; then say "$sys server did not come up"; stop_server; continue; fi
    say "S2 on $sys at rates $RATES ($S2_N requests each)"
    PYTHONPATH=$OUR_PATH timeout -k 5 $(( $(left) - 40 )) python3 -m benchmarks.s2 \
      --url "http://127.0.0.1:$PORT" --tokenizer "$CKPT" --rates "$RATES" --num-requests "$S2_N" \
      --session-len "$SESSION_LEN" --system "$label" --model-shape "$SHAPE" --device-line "$DEV" --json "$json" \
      --csv "$OUT/results.csv" > "$OUT/s2_$sys.log" 2>&1
    say "rc $?"; tail -"$(( $(tr -cd , <<< "$RATES" | wc -c) + 1 ))" "$OUT/s2_$sys.log"
    stop_server
  done
fi

PYTHONPATH=$OUR_PATH python3 -m benchmarks.mixed --w4 "$OUT/w4.json" --lmdeploy-w4 "$OUT/lmdeploy_w4.json" \
  --s2 "$OUT/s2.json" --lmdeploy-s2 "$OUT/lmdeploy_s2.json" --out "$OUT/mixed.md" \
  $(has "$STAGES" w4 && echo --csv "$OUT/results.csv")
say "done"
