"""Read a synthetic scene back from its pixels alone, to check generated answers independently.

Objects are flat fills of four known colours (no antialiasing), never touching, so each object is a
connected component of one colour. Its shape follows from how much of its bounding box it fills
(square 1.0, circle pi/4, triangle 0.5, five-point star ~0.39) and its slot from its centroid.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLOUR_RGB = {"red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220),
              "yellow": (235, 200, 30)}
STEP = 2  # components are found on a half-resolution grid (8-connected): fast, objects stay whole


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    cx: float  # centroid as a fraction of width / height
    cy: float

    @property
    def slot(self) -> str:
        centres = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2),
                   "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
        return min(centres, key=lambda s: (centres[s][0] - self.cx) ** 2
                   + (centres[s][1] - self.cy) ** 2)


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        comp, queue = [], deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy + dy, cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                        and not seen[ny, nx]):
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def _shape(fill: float) -> str:
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    if fill > 0.45:
        return "triangle"
    return "star"


def parse(image: Image.Image) -> list[Blob]:
    """Every object in ``image``: its colour, shape and centroid."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)  # (H, W, 3)
    h, w, _ = rgb.shape
    blobs = []
    for name, ref in COLOUR_RGB.items():
        full = (np.abs(rgb - np.array(ref)).max(axis=-1) <= 2)  # (H, W) exact fill colour
        for comp in _components(full[::STEP, ::STEP]):
            ys = np.array([p[0] for p in comp]) * STEP
            xs = np.array([p[1] for p in comp]) * STEP
            y0, y1 = max(ys.min() - STEP, 0), min(ys.max() + STEP + 1, h)
            x0, x1 = max(xs.min() - STEP, 0), min(xs.max() + STEP + 1, w)
            box = full[y0:y1, x0:x1]
            yy, xx = np.nonzero(box)
            tight = box[yy.min():yy.max() + 1, xx.min():xx.max() + 1]
            blobs.append(Blob(name, _shape(tight.mean()), (x0 + xx.mean()) / w,
                              (y0 + yy.mean()) / h))
    return blobs
