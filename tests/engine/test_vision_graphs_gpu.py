"""Device check: the vision encoder's CUDA graphs (one per small tile count, captured at start-up)
give the embeddings of the eager call, with InternViT-300M (the 1B's and the 8B's tower); eager mode
captures none."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.engine.graphs.vision import GRAPH_TILE_COUNTS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("eager", [False, True])
def test_graph_replays_equal_the_eager_encoder(ckpt_1b, eager):
    path = ckpt_1b("hf")
    cfg = PytorchEngineConfig(session_len=4096, max_batch_size=8, eager_mode=eager)
    with pipeline(str(path), backend_config=cfg) as pipe:
        runner = pipe.engine.core.runner
        if eager:
            assert runner.vision_graphs is None
            return
        assert sorted(runner.vision_graphs.graphs) == list(GRAPH_TILE_COUNTS)
        size = pipe.model_cfg.vision.image_size
        g = torch.Generator().manual_seed(0)
        for n in (*GRAPH_TILE_COUNTS, 3):
            tiles = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
            replayed = runner.encode_images(tiles)
            eager_out = runner.encode_raw(tiles.cuda())
            torch.testing.assert_close(replayed, eager_out, rtol=0, atol=0)
