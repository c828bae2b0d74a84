"""What inline images decoded to, so a repeated one need not be decoded again to be recognised.

A chat client re-sends the whole conversation every turn, its images included as base64 data URLs.
Once the turn's prefix comes from the cache, decoding and hashing those images again would be most
of its time to first token. An inline source (a ``data:`` URL or bytes) carries its whole
content, so its own digest, taken with the limits it was checked against and the tiling parameters,
identifies the decoded image exactly: the memo maps that digest to the image's content hash and
tile count. Sources that name content elsewhere (paths, http URLs, PIL images) are never memoised:
what they point at may change.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from vlmdeploy.vl.media import MediaPolicy
from vlmdeploy.vl.tiling import TilingParams


def source_key(source: Any, policy: MediaPolicy, params: TilingParams) -> str | None:
    """The memo key of an inline ``source`` loaded under ``policy`` and tiled with ``params``, or
    None for a source that is not inline."""
    if isinstance(source, str) and source[:5].lower() == "data:":
        data = source.encode("utf-8", "surrogatepass")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        return None
    key = hashlib.sha256(data)  # twice blake2b's speed where the CPU has SHA instructions
    limits = (policy.max_bytes, policy.max_pixels, policy.allowed_formats, params.key, type(source))
    key.update(repr(limits).encode())
    return key.hexdigest()[:32]


def video_frame_key(frame: Any, policy: MediaPolicy, params: TilingParams) -> str | None:
    """The memo key of frame ``frame.index`` of an inline video clip (a
    :class:`~vlmdeploy.vl.video.VideoFrame`) sampled as its clip says under ``policy``'s video
    limits and tiled with ``params``, or None when the clip's source is not inline. The source's
    digest is taken once per clip, not once per frame."""
    digest = frame.clip.source_digest()
    if digest is None:
        return None
    clip = frame.clip
    what = (digest, clip.num_frames, clip.start, clip.end, frame.index, policy.video, params.key)
    return hashlib.sha256(repr(what).encode()).hexdigest()[:32]


class SourceMemo:
    """Thread-safe LRU map: source key → (content hash, tile count)."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> tuple[str, int] | None:
        if key is None:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str | None, content_hash: str, num_tiles: int) -> None:
        if key is None or self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = (content_hash, num_tiles)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
