"""Programmatic dependent launch switches: off on the CPU (Triton's interpreter has no grid
dependency control), and the ``launch_pdl`` option passed only when on (releases without PDL reject
it)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels.pdl import pdl_args, pdl_enabled  # noqa: E402


def test_pdl_off_on_cpu_and_args_only_when_on():
    assert pdl_enabled(torch.device("cpu")) is False
    assert pdl_args(False) == {"PDL": False}
    assert pdl_args(True) == {"PDL": True, "launch_pdl": True}
