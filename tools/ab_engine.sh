#!/bin/bash
# W1, W2 and W3 of two trees in one device call, alternating: the tree in BASE (an earlier
# commit's files, e.g. `git archive REV | tar -x -C .baseline`) and this one, on the same
# dummy-weight checkpoint of PRESET. Speed claims between commits come from one such call.
#
#   device call, carry [".baseline"]:  BASE=.baseline bash tools/ab_engine.sh
#
# Env: BASE [.baseline], PRESET [8b], ROUNDS [1: base then this tree; 2: base, this, base, this],
# WORKLOADS [w1,w2,w3]. Results: $OUT/ab-<round>-<base|this>.json and a table on stdout.
set -u -o pipefail
OUT=${OUT:-/tmp/vlmdeploy_out}
BASE=${BASE:-.baseline}
PRESET=${PRESET:-8b}
ROUNDS=${ROUNDS:-1}
WORKLOADS=${WORKLOADS:-w1,w2,w3}
mkdir -p "$OUT"
run() {  # tree label round
  local json="$OUT/ab-$3-$2.json"
  if [ -f "$1/benchmarks/__init__.py" ]; then
    (cd "$1" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 280 python3 -m benchmarks.engine --preset "$PRESET" \
      --workloads "$WORKLOADS" --json "$json") > "$OUT/ab-$3-$2.log" 2>&1
  else  # trees from before the suite ran as modules
    (cd "$1" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 280 python3 benchmarks/engine.py --preset "$PRESET" \
      --workloads "$WORKLOADS" --json "$json") > "$OUT/ab-$3-$2.log" 2>&1
  fi
  echo "round $3 $2: rc $?"
}
for r in $(seq 1 "$ROUNDS"); do
  run "$BASE" base "$r"
  run "$PWD" this "$r"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def get(d, *keys):
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, (int, float)) else None
rows = [("W1 TTFT ms", ("w1", "ttft_ms")), ("W1 TPOT ms", ("w1", "tpot_ms")),
        ("W2 req/s", ("w2", "requests_per_s")), ("W3 tok/s", ("w3", "output_tokens_per_s"))]
files = sorted(out.glob("ab-*.json"))
print("| metric | " + " | ".join(f.stem for f in files) + " |")
print("|---" * (len(files) + 1) + "|")
data = [json.loads(f.read_text()) for f in files]
for name, keys in rows:
    print(f"| {name} | " + " | ".join(str(get(d, *keys)) for d in data) + " |")
PY
