"""Stop strings on streamed text, shared by the Python API and the HTTP server.

Text that could be the start of a stop string is held back until it is decided, so a stop string
split across several deltas is never partly sent.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str], include: bool = False):
        self._stops = [s for s in stops if s]
        self._include = include  # keep the matched stop string in the output
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text now safe to emit, whether a stop string ended the answer)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            at, stop = min(hits)
            out = self._pending[: at + len(stop) if self._include else at]
            self._pending = ""
            return out, True
        keep = max(self._held(s) for s in self._stops)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _held(self, stop: str) -> int:
        """The longest end of the pending text that begins ``stop``. Only places where ``stop``'s
        first character occurs can start one, found longest first with ``str.find``, so the usual
        cost is a scan at C speed, not a Python loop over every length (which made adversarial
        output cost milliseconds a token)."""
        n = min(len(stop) - 1, len(self._pending))
        if n <= 0:
            return 0
        tail = self._pending[-n:]
        j = tail.find(stop[0])
        while j >= 0:
            if stop.startswith(tail[j:]):
                return n - j
            j = tail.find(stop[0], j + 1)
        return 0
