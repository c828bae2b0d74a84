#!/bin/bash
# S1 on the GPU machine: a random 8B-shape checkpoint, `vlmdeploy serve api_server` on it, and
# benchmarks/serving.py against it; the row goes to $OUT/benchmarks.md (copy it into docs/).
# Needs the web stack as wheels: ../shared/device/wheels.sh fastapi uvicorn pydantic prometheus_client httpx
# then a device call with carry [".whl"] running: bash benchmarks/s1_device.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
DEV="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1), torch $(python3 -c 'import torch; print(torch.__version__)')"
echo "$DEV" | tee $OUT/device.txt
T0=$(date +%s)
python3 -c "
import torch
from vlmdeploy.testing.checkpoint import make_checkpoint
make_checkpoint('/tmp/ivl8b', preset='8b', fmt='original', dtype=torch.bfloat16, device='cuda')
" || exit 2
echo "checkpoint written after $(( $(date +%s) - T0 ))s"
python3 -m vlmdeploy serve api_server /tmp/ivl8b --server-name 127.0.0.1 --server-port 23333 --session-len 8192 --log-level INFO > $OUT/server.log 2>&1 &
SPID=$!
health() { python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:23333/health').status_code!=200)" 2>/dev/null; }
for i in $(seq 1 200); do health && break; kill -0 $SPID 2>/dev/null || { tail -40 $OUT/server.log; exit 3; }; sleep 1; done
echo "server up after $(( $(date +%s) - T0 ))s"
timeout 120 python3 benchmarks/serving.py --num-requests 8 --concurrency 8 --warmup 2 --json $OUT/s1_small.json | tail -3
timeout ${S1_TIMEOUT:-300} python3 benchmarks/serving.py --device-line "$DEV" --json $OUT/s1.json --append $OUT/benchmarks.md
python3 - <<'PY' > $OUT/metrics.txt
import httpx
for line in httpx.get("http://127.0.0.1:23333/metrics").text.splitlines():
    if line.startswith("vllm:") and "bucket" not in line:
        print(line)
PY
cat $OUT/metrics.txt
kill $SPID; wait $SPID; echo "server exit code $?"
tail -15 $OUT/server.log
