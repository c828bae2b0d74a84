"""Handing the memory of a large refused request back to the operating system.

A refused request's body (up to `max_body_bytes`) and what was parsed from it are freed as soon as
the request is answered: nothing keeps a reference to them, and exceptions are raised without
reference cycles that would wait for the garbage collector. Freed is not returned, though: glibc
keeps freed heap pages mapped, so a server that refused one 60 MB prompt would hold the memory
for good. After a refused request of `TRIM_AFTER_BYTES` or more, `malloc_trim(0)` runs on a
thread of its own (it locks the allocator's arenas for a few milliseconds, never the event loop),
at most one at a time. Where the C library is not glibc, this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import threading

logger = logging.getLogger("vlmdeploy.serve")

TRIM_AFTER_BYTES = 4 << 20
# Long enough for the request's frames (and the body they hold) to be gone when the trim runs.
TRIM_DELAY_S = 0.05

_trimming = threading.Lock()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Return the free heap to the operating system now; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _trim_once() -> None:
    if not _trimming.acquire(blocking=False):
        return  # a trim is running: it returns this request's pages too
    try:
        release_memory()
    except Exception:  # never let housekeeping fail a request
        logger.debug("malloc_trim failed", exc_info=True)
    finally:
        _trimming.release()


def release_memory_soon(request_bytes: int) -> None:
    """After a refused request of `request_bytes`: trim the heap shortly, off the event loop."""
    if request_bytes < TRIM_AFTER_BYTES or _malloc_trim() is None:
        return
    loop = asyncio.get_running_loop()
    loop.call_later(TRIM_DELAY_S, lambda: threading.Thread(target=_trim_once, daemon=True).start())
