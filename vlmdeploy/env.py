"""Every environment switch vlmdeploy reads, in one place.

Each is read when asked (not at import), so a test or a benchmark can flip it for one call.

============================  =======  =========================================================
variable                      default  meaning
============================  =======  =========================================================
``VLMDEPLOY_KERNELS``         triton   ``reference`` runs every fused op through its PyTorch
                                       reference, on the GPU too (to compare the two)
``VLMDEPLOY_PDL``             1        ``0`` launches decode kernels without programmatic
                                       dependent launch (Hopper and newer)
``VLMDEPLOY_FP8_GEMM``        triton   the GEMM of FP8 weights on the GPU: ``triton`` (this
                                       package's kernel) or ``scaled_mm`` (cuBLAS through
                                       ``torch._scaled_mm``, where it takes the shapes)
``VLMDEPLOY_STEP_TIMEOUT_S``  120      a step running longer counts as a hang: every request
                                       ends with an error and the engine reports itself dead
                                       (0 turns the watchdog off)
``VLMDEPLOY_MASK_THREADS``    1        threads of llguidance's pool, which computes a step's
                                       structured-output masks (in one call, beside the engine
                                       thread)
``TRITON_INTERPRET``          unset    ``1`` runs Triton kernels in Triton's CPU interpreter
                                       (tests); read by Triton itself, and here to keep PDL off
============================  =======  =========================================================
"""

from __future__ import annotations

import os


def reference_kernels() -> bool:
    """Fused ops run their PyTorch reference everywhere (``VLMDEPLOY_KERNELS=reference``)."""
    return os.environ.get("VLMDEPLOY_KERNELS", "triton") == "reference"


def pdl_allowed() -> bool:
    """Programmatic dependent launch is neither turned off nor impossible (Triton's interpreter)."""
    return os.environ.get("VLMDEPLOY_PDL", "1") != "0" and not triton_interpreted()


def fp8_gemm_backend() -> str:
    """``triton`` or ``scaled_mm``: which GEMM multiplies FP8 weights (``VLMDEPLOY_FP8_GEMM``)."""
    value = os.environ.get("VLMDEPLOY_FP8_GEMM", "triton")
    if value not in ("triton", "scaled_mm"):
        raise ValueError(f"VLMDEPLOY_FP8_GEMM={value!r}: expected 'triton' or 'scaled_mm'")
    return value


def step_timeout_s() -> float:
    """Seconds an engine step may run before the watchdog declares the engine hung."""
    return float(os.environ.get("VLMDEPLOY_STEP_TIMEOUT_S", "120"))


def mask_threads() -> int:
    """Threads of llguidance's pool for a step's guided masks (``VLMDEPLOY_MASK_THREADS``)."""
    value = os.environ.get("VLMDEPLOY_MASK_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"VLMDEPLOY_MASK_THREADS={value!r}: expected a thread count, 1 or more")
    return int(value)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
