"""Ctrl-C ends `serve` and `chat` cleanly (no traceback), and the chat reads input as LMDeploy's
does: in a terminal, a message ends at an empty line; `exit` quits and `end` starts over."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fake_pipeline import FakePipeline
from serve_helpers import free_port

from vlmdeploy.cli.chat import ChatSession, _blocks, chat_loop
from vlmdeploy.messages import GenerationConfig

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_terminal_messages_span_lines_until_an_empty_one():
    typed = io.StringIO("first line\nsecond line\n\n/image a.png\nend\nexit\nlast\n")
    blocks = list(_blocks(typed, io.StringIO()))
    assert blocks == ["first line\nsecond line", "/image a.png", "end", "exit", "last"]


def test_exit_and_end_as_in_lmdeploy(tmp_path):
    pipe = FakePipeline()
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(pipe, GenerationConfig(max_new_tokens=4), out, err)
    chat_loop(session, ["one\ntwo", "end", "three", "exit", "never"])
    prompts = [p.prompt for p in pipe.prepared]
    assert prompts == [[{"role": "user", "content": "one\ntwo"}],
                       [{"role": "user", "content": "three"}]]  # `end` reset the history
    assert "new conversation" in err.getvalue()


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def test_ctrl_c_ends_serve_without_a_traceback():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlmdeploy", "serve", "api_server",
                             "--server-name", "127.0.0.1", "--server-port", str(port),
                             "--device", "cpu", "--session-len", "512"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_healthy(proc, f"http://127.0.0.1:{port}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # drained, then the shell's code for an interrupt
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_ctrl_c_at_the_chat_prompt_quits_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "vlmdeploy", "chat", "--device", "cpu",
                             "--session-len", "512", "--max-new-tokens", "2"],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write("hi\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 90
    line = ""
    while not line:  # the first answer: the model is loaded and the chat waits for input
        assert time.monotonic() < deadline and proc.poll() is None
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
