"""Vision stage: encodes the images of newly scheduled sequences, many requests' tiles in one call.

Images not in the embedding cache are gathered across all sequences that need embeddings this step,
their tiles concatenated and run through the encoder in chunks of at most ``max_tiles``; the (tiles,
256, H) rows are split back per image. Each sequence then gets one (num image tokens, H) tensor in
prompt order, which it keeps until every image token has KV: a sequence preempted before that
does not re-encode; one preempted later gets its embeddings back from the cache, or re-encodes its
tiles (made then, if they were deferred). The cache is keyed by the image's content hash (decoded
pixels, size and tiling parameters) and bounded in bytes, least recently used first out; a repeated
image skips the encoder entirely.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from vlmdeploy.engine.io import ImageInput
from vlmdeploy.engine.observer import EngineObserver
from vlmdeploy.engine.sequence import Sequence
from vlmdeploy.vl.tiling import as_pixel_values


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        """A hint for other threads (no LRU update, no hit counted): the entry may be gone by the
        time the engine looks it up, so whoever skips work on it must be able to redo it."""
        return bool(key) and key in self.entries

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key) if key else None
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def clear(self) -> None:
        """Drop every entry (their memory goes once no sequence holds them)."""
        self.entries.clear()
        self.bytes = 0

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if not key or key in self.entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size


# Encoder calls take tile counts of a small fixed set: ``max_tiles``, the multiples of TILE_STEP
# below it and 1 … TILE_STEP - 1. Each new count costs set-up the first time it is seen (cuDNN's
# attention plan, GEMM heuristics: tens of ms a count), which the engine pays at start-up
# for this set (:meth:`VisionStage.warm_up`, on the engine thread: cuDNN's plans are per thread)
# rather than mid-batch for any of 64 counts.
TILE_STEP = 8


def chunk_sizes(n: int, max_tiles: int) -> list[int]:
    """Split ``n`` tiles into encoder calls of warmed sizes: full ``max_tiles`` calls, then the
    rest's multiple of TILE_STEP, then what is left (fewer than TILE_STEP)."""
    sizes = [max_tiles] * (n // max_tiles)
    rest = n % max_tiles
    for part in (rest - rest % TILE_STEP, rest % TILE_STEP):
        if part:
            sizes.append(part)
    return sizes


def warm_counts(max_tiles: int) -> list[int]:
    """Every size :func:`chunk_sizes` can give."""
    sizes = set(range(1, min(TILE_STEP, max_tiles + 1)))
    sizes |= set(range(TILE_STEP, max_tiles, TILE_STEP)) | {max_tiles}
    return sorted(sizes)


class VisionStage:
    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        max_tiles: int,
        cache_bytes: int = 0,
        pin_memory: bool = False,
        observer: EngineObserver | None = None,
    ):
        self.encode = encode  # (tiles, 3, 448, 448) → (tiles, 256, H)
        self.max_tiles = max_tiles
        self.pin_memory = pin_memory  # gather raw tiles straight into page-locked memory
        self.cache = EmbeddingCache(cache_bytes)
        self.observer = observer or EngineObserver()

    def warm_up(self, tile_shape: tuple[int, ...]) -> None:
        """One encoder call at every size of :func:`warm_counts`, on blank raw (uint8, host)
        tiles of ``tile_shape``."""
        for n in warm_counts(self.max_tiles):
            self.encode(torch.zeros(n, *tile_shape, dtype=torch.uint8))

    def attach_embeddings(self, seqs: list[Sequence]) -> None:
        """Give every sequence that needs them its image embeddings: from the cache, or from one
        batched pass of the missing images through the encoder."""
        pending = [s for s in seqs if s.needs_vision]
        if not pending:
            return
        found: dict[int, torch.Tensor] = {}  # id(image) → (tiles, 256, H)
        misses: list[ImageInput] = []
        for im in (im for s in pending for im in s.images):
            hit = self.cache.get(im.content_hash)
            if hit is not None:
                found[id(im)] = hit
            elif all(im is not m for m in misses):
                misses.append(im)
        if misses:
            # pixels() makes deferred tiles now
            tiles = _one_batch([im.pixels() for im in misses], self.pin_memory)
            self.observer.tiles_encoded += len(tiles)
            bounds = itertools.accumulate(chunk_sizes(len(tiles), self.max_tiles), initial=0)
            starts = list(bounds)
            out = torch.cat([self.encode(tiles[a:b]) for a, b in zip(starts, starts[1:])])
            start = 0
            for im in misses:
                n = len(im.pixels())
                found[id(im)] = out[start : start + n].clone()  # a view would pin all of `out`
                self.cache.put(im.content_hash, found[id(im)])
                start += n
        for seq in pending:
            seq.image_embeds = torch.cat([found[id(im)] for im in seq.images]).flatten(0, 1)


def _one_batch(parts: list[torch.Tensor], pin_memory: bool = False) -> torch.Tensor:
    """Concatenate images' tiles: raw uint8 ones as they are, unless some image came already
    normalised (float32), in which case the raw ones are normalised here too.

    Raw tiles are gathered by one plain copy each (numpy), into page-locked memory from PyTorch's
    host cache with ``pin_memory``, which the copy to the device then reads directly. ``torch.cat``
    splits such a copy over its intra-op threads, and while request preparation keeps cores busy
    the engine thread spun at their barriers: 200+ ms of CPU for 28 tiles (16.8 MB), a step at a
    time, with the GPU idle."""
    if any(p.dtype != torch.uint8 for p in parts):
        return torch.cat([as_pixel_values(p) for p in parts])
    if any(p.device.type != "cpu" for p in parts):  # tiles already off the host
        return torch.cat(parts)
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    out = torch.empty(shape, dtype=torch.uint8, pin_memory=pin_memory)
    np.concatenate([p.numpy() for p in parts], out=out.numpy())
    return out
