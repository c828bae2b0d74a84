"""This process's place in the tensor-parallel group, and the collectives the model calls.

A process of a tensor-parallel engine holds one rank. The model reads :func:`tp_rank` and
:func:`tp_size` while it is built (each layer then makes only its shard) and calls
:func:`all_reduce` / :func:`all_gather` in its forward; at ``tp_size() == 1`` both are the identity
and nothing of :mod:`torch.distributed` is touched, so the one-GPU path is exactly the old one.

Two groups over the same ranks: the *device* group (NCCL on CUDA, gloo on the CPU) carries the
model's collectives and the step's device tensors; the *control* group (always gloo, on the host)
carries the step descriptions from the driver (rank 0) to the workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device_group: object | None = None  # a torch.distributed process group, None at size 1
    control_group: object | None = None


_GROUP = TPGroup(0, 1)


def tp_group() -> TPGroup:
    return _GROUP


def tp_rank() -> int:
    return _GROUP.rank


def tp_size() -> int:
    return _GROUP.size


@contextlib.contextmanager
def use_group(group: TPGroup) -> Iterator[TPGroup]:
    """Make ``group`` this process's tensor-parallel group inside the block (tests build a
    rank's model under a chosen rank and size this way, without any collective)."""
    global _GROUP
    old, _GROUP = _GROUP, group
    try:
        yield group
    finally:
        _GROUP = old


def set_group(group: TPGroup) -> None:
    global _GROUP
    _GROUP = group


# Idle workers wait in a broadcast for the next step for as long as the engine is idle: the
# control group's timeout bounds nothing useful, so it is long. Faults are found by watching the
# processes, not by timeouts (vlmdeploy.distributed.executor).
CONTROL_TIMEOUT = timedelta(days=365)


def init_group(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """Join the ``size``-rank group at ``init_method`` (``tcp://host:port``) as ``rank`` and
    make it this process's group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group: close the other "
            "tensor-parallel pipeline first"
        )
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=CONTROL_TIMEOUT
    )
    device_group = dist.group.WORLD
    control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    group = TPGroup(rank, size, device_group, control_group)
    set_group(group)
    return group


def destroy_group() -> None:
    global _GROUP
    if _GROUP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = TPGroup(0, 1)


# ---- collectives the model calls -----------------------------------------------------------------
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place; returns it."""
    if _GROUP.size == 1:
        return x
    dist.all_reduce(x, group=_GROUP.device_group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along ``dim``, in rank order."""
    if _GROUP.size == 1:
        return x
    x = x.contiguous()
    # Gathered along dim 0 (gloo takes only that form; NCCL takes it too), then rearranged.
    out = torch.empty((_GROUP.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=_GROUP.device_group)
    return torch.cat(out.chunk(_GROUP.size, 0), dim=dim)


def agree_min(value: int) -> int:
    """The smallest ``value`` over the ranks (every rank must call it): the KV-cache size every
    rank can hold."""
    if _GROUP.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUP.control_group)
    return int(t.item())
