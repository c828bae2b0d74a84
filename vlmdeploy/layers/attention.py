"""Paged causal attention for the language model, and the scoped context that carries batch metadata
to it.

The model runner builds one :class:`AttentionMetadata` per forward and enters
:func:`attention_context`; every :class:`PagedAttention` layer reads it, writes the step's new
keys/values into its slice of the KV cache (which the runner injected as ``k_cache``/``v_cache``,
with ``kv_quant`` when the cache is quantised) and attends over each sequence's cached context.
Model code never sees scheduling concepts.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.kernels.kv_quant import KVQuant


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token, -1 = do not store
    cu_seqlens_q: (
        torch.Tensor
    )  # (B + 1,) int32: start of each sequence's new tokens in the packed batch
    kv_lens: torch.Tensor  # (B,) int32: context length of each sequence after this step
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with -1
    max_q_len: int
    max_kv_len: int
    num_decode: int = 0  # leading sequences with one new token each (decode rows of a mixed batch)


_CONTEXT: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar(
    "vlmdeploy_attention", default=None
)


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    token = _CONTEXT.set(meta)
    try:
        yield meta
    finally:
        _CONTEXT.reset(token)


def current_metadata() -> AttentionMetadata:
    meta = _CONTEXT.get()
    if meta is None:
        raise RuntimeError("paged attention called outside attention_context()")
    return meta


class PagedAttention(nn.Module):
    """Stores k/v of the new tokens, then attends q over the paged context. q: (T, Hq, D), k/v: (T,
    Hkv, D). With ``window`` (GPT-OSS's sliding layers) each query sees its last ``window`` keys."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.window = window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.kv_quant: KVQuant | None = None  # the cache's format when quantised

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        norm_rope: tuple | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With ``norm_rope`` = ``(q_weight, k_weight, cos, sin, eps)``, q and k are raw
        projections, normalised per head and rotated (:func:`kernels.qk_norm_rope`) in the same
        launches that store k and v (and, for a decode batch, attend). ``sinks`` (Hq,): a sink
        logit per head (GPT-OSS; :func:`kernels.paged_attention`)."""
        meta = current_metadata()
        layout = (meta.cu_seqlens_q, meta.kv_lens, meta.block_tables, self.scale)
        hints = dict(
            max_q_len=meta.max_q_len, max_kv_len=meta.max_kv_len, num_decode=meta.num_decode,
            kv_quant=self.kv_quant,
        )
        if norm_rope is not None:
            return kernels.paged_attention_norm_rope(
                q, k, v, *norm_rope, self.k_cache, self.v_cache, meta.slot_mapping, *layout, **hints
            )
        kernels.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.kv_quant)
        if sinks is not None or self.window is not None:
            hints.update(sinks=sinks, window=self.window)
        return kernels.paged_attention(q, self.k_cache, self.v_cache, *layout, **hints)


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    """The model's attention layers in order: layer i reads and writes slice i of the KV cache."""
    return [m for m in model.modules() if isinstance(m, PagedAttention)]
