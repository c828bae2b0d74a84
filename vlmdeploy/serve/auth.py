"""Bearer API keys, checked in front of routing so no path spelling can skip them.

The check is a raw ASGI middleware: it runs before the router decodes or normalizes the path, so
`//v1/chat/completions`, `/v1/%63hat/completions` or a `root_path` prefix all need a key. Only the
exact paths `/health` (load balancers probe it without credentials) and, unless
`--protect-metrics`, `/metrics` (scraped as vLLM's is; it holds counts and timings only) are
open. Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured
key, so timing reveals neither a key nor which one matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from vlmdeploy.serve.errors import APIError

OPEN_PATHS = ("/health", "/metrics")


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Sequence[str],
                 open_paths: Sequence[str] = OPEN_PATHS):
        self.app = app
        self._digests = [_digest(k) for k in api_keys]
        self._open = {p: p.encode() for p in open_paths}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Incorrect or missing API key.", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)

    def _is_open(self, scope: Scope) -> bool:
        raw, path = scope.get("raw_path"), scope["path"]
        return (path in self._open and not scope.get("root_path")
                and (raw is None or raw == self._open[path]))

    def _authorized(self, scope: Scope) -> bool:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        presented = _digest(token.strip())
        matched = False
        for digest in self._digests:  # no early exit: every key costs the same
            matched |= hmac.compare_digest(presented, digest)
        return matched
