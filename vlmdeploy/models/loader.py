"""Safetensors weight loading with the name mapping of all three InternVL layouts.

Checkpoint names are first rewritten to the original layout (the model's own parameter tree), then
split tensors are routed into fused parameters (q/k/v → ``qkv``/``qkv_proj``, gate/up →
``gate_up_proj``) by row block. Every parameter must be written exactly once in full: a missing,
unexpected, duplicated or misshapen tensor is an error naming it, so nothing is ever left silently
random. Only ``.safetensors`` files are read (a shard index may only name files beside it); no code
from the checkpoint runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

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


def iter_tensors(files: list[Path], progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="Loading weights", unit="shard")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _fused_sizes(model: nn.Module, param_name: str) -> list[int] | None:
    """Row split of a fused parameter, declared by its owning module in ``fused``; None if the
    parameter is not fused."""
    owner, leaf, _ = param_name.rsplit(".", 2)
    return getattr(model.get_submodule(owner), "fused", {}).get(leaf)


def _fused_rows(model: nn.Module, param_name: str, shard: int) -> tuple[int, int]:
    """Row range of ``shard`` inside a fused parameter."""
    sizes = _fused_sizes(model, param_name)
    start = sum(sizes[:shard])
    return start, start + sizes[shard]


def load_weights(model: nn.Module, model_path: str | Path, progress: bool = False) -> None:
    """Fill every parameter of ``model`` from the checkpoint; raise on anything missing, extra,
    written twice or misshapen."""
    params = dict(model.named_parameters())
    written: dict[str, set[int | None]] = {}  # parameter → shards written (None: the whole)
    files = safetensors_files(model_path)
    for ckpt_name, tensor in iter_tensors(files, progress and len(files) > 1):
        name = to_original_name(ckpt_name)
        target, shard = _route(name)
        if target not in params:
            raise WeightLoadError(
                f"unexpected tensor {ckpt_name!r} in checkpoint (no parameter {target!r})"
            )
        done = written.setdefault(target, set())
        # A second writer (two layouts' names for one tensor, or a fused tensor and its parts)
        # would make the result depend on file order.
        if shard in done or None in done or (shard is None and done):
            raise WeightLoadError(f"tensor {ckpt_name!r} writes {target!r} a second time")
        param = params[target]
        if shard is None:
            _copy(param.data, tensor, ckpt_name)
        elif _fused_sizes(model, target) is None:
            raise WeightLoadError(f"unexpected tensor {ckpt_name!r}: {target!r} is not fused")
        else:
            start, end = _fused_rows(model, target, shard)
            _copy(param.data[start:end], tensor, ckpt_name)
        done.add(shard)
    _tie_lm_head(params, written)
    _check_complete(model, params, written)


def _route(name: str) -> tuple[str, int | None]:
    for fused, part, shard in _STACKED:
        if part in name:
            return name.replace(part, fused), shard
    return name, None


def _part_name(param_name: str, shard: int) -> str:
    """The split tensor that fills row block ``shard`` of a fused parameter (for messages)."""
    for fused, part, i in _STACKED:
        if i == shard and fused in param_name:
            return param_name.replace(fused, part)
    return f"{param_name}[block {shard}]"


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise WeightLoadError(
            f"tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)


def _tie_lm_head(params: dict[str, nn.Parameter], written: dict[str, set[int | None]]) -> None:
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if head in params and head not in written and embed in written:
        params[head].data.copy_(params[embed].data)  # tie only when the checkpoint has no lm_head
        written[head] = {None}


def _check_complete(
    model: nn.Module, params: dict[str, nn.Parameter], written: dict[str, set[int | None]]
) -> None:
    for name in params:
        done = written.get(name, set())
        if None in done:
            continue
        sizes = _fused_sizes(model, name)
        missing = (
            [name]
            if sizes is None
            else [_part_name(name, i) for i in range(len(sizes)) if i not in done]
        )
        if missing:
            raise WeightLoadError(
                f"the checkpoint has no tensor for {', '.join(map(repr, missing))} "
                f"(parameter {name!r})"
            )
