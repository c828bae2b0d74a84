"""Workers on this host: one process per rank above 0, rank r on GPU r.

Each worker is a fresh interpreter (``python -m vlmdeploy.distributed.worker``) that reads its
spec as one JSON line on stdin. ``multiprocessing``'s spawn would start it by importing the
user's main script again, so an unguarded script — every snippet of the deployment guide is one —
would build a second pipeline inside each worker; a fresh interpreter runs only the worker.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from vlmdeploy.distributed.executor import DistributedExecutor

logger = logging.getLogger("vlmdeploy")


class MultiprocExecutor(DistributedExecutor):
    def _start_workers(self, init_method: str) -> None:
        cfg = self.cfg
        self.procs: list[subprocess.Popen] = []
        level = logging.getLevelName(logging.getLogger("vlmdeploy").getEffectiveLevel())
        for rank in range(1, cfg.tp):
            spec = {
                "rank": rank,
                "size": cfg.tp,
                "init_method": init_method,
                "config": cfg.to_json(),
                "device_index": (cfg.device.index or 0) + rank,
                "parent_pid": os.getpid(),
                "log_level": level,
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "vlmdeploy.distributed.worker"],
                stdin=subprocess.PIPE,
                text=True,
            )
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.close()
            self.procs.append(proc)

    def _dead_worker(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None:
                    return f"rank {rank} (pid {proc.pid}) exited with code {code}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _stop_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                if timeout_s:
                    logger.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
