"""The soak's own server: a `vlmdeploy serve api_server` subprocess on 127.0.0.1 with an
ephemeral port, stopped with SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import httpx

# ---- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on (or holds) 127.0.0.1:``port``."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class LocalServer:
    """``vlmdeploy serve api_server`` in a subprocess, its log in a temporary file."""

    args: list[str]
    proc: subprocess.Popen | None = None
    url: str = ""
    log: Any = None
    exit_code: int | None = None
    stop_s: float | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        for _ in range(3):  # another process may take the port between probe and bind
            port = free_port()
            self.log = tempfile.TemporaryFile()
            cmd = [sys.executable, "-m", "vlmdeploy", "serve", "api_server", *self.args,
                   "--server-name", "127.0.0.1", "--server-port", str(port)]
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ready(timeout_s):
                return
            if "address already in use" not in self.log_tail().lower():
                break
        raise RuntimeError(f"the server did not start:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            with suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            time.sleep(0.2)
        self.kill()
        return False

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM; the exit code, or None when it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            self.exit_code = None if self.proc is None else self.proc.returncode
            return
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(grace_s)
            self.stop_s = time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, limit: int = 4000) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def log_errors(self) -> int:
        """Lines the server logged at ERROR or above (each 5xx is logged)."""
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return sum(1 for ln in text.splitlines() if " ERROR " in ln or " CRITICAL " in ln)
