#!/usr/bin/env bash
# Set up and run the CPU test suite (GPU tests are marked `gpu` and run on a CUDA machine with -m gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff check .
python -m pytest -q -p no:cacheprovider "$@"
