"""The floor of a batch-1 decode step: the time to read the weights it must read once each, at the
copy bandwidth measured on the same GPU.

A decode step of one sequence reads every tensor of the language model once, except two kinds:

* the token embedding table, of which it reads one row (the whole table when ``lm_head`` shares
  it, as tied checkpoints do: then it is read as ``lm_head``);
* the experts of a mixture-of-experts layer, of which it reads the ``top_k`` the token is routed to:
  every tensor of an ``experts`` module whose leading dimension is the expert count counts
  ``top_k / num_experts`` of its bytes.

The vision tower and its projector do not run in decode. The KV cache that attention reads is left
out (at W1's ~3,000-token context it is about 3% of the 8B shape's weights): the floor is the
weights' alone, as the MoE target (“within 1.4× of the time to read the active weights”) states it.
Quantised layers count the bytes they hold (4-bit words, scales), so the floor follows the format.
"""

from __future__ import annotations

import torch
from torch import nn


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(mod: nn.Module):
    return mod.parameters(recurse=False)  # the model keeps every weight (quantised too) as one


def decode_weight_bytes(language_model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step of ``language_model`` reads (see the module)."""
    experts: dict[int, tuple[int, int]] = {}  # id(experts module) -> (top_k, num_experts)
    for mod in language_model.modules():
        ex = getattr(mod, "experts", None)
        if isinstance(ex, nn.Module) and hasattr(mod, "top_k"):
            experts[id(ex)] = (int(mod.top_k), int(ex.num_experts))
    embeds = [m for m in language_model.modules() if isinstance(m, nn.Embedding)]
    embed_ids = {id(m.weight) for m in embeds}
    seen: set[int] = set()
    total = 0
    for mod in language_model.modules():
        owner = experts.get(id(mod))
        for t in _tensors(mod):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in embed_ids and not _shared_elsewhere(language_model, t):
                total += t.shape[-1] * t.element_size()  # one row
            elif owner is not None and t.dim() >= 1 and t.shape[0] == owner[1]:
                total += _bytes(t) * owner[0] // owner[1]
            else:
                total += _bytes(t)
    return total


def _shared_elsewhere(language_model: nn.Module, t: torch.Tensor) -> bool:
    """Whether a module other than an embedding holds ``t`` (a tied ``lm_head``)."""
    return any(
        not isinstance(m, nn.Embedding) and any(x is t for x in _tensors(m))
        for m in language_model.modules()
    )


def floor_report(language_model: nn.Module, bandwidth: float, tpot_ms: float) -> dict:
    """W1's decode step against its floor: bytes, bandwidth (GB/s, the DRAM traffic a copy
    achieves, read + write), floor (``bytes / bandwidth``, as benchmarks.kernels judges kernels)
    and ratio."""
    nbytes = decode_weight_bytes(language_model)
    floor_ms = nbytes / bandwidth * 1e3
    return {
        "decode_weight_gb": round(nbytes / 1e9, 3),
        "copy_gb_s": round(bandwidth / 1e9, 1),
        "tpot_floor_ms": round(floor_ms, 3),
        "tpot_over_floor": round(tpot_ms / floor_ms, 3),
    }
