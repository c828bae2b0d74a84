"""A stand-in grammar for tests: it allows a fixed set of tokens and has the interface the engine
and the sampler use of :class:`vlmdeploy.frontend.guided.Guide`."""

from __future__ import annotations

import torch


class AllowOnly:
    """Allows ``tokens`` at every step. ``on_compute`` runs at the start of each
    :meth:`compute_rows`, on the thread that computes the masks (tests replace it)."""

    on_compute = staticmethod(lambda: None)

    def __init__(self, tokens):
        self.tokens = frozenset(tokens)

    def fork(self) -> AllowOnly:
        return AllowOnly(self.tokens)

    def advance(self, token: int) -> bool:
        return token in self.tokens

    @staticmethod
    def compute_rows(guides: list[AllowOnly], bitmask: torch.Tensor, rows: list[int]) -> None:
        AllowOnly.on_compute()
        for guide, row in zip(guides, rows, strict=True):
            for t in guide.tokens:
                bit = (1 << (t % 32)) if t % 32 < 31 else -(1 << 31)  # bit 31 is the sign
                bitmask[row, t // 32] = int(bitmask[row, t // 32]) | bit

    @staticmethod
    def finish_rows(guides: list[AllowOnly], bitmask: torch.Tensor, rows: list[int]) -> None:
        pass
