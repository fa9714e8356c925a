"""Benchmarks of whole training steps (kernel benchmarks live in ctxlab.kernels.bench)."""
