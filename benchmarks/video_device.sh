#!/bin/bash
# The video workload, vlmdeploy beside LMDeploy 0.18, in one device call (about 6-8 min on one
# H100, capped by BUDGET): LMDeploy's random InternVL3.5-8B checkpoint (anchors/, -HF format, at
# $CKPT), benchmarks.lmdeploy_video on it, then benchmarks.video on the same checkpoint with
# LMDeploy's results beside ours. Run it from the project root.
#
#   once, here:  cp -r ../shared/anchors ./anchors && bash anchors/lmdeploy/prepare.sh
#                bash benchmarks/video_device.sh pack     # PyAV, llguidance, pybase64 -> build/video-wheels
#   device call, carry ["anchors", "build/video-wheels"]:
#                BENCH_COMMIT=<short hash> bash benchmarks/video_device.sh
#   CPU dry run: OUT=/tmp/vdry WITH_LMDEPLOY=0 PRESET=tiny \
#                VIDEO_ARGS="--requests 2 --frames 4 --out-tokens 8 --session-len 4096" \
#                bash benchmarks/video_device.sh
#
# The GPU machine has no PyAV: its wheel (34 MiB, FFmpeg inside) does not fit beside anchors/ and
# the tree in the 64 MiB a call carries, so `pack` stores it unpacked and xz-compressed (24 MiB);
# here it is unpacked into its own site folder. Results in $OUT: video.md (the table against the
# targets), video.json, lmdeploy_video.json, results.csv (the call's rows, both systems: python -m
# benchmarks.results merge results.csv), logs.tgz. Env: CKPT [/tmp/ivl35-8b], WITH_LMDEPLOY [1; 0:
# ours alone, on a vlmdeploy checkpoint of PRESET], PRESET [8b], VIDEO_ARGS (flags for both
# runners: --requests, --frames, --text-tokens, --out-tokens, --session-len, ...), BUDGET [560 s].
set -u -o pipefail
export PYTHONUNBUFFERED=1
WHEELS=build/video-wheels

if [ "${1:-}" = pack ]; then  # on the CPU machine, with a package index
  set -e
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" av==18.1.0 llguidance==1.6.1 pybase64==1.5.1
  rm -rf "$WHEELS" && mkdir -p "$WHEELS" "$tmp/av"
  python3 -m zipfile -e "$tmp"/av-*.whl "$tmp/av"
  tar -C "$tmp/av" -cJf "$WHEELS/av.tar.xz" .
  mv "$tmp"/llguidance-*.whl "$tmp"/pybase64-*.whl "$WHEELS/"
  du -sh "$WHEELS"/*
  exit 0
fi

T0=$(date +%s)
OUT=${OUT:-/tmp/vlmdeploy_out}
mkdir -p "$OUT"
source benchmarks/device_lib.sh
has_gpu && DEVICE=${DEVICE:-cuda} || DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-8b}
WITH_LMDEPLOY=${WITH_LMDEPLOY:-1}
[ "$WITH_LMDEPLOY" = 1 ] && CKPT=${CKPT:-/tmp/ivl35-8b} || CKPT=${CKPT:-/tmp/ivl$PRESET-hf}
SHAPE=$(shape_of "$PRESET")
export DEVICE PRESET
BUDGET=${BUDGET:-560}
read -r -a ARGS <<< "${VIDEO_ARGS:-}"
# seconds a stage may take, leaving $1 for what follows (60 at least)
limit() { local r=$(( BUDGET - $(elapsed) - $1 )); echo $(( r > 60 ? r : 60 )); }
DEV=$(device_line)
echo "$DEV" > "$OUT/device.txt"
say "device: $DEV; checkpoint $CKPT; commit ${BENCH_COMMIT:-not given}; budget ${BUDGET}s"

# 1. PyAV and the engine's two wheels into their own folder (when this Python lacks them)
VSITE=/tmp/video-site
if ! python3 -c 'import av, llguidance, pybase64' 2>/dev/null; then
  mkdir -p "$VSITE"
  tar -C "$VSITE" -xJf "$WHEELS/av.tar.xz" || { say "no $WHEELS (carry it; see the header)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$VSITE" "$WHEELS"/*.whl > "$OUT/pip_video.log" 2>&1 || { tail "$OUT/pip_video.log"; exit 1; }
fi
export PYTHONPATH=$VSITE:$PWD

# 2. the checkpoint: LMDeploy's maker when LMDeploy runs (its tokenizer and layout), else ours
if [ "$WITH_LMDEPLOY" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site anchors/.whl/*.whl > "$OUT/pip_lmdeploy.log" 2>&1 \
    || { tail "$OUT/pip_lmdeploy.log"; exit 1; }
  [ -f "$CKPT/model.safetensors.index.json" ] || timeout -k 10 240 python3 \
    anchors/make_internvl35_random.py --preset 8b --out "$CKPT" --device cuda > "$OUT/checkpoint.log" 2>&1
else
  timeout -k 10 240 bash -c 'source benchmarks/device_lib.sh; FMT=hf write_checkpoint "$0"' "$CKPT" \
    > "$OUT/checkpoint.log" 2>&1
fi
rc=$?; say "checkpoint rc $rc"; [ "$rc" = 0 ] || { tail "$OUT/checkpoint.log"; exit 2; }

# 3. LMDeploy on the same videos, given their frames as numbered images
LM=()
if [ "$WITH_LMDEPLOY" = 1 ]; then
  PYTHONPATH=/tmp/site:$PWD/anchors/.site:$PYTHONPATH timeout -k 10 "$(limit 200)" \
    python3 -m benchmarks.lmdeploy_video --model "$CKPT" --json "$OUT/lmdeploy_video.json" \
    "${ARGS[@]}" > "$OUT/lmdeploy_video.log" 2>&1
  rc=$?; say "LMDeploy rc $rc"; grep -E '^\[video\]' "$OUT/lmdeploy_video.log" | cut -c1-200
  [ -f "$OUT/lmdeploy_video.json" ] && LM=(--lmdeploy "$OUT/lmdeploy_video.json")
  wait_gpu_free 60
fi

# 4. vlmdeploy, with LMDeploy's numbers in its table and rows
timeout -k 10 "$(limit 10)" python3 -m benchmarks.video --model "$CKPT" \
  --model-shape "$SHAPE" --json "$OUT/video.json" --csv "$OUT/results.csv" --out "$OUT/video.md" \
  "${LM[@]}" "${ARGS[@]}" > "$OUT/video.log" 2>&1
rc=$?; say "vlmdeploy rc $rc"; grep -E '^\[video\]' "$OUT/video.log" | cut -c1-200
[ "$rc" = 0 ] || grep -E 'Error|error' "$OUT/video.log" | tail -5
cat "$OUT/video.md" 2>/dev/null || say "no video.md"
(cd "$OUT" && tar czf logs.tgz --remove-files ./*.log ./*.txt 2>/dev/null)
