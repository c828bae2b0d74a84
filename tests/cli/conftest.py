"""Fixtures for the CLI tests. The scripted FakePipeline test double lives with the server tests
(tests/serve/fake_pipeline.py) and is shared from there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmdeploy.testing.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-cli"), preset="tiny", fmt="original")
