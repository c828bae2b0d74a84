"""Run a function on every rank of a CPU tensor-parallel group (gloo), one spawned process each.

    run_ranks(fn, size, *args, timeout=120) -> [fn(rank, size, *args) for each rank]

``fn`` must be importable by name (a module-level function of a test module) and its result
picklable. A rank that raises, dies or outlives ``timeout`` fails the call with its traceback;
every process is joined or killed before it returns, so nothing outlives the test.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from vlmdeploy.distributed.state import destroy_group, init_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], size: int, *args: Any, timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, size, init, args, results), daemon=True)
        for rank in range(size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    ok = False
    try:
        deadline = time.monotonic() + timeout
        while len(out) < size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(size)) - set(out))} timed out")
            try:
                rank, failed, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if i not in out and p.exitcode is not None]
                if dead:  # gone without a word: killed, or crashed in C
                    raise RuntimeError(
                        f"rank(s) {dead} died (exit {procs[dead[0]].exitcode})"
                    ) from None
                continue
            if failed:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
        ok = True
    finally:
        for p in procs:  # a failed rank leaves the others waiting in a collective: kill them
            p.join(timeout=10 if ok else 1)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [out[r] for r in range(size)]


def _rank_main(fn, rank: int, size: int, init: str, args: tuple, results) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's few cores
    try:
        init_group(rank, size, init, torch.device("cpu"))
        # Pickled here, so the queue carries bytes and not tensors in shared memory that
        # would have to outlive this process.
        results.put((rank, False, pickle.dumps(fn(rank, size, *args))))
    except BaseException:
        results.put((rank, True, traceback.format_exc()))
    finally:
        destroy_group()
