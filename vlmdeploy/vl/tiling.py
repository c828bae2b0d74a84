"""InternVL dynamic tiling: how an image becomes ``(tiles, 3, 448, 448)`` pixel values.

Contract (must match the InternVL reference preprocessing bit for bit):

* A grid (cols, rows) is chosen from the candidates with ``min_num <= cols * rows <= max_num``,
  taken in the reference order (see `_candidates`). The candidate with the smallest
  ``|w / h - cols / rows|`` wins; on an exact tie a later candidate replaces the current one only
  if the image area exceeds ``0.5 * image_size**2 * cols * rows``.
* The RGB image is resized to ``(image_size * cols, image_size * rows)`` with PIL bicubic and cut
  into tiles row-major. If that gives more than one tile and ``use_thumbnail`` is set, the whole
  image resized to ``image_size x image_size`` (bicubic) is appended last.
* Each tile is scaled by ``/ 255`` and normalized with the ImageNet mean and std in float32, with
  the reference's operation order (divide, subtract, divide), so results are bitwise equal.

The tile count depends on the image size alone, so prompts can be sized (``num_image_tokens``)
before any pixel is touched. Every function here is pure and safe to call from a thread pool.
:class:`TilingParams` names the four numbers that decide an image's tiles.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 448
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# LMDeploy's per-image `detail` levels for InternVL, as max tiles.
DETAIL_MAX_NUM = {"low": 6, "medium": 12, "high": 24}


@dataclass(frozen=True)
class TilingParams:
    """How one image is tiled: at most ``max_num`` and at least ``min_num`` grid tiles of
    ``image_size`` pixels square, plus a thumbnail when the grid has more than one tile."""

    max_num: int = 12
    min_num: int = 1
    image_size: int = IMAGE_SIZE
    use_thumbnail: bool = True

    @property
    def key(self) -> tuple[int, int, int, bool]:
        """The parameters as a plain tuple, whose ``repr`` content hashes and source keys take in.
        A tuple's ``repr`` has no class or field names in it, so renaming this class or its fields
        leaves every cache key as it is (tests pin the hashed bytes)."""
        return (self.max_num, self.min_num, self.image_size, self.use_thumbnail)

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles of a ``width x height`` image, thumbnail included."""
        return num_tiles(width, height, self.max_num, self.min_num, self.use_thumbnail,
                         self.image_size)


@lru_cache(maxsize=64)
def _candidates(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Candidate (cols, rows) grids in the reference order.

    The reference collects the grids in a Python set, then stable-sorts them by tile count, so
    grids with the same count keep the set's iteration order. That order decides exact ties when
    ``min_num > 1`` (e.g. (3, 1) vs (1, 3) for min = max = 3), so it is reproduced by inserting
    the same tuples in the same sequence into a set (tuple-of-int hashing is not randomized).
    """
    grids = {
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def _check_args(width: int, height: int, min_num: int, max_num: int) -> None:
    if width < 1 or height < 1:
        raise ValueError("image width and height must be >= 1")
    if not 1 <= min_num <= max_num:
        raise ValueError("tile counts must satisfy 1 <= min_num <= max_num")


def target_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = IMAGE_SIZE
) -> tuple[int, int]:
    """The (cols, rows) tile grid for an image of ``width x height`` pixels."""
    _check_args(width, height, min_num, max_num)
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidates(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            # Exact tie: take the larger grid only when the image has pixels enough to fill it.
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    image_size: int = IMAGE_SIZE,
) -> int:
    """How many tiles `dynamic_tiles` produces for this size (thumbnail included)."""
    cols, rows = target_grid(width, height, min_num, max_num, image_size)
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks > 1 else blocks


def tokens_per_tile(
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    downsample_ratio: float = DOWNSAMPLE_RATIO,
) -> int:
    """Image tokens one tile becomes after pixel shuffle (256 for 448 / 14 / 0.5)."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def num_image_tokens(
    width: int,
    height: int,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    downsample_ratio: float = DOWNSAMPLE_RATIO,
) -> int:
    """Number of ``<IMG_CONTEXT>`` tokens the image takes in the prompt."""
    tiles = num_tiles(width, height, max_num, min_num, use_thumbnail, image_size)
    return tiles * tokens_per_tile(image_size, patch_size, downsample_ratio)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def dynamic_tiles(
    image: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """The tiles as PIL images: row-major grid tiles, then the thumbnail (if more than one tile)."""
    image = _rgb(image)
    cols, rows = target_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def tile_array(
    image: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> np.ndarray:
    """The tiles as one uint8 array (tiles, image_size, image_size, 3), without per-tile images.

    The thumbnail is resized from the original on another thread while this one resizes the grid
    (Pillow lets go of the GIL while it resamples): the same two resizes, and the request's latency
    shorter by the thumbnail's."""
    image = _rgb(image)
    image.load()  # decode once, here, before two threads read it
    cols, rows = target_grid(image.width, image.height, min_num, max_num, image_size)
    s = image_size
    thumb = None
    if use_thumbnail and cols * rows > 1:
        thumb = _thumbnail_pool().submit(image.resize, (s, s), Image.Resampling.BICUBIC)
    resized = np.asarray(image.resize((s * cols, s * rows), Image.Resampling.BICUBIC))
    # (rows*s, cols*s, 3) -> (rows, s, cols, s, 3) -> (rows, cols, s, s, 3): row-major tiles
    tiles = resized.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
    if thumb is not None:
        tiles = np.concatenate([tiles, np.asarray(thumb.result())[None]], axis=0)
    return tiles


@lru_cache(maxsize=1)
def _thumbnail_pool() -> ThreadPoolExecutor:
    """Threads that resize thumbnails for the preparing threads, each of which waits for one
    thumbnail at a time."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlmdeploy-thumb")


@lru_cache(maxsize=1)
def _normalize_table() -> np.ndarray:
    """float32 (3, 256): the normalized value of every uint8 input, per channel.

    Computed with the reference's float32 ops in its order (ToTensor: ``/ 255``; Normalize:
    ``- mean``, ``/ std``), so a lookup gives bitwise the reference's result at a third of the cost
    of doing the arithmetic over every pixel.
    """
    values = torch.arange(256, dtype=torch.float32).expand(3, 256)  # (3, 256)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1)
    table = values.div(255).sub(mean).div(std).numpy()
    table.setflags(write=False)  # shared by every caller (cached)
    return table


def normalize_tiles(tiles: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) holding ``(x / 255 - mean) / std``."""
    t, h, w, _ = tiles.shape
    table = _normalize_table()
    out = np.empty((t, 3, h, w), dtype=np.float32)  # (T, 3, H, W)
    for c in range(3):
        np.take(table[c], tiles[..., c], out=out[:, c], mode="clip")  # uint8 indices, never clipped
    return torch.from_numpy(out)


def raw_tiles(
    image: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """The tiles before normalisation: uint8 (tiles, image_size, image_size, 3). A quarter of the
    float32 tiles' memory; :func:`normalize_raw` finishes them wherever they are (the GPU)."""
    tiles = tile_array(image, max_num, min_num, image_size, use_thumbnail)
    return torch.from_numpy(np.require(tiles, requirements=["C", "W"]))  # copies a read-only view


def normalize_raw(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) on any device -> float32 (T, 3, H, W) holding ``(x / 255 - mean) / std``.

    A lookup in :func:`_normalize_table` (made once on the CPU, copied once per device), so the
    values are bitwise the reference's on every device: the GPU's division of the same float32
    operands does not always round as the CPU's vectorised one does."""
    flat, base = _table_on(str(tiles.device))
    index = tiles.permute(0, 3, 1, 2).to(torch.int32, memory_format=torch.contiguous_format)
    return flat[index + base]  # index: (T, 3, H, W) into the (3 * 256,) table


def as_pixel_values(tiles: torch.Tensor) -> torch.Tensor:
    """Normalised float32 (T, 3, H, W) tiles from raw uint8 ones (or as they are, if already)."""
    return normalize_raw(tiles) if tiles.dtype == torch.uint8 else tiles


@lru_cache(maxsize=8)
def _table_on(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The table flattened to (3 * 256,) float32 and each channel's offset in it, (1, 3, 1, 1)
    int32, on ``device``: made once per device (a copy to the GPU at every call would wait for the
    GPU)."""
    flat = torch.from_numpy(_normalize_table().copy()).view(-1)
    base = torch.tensor([0, 256, 512], dtype=torch.int32).view(1, 3, 1, 1)
    return flat.to(device), base.to(device)


def pixel_values(
    image: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Normalized tiles of shape (tiles, 3, image_size, image_size), float32."""
    return normalize_tiles(tile_array(image, max_num, min_num, image_size, use_thumbnail))


def detail_to_max_num(detail: str | None, default: int = 12) -> int:
    """Max tiles for an OpenAI-style ``detail`` level: low 6, medium 12, high 24; otherwise
    ``default`` (the checkpoint's ``max_dynamic_patch``), as LMDeploy does for e.g. ``auto``."""
    return DETAIL_MAX_NUM.get(detail, default) if isinstance(detail, str) else default


def resolve_max_num(
    max_dynamic_patch: int | None = None, detail: str | None = None, default: int = 12
) -> int:
    """Per-image max tiles with LMDeploy's precedence: an int ``max_dynamic_patch`` wins, then
    ``detail``, then the checkpoint default."""
    if isinstance(max_dynamic_patch, int) and not isinstance(max_dynamic_patch, bool):
        return max_dynamic_patch
    return detail_to_max_num(detail, default)
