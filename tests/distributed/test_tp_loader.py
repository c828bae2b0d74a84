"""Tensor-parallel loading: a rank reads only its slices of the checkpoint, the ranks' shards put
together are the one-rank model, and a wrong checkpoint fails on a rank as it fails on one.

Loading exchanges nothing between ranks, so each rank is built here in this process under its
group (``use_group``). The expected slices are written from the Megatron split rules, not taken
from the loader."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import TPGroup, use_group
from vlmdeploy.models.build import init_dummy_weights
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import LoadStats, WeightLoadError, load_weights

# Language-model tensors split over the ranks: by rows (output features, vocabulary) or columns.
ROW_SPLIT = ("embed_tokens.", "lm_head.", "q_proj.", "gate_proj.", "up_proj.")
COL_SPLIT = ("o_proj.", "down_proj.")
KV = ("k_proj.", "v_proj.")


def build(path: str | Path, rank: int = 0, tp: int = 1) -> InternVLForCausalLM:
    with use_group(TPGroup(rank, tp)), torch.device("meta"):
        model = InternVLForCausalLM(ModelConfig.from_pretrained(path))
    return model.to_empty(device="cpu")


def load(path: str | Path, rank: int = 0, tp: int = 1) -> tuple[dict, LoadStats]:
    model = build(path, rank, tp)
    stats = load_weights(model, path)
    return dict(model.named_parameters()), stats


def read(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def is_language(name: str) -> bool:
    return "language_model" in name or name.startswith("lm_head")


def share_read(name: str, tp: int, kv_heads: int) -> float:
    """The fraction of checkpoint tensor ``name`` one rank holds."""
    if not is_language(name):
        return 1.0  # the vision tower and the projector are replicated
    if any(k in name for k in ROW_SPLIT + COL_SPLIT):
        return 1 / tp
    if any(k in name for k in KV):
        return max(1, kv_heads // tp) / kv_heads  # at least one head: replicated below tp
    return 1.0


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_a_rank_reads_only_its_slices(tiny_ckpts, fmt: str, tp: int):
    path = tiny_ckpts[fmt]
    kv_heads = ModelConfig.from_pretrained(path).text.num_kv_heads
    tensors = read(path)
    full = sum(t.numel() * t.element_size() for t in tensors.values())
    expected = sum(
        t.numel() * t.element_size() * share_read(n, tp, kv_heads) for n, t in tensors.items()
    )
    for rank in range(tp):
        _, stats = load(path, rank, tp)
        assert stats.tensors == len(tensors)
        assert stats.bytes_read == pytest.approx(expected, abs=0.5)
        assert stats.bytes_read < 1.05 * full / tp  # the vocabulary dominates the tiny model


def test_one_rank_reads_the_checkpoint_once(tiny_ckpts):
    path = tiny_ckpts["hf"]
    _, stats = load(path)
    assert stats.bytes_read == sum(t.numel() * t.element_size() for t in read(path).values())


def reassemble(name: str, pieces: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The one-rank parameter ``name`` from every rank's shard of it, rank by rank."""
    tp, t = len(pieces), cfg.text
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return torch.cat(pieces)[: t.vocab_size]
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return torch.cat(pieces, dim=1)
    if name.endswith("gate_up_proj.weight"):
        gates, ups = zip(*(p.chunk(2) for p in pieces))
        return torch.cat([*gates, *ups])
    if name.endswith("qkv_proj.weight"):
        local_kv = max(1, t.num_kv_heads // tp) * t.head_dim
        q, k, v = zip(
            *(p.split([t.num_heads // tp * t.head_dim, local_kv, local_kv]) for p in pieces)
        )
        group = max(1, tp // t.num_kv_heads)  # ranks that share one KV head
        for r in range(tp):  # replicas hold the same head
            first = r - r % group
            assert torch.equal(k[r], k[first]) and torch.equal(v[r], v[first]), (name, r)
        return torch.cat([*q, *k[::group], *v[::group]])
    assert all(torch.equal(p, pieces[0]) for p in pieces), f"{name} differs between ranks"
    return pieces[0]  # replicated: the vision tower, the projector, the norms


@pytest.mark.parametrize("tp", [2, 4])
def test_shards_put_together_are_the_full_model(tiny_ckpts, tp: int):
    path = tiny_ckpts["6b-hf"]
    cfg = ModelConfig.from_pretrained(path)
    full, _ = load(path)
    ranks = [load(path, rank, tp)[0] for rank in range(tp)]
    assert all(r.keys() == full.keys() for r in ranks)
    for name, ref in full.items():
        got = reassemble(name, [r[name] for r in ranks], cfg)
        assert torch.equal(got, ref), name
    t, qkv = cfg.text, "language_model.model.layers.0.self_attn.qkv_proj.weight"
    heads = t.num_heads // tp + 2 * max(1, t.num_kv_heads // tp)  # q + k + v heads of a rank
    assert ranks[0][qkv].shape == (heads * t.head_dim, t.hidden_size)


# ---- wrong checkpoints fail on a rank as on one


def rewrite(src: str, dst: Path, edit) -> Path:
    tensors = read(src)
    edit(tensors)
    dst.mkdir(parents=True)
    shutil.copy(Path(src) / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "name,full",
    [
        ("model.language_model.layers.0.self_attn.o_proj.weight", (64, 64)),
        ("model.language_model.layers.1.self_attn.k_proj.weight", (32, 64)),
        ("lm_head.weight", (151936, 64)),
    ],
)
def test_misshapen_tensor_is_named_with_its_full_shape(tiny_ckpts, tmp_path, name, full):
    def shrink(t):
        t[name] = t[name][:-1].clone()

    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", shrink)
    for tp in (2, 4):
        with pytest.raises(
            WeightLoadError, match=re.escape(name) + r".*expected " + re.escape(str(full))
        ):
            load(path, tp - 1, tp)


def test_missing_part_is_named_on_a_rank(tiny_ckpts, tmp_path):
    name = "model.language_model.layers.0.self_attn.v_proj.weight"
    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", lambda t: t.pop(name))
    with pytest.raises(WeightLoadError, match=r"layers\.0\.self_attn\.v_proj"):
        load(path, 1, 4)


def test_lm_head_ties_to_the_embedding_shard(tiny_ckpts, tmp_path):
    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", lambda t: t.pop("lm_head.weight"))
    embed = read(tiny_ckpts["hf"])["model.language_model.embed_tokens.weight"]
    for rank in range(2):
        params, _ = load(path, rank, 2)
        shard = embed.chunk(2)[rank]
        assert torch.equal(params["language_model.lm_head.weight"], shard)
        assert torch.equal(params["language_model.model.embed_tokens.weight"], shard)


# ---- dummy weights


def test_dummy_weights_at_one_rank_are_unchanged(tiny_ckpts):
    """The one-rank dummy model is the one drawn before tensor parallelism: one seeded stream
    over the parameters in order."""
    model = build(tiny_ckpts["original"])
    init_dummy_weights(model, seed=0)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("ls1", "ls2", "bias") or p.dim() == 1:
            continue
        assert torch.equal(p, torch.empty_like(p).normal_(0.0, 0.02, generator=gen)), name


def test_dummy_weights_replicate_what_is_replicated(tiny_ckpts):
    models = [build(tiny_ckpts["6b-original"], rank, 2) for rank in range(2)]
    for m in models:
        init_dummy_weights(m, seed=0)
    a, b = (dict(m.named_parameters()) for m in models)
    for name in a:
        if not name.startswith("language_model.") or a[name].dim() == 1:
            assert torch.equal(a[name], b[name]), name  # vision, projector, norms
    assert all(torch.isfinite(p).all() for p in a.values())
