#!/bin/bash
# The quantised formats on the InternVL3.5-8B shape in device calls, stage by stage (STAGES, in
# this order, each skipped when the budget left is too small for it):
#   combined  W1-W3 with model_format='fp8' and quant_policy=8 (benchmarks.engine, dummy weights)
#   lmdeploy  LMDeploy 0.18 at the same two settings on its random checkpoint (anchors/), and the
#             table of both
#   formats   W1 and W3 for each of FORMATS alone (bf16 first: the KV capacity to compare with)
#   accuracy  benchmarks.quant_accuracy: each of ACC_FORMATS against bf16 on the same weights
# All four take about 15 minutes on one H100: split them over two calls, e.g.
#   device call 1, carry ["anchors"]:  BENCH_COMMIT=<hash> STAGES=combined,lmdeploy,formats \
#                                      FORMATS=bf16,kv8 bash benchmarks/quant_device.sh
#   device call 2:                     BENCH_COMMIT=<hash> STAGES=formats,accuracy \
#                                      FORMATS=bf16,fp8,kv4,kv16,awq bash benchmarks/quant_device.sh
#   CPU dry run: OUT=/tmp/qdry PRESET=tiny STAGES=combined,formats,accuracy COMBINED="--quant-policy 8" \
#                FORMATS=bf16,kv4 ACC_FORMATS=bf16,kv8 ENGINE_ARGS="--n2 2 --n3 2" \
#                ACC_ARGS="--tokens 4 --prompts 1" bash benchmarks/quant_device.sh
# Speed does not depend on the weights' values, so our runs use dummy weights (seeded: the same
# model in every format) while LMDeploy reads its checkpoint. Results in $OUT: combined.md (ours
# beside LMDeploy), <format>.json, accuracy.json, results.csv (python -m benchmarks.results merge).
# Env: PRESET [8b], COMBINED ["--model-format fp8 --quant-policy 8"], ENGINE_ARGS, ACC_ARGS,
# BUDGET [570 s].
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlmdeploy_out}
mkdir -p "$OUT"
source benchmarks/device_lib.sh
PRESET=${PRESET:-8b}
STAGES=${STAGES:-combined,lmdeploy,formats,accuracy}
FORMATS=${FORMATS:-bf16,kv8,kv4,kv16,fp8,awq}
ACC_FORMATS=${ACC_FORMATS:-bf16,fp8+kv8,kv8,kv4,kv16,fp8,awq}
COMBINED=${COMBINED:---model-format fp8 --quant-policy 8}
BUDGET=${BUDGET:-570}
read -r -a EXTRA <<< "${ENGINE_ARGS:-}"
read -r -a ACC_EXTRA <<< "${ACC_ARGS:-}"
read -r -a COMBINED_ARGS <<< "$COMBINED"
left() { echo $(( BUDGET - $(elapsed) )); }
has() { [[ ",$STAGES," == *",$1,"* ]]; }
flags() {  # a format's name -> benchmarks.engine flags
  case $1 in
    bf16) echo "" ;; kv8) echo "--quant-policy 8" ;; kv4) echo "--quant-policy 4" ;;
    kv16) echo "--quant-policy 16" ;; fp8) echo "--model-format fp8" ;; awq) echo "--model-format awq" ;;
    *) echo "unknown format $1" >&2; return 1 ;;
  esac
}
say "device: $(device_line); $PRESET; stages $STAGES; commit ${BENCH_COMMIT:-not given}"

if has combined && [ "$(left)" -gt 120 ]; then
  say "vlmdeploy W1-W3 with $COMBINED"
  timeout -k 10 $(( $(left) - 20 )) python3 -m benchmarks.engine --preset "$PRESET" \
    "${COMBINED_ARGS[@]}" --workloads w1,w2,w3 --json "$OUT/combined.json" "${EXTRA[@]}" \
    > "$OUT/combined.log" 2>&1
  say "rc $?"
fi
if has lmdeploy && [ "$(left)" -gt 200 ] && [ -f "$OUT/combined.json" ]; then
  say "LMDeploy 0.18 W1-W3 with $COMBINED"
  BENCH_TIMEOUT=$(( $(left) - 60 )) BENCH_ARGS="$COMBINED --w1-repeats 3" OUT="$OUT/lmdeploy" \
    bash anchors/lmdeploy/run_device.sh 8b > "$OUT/lmdeploy.log" 2>&1
  say "rc $?"
  tail -3 "$OUT/lmdeploy.log"
fi
if [ -f "$OUT/combined.json" ]; then
  LMD=()
  [ -f "$OUT/lmdeploy/8b/results.json" ] && LMD=(--lmdeploy "$OUT/lmdeploy/8b/results.json" \
    --lmdeploy-label "LMDeploy ($COMBINED)")
  python3 -m benchmarks.engine --render "$OUT/combined.json" "${LMD[@]}" --out "$OUT/combined.md" \
    --csv "$OUT/results.csv"
fi
if has formats; then
  for f in ${FORMATS//,/ }; do
    read -r -a args <<< "$(flags "$f")" || exit 2
    [ "$(left)" -lt 60 ] && { say "no time for $f"; continue; }
    say "vlmdeploy W1, W3 as $f"
    timeout -k 5 $(( $(left) - 10 )) python3 -m benchmarks.engine --preset "$PRESET" "${args[@]}" \
      --workloads w1,w3 --json "$OUT/$f.json" --csv "$OUT/results.csv" "${EXTRA[@]}" \
      > "$OUT/$f.log" 2>&1
    say "rc $?"
    python3 - "$OUT/$f.json" "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
w1, w3 = r.get("w1", {}), r.get("w3", {})
print(f"{sys.argv[2]}: KV {r.get('kv_tokens')} tokens; W1 TTFT {w1.get('ttft_ms')} ms, TPOT "
      f"{w1.get('tpot_ms')} ms; W3 {w3.get('output_tokens_per_s')} tok/s "
      f"{w1.get('error') or ''} {w3.get('error') or ''}")
PY
  done
fi
if has accuracy && [ "$(left)" -gt 60 ]; then
  say "accuracy of $ACC_FORMATS against bf16"
  timeout -k 10 $(( $(left) - 5 )) python3 -m benchmarks.quant_accuracy --preset "$PRESET" \
    --formats "$ACC_FORMATS" --json "$OUT/accuracy.json" --csv "$OUT/results.csv" "${ACC_EXTRA[@]}" \
    > "$OUT/accuracy.log" 2>&1
  say "rc $?"
  grep -A20 "^Accuracy against" "$OUT/accuracy.log" || tail -5 "$OUT/accuracy.log"
fi
say "done"
