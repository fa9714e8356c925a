"""One launch of an MS attention stage, for a profiler to catch (Nsight Compute).

    ncu --clock-control none --kernel-name regex:ms_attn_fwd --launch-skip 1 --launch-count 1 \\
        --set full -o OUT python3 experiments/gpu/profile_stage.py --setting paper --length 64K

Builds the benchmark's inputs for one case (B=1, 32 query / 8 kv heads, D=128, bf16, the
GPU launch config), selects, then runs ``--stage`` (fwd, dq, dkv, dkvdq: dk/dv with dq added
inside, as ``fused_dq`` does, or bwd: the whole backward as ``ms_attn_bwd`` runs it with the launch
config, e.g. the fused dq and the dq kernel that finishes it) twice: a warm-up that
compiles, which ``--launch-skip 1`` passes over, and the launch to profile. ``--setting prefix``
runs the same kernels over contiguous keys (dense causal), the comparison that splits MS's
selected-key cost from the kernels' own (kernels/README.md, session 12). ``--launch`` sets
LaunchConfig fields over the default (``region_constexpr=true``). On CPU (``--device
cpu``, the interpreter, the tiny case) it only checks that the stage runs.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ctxlab.kernels.bench.cases import LENGTHS, SETTINGS, Case
from ctxlab.kernels.bench.ops import launch_fields, stage_opts
from ctxlab.kernels.bench.run import inputs
from ctxlab.kernels.ms_attention import triton_impl
from ctxlab.kernels.ms_attention.torch_impl import ms_select_torch


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--setting", default="paper", choices=sorted(SETTINGS))
    parser.add_argument("--length", default="64K", choices=sorted(LENGTHS))
    parser.add_argument("--stage", default="fwd", choices=("fwd", "dq", "dkv", "dkvdq", "bwd"))
    parser.add_argument("--kv-heads", type=int, default=8, choices=(8, 32), help="of the 32 query heads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--launch", default="", help="'+'-joined LaunchConfig KEY=VALUE settings over the default"
    )
    args = parser.parse_args(argv)
    try:
        fields = launch_fields(args.launch)
    except ValueError as e:
        parser.error(f"--launch: {e}")
    case = Case(f"{args.setting}-L{args.length}", LENGTHS[args.length], args.kv_heads, args.setting)
    if args.device != "cuda":
        case = dataclasses.replace(case, Hq=2, Hkv=1, D=32)
    q, k, v, do = inputs(case, 0, args.device)
    idx = ms_select_torch(q, k, region=case.region, budget=case.budget, merge=case.merge, scope="head")
    idx_sorted = triton_impl.sort_selection(idx)
    opts = stage_opts(case, q.device)
    config = dataclasses.replace(triton_impl.default_config(q.device), **fields)
    o, lse = triton_impl.ms_attn_fwd(q, k, v, idx_sorted, config=config, **opts)
    delta = triton_impl.bwd_preprocess(o, do)
    path = triton_impl.dkv_path(case.region, config, group=case.Hq // case.Hkv)
    # dkvdq: bwd_dkv itself refuses the partial (deterministic) path, by name.
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if args.stage == "dkvdq" else None
    for _ in range(2):
        if args.stage == "fwd":
            triton_impl.ms_attn_fwd(q, k, v, idx_sorted, config=config, **opts)
        elif args.stage == "dq":
            triton_impl.bwd_dq(do, q, k, v, lse, delta, idx_sorted, config=config, **opts)
        elif args.stage == "bwd":
            triton_impl.ms_attn_bwd(do, q, k, v, o, lse, idx_sorted, config=config, **opts)
        else:
            triton_impl.bwd_dkv(
                do, q, k, v, lse, delta, idx_sorted, config=config, path=path, dq32=dq32, **opts
            )
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"profile_stage: {case.name} {args.stage} ran twice", flush=True)


if __name__ == "__main__":
    main()
