"""A request's state inside the engine: its tokens, its images, its KV blocks and how far prefill
has got."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from vlmdeploy.engine.io import ImageInput
from vlmdeploy.engine.sampling import SamplingParams

PENDING = -1  # a sampled token still on its way from the device (see LLMEngine.step)


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class Sequence:
    """Engine-side request. ``num_computed`` tokens already have KV in ``block_table``; the next
    step computes the following chunk of the prompt (prefill) or the last sampled token (decode)."""

    seq_id: int
    token_ids: list[int]
    sampling: SamplingParams
    images: list[ImageInput] = field(default_factory=list)
    status: Status = Status.WAITING
    num_prompt_tokens: int = 0
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    image_embeds: torch.Tensor | None = None  # (num image tokens, H), filled by the vision stage
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of full blocks
    num_committed: int = 0  # full blocks already registered in the prefix cache
    arrival: int = 0
    # Sampled tokens whose values the host has not read yet (``PENDING`` at the end of
    # ``token_ids``); the newest is row ``pending_row`` of the step in flight's token tensor.
    num_pending: int = 0
    pending_row: int = -1

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known(self) -> int:
        """Tokens whose values the host knows."""
        return len(self.token_ids) - self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def needs_vision(self) -> bool:
        """Embeddings are missing and some image token still needs computing (a prefix-cache hit
        may already cover every image)."""
        return self.image_embeds is None and any(
            im.offset + im.num_tokens > self.num_computed for im in self.images
        )

    def release_image_embeds(self) -> None:
        """Drop the embeddings once every image token has KV (they are re-made, from the
        embedding cache or the tiles, if a preemption sends the sequence back)."""
        if self.image_embeds is not None and all(
            im.offset + im.num_tokens <= self.num_computed for im in self.images
        ):
            self.image_embeds = None

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size
