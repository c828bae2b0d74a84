"""Quantised weights of the language model's linear layers: blocked FP8 (w8a8) and AWQ (w4a16).

* :mod:`~vlmdeploy.quant.spec`: which quantisation a model runs with, from the checkpoint's
  ``quantization_config`` and the user's ``model_format`` (no torch, so configs parse without it).
* :mod:`~vlmdeploy.quant.linear`: the transform that gives the attention and MLP projections their
  quantised parameters, and the method interface the two formats implement.
* :mod:`~vlmdeploy.quant.fp8`, :mod:`~vlmdeploy.quant.awq`: the formats — their parameters, how
  tensor-parallel shards cut them, how a full-precision weight is quantised.

The GEMMs themselves are kernels (:mod:`vlmdeploy.kernels.quant_reference` and its Triton twins).
"""
