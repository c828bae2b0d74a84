"""Build an InternVL3.5 model on a device: from a checkpoint, or with seeded random weights, with
the fast paths of :mod:`vlmdeploy.models.fast_paths` applied."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import tp_rank
from vlmdeploy.models.fast_paths import apply_fast_paths
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import load_weights, param_layout


def build_model(
    model_path: str | Path,
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
) -> InternVLForCausalLM:
    """Construct this rank's shard (:mod:`vlmdeploy.distributed.state`) on the meta device (no
    wasted init), materialise on ``device``, fill from the checkpoint — or, with
    ``load_format='dummy'``, with seeded random weights made on the device (for sizes too large
    to write to disk; only config.json and the tokenizer are read) — then rewire it for speed
    (:func:`apply_fast_paths`), which leaves its parameters as they are."""
    with torch.device("meta"):
        model = InternVLForCausalLM(model_cfg)
    model = model.to_empty(device=device).to(dtype)
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
    same on every rank."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    shard_gen = torch.Generator(device).manual_seed(seed + 1 + tp_rank())
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("ls1", "ls2"):
            p.fill_(0.1)
        elif leaf == "bias":
            p.zero_()
        elif p.dim() == 1:  # norm weights
            p.fill_(1.0)
        else:
            sharded = param_layout(model, name, p).is_sharded
            p.normal_(0.0, 0.02, generator=shard_gen if sharded else gen)
