"""How the language model splits over ``tp`` tensor-parallel ranks, and whether it can.

Attention splits by heads: each rank takes ``num_heads / tp`` query heads. Key/value heads split
evenly while there are at least ``tp`` of them; with fewer, each is replicated on ``tp /
num_kv_heads`` ranks, and rank ``r`` takes KV head ``r * num_kv_heads // tp``, the one its query
heads share under grouped-query attention. The MLP splits the intermediate width (every expert of
a mixture-of-experts MLP its own), the vocabulary is padded up to a multiple of ``tp``. The vision
tower, the projector and the experts' router are replicated.

The engine calls :func:`check_tensor_parallel` before it loads a weight, and sizes each rank's KV
cache with :func:`local_kv_heads`.
"""

from __future__ import annotations

from vlmdeploy.config import ModelConfig, TextConfig
from vlmdeploy.layers.linear import Shard


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError, saying why, when the model cannot be split over ``tp`` ranks."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallelism must be a whole number >= 1, got {tp!r}")
    check_text(cfg.text, tp)


def check_text(t: TextConfig, tp: int) -> None:
    """The language model's part of :func:`check_tensor_parallel`."""
    if t.num_heads % tp:
        raise ValueError(
            f"tp={tp} does not divide the language model's {t.num_heads} attention heads"
        )
    if t.intermediate_size % tp:
        raise ValueError(
            f"tp={tp} does not divide the language model's intermediate size {t.intermediate_size}"
        )
    if t.is_moe and t.moe_intermediate_size % tp:
        raise ValueError(
            f"tp={tp} does not divide the language model's expert intermediate size "
            f"{t.moe_intermediate_size} (each expert splits along it)"
        )
    kv = t.num_kv_heads
    if kv >= tp and kv % tp:
        raise ValueError(f"tp={tp} does not divide the language model's {kv} key/value heads")
    if kv < tp and tp % kv:
        raise ValueError(
            f"tp={tp} is not a multiple of the language model's {kv} key/value heads (with "
            "fewer key/value heads than ranks, each is replicated on tp / num_kv_heads ranks)"
        )


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """Key/value heads each rank holds (and caches): ``num_kv_heads / tp``, at least one."""
    return max(1, num_kv_heads // tp)


def first_kv_head(num_kv_heads: int, tp: int, rank: int) -> int:
    """The first key/value head of ``rank``."""
    if num_kv_heads >= tp:
        return rank * (num_kv_heads // tp)
    return rank * num_kv_heads // tp  # replicated: the head this rank's query heads share


def qkv_shards(cfg: TextConfig, tp: int, rank: int) -> list[Shard]:
    """This rank's rows of q_proj, k_proj and v_proj (the parts of the fused ``qkv_proj``)."""
    check_text(cfg, tp)  # a head must not straddle two ranks
    d, kv = cfg.head_dim, cfg.num_kv_heads
    q_rows = cfg.num_heads // tp * d
    kv_rows = local_kv_heads(kv, tp) * d
    kv_shard = Shard(kv * d, first_kv_head(kv, tp, rank) * d, kv_rows)
    return [Shard(cfg.num_heads * d, rank * q_rows, q_rows), kv_shard, kv_shard]
