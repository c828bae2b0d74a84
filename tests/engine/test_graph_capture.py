"""The capture loop shared by the decode, prefill and vision graphs, run on the CPU with
torch.cuda's graph calls replaced by recorders: the order of preparation, warm-up and capture, and
what each runner captures. Replays are checked by the GPU tests."""

from __future__ import annotations

import contextlib

import torch

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.engine.graphs.capture import capture_graphs
from vlmdeploy.engine.graphs.decode import DecodeGraphs
from vlmdeploy.engine.graphs.prefill import PrefillGraphs
from vlmdeploy.engine.graphs.vision import VisionGraphs

CFG = PytorchEngineConfig(session_len=1024, block_size=16, max_batch_size=4)


class _RecordedGraph:
    def replay(self):
        raise AssertionError("these tests capture only")


def fake_capture(monkeypatch) -> list:
    """torch.cuda's graph calls replaced by ones that record what the capture loop does."""
    events: list = []

    @contextlib.contextmanager
    def graph(g, pool=None):
        events.append(("capture", pool))
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    return events


def test_each_size_is_prepared_warmed_then_captured_largest_first(monkeypatch):
    events = fake_capture(monkeypatch)

    def forward(n):
        events.append(("forward", n))
        return torch.full((1,), n)

    graphs, outputs = capture_graphs([2, 8], forward, lambda n: events.append(("prepare", n)))
    one = [("prepare", 8), ("forward", 8), ("capture", "pool"), ("forward", 8)]
    assert events == one + [("prepare", 2), ("forward", 2), ("capture", "pool"), ("forward", 2)]
    assert sorted(graphs) == [2, 8] and {k: int(v) for k, v in outputs.items()} == {2: 2, 8: 8}


def test_prefill_capture_gives_each_bucket_its_own_count(tiny_ckpts, monkeypatch):
    # a bucket warmed up with a larger bucket's count would read and write past its rows
    with pipeline(tiny_ckpts["original"], CFG) as pipe:
        fake_capture(monkeypatch)
        seen = []
        forward = PrefillGraphs._forward

        def spy(self, size):
            seen.append((size, self.cu_seqlens.tolist(), self.kv_lens.tolist()))
            return forward(self, size)

        monkeypatch.setattr(PrefillGraphs, "_forward", spy)
        runner = pipe.engine.core.runner
        PrefillGraphs(runner.model, pipe.model_cfg.text.hidden_size, pipe.engine.core.cfg.dtype, 64,
                      runner.scratch_block, 16, runner.device, buckets=(16, 48), capture=True)
    assert seen == [(48, [0, 48], [48])] * 2 + [(16, [0, 16], [16])] * 2


def test_decode_and_vision_graphs_capture_every_size(tiny_ckpts, monkeypatch):
    with pipeline(tiny_ckpts["original"], CFG) as pipe:
        events = fake_capture(monkeypatch)
        runner = pipe.engine.core.runner
        decode = DecodeGraphs(runner.model, 4, 64, runner.scratch_block, 16, 1024, runner.device)
        size = pipe.model_cfg.vision.image_size
        vision = VisionGraphs(runner.encode_raw, (size, size, 3), runner.device, counts=(1, 2))
    assert sorted(decode.graphs) == [1, 2, 4] and decode.outputs[4].shape[0] == 4
    assert sorted(vision.graphs) == [1, 2] and vision.outputs[2].shape[0] == 2
    assert events.count(("capture", "pool")) == 5
