#!/bin/bash
# The benchmark suite in one device call (about 6-8 min on one H100, capped by BUDGET): S1 through
# the HTTP server, then W1, chat2, W2, W3 and the transformers W1 baseline through
# benchmarks/engine.py, all on ONE random InternVL3.5-8B-shape checkpoint in the -HF format (which
# both vlmdeploy and transformers load). Run it from the project root.
#
#   device call, carry [".whl"]:  BENCH_COMMIT=<short hash> bash benchmarks/device_run.sh
#   CPU dry run:  OUT=/tmp/dry PRESET=tiny N2=4 N3=4 ENGINE_ARGS="--n4 4" S1_ARGS="--num-requests 8 --concurrency 4" \
#                 bash benchmarks/device_run.sh
#
# Results in $OUT: results.csv (the call's rows for docs/results.csv: python -m benchmarks.results
# merge results.csv), engine.md (the table against the targets and the baselines), engine.json,
# s1.json, logs.tgz (every log, device.txt). Every stage runs under `timeout`; a failed stage is
# reported and the next one runs. BENCH_COMMIT stamps the rows (the device's checkout has no git).
# Env (defaults in brackets): PRESET [8b], CKPT [/tmp/ivl$PRESET-hf], DTYPE [bfloat16], DEVICE
# [cuda if there is a GPU, else cpu], N2/N3 [256], REPEATS [3], S1_ARGS (extra serving.py flags),
# SKIP_S1=1, ENGINE_ARGS (extra engine.py flags), BUDGET [540 s for the whole script],
# LMDEPLOY_NOTE, KERNEL_TESTS [1: the GPU kernel tests first, into kernel_tests.log], PROFILE [0;
# 1: tools/diagnostics/step_profile.py last, into step_profile.md, when 120 s are left],
# PROFILE_BATCH [1,256], PROFILE_PREFILL [1:448,8:1024].
# WITH_LMDEPLOY=1 first runs `bash anchors/lmdeploy/run_device.sh 8b` (carry ["anchors", ".whl"];
# anchors/ is prepared separately, see docs/benchmarks.md), serves and benchmarks ITS checkpoint
# /tmp/ivl35-8b (same architecture, -HF format) and puts its results.json in the LMDeploy column
# and the CSV; that takes ~4 min more, so S1 is skipped then unless SKIP_S1=0. Without it, the
# table's LMDeploy column quotes LMDeploy's anchor run and says so (the CSV gets no LMDeploy rows).
set -u -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
OUT=${OUT:-/tmp/vlmdeploy_out}
mkdir -p "$OUT"
source benchmarks/device_lib.sh
has_gpu && DEVICE=${DEVICE:-cuda} || DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-8b}
FMT=hf
DTYPE=${DTYPE:-bfloat16}
WITH_LMDEPLOY=${WITH_LMDEPLOY:-0}
if [ "$WITH_LMDEPLOY" = 1 ]; then
  CKPT=${CKPT:-/tmp/ivl35-8b}
  SKIP_S1=${SKIP_S1:-1}
else
  CKPT=${CKPT:-/tmp/ivl$PRESET-hf}
  SKIP_S1=${SKIP_S1:-0}
fi
SHAPE=$(shape_of "$PRESET")
export DEVICE PRESET FMT DTYPE CKPT SHAPE
N2=${N2:-256}
N3=${N3:-256}
BUDGET=${BUDGET:-540}
export PYTHONPATH=$PWD  # the engine stage runs without the web stack's wheels on its path
LMDEPLOY_NOTE=${LMDEPLOY_NOTE:-"LMDeploy 0.18.0 PyTorch engine on the same card type (one H100 80GB \
HBM3), same workloads and settings (session_len 8192, cache_max_entry_count 0.8, prefix caching \
off), measured on 2026-11-27 by ../shared/anchors/lmdeploy (RESULTS.md: medians of 11 W1 runs and \
4 W2/W3 runs; peak memory is torch's max_memory_allocated/reserved), on its own random checkpoint \
of the same architecture; not measured in this device call."}

remaining() { echo $(( BUDGET - $(elapsed) )); }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
STAGES=()
stage_end() {  # name start rc
  local s=$(( $(date +%s) - $2 ))
  STAGES+=("$(printf '%-12s %4ss  rc %s' "$1" "$s" "$3")")
  say "$1 finished in ${s}s (rc $3)"
}

DEV=$(device_line)
echo "$DEV" > "$OUT/device.txt"
say "device: $DEV; checkpoint $CKPT ($PRESET, $DEVICE); commit ${BENCH_COMMIT:-not given}; budget ${BUDGET}s"
has_gpu && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' 2>&1 | tee "$OUT/versions.txt"

# 0. the web stack for S1 (not fatal: only S1 needs it)
t=$(date +%s); install_wheels; WHEELS_RC=$?; stage_end wheels "$t" $WHEELS_RC

# 0b. the Triton kernels against their PyTorch references on this GPU (KERNEL_TESTS=0 skips)
if [ "${KERNEL_TESTS:-1}" = 1 ] && has_gpu; then
  t=$(date +%s)
  timeout -k 10 "${KERNEL_TESTS_TIMEOUT:-180}" python3 -m pytest -m gpu tests/kernels -q -x \
    -p no:cacheprovider > "$OUT/kernel_tests.log" 2>&1
  rc=$?; stage_end kernel-tests "$t" $rc; tail -2 "$OUT/kernel_tests.log"
fi

# 1. optional: LMDeploy on its own checkpoint, in this call
LM_ARGS=(--lmdeploy-note "$LMDEPLOY_NOTE")
if [ "$WITH_LMDEPLOY" = 1 ]; then
  t=$(date +%s)
  OUT=$OUT BENCH_TIMEOUT=${LMDEPLOY_TIMEOUT:-300} timeout -k 10 $(( ${LMDEPLOY_TIMEOUT:-300} + 60 )) \
    bash anchors/lmdeploy/run_device.sh 8b > "$OUT/lmdeploy.log" 2>&1
  rc=$?; stage_end lmdeploy "$t" $rc; tail -12 "$OUT/lmdeploy.log"
  if [ -f "$OUT/8b/results.json" ]; then
    LM_ARGS=(--lmdeploy "$OUT/8b/results.json")
    [ -f /tmp/ivl35-8b/model.safetensors.index.json ] && touch /tmp/ivl35-8b/.vlmdeploy-complete
  fi
  wait_gpu_free 60
fi

# 2. the checkpoint (fatal if it cannot be written)
t=$(date +%s)
timeout -k 10 "${CKPT_TIMEOUT:-240}" bash -c 'source benchmarks/device_lib.sh; write_checkpoint "$CKPT"' \
  2>&1 | tee "$OUT/checkpoint.log"
rc=${PIPESTATUS[0]}; stage_end checkpoint "$t" "$rc"
[ "$rc" = 0 ] || { say "no checkpoint, nothing to measure"; exit 2; }
cp "$CKPT/config.json" "$OUT/model_config.json" 2>/dev/null

# 3. S1: the HTTP server under load; leave at least 250 s for the engine stage
S1_LIMIT=$(min "${S1_STAGE_TIMEOUT:-300}" $(( $(remaining) - 250 )))
if [ "$SKIP_S1" = 1 ]; then
  say "S1 skipped (SKIP_S1=1)"
elif [ "$WHEELS_RC" != 0 ]; then
  say "S1 skipped: no web stack"; STAGES+=("S1 skipped: no web stack (carry .whl)")
elif [ "$S1_LIMIT" -lt 90 ]; then
  say "S1 skipped: only $(remaining)s left"; STAGES+=("S1 skipped: out of time")
else
  t=$(date +%s)
  S1_TIMEOUT=$(( S1_LIMIT - 60 > 60 ? S1_LIMIT - 60 : 60 )) timeout -k 15 "$S1_LIMIT" \
    bash benchmarks/s1_device.sh "$CKPT" > "$OUT/s1_device.log" 2>&1
  rc=$?; stage_end S1 "$t" $rc
  tail -6 "$OUT/s1_device.log"
  if [ -f "$OUT/server.pid" ]; then  # s1_device.sh was killed before it stopped its server
    spid=$(cat "$OUT/server.pid")
    kill "$spid" 2>/dev/null; sleep 5; kill -9 "$spid" 2>/dev/null; rm -f "$OUT/server.pid"
    say "stopped the server left behind (pid $spid)"
  fi
  wait_gpu_free 90
fi

# 4. the engine benchmarks and the transformers baseline; what else is using the CPU first (a
# host-side outlier in W1 is then explained or ruled out)
ps -eo pid,pcpu,etime,comm --sort=-pcpu 2>/dev/null | head -8 > "$OUT/ps_before_engine.txt"
ENGINE_LIMIT=$(min "${ENGINE_TIMEOUT:-420}" $(( $(remaining) - 10 )))
if [ "$ENGINE_LIMIT" -lt 60 ]; then ENGINE_LIMIT=60; fi
t=$(date +%s)
# shellcheck disable=SC2086
timeout -k 10 "$ENGINE_LIMIT" python3 -m benchmarks.engine --model "$CKPT" --baseline \
  --model-shape "$SHAPE" --n2 "$N2" --n3 "$N3" --repeats "${REPEATS:-3}" \
  --time-limit $(( ENGINE_LIMIT > 150 ? ENGINE_LIMIT - 75 : ENGINE_LIMIT / 2 )) \
  --json "$OUT/engine.json" --out "$OUT/engine.md" --csv "$OUT/results.csv" "${LM_ARGS[@]}" \
  ${ENGINE_ARGS:-} > "$OUT/engine.log" 2>&1
rc=$?; stage_end engine "$t" $rc
grep -E '^\[engine.py' "$OUT/engine.log" | tail -12
if [ $rc != 0 ]; then grep -E 'Error|error' "$OUT/engine.log" | tail -5; fi
if [ -f "$OUT/engine.json" ] && [ ! -s "$OUT/engine.md" ]; then
  say "engine.py ended early; the table and the CSV rows from what it saved:"
  python3 -m benchmarks.engine --render "$OUT/engine.json" --out "$OUT/engine.md" \
    --csv "$OUT/results.csv" "${LM_ARGS[@]}" > /dev/null 2>> "$OUT/engine.log"
fi

# 5. optional, a diagnostic: where a decode step's and an image prefill's time goes
if [ "${PROFILE:-0}" = 1 ] && [ "$(remaining)" -ge 120 ]; then
  t=$(date +%s)
  timeout -k 10 $(( $(remaining) - 15 )) python3 -m tools.diagnostics.step_profile --model "$CKPT" \
    --batch "${PROFILE_BATCH:-1,256}" --prefill "${PROFILE_PREFILL:-1:448,8:1024}" --steps 20 \
    --out "$OUT/step_profile.md" > "$OUT/step_profile.log" 2>&1
  rc=$?; stage_end profile "$t" $rc
  grep -E '^### ' "$OUT/step_profile.log"
else
  say "profile skipped (PROFILE=${PROFILE:-0}, $(remaining)s left)"
fi

echo
say "stages:"
printf '  %s\n' "${STAGES[@]}"
echo
cat "$OUT/engine.md" 2>/dev/null || say "no engine.md"
# At most 8 files come back from a device call: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tgz --remove-files ./*.log ./*.txt model_config.json s1_small.json \
  2>/dev/null)
