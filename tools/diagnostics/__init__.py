"""Diagnostics that find where a run's time goes: GPU idle gaps, a step's kernels, the engine
thread's host time, a request's preparation and GIL time."""
