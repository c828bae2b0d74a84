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

The ops that write or read the cache take ``kv_quant``: a quantised cache (int8, int4, fp8; see
:mod:`vlmdeploy.kernels.kv_quant`) stores each head quantised and is read dequantised to the
activations' dtype, after which attention is that of an unquantised cache holding those values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_quant import KVQuant, dequantize_kv, is_quantized, quantize_kv


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
    kv_quant: KVQuant | None = None,
) -> None:
    """Write k/v (T, Hkv, D) into the caches at ``slot_mapping`` (T,); slots < 0 are skipped.
    With ``kv_quant`` the heads are quantised, their scales and zero points written beside."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if is_quantized(kv_quant):
        _store_quantized(k[keep], k_cache, kv_quant.k_scales_zeros, slots, kv_quant.policy)
        _store_quantized(v[keep], v_cache, kv_quant.v_scales_zeros, slots, kv_quant.policy)
        return
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _store_quantized(x: torch.Tensor, cache: torch.Tensor, scales_zeros: torch.Tensor | None,
                     slots: torch.Tensor, policy: int) -> None:
    meta_dtype = x.dtype if scales_zeros is None else scales_zeros.dtype
    codes, sz = quantize_kv(x, policy, meta_dtype)
    cache.view(-1, *cache.shape[2:])[slots] = codes
    if sz is not None:
        scales_zeros.view(-1, *scales_zeros.shape[2:])[slots] = sz


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
    kv_quant: KVQuant | None = None,
) -> torch.Tensor:
    """:func:`qk_norm_rope`, then :func:`store_kv` of the rotated k and of v; returns q."""
    q, k = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    store_kv(k, v, k_cache, v_cache, slot_mapping, kv_quant)
    return q


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: (length, Hkv, D)."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:n_blocks].long()]  # (n_blocks, block_size, Hkv, D)
    return blocks.flatten(0, 1)[:length]


def gather_heads(cache: torch.Tensor, scales_zeros: torch.Tensor | None, block_table: torch.Tensor,
                 length: int, policy: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`gather_kv` of a quantised cache, dequantised to ``dtype``: (length, Hkv, D)."""
    codes = gather_kv(cache, block_table, length)
    sz = None if scales_zeros is None else gather_kv(scales_zeros, block_table, length)
    return dequantize_kv(codes, sz, policy, dtype)


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
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    kv_quant: KVQuant | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries q (T, Hq, D) over each sequence's paged context.

    ``max_q_len``/``max_kv_len`` are host-side hints (known to the scheduler) that let a kernel pick
    its launch grid without reading device tensors; ``max_q_len == 1`` means a pure decode batch,
    and ``num_decode`` says that the first that many sequences have one new token each (a mixed
    batch's decode rows). The hints do not change the result.

    Query i of a sequence with q_len new tokens and kv_len context sits at position kv_len - q_len +
    i and sees keys 0..that position. GQA: query head h reads kv head h // (Hq // Hkv).

    GPT-OSS's two options (absent, the attention is the plain one above):

    * ``sinks`` (Hq,): a learned logit per query head that joins every row's softmax as one more
      key, unscaled, whose value is zero: it takes probability mass and adds nothing.
    * ``window``: sliding-window attention, a query at position p sees keys p - window + 1..p
      (the last ``window`` positions, itself included).

    ``kv_quant``: the caches are quantised (their values are read dequantised to q's dtype).
    """
    if sinks is not None or window is not None:
        return _paged_attention_sinks_window(q, k_cache, v_cache, cu_seqlens_q, kv_lens,
                                             block_tables, scale, sinks, window, kv_quant)
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    starts, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b in range(len(lens)):
        s, e, kv_len = starts[b], starts[b + 1], lens[b]
        if e == s:
            continue
        k, v = _context(k_cache, v_cache, block_tables[b], kv_len, kv_quant, q.dtype)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, kv_len, D)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[s:e].transpose(0, 1)  # (Hq, q_len, D)
        q_pos = torch.arange(kv_len - (e - s), kv_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def _paged_attention_sinks_window(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None,
    window: int | None,
    kv_quant: KVQuant | None = None,
) -> torch.Tensor:
    """:func:`paged_attention` with sinks and/or a window, written out in fp32."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    starts, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b in range(len(lens)):
        s, e, kv_len = starts[b], starts[b + 1], lens[b]
        if e == s:
            continue
        if is_quantized(kv_quant):
            k, v = _context(k_cache, v_cache, block_tables[b], kv_len, kv_quant, q.dtype)
        else:
            k = gather_kv(k_cache, block_tables[b], kv_len)
            v = gather_kv(v_cache, block_tables[b], kv_len)
        k = k.float().repeat_interleave(group, dim=1)
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale  # (Hq, q_len, kv_len)
        q_pos = torch.arange(kv_len - (e - s), kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(-1, e - s, 1)  # (Hq, q_len, 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = scores.softmax(dim=-1)[..., :kv_len]  # the sink's share is dropped
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def _context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, length: int,
             kv_quant: KVQuant | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached k and v (length, Hkv, D) in ``dtype``."""
    if not is_quantized(kv_quant):
        return (gather_kv(k_cache, block_table, length).to(dtype),
                gather_kv(v_cache, block_table, length).to(dtype))
    q = kv_quant
    return (gather_heads(k_cache, q.k_scales_zeros, block_table, length, q.policy, dtype),
            gather_heads(v_cache, q.v_scales_zeros, block_table, length, q.policy, dtype))


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
    kv_quant: KVQuant | None = None,
) -> torch.Tensor:
    """Attention of raw projections q/k/v: :func:`qk_norm_rope_store` (normalise and rotate q and
    k, store k and v), then :func:`paged_attention` of the rotated q."""
    q = qk_norm_rope_store(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache,
                           slot_mapping, kv_quant)
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                           max_q_len, max_kv_len, num_decode, kv_quant=kv_quant)



def moe_route(
    logits: torch.Tensor, top_k: int, renormalize: bool, topk_then_softmax: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's choice: router logits (T, E) → ``(weights (T, k) fp32, expert ids (T, k)
    int32)``. By default the ``top_k`` largest probabilities of an fp32 softmax over all E,
    rescaled to sum to one with ``renormalize`` (Qwen3-MoE's ``norm_topk_prob``). With
    ``topk_then_softmax`` (GPT-OSS's router) the ``top_k`` largest logits, weighted by an fp32
    softmax over those k alone (``renormalize`` has nothing left to do)."""
    if topk_then_softmax:
        top, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=torch.float32), ids.to(torch.int32)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert activation: ``gate = min(gate, limit)``, ``up = clamp(up, ±limit)``, then
    ``(up + 1) · (gate · σ(gate · alpha))``, each op in the inputs' dtype, in transformers'
    order (``GptOssExperts``), so the result is bitwise theirs."""

    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def moe_activation(
    gate_up: torch.Tensor, interleaved: bool = False, activation: ClampedSwiGLU | None = None
) -> torch.Tensor:
    """(n, 2I) gate-up projection → (n, I). ``interleaved``: gate j and up j are columns 2j and
    2j + 1 (GPT-OSS), else the I gate columns come first. ``activation``: SiLU-and-mul if None."""
    if interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up if activation is None else activation(gate, up)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    interleaved: bool = False,
    activation: ClampedSwiGLU | None = None,
) -> torch.Tensor:
    """Mixture of gated experts: ``y_t = Σ_j w_tj · (down_e(act(gate_up_e x_t)) + b_down_e)``
    over the experts ``e = topk_ids[t, j]`` each token chose, with ``gate_up_e x = W_e x +
    b_gate_up_e``.

    x (T, H); w_gate_up (E, 2I, H) and w_down (E, H, I), applied as ``F.linear`` (a checkpoint
    stored for ``x @ W`` passes ``W.transpose(1, 2)``); gate_up_bias (E, 2I) and down_bias (E, H)
    or None; topk_weights (T, k); topk_ids (T, k) → (T, H) in x's dtype. ``interleaved`` and
    ``activation``: see :func:`moe_activation` (Qwen3-MoE: neither, and no biases; GPT-OSS: all).
    Each expert's projections, bias adds and activation are rounded to x's dtype as when run
    apart; the weighted sum over the k choices (the combine) is taken in fp32 and rounded once.
    """
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()  # (T·k,) expert of each (token, choice) pair
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    y = x.new_empty(t * k, w_down.shape[1])  # (T·k, H) each pair's expert output
    start = 0
    for e, n in enumerate(counts):  # only the experts that have tokens are read
        if n:
            pairs = order[start : start + n]
            h = F.linear(x[pairs // k], w_gate_up[e])  # (n, 2I)
            if gate_up_bias is not None:
                h = h + gate_up_bias[e]
            out = F.linear(moe_activation(h, interleaved, activation), w_down[e])  # (n, H)
            y[pairs] = out if down_bias is None else out + down_bias[e]
            start += n
    out = (y.view(t, k, -1).float() * topk_weights.float()[..., None]).sum(1)  # combine
    return out.to(x.dtype)
