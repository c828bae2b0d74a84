"""The seam between the engine and the GPUs: an executor runs a step on every rank's model runner.

The engine (scheduler, block manager, prefix cache, sampling) runs once, in the engine process. It
calls four things of its executor: :meth:`~Executor.forward` (a scheduled batch → the logits of
the rows that sample), :meth:`~Executor.share_tokens` (the sampled tokens, which every rank's next
step reads on its own device), :meth:`~Executor.encode_images` and :meth:`~Executor.shutdown`.

* :class:`Executor` (tp=1): the one model runner, in process — the step is a method call.
* :class:`DistributedExecutor` (tp>1): rank 0 is the *driver*, a model runner in the engine
  process; ranks 1… are workers (:mod:`vlmdeploy.distributed.worker`) in processes of their own,
  started by a backend — :class:`~vlmdeploy.distributed.mp_executor.MultiprocExecutor` (spawned
  on this host) or :class:`~vlmdeploy.distributed.ray_executor.RayExecutor` (Ray actors on any
  host). Each step is described once by the driver (:mod:`vlmdeploy.distributed.wire`) and run by
  every rank at once; the model's all-reduces keep them in step.

The vision tower is replicated on every rank and each rank encodes its share of a batch's tiles
(:func:`encode_share`), the embeddings then all-gathered: InternViT-6B's 25 heads split over no
tensor-parallel size above 1, and the embeddings (256 × H per tile) cost less to gather than the
tower's activations would to reduce.
"""

from __future__ import annotations

import logging
import socket
import threading

import torch

from vlmdeploy.distributed import state, wire
from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.engine.model_runner import ModelRunner
from vlmdeploy.engine.observer import EngineObserver
from vlmdeploy.engine.scheduler import ScheduledBatch

logger = logging.getLogger("vlmdeploy")


class Executor:
    """tp=1: the model runner in this process."""

    distributed = False

    def __init__(self, cfg: EngineConfig, observer: EngineObserver):
        self.cfg = cfg
        self.runner = ModelRunner(cfg, observer)

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def forward(
        self, batch: ScheduledBatch, sample_rows: list[int], prev_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        return self.runner.forward(batch, sample_rows, prev_tokens)

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """The step's sampled tokens (on the device), for the ranks that did not sample."""

    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.runner.encode_images(tiles)

    def failure(self) -> str | None:
        """Why the executor cannot run steps any more (None while it can)."""
        return None

    def shutdown(self) -> None:
        """Give back every rank's memory and stop every worker."""
        self.runner.release()

    def kill(self) -> None:
        """Stop every worker now, whatever state it is in (the engine thread may be stuck)."""


def encode_share(runner: ModelRunner, tiles: torch.Tensor, group: state.TPGroup) -> torch.Tensor:
    """This rank's contiguous share of ``tiles`` through its encoder, then every rank's
    embeddings gathered in order: (tiles, 256, H) on every rank."""
    n, cfg = len(tiles), runner.cfg
    share = -(-n // group.size)
    mine = tiles[group.rank * share : (group.rank + 1) * share]
    out = torch.zeros(
        share, cfg.model.tokens_per_tile, cfg.model.text.hidden_size,
        dtype=cfg.dtype, device=cfg.device,
    )  # fmt: skip
    if len(mine):
        out[: len(mine)] = runner.encode_images(mine)
    return state.all_gather(out, dim=0)[:n]


def tile_buffer(cfg: EngineConfig, n: int, raw: bool) -> torch.Tensor:
    """Where a worker receives a batch of ``n`` tiles: raw uint8 (n, S, S, 3) or normalised
    float32 (n, 3, S, S)."""
    s = cfg.model.vision.image_size
    if raw:
        return torch.empty(n, s, s, 3, dtype=torch.uint8, device=cfg.device)
    return torch.empty(n, 3, s, s, dtype=torch.float32, device=cfg.device)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class DistributedExecutor(Executor):
    """tp>1: the driver's half. A backend starts the workers (:meth:`_start_workers`), tells
    whether they live (:meth:`_dead_worker`, polled by a monitor thread) and stops them
    (:meth:`_stop_workers`)."""

    distributed = True
    # How long workers get to finish their shutdown before they are killed.
    STOP_TIMEOUT_S = 30.0

    def __init__(self, cfg: EngineConfig, observer: EngineObserver):
        self.cfg = cfg
        self._failure: str | None = None
        self._closing = threading.Event()  # workers ending from now on are expected to
        self._shut = False
        host = self._driver_host()
        init_method = f"tcp://{host}:{free_port()}"
        self._start_workers(init_method)
        self._start(init_method, observer)
        self._monitor = threading.Thread(
            target=self._watch, name="vlmdeploy-tp-monitor", daemon=True
        )
        self._monitor.start()

    def _start(self, init_method: str, observer: EngineObserver) -> None:
        """Join the group and build the driver's runner, in step with every worker's. That runs
        on a thread of its own, watched from here: a worker that dies while starting would leave
        the driver waiting in the rendezvous or a collective for good."""
        error: list[BaseException] = []

        def start() -> None:
            try:
                self.group = state.init_group(0, self.cfg.tp, init_method, self.cfg.device)
                self.runner = ModelRunner(self.cfg, observer)
            except BaseException as exc:  # noqa: BLE001 — raised again on the caller's thread
                error.append(exc)

        thread = threading.Thread(target=start, name="vlmdeploy-tp-start", daemon=True)
        thread.start()
        while thread.is_alive():
            dead = self._dead_worker(0.2)
            if dead is not None:
                self.kill()
                thread.join(5.0)
                raise RuntimeError(f"a tensor-parallel worker failed while starting: {dead}")
        if error:
            self.kill()
            state.destroy_group()
            raise error[0]

    # ---- what a backend provides -----------------------------------------------------------------
    def _driver_host(self) -> str:
        return "127.0.0.1"

    def _start_workers(self, init_method: str) -> None:
        raise NotImplementedError

    def _dead_worker(self, timeout_s: float) -> str | None:
        """Wait up to ``timeout_s`` for a worker to end; a description of one that has, or
        None."""
        raise NotImplementedError

    def _stop_workers(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the workers to exit, then kill what is left."""
        raise NotImplementedError

    # ---- the step ---------------------------------------------------------------------------
    def forward(
        self, batch: ScheduledBatch, sample_rows: list[int], prev_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        self._check()
        inputs = self.runner.pack(batch, sample_rows, prev_tokens)
        wire.send(self.group, wire.STEP, wire.encode_step(inputs))
        if inputs.has_images:
            rows = torch.cat([e for e in inputs.image_embeds if e is not None])
            rows = rows.to(self.cfg.device, self.cfg.dtype).contiguous()
            wire.broadcast_tensor(self.group, rows)
        return self.runner.forward_packed(inputs)

    def share_tokens(self, tokens: torch.Tensor) -> None:
        wire.broadcast_tensor(self.group, tokens)

    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        self._check()
        raw = tiles.dtype == torch.uint8
        wire.send(self.group, wire.ENCODE, None, len(tiles), int(raw))
        buffer = tile_buffer(self.cfg, len(tiles), raw)
        buffer.copy_(tiles)
        wire.broadcast_tensor(self.group, buffer)
        return encode_share(self.runner, buffer, self.group)

    def _check(self) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)

    # ---- faults and shutdown ----------------------------------------------------------------
    def failure(self) -> str | None:
        return self._failure

    def _watch(self) -> None:
        """A worker that ends before shutdown breaks the engine: say so (the engine loop fails
        every request) and stop the others, so that no rank waits in a collective for it."""
        while not self._closing.is_set():
            dead = self._dead_worker(0.5)
            if dead is not None and not self._closing.is_set():
                self._failure = f"tensor-parallel worker failed: {dead}"
                logger.error("%s; stopping the other workers", self._failure)
                self.kill()
                return

    def shutdown(self) -> None:
        """Stop the workers (each releases its runner and leaves the group), then the driver."""
        if self._shut:
            return
        self._shut = True
        self._closing.set()
        if self._failure is None:
            try:
                wire.send(self.group, wire.STOP)
            except Exception:  # noqa: BLE001 — a worker already gone: it is killed below
                logger.warning("a worker did not take the stop message; killing the workers")
        self._stop_workers(self.STOP_TIMEOUT_S)
        self.runner.release()
        state.destroy_group()

    def kill(self) -> None:
        self._closing.set()
        self._stop_workers(0.0)


def make_executor(cfg: EngineConfig, observer: EngineObserver) -> Executor:
    """The executor ``cfg`` asks for; a tensor-parallel size the model or the host cannot take is
    an error here, before any weight is loaded or any process started."""
    if cfg.tp == 1:
        return Executor(cfg, observer)
    from vlmdeploy.models.tp_plan import check_tensor_parallel

    check_tensor_parallel(cfg.model, cfg.tp)
    if cfg.weight_quant is not None:  # FP8 blocks and AWQ groups must not straddle two ranks
        from vlmdeploy.quant.linear import check_quantized_split

        check_quantized_split(cfg.model.text, cfg.weight_quant, cfg.tp)
    if cfg.executor_backend == "ray":
        from vlmdeploy.distributed.ray_executor import RayExecutor

        return RayExecutor(cfg, observer)
    if cfg.device.type == "cuda":
        first, visible = cfg.device.index or 0, torch.cuda.device_count()
        if first + cfg.tp > visible:
            raise ValueError(
                f"tp={cfg.tp} needs {cfg.tp} GPUs from cuda:{first}, but {visible} are visible "
                "(CUDA_VISIBLE_DEVICES); for GPUs on several hosts use "
                "distributed_executor_backend='ray'"
            )
    from vlmdeploy.distributed.mp_executor import MultiprocExecutor

    return MultiprocExecutor(cfg, observer)
