"""Small vision-encoder calls go through static per-count buffers (CUDA graphs on the GPU; run
eagerly here): the embeddings are those of the plain eager call, every count keeps its own buffer,
and a result stays valid after later calls reuse the buffers."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.engine.graphs.vision import GRAPH_TILE_COUNTS, VisionGraphs


@pytest.fixture(scope="module")
def runner(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as pipe:
        yield pipe.engine.core.runner


def _tiles(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_static_buffers_give_the_eager_embeddings(runner):
    size = runner.cfg.model.vision.image_size
    graphs = VisionGraphs(runner.encode_raw, (size, size, 3), runner.device, capture=False)
    assert sorted(graphs.inputs) == list(GRAPH_TILE_COUNTS)
    kept = []
    for n in (1, 3, 7, 3):
        tiles = _tiles(n, size, seed=n + len(kept))
        out = graphs.replay(tiles)
        assert torch.equal(out, runner.encode_raw(tiles))
        kept.append((tiles, out))
    for tiles, out in kept:  # earlier results are not overwritten by later calls
        assert torch.equal(out, runner.encode_raw(tiles))
    assert graphs.replay(_tiles(max(GRAPH_TILE_COUNTS) + 1, size, seed=0)) is None


def test_the_runner_uses_them_for_raw_tiles_only(runner, monkeypatch):
    size = runner.cfg.model.vision.image_size
    graphs = VisionGraphs(runner.encode_raw, (size, size, 3), runner.device, capture=False)
    calls = []
    real = graphs.replay
    monkeypatch.setattr(graphs, "replay", lambda t: calls.append(len(t)) or real(t))
    monkeypatch.setattr(runner, "vision_graphs", graphs)
    tiles = _tiles(2, size, seed=5)
    assert torch.equal(runner.encode_images(tiles), runner.encode_raw(tiles))
    big = _tiles(max(GRAPH_TILE_COUNTS) + 1, size, seed=6)
    assert torch.equal(runner.encode_images(big), runner.encode_raw(big))
    assert calls == [2, len(big)]
