"""A prompt's images → what the engine needs of them: tiles, tile counts and content hashes.

:meth:`ImagePreparer.prepare` loads every image of a request under its :class:`MediaPolicy`, with
one deadline for all of them (``REQUEST_MEDIA_BUDGET`` × the per-image timeout), and checks their
tokens against ``session_len`` from the image sizes alone, before any tiling: a request that cannot
fit never allocates tiles. Only then is each image hashed and tiled (uint8, normalised later on the
device).

Two shortcuts skip work the engine would not use:

* An image whose embedding the engine holds (a chat's next turn re-sends it) is hashed but not
  tiled. It carries a :class:`~vlmdeploy.engine.io.TileSource` instead, which the engine runs only
  if the embedding was evicted in between.
* An inline image (a ``data:`` URL or bytes) seen before is not even decoded: its source's digest
  maps to its content hash and tile count (:mod:`vlmdeploy.vl.source_memo`), and its TileSource
  decodes it from the source should the tiles be needed. The frames of an inline video likewise
  (keyed by the video's digest, its sampling and the frame's index): a follow-up question about
  the same video decodes nothing. Paths, http URLs and PIL images are always
  loaded, since what they name may change.

TileSources are frozen dataclasses of plain data (an image or its inline source, the limits it was
checked under, the tiling parameters), so a request pickles whole and the engine could run in
another process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from vlmdeploy.engine.io import TileSource
from vlmdeploy.errors import ContextLengthExceeded, ImageError, InvalidRequestError
from vlmdeploy.frontend.prompt import ImageRef
from vlmdeploy.vl.media import MediaPolicy, load_image
from vlmdeploy.vl.media_policy import MSG_URL
from vlmdeploy.vl.source_memo import SourceMemo, source_key, video_frame_key
from vlmdeploy.vl.tiling import TilingParams, raw_tiles
from vlmdeploy.vl.video import VideoFrame, load_video

# A request's images together may take this many times the per-image fetch timeout.
REQUEST_MEDIA_BUDGET = 2.0

logger = logging.getLogger("vlmdeploy")


def tiles_of(image: Image.Image, params: TilingParams) -> torch.Tensor:
    """uint8 (tiles, image_size, image_size, 3): normalised on the device when encoded."""
    return raw_tiles(
        image,
        max_num=params.max_num,
        min_num=params.min_num,
        image_size=params.image_size,
        use_thumbnail=params.use_thumbnail,
    )


def content_hash(image: Image.Image, params: TilingParams) -> str:
    """The embedding cache's key of an image tiled with ``params``: its pixels, mode, size and the
    tiling parameters."""
    key = hashlib.sha256(image.tobytes())  # twice blake2b's speed with SHA instructions
    key.update(repr((image.mode, image.size, params.key)).encode())
    return key.hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class ImageTiles:
    """A :class:`TileSource` for a decoded image."""

    image: Image.Image
    params: TilingParams

    def make_tiles(self) -> torch.Tensor:
        return tiles_of(self.image, self.params)


@dataclass(frozen=True, eq=False)
class InlineImageTiles:
    """A :class:`TileSource` for an inline image: decoded again from its source, under the limits
    it was checked with, only if the tiles are needed. The source holds all its bytes, so making
    the tiles needs no network; the policy's resolver (a callable that may not pickle) is dropped,
    and mutable buffers are copied so the source cannot change under the request."""

    source: str | bytes
    policy: MediaPolicy
    params: TilingParams

    def __post_init__(self) -> None:
        if isinstance(self.source, (bytearray, memoryview)):
            object.__setattr__(self, "source", bytes(self.source))
        if self.policy.resolver is not None:
            object.__setattr__(self, "policy", dataclasses.replace(self.policy, resolver=None))

    def make_tiles(self) -> torch.Tensor:
        return tiles_of(load_image(self.source, self.policy), self.params)


@dataclass(frozen=True, eq=False)
class InlineVideoFrameTiles:
    """A :class:`TileSource` for one frame of an inline video: the video decoded again from its
    source and sampled as before, only if the engine dropped the frame's embedding."""

    source: str | bytes
    num_frames: int
    start: float | None
    end: float | None
    index: int
    policy: MediaPolicy
    params: TilingParams

    @classmethod
    def of(
        cls, frame: VideoFrame, policy: MediaPolicy, params: TilingParams
    ) -> InlineVideoFrameTiles:
        """Plain data that pickles: buffers copied, the policy's resolver dropped."""
        clip = frame.clip
        source = clip.source
        if isinstance(source, (bytearray, memoryview)):
            source = bytes(source)
        policy = dataclasses.replace(policy, resolver=None)
        return cls(source, clip.num_frames, clip.start, clip.end, frame.index, policy, params)

    def make_tiles(self) -> torch.Tensor:
        video = load_video(self.source, self.num_frames, self.start, self.end, policy=self.policy)
        return tiles_of(video.frames[self.index], self.params)


@dataclass
class PreparedImage:
    """One prepared image: its tiles, or None and ``deferred`` when the engine holds its
    embedding; their number; its content hash."""

    pixel_values: torch.Tensor | None
    num_tiles: int
    content_hash: str
    deferred: TileSource | None = None


@dataclass
class _Loaded:
    """An image decoded and sized, not yet tiled; ``memo_key`` is its source's key, if inline."""

    image: Image.Image
    params: TilingParams
    num_tiles: int
    memo_key: str | None


class ImagePreparer:
    """Loads, checks, hashes and tiles a request's images. Thread-safe: the preparation threads
    share one instance (and its source memo)."""

    def __init__(
        self,
        defaults: TilingParams,
        tokens_per_tile: int,
        session_len: int,
        is_cached: Callable[[str], bool],
    ):
        self.defaults = defaults  # the checkpoint's tiling; a request may lower max_num per image
        self.tokens_per_tile = tokens_per_tile
        self.session_len = session_len
        self.is_cached = is_cached  # the engine holds this content hash's embedding (a hint)
        self.memo = SourceMemo()  # inline images already decoded: their hash and tile count

    def params(self, ref: ImageRef) -> TilingParams:
        """Tiling parameters of one image: the checkpoint's, with the image's own tile limit."""
        if ref.max_dynamic_patch is None:
            return self.defaults
        return dataclasses.replace(self.defaults, max_num=ref.max_dynamic_patch)

    def prepare(
        self,
        refs: list[ImageRef],
        policy: MediaPolicy | None = None,
        cancel: threading.Event | None = None,
        text_tokens: int = 0,
    ) -> list[PreparedImage]:
        """Load every image, check that their tokens and the prompt's ``text_tokens`` fit
        ``session_len`` (known from the sizes alone), and only then tile them. All of a request's
        images share one deadline of ``REQUEST_MEDIA_BUDGET`` × the policy's per-image
        ``timeout_s``, so many slow images cannot hold a worker for long; a set ``cancel`` stops
        the work between images and an image's download within moments."""
        policy = policy or MediaPolicy()
        deadline = time.monotonic() + REQUEST_MEDIA_BUDGET * policy.timeout_s
        items: list[PreparedImage | _Loaded] = []
        n_tokens = text_tokens
        for ref in refs:
            if cancel is not None and cancel.is_set():
                raise InvalidRequestError("the request was cancelled", code="cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError(
                    "fetching the request's images took too long",
                    code="image_fetch_timeout",
                    param=ref.param,
                )
            params = self.params(ref)
            key = (video_frame_key(ref.source, policy, params) if isinstance(ref.source, VideoFrame)
                   else source_key(ref.source, policy, params))
            item = self._recall(ref, policy, params, key) or self._load_sized(
                ref, dataclasses.replace(policy, timeout_s=min(policy.timeout_s, remaining)),
                params, key, cancel,
            )
            n_tokens += item.num_tiles * self.tokens_per_tile
            if n_tokens >= self.session_len:
                what = "the text and images" if text_tokens else "the images alone"
                raise ContextLengthExceeded(
                    f"{what} need {n_tokens} tokens or more, which does not fit "
                    f"session_len={self.session_len}"
                )
            items.append(item)
        return [item if isinstance(item, PreparedImage) else self._tile(item) for item in items]

    def _recall(
        self, ref: ImageRef, policy: MediaPolicy, params: TilingParams, key: str | None
    ) -> PreparedImage | None:
        """An inline image seen before whose embedding is held: neither decoded nor tiled now."""
        known = self.memo.get(key)
        if known is None or not self.is_cached(known[0]):
            return None
        digest, n = known
        if isinstance(ref.source, VideoFrame):  # a repeated inline video: not even decoded
            return PreparedImage(None, n, digest, InlineVideoFrameTiles.of(ref.source, policy,
                                                                           params))
        return PreparedImage(None, n, digest, InlineImageTiles(ref.source, policy, params))

    def _load_sized(
        self,
        ref: ImageRef,
        policy: MediaPolicy,
        params: TilingParams,
        key: str | None,
        cancel: threading.Event | None = None,
    ) -> _Loaded:
        image = self._load(ref, policy, cancel)
        return _Loaded(image, params, params.num_tiles(image.width, image.height), key)

    def _load(
        self, ref: ImageRef, policy: MediaPolicy, cancel: threading.Event | None = None
    ) -> Image.Image:
        try:
            if isinstance(ref.source, VideoFrame):  # the first frame decodes the whole clip
                return ref.source.image(policy, cancel)  # RGB, checked against video limits
            return load_image(ref.source, policy, cancel)
        except ImageError as exc:
            exc.param = exc.param or ref.param  # name the offending part: messages[i].content[j]…
            if exc.code in ("invalid_image_url", "image_fetch_timeout"):
                logger.warning("image %s not loaded: %s", exc.param, exc.message)
            raise
        except UnicodeError:  # a path (os.PathLike included) with no UTF-8 form: a lone surrogate
            raise ImageError(MSG_URL, code="invalid_image_url", param=ref.param) from None

    def _tile(self, item: _Loaded) -> PreparedImage:
        """The image's tiles and content hash. When the engine already holds its embedding (a
        follow-up turn, a repeated image), tiling is deferred to the engine, which runs it only if
        that entry is gone when needed."""
        digest = content_hash(item.image, item.params)
        self.memo.put(item.memo_key, digest, item.num_tiles)
        if self.is_cached(digest):
            return PreparedImage(None, item.num_tiles, digest, ImageTiles(item.image, item.params))
        return PreparedImage(tiles_of(item.image, item.params), item.num_tiles, digest)
