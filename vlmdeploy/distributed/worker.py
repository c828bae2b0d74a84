"""A tensor-parallel worker: one rank's model runner, running the driver's steps until told to stop.

A worker joins the group, builds its runner (its shard of the weights and of the KV cache, its
graphs, the replicated vision tower) in step with every other rank, then loops: receive an op
(:mod:`vlmdeploy.distributed.wire`), run it, repeat. It samples nothing: the driver samples and
broadcasts the tokens, which the next step reads on this rank's device.

Started as ``python -m vlmdeploy.distributed.worker`` with its spec as one JSON line on stdin
(:class:`~vlmdeploy.distributed.mp_executor.MultiprocExecutor`), or called in a Ray actor
(:func:`run_worker`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed import state, wire
from vlmdeploy.distributed.executor import encode_share, tile_buffer
from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.engine.model_runner import ModelRunner

logger = logging.getLogger("vlmdeploy")


def run_worker(rank: int, size: int, init_method: str, cfg_json: str, device_index: int) -> None:
    """Join the group as ``rank``, build the runner, serve ops until STOP, release everything."""
    spec = json.loads(cfg_json)
    if spec["device_type"] == "cuda":
        torch.cuda.set_device(device_index)
        device = torch.device("cuda", device_index)
    else:
        device = torch.device("cpu")
    cfg = EngineConfig.from_json(cfg_json, ModelConfig.from_pretrained(spec["model_path"]), device)
    group = state.init_group(rank, size, init_method, device)
    runner = ModelRunner(cfg)
    try:
        serve(runner, group)
    finally:
        runner.release()
        state.destroy_group()


@torch.inference_mode()
def serve(runner: ModelRunner, group: state.TPGroup) -> None:
    cfg = runner.cfg
    prev_tokens: torch.Tensor | None = None  # the last sampled step's tokens, on this device
    while True:
        op, payload, extra = wire.receive(group)
        if op == wire.STOP:
            return
        if op == wire.STEP:
            embeds = None
            if n := wire.image_row_count(payload):
                h = cfg.model.text.hidden_size
                embeds = torch.empty(n, h, dtype=cfg.dtype, device=cfg.device)
                wire.broadcast_tensor(group, embeds)
            runner.forward_packed(wire.decode_step(payload, embeds, prev_tokens))
            if n := wire.sampled_count(payload):
                prev_tokens = torch.empty(n, dtype=torch.long, device=cfg.device)
                wire.broadcast_tensor(group, prev_tokens)
        elif op == wire.ENCODE:
            tiles = wire.broadcast_tensor(group, tile_buffer(cfg, extra[0], bool(extra[1])))
            encode_share(runner, tiles, group)
        else:
            raise RuntimeError(f"unknown op {op} from the driver")


def _die_with_parent(parent_pid: int) -> None:
    """A worker outlives nothing: it ends when the engine process does, however that ends."""
    try:  # Linux: the kernel sends SIGKILL when the parent goes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="vlmdeploy-parent-watch", daemon=True).start()


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    _die_with_parent(spec["parent_pid"])
    logging.basicConfig(
        level=spec.get("log_level", "WARNING"),
        format=f"%(asctime)s tp-rank {spec['rank']} %(levelname)s %(message)s",
    )
    try:
        run_worker(
            spec["rank"], spec["size"], spec["init_method"], spec["config"], spec["device_index"]
        )
    except BaseException:
        logger.exception("tensor-parallel worker %d failed", spec["rank"])
        sys.stdout.flush()
        os._exit(1)  # at once: nothing of a broken rank's state is worth an orderly exit


if __name__ == "__main__":
    main()
