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
    report = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "VLMDEPLOY_COMPILE_SELECT": "ends", "VLMDEPLOY_COMPILE_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "kernels"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "compile_only", "-p", "no:cacheprovider",
         "tests/kernels", "--deselect", "tests/kernels/test_kernels_compile.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["errors"] == {}, "\n".join(f"{k}: {v}" for k, v in result["errors"].items())
    missing = kernels_defined() - set(result["compiled"])
    assert not missing, f"no test launches {sorted(missing)}"
