"""Vision-encoder calls of a few tiles replayed from CUDA graphs, one per tile count.

An encoder call launches some 400 kernels (24 layers of norms, GEMMs, attention, activations) and
for one to a few tiles the host takes longer to launch them than the GPU to run them: a 448×448
request's time to first token is mostly launch time. Tile counts are few and shapes fixed (raw
uint8 tiles of 448×448×3 in, (tiles, 256, H) embeddings out), so each small count gets a graph with
its own static input buffer, captured at start-up after that count's eager warm-up. Larger calls run
eagerly: their GPU time hides their launch time.

On a machine without CUDA (``capture=False``) the same static buffers run eagerly, which is how the
CPU tests check the buffer handling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vlmdeploy.engine.graphs.capture import capture_graphs

logger = logging.getLogger("vlmdeploy")

GRAPH_TILE_COUNTS = tuple(range(1, 8))  # up to one 2×3 grid and its thumbnail


class VisionGraphs:
    def __init__(
        self,
        encode_raw: Callable[[torch.Tensor], torch.Tensor],
        tile_shape: tuple[int, ...],
        device: torch.device,
        counts: tuple[int, ...] = GRAPH_TILE_COUNTS,
        capture: bool = True,
    ):
        """``encode_raw``: uint8 tiles already on ``device`` → (tiles, 256, H) embeddings."""
        self.encode_raw = encode_raw
        self.inputs = {
            n: torch.zeros(n, *tile_shape, dtype=torch.uint8, device=device) for n in counts
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.graphs, self.outputs = capture_graphs(
            self.inputs, lambda n: self.encode_raw(self.inputs[n])
        )

    def replay(self, tiles: torch.Tensor) -> torch.Tensor | None:
        """Embeddings of raw uint8 ``tiles`` (host or device), or None when their count has no
        static buffer. The result is a tensor of its own (the graph's output buffer is reused by
        the next replay). Nothing here waits for the GPU."""
        static = self.inputs.get(len(tiles))
        if static is None:
            return None
        if tiles.device.type == "cpu" and static.device.type == "cuda":
            tiles = tiles.pin_memory()
        static.copy_(tiles, non_blocking=True)
        graph = self.graphs.get(len(tiles))
        if graph is None:
            return self.encode_raw(static).clone()
        graph.replay()
        return self.outputs[len(tiles)].clone()
