"""Safetensors loading: every name of the three layouts reaches a parameter, the values land where
they belong, and a broken checkpoint is an error naming the tensor."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmdeploy.config import ModelConfig
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import WeightLoadError, load_weights, to_original_name
from vlmdeploy.testing.checkpoint import make_checkpoint

# Split checkpoint tensors and the fused parameter (and row block) they fill, written here from the
# model's parameter tree rather than taken from the loader.
FUSED = {
    ".attn.q_proj.": (".attn.qkv.", 0),
    ".attn.k_proj.": (".attn.qkv.", 1),
    ".attn.v_proj.": (".attn.qkv.", 2),
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}


def read(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def build(path: str | Path) -> InternVLForCausalLM:
    torch.manual_seed(0)
    return InternVLForCausalLM(ModelConfig.from_pretrained(path))


def loaded(path: str | Path) -> dict[str, torch.Tensor]:
    model = build(path)
    load_weights(model, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fused_target(name: str) -> tuple[str, int | None]:
    for part, (fused, block) in FUSED.items():
        if part in name:
            return name.replace(part, fused), block
    return name, None


@pytest.mark.parametrize("fmt", ["original", "hf", "hf-legacy", "6b-original", "6b-hf"])
def test_every_checkpoint_name_maps_to_a_parameter(tiny_ckpts: dict[str, str], fmt: str):
    params = dict(build(tiny_ckpts[fmt]).named_parameters())
    hit: set[str] = set()
    for name in read(tiny_ckpts[fmt]):
        target, _ = fused_target(to_original_name(name))
        assert target in params, f"{name} -> {target}"
        hit.add(target)
    assert hit == set(params)  # nothing left to chance (lm_head is in the tiny checkpoints)


def test_legacy_prefixes_map_like_current_hf():
    pairs = [
        (
            "language_model.model.layers.3.mlp.down_proj.weight",
            "model.language_model.layers.3.mlp.down_proj.weight",
        ),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("vision_tower.encoder.layer.2.lambda_1", "model.vision_tower.encoder.layer.2.lambda_1"),
        ("multi_modal_projector.linear_2.bias", "model.multi_modal_projector.linear_2.bias"),
    ]
    for legacy, current in pairs:
        assert to_original_name(legacy) == to_original_name(current)
    assert to_original_name("model.multi_modal_projector.linear_2.bias") == "mlp1.3.bias"
    assert (
        to_original_name("model.vision_tower.encoder.layer.2.attention.projection_layer.weight")
        == "vision_model.encoder.layers.2.attn.proj.weight"
    )


def test_three_layouts_load_the_same_values(tiny_ckpts: dict[str, str]):
    ref = loaded(tiny_ckpts["original"])
    for fmt in ("hf", "hf-legacy"):
        other = loaded(tiny_ckpts[fmt])
        assert other.keys() == ref.keys()
        for k in ref:
            assert torch.equal(ref[k], other[k]), f"{fmt}: {k}"


def test_split_tensors_land_in_their_row_blocks(tiny_ckpts: dict[str, str]):
    raw = read(tiny_ckpts["hf"])
    state = loaded(tiny_ckpts["hf"])
    lm, vt = "model.language_model.layers.1.", "model.vision_tower.encoder.layer.0.attention."
    qkv = torch.cat([raw[f"{lm}self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(state["language_model.model.layers.1.self_attn.qkv_proj.weight"], qkv)
    gate_up = torch.cat([raw[f"{lm}mlp.gate_proj.weight"], raw[f"{lm}mlp.up_proj.weight"]])
    assert torch.equal(state["language_model.model.layers.1.mlp.gate_up_proj.weight"], gate_up)
    vis_bias = torch.cat([raw[f"{vt}{x}_proj.bias"] for x in "qkv"])
    assert torch.equal(state["vision_model.encoder.layers.0.attn.qkv.bias"], vis_bias)
    assert torch.equal(state["language_model.lm_head.weight"], raw["lm_head.weight"])


def test_6b_tower_loads_qk_norm_and_no_bias(tiny_ckpts: dict[str, str]):
    raw = read(tiny_ckpts["6b-hf"])
    state = loaded(tiny_ckpts["6b-hf"])
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in state
    src = raw["model.vision_tower.encoder.layer.1.attention.k_norm.weight"]
    assert torch.equal(state["vision_model.encoder.layers.1.attn.k_norm.weight"], src)


# ---- broken checkpoints


def copy_without_weights(src: str, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(Path(src) / "config.json", dst / "config.json")
    return dst


def rewrite(src: str, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose tensors went through ``edit(dict) -> None``."""
    tensors = read(src)
    edit(tensors)
    copy_without_weights(src, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


MISSING = [
    ("model.language_model.layers.1.mlp.down_proj.weight", r"layers\.1\.mlp\.down_proj"),
    ("model.language_model.layers.0.self_attn.k_proj.weight", r"layers\.0\.self_attn\.k_proj"),
    ("model.vision_tower.encoder.layer.1.attention.v_proj.bias", r"layers\.1\.attn\.v_proj\.bias"),
    ("model.multi_modal_projector.layer_norm.bias", r"mlp1\.0\.bias"),
]


@pytest.mark.parametrize("name,pattern", MISSING, ids=["mlp", "fused-k", "vit-v-bias", "projector"])
def test_missing_tensor_is_named(tiny_ckpts, tmp_path: Path, name: str, pattern: str):
    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", lambda t: t.pop(name))
    with pytest.raises(WeightLoadError, match=pattern):
        load_weights(build(path), path)


def test_extra_tensor_is_named(tiny_ckpts, tmp_path: Path):
    def add(t):
        t["model.language_model.layers.7.mlp.down_proj.weight"] = torch.zeros(64, 128)

    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", add)
    with pytest.raises(WeightLoadError, match=r"model\.language_model\.layers\.7\.mlp\.down_proj"):
        load_weights(build(path), path)


@pytest.mark.parametrize(
    "name",
    [
        "model.language_model.layers.0.self_attn.o_proj.weight",
        "model.language_model.layers.1.self_attn.v_proj.weight",
        "lm_head.weight",
    ],
)
def test_misshapen_tensor_is_named(tiny_ckpts, tmp_path: Path, name: str):
    def shrink(t):
        t[name] = t[name][:-1].clone()

    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", shrink)
    with pytest.raises(WeightLoadError, match=re.escape(name) + ".*shape"):
        load_weights(build(path), path)


def test_same_tensor_under_two_layouts_is_refused(tiny_ckpts, tmp_path: Path):
    # A legacy-named copy would silently overwrite (or be overwritten by) the current one.
    def dup(t):
        t["vision_tower.encoder.layer.0.attention.k_proj.weight"] = t[
            "model.vision_tower.encoder.layer.0.attention.q_proj.weight"
        ].clone()

    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", dup)
    with pytest.raises(WeightLoadError, match=r"vision_tower\.encoder\.layer\.0\.attention\.k_"):
        load_weights(build(path), path)


def test_fused_and_split_forms_together_are_refused(tiny_ckpts, tmp_path: Path):
    def both(t):
        assert "vision_model.encoder.layers.0.attn.qkv.weight" in t
        t["vision_model.encoder.layers.0.attn.q_proj.weight"] = torch.zeros(64, 64)

    path = rewrite(tiny_ckpts["original"], tmp_path / "ck", both)
    with pytest.raises(WeightLoadError, match="second time"):
        load_weights(build(path), path)


def test_lm_head_tie_fallback(tiny_ckpts, tmp_path: Path):
    path = rewrite(tiny_ckpts["hf"], tmp_path / "ck", lambda t: t.pop("lm_head.weight"))
    state = loaded(path)
    embed = read(tiny_ckpts["hf"])["model.language_model.embed_tokens.weight"]
    assert torch.equal(state["language_model.lm_head.weight"], embed)
    assert torch.equal(state["language_model.model.embed_tokens.weight"], embed)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    return make_checkpoint(root / "ck", "tiny", "hf", seed=0, max_shard_bytes=8 * 2**20)


def test_sharded_checkpoint_loads(tiny_ckpts, sharded: Path):
    path = sharded
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    ref = loaded(tiny_ckpts["hf"])
    got = loaded(path)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_index_only_loads_the_shards_it_names(sharded: Path, tmp_path: Path):
    path = Path(shutil.copytree(sharded, tmp_path / "ck"))
    save_file({"stray": torch.zeros(1)}, str(path / "stray.safetensors"))  # not in the index
    load_weights(build(path), path)


def test_index_naming_a_path_outside_the_checkpoint_is_refused(sharded: Path, tmp_path: Path):
    path = Path(shutil.copytree(sharded, tmp_path / "ck"))
    index = path / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"model-00001', '"../model-00001'))
    with pytest.raises(WeightLoadError, match="shard"):
        load_weights(build(path), path)


def test_bin_only_directory_is_refused(tiny_ckpts, tmp_path: Path):
    path = copy_without_weights(tiny_ckpts["hf"], tmp_path / "ck")
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightLoadError, match="safetensors"):
        load_weights(build(path), path)


def test_empty_directory_is_refused(tiny_ckpts, tmp_path: Path):
    path = copy_without_weights(tiny_ckpts["hf"], tmp_path / "ck")
    with pytest.raises(WeightLoadError, match="safetensors"):
        load_weights(build(path), path)


def test_loading_casts_to_the_model_dtype(tiny_ckpts):
    model = build(tiny_ckpts["hf"]).to(torch.bfloat16)
    load_weights(model, tiny_ckpts["hf"])
    raw = read(tiny_ckpts["hf"])["model.language_model.norm.weight"]
    assert model.language_model.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(model.language_model.model.norm.weight, raw.to(torch.bfloat16))
