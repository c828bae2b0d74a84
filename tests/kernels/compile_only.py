"""A pytest plugin (``-p compile_only``) that compiles every Triton kernel the kernel tests
launch for a GPU that is not there: Hopper (sm_90) by default, ``VLMDEPLOY_COMPILE_TARGET=cuda:89``
for another. Each launch becomes a warm-up compile — Triton's front end, its GPU passes, PTX and
``ptxas`` — and nothing runs, so the tests' value checks fail and are not the point; compile
errors, which Triton's CPU interpreter never meets, are. The report (kernel → variants compiled,
errors) goes to ``VLMDEPLOY_COMPILE_REPORT`` as JSON.

``VLMDEPLOY_COMPILE_SELECT=ends`` keeps the first and the last case of each test function.
``VLMDEPLOY_COMPILE_SHARD=i/n`` keeps the test files of shard ``i`` of ``n`` (files dealt, most
cases first, to the shard with the fewest cases so far): ``n`` processes compile side by side.
Needs ``TRITON_INTERPRET=0`` (the kernels must be compiled functions, not interpreted ones).
"""

from __future__ import annotations

import collections
import json
import os
import traceback

import pytest
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

_ARCH = os.environ.get("VLMDEPLOY_COMPILE_TARGET", "cuda:90")
COMPILED: collections.Counter = collections.Counter()
ERRORS: dict[str, str] = {}


class _AbsentGpu:
    """Triton's driver interface, enough to compile: one device, stream 0, a fixed target."""

    def __init__(self, backend: str, arch: int):
        self.target = GPUTarget(backend, arch, 64 if backend == "cuda" else 32)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_benchmarker(self):
        raise RuntimeError("nothing runs when compiling only")


_backend, _arch = _ARCH.split(":")
driver.set_active(_AbsentGpu(_backend, int(_arch)))
_run, _compile = JITFunction.run, JITFunction._do_compile


def _warmup_run(self, *args, grid, warmup, **kwargs):
    return _run(self, *args, grid=grid, warmup=True, **kwargs)


def _recording_compile(self, *args, **kwargs):
    name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
    try:
        kernel = _compile(self, *args, **kwargs)
    except Exception as exc:
        ERRORS.setdefault(name, "".join(traceback.format_exception_only(type(exc), exc))[-2000:])
        raise
    COMPILED[name] += 1
    return kernel


JITFunction.run = _warmup_run
JITFunction._do_compile = _recording_compile


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("VLMDEPLOY_COMPILE_SELECT") == "ends":
        groups: dict[tuple, list[pytest.Item]] = {}
        for item in items:
            key = (str(item.path), getattr(item, "originalname", item.name))
            groups.setdefault(key, []).append(item)
        keep = {id(g[0]) for g in groups.values()} | {id(g[-1]) for g in groups.values()}
        items[:] = [item for item in items if id(item) in keep]
    if shard := os.environ.get("VLMDEPLOY_COMPILE_SHARD"):
        index, count = map(int, shard.split("/"))
        files = collections.Counter(str(item.path) for item in items)
        loads, owner = [0] * count, {}
        for path, n in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])):
            owner[path] = loads.index(min(loads))
            loads[owner[path]] += n
        items[:] = [item for item in items if owner[str(item.path)] == index]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    report = {"target": _ARCH, "compiled": dict(COMPILED), "errors": ERRORS}
    path = os.environ.get("VLMDEPLOY_COMPILE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\ncompiled for {_ARCH}: {dict(COMPILED)}\ncompile errors: {len(ERRORS)}")
    for name, message in ERRORS.items():
        print(f"--- {name}\n{message}")
