"""CUDA graphs of the model runner: decode steps, one sequence's short prefill, small vision
encoder calls. Each class keeps its static buffers and runs the same code eagerly when not
captured (``capture=False``), which is how the CPU tests check padding and buffer handling."""

from vlmdeploy.engine.graphs.decode import DecodeGraphs
from vlmdeploy.engine.graphs.prefill import PrefillGraphs
from vlmdeploy.engine.graphs.vision import VisionGraphs

__all__ = ["DecodeGraphs", "PrefillGraphs", "VisionGraphs"]
