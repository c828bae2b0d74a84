"""`ChatTemplateConfig` and `TurbomindEngineConfig`, importable from `vlmdeploy` as from `lmdeploy`
and behaving as there: templates from pieces, the checkpoint's template for `hf`, TurboMind
settings run on vlmdeploy's engine."""

from __future__ import annotations

import json

import pytest

from vlmdeploy import (
    ChatTemplateConfig,
    GenerationConfig,
    PytorchEngineConfig,
    TurbomindEngineConfig,
)
from vlmdeploy.frontend.chat_template import ChatTemplate

PIECES = dict(system="<S>", meta_instruction="Be brief.", eosys="</S>\n", user="<U>", eoh="</U>\n",
              assistant="<A>", eoa="</A>", separator="\n")


def render(config: ChatTemplateConfig, messages) -> str:
    source, variables = config.jinja()
    return ChatTemplate(source, variables=variables).render(messages)


def test_a_template_from_pieces_concatenates_as_lmdeploys_base_template():
    config = ChatTemplateConfig(model_name="base", **PIECES)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "again"}]
    assert render(config, turns) == ("<S>Be brief.</S>\n<U>hi</U>\n<A>yo</A>\n<U>again</U>\n<A>")
    with_system = [{"role": "system", "content": "Mine."}, turns[0]]
    assert render(config, with_system) == "<S>Mine.</S>\n<U>hi</U>\n<A>"
    # a last assistant message is the start of the answer: no end piece
    assert render(config, turns[:2]) == "<S>Be brief.</S>\n<U>hi</U>\n<A>yo"


def test_hf_and_internvl_names_use_the_checkpoint_template():
    for name in ("hf", "internvl2_5", "internvl3", "qwen3"):
        assert ChatTemplateConfig(model_name=name).jinja() is None
    with pytest.raises(NotImplementedError, match="another model family"):
        ChatTemplateConfig(model_name="llama2").jinja()
    with pytest.raises(ValueError, match="unknown chat template"):
        ChatTemplateConfig(model_name="no-such-template").jinja()
    with pytest.raises(NotImplementedError, match="capability"):
        ChatTemplateConfig(model_name="hf", capability="completion").jinja()


def test_json_round_trip_and_files(tmp_path):
    config = ChatTemplateConfig(model_name="mine", stop_words=["</A>"], **PIECES)
    path = tmp_path / "t.json"
    config.to_json(str(path))
    assert ChatTemplateConfig.from_json(str(path)) == config
    assert ChatTemplateConfig.from_json(json.dumps({"user": "U"})).user == "U"  # a string
    with pytest.raises(ValueError, match="unknown chat template fields"):
        ChatTemplateConfig.from_json('{"usr": "U"}')


def test_turbomind_config_runs_on_the_pytorch_engine():
    config = TurbomindEngineConfig(session_len=8192, cache_block_seq_len=32, max_batch_size=16,
                                   enable_prefix_caching=True, async_=0, communicator="native")
    ours = config.to_pytorch()
    assert isinstance(ours, PytorchEngineConfig)
    assert (ours.session_len, ours.block_size, ours.max_batch_size) == (8192, 32, 16)
    assert ours.enable_prefix_caching
    assert TurbomindEngineConfig(model_format="hf").to_pytorch().model_format is None
    with pytest.raises(NotImplementedError, match="rope_scaling_factor"):
        TurbomindEngineConfig(rope_scaling_factor=2.0).to_pytorch()
    assert TurbomindEngineConfig(quant_policy=8).to_pytorch().quant_policy == 8  # int8 KV


@pytest.fixture(scope="module")
def embedded_pipe():
    from vlmdeploy import pipeline

    template = ChatTemplateConfig(model_name="mine", system="<|im_start|>system\n",
                                  eosys="<|im_end|>\n", user="<|im_start|>user\n",
                                  eoh="<|im_end|>\n", assistant="<|im_start|>assistant\n",
                                  eoa="<|im_end|>", separator="\n", stop_words=["zzz"])
    pipe = pipeline(None, backend_config=TurbomindEngineConfig(session_len=1024),
                    chat_template_config=template)
    yield pipe
    pipe.close()


def test_a_pipeline_takes_both(embedded_pipe):
    assert embedded_pipe.session_len == 1024
    req = embedded_pipe.prepare_sync("hi", GenerationConfig(max_new_tokens=2))
    assert req.prompt == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert req.gen_config.stop_words == ["zzz"]  # the template's stop words join the request's
    response = embedded_pipe("hi", gen_config=GenerationConfig(max_new_tokens=2))
    assert response.generate_token_len <= 2
