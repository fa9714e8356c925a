"""Probe (session 12): how much of ``fwd_gather``'s forward is the gather, how much the kernel.

    python experiments/gpu/gather_probe.py OUT.json

For paper settings and (64, 64, 8) at 64K and 128K (B=1, 32 query / 8 kv heads, D=128, bf16):
the forward by index (the default), the forward with ``fwd_gather`` (gather included), and
``gather_selected`` alone, CUDA-event medians; the kernel on gathered rows is the difference.
"""

import dataclasses
import json
import sys

import torch

from ctxlab.kernels.bench.cases import LENGTHS, Case
from ctxlab.kernels.bench.ops import stage_opts
from ctxlab.kernels.bench.run import cuda_time, environment, inputs
from ctxlab.kernels.ms_attention import triton_impl
from ctxlab.kernels.ms_attention.torch_impl import ms_select_torch

rows = []
for setting in ("paper", "sparse"):
    for length in ("64K", "128K"):
        case = Case(f"{setting}-L{length}", LENGTHS[length], 8, setting)
        q, k, v, _ = inputs(case, 0, "cuda")
        idx = triton_impl.sort_selection(
            ms_select_torch(q, k, region=case.region, budget=case.budget, merge=case.merge, scope="head")
        )
        opts = stage_opts(case, q.device)
        base = triton_impl.GPU_CONFIG
        gather = dataclasses.replace(base, fwd_gather=True)
        row = dict(case=case.name)
        row["fwd_ms"] = cuda_time(lambda: triton_impl.ms_attn_fwd(q, k, v, idx, config=base, **opts))
        row["fwd_gather_ms"] = cuda_time(lambda: triton_impl.ms_attn_fwd(q, k, v, idx, config=gather, **opts))
        row["gather_ms"] = cuda_time(lambda: triton_impl.gather_selected(k, v, idx, case.region))
        row["kernel_on_gathered_ms"] = row["fwd_gather_ms"] - row["gather_ms"]
        ks, _ = triton_impl.gather_selected(k, v, idx, case.region)
        row["gathered_gib_each"] = ks.numel() * ks.element_size() / 2**30
        del ks
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, idx
        torch.cuda.empty_cache()
with open(sys.argv[1], "w") as f:
    json.dump(dict(meta=environment("cuda"), rows=rows), f, indent=1)
