"""Synthetic scenes: a few flat-coloured shapes on a light background, drawn with PIL.

A scene is a canvas size, a background tint and 1–4 objects. Each object sits in its own *slot*
(left, right, top, bottom, center), so "where is the <shape>" has exactly one answer and no two
objects overlap. Everything is drawn from a ``random.Random`` passed in, so a scene is a pure
function of its seed; ``render`` is a pure function of the scene.

The vocabulary is closed: ``SHAPES`` x ``COLOURS`` x ``SLOTS``. Changing any of these tuples
changes the task and invalidates the shipped model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow")
SLOTS = ("left", "right", "top", "bottom", "center")

# RGB fill of each colour name: far apart in hue so a tiny encoder separates them after bicubic
# resampling, and all of them far from the near-white background.
RGB = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}

# Slot centres as fractions of (width, height).
SLOT_CENTRES = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}

MIN_SIDE, MAX_SIDE = 200, 900
MAX_OBJECTS = 4
# Object radius as a fraction of the short side; with the slot spacing (0.3 of a side) and the
# jitter below, neighbouring objects never touch.
RADIUS_RANGE = (0.10, 0.13)
JITTER = 0.02


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    slot: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # pixels


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """Number of objects matching ``shape`` and ``colour`` (None matches any)."""
        return sum(
            (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
            for o in self.objects
        )

    def only(self, shape: str) -> SceneObject | None:
        """The single object of ``shape``, or None when there are zero or several."""
        found = [o for o in self.objects if o.shape == shape]
        return found[0] if len(found) == 1 else None


def sample_scene(
    rng: random.Random, n_objects: int | None = None, size: tuple[int, int] | None = None
) -> Scene:
    """Draw a scene; ``n_objects`` and ``size`` pin those choices (used for multi-image pairs)."""
    width, height = size or (rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE))
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    slots = rng.sample(SLOTS, n)
    short = min(width, height)
    objects = []
    for slot in sorted(slots, key=SLOTS.index):
        fx, fy = SLOT_CENTRES[slot]
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(COLOURS),
                slot=slot,
                cx=(fx + rng.uniform(-JITTER, JITTER)) * width,
                cy=(fy + rng.uniform(-JITTER, JITTER)) * height,
                radius=rng.uniform(*RADIUS_RANGE) * short,
            )
        )
    grey = rng.randint(232, 255)
    return Scene(width, height, (grey, grey, grey), tuple(objects))


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # Five outer points, first pointing up, alternating with inner points at 0.45 r.
    points = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, fill: int | tuple[int, ...]) -> None:
    cx, cy, r = o.cx, o.cy, o.radius
    if o.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif o.shape == "square":
        h = 0.85 * r  # similar visual area to the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif o.shape == "triangle":
        # Equilateral, apex up, centroid at the slot centre.
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2,
               -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
        draw.polygon(pts, fill=fill)
    elif o.shape == "star":
        draw.polygon(_star_points(cx, cy, 1.15 * r), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image of ``(scene.width, scene.height)``."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o, RGB[o.colour])
    return image


def render_labels(scene: Scene) -> Image.Image:
    """Object map of the scene ("L" mode): pixel value i + 1 where object i is drawn, 0 elsewhere.

    Same geometry as ``render``; training uses it for dense supervision of the image tokens.
    """
    image = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(image)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, i + 1)
    return image
