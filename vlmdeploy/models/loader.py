"""Safetensors weight loading with the name mapping of all three InternVL layouts.

Checkpoint names are first rewritten to the original layout (the model's own parameter tree), then
split tensors are routed into fused parameters (q/k/v → ``qkv``/``qkv_proj``, gate/up →
``gate_up_proj``) by row block. Every parameter must be written exactly once in full: a missing,
unexpected, duplicated or misshapen tensor is an error naming it, so nothing is ever left silently
random. GPT-OSS's MXFP4 expert pairs (``*_blocks`` + ``*_scales``) are dequantised on load
(:mod:`vlmdeploy.models.mxfp4`). Only ``.safetensors`` files are read (a shard index may only
name files beside it); no code from the checkpoint runs.

Quantised layers (:mod:`vlmdeploy.quant`) hold their format's tensors as parameters, so FP8
(``weight`` + ``weight_scale_inv``) and AWQ (``qweight``, ``qzeros``, ``scales``) tensors load
like any other, split q/k/v and gate/up ones into their fused parameter's row blocks. A
full-precision tensor for an FP8 layer is quantised as it is written, and an FP8 tensor for a
full-precision parameter (a quantised vision tower, say) is dequantised once its scales are in.

A mixture-of-experts MLP's experts live in fused 3-D parameters; a checkpoint may store them so,
or one tensor per expert and projection (``mlp.experts.{e}.gate_proj.weight``), each read into
its expert's slice.

Under tensor parallelism a parameter holds a shard (a :class:`ShardLayout`, declared by the
parallel layers): a rank reads only those rows of each checkpoint tensor, and checks the tensor's
full shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmdeploy.layers.linear import Shard, ShardLayout, shard_layout
from vlmdeploy.models import mxfp4
from vlmdeploy.quant import fp8
from vlmdeploy.quant.linear import Writer, is_quantized

# transformers-native (-HF) names → original names. Legacy -HF checkpoints drop the leading
# "model.".
_HF_RULES: list[tuple[str, str]] = [
    (r"^(model\.)?vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (
        r"^(model\.)?vision_tower\.embeddings\.patch_embeddings\.projection\.",
        "vision_model.embeddings.patch_embedding.",
    ),
    (
        r"^(model\.)?vision_tower\.embeddings\.position_embeddings$",
        "vision_model.embeddings.position_embedding",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
        r"vision_model.encoder.layers.\2.attn.proj.",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.attention\.",
        r"vision_model.encoder.layers.\2.attn.",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.lambda_1$",
        r"vision_model.encoder.layers.\2.ls1",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.lambda_2$",
        r"vision_model.encoder.layers.\2.ls2",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.",
        r"vision_model.encoder.layers.\2.norm1.",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.",
        r"vision_model.encoder.layers.\2.norm2.",
    ),
    (
        r"^(model\.)?vision_tower\.encoder\.layer\.(\d+)\.mlp\.",
        r"vision_model.encoder.layers.\2.mlp.",
    ),
    (r"^(model\.)?multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^(model\.)?multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^(model\.)?multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]

# (fused parameter, checkpoint part, shard index) — applied after renaming.
_STACKED: list[tuple[str, str, int]] = [
    (".attn.qkv.", ".attn.q_proj.", 0),
    (".attn.qkv.", ".attn.k_proj.", 1),
    (".attn.qkv.", ".attn.v_proj.", 2),
    (".self_attn.qkv_proj.", ".self_attn.q_proj.", 0),
    (".self_attn.qkv_proj.", ".self_attn.k_proj.", 1),
    (".self_attn.qkv_proj.", ".self_attn.v_proj.", 2),
    (".mlp.gate_up_proj.", ".mlp.gate_proj.", 0),
    (".mlp.gate_up_proj.", ".mlp.up_proj.", 1),
]

# One expert's tensor of a mixture-of-experts MLP → (fused 3-D parameter, part); the expert index
# selects the slice along the parameter's first dim. Checkpoints that store the experts fused
# (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I), as transformers
# 5 holds them) match the parameters by name.
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PARTS = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


class WeightLoadError(ValueError):
    pass


def to_original_name(name: str) -> str:
    """Map a checkpoint tensor name of any supported layout to the model's parameter name."""
    for pattern, repl in _HF_RULES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def safetensors_files(model_path: str | Path) -> list[Path]:
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:  # plain file names beside the index, nothing else is opened
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise WeightLoadError(f"the weight index names an invalid shard {shard!r}")
        return [root / s for s in shards]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        if any(root.glob("*.bin")) or any(root.glob("*.pt")):
            raise WeightLoadError(
                "only .safetensors weights are loaded (pickle-based .bin/.pt files are "
                "refused for safety); convert the checkpoint to safetensors"
            )
        raise WeightLoadError(f"no .safetensors files in {model_path}")
    return files


@dataclass
class LoadStats:
    """What :func:`load_weights` read: checkpoint tensors opened, and bytes of tensor data read
    (this rank's slices only)."""

    tensors: int = 0
    bytes_read: int = 0


def _open_files(files: list[Path], progress: bool) -> Iterator:
    """Each file's safetensors handle, in order (a progress bar over the files with
    ``progress``)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="Loading weights", unit="shard")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            yield sf
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def param_layout(model: nn.Module, param_name: str, param: torch.Tensor) -> ShardLayout:
    """How ``param`` is cut from the checkpoint. A parallel layer declares it
    (``shard_layouts``); a fused parameter of a replicated module is declared by its owner as row
    sizes (``fused``: ``{leaf: [rows, ...]}``); anything else is one whole tensor."""
    path, leaf = param_name.rsplit(".", 1)
    module = model.get_submodule(path)
    layout = shard_layout(module, leaf)
    if layout is not None:
        return layout
    if "." in path:
        owner, child = path.rsplit(".", 1)
        sizes = getattr(model.get_submodule(owner), "fused", {}).get(child)
        if sizes is not None:
            return ShardLayout(0, tuple(Shard.whole(n) for n in sizes))
    return ShardLayout(0, (Shard.whole(param.shape[0]),))


def load_weights(model: nn.Module, model_path: str | Path, progress: bool = False) -> LoadStats:
    """Fill every parameter of ``model`` from the checkpoint; raise on anything missing, extra,
    written twice or misshapen. A tensor-parallel rank reads only the slices its shards hold
    (``safe_open(...).get_slice``), so its host memory stays near its shard; shapes are checked
    against the whole checkpoint tensor, so a wrong checkpoint fails on every rank alike."""
    params = dict(model.named_parameters())
    layouts = {name: param_layout(model, name, p) for name, p in params.items()}
    for name, p in params.items():  # rows past the parts (vocabulary padding) are never read
        layout = layouts[name]
        pad = p.shape[layout.dim] - layout.local
        if pad > 0:
            p.data.narrow(layout.dim, layout.local, pad).zero_()
    written: dict[str, set] = {}  # parameter → parts written: None (the whole), i, (expert, i)
    stats = LoadStats()
    files = safetensors_files(model_path)
    packed = mxfp4.PackedExperts()  # GPT-OSS's MXFP4 experts: dequantised once both halves are in
    pending = fp8.PendingDequant()  # FP8 tensors for full-precision parameters, and their scales
    for sf in _open_files(files, progress and len(files) > 1):
        for ckpt_name in sf.keys():
            src = sf.get_slice(ckpt_name)
            if ckpt_name.endswith(mxfp4.SUFFIXES):
                pair = packed.add(ckpt_name, sf.get_tensor(ckpt_name))
                if pair is None:
                    continue
                ckpt_name, src = pair  # the whole dequantised tensor, under its plain name
            name = to_original_name(ckpt_name)
            target, part, expert = _route(name)
            if _dequantized_on_load(params, target, src):
                pair = pending.add(ckpt_name, sf.get_tensor(ckpt_name))
                if pair is None:
                    continue
                ckpt_name, src = pair
                target, part, expert = _route(to_original_name(ckpt_name))
            if target not in params:
                raise WeightLoadError(
                    f"unexpected tensor {ckpt_name!r} in checkpoint (no parameter {target!r})"
                    + _quantized_hint(model, target)
                )
            piece = part if expert is None else (expert, part)
            _claim(written, target, piece, ckpt_name)
            write, also = _writer(model, target, src)
            if also is not None:  # a quantising writer fills the layer's scales as well
                _claim(written, also, piece, ckpt_name)
            param, layout = params[target].data, layouts[target]
            if expert is not None:  # one expert's slice; its layout drops the expert dim
                if layout.dim < 1 or expert >= param.shape[0]:
                    raise WeightLoadError(f"unexpected tensor {ckpt_name!r}: no expert {expert}")
                param, layout = param[expert], ShardLayout(layout.dim - 1, layout.parts)
                part = part if len(layout.parts) > 1 else None
            elif part is not None and len(layout.parts) == 1:
                raise WeightLoadError(f"unexpected tensor {ckpt_name!r}: {target!r} is not fused")
            _read_into(param, layout, part, src, ckpt_name, stats, write)
    if packed.unpaired():
        raise WeightLoadError(f"MXFP4 tensors without their other half: {packed.unpaired()}")
    if pending.unpaired():
        raise WeightLoadError(f"FP8 tensors without their weight or scales: {pending.unpaired()}")
    _tie_lm_head(params, layouts, written)
    _check_complete(params, layouts, written)
    return stats


def _claim(written: dict[str, set], target: str, piece, ckpt_name: str) -> None:
    """Record that ``ckpt_name`` writes ``piece`` of parameter ``target``. A second writer (two
    layouts' names for one tensor, or a fused tensor and its parts) would make the result depend
    on file order."""
    done = written.setdefault(target, set())
    if piece in done or None in done or (piece is None and done):
        raise WeightLoadError(f"tensor {ckpt_name!r} writes {target!r} a second time")
    done.add(piece)


def _dtype_name(src) -> str:
    return src.get_dtype() if hasattr(src, "get_dtype") else ""


def _dequantized_on_load(params: dict[str, nn.Parameter], target: str, src) -> bool:
    """Whether a checkpoint tensor is half of an FP8 pair bound for a full-precision parameter:
    scales with no parameter of their own, or an FP8 weight for a parameter that is not FP8."""
    if target.endswith(fp8.SCALE_SUFFIX):
        return target not in params
    return (_dtype_name(src) in fp8.FP8_DTYPES and target in params
            and params[target].dtype != torch.float8_e4m3fn)


def _writer(model: nn.Module, target: str, src) -> tuple[Writer, str | None]:
    """How ``src`` is written into parameter ``target`` (copied, unless a quantised layer
    converts it) and the other parameter that writing fills (None: none)."""
    path, leaf = target.rsplit(".", 1)
    layer = model.get_submodule(path)
    if is_quantized(layer):
        converted = layer.quant.writer(layer, leaf, _dtype_name(src))
        if converted is not None:
            write, other = converted
            return write, f"{path}.{other}"
    return _copy, None


def _copy(param: torch.Tensor, dim: int, offset: int, piece: torch.Tensor) -> None:
    param.narrow(dim, offset, piece.shape[dim]).copy_(piece)


def _quantized_hint(model: nn.Module, target: str) -> str:
    """For a tensor a quantised layer has no parameter for: which ones it has."""
    path = target.rsplit(".", 1)[0]
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        return ""
    if not is_quantized(layer):
        return ""
    leaves = ", ".join(n for n, _ in layer.named_parameters(recurse=False))
    return (f": {path} is a quantised layer with parameters {leaves} (the checkpoint's weights "
            "are not in the format model_format or its quantization_config asks for)")


def _read_into(
    param: torch.Tensor,
    layout: ShardLayout,
    part: int | None,
    src,
    name: str,
    stats: LoadStats,
    write: Writer = _copy,
) -> None:
    """Write this rank's rows of checkpoint tensor ``src`` (a safetensors slice; all parts of
    ``layout`` with ``part`` None, else part ``part``) into ``param``, reading nothing else."""
    dim = layout.dim
    full = layout.full if part is None else layout.parts[part].full
    expected = (*param.shape[:dim], full, *param.shape[dim + 1 :])
    shape = tuple(src.get_shape())
    if shape != expected:
        raise WeightLoadError(f"tensor {name!r} has shape {shape}, expected {expected}")
    src_offset = dst = 0
    for i, p in enumerate(layout.parts):
        if (part is None or part == i) and p.size:
            a = src_offset + p.start
            piece = src[(slice(None),) * dim + (slice(a, a + p.size),)]
            write(param, dim, dst, piece)
            stats.bytes_read += piece.numel() * piece.element_size()
        if part is None:
            src_offset += p.full
        dst += p.size
    stats.tensors += 1


def _route(name: str) -> tuple[str, int | None, int | None]:
    """(parameter, part of a fused parameter or None, expert or None) that tensor ``name``
    fills."""
    m = _EXPERT.search(name)
    if m:
        leaf, part = _EXPERT_PARTS[m.group(2)]
        return f"{name[: m.start()]}.mlp.experts.{leaf}", part, int(m.group(1))
    for fused, part, shard in _STACKED:
        if part in name:
            return name.replace(part, fused), shard, None
    return name, None, None


def _part_name(param_name: str, shard: int) -> str:
    """The split tensor that fills row block ``shard`` of a fused parameter (for messages)."""
    for fused, part, i in _STACKED:
        if i == shard and fused in param_name:
            return param_name.replace(fused, part)
    return f"{param_name}[block {shard}]"


def _tie_lm_head(
    params: dict[str, nn.Parameter],
    layouts: dict[str, ShardLayout],
    written: dict[str, set],
) -> None:
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if head in params and head not in written and embed in written:
        if layouts[head] != layouts[embed]:  # split alike by construction, so a shard ties
            raise WeightLoadError("lm_head and embed_tokens are sharded differently: cannot tie")
        params[head].data.copy_(params[embed].data)  # tie only when the checkpoint has no lm_head
        written[head] = {None}


def _check_complete(
    params: dict[str, nn.Parameter],
    layouts: dict[str, ShardLayout],
    written: dict[str, set],
) -> None:
    for name in params:
        done = written.get(name, set())
        if None in done:
            continue
        n = len(layouts[name].parts)
        if any(isinstance(piece, tuple) for piece in done):  # experts written one by one
            experts = params[name].shape[0]
            missing = [
                f"{name}[expert {e}, part {i}]"
                for e in range(experts)
                for i in range(n)
                if (e, i) not in done
            ]
        else:
            missing = [name] if n == 1 else [_part_name(name, i) for i in range(n) if i not in done]
        if missing:
            raise WeightLoadError(
                f"the checkpoint has no tensor for {', '.join(map(repr, missing))} "
                f"(parameter {name!r})"
            )
