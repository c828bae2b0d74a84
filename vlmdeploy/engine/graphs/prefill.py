"""Prefill steps of one sequence and a few hundred tokens replayed from CUDA graphs.

A lone request's prefill (an image request's prompt of a few hundred tokens, or the new part of a
chat turn whose prefix is cached) launches about 600 kernels for 36 layers. On a slow host that
takes longer than the GPU needs to run them, and it is on the critical path of the time to first
token. Each bucket of new-token counts gets one graph: the step's tokens are padded up to the
bucket, padding rows store their keys and values in the scratch block that no sequence owns, and
the attention kernel reads the real count and context length from the device, so one graph serves
every prefix length. Image rows reach the graph through a static buffer and a mask; the graph keeps
the logits of the last real token only.

On a machine without CUDA (``capture=False``) the same buffers run eagerly, which is how the CPU
tests check the padding and buffer handling.
"""

from __future__ import annotations

import torch

from vlmdeploy.engine.graphs.capture import capture_graphs
from vlmdeploy.engine.step_inputs import StepInputs
from vlmdeploy.engine.transfer import h2d, h2d_into
from vlmdeploy.layers.attention import AttentionMetadata, attention_context

# Token counts with a graph. Spacing grows with the count: padding wastes at most a few percent of
# a step whose GPU time is then larger than its launch time.
PREFILL_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


class PrefillGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        hidden_size: int,
        dtype: torch.dtype,
        max_blocks_per_seq: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        max_tokens: int | None = None,
        buckets: tuple[int, ...] = PREFILL_BUCKETS,
        capture: bool = True,
    ):
        """``max_tokens``: the most new tokens a step can hold (``max_prefill_token_num``). No
        bucket exceeds it or the longest context, which every bucket's warm-up fills."""
        self.model = model
        self.scratch_slot = scratch_block * block_size
        self.max_kv_len = max_blocks_per_seq * block_size
        limit = min(self.max_kv_len, max_tokens or self.max_kv_len)
        self.buckets = tuple(b for b in sorted(buckets) if b <= limit)
        n = self.buckets[-1] if self.buckets else 1
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.image_mask = torch.zeros(n, dtype=torch.bool, device=device)
        self.image_rows = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=device)
        self.kv_lens = torch.tensor([n], dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (1, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device
        )
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._real_rows = 0  # rows of slot_mapping that hold the last step's real slots
        if capture:
            self._capture_all()

    def can_run(self, num_tokens: int, num_blocks: int) -> bool:
        return (
            bool(self.buckets)
            and 1 < num_tokens <= self.buckets[-1]
            and num_blocks <= self.block_tables.shape[1]
        )

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            cu_seqlens_q=self.cu_seqlens,
            kv_lens=self.kv_lens,
            block_tables=self.block_tables,
            max_q_len=size,  # the grid; the kernel reads the real count from cu_seqlens
            max_kv_len=self.max_kv_len,
        )
        with attention_context(meta):
            x = self.model.embed(self.input_ids[:size], None, None)
            x = torch.where(self.image_mask[:size, None], self.image_rows[:size], x)
            hidden = self.model(x, self.positions[:size])
            return self.model.compute_logits(hidden.index_select(0, self.last))

    def _prepare(self, size: int) -> None:
        """Capture-time metadata for ``size``: the kernels must not see more new tokens (or
        context) than the rows they are given."""
        self.cu_seqlens[1] = size
        self.kv_lens[0] = size

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.graphs, self.outputs = capture_graphs(self.buckets, self._forward, self._prepare)

    @torch.inference_mode()
    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Logits (1, V) of the last new token of a one-sequence step (a view of the graph's
        output, valid until the next replay). Image rows are copied into the static buffer at the
        rows the sequence's mask sets. Nothing here waits for the GPU."""
        n = len(inputs.ids)
        size = next(b for b in self.buckets if b >= n)
        h2d_into(self.input_ids[:n], inputs.ids)
        h2d_into(self.positions[:n], inputs.positions)
        h2d_into(self.slot_mapping[:n], inputs.slots)
        if self._real_rows > n:  # padding rows must not write into blocks that sequences own
            self.slot_mapping[n : self._real_rows].fill_(self.scratch_slot)
        self._real_rows = n
        h2d_into(self.cu_seqlens, [0, n])
        h2d_into(self.kv_lens, inputs.kv_lens)
        table = inputs.block_tables[0]
        h2d_into(self.block_tables[0, : len(table)], table)
        h2d_into(self.last, [n - 1])
        image, image_mask = inputs.image_embeds[0], inputs.image_masks[0]
        if image is None or image_mask is None:
            self.image_mask[:n].fill_(False)
        else:
            dev = self.image_rows.device
            rows = torch.nonzero(image_mask).flatten()
            self.image_mask[:n].copy_(h2d(image_mask, torch.bool, dev))
            dev_rows = h2d(rows, torch.long, dev)
            self.image_rows.index_copy_(0, dev_rows, image.to(dev).to(self.image_rows.dtype))
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)
        graph.replay()
        return self.outputs[size]
