"""The quantised checkpoints of :mod:`tests.quant.checkpoints`, written once per session."""

from __future__ import annotations

import pytest

from tests.quant.checkpoints import write_quant_checkpoints


@pytest.fixture(scope="session")
def quant_ckpts(tmp_path_factory) -> dict[str, str]:
    return write_quant_checkpoints(tmp_path_factory.mktemp("quant"))
