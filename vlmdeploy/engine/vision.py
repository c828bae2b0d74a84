"""Vision stage: encodes the images of newly scheduled sequences, many requests' tiles in one
encoder call.

Tiles of all sequences that need embeddings this step are concatenated and run through the encoder
in chunks of at most ``max_tiles``; the resulting (tiles, 256, H) rows are split back so that each
sequence gets one (num image tokens, H) tensor in prompt order. Embeddings stay with the sequence
through preemption, so a recomputed request never re-encodes its images.
"""

from __future__ import annotations

import torch

from vlmdeploy.engine.sequence import Sequence


class VisionStage:
    def __init__(self, encode, max_tiles: int):
        self.encode = encode  # (tiles, 3, 448, 448) → (tiles, 256, H)
        self.max_tiles = max_tiles

    def run(self, seqs: list[Sequence]) -> None:
        pending = [s for s in seqs if s.needs_vision]
        if not pending:
            return
        tiles = torch.cat([im.pixel_values for s in pending for im in s.images])
        chunks = [
            self.encode(tiles[i : i + self.max_tiles]) for i in range(0, len(tiles), self.max_tiles)
        ]
        embeds = torch.cat(chunks).flatten(0, 1)  # (all tiles * 256, H)
        start = 0
        for seq in pending:
            n = sum(im.num_tokens for im in seq.images)
            seq.image_embeds = embeds[start : start + n]
            start += n
