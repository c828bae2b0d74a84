"""What the engine tells about itself, in one object that the server's ``/metrics`` and the
benchmarks both read.

The engine thread writes; readers on other threads only read plain numbers, so no lock is needed.
Per-step records cost a few clock reads a step and are kept only while someone asks for them
(:meth:`EngineObserver.record_steps`), for timelines in the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class StepRecord:
    """One engine step (host clock, seconds)."""

    start: float
    launched: float  # the step's work is queued on the device (then the previous step is read)
    end: float
    num_decode: int  # sequences computing one token
    num_prefill_tokens: int  # tokens of the sequences computing more than one
    num_tiles: int  # tiles through the vision encoder
    num_waiting: int  # sequences left waiting after the schedule


class EngineObserver:
    def __init__(self) -> None:
        self.startup: dict[str, float] = {}  # seconds per start-up stage, MiB of graph pools
        self.steps = 0
        self.tiles_encoded = 0  # every tile through the vision encoder (the vision stage counts)
        self.records: list[StepRecord] | None = None  # kept only between record/take

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a start-up stage into ``startup[name + '_s']``."""
        t0 = time.perf_counter()
        yield
        self.startup[f"{name}_s"] = round(time.perf_counter() - t0, 2)

    def record_steps(self) -> None:
        """Start keeping a :class:`StepRecord` per step."""
        self.records = []

    def take_records(self) -> list[StepRecord]:
        """The records kept since :meth:`record_steps`; stops keeping them."""
        records, self.records = self.records or [], None
        return records

    def on_step(self, record: StepRecord | None) -> None:
        self.steps += 1
        if record is not None and self.records is not None:
            self.records.append(record)
