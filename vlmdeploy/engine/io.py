"""The engine's boundary: what a front end hands in (:class:`EngineRequest`) and gets back
(:class:`StepOutput`).

Everything here is plain data that pickles: token ids, sampling parameters, image tiles or a
description of how to make them, content hashes. No closures, no references to the engine's caches,
so the engine can sit behind a process boundary without a change to the front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from vlmdeploy.engine.sampling import SamplingParams


class TileSource(Protocol):
    """A picklable description of an image's tiles, made only when the engine needs them."""

    def make_tiles(self) -> torch.Tensor:
        """uint8 (tiles, 448, 448, 3)."""


@dataclass
class ImageInput:
    """One image of a prompt: its tiles and where its context tokens start in the prompt. An image
    whose embedding the engine was expected to hold when the request was prepared carries no tiles,
    only ``deferred``, to make them should the engine's cache have dropped it by then."""

    # uint8 (tiles, 448, 448, 3) as tiled, normalised when encoded; or float32 (tiles, 3, 448, 448)
    # already normalised; or None until ``deferred`` makes them
    pixel_values: torch.Tensor | None
    offset: int  # index of the first <IMG_CONTEXT> token of this image in the prompt
    num_tokens: int  # 256 * tiles
    content_hash: str = ""  # pixels, size and tiling parameters: the embedding cache's key
    deferred: TileSource | None = None

    def pixels(self) -> torch.Tensor:
        """The tiles, made now if they were deferred."""
        if self.pixel_values is None:
            if self.deferred is None:
                raise ValueError("an image has neither tiles nor a way to make them")
            self.pixel_values, self.deferred = self.deferred.make_tiles(), None
        return self.pixel_values


@dataclass
class EngineRequest:
    """A validated, tokenised request: prompt ids with each image's context tokens in place."""

    request_id: int
    token_ids: list[int]
    sampling: SamplingParams
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class StepOutput:
    """What a step tells about one request: its new token, or how it ended."""

    seq_id: int
    token_id: int | None  # None when the request ended without a new token (abort, error)
    logprobs: dict[int, float] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None = None  # why the request ended with finish_reason "error"
