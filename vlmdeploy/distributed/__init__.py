"""Tensor parallelism: the process's place in its group (:mod:`.state`), the collectives the
model layers call, and the executors that run one model runner per GPU."""
