"""Bad input raises a clear exception naming the problem, and the engine keeps serving other
requests."""

from __future__ import annotations

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.errors import ContextLengthExceeded, ImageError, InvalidRequestError

GEN = GenerationConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=600)) as p:
        yield p


def still_serves(pipe) -> None:
    assert pipe("hello", gen_config=GEN).generate_token_len == 4


@pytest.mark.parametrize("prompt", [42, None, {"role": "user"}, [], [1, 2], ("text", "a", "b")])
def test_unknown_prompt_form(pipe, prompt):
    with pytest.raises(InvalidRequestError, match="prompt"):
        pipe(prompt, gen_config=GEN)
    still_serves(pipe)


def test_undecodable_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ImageError) as info:
        pipe(("describe", str(bad)), gen_config=GEN)
    assert info.value.code in ("invalid_image_format", "unsupported_image_type")
    still_serves(pipe)


def test_prompt_longer_than_session_len(pipe, images):
    with pytest.raises(ContextLengthExceeded, match="session_len=600"):
        pipe(("describe", images[1]), gen_config=GEN)  # 3 tiles = 768 image tokens
    with pytest.raises(ContextLengthExceeded):
        pipe("word " * 700, gen_config=GEN)
    still_serves(pipe)


def test_one_bad_prompt_in_a_batch_fails_the_call_and_frees_its_work(pipe):
    import time

    with pytest.raises(InvalidRequestError):
        pipe(["fine", 3.5, "also fine"], gen_config=GenerationConfig(max_new_tokens=200))
    deadline = time.monotonic() + 5
    while pipe.stats()["num_running"] or pipe.stats()["num_waiting"]:
        assert time.monotonic() < deadline, "the batch's other requests were not aborted"
        time.sleep(0.01)
    assert pipe.engine.core.blocks.num_free == pipe.engine.core.num_blocks
    still_serves(pipe)


def test_unknown_config_fields_are_named():
    with pytest.raises(TypeError, match="no_such_field"):
        PytorchEngineConfig(no_such_field=1)
    with pytest.raises(TypeError, match="no_such_field"):
        GenerationConfig(no_such_field=1)
    with pytest.raises(NotImplementedError, match="dp"):
        PytorchEngineConfig(dp=2)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)


def test_unknown_pipeline_argument(pipe, tiny_ckpts):
    with pytest.raises(TypeError, match="bogus"):
        pipe("hi", gen_config=GEN, bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        pipeline(tiny_ckpts["original"], bogus=True)


def test_unsupported_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}'
    )
    with pytest.raises(ValueError, match="supports InternVL3.5"):
        pipeline(str(tmp_path))


def test_a_failing_forward_fails_fast_and_loudly(tiny_ckpts):
    """A forward that always raises: each request touched ends with an error, and after
    MAX_FAILED_STEPS failed steps in a row the engine reports itself dead."""
    from vlmdeploy.engine.llm_engine import MAX_FAILED_STEPS
    from vlmdeploy.errors import EngineDeadError

    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=600)) as p:

        def broken(*args, **kwargs):
            raise RuntimeError("injected fault")

        p.engine.core.runner.forward = broken
        out = p("a", gen_config=GEN)
        assert out.finish_reason == "error" and "failed (RuntimeError)" in out.error_message
        with pytest.raises(EngineDeadError):
            for _ in range(MAX_FAILED_STEPS):
                p(["b", "c"], gen_config=GEN)
        with pytest.raises(EngineDeadError):
            p.stats()


def test_dummy_load_format_needs_no_weights(tmp_path):
    from vlmdeploy.testing.checkpoint import make_checkpoint

    path = make_checkpoint(tmp_path / "noweights", "tiny", "original", weights=False)
    with pytest.raises(ValueError, match="safetensors"):
        pipeline(str(path), PytorchEngineConfig(session_len=600))
    with pipeline(str(path), PytorchEngineConfig(session_len=600, load_format="dummy")) as p:
        out = p("hello", gen_config=GEN)
        again = p("hello", gen_config=GEN)
    assert out.generate_token_len == 4 and out.token_ids == again.token_ids


def test_memory_profiling_step_runs(pipe):
    # On a GPU this step's peak sizes the KV cache; here it must simply run on the real model.
    from vlmdeploy.engine.memory import bind_kv_cache, run_largest_step

    engine = pipe.engine.core
    kv_bytes = run_largest_step(engine.runner.model, engine.cfg)
    assert kv_bytes > 0
    bind_kv_cache(engine.runner.model, engine.runner.kv_cache)  # the engine's own cache back
    still_serves(pipe)


def test_hub_ids_and_unsupported_vision_config_are_clear_errors(tiny_ckpts, monkeypatch,
                                                                tmp_path):
    from huggingface_hub import constants

    from vlmdeploy import VisionConfig

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # ids resolve: tests/test_hub.py
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        pipeline("OpenGVLab/InternVL3_5-8B", PytorchEngineConfig(download_dir=str(tmp_path)))
    with pytest.raises(NotImplementedError, match="vision_config"):
        pipeline(tiny_ckpts["original"], vision_config=VisionConfig(max_batch_size=8))


def test_request_ids_never_collide(tiny_ckpts):
    from vlmdeploy.engine.io import EngineRequest

    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=600)) as p:
        ids = {p.new_session_id() for _ in range(100)} | {p.session().session_id}
        assert len(ids) == 101
        p.engine.close()  # drive the engine directly
        req = p.prepare_sync("hi", GEN)
        p.engine.core.add(EngineRequest(7, req.token_ids, req.sampling))
        with pytest.raises(ValueError, match="already in use"):
            p.engine.core.add(EngineRequest(7, req.token_ids, req.sampling))


def test_image_token_mismatch_fails_only_that_request(pipe, images):
    from vlmdeploy.engine.io import EngineRequest

    req = pipe.prepare_sync(("describe", images[0]), GEN)
    ctx = pipe.tokenizer.image_ids["img_context"]
    bad = EngineRequest(pipe.new_session_id(), req.token_ids + [ctx], req.sampling, req.images)
    outputs = []
    pipe.engine.add(bad, outputs.append)
    assert pipe("hello", gen_config=GEN).generate_token_len == 4  # served after the refusal
    assert outputs and outputs[-1].finish_reason == "error"
