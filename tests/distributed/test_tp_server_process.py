"""RELIABILITY L9 at tp > 1: ``kill -9`` of the API process leaves nothing behind. The server at
``--tp 2`` has worker processes beside its engine thread; each must die with the API process
(the kernel's parent-death signal, and the worker's own watch of its parent), and the port must
be free."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.soak import LocalServer
from benchmarks.soak_server import port_is_free

pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it, and holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_l9_at_tp2_sigkill_of_the_api_process_leaves_no_worker():
    server = LocalServer(["--tp", "2", "--device", "cpu", "--log-level", "WARNING"])
    server.start()
    workers: list[int] = []
    try:
        pid, port = server.proc.pid, int(server.url.rsplit(":", 1)[1])
        body = {"model": httpx.get(server.url + "/v1/models").json()["data"][0]["id"],
                "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        with httpx.Client(base_url=server.url, timeout=120) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
        workers = [p for p in descendants(pid) if running(p)]
        assert workers, "a tp=2 server has a worker process"
        os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 15
        while any(running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if running(p)], "workers outlived the API process"
        assert port_is_free(port)
    finally:
        server.kill()
        for p in workers:
            if running(p):
                os.kill(p, signal.SIGKILL)
