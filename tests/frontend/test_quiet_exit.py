"""The main job's stderr at exit: a pipeline left open (as `examples/hello_world.py` leaves it)
must not make nanobind print Triton's objects as leaked when the interpreter ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_pipeline_left_open_exits_quietly():
    code = ("from vlmdeploy import pipeline, GenerationConfig\n"
            "pipe = pipeline(None)\n"
            "print(pipe('hi', gen_config=GenerationConfig(max_new_tokens=2)).text is not None)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "nanobind" not in result.stderr and "leaked" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_main_job_prints_nothing_on_stderr():
    """`examples/hello_world.py` on a machine without a GPU: the answer on stdout, nothing else."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")]))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "hello_world.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stderr == ""
