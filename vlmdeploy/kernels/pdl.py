"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step.

A kernel launched with ``launch_pdl=True`` may be scheduled while the kernel before it in the stream
is still running; it must call :func:`pdl_wait` before it reads anything an earlier kernel wrote or
writes anything an earlier kernel may still read. Work that touches neither (loading weights) can
come first. Right after the wait each kernel lets its own successor launch, so a chain of such
kernels overlaps every launch and ramp-up with the tail of the kernel before, which at batch 1 is a
large part of each few-microsecond kernel. Ordering stays transitive: a successor can only start
once every program of this kernel is past its wait, that is, once the kernel before has finished.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vlmdeploy import env


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """PDL on ``device``: a Hopper or newer GPU, compiled kernels (not Triton's interpreter), not
    turned off with ``VLMDEPLOY_PDL=0``."""
    return (device.type == "cuda" and env.pdl_allowed()
            and hasattr(tl.extra.cuda, "gdc_wait")  # Triton 3.3 and newer
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_args(enabled: bool) -> dict:
    """Launch arguments of a kernel with a ``PDL`` constexpr: ``launch_pdl`` only when on, since
    Triton releases without PDL reject the option."""
    return {"PDL": True, "launch_pdl": True} if enabled else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the kernel before to finish (and its writes to land), then let the next launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
