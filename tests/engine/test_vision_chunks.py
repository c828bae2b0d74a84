"""The vision stage calls the encoder only with tile counts of a small fixed set, which the engine
warms at start-up, and splitting a batch that way gives the same embeddings as one call."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy.engine.io import ImageInput
from vlmdeploy.engine.sampling import SamplingParams
from vlmdeploy.engine.sequence import Sequence
from vlmdeploy.engine.vision import TILE_STEP, VisionStage, _one_batch, chunk_sizes, warm_counts
from vlmdeploy.vl.tiling import as_pixel_values


@pytest.mark.parametrize("max_tiles", [64, 12, 5, 8, 1])
def test_every_chunk_is_a_warmed_count_and_they_add_up(max_tiles):
    warm = set(warm_counts(max_tiles))
    assert max(warm) == max_tiles and min(warm) == 1
    assert len(warm) <= max_tiles // TILE_STEP + TILE_STEP
    for n in range(0, 3 * max_tiles + TILE_STEP + 2):
        sizes = chunk_sizes(n, max_tiles)
        assert sum(sizes) == n
        assert set(sizes) <= warm, (n, sizes)
        assert sum(1 for s in sizes if s != max_tiles) <= 2  # at most two partial calls


def _fake_encoder(calls: list[int]):
    """(tiles, H, W, 3) uint8 → (tiles, 2, 3): each tile's own values, so any mix-up shows."""

    def encode(tiles: torch.Tensor) -> torch.Tensor:
        calls.append(len(tiles))
        x = tiles.float().flatten(1)
        return torch.stack([x[:, :3], x[:, 3:6]], dim=1)

    return encode


def _seq(seq_id: int, n_tiles: int, gen: torch.Generator) -> Sequence:
    tiles = torch.randint(0, 256, (n_tiles, 4, 4, 3), dtype=torch.uint8, generator=gen)
    image = ImageInput(offset=0, num_tokens=2 * n_tiles, pixel_values=tiles,
                       content_hash=f"image-{seq_id}")
    return Sequence(seq_id, [0] * (2 * n_tiles), SamplingParams(), images=[image])


def test_a_batch_is_encoded_in_warmed_counts_with_the_same_rows():
    gen = torch.Generator().manual_seed(0)
    calls: list[int] = []
    stage = VisionStage(_fake_encoder(calls), max_tiles=16)
    seqs = [_seq(i, n, gen) for i, n in enumerate([10, 7, 13, 1, 9, 5])]  # 45 tiles
    stage.attach_embeddings(seqs)
    assert calls == [16, 16, 8, 5]
    assert set(calls) <= set(warm_counts(16))
    for seq in seqs:
        tiles = seq.images[0].pixel_values
        assert torch.equal(seq.image_embeds, _fake_encoder([])(tiles).flatten(0, 1))


def test_warm_up_calls_every_count_once_on_host_tiles():
    calls: list[int] = []
    seen: list[tuple] = []

    def encode(tiles):
        seen.append((tiles.dtype, tiles.device.type, tuple(tiles.shape[1:])))
        return _fake_encoder(calls)(tiles)

    VisionStage(encode, max_tiles=64).warm_up((4, 4, 3))
    assert calls == warm_counts(64)
    assert set(seen) == {(torch.uint8, "cpu", (4, 4, 3))}


def test_raw_tiles_are_gathered_unchanged_and_mixed_batches_normalised():
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randint(0, 256, (n, 4, 4, 3), dtype=torch.uint8, generator=gen) for n in (3, 1)]
    strided = torch.randint(0, 256, (2, 4, 3, 4), dtype=torch.uint8, generator=gen).transpose(2, 3)
    out = _one_batch([*parts, strided])
    assert out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, torch.cat([*parts, strided]))
    off_host = _one_batch([torch.empty(2, 4, 4, 3, dtype=torch.uint8, device="meta")] * 2)
    assert off_host.device.type == "meta" and off_host.shape == (4, 4, 4, 3)
    normed = torch.rand(1, 3, 4, 4, generator=gen)  # an image that came normalised already
    mixed = _one_batch([parts[0], normed])
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, torch.cat([as_pixel_values(parts[0]), normed]))


@pytest.mark.gpu
def test_pinned_gather_hands_the_encoder_page_locked_tiles():
    calls: list[int] = []
    pinned: list[bool] = []

    def encode(tiles):
        pinned.append(tiles.is_pinned())
        return _fake_encoder(calls)(tiles)

    gen = torch.Generator().manual_seed(2)
    seqs = [_seq(i, n, gen) for i, n in enumerate([3, 5])]
    VisionStage(encode, max_tiles=16, pin_memory=True).attach_embeddings(seqs)
    assert calls == [8] and pinned == [True]
    for seq in seqs:
        want = _fake_encoder([])(seq.images[0].pixels()).flatten(0, 1)
        assert torch.equal(seq.image_embeds, want)
