"""What the engine refuses at admission, before a request can touch a step.

The front end checks the same limits earlier and answers with a clear error; these checks stay as
the engine's own line of defence, since one malformed request in a step would fail every request
in it.
"""

from __future__ import annotations

import math

from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.engine.io import ImageInput


def check_fits(
    cfg: EngineConfig, num_blocks: int, num_prompt_tokens: int, max_new_tokens: int
) -> str | None:
    """Why a request of this size can never run (None if it can)."""
    if num_prompt_tokens >= cfg.session_len:
        return (
            f"the prompt has {num_prompt_tokens} tokens (image tokens included), which does "
            f"not fit session_len={cfg.session_len}"
        )
    total = min(num_prompt_tokens + max_new_tokens, cfg.session_len)
    if math.ceil(total / cfg.block_size) > num_blocks:
        return (
            f"the request needs {total} tokens of KV cache but the cache holds only "
            f"{num_blocks * cfg.block_size}"
        )
    return None


def check_images(cfg: EngineConfig, token_ids: list[int], images: list[ImageInput]) -> str | None:
    """The prompt's image-context tokens must be exactly its images' blocks."""
    ctx, per_tile = cfg.image_token_id, cfg.model.tokens_per_tile
    offsets = [im.offset for im in images]
    if offsets != sorted(offsets) or any(
        im.num_tokens % per_tile
        or (im.pixel_values is None and im.deferred is None)
        or (im.pixel_values is not None and len(im.pixel_values) * per_tile != im.num_tokens)
        or not im.content_hash
        for im in images
    ):
        return "the request's images are inconsistent with its tokens"
    for im in images:
        block = token_ids[im.offset : im.offset + im.num_tokens]
        if block.count(ctx) != im.num_tokens:  # list.count: C speed on the engine thread
            return "image tokens do not match the request's images"
    if token_ids.count(ctx) != sum(im.num_tokens for im in images):
        return "image tokens do not match the request's images"
    return None
