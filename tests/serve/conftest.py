"""Fixtures for the server tests.

* `fake` / `client`: the app around `FakePipeline` (a scripted test double), driven by FastAPI's
  TestClient; most protocol and validation tests use these.
* `serve_helpers.run_live(app)`: a real uvicorn on 127.0.0.1 (random free port) in a thread, for
  tests that need real sockets: streaming, client disconnects, header and body limits, `openai`.
* `tiny_checkpoint` / `real_pipe`: the real pipeline on a random-weight tiny InternVL3.5 checkpoint
  (CPU), loaded once per session, for the rows that exercise the real preprocessing path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_pipeline import FakePipeline
from fastapi.testclient import TestClient
from serve_helpers import REAL_SESSION_LEN, make_client


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def client(fake: FakePipeline) -> TestClient:
    return make_client(fake)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmdeploy.testing.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", fmt="original")


@pytest.fixture(scope="session")
def real_pipe(tiny_checkpoint: Path) -> Iterator[Any]:
    from vlmdeploy import PytorchEngineConfig, pipeline

    pipe = pipeline(str(tiny_checkpoint), backend_config=PytorchEngineConfig(
        device_type="cpu", session_len=REAL_SESSION_LEN))
    yield pipe
    pipe.close()
