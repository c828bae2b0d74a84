"""The KV cache: its layout, and how many blocks the engine gets.

Layout: one tensor ``(2, layers, blocks, block_size, kv_heads, width)`` per rank, with that
rank's KV heads; each attention layer gets views of its k and v slices. Slot
``block * block_size + offset`` holds one token. Unquantised, width is head_dim in the model's
dtype; a quantised cache (``quant_policy``, :mod:`vlmdeploy.kernels.kv_quant`) holds uint8 codes
(head_dim of them for int8, head_dim / 2 bytes for int4) or fp8 values, and for int8/int4 a second
tensor ``(2, layers, blocks, block_size, kv_heads, 2)`` of scales and zero points in the model's
dtype. Both are indexed by block, so a block (shared, cached, scratch) is one index into each.

On CUDA, LMDeploy's meaning of ``cache_max_entry_count``: a fraction of the memory left once the
weights, the measured activation peak and room for the CUDA-graph pools are counted. The peak is
measured, not estimated: the largest vision batch and the largest prefill step run once on dummy
inputs. On the CPU there is nothing to measure: enough blocks for ``max_batch_size`` full sessions,
at most 4 GiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.kernels import kv_quant
from vlmdeploy.kernels.kv_quant import KVQuant
from vlmdeploy.layers.attention import AttentionMetadata, attention_context, attention_layers
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.vl.tiling import normalize_raw


@dataclass
class KVCache:
    """One rank's KV cache: ``data`` (2, layers, blocks, block_size, kv_heads, width) and, for the
    integer policies, ``scales_zeros`` (2, layers, blocks, block_size, kv_heads, 2)."""

    data: torch.Tensor
    scales_zeros: torch.Tensor | None
    quant_policy: int

    @property
    def nbytes(self) -> int:
        sz = self.scales_zeros
        return self.data.nbytes + (0 if sz is None else sz.nbytes)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, KVQuant | None]:
        """Layer i's k and v caches and, when quantised, their format."""
        if self.quant_policy == kv_quant.NONE:
            return self.data[0, i], self.data[1, i], None
        k, v, sz = self.data[0, i], self.data[1, i], self.scales_zeros
        if sz is None:  # fp8: no scales
            return k, v, KVQuant(self.quant_policy)
        return k, v, KVQuant(self.quant_policy, sz[0, i], sz[1, i])


def allocate_kv_cache(cfg: EngineConfig, num_blocks: int) -> KVCache:
    t, policy = cfg.model.text, cfg.quant_policy
    heads = (2, t.num_layers, num_blocks, cfg.block_size, cfg.kv_heads_per_rank)
    data = torch.zeros(*heads, kv_quant.cache_width(policy, t.head_dim),
                       dtype=kv_quant.cache_dtype(policy, cfg.dtype), device=cfg.device)
    scales_zeros = None
    if kv_quant.has_scales(policy):
        scales_zeros = torch.zeros(*heads, 2, dtype=cfg.dtype, device=cfg.device)
    return KVCache(data, scales_zeros, policy)


def bind_kv_cache(model: torch.nn.Module, kv: KVCache | None) -> None:
    """Give every attention layer its views of ``kv`` (None: empty ones, so memory can go)."""
    for i, layer in enumerate(attention_layers(model)):
        if kv is None:
            layer.k_cache = layer.v_cache = torch.empty(0)
            layer.kv_quant = None
        else:
            layer.k_cache, layer.v_cache, layer.kv_quant = kv.layer(i)


def plan_num_blocks(model: InternVLForCausalLM, cfg: EngineConfig) -> int:
    if cfg.num_gpu_blocks:
        return cfg.num_gpu_blocks
    if cfg.device.type == "cpu":
        want = cfg.max_batch_size * cfg.max_blocks_per_seq
        return max(1, min(want, (4 << 30) // cfg.kv_bytes_per_block))
    peak = activation_peak(model, cfg)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(cfg.device)
    reserve = peak + (cfg.graph_pool_reserve if cfg.use_cuda_graphs else 0)
    return blocks_in(cfg, free - reserve)


def blocks_in(cfg: EngineConfig, available: int) -> int:
    """Blocks the cache gets out of ``available`` bytes: ``cache_max_entry_count`` of them, at
    the block size of its policy (so a quantised cache holds more tokens in the same share)."""
    return max(1, int(available * cfg.cache_max_entry_count) // cfg.kv_bytes_per_block)


def activation_peak(model: InternVLForCausalLM, cfg: EngineConfig) -> int:
    """Peak activation bytes of the largest vision batch and the largest prefill step, measured
    on their second run: the first also holds what the kernels' first use allocates once per
    process (autotuning's trial buffers among it), which the next engine in the same process
    would not count, and would get a larger cache than this one."""
    dev = cfg.device
    run_largest_step(model, cfg)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    kv_bytes = run_largest_step(model, cfg)
    torch.cuda.synchronize(dev)
    return max(0, torch.cuda.max_memory_allocated(dev) - base - kv_bytes)


@torch.inference_mode()
def run_largest_step(model: InternVLForCausalLM, cfg: EngineConfig) -> int:
    """One vision batch of ``max_vision_tiles`` tiles and one prefill of the largest step
    (``max_prefill_token_num`` prompt tokens + ``max_batch_size`` decodes) over a temporary KV
    cache; returns that cache's size (it is not an activation)."""
    dev = cfg.device
    size = cfg.model.vision.image_size
    tiles = torch.zeros(cfg.max_vision_tiles, size, size, 3, device=dev, dtype=torch.uint8)
    model.encode_images(normalize_raw(tiles).to(cfg.dtype))  # as ModelRunner.encode_images
    n = cfg.max_prefill_token_num + cfg.max_batch_size
    blocks = math.ceil(n / cfg.block_size)
    kv = allocate_kv_cache(cfg, blocks)
    bind_kv_cache(model, kv)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
        kv_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        max_q_len=n,
        max_kv_len=n,
    )
    ids = torch.zeros(n, dtype=torch.long, device=dev)
    with attention_context(meta):
        hidden = model(model.embed(ids, None, None), torch.arange(n, device=dev))
    model.compute_logits(hidden[-cfg.max_batch_size :])  # every decode row samples
    bind_kv_cache(model, None)  # drop the temporary cache so its memory can be given back
    return kv.nbytes
