"""Decode steps replayed from CUDA graphs, one per padded batch-size bucket.

A decode step launches hundreds of small kernels whose launch cost exceeds their run time at small
batch sizes; a graph replays them with one launch. Graphs need fixed shapes and addresses, so the
inputs live in static buffers sized for the largest bucket, a batch is padded up to the next bucket,
and the attention metadata is captured with ``max_kv_len = session_len`` (the decode kernel sizes
its work from each row's own length on the device). Padding rows decode one token against a scratch
KV block that no sequence owns, so they never touch real cache contents.

On a machine without CUDA (``capture=False``) the same buffers and padding run eagerly: that is how
the CPU tests check that padded replays give exactly the unpadded result.
"""

from __future__ import annotations

import torch

from vlmdeploy.engine.graphs.capture import capture_graphs
from vlmdeploy.engine.step_inputs import StepInputs
from vlmdeploy.engine.transfer import h2d_into, substitute
from vlmdeploy.layers.attention import AttentionMetadata, attention_context


def bucket_sizes(max_batch_size: int, sizes: list[int] | None = None) -> list[int]:
    """Batch sizes to capture: ``sizes`` when given (``cudagraph_capture_batch_sizes``), else
    1, 2, 4, 8 and multiples of 16; always capped by and including ``max_batch_size``."""
    sizes = sizes or [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 16))
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        block_size: int,
        max_kv_len: int,
        device: torch.device,
        capture: bool = True,
        sizes: list[int] | None = None,
    ):
        self.model = model
        self.buckets = bucket_sizes(max_batch_size, sizes)
        self.block_size, self.scratch_block, self.max_kv_len = block_size, scratch_block, max_kv_len
        n, w = self.buckets[-1], max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full(
            (n,), scratch_block * block_size, dtype=torch.long, device=device
        )
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)  # q_len 1 per row
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, w), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.block_tables.shape[1]

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            cu_seqlens_q=self.cu_seqlens[: bs + 1],
            kv_lens=self.kv_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_q_len=1,
            max_kv_len=self.max_kv_len,
        )
        with attention_context(meta):
            x = self.model.embed(self.input_ids[:bs], None, None)
            # The lm_head runs inside the graph too: one launch per decode step for everything.
            return self.model.compute_logits(self.model(x, self.positions[:bs]))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.graphs, self.outputs = capture_graphs(self.buckets, self._forward)

    @torch.inference_mode()
    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Logits (n, V) of a decode step of n sequences (a view of the graph's output buffer,
        valid until the next replay). Pending tokens are filled in on the device. Nothing here
        waits for the GPU."""
        n = len(inputs.ids)
        bs = next(b for b in self.buckets if b >= n)
        h2d_into(self.input_ids[:n], inputs.ids)
        substitute(self.input_ids, inputs.pending)
        h2d_into(self.positions[:n], inputs.positions)
        h2d_into(self.slot_mapping[:n], inputs.slots)
        h2d_into(self.kv_lens[:n], inputs.kv_lens)
        width = max(len(t) for t in inputs.block_tables)
        rows = [t + [self.scratch_block] * (width - len(t)) for t in inputs.block_tables]
        h2d_into(self.block_tables[:n, :width], rows)
        self._reset_padding(n, bs)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:n]
        return self._forward(bs)[:n]

    def _reset_padding(self, n: int, bs: int) -> None:
        # Rows n..bs were used by earlier, larger batches: point them back at the scratch block.
        if n == bs:  # no padding rows (batch 1, and every batch that fills its bucket)
            return
        self.input_ids[n:bs] = 0
        self.positions[n:bs] = 0
        self.slot_mapping[n:bs] = self.scratch_block * self.block_size
        self.kv_lens[n:bs] = 1
        self.block_tables[n:bs] = self.scratch_block
