"""The objects a pipeline builds at start-up are frozen out of the garbage collector while it
serves (a full collection would otherwise walk all of them while every thread waits), and handed
back to it when the pipeline closes."""

from __future__ import annotations

import gc

from vlmdeploy import PytorchEngineConfig, pipeline


def test_startup_heap_is_frozen_while_serving(tiny_ckpts):
    gc.unfreeze()
    pipe = pipeline(tiny_ckpts["hf"], backend_config=PytorchEngineConfig(session_len=1024))
    try:
        assert gc.get_freeze_count() > 10_000  # the model, tokenizer and kernels of pipeline()
        assert pipe("Hi").text is not None
        walked = len(gc.get_objects())  # what a full collection walks while serving
        assert walked < gc.get_freeze_count() / 3
    finally:
        pipe.close()
    assert gc.get_freeze_count() == 0
