"""YaRN RoPE as GPT-OSS configures it, against transformers' rope init and GPT-OSS's rotary
embedding (the oracle), with and without truncated bounds."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

from vlmdeploy.config import ModelConfig, YarnScaling
from vlmdeploy.layers.rotary import YarnRotary, yarn_inv_freq


def gpt_oss_rope(truncate: bool | None, factor: float = 32.0) -> dict:
    rope = {"rope_type": "yarn", "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
    if truncate is not None:
        rope["truncate"] = truncate
    return rope


@pytest.mark.parametrize("truncate", [False, True, None])
@pytest.mark.parametrize("head_dim", [64, 16])
def test_yarn_matches_transformers(truncate, head_dim):
    rope = gpt_oss_rope(truncate)
    cfg = GptOssConfig(head_dim=head_dim, num_hidden_layers=2, rope_parameters=dict(rope))
    theirs = GptOssRotaryEmbedding(cfg)
    yarn = YarnScaling(factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0,
                       beta_slow=1.0, truncate=True if truncate is None else truncate)
    inv_freq, scale = yarn_inv_freq(head_dim, 150000.0, yarn)
    assert torch.equal(inv_freq, theirs.inv_freq)
    assert scale == theirs.attention_scaling
    positions = torch.tensor([0, 1, 7, 127, 128, 4095, 4096, 30000, 131071])
    cos, sin = YarnRotary(head_dim, 150000.0, yarn)(positions, torch.float32)
    ref_cos, ref_sin = theirs(torch.empty(1, dtype=torch.float32), positions[None])
    half = head_dim // 2  # GPT-OSS rotates halves with (T, D / 2) tables: ours repeat them
    assert torch.equal(cos[:, :half], ref_cos[0]) and torch.equal(cos[:, half:], ref_cos[0])
    assert torch.equal(sin[:, :half], ref_sin[0]) and torch.equal(sin[:, half:], ref_sin[0])


def test_config_reads_yarn_in_both_spellings():
    base = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
            "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 100}
    v4 = {**base, "rope_theta": 150000.0, "rope_scaling": gpt_oss_rope(False)}
    v5 = {**base, "rope_parameters": gpt_oss_rope(False)}
    vision = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 128}
    texts = [ModelConfig.from_dict({"llm_config": llm, "vision_config": vision}).text
             for llm in (v4, v5)]
    assert texts[0] == texts[1]
    t = texts[0]
    assert t.is_gpt_oss and t.rope_theta == 150000.0 and t.rope_scaling.factor == 32.0
    assert t.rope_scaling.truncate is False
    assert t.layer_types == ("sliding_attention", "full_attention")
    assert [t.layer_window(i) for i in range(2)] == [128, None]
    assert (t.num_experts, t.num_experts_per_tok, t.attention_bias) == (128, 4, True)
