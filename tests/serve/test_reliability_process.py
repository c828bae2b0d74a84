"""RELIABILITY §3.4 rows about the server process itself, against `vlmdeploy serve api_server` run
as a subprocess on 127.0.0.1 (the embedded default model, CPU): start-up failures (L12), one
process that leaves nothing behind when killed (L9), and SIGTERM with and without a grace period
(L10, L11) on a real process with the real model (test_serve_shutdown.py drives the same paths in
process, around the FakePipeline)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import chat, free_port

from benchmarks.soak import LocalServer
from benchmarks.soak_server import port_is_free
from vlmdeploy.assets import default_model_path

pytestmark = pytest.mark.slow
URL = "/v1/chat/completions"


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def start(*flags: str) -> LocalServer:
    server = LocalServer(["--log-level", "WARNING", *flags])
    server.start()
    return server


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlmdeploy", "serve", "api_server", *args,
            "--server-name", "127.0.0.1"]


# ---- L12: start-up failures --------------------------------------------------------------------


def broken_checkpoint(root: Path) -> Path:
    """The embedded model's config and tokenizer with weights that are not safetensors."""
    out = root / "broken"
    out.mkdir()
    for f in default_model_path().iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    (out / "model.safetensors").write_bytes(b"\0" * 4096)
    return out


@pytest.mark.parametrize("case", ["missing", "not-a-checkpoint", "corrupt-weights"])
def test_l12_startup_failure_exits_non_zero_with_one_clear_line(tmp_path, case):
    model = {"missing": str(tmp_path / "no-such-dir"), "not-a-checkpoint": str(tmp_path),
             "corrupt-weights": None}[case] or str(broken_checkpoint(tmp_path))
    start = time.monotonic()
    proc = subprocess.run(serve_command(model, "--server-port", str(free_port())),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vlmdeploy:")]
    assert len(lines) == 1 and "cannot load the model" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_l12_port_in_use_exits_non_zero():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(serve_command("--server-port", str(port), "--log-level", "WARNING"),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "address already in use" in proc.stderr.lower(), proc.stderr[-2000:]


# ---- L9: one process ---------------------------------------------------------------------------


def test_l9_the_server_is_one_process_and_sigkill_leaves_nothing_behind():
    """The engine runs on a thread of the API process (there are no tensor-parallel workers and
    no engine process), so killing that process ends everything: no orphan, the port is free."""
    server = start()
    try:
        pid, port = server.proc.pid, int(server.url.rsplit(":", 1)[1])
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post(URL, json=chat("Describe the image.", max_tokens=4)).status_code == 200
        assert children(pid) == []
        os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
        assert children(pid) == [] and port_is_free(port)
    finally:
        server.kill()


# ---- L10 / L11: SIGTERM ------------------------------------------------------------------------


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """Streams ``body`` on a thread; the result dict gets the lines and a `started` event."""
    result: dict = {"lines": [], "started": threading.Event()}

    def run() -> None:
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                with http.stream("POST", URL, json=body) as response:
                    result["status"] = response.status_code
                    for line in response.iter_lines():
                        if line:
                            result["lines"].append(line)
                            result["started"].set()
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["started"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def finish_reasons(lines: list[str]) -> list[str]:
    reasons = []
    for line in lines:
        payload = line.removeprefix("data: ")
        if payload != "[DONE]":
            for choice in json.loads(payload).get("choices") or []:
                if choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
    return reasons


def new_request_is_refused(url: str) -> bool:
    try:
        response = httpx.post(url + URL, json=chat(max_tokens=2), timeout=10)
    except httpx.HTTPError:
        return True  # the listener is closed
    return response.status_code == 503


def test_l10_sigterm_lets_in_flight_requests_finish():
    server = start("--shutdown-timeout", "30")
    try:
        body = chat("tell me a story", max_tokens=200, ignore_eos=True, temperature=0,
                    stream=True)
        thread, result = stream_in_background(server.url, body)
        assert result["started"].wait(30) and result.get("status") == 200
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert new_request_is_refused(server.url)
        thread.join(60)
        assert result["lines"][-1] == "data: [DONE]" and finish_reasons(result["lines"]) == [
            "length"]
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        server.kill()


def test_l11_sigterm_with_no_grace_aborts_in_flight_requests_at_once():
    server = start("--shutdown-timeout", "0")
    try:
        body = chat("tell me a story", max_tokens=1500, ignore_eos=True, temperature=0,
                    stream=True)
        thread, result = stream_in_background(server.url, body)
        assert result["started"].wait(30) and result.get("status") == 200
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(10)
        assert time.monotonic() - sent < 4
        assert code in (0, -signal.SIGTERM)
        thread.join(10)
        assert result["lines"][-1] == "data: [DONE]", result["lines"][-3:]
        assert finish_reasons(result["lines"]) == ["abort"]
    finally:
        server.kill()
