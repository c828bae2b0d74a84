"""What the kernels' launch heuristics need to know about the device."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count; 4 for Triton's interpreter on the CPU, so that tiny tests
    still take the paths meant for a GPU with few programs per multiprocessor (split-K, say)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
