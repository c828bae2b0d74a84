"""Capturing a family of CUDA graphs that share one memory pool."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graphs(
    sizes, forward: Callable[[int], torch.Tensor], prepare: Callable[[int], None] | None = None
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One CUDA graph of ``forward(size)`` per size, and its output. Largest first, in one memory
    pool, so the smaller graphs reuse the largest one's memory. Each size runs once eagerly before
    its capture (kernel selection, compilation and lazy set-up must not happen inside a capture),
    after ``prepare(size)`` has set the static inputs that size needs."""
    pool = torch.cuda.graph_pool_handle()
    graphs, outputs = {}, {}
    for size in sorted(sizes, reverse=True):
        if prepare is not None:
            prepare(size)
        forward(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, outputs


def release_graphs(family) -> None:
    """Free a graph family's memory now: each graph's hold on the shared pool, and the outputs
    that live in it. ``family`` is any object with ``graphs`` and ``outputs`` dicts."""
    for graph in family.graphs.values():
        graph.reset()
    family.graphs, family.outputs = {}, {}
