"""Plain PyTorch reference implementations of every fused op the engine uses.

These run on any device and define the semantics that the Triton kernels must reproduce. The KV
cache of one layer is a pair of tensors of shape ``(num_blocks, block_size, num_kv_heads,
head_dim)``; a token's slot is
``block_id * block_size + offset`` and slot ``-1`` means "do not store".

Batches are packed ("varlen"): the new tokens of all sequences are concatenated, ``cu_seqlens_q`` (B
+ 1) marks where each sequence's new tokens start, ``kv_lens`` (B) is each sequence's total context
length after this step (cached + new), and ``block_tables`` (B, max_blocks) lists each sequence's KV
blocks, padded with -1. The new tokens of a sequence are the last ``q_len`` positions of its
context, so decode (q_len 1), a prefill chunk and a whole prompt are one case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(norm(x + residual) * weight, x + residual)``; fp32 statistics, result in x's dtype."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def scaled_add_norm(
    x: torch.Tensor,
    y: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual update with a layer scale, then the next norm: ``h = x + y * scale`` (one
    rounding, as ``torch.addcmul``; ``h = x`` without ``y``) and ``(h, norm(h))``. The norm is
    ``F.layer_norm(h, weight, bias, eps)``, or with ``rms`` :func:`rms_norm` (no bias)."""
    h = x if y is None else torch.addcmul(x, y, scale)
    if rms:
        return h, rms_norm(h, weight, eps)[0]
    return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate-up projection: ``silu(x[..., :d]) * x[..., d:]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_row(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with its neighbours fused, for a few rows (one-token decode):
    ``linear(x') + residual`` where ``x'`` is ``rms_norm(x) * norm_weight`` with ``norm_weight``,
    ``silu_and_mul(x)`` with ``silu_mul``, else ``x``. Each step is rounded as when run apart."""
    if norm_weight is not None and silu_mul:
        raise ValueError("linear_row fuses either the RMSNorm or the SiLU-and-mul, not both")
    if norm_weight is not None:
        x, _ = rms_norm(x, norm_weight, eps)
    elif silu_mul:
        x = silu_and_mul(x)
    y = F.linear(x, weight)
    return y if residual is None else y + residual


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (T, head_dim) for NeoX-style (rotate-half) RoPE, computed in fp32."""
    exponent = (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    )
    inv_freq = 1.0 / (theta**exponent)  # (head_dim / 2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos/sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q (T, Hq, D) and k (T, Hkv, D), then RoPE (Qwen3's order)."""
    q, _ = rms_norm(q, q_weight, eps)
    k, _ = rms_norm(k, k_weight, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v (T, Hkv, D) into the caches at ``slot_mapping`` (T,); slots < 0 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def qk_norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """:func:`qk_norm_rope`, then :func:`store_kv` of the rotated k and of v; returns q."""
    q, k = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: (length, Hkv, D)."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:n_blocks].long()]  # (n_blocks, block_size, Hkv, D)
    return blocks.flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    max_kv_len: int | None = None,
    num_decode: int = 0,
) -> torch.Tensor:
    """Causal attention of packed queries q (T, Hq, D) over each sequence's paged context.

    ``max_q_len``/``max_kv_len`` are host-side hints (known to the scheduler) that let a kernel pick
    its launch grid without reading device tensors; ``max_q_len == 1`` means a pure decode batch,
    and ``num_decode`` says that the first that many sequences have one new token each (a mixed
    batch's decode rows). The hints do not change the result.

    Query i of a sequence with q_len new tokens and kv_len context sits at position kv_len - q_len +
    i and sees keys 0..that position. GQA: query head h reads kv head h // (Hq // Hkv).
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    starts, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b in range(len(lens)):
        s, e, kv_len = starts[b], starts[b + 1], lens[b]
        if e == s:
            continue
        k = gather_kv(k_cache, block_tables[b], kv_len).to(q.dtype)
        v = gather_kv(v_cache, block_tables[b], kv_len).to(q.dtype)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, kv_len, D)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[s:e].transpose(0, 1)  # (Hq, q_len, D)
        q_pos = torch.arange(kv_len - (e - s), kv_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def paged_attention_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    max_kv_len: int | None = None,
    num_decode: int = 0,
) -> torch.Tensor:
    """Attention of raw projections q/k/v: :func:`qk_norm_rope_store` (normalise and rotate q and
    k, store k and v), then :func:`paged_attention` of the rotated q."""
    q = qk_norm_rope_store(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache,
                           slot_mapping)
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                           max_q_len, max_kv_len, num_decode)

