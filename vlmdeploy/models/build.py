"""Build an InternVL3.5 model on a device: from a checkpoint, or with seeded random weights, with
quantised linear layers where asked (:mod:`vlmdeploy.quant`) and the fast paths of
:mod:`vlmdeploy.models.fast_paths` applied."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import tp_rank
from vlmdeploy.models.fast_paths import apply_fast_paths
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import load_weights, param_layout
from vlmdeploy.quant.linear import is_quantized, quantize_linears
from vlmdeploy.quant.spec import WeightQuant


def build_model(
    model_path: str | Path,
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    quant: WeightQuant | None = None,
) -> InternVLForCausalLM:
    """Construct this rank's shard (:mod:`vlmdeploy.distributed.state`) on the meta device (no
    wasted init), give the language model's projections ``quant``'s parameters there, materialise
    on ``device``, fill from the checkpoint — or, with ``load_format='dummy'``, with seeded random
    weights made on the device (for sizes too large to write to disk; only config.json and the
    tokenizer are read) — then rewire it for speed (:func:`apply_fast_paths`), which leaves its
    parameters as they are."""
    with torch.device("meta"):
        model = InternVLForCausalLM(model_cfg)
    model = model.to(dtype)  # before quantising: the quantised parameters keep their own dtypes
    if quant is not None:
        quantize_linears(model.language_model, quant)
    model = model.to_empty(device=device)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, model_path, progress=True)
    return apply_fast_paths(model.eval())


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep activations finite in bf16: matrices ~ N(0, 0.02), norm weights 1,
    biases 0, layer scales 0.1.

    Under tensor parallelism each rank draws its shards from a stream of its own, so the shared
    stream, which fills the replicated parameters (the vision tower on every rank), stays the
    same on every rank. A quantised linear layer draws its full-precision weight where the
    unquantised layer's would be drawn, from the same stream, and quantises it: the same seed
    gives the same model in every ``model_format`` (up to the rounding of the format)."""
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    gen = torch.Generator(device).manual_seed(seed)
    shard_gen = torch.Generator(device).manual_seed(seed + 1 + tp_rank())
    seen = set()  # tied parameters are filled once, as named_parameters() lists them
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if is_quantized(module):
            sharded = any(lay.is_sharded for lay in module.shard_layouts.values())
            stream = shard_gen if sharded else gen
            w = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
            module.quant.quantize(module, w.normal_(0.0, 0.02, generator=stream))
            if module.bias is not None:
                module.bias.zero_()
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if leaf in ("ls1", "ls2"):
                p.fill_(0.1)
            elif leaf == "bias":
                p.zero_()
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                sharded = param_layout(model, prefix + leaf, p).is_sharded
                p.normal_(0.0, 0.02, generator=shard_gen if sharded else gen)
