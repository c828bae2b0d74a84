"""MXFP4 expert weights (GPT-OSS's published checkpoints), dequantised on load.

A checkpoint may carry an expert matrix ``W`` of the model's layout (E, K, N) — ``gate_up_proj``
(E, H, 2I), ``down_proj`` (E, I, H) — as two tensors: ``<name>_blocks`` (E, N, K / 32, 16) uint8,
each byte two 4-bit e2m1 values (low nibble first) of a block of 32 along K, and
``<name>_scales`` (E, N, K / 32) uint8, each block's power-of-two scale with bias 127 (the OCP
microscaling format). :func:`dequantize` rebuilds ``W`` exactly (every value is an e2m1 value
times a power of two); the loader then reads it like any other tensor, so the model holds bf16 (or
fp32) experts. A kernel that reads MXFP4 directly (4.25 bits a weight instead of 16) is later
work.
"""

from __future__ import annotations

import torch

SUFFIXES = ("_blocks", "_scales")

# the 16 e2m1 values, indexed by their 4-bit code (sign bit 3)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``blocks`` (E, N, G, 16) uint8 and ``scales`` (E, N, G) uint8 → ``W`` (E, G·32, N) fp32."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                         f"{tuple(scales.shape)}")
    lut = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1)  # (E, N, G, 16, 2): low first
    values = lut[codes.long()].flatten(-2)  # (E, N, G, 32)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(1, 2).contiguous()  # (E, K, N)


class PackedExperts:
    """Pairs the ``_blocks`` and ``_scales`` tensors the loader meets, in any order and file."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, TensorSource] | None:
        """Take one half; once both halves of ``<base>`` are in, ``(base, its dequantised
        tensor)``, else None."""
        base, suffix = name[: -len("_blocks")], name[-len("_blocks"):]
        halves = self._pending.setdefault(base, {})
        if suffix in halves:
            raise ValueError(f"tensor {name!r} appears twice")
        halves[suffix] = tensor
        if len(halves) < 2:
            return None
        del self._pending[base]
        return base, TensorSource(dequantize(halves["_blocks"], halves["_scales"]))

    def unpaired(self) -> list[str]:
        return [base + next(iter(h)) for base, h in self._pending.items()]


class TensorSource:
    """A tensor in memory with the two methods of a safetensors slice the loader uses."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def get_dtype(self) -> str:
        return str(self.tensor.dtype).removeprefix("torch.")

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]
