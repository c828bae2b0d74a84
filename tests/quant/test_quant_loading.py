"""Quantised checkpoints on disk and in the model: the tool writes the published layouts
(Qwen3-FP8's names and dtypes, AutoAWQ's packing), the loader puts each file tensor where it
belongs (fused q/k/v and gate/up parts included), FP8 quantised on load equals FP8 stored, each
tensor-parallel rank holds exactly its slices of weights, scales and packed words, and splits or
files that do not fit are refused naming what."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import TPGroup, use_group
from vlmdeploy.kernels import quant_reference as ref
from vlmdeploy.models.build import build_model
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import WeightLoadError, load_weights
from vlmdeploy.models.qwen3 import Qwen3ForCausalLM
from vlmdeploy.quant.linear import is_quantized, quantize_linears
from vlmdeploy.quant.spec import WeightQuant, resolve

LM = "model.language_model.layers.{}."
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def read(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def build(path: str, model_format: str | None = None, rank: int = 0, tp: int = 1,
          load: bool = True) -> InternVLForCausalLM:
    """This rank's model, quantised as the engine would, loaded on the CPU in fp32."""
    cfg = ModelConfig.from_pretrained(path)
    with use_group(TPGroup(rank, tp)):
        if load:
            return build_model(path, cfg, torch.float32, torch.device("cpu"),
                               quant=resolve(model_format, cfg))
        with torch.device("meta"):
            model = InternVLForCausalLM(cfg)
        quant = resolve(model_format, cfg)
        if quant is not None:
            quantize_linears(model.language_model, quant)
        return model.to_empty(device="cpu")


def params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_fp8_checkpoint_has_qwen3_fp8s_layout(quant_ckpts):
    src, fp8 = read(quant_ckpts["bf16"]), read(quant_ckpts["fp8"])
    config = json.loads((Path(quant_ckpts["fp8"]) / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    for layer in range(2):
        for p in PROJ:
            name = LM.format(layer) + p
            w, s = fp8[name + ".weight"], fp8[name + ".weight_scale_inv"]
            n, k = src[name + ".weight"].shape
            assert w.dtype == torch.float8_e4m3fn and w.shape == (n, k)
            assert s.dtype == torch.float32 and s.shape == (-(-n // 128), -(-k // 128))
    scaled = {k.removesuffix("_scale_inv") for k in fp8 if k.endswith("_scale_inv")}
    assert len(scaled) == 14 and set(fp8) == set(src) | {k + "_scale_inv" for k in scaled}
    for name in set(src) - scaled:  # vision, projector, embeddings, norms, lm_head: as they were
        assert torch.equal(fp8[name], src[name]), name


def test_awq_checkpoint_has_autoawqs_layout(quant_ckpts):
    src, awq = read(quant_ckpts["bf16"]), read(quant_ckpts["awq"])
    config = json.loads((Path(quant_ckpts["awq"]) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    assert config["torch_dtype"] == "float16"
    for p in PROJ:
        name = LM.format(1) + p
        n, k = src[name + ".weight"].shape
        assert name + ".weight" not in awq
        assert awq[name + ".qweight"].dtype == torch.int32
        assert awq[name + ".qweight"].shape == (k, n // 8)
        assert awq[name + ".qzeros"].shape == (k // 128, n // 8)
        assert awq[name + ".scales"].dtype == torch.float16
        assert awq[name + ".scales"].shape == (k // 128, n)
        # the files' weights are the bf16 weights rounded to their group's grid: within half a
        # step, or one where a group's extreme was clamped to the rounded zero point's range
        w = ref.awq_dequantize(awq[name + ".qweight"], awq[name + ".qzeros"],
                               awq[name + ".scales"], 128)
        err = (w - src[name + ".weight"].float().T).abs()
        step = awq[name + ".scales"].float().repeat_interleave(128, 0)
        assert (err <= step * 1.001).all() and (err <= step * 0.501).float().mean() > 0.99
    assert all(t.dtype in (torch.float16, torch.int32) for t in awq.values())


def test_fp8_stored_and_quantised_on_load_are_the_same_model(quant_ckpts):
    on_load, stored = build(quant_ckpts["bf16"], "fp8"), build(quant_ckpts["fp8"])
    plain = params(build(quant_ckpts["bf16"]))
    a, b = params(on_load), params(stored)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].float(), b[name].float())
    files = read(quant_ckpts["fp8"])
    qkv = on_load.language_model.model.layers[0].self_attn.qkv_proj
    assert is_quantized(qkv) and qkv.weight.dtype == torch.float8_e4m3fn
    parts = [files[LM.format(0) + f"self_attn.{x}_proj.weight"] for x in "qkv"]
    scales = [files[LM.format(0) + f"self_attn.{x}_proj.weight_scale_inv"] for x in "qkv"]
    assert torch.equal(qkv.weight.float(), torch.cat(parts).float())  # fused by row block
    assert torch.equal(qkv.weight_scale_inv, torch.cat(scales))
    for name, p in a.items():  # everything outside the projections: as without model_format
        if name in plain:
            if p.dtype == torch.float8_e4m3fn:
                continue
            assert torch.equal(p, plain[name]), name
    assert not any(is_quantized(m) for m in on_load.vision_model.modules())
    assert on_load.language_model.lm_head.weight.dtype == torch.float32


def test_awq_loads_the_files_packed_words(quant_ckpts):
    model, files = build(quant_ckpts["awq"]), read(quant_ckpts["awq"])
    layer = model.language_model.model.layers[1]
    gate_up, down = layer.mlp.gate_up_proj, layer.mlp.down_proj
    assert is_quantized(gate_up) and not hasattr(gate_up, "weight")
    for leaf in ("qweight", "qzeros", "scales"):
        parts = [files[LM.format(1) + f"mlp.{x}_proj.{leaf}"] for x in ("gate", "up")]
        assert torch.equal(getattr(gate_up, leaf), torch.cat(parts, dim=1))  # N is dim 1
        assert torch.equal(getattr(down, leaf), files[LM.format(1) + f"mlp.down_proj.{leaf}"])


def test_each_rank_holds_exactly_its_fp8_slices(quant_ckpts):
    whole = params(build(quant_ckpts["fp8"]))
    attn = "language_model.model.layers.0.self_attn."
    for rank in range(2):
        got = params(build(quant_ckpts["fp8"], rank=rank, tp=2))
        # qkv: q rows 512 (256 a rank), then k and v of 256 each (one 128-row head a rank)
        rows = [(rank * 256, 256), (512 + rank * 128, 128), (768 + rank * 128, 128)]
        for leaf, unit in (("weight", 1), ("weight_scale_inv", 128)):
            full = whole[attn + "qkv_proj." + leaf].float()
            expected = torch.cat([full[a // unit:(a + n) // unit] for a, n in rows])
            assert torch.equal(got[attn + "qkv_proj." + leaf].float(), expected), leaf
            # o_proj: this rank's 256 input columns, two blocks of scales
            full = whole[attn + "o_proj." + leaf].float()
            cols = slice(rank * 256 // unit, (rank + 1) * 256 // unit)
            assert torch.equal(got[attn + "o_proj." + leaf].float(), full[:, cols]), leaf


def test_each_rank_holds_exactly_its_awq_slices(quant_ckpts):
    whole = params(build(quant_ckpts["awq"]))
    mlp = "language_model.model.layers.0.mlp."
    for rank in range(2):
        got = params(build(quant_ckpts["awq"], rank=rank, tp=2))
        # gate_up: 256 of gate's 512 output columns, then 256 of up's; packed 8 to a word
        for leaf, unit in (("qweight", 8), ("qzeros", 8), ("scales", 1)):
            full = whole[mlp + "gate_up_proj." + leaf]
            starts = [(rank * 256) // unit, (512 + rank * 256) // unit]
            expected = torch.cat([full[:, a:a + 256 // unit] for a in starts], dim=1)
            assert torch.equal(got[mlp + "gate_up_proj." + leaf], expected), leaf
        # down_proj: this rank's 256 inputs, two groups of 128
        for leaf, rows in (("qweight", 256), ("qzeros", 2), ("scales", 2)):
            full = whole[mlp + "down_proj." + leaf]
            assert torch.equal(got[mlp + "down_proj." + leaf],
                               full[rank * rows:(rank + 1) * rows]), leaf


def test_a_rank_reads_only_its_slices_of_quantised_tensors(quant_ckpts):
    path = quant_ckpts["fp8"]
    files = read(path)

    def halved(name: str) -> bool:  # split over two ranks: projections (+ scales), vocabulary
        return ("language_model." in name and ("_proj." in name or "embed_tokens" in name)
                or name.startswith("lm_head"))

    full = sum(t.nbytes for t in files.values())
    expected = full - sum(t.nbytes for n, t in files.items() if halved(n)) / 2
    for rank in range(2):
        stats = load_weights(build(path, rank=rank, tp=2, load=False), path)
        assert stats.tensors == len(files) and stats.bytes_read == expected


def aligned_config(quant_ckpts, **text) -> ModelConfig:
    cfg = ModelConfig.from_pretrained(quant_ckpts["bf16"])
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text))


@pytest.mark.parametrize("quant,text,tp,pattern", [
    # the embedded model's shape: 64-wide heads, so a rank's one k head is half an FP8 block
    (WeightQuant("fp8"), dict(head_dim=64, num_heads=4, num_kv_heads=2), 2,
     r"qkv_proj \(FP8 blocks along dim 0\).*rows 64\.\.128 of 128.*tensor-parallel size 2"),
    # 64-wide heads at tp = 1: q (256 rows) is whole blocks, but q and k of 64 rows are not
    (WeightQuant("fp8"), dict(head_dim=32, num_heads=2, num_kv_heads=2), 1, "qkv_proj"),
    (WeightQuant("fp8"), dict(intermediate_size=384), 2, r"gate_up_proj.*rows 192\.\.384"),
    (WeightQuant("awq", group_size=128), dict(intermediate_size=384), 2,
     r"down_proj \(AWQ groups of 128 inputs\)"),
    (WeightQuant("awq", group_size=128), dict(head_dim=4, num_heads=4, num_kv_heads=2), 2,
     r"qkv_proj \(AWQ words of 8 output columns\)"),
])
def test_splits_that_cut_a_block_are_refused_naming_the_layer(quant_ckpts, quant, text, tp,
                                                               pattern):
    cfg = aligned_config(quant_ckpts, **text)
    with use_group(TPGroup(tp - 1, tp)), torch.device("meta"):
        lm = Qwen3ForCausalLM(cfg.text)
        with pytest.raises(ValueError, match=pattern):
            quantize_linears(lm, quant)


def test_aligned_splits_pass_and_the_transform_is_idempotent(quant_ckpts):
    cfg = aligned_config(quant_ckpts)
    for method in (WeightQuant("fp8"), WeightQuant("awq")):
        for tp in (1, 2):
            with use_group(TPGroup(tp - 1, tp)), torch.device("meta"):
                lm = Qwen3ForCausalLM(cfg.text)
                assert quantize_linears(lm, method) == 8  # 2 layers x qkv, o, gate_up, down
                names = {n for n, _ in lm.named_parameters()}
                assert quantize_linears(lm, method) == 0
                assert {n for n, _ in lm.named_parameters()} == names


def copy_with(src: str, dst: Path, change) -> str:
    shutil.copytree(src, dst)
    (file,) = dst.glob("*.safetensors")
    tensors = read(dst)
    change(tensors)
    save_file(tensors, str(file))
    return str(dst)


def test_missing_scales_are_named(quant_ckpts, tmp_path):
    name = LM.format(1) + "self_attn.k_proj.weight_scale_inv"
    path = copy_with(quant_ckpts["fp8"], tmp_path / "ck", lambda t: t.pop(name))
    with pytest.raises(WeightLoadError, match=r"layers\.1\.self_attn\.qkv_proj\."
                                              r"weight_scale_inv"):
        build(path)


def test_a_full_precision_projection_in_an_awq_checkpoint_is_named(quant_ckpts, tmp_path):
    base = LM.format(0) + "mlp.down_proj."
    bf16 = read(quant_ckpts["bf16"])[base + "weight"]

    def unquantise(t):
        for leaf in ("qweight", "qzeros", "scales"):
            t.pop(base + leaf)
        t[base + "weight"] = bf16.half()

    path = copy_with(quant_ckpts["awq"], tmp_path / "ck", unquantise)
    with pytest.raises(WeightLoadError, match=r"down_proj\.weight.*quantised layer with "
                                              r"parameters qweight, qzeros, scales"):
        build(path)


def test_a_full_precision_projection_in_an_fp8_checkpoint_is_quantised_on_load(quant_ckpts,
                                                                               tmp_path):
    base = LM.format(0) + "mlp.down_proj."
    bf16 = read(quant_ckpts["bf16"])[base + "weight"]

    def unquantise(t):
        t.pop(base + "weight_scale_inv")
        t[base + "weight"] = bf16

    path = copy_with(quant_ckpts["fp8"], tmp_path / "ck", unquantise)
    a, b = params(build(path)), params(build(quant_ckpts["fp8"]))
    assert all(torch.equal(a[n].float(), b[n].float()) for n in a)


def test_fp8_tensors_of_full_precision_parameters_are_dequantised(quant_ckpts, tmp_path):
    """A vision-tower weight and the lm_head in FP8 (as a checkpoint might quantise them) load as
    their dequantised values; the model keeps them in its dtype."""
    names = ["model.vision_tower.encoder.layer.0.mlp.fc1.weight", "lm_head.weight"]
    expected = {}

    def quantise(t):
        for name in names:
            q, s = ref.fp8_quantize_blocks(t[name].float())
            expected[name] = ref.fp8_dequantize_blocks(q, s)
            t[name], t[name + "_scale_inv"] = q, s

    path = copy_with(quant_ckpts["fp8"], tmp_path / "ck", quantise)
    model = params(build(path))
    for name, target in zip(names, ["vision_model.encoder.layers.0.mlp.fc1.weight",
                                    "language_model.lm_head.weight"], strict=True):
        assert model[target].dtype == torch.float32
        assert torch.equal(model[target], expected[name])
    lone = copy_with(path, tmp_path / "lone", lambda t: t.pop(names[1]))
    with pytest.raises(WeightLoadError, match=r"FP8 tensors without .*lm_head\.weight_scale_inv"):
        build(lone)


@pytest.mark.parametrize("fmt", ["fp8", "awq"])
def test_dummy_weights_fill_quantised_layers(quant_ckpts, fmt):
    cfg = ModelConfig.from_pretrained(quant_ckpts[fmt])
    model = build_model(quant_ckpts[fmt], cfg, torch.float32, torch.device("cpu"),
                        load_format="dummy", quant=resolve(None, cfg))
    layer = model.language_model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    y = layer(x)
    assert y.shape == (3, layer.out_features) and torch.isfinite(y).all() and y.abs().sum() > 0



def test_dummy_weights_are_one_model_in_every_format(quant_ckpts):
    """The same seed draws the same full-precision model whatever ``model_format`` says; a
    quantised layer holds that model's weight, rounded: so formats can be compared on dummy
    weights of large shapes."""
    path = quant_ckpts["bf16"]
    cfg = ModelConfig.from_pretrained(path)
    full = params(build_model(path, cfg, torch.float32, torch.device("cpu"), load_format="dummy"))
    model = build_model(path, cfg, torch.float32, torch.device("cpu"), load_format="dummy",
                        quant=resolve("fp8", cfg))
    quantised = {name for name, m in model.named_modules() if is_quantized(m)}
    assert quantised
    for name, m in model.named_modules():
        if name in quantised:
            w = ref.fp8_dequantize_blocks(m.weight, m.weight_scale_inv)
            expected = full[f"{name}.weight"]
            assert (w - expected).abs().max() <= expected.abs().max() / 8, name  # e4m3: 3 bits
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in quantised:
            assert torch.equal(p, full[name]), name


def test_the_engine_refuses_a_split_that_cuts_a_block_before_loading():
    """The embedded model's heads are 64 wide: at tp = 2 a rank's k head is half an FP8 block."""
    import vlmdeploy
    from vlmdeploy import PytorchEngineConfig, pipeline

    embedded = Path(vlmdeploy.__file__).parent / "assets" / "internvl3_5-shapes-tiny"
    config = PytorchEngineConfig(tp=2, model_format="fp8", device_type="cpu")
    with pytest.raises(ValueError, match=r"qkv_proj \(FP8 blocks .*tensor-parallel size 2"):
        pipeline(str(embedded), backend_config=config)
