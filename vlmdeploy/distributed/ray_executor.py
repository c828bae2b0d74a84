"""Workers as Ray actors, on any host of a Ray cluster (``distributed_executor_backend='ray'``).

The driver (rank 0) stays in the engine process; ranks 1… are actors placed by a placement group
of one bundle per rank (a GPU each on CUDA), packed onto as few hosts as the cluster allows. Ray
only places and starts the workers, and reports their end: each actor runs
:func:`~vlmdeploy.distributed.worker.run_worker` for its whole life, its arguments plain numbers
and the engine's JSON config, and the steps go over ``torch.distributed`` as on one host.

Connects to the running cluster (``ray start --head`` / ``RAY_ADDRESS``) when there is one, else
starts a local one. Ray is imported only here, only when chosen (``pip install 'vlmdeploy[ray]'``).
"""

from __future__ import annotations

import logging
import time

from vlmdeploy.distributed.executor import DistributedExecutor

logger = logging.getLogger("vlmdeploy")

# How long the cluster gets to find room for the workers' bundles.
PLACEMENT_TIMEOUT_S = 120.0


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray: pip install 'vlmdeploy[ray]'"
        ) from exc
    return ray


class _Worker:
    """The actor: one rank, for as long as the engine runs."""

    def run(self, rank: int, size: int, init_method: str, cfg_json: str) -> None:
        import logging as _logging

        from vlmdeploy.distributed.worker import run_worker

        _logging.basicConfig(level="WARNING")
        run_worker(rank, size, init_method, cfg_json, device_index=0)  # Ray masks the others


class RayExecutor(DistributedExecutor):
    def _driver_host(self) -> str:
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address="auto", logging_level=logging.WARNING)
            except ConnectionError:  # no cluster running: a local one
                ray.init(logging_level=logging.WARNING)
        return ray.util.get_node_ip_address()

    def _start_workers(self, init_method: str) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        gpu = cfg.device.type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.actors: list = []
        self.refs: list = []
        self.pg = placement_group([bundle] * (cfg.tp - 1), strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"the Ray cluster has no room for {cfg.tp - 1} worker(s) of {bundle} "
                f"(tp={cfg.tp}; rank 0 runs in this process): {ray.cluster_resources()}"
            )
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_Worker)
        for rank in range(1, cfg.tp):
            actor = actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank - 1
                ),
                name=None,
            ).remote()
            self.actors.append(actor)
            self.refs.append(actor.run.remote(rank, cfg.tp, init_method, cfg.to_json()))

    def _dead_worker(self, timeout_s: float) -> str | None:
        ray = _ray()
        done, _ = ray.wait(self.refs, num_returns=1, timeout=timeout_s)
        if not done:
            return None
        rank = self.refs.index(done[0]) + 1
        try:
            ray.get(done[0])
            return f"rank {rank} (Ray actor) ended"
        except Exception as exc:  # noqa: BLE001 — the reason it died is the message
            return f"rank {rank} (Ray actor) failed: {type(exc).__name__}: {exc}"

    def _stop_workers(self, timeout_s: float) -> None:
        if not self.actors:
            return
        ray = _ray()
        deadline = time.monotonic() + timeout_s
        if timeout_s:
            ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor)
        remaining = max(0.0, deadline - time.monotonic())
        ray.wait(self.refs, num_returns=len(self.refs), timeout=max(remaining, 5.0))
        ray.util.remove_placement_group(self.pg)
        self.actors = []
