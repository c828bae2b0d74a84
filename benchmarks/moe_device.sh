#!/bin/bash
# A mixture-of-experts shape, vlmdeploy beside LMDeploy 0.18 on the same checkpoint, in one device
# call: a random-weight checkpoint of PRESET in the -HF format (bf16, written on the GPU), W1-W3 of
# benchmarks.engine on it, then LMDeploy's harness (anchors/lmdeploy/bench.py) on the same files,
# and the table of both. Run it from the project root.
#
#   once, here:  cp -r ../shared/anchors ./anchors && bash anchors/lmdeploy/prepare.sh
#   device call, carry ["anchors"]:
#       BENCH_COMMIT=<short hash> PRESET=gpt-oss-20b bash benchmarks/moe_device.sh   # one H100
#       BENCH_COMMIT=<short hash> PRESET=30b-a3b bash benchmarks/moe_device.sh       # one H200 (~61 GB)
#   CPU dry run: OUT=/tmp/moedry PRESET=tiny-moe WITH_LMDEPLOY=0 WORKLOADS=w2,w3 \
#       ENGINE_ARGS="--n2 4 --n3 4" bash benchmarks/moe_device.sh
#
# Results in $OUT: engine.md (the table), engine.json, lmdeploy/results.json, results.csv (the
# call's rows: python -m benchmarks.results merge results.csv). Where LMDeploy cannot run the shape
# its error is in lmdeploy.log and the table has ours alone. Env: PRESET [gpt-oss-20b],
# WITH_LMDEPLOY [1], WORKLOADS [w1,w2,w3], ENGINE_ARGS / LMDEPLOY_ARGS (extra flags), BUDGET [570 s].
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlmdeploy_out}
mkdir -p "$OUT"
source benchmarks/device_lib.sh
has_gpu && DEVICE=${DEVICE:-cuda} || DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-gpt-oss-20b}
WORKLOADS=${WORKLOADS:-w1,w2,w3}
WITH_LMDEPLOY=${WITH_LMDEPLOY:-1}
BUDGET=${BUDGET:-570}
CKPT=${CKPT:-/tmp/ivl-$PRESET}
SHAPE=$(shape_of "$PRESET")
[ "$DEVICE" = cpu ] && DTYPE=${DTYPE:-float32}
export DEVICE PRESET DTYPE
read -r -a ENGINE_EXTRA <<< "${ENGINE_ARGS:-}"
read -r -a LMDEPLOY_EXTRA <<< "${LMDEPLOY_ARGS:-}"
# seconds a stage may take, leaving $1 for what follows (60 at least)
limit() { local r=$(( BUDGET - $(elapsed) - $1 )); echo $(( r > 60 ? r : 60 )); }
DEV=$(device_line)
say "device: $DEV; $SHAPE at $CKPT; commit ${BENCH_COMMIT:-not given}; budget ${BUDGET}s"

write_checkpoint "$CKPT" || exit 1
wait_gpu_free 30

say "vlmdeploy $WORKLOADS"
timeout -k 10 "$(limit $([ "$WITH_LMDEPLOY" = 1 ] && echo 260 || echo 10))" \
  python3 -m benchmarks.engine --model "$CKPT" --model-shape "$SHAPE" --workloads "$WORKLOADS" \
  --json "$OUT/engine.json" "${ENGINE_EXTRA[@]}" > "$OUT/engine.log" 2>&1
say "vlmdeploy rc $?"
grep -E "KV cache|Error" "$OUT/engine.log" | tail -3

LMD=()
if [ "$WITH_LMDEPLOY" = 1 ]; then
  wait_gpu_free 30
  say "LMDeploy 0.18 $WORKLOADS"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site anchors/.whl/*.whl > "$OUT/pip_lmdeploy.log" 2>&1 || tail -5 "$OUT/pip_lmdeploy.log"
  PYTHONPATH=/tmp/site:$PWD/anchors/.site timeout -k 10 "$(limit 15)" \
    python3 anchors/lmdeploy/bench.py --model "$CKPT" --out "$OUT/lmdeploy" --workloads "$WORKLOADS" --w1-repeats 3 \
    "${LMDEPLOY_EXTRA[@]}" > "$OUT/lmdeploy.log" 2>&1
  say "LMDeploy rc $?"
  tail -4 "$OUT/lmdeploy.log"
  [ -f "$OUT/lmdeploy/results.json" ] && LMD=(--lmdeploy "$OUT/lmdeploy/results.json")
fi
python3 -m benchmarks.engine --render "$OUT/engine.json" "${LMD[@]}" --out "$OUT/engine.md" \
  --csv "$OUT/results.csv"
say "done"
