"""The tensor-parallel model computes the one-rank model's function: at tp = 2 and 4 (gloo, one
spawned process per rank, fp32) every rank's logits equal tp = 1's within 1e-4, for both
checkpoint layouts and both tower styles, over steps that take every path — a packed prefill with
image rows and decode rows on the general path (> ``ROW_PATH_TOKENS`` tokens), the same on the row
path, and one row (the lm_head through ``linear_row``). tp = 4 replicates the tiny model's two KV
heads; a tied checkpoint with a vocabulary of 1,001 pads the vocabulary split."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from spawn import run_ranks

from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import TPGroup, tp_size, use_group
from vlmdeploy.layers.attention import AttentionMetadata, attention_context, attention_layers
from vlmdeploy.models import fast_paths
from vlmdeploy.models.build import build_model
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.tp_plan import check_tensor_parallel, local_kv_heads
from vlmdeploy.testing.checkpoint import make_checkpoint

BLOCK, BLOCKS_PER_SEQ = 16, 4
TOL = 1e-4  # fp32: the ranks differ from one rank only in the order of sums
CASES = ["original", "hf", "6b-original", "6b-hf"]

# (sequence, first new position, number of new tokens, image rows among them): each step packs
# its sequences' new tokens; a sequence with one new token is a decode row.
STEPS = [
    [(0, 0, 20, range(3, 11)), (1, 0, 7, ())],  # two prefills, 27 tokens: the general path
    [(0, 20, 1, ()), (1, 7, 1, ()), (2, 0, 18, range(2, 12))],  # decodes + a prefill: general
    [(0, 21, 1, ()), (1, 8, 1, ()), (2, 18, 1, ()), (3, 0, 6, range(1, 4))],  # 9: the row path
    [(1, 9, 1, ())],  # one row: the lm_head through linear_row
]


@pytest.fixture(scope="module")
def checkpoints(tiny_ckpts, tmp_path_factory) -> dict[str, str]:
    odd = make_checkpoint(
        tmp_path_factory.mktemp("odd-vocab") / "ck",
        "tiny",
        "original",
        seed=3,
        text_overrides={"vocab_size": 1001, "tie_word_embeddings": True},  # no lm_head on disk
    )
    return {**{c: tiny_ckpts[c] for c in CASES}, "tied-1001": str(odd)}


@torch.inference_mode()
def run_steps(path: str) -> dict:
    """This process's rank of the model at ``path``, built as the engine builds it, through
    :data:`STEPS`: the image embeddings and each step's logits of every sequence's last token."""
    cfg = ModelConfig.from_pretrained(path)
    model = build_model(path, cfg, torch.float32, torch.device("cpu"))
    bind_cache(model, num_seqs=4)
    size = cfg.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    image = model.encode_images(pixels).flatten(0, 1)  # (256, H)
    ids = torch.randint(cfg.text.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    out = {"image": image, "logits": [], "row_path": []}
    used = 0  # image rows handed out so far
    with count_row_path(out["row_path"]):
        for batch in STEPS:
            logits, used = step(model, batch, ids, image, used)
            out["logits"].append(logits)
    return out


def bind_cache(model: InternVLForCausalLM, num_seqs: int) -> None:
    """A KV cache of this rank's KV heads; sequence s owns blocks s * BLOCKS_PER_SEQ onwards."""
    t = model.cfg.text
    kv_heads = local_kv_heads(t.num_kv_heads, tp_size())
    shape = (2, t.num_layers, num_seqs * BLOCKS_PER_SEQ, BLOCK, kv_heads, t.head_dim)
    kv = torch.zeros(shape)
    for i, layer in enumerate(attention_layers(model)):
        assert layer.num_kv_heads == kv_heads
        layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]


def step(
    model: InternVLForCausalLM,
    batch: list[tuple],
    ids: torch.Tensor,
    image: torch.Tensor,
    used: int,
) -> tuple[torch.Tensor, int]:
    """One packed step (as ``ModelRunner.forward_eager``) → (logits of each sequence's last new
    token (B, V), image rows used so far)."""
    tokens, positions, mask, slots, tables, cu, kv_lens = [], [], [], [], [], [0], []
    for seq, start, n, image_rows in batch:
        new = range(start, start + n)
        tokens.append(ids[seq, start : start + n])
        positions += new
        mask += [i in image_rows for i in range(n)]
        first = seq * BLOCKS_PER_SEQ
        slots += [(first + p // BLOCK) * BLOCK + p % BLOCK for p in new]
        tables.append(list(range(first, first + BLOCKS_PER_SEQ)))
        cu.append(cu[-1] + n)
        kv_lens.append(start + n)
    mask = torch.tensor(mask)
    rows = int(mask.sum())
    lens = [n for _, _, n, _ in batch]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_q_len=max(lens),
        max_kv_len=max(kv_lens),
        num_decode=next((i for i, n in enumerate(lens) if n != 1), len(lens)),
    )
    x = model.embed(torch.cat(tokens), image[used : used + rows], mask)
    with attention_context(meta):
        hidden = model(x, torch.tensor(positions))  # (T, H)
    return model.compute_logits(hidden[torch.tensor(cu[1:]) - 1]), used + rows


def rank_steps(rank: int, size: int, paths: dict[str, str]) -> dict[str, dict]:
    assert tp_size() == size
    return {name: run_steps(path) for name, path in paths.items()}


@contextlib.contextmanager
def count_row_path(rows: list[int]) -> Iterator[None]:
    """Record the token count of every layer that takes ``fast_paths.forward_row``."""
    real = fast_paths.forward_row

    def spy(layer, h, cos, sin):
        rows.append(h.shape[0])
        return real(layer, h, cos, sin)

    fast_paths.forward_row = spy
    try:
        yield
    finally:
        fast_paths.forward_row = real


@pytest.fixture(scope="module")
def reference(checkpoints) -> dict[str, dict]:
    return rank_steps(0, 1, checkpoints)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_logits_equal_one_rank(checkpoints, reference, tp: int):
    ranks = run_ranks(rank_steps, tp, checkpoints, timeout=150)
    layers = 2
    for name, ref in reference.items():
        assert ref["row_path"] == [9] * layers + [1] * layers, name  # both fast paths ran
        vocab = ModelConfig.from_pretrained(checkpoints[name]).text.vocab_size
        for rank, got in enumerate(ranks):
            got, where = got[name], f"{name}, rank {rank} of {tp}"
            assert got["row_path"] == ref["row_path"], where
            torch.testing.assert_close(got["image"], ref["image"], rtol=0, atol=1e-5)
            for i, (a, b) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
                assert a.shape == b.shape == (len(STEPS[i]), vocab), where
                assert (a - b).abs().max() <= TOL, f"{where}, step {i}: {(a - b).abs().max()}"


# ---- the plan: which sizes split


def test_check_tensor_parallel(tiny_ckpts):
    cfg = ModelConfig.from_pretrained(tiny_ckpts["hf"])  # 4 heads, 2 KV heads, intermediate 128
    for tp in (1, 2, 4):
        check_tensor_parallel(cfg, tp)
    with pytest.raises(ValueError, match=r"tp=3 .* 4 attention heads"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match="attention heads"):
        check_tensor_parallel(cfg, 8)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=">= 1"):
            check_tensor_parallel(cfg, bad)

    def text(**kw) -> ModelConfig:
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **kw))

    with pytest.raises(ValueError, match=r"tp=2 .* 3 key/value heads"):
        check_tensor_parallel(text(num_heads=12, num_kv_heads=3, intermediate_size=192), 2)
    with pytest.raises(ValueError, match=r"tp=4 is not a multiple of .* 3 key/value heads"):
        check_tensor_parallel(text(num_heads=12, num_kv_heads=3, intermediate_size=192), 4)
    check_tensor_parallel(text(num_heads=12, num_kv_heads=3, intermediate_size=192), 3)
    check_tensor_parallel(
        text(num_heads=12, num_kv_heads=3, intermediate_size=192), 6
    )  # each KV head on 2 ranks
    with pytest.raises(ValueError, match="intermediate size 100"):
        check_tensor_parallel(text(num_heads=8, intermediate_size=100), 8)


def test_local_kv_heads():
    assert [local_kv_heads(8, tp) for tp in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
    assert [local_kv_heads(2, tp) for tp in (1, 2, 4)] == [2, 1, 1]


def test_a_model_that_does_not_split_is_refused_at_construction(tiny_ckpts):
    cfg = ModelConfig.from_pretrained(tiny_ckpts["hf"])
    with use_group(TPGroup(0, 3)), torch.device("meta"), pytest.raises(ValueError):
        InternVLForCausalLM(cfg)
