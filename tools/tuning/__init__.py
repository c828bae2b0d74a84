"""Sweeps behind the kernels' launch configurations; rerun them on a new GPU."""
