"""The plain model files and the model rewired by ``apply_fast_paths`` compute the same function
(fp32, CPU): vision embeddings for both tower styles, and logits of steps on the general path
(more than ``ROW_PATH_TOKENS`` tokens) and on the row path (a few tokens, one row). The transform
leaves the parameters and their names alone, and applying it twice changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.layers.attention import AttentionMetadata, attention_context, attention_layers
from vlmdeploy.models import fast_paths
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import load_weights

BLOCK, BLOCKS_PER_SEQ = 16, 4
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: the two differ only in rounding order


@pytest.fixture(scope="module", params=["original", "6b-original"])
def models(request, tiny_ckpts) -> tuple[InternVLForCausalLM, InternVLForCausalLM]:
    path = tiny_ckpts[request.param]
    plain = InternVLForCausalLM(ModelConfig.from_pretrained(path))
    load_weights(plain, path)
    plain.eval()
    return plain, fast_paths.apply_fast_paths(copy.deepcopy(plain))


class Cache:
    """A KV cache for one model; sequence s owns blocks s*BLOCKS_PER_SEQ onwards."""

    def __init__(self, model: InternVLForCausalLM, num_seqs: int):
        t = model.cfg.text
        blocks = num_seqs * BLOCKS_PER_SEQ
        self.kv = torch.zeros(2, t.num_layers, blocks, BLOCK, t.num_kv_heads, t.head_dim)
        for i, layer in enumerate(attention_layers(model)):
            layer.k_cache, layer.v_cache = self.kv[0, i], self.kv[1, i]


@torch.inference_mode()
def step(model: InternVLForCausalLM, batch: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``batch``: (sequence, first new position, new token ids) each → logits of each sequence's
    last new token (len(batch), V)."""
    ids = torch.cat([t for _, _, t in batch])
    positions = torch.cat([torch.arange(start, start + len(t)) for _, start, t in batch])
    slots, tables, cu, kv_lens = [], [], [0], []
    for seq, start, tokens in batch:
        first = seq * BLOCKS_PER_SEQ
        new = range(start, start + len(tokens))
        slots += [(first + p // BLOCK) * BLOCK + p % BLOCK for p in new]
        tables.append(list(range(first, first + BLOCKS_PER_SEQ)))
        cu.append(cu[-1] + len(tokens))
        kv_lens.append(start + len(tokens))
    lens = [len(t) for _, _, t in batch]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_q_len=max(lens),
        max_kv_len=max(kv_lens),
        num_decode=next((i for i, n in enumerate(lens) if n != 1), len(lens)),
    )
    with attention_context(meta):
        hidden = model(model.embed(ids, None, None), positions)  # (T, H)
    last = torch.tensor(cu[1:]) - 1
    return model.compute_logits(hidden[last])


def test_transform_keeps_parameters_and_is_idempotent(models):
    plain, fast = models
    assert type(fast.language_model.model) is fast_paths.RowPathQwen3Model
    assert type(fast.vision_model.encoder) is fast_paths.FusedNormVisionEncoder
    assert type(plain.language_model.model) is not fast_paths.RowPathQwen3Model
    a, b = plain.state_dict(), fast.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fast_paths.apply_fast_paths(fast) is fast
    assert type(fast.language_model) is fast_paths.RowPathQwen3ForCausalLM


@torch.inference_mode()
def test_vision_chain_equals_plain_layers(models):
    plain, fast = models
    g = torch.Generator().manual_seed(0)
    size = plain.cfg.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    torch.testing.assert_close(fast.encode_images(pixels), plain.encode_images(pixels), **TOL)


def test_row_path_and_general_path_equal_plain_model(models, monkeypatch):
    plain, fast = models
    rows, real = [], fast_paths.forward_row

    def spy(layer, h, cos, sin):
        rows.append(h.shape[0])
        return real(layer, h, cos, sin)

    monkeypatch.setattr(fast_paths, "forward_row", spy)
    vocab = plain.cfg.text.vocab_size
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(vocab, (21,), generator=g), torch.randint(vocab, (7,), generator=g)
    steps = [
        [(0, 0, a[:20])],  # 20 tokens: the general path on both
        [(1, 0, b[:5])],  # 5: a chunk on the row path
        [(0, 20, a[20:]), (1, 5, b[5:6])],  # two decode rows
        [(1, 6, b[6:])],  # one row: the lm_head through linear_row as well
    ]
    caches = Cache(plain, 2), Cache(fast, 2)
    for batch in steps:
        torch.testing.assert_close(step(fast, batch), step(plain, batch), **TOL)
    torch.testing.assert_close(caches[1].kv, caches[0].kv, **TOL)
    layers = plain.cfg.text.num_layers
    assert rows == [5] * layers + [2] * layers + [1] * layers
