"""Sending one soak case and turning what comes back into an :class:`Outcome`: whole answers,
SSE streams read frame by frame, and bodies over the cap sent on a raw socket."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

import httpx

from benchmarks.soak_checks import (
    Outcome,
    StreamCheck,
    check_answer,
    violation,
)
from benchmarks.soak_mix import Case


async def _stream(client: httpx.AsyncClient, case: Case) -> Outcome:
    async with client.stream(case.method, case.path, content=case.body,
                             headers=dict(case.headers)) as response:
        if response.status_code != 200:
            body = await response.aread()
            return check_answer(case, response.status_code, body, dict(response.headers))
        if 200 not in case.expect:
            return violation(case, "unexpected_status", "200 stream for bad input", 200)
        check = StreamCheck(case)
        async for line in response.aiter_lines():
            if not line:
                continue
            check.feed(line)
            if case.action == "disconnect" and check.frames >= case.after and not check.done:
                if check.problem or check.error:
                    break
                return Outcome(case.index, case.kind, "disconnected", 200)
        failed = check.finish()
        if failed:
            return violation(case, failed[0], failed[1], 200)
        return Outcome(case.index, case.kind, "ok", 200)


async def _whole(client: httpx.AsyncClient, case: Case) -> Outcome:
    response = await client.request(case.method, case.path, content=case.body,
                                    headers=dict(case.headers))
    return check_answer(case, response.status_code, response.content, dict(response.headers))


async def _raw_oversize(base_url: str, case: Case, authorization: str | None) -> Outcome:
    """A body over the cap, on a raw socket: the headers declare ``declared_bytes``, then the body
    goes in 64 KiB pieces until the answer starts (at most 4 MiB). The server answers 413 before
    reading it all and closes; an HTTP client library would report that as a failed write."""
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    raw = b""
    try:
        writer.write(f"POST {case.path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: "
                     f"application/json\r\nContent-Length: {case.declared_bytes}\r\n\r\n"
                     .encode())
        with suppress(ConnectionError):
            for _ in range(64):
                writer.write(b"x" * 65536)
                await writer.drain()
                with suppress(asyncio.TimeoutError):
                    raw += await asyncio.wait_for(reader.read(65536), 0.02)
                if raw:
                    break
        with suppress(ConnectionError):  # the rest of the answer, up to the close
            while chunk := await reader.read(65536):
                raw += chunk
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return violation(case, "transport", f"no answer to an oversize body: {raw[:80]!r}")
    headers = dict(ln.lower().split(": ", 1) for ln in lines[1:] if ": " in ln)
    return check_answer(case, int(lines[0].split()[1]), body, headers)


async def send(client: httpx.AsyncClient, case: Case, timeout_s: float) -> Outcome:
    """Send ``case`` and check the answer; never raises."""
    start = time.monotonic()

    async def attempt() -> Outcome:
        if case.declared_bytes:
            return await _raw_oversize(str(client.base_url).rstrip("/"), case,
                                       client.headers.get("authorization"))
        work = _stream(client, case) if case.stream else _whole(client, case)
        if case.action != "abort":
            return await work
        try:
            return await asyncio.wait_for(work, case.after)
        except asyncio.TimeoutError:
            return Outcome(case.index, case.kind, "aborted")

    try:
        outcome = await asyncio.wait_for(attempt(), timeout_s)
    except asyncio.TimeoutError:
        outcome = violation(case, "timeout", f"no complete answer within {timeout_s:g} s")
    except (httpx.HTTPError, OSError) as exc:
        outcome = violation(case, "transport", f"{type(exc).__name__}: {exc}")
    outcome.seconds = time.monotonic() - start
    return outcome
