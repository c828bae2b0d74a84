"""The KV cache: its layout, and how many blocks the engine gets.

Layout: one tensor ``(2, layers, blocks, block_size, kv_heads, head_dim)`` per rank, with that
rank's KV heads; each attention layer gets views of its k and v slices. Slot
``block * block_size + offset`` holds one token.

On CUDA, LMDeploy's meaning of ``cache_max_entry_count``: a fraction of the memory left once the
weights, the measured activation peak and room for the CUDA-graph pools are counted. The peak is
measured, not estimated: the largest vision batch and the largest prefill step run once on dummy
inputs. On the CPU there is nothing to measure: enough blocks for ``max_batch_size`` full sessions,
at most 4 GiB.
"""

from __future__ import annotations

import math

import torch

from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.layers.attention import AttentionMetadata, attention_context, attention_layers
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.vl.tiling import normalize_raw


def allocate_kv_cache(cfg: EngineConfig, num_blocks: int) -> torch.Tensor:
    t = cfg.model.text
    shape = (2, t.num_layers, num_blocks, cfg.block_size, cfg.kv_heads_per_rank, t.head_dim)
    return torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)


def bind_kv_cache(model: torch.nn.Module, kv: torch.Tensor | None) -> None:
    """Give every attention layer its views of ``kv`` (None: empty ones, so memory can go)."""
    for i, layer in enumerate(attention_layers(model)):
        if kv is None:
            layer.k_cache = layer.v_cache = torch.empty(0)
        else:
            layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]


def plan_num_blocks(model: InternVLForCausalLM, cfg: EngineConfig) -> int:
    if cfg.num_gpu_blocks:
        return cfg.num_gpu_blocks
    per_block = cfg.kv_bytes_per_block
    if cfg.device.type == "cpu":
        want = cfg.max_batch_size * cfg.max_blocks_per_seq
        return max(1, min(want, (4 << 30) // per_block))
    peak = activation_peak(model, cfg)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(cfg.device)
    reserve = peak + (cfg.graph_pool_reserve if cfg.use_cuda_graphs else 0)
    return max(1, int((free - reserve) * cfg.cache_max_entry_count) // per_block)


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
    return kv.numel() * kv.element_size()
