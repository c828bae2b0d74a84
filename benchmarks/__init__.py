"""The benchmark suite: W1–W3 and chat2 (engine), S1 (serving), the kernels, and the results
history they append to (docs/results.csv). Run each as a module from the project root, e.g.
``python -m benchmarks.engine``; ``benchmarks/device_run.sh`` runs the suite in one device call."""
