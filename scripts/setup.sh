#!/usr/bin/env bash
# Install vlmdeploy with its server and test extras into the current Python environment.
# A machine without torch gets the CPU build (2.13.0); a machine that already has torch (e.g. a CUDA build)
# keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[serve,dev]"
