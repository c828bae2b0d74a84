"""What the driver (rank 0) tells the workers, as tensors: an op, then its plain-integer payload
over the control group (gloo, on the host), then its device tensors over the device group.

A step travels as one int64 vector (:func:`encode_step`) holding every host list of its
:class:`~vlmdeploy.engine.step_inputs.StepInputs`; its image embeddings, already on the driver's
device, follow as one (rows, H) broadcast. Nothing is pickled: a worker rebuilds the step from
integers (:func:`decode_step`) and runs exactly what the driver runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vlmdeploy.distributed.state import TPGroup
from vlmdeploy.engine.step_inputs import StepInputs

# Ops. The header is HEADER int64s: [op, payload length, op-specific values...].
STEP, ENCODE, STOP = 1, 2, 3
HEADER = 8


def send(group: TPGroup, op: int, payload: torch.Tensor | None = None, *extra: int) -> None:
    """Driver: broadcast an op with its int64 payload to every worker."""
    n = 0 if payload is None else payload.numel()
    header = torch.zeros(HEADER, dtype=torch.long)
    header[:2] = torch.tensor([op, n])
    if extra:
        header[2 : 2 + len(extra)] = torch.tensor(extra)
    dist.broadcast(header, 0, group=group.control_group)
    if n:
        dist.broadcast(payload, 0, group=group.control_group)


def receive(group: TPGroup) -> tuple[int, torch.Tensor | None, list[int]]:
    """Worker: the next op, its payload and its extra header values (blocks until one comes)."""
    header = torch.empty(HEADER, dtype=torch.long)
    dist.broadcast(header, 0, group=group.control_group)
    op, n, *extra = header.tolist()
    payload = None
    if n:
        payload = torch.empty(n, dtype=torch.long)
        dist.broadcast(payload, 0, group=group.control_group)
    return op, payload, extra


def broadcast_tensor(group: TPGroup, tensor: torch.Tensor) -> torch.Tensor:
    """Driver's ``tensor`` to every rank over the device group (workers pass a buffer of the
    shape and dtype it has)."""
    dist.broadcast(tensor, 0, group=group.device_group)
    return tensor


# ---- a step as integers --------------------------------------------------------------------------
def encode_step(inputs: StepInputs) -> torch.Tensor:
    """Layout: [B, T, sampled, pending, image rows], then ids, positions, slots (T each),
    cu_seqlens (B + 1), kv_lens (B), block-table lengths (B), the tables, the sampled sequences,
    the pending rows (destination, then source) and the packed rows that take image embeddings."""
    b, t = inputs.num_seqs, len(inputs.ids)
    dst, src = (inputs.pending[0], inputs.pending[1]) if inputs.pending else ([], [])
    image_rows = []
    for start, mask in zip(inputs.cu_seqlens, inputs.image_masks):
        if mask is not None:
            image_rows.extend((start + torch.nonzero(mask).flatten()).tolist())
    tables = inputs.block_tables
    parts = [
        [b, t, len(inputs.sample_rows), len(dst), len(image_rows)],
        inputs.ids, inputs.positions, inputs.slots, inputs.cu_seqlens, inputs.kv_lens,
        [len(x) for x in tables], [i for x in tables for i in x],
        inputs.sample_rows, dst, src, image_rows,
    ]  # fmt: skip
    return torch.tensor([v for part in parts for v in part], dtype=torch.long)


def image_row_count(payload: torch.Tensor) -> int:
    return int(payload[4])


def sampled_count(payload: torch.Tensor) -> int:
    return int(payload[2])


def decode_step(
    payload: torch.Tensor, image_embeds: torch.Tensor | None, prev_tokens: torch.Tensor | None
) -> StepInputs:
    """The driver's step from its :func:`encode_step` vector, with the step's image embeddings
    (every image row's, in order) and this rank's copy of the previous step's tokens."""
    values = payload.tolist()
    b, t, n_sample, n_pending, n_image = values[:5]
    pos = 5

    def take(n: int) -> list[int]:
        nonlocal pos
        pos += n
        return values[pos - n : pos]

    ids, positions, slots = take(t), take(t), take(t)
    cu, kv_lens, lens = take(b + 1), take(b), take(b)
    flat = take(sum(lens))
    tables, at = [], 0
    for n in lens:
        tables.append(flat[at : at + n])
        at += n
    sample_rows, dst, src = take(n_sample), take(n_pending), take(n_pending)
    image_rows = take(n_image)
    masks: list[torch.Tensor | None] = [None] * b
    embeds: list[torch.Tensor | None] = [None] * b
    if n_image:
        mask = torch.zeros(t, dtype=torch.bool)
        mask[image_rows] = True
        used = 0
        for i in range(b):
            seq_mask = mask[cu[i] : cu[i + 1]]
            count = int(seq_mask.sum())
            if count:
                masks[i], embeds[i] = seq_mask, image_embeds[used : used + count]
                used += count
    pending = (dst, src, prev_tokens) if dst else None
    return StepInputs(
        ids, positions, slots, cu, kv_lens, tables, embeds, masks, pending, sample_rows
    )
