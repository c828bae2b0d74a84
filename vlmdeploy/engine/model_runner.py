"""The model runner owns the model, its KV cache and its CUDA graphs, and turns a scheduled batch
into logits.

At start-up it builds the model on the device, sizes the KV cache from what memory is left
(:mod:`vlmdeploy.engine.memory`), gives every attention layer its views of the cache, and on CUDA
captures its graphs. A step is packed once (:class:`StepInputs`) and run by exactly one path: a
decode graph (one new token per sequence), a prefill graph (one sequence's chunk of up to 1,024
tokens), or the eager forward (everything else: mixed, batched or long prefills, whose GPU time
hides their launch time).
"""

from __future__ import annotations

import torch

from vlmdeploy import kernels
from vlmdeploy.distributed import state
from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.engine.graphs import DecodeGraphs, PrefillGraphs, VisionGraphs
from vlmdeploy.engine.graphs.capture import release_graphs
from vlmdeploy.engine.memory import KVCache, allocate_kv_cache, bind_kv_cache, plan_num_blocks
from vlmdeploy.engine.observer import EngineObserver
from vlmdeploy.engine.scheduler import ScheduledBatch
from vlmdeploy.engine.step_inputs import StepInputs, pack
from vlmdeploy.engine.transfer import h2d, substitute
from vlmdeploy.layers.attention import AttentionMetadata, attention_context
from vlmdeploy.models.build import build_model
from vlmdeploy.vl.tiling import normalize_raw


class ModelRunner:
    def __init__(self, cfg: EngineConfig, observer: EngineObserver | None = None):
        observer = observer or EngineObserver()
        self.cfg, self.device, self.block_size = cfg, cfg.device, cfg.block_size
        with observer.stage("load"):
            self.model = build_model(
                cfg.model_path, cfg.model, cfg.dtype, cfg.device, cfg.load_format, cfg.weight_quant
            )
        self.num_blocks = state.agree_min(plan_num_blocks(self.model, cfg))  # every rank alike
        # The extra block (index num_blocks) is scratch space for padded CUDA-graph rows.
        self.scratch_block = self.num_blocks
        self.kv_cache: KVCache | None = allocate_kv_cache(cfg, self.num_blocks + 1)
        bind_kv_cache(self.model, self.kv_cache)
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.vision_graphs: VisionGraphs | None = None
        if cfg.use_cuda_graphs:
            self.capture_graphs(observer)

    def capture_graphs(self, observer: EngineObserver) -> None:
        """Decode and prefill graphs (only with the Triton kernels: the reference attention
        synchronises with the host), then the vision graphs, from the memory the KV cache left."""
        cfg = self.cfg
        if kernels.triton_ops_available():
            reserved = torch.cuda.memory_reserved(self.device)
            with observer.stage("llm_graphs"):
                self.decode_graphs = DecodeGraphs(
                    self.model,
                    cfg.max_batch_size,
                    cfg.max_blocks_per_seq,
                    self.scratch_block,
                    cfg.block_size,
                    cfg.session_len,
                    self.device,
                    sizes=cfg.cudagraph_capture_batch_sizes,
                )
                self.prefill_graphs = PrefillGraphs(
                    self.model,
                    cfg.model.text.hidden_size,
                    cfg.dtype,
                    cfg.max_blocks_per_seq,
                    self.scratch_block,
                    cfg.block_size,
                    self.device,
                    max_tokens=cfg.max_prefill_token_num,
                )
            grown = torch.cuda.memory_reserved(self.device) - reserved
            observer.startup["llm_graphs_mib"] = round(grown / 2**20)
        size = cfg.model.vision.image_size
        with observer.stage("vision_graphs"):
            self.vision_graphs = VisionGraphs(self.encode_raw, (size, size, 3), self.device)

    def release(self) -> None:
        """Give back every byte the runner holds, now: each graph's hold on its pool, the KV
        cache, and the weights, which move to the meta device, so that neither a reference cycle
        nor a stray reference to the module keeps any device memory."""
        for family in (self.decode_graphs, self.prefill_graphs, self.vision_graphs):
            if family is not None:
                release_graphs(family)
        self.decode_graphs = self.prefill_graphs = self.vision_graphs = None
        bind_kv_cache(self.model, None)
        self.kv_cache = None
        self.model.to_empty(device="meta")

    # ---- vision ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (tiles, 448, 448, 3), normalised here on the device, or normalised float32
        (tiles, 3, 448, 448) → (tiles, 256, H). Raw tiles of a count with a CUDA graph replay it."""
        if tiles.dtype == torch.uint8:  # a quarter of the bytes to copy; no host-side float pass
            if self.vision_graphs is not None:
                out = self.vision_graphs.replay(tiles)
                if out is not None:
                    return out
            if tiles.device.type != "cpu":  # a tensor-parallel rank's share, already here
                return self.encode_raw(tiles)
            return self.encode_raw(h2d(tiles, torch.uint8, self.device))
        return self.model.encode_images(tiles.to(self.device).to(self._vision_dtype))

    @torch.inference_mode()
    def encode_raw(self, tiles: torch.Tensor) -> torch.Tensor:
        """Raw uint8 tiles already on the device → (tiles, 256, H)."""
        return self.model.encode_images(normalize_raw(tiles).to(self._vision_dtype))

    @property
    def _vision_dtype(self) -> torch.dtype:
        return next(self.model.vision_model.parameters()).dtype

    # ---- language model --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        batch: ScheduledBatch,
        sample_rows: list[int],
        prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """One forward over the batch; the logits (len(sample_rows), V) of the last new token of
        the sequences at ``sample_rows``, or None when none samples (mid-prefill chunks still
        write their KV). Pending tokens come from ``prev_tokens`` on the device."""
        return self.forward_packed(self.pack(batch, sample_rows, prev_tokens))

    def pack(
        self, batch: ScheduledBatch, sample_rows: list[int], prev_tokens: torch.Tensor | None
    ) -> StepInputs:
        return pack(batch, sample_rows, prev_tokens, self.block_size, self.cfg.image_token_id)

    @torch.inference_mode()
    def forward_packed(self, inputs: StepInputs) -> torch.Tensor | None:
        """:meth:`forward` of a step already packed (how a tensor-parallel worker gets it)."""
        rows = inputs.sample_rows
        width = max(map(len, inputs.block_tables))
        graphs = self.decode_graphs
        if graphs is not None and inputs.is_decode and graphs.can_run(inputs.num_seqs, width):
            logits = graphs.replay(inputs)  # (n, V), every row
            if not rows:
                return None
            if len(rows) == len(inputs.ids):
                return logits
            return logits[h2d(rows, torch.long, self.device)]
        graphs = self.prefill_graphs
        if (
            graphs is not None
            and inputs.num_seqs == 1
            and inputs.pending is None
            and graphs.can_run(len(inputs.ids), width)
        ):
            logits = graphs.replay(inputs)  # (1, V)
            return logits if rows else None
        hidden = self.forward_eager(inputs)
        if not rows:
            return None
        last = inputs.last_rows
        if last == list(range(len(hidden))):  # a pure decode step: every row, in order
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[h2d(last, torch.long, self.device)])

    def forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        """Eager forward of a packed batch → hidden states (T, H)."""
        dev = self.device
        mask = image = None
        if inputs.has_images:
            spans = zip(inputs.cu_seqlens, inputs.cu_seqlens[1:])
            mask = torch.cat(
                [
                    m if m is not None else torch.zeros(b - a, dtype=torch.bool)
                    for m, (a, b) in zip(inputs.image_masks, spans)
                ]
            )
            mask = h2d(mask, torch.bool, dev)
            image = torch.cat([e for e in inputs.image_embeds if e is not None]).to(dev)
        input_ids = h2d(inputs.ids, torch.long, dev)
        substitute(input_ids, inputs.pending)
        x = self.model.embed(input_ids, image, mask)
        tables = inputs.block_tables
        width = max(map(len, tables))
        meta = AttentionMetadata(
            slot_mapping=h2d(inputs.slots, torch.long, dev),
            cu_seqlens_q=h2d(inputs.cu_seqlens, torch.int32, dev),
            kv_lens=h2d(inputs.kv_lens, torch.int32, dev),
            block_tables=h2d([t + [-1] * (width - len(t)) for t in tables], torch.int32, dev),
            max_q_len=inputs.max_q_len,
            max_kv_len=max(inputs.kv_lens),
            num_decode=inputs.num_decode,
        )
        with attention_context(meta):
            return self.model(x, h2d(inputs.positions, torch.long, dev))
