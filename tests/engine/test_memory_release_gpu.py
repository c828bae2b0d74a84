"""Closing a pipeline gives its GPU memory back (device test): pipelines created and closed in a
row in one process each get the same KV capacity, and after each close the device's used memory
(as nvidia-smi reports it, which other processes see) is back within 1 GiB of where it started."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.testing.checkpoint import make_checkpoint

pytestmark = pytest.mark.gpu
GIB = 1 << 30


def used_bytes() -> int:
    """Device memory in use, all processes (what another process could not have)."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
             str(torch.cuda.current_device())], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0]) << 20
    free, total = torch.cuda.mem_get_info()
    return total - free


def live_blocks(limit: int = 12) -> list[str]:
    """The largest device allocations still alive, each with the innermost frames of the Python
    code that made it (needs ``torch.cuda.memory._record_memory_history`` on)."""
    rows = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}"
                      for f in block.get("frames", []) if "vlmdeploy" in f["filename"]]
            rows.append((block["size"], frames[:4]))
    rows.sort(key=lambda r: -r[0])
    return [f"{size / 2**20:.0f} MiB {frames}" for size, frames in rows[:limit]]


def test_three_8b_pipelines_in_a_row_get_the_same_cache_and_give_memory_back(tmp_path):
    path = make_checkpoint(tmp_path / "8b", "8b", "hf", dtype=torch.bfloat16, weights=False)
    cfg = PytorchEngineConfig(session_len=8192, load_format="dummy")  # default cache share
    torch.cuda.init()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    start = used_bytes()
    blocks, after, held = [], [], []
    for _ in range(3):
        pipe = pipeline(str(path), backend_config=cfg)
        out = pipe("hello", gen_config=GenerationConfig(max_new_tokens=8, ignore_eos=True))
        assert out.generate_token_len == 8
        blocks.append(pipe.engine.core.num_blocks)
        pipe.close()
        del pipe, out
        after.append(used_bytes())
        held.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"\nKV blocks {blocks}; used GiB start {start / GIB:.2f}, after each close "
          f"{[round(a / GIB, 2) for a in after]}; torch allocated/reserved GiB after each close "
          f"{[(round(a / GIB, 2), round(r / GIB, 2)) for a, r in held]}")
    print("\n".join(["still allocated after the last close:", *live_blocks()]))
    assert len(set(blocks)) == 1, blocks
    assert all(a - start < GIB for a in after), (start, after)
