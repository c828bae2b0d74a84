"""Every Triton kernel compiles for the GPU it is meant for (Hopper, sm_90) — on the CPU: the
kernel tests run again in a subprocess under ``compile_only`` (see there), where each launch is a
full compile down to ``ptxas`` and nothing runs. Triton's interpreter, which runs the kernels here,
accepts programs its compiler rejects; this finds those before a GPU does."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "vlmdeploy" / "kernels"

triton = pytest.importorskip("triton")


def kernels_defined() -> set[str]:
    """``module._name_kernel`` for every ``@triton.jit`` function launched as a kernel (helpers
    inlined into kernels are not named ``*_kernel``)."""
    names = set()
    for path in KERNELS.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                "jit" in ast.unparse(d) for d in node.decorator_list
            ):
                names.add(f"{path.stem}.{node.name}")
    return names


def test_every_kernel_compiles_for_hopper(tmp_path):
    """The kernel tests' first and last cases, their files split between processes that compile
    side by side (each compile is one core's work): no compile error, and every kernel compiled."""
    shards = max(1, min(4, len(os.sched_getaffinity(0))))
    procs = []
    for i in range(shards):
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
               "VLMDEPLOY_COMPILE_SELECT": "ends", "VLMDEPLOY_COMPILE_SHARD": f"{i}/{shards}",
               "VLMDEPLOY_COMPILE_REPORT": str(tmp_path / f"report{i}.json"),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "kernels"), str(ROOT)])}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "compile_only", "-p", "no:cacheprovider",
             "--basetemp", str(tmp_path / f"base{i}"), "tests/kernels",
             "--deselect", "tests/kernels/test_kernels_compile.py"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [proc.communicate(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    compiled, errors = set(), {}
    for i, (out, err) in enumerate(outputs):
        report = tmp_path / f"report{i}.json"
        assert report.exists(), out[-3000:] + err[-3000:]
        result = json.loads(report.read_text())
        compiled |= set(result["compiled"])
        errors |= result["errors"]
    assert errors == {}, "\n".join(f"{k}: {v}" for k, v in errors.items())
    missing = kernels_defined() - compiled
    assert not missing, f"no test launches {sorted(missing)}"
