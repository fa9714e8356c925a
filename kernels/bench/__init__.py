"""Benchmarks of ctxlab's kernels: named cases, explicit FLOP counts, checked-then-timed runs.

``cases`` holds the registry (shape presets and MS settings) and the FLOP counts, ``ops`` the
implementations compared (dense SDPA, the paper's gather + SDPA, FlexAttention, ours),
``run`` the runner that checks each op against a reference before timing it and writes a
JSON and a Markdown result file (card, versions, date) under ``results/``.
"""
