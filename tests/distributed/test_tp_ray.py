"""The Ray backend on a local Ray cluster of CPUs: tp=2 gives exactly the tokens of the
multiprocess backend and of one rank, and closing leaves no actor behind."""

from __future__ import annotations

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

ray = pytest.importorskip("ray")  # in the dev extra: CI runs this test

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _answers(path: str, images, **engine) -> list[list[int]]:
    cfg = PytorchEngineConfig(device_type="cpu", session_len=1024, **engine)
    gen = GenerationConfig(max_new_tokens=16, do_sample=False, ignore_eos=True)
    prompts = ["Count from one to ten.", ("What is in the picture?", images[1])]
    with pipeline(path, backend_config=cfg, log_level="WARNING") as pipe:
        return [o.token_ids for o in pipe(prompts, gen_config=gen)]


def test_ray_backend_gives_the_tokens_of_the_multiprocess_backend(local_ray, tiny_ckpts, images):
    path = tiny_ckpts["hf"]
    one = _answers(path, images)
    assert _answers(path, images, tp=2, distributed_executor_backend="ray") == one
    assert _answers(path, images, tp=2, distributed_executor_backend="mp") == one
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not alive
    assert all(r["state"] == "REMOVED" for r in ray.util.placement_group_table().values())
