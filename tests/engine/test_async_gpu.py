"""Device check of asynchronous scheduling: on CUDA (Triton kernels, CUDA-graph decode, pinned
non-blocking copies, events) the engine that launches each step before reading the last one gives
exactly the outputs of the synchronous engine. The engines are driven by hand with every request
added before the first step, so both see the same batches: greedy, logprobs, seeded sampling,
an image, and (alone, since it changes one batch) a stop id found a step late. (Penalised
sampling is left out: it reads each step's tokens before the next launch, which would make most
steps synchronous; the CPU tests cover it.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.config import ModelConfig
from vlmdeploy.engine import EngineConfig, LLMEngine
from vlmdeploy.engine.io import EngineRequest

pytestmark = pytest.mark.gpu


def _image(w: int, h: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def engine_outputs(path: str, image_token: int, reqs, async_scheduling: bool, device: str):
    """Every request's [(token, finish_reason, logprobs)] from an engine stepped by hand."""
    cfg = PytorchEngineConfig(session_len=4096, max_batch_size=16, device_type=device,
                              async_scheduling=async_scheduling,
                              num_gpu_blocks=0 if device == "cuda" else 256)
    model_cfg = ModelConfig.from_pretrained(path)
    engine = LLMEngine(EngineConfig.build(cfg, model_cfg, path, image_token))
    if device == "cuda":
        assert engine.runner.decode_graphs is not None
    outs: dict[int, list] = {i: [] for i in range(len(reqs))}
    for i, r in enumerate(reqs):
        engine.add(EngineRequest(i, list(r.token_ids), dataclasses.replace(r.sampling),
                                 images=list(r.images)))
    while engine.has_work():
        for o in engine.step():
            outs[o.seq_id].append((o.token_id, o.finish_reason, o.logprobs))
    engine.release()
    return outs


def compare(got: dict, want: dict) -> None:
    for i in want:
        assert [o[:2] for o in got[i]] == [o[:2] for o in want[i]], f"request {i}"
        for (*_, a), (*_, b) in zip(got[i], want[i]):
            assert (a is None) == (b is None)
            if b is not None:
                assert a.keys() == b.keys()
                assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


def prepared(path: str, device: str):
    cfg = PytorchEngineConfig(session_len=4096, device_type=device,
                              num_gpu_blocks=0 if device == "cuda" else 256)
    with pipeline(path, backend_config=cfg) as pipe:
        image_token = pipe.tokenizer.image_ids["img_context"]
        prompts = [
            ("Tell me about the sea.", GenerationConfig(max_new_tokens=24, logprobs=2)),
            (("describe this image", _image(800, 500, 3)), GenerationConfig(max_new_tokens=20)),
            ("Hi", GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.8,
                                    random_seed=3)),
            ("Count to ten.", GenerationConfig(max_new_tokens=20, do_sample=True, top_k=40,
                                               random_seed=4)),
            (("what is here?", _image(448, 448, 4)), GenerationConfig(max_new_tokens=1)),
        ]
        reqs = [pipe.prepare_sync(p, g) for p, g in prompts]
    return image_token, reqs


def check_async_matches_sync(path: str, device: str) -> None:
    image_token, reqs = prepared(path, device)
    want = engine_outputs(path, image_token, reqs, False, device)
    compare(engine_outputs(path, image_token, reqs, True, device), want)
    # a stop id found one step late: the request alone, stopping at the last token it produces
    # for the first time (the first token at worst). Its tokens alone are read again: in bf16 a
    # batch of one may not pick the batch of five's tokens.
    first = reqs[0]
    tokens = [t for t, *_ in engine_outputs(path, image_token, [first], False, device)[0]]
    at = max(i for i in range(len(tokens)) if tokens[i] not in tokens[:i])
    sampling = dataclasses.replace(first.sampling, stop_token_ids=frozenset({tokens[at]}))
    alone = [dataclasses.replace(first, sampling=sampling)]
    want = engine_outputs(path, image_token, alone, False, device)
    assert want[0][-1][1] == "stop" and len(want[0]) == at + 1
    compare(engine_outputs(path, image_token, alone, True, device), want)


def test_async_scheduling_matches_sync_on_the_gpu(ckpt_1b):
    check_async_matches_sync(ckpt_1b("original"), "cuda")
