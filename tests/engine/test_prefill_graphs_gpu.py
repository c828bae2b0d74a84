"""Device check: single-sequence prefill steps replayed from CUDA graphs (one per token-count
bucket, captured at start-up) give the logits of the eager forward, with image rows and after a
cached prefix, with the 1B's language model; eager mode captures none."""

from __future__ import annotations

import math

import pytest
import torch

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.engine.graphs.prefill import PREFILL_BUCKETS
from vlmdeploy.engine.step_inputs import StepInputs

pytestmark = pytest.mark.gpu


def one_seq(runner, ids, start, table, image=None, mask=None) -> StepInputs:
    n, bs = len(ids), runner.block_size
    pos = list(range(start, start + n))
    slots = [table[p // bs] * bs + p % bs for p in pos]
    return StepInputs(ids, pos, slots, [0, n], [start + n], [table], [image], [mask], None, [0])


def eager_logits(runner, inputs: StepInputs):
    return runner.model.compute_logits(runner.forward_eager(inputs)[-1:])


@pytest.mark.parametrize("eager", [False, True])
def test_graph_replays_equal_the_eager_forward(ckpt_1b, eager):
    path = ckpt_1b("hf")
    cfg = PytorchEngineConfig(session_len=4096, max_batch_size=8, eager_mode=eager)
    with pipeline(str(path), backend_config=cfg) as pipe:
        runner = pipe.engine.core.runner
        graphs = runner.prefill_graphs
        if eager:
            assert graphs is None
            return
        assert sorted(graphs.graphs) == list(PREFILL_BUCKETS)
        g = torch.Generator().manual_seed(0)
        h = pipe.model_cfg.text.hidden_size
        table = list(range(math.ceil(1600 / runner.block_size)))
        image = (torch.randn(256, h, generator=g) * 0.05).to("cuda", torch.bfloat16)
        mask = torch.zeros(302, dtype=torch.bool)
        mask[20:276] = True
        start = 0
        # W1's shape with one tile; then continuations over the cached context, one past a bucket
        steps = ((302, image, mask), (168, None, None), (17, None, None), (1024, None, None))
        for n, im, m in steps:
            ids = torch.randint(0, 1000, (n,), generator=g).tolist()
            inputs = one_seq(runner, ids, start, table, im, m)
            ref = eager_logits(runner, inputs)
            got = graphs.replay(inputs).float()
            ref = ref.float()
            # bf16 GEMMs of the padded row count may pick other kernels: close, not bitwise
            err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
            assert err <= 0.03 * scale, (n, err, scale)
            top2 = ref.topk(2).values.flatten()
            if (top2[0] - top2[1]).item() > 2 * err:  # the greedy token, unless a near tie
                assert got.argmax().item() == ref.argmax().item(), (n, err, top2.tolist())
            start += n
