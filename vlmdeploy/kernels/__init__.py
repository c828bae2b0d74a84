"""Fused ops with one entry point each: a Triton kernel on CUDA tensors, the PyTorch reference
otherwise.

The reference implementations in :mod:`vlmdeploy.kernels.reference` (those of the quantised-weight
GEMMs in :mod:`vlmdeploy.kernels.quant_reference`) define the semantics. Triton
kernels register themselves in ``_TRITON`` (see :func:`_triton_impl`); setting
``VLMDEPLOY_KERNELS=reference`` forces the reference path everywhere (used to compare the two on the
GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vlmdeploy import env

from . import quant_reference, reference

_TRITON: dict[str, Callable] = {}
_LOADED = False


def _triton_impl(name: str, x: torch.Tensor) -> Callable | None:
    global _LOADED
    if not x.is_cuda or env.reference_kernels():
        return None
    if not _LOADED:
        _LOADED = True
        try:
            from . import triton_ops  # noqa: F401  (registers into _TRITON)
        except ImportError as exc:  # the slow path stays correct, but say so
            logging.getLogger("vlmdeploy").warning(
                "Triton kernels unavailable (%s): using the PyTorch reference ops, without "
                "CUDA graphs",
                exc,
            )
    return _TRITON.get(name)


def triton_ops_available() -> bool:
    """Whether the Triton kernels are importable and enabled (CUDA machines)."""
    return _triton_impl("paged_attention", torch.empty(0, device="cuda")) is not None


def _dispatch(name: str, semantics=reference) -> Callable:
    ref = getattr(semantics, name)

    def op(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        impl = _triton_impl(name, first)
        return (impl or ref)(*args, **kwargs)

    op.__name__ = name
    op.__doc__ = ref.__doc__
    return op


rms_norm = _dispatch("rms_norm")
scaled_add_norm = _dispatch("scaled_add_norm")
silu_and_mul = _dispatch("silu_and_mul")
qk_norm_rope = _dispatch("qk_norm_rope")
qk_norm_rope_store = _dispatch("qk_norm_rope_store")
store_kv = _dispatch("store_kv")
paged_attention = _dispatch("paged_attention")
paged_attention_norm_rope = _dispatch("paged_attention_norm_rope")
linear_row = _dispatch("linear_row")
rope_cos_sin = reference.rope_cos_sin
fused_moe = _dispatch("fused_moe")
moe_route = _dispatch("moe_route")
fp8_linear = _dispatch("fp8_linear", quant_reference)
w4a16_linear = _dispatch("w4a16_linear", quant_reference)
