# Shell helpers shared by the benchmarks' device scripts (benchmarks/*_device.sh, device_run.sh;
# source it from the project root). Works on the GPU machine and, for dry runs, on a CPU-only machine.

: "${OUT:=/tmp/vlmdeploy_out}"
: "${SITE:=/tmp/vlm-site}"  # where the web stack's wheels go (its own folder: other harnesses use /tmp/site)
: "${T0:=$(date +%s)}"
export OUT SITE T0

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "=== [+$(elapsed)s] $*"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# The same line as benchmarks/engine.py's device_line(): the results CSV groups a call's rows by it.
device_line() {
  local torch_v
  torch_v=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)
  if has_gpu; then
    echo "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1); torch $torch_v"
  else
    echo "CPU; torch $torch_v"
  fi
}

# The model's name for a preset (8b -> InternVL3.5-8B, gpt-oss-20b -> InternVL3.5-gpt-oss-20b), as
# the results CSV names shapes.
shape_of() {
  case $1 in
    [0-9]*) echo "InternVL3.5-${1^^}" ;;
    *) echo "InternVL3.5-$1" ;;
  esac
}

gpu_mem_used_mib() { has_gpu && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }

# Wait (at most $1 s, default 60) until the GPU holds less than 2 GiB: another process's memory is
# only given back once it has exited.
wait_gpu_free() {
  has_gpu || return 0
  local used i
  for i in $(seq 1 "${1:-60}"); do
    used=$(gpu_mem_used_mib)
    [ "${used:-0}" -lt 2048 ] && { say "GPU memory free (${used} MiB used)"; return 0; }
    sleep 1
  done
  say "GPU memory still ${used} MiB used after ${1:-60}s"; nvidia-smi; return 1
}

# The web stack (fastapi, uvicorn, pydantic, ...) into $SITE from .whl/, unless importable already.
install_wheels() {
  if PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import fastapi, uvicorn, pydantic' 2>/dev/null; then
    return 0
  fi
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "no .whl/ here and fastapi/uvicorn/pydantic are missing (carry [\".whl\"])"; return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; return 1; }
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import fastapi, uvicorn, pydantic' || return 1
  say "web stack installed into $SITE"
}

# write_checkpoint DIR: a random-weight checkpoint (PRESET, FMT, DTYPE, DEVICE), unless DIR holds a
# complete one already (the marker file is written last).
write_checkpoint() {
  local dir=$1
  if [ -f "$dir/.vlmdeploy-complete" ]; then say "checkpoint $dir exists; not rewritten"; return 0; fi
  rm -rf "$dir"
  python3 -m vlmdeploy.testing.checkpoint --preset "${PRESET:-8b}" --format "${FMT:-hf}" --out "$dir" \
    --dtype "${DTYPE:-bfloat16}" --device "${DEVICE:-cuda}" || return 1
  touch "$dir/.vlmdeploy-complete"
  say "checkpoint $dir written ($(du -sh "$dir" | cut -f1))"
}
