"""What the soak checks: that every answer is well-formed, and what the server's process uses.

An answer is well-formed when it is a 200 with a valid OpenAI body, or a stream of ``data:``
frames ending in ``data: [DONE]`` with every choice finished; or a 4xx, or a 503 with a reason, in
OpenAI's error envelope (``Retry-After`` on 429 and 503). Anything else is a violation, by class:

* ``server_error``: a 5xx other than 503 (OpenAI's SDKs retry those: bad input would triple load);
* ``stream_error``: an error frame inside a 200 stream (the request was accepted, then failed);
* ``malformed``: a body or stream that is not what the status promises;
* ``unexpected_status``: a well-formed answer that is wrong for the request (a 200 for bad input,
  a 4xx for a valid request);
* ``timeout``: no complete answer within the per-request deadline (a hang);
* ``transport``: the connection failed in a way the client did not cause.

Also here: the Prometheus text parser for ``/metrics``, process RSS (psutil when installed, else
``/proc``), GPU memory (``nvidia-smi``) and the flatness rule for both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from benchmarks.soak_mix import Case

VIOLATIONS = ("server_error", "stream_error", "malformed", "unexpected_status", "timeout",
              "transport")
ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}
FINISH = {"stop", "length"}
MIB = 1 << 20

LOCAL_BODY_CAP = 8 << 20  # the own server's --max-body-bytes: oversize requests stay cheap
SERVER_DEFAULT_BODY_CAP = 64 << 20
WARM_FRACTION = 0.2
RUNNING, WAITING, KV = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                        "vllm:kv_cache_usage_perc")


@dataclass
class Outcome:
    """How one request ended: ``ok`` (200, valid), ``rejected`` (a right 4xx/503), ``disconnected``
    or ``aborted`` (the client left, as planned), or ``violation`` (``error`` says which)."""

    index: int
    kind: str
    result: str
    status: int | None = None
    code: str | None = None
    error: str | None = None
    detail: str = ""
    seconds: float = 0.0


def violation(case: Case, error: str, detail: str, status: int | None = None) -> Outcome:
    return Outcome(case.index, case.kind, "violation", status, error=error, detail=detail[:300])


def check_envelope(status: int, body: bytes, headers: dict[str, str]) -> str | None:
    """Why an error answer is not in OpenAI's envelope (None when it is)."""
    try:
        value = json.loads(body)
    except ValueError:
        return f"error body is not JSON: {body[:80]!r}"
    if not isinstance(value, dict) or set(value) != {"error"} or not isinstance(
            value["error"], dict):
        return f"not an error envelope: {body[:120]!r}"
    error = value["error"]
    if set(error) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(error)}"
    if not isinstance(error["message"], str) or not error["message"]:
        return "error without a message"
    if error["code"] is not None and not isinstance(error["code"], str):
        return f"error code {error['code']!r} is not a string"
    if error["type"] != ERROR_TYPES.get(status, "invalid_request_error"):
        return f"error type {error['type']!r} for status {status}"
    if status in (429, 503) and "retry-after" not in headers:
        return f"{status} without Retry-After"
    return None


def error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def check_answer(case: Case, status: int, body: bytes, headers: dict[str, str]) -> Outcome:
    """A whole (non-streamed) answer."""
    ok_statuses = case.expect
    if status >= 500 and status != 503:
        return violation(case, "server_error", body.decode(errors="replace"), status)
    if status != 200:
        problem = check_envelope(status, body, headers)
        if problem:
            return violation(case, "malformed", problem, status)
        if status not in ok_statuses:
            return violation(case, "unexpected_status", f"{status} {body[:200]!r}", status)
        return Outcome(case.index, case.kind, "rejected", status, code=error_code(body))
    if status not in ok_statuses:
        return violation(case, "unexpected_status", f"200 for bad input: {body[:120]!r}", status)
    try:
        value = json.loads(body)
    except ValueError:
        return violation(case, "malformed", f"200 body is not JSON: {body[:80]!r}", status)
    problem = check_body(case, value)
    if problem:
        return violation(case, "malformed", problem, status)
    return Outcome(case.index, case.kind, "ok", status)


def _usage_problem(usage: Any) -> str | None:
    if not isinstance(usage, dict):
        return "no usage"
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        return f"usage counts {counts}"
    if counts[0] + counts[1] != counts[2] or counts[0] == 0:
        return f"usage does not add up: {counts}"
    return None


def check_body(case: Case, value: Any) -> str | None:
    """Why a 200 body is not a chat.completion / text_completion for ``case``."""
    chat = case.path.endswith("chat/completions")
    if not isinstance(value, dict):
        return "body is not an object"
    if value.get("object") != ("chat.completion" if chat else "text_completion"):
        return f"object {value.get('object')!r}"
    if not isinstance(value.get("id"), str) or not isinstance(value.get("created"), int):
        return "id or created missing"
    choices = value.get("choices")
    if not isinstance(choices, list) or sorted(c.get("index") for c in choices) != list(
            range(case.choices)):
        return f"choices {str(choices)[:120]}"
    for c in choices:
        if c.get("finish_reason") not in FINISH:
            return f"finish_reason {c.get('finish_reason')!r}"
        message = c.get("message") if chat else c
        field_ = "content" if chat else "text"
        if not isinstance(message, dict) or not isinstance(message.get(field_), str):
            return f"choice without {field_}"
        if chat and message.get("role") != "assistant":
            return f"role {message.get('role')!r}"
    return _usage_problem(value.get("usage"))


class StreamCheck:
    """Checks a 200 stream frame by frame (``feed``) and at its end (``finish``)."""

    def __init__(self, case: Case):
        self.case = case
        self.chat = case.path.endswith("chat/completions")
        self.finished: set[int] = set()
        self.done = False
        self.usage_seen = False
        self.frames = 0
        self.ids: set[str] = set()
        self.problem: str | None = None
        self.error: dict[str, Any] | None = None

    def feed(self, line: str) -> None:
        """One non-empty line of the stream."""
        if self.problem or self.error:
            return
        if self.done:
            self.problem = "data after [DONE]"
        elif not line.startswith("data: "):
            self.problem = f"line is not a data frame: {line[:80]!r}"
        elif line == "data: [DONE]":
            self.done = True
        else:
            self._chunk(line[len("data: "):])

    def _chunk(self, payload: str) -> None:
        self.frames += 1
        try:
            chunk = json.loads(payload)
        except ValueError:
            self.problem = f"frame is not JSON: {payload[:80]!r}"
            return
        if isinstance(chunk, dict) and "error" in chunk:
            self.error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            return
        want = "chat.completion.chunk" if self.chat else "text_completion"
        if not isinstance(chunk, dict) or chunk.get("object") != want:
            self.problem = f"chunk object {str(chunk)[:80]}"
            return
        self.ids.add(chunk.get("id"))
        if chunk.get("choices") == [] and chunk.get("usage") is not None:
            self.usage_seen = True
            self.problem = _usage_problem(chunk["usage"])
            return
        if self.usage_seen:
            self.problem = "chunk after the usage chunk"
        for choice in chunk.get("choices") or []:
            index, reason = choice.get("index"), choice.get("finish_reason")
            if not isinstance(index, int) or not 0 <= index < self.case.choices:
                self.problem = f"choice index {index!r}"
            elif index in self.finished:
                self.problem = f"choice {index} continues after its finish_reason"
            elif reason is not None:
                if reason not in FINISH:
                    self.problem = f"finish_reason {reason!r}"
                self.finished.add(index)

    def finish(self) -> tuple[str, str] | None:
        """(violation class, detail) of a stream that ended, or None when it is well-formed."""
        if self.problem:
            return "malformed", self.problem
        if self.error is not None:
            return "stream_error", json.dumps(self.error)[:200]
        if not self.done:
            return "malformed", "stream ended without [DONE]"
        if len(self.finished) != self.case.choices:
            return "malformed", f"{len(self.finished)} of {self.case.choices} choices finished"
        if self.case.usage_chunk and not self.usage_seen:
            return "malformed", "no usage chunk"
        if len(self.ids) > 1:
            return "malformed", "chunks of one stream carry different ids"
        return None


# ---- /metrics ------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {series name: value}, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


# ---- memory --------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` (None once it is gone)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_memory_bytes() -> int | None:
    """Memory used on all GPUs together (nvidia-smi), None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10)
        return sum(int(v) for v in out.stdout.split()) * MIB
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def flat(warm: float | None, end: float | None, rel: float, abs_bytes: float) -> bool | None:
    """The flatness rule: ``end <= warm * (1 + rel) + abs_bytes``; None when not measured."""
    if warm is None or end is None:
        return None
    return end <= warm * (1 + rel) + abs_bytes


def cpu_name() -> str:
    """The machine, for the results' note: CPU model and core count."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        "")
    except OSError:
        pass
    return f"{name or 'CPU'}, {os.cpu_count()} cores"
