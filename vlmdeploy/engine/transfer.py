"""Host ↔ device copies that never make the host wait for the GPU.

A copy from pageable host memory, or into it, is synchronous in PyTorch: it waits for every kernel
already queued on the stream. With the next step launched while the current one still runs, one
such copy would stall the launch behind the step in flight. These helpers go through pinned memory
with non-blocking copies instead (PyTorch's pinned-memory cache keeps each buffer alive until its
copy has run); on the CPU they are ordinary copies.
"""

from __future__ import annotations

import torch


def h2d(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list or a CPU tensor) as a tensor on ``device``, without waiting for it."""
    if device.type != "cuda":
        return torch.as_tensor(values, dtype=dtype, device=device)
    if isinstance(values, torch.Tensor):
        host = values.to(dtype).pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def h2d_into(dst: torch.Tensor, values) -> None:
    """Copy ``values`` (a list) into the device tensor ``dst`` (same length), without waiting."""
    pinned = dst.device.type == "cuda"
    dst.copy_(torch.tensor(values, dtype=dst.dtype, pin_memory=pinned), non_blocking=pinned)


def substitute(input_ids: torch.Tensor, subst) -> None:
    """Write the previous step's sampled tokens into ``input_ids`` on the device: ``subst`` is
    (destination rows, source rows, source tensor), or None."""
    if subst is None:
        return
    dst, src, tokens = subst
    if dst == src == list(range(len(dst))):  # steady decoding: the same rows in the same order
        input_ids[: len(dst)].copy_(tokens[: len(dst)])
    else:
        dev = input_ids.device
        input_ids[h2d(dst, torch.long, dev)] = tokens[h2d(src, torch.long, dev)]


class HostCopy:
    """A device tensor on its way to the host: the copy is queued now, :meth:`get` waits for it."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host
