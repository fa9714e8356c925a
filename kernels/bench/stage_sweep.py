"""Time MS attention's stages (forward, dq, dk/dv) under several launch variants, side by side.

    python -m ctxlab.kernels.bench.stage_sweep --lengths 64K,128K,256K --setting paper \\
        --variants "base;whole_qk=true;whole_qk=true+fwd_stages=3" --out DIR

Per length (bf16 random inputs, B=1, 32 query heads, 8 kv heads, D=128, scope="head"): one
selection (``ms_select_torch``), then for each variant (``base``: the GPU launch config with
``--launch``'s fields, else '+'-joined ``LaunchConfig`` fields over that) each stage is run
once and checked against the first variant's result (relative L2 error of o, lse, dq, dk, dv;
a variant above ``--tol`` is reported as failed and not timed), then timed (CUDA-event
median). A variant whose launch needs more than the card has is reported with
``LaunchResourceError``'s message. TFLOP/s count every product a stage computes per query-key
pair (recomputation included): 2 matmuls forward, 3 for dq (scores, dP, dS K), 4 for dk/dv
(scores, dV, dP, dK); "bwd", the whole backward (dq fused into dk/dv or not), counts 5. Rows
go to ``<out>/<stem>.jsonl`` and ``.json``, the table to ``.md``, as each variant finishes, so
a run cut short keeps what it finished. ``--pick`` prints the launch settings of each sweep's
fastest variant, merged, for ``--launch``. On CPU (``--device cpu``) it runs the interpreter's
config on the tiny case: a smoke run of the harness, not a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..ms_attention import triton_impl
from ..ms_attention.torch_impl import ms_select_torch
from ..ms_attention.triton_impl import LaunchResourceError, sort_selection
from .cases import LENGTHS, SETTINGS, Case
from .ops import launch_fields, stage_opts
from .run import cuda_time, environment, inputs, rel_err

STAGES = ("fwd", "dq", "dkv", "bwd")
PRODUCTS = {"fwd": 2, "dq": 3, "dkv": 4, "bwd": 5}
"""Matmuls per query-key pair each stage computes (2*D flops each); for "bwd" (the whole
backward, ``ms_attn_bwd``: delta, dq and dk/dv, or dq fused into dk/dv) the 5 a backward needs
(scores, dP, dV, dK, dQ), as dense flash attention's backward is counted, whatever it recomputes."""


def parse_variants(spec: str) -> dict[str, dict]:
    """'base;KEY=VALUE+KEY=VALUE;...' -> {name: LaunchConfig overrides}; every field checked."""
    out = {}
    for item in (x.strip() for x in spec.split(";") if x.strip()):
        out[item] = {} if item == "base" else launch_fields(item)
    if not out:
        raise ValueError("no variants given")
    return out


def stage_runs(case: Case, q, k, v, do, idx_sorted, config) -> dict:
    """{stage: a function returning its outputs} under ``config``; o, lse and delta are the
    forward's of the same config; dk/dv go the way ``dkv_path`` picks for it."""
    opts = stage_opts(case, q.device)
    o, lse = triton_impl.ms_attn_fwd(q, k, v, idx_sorted, config=config, **opts)
    delta = triton_impl.bwd_preprocess(o, do)
    return {
        "fwd": lambda: triton_impl.ms_attn_fwd(q, k, v, idx_sorted, config=config, **opts),
        "dq": lambda: (triton_impl.bwd_dq(do, q, k, v, lse, delta, idx_sorted, config=config, **opts),),
        "dkv": lambda: triton_impl.bwd_dkv(
            do,
            q,
            k,
            v,
            lse,
            delta,
            idx_sorted,
            config=config,
            path=triton_impl.dkv_path(case.region, config, group=case.Hq // case.Hkv),
            **opts,
        ),
        "bwd": lambda: triton_impl.ms_attn_bwd(do, q, k, v, o, lse, idx_sorted, config=config, **opts),
    }


def sweep_case(case: Case, variants: dict[str, dict], stages, base_config, tol: float, seed: int,
               device: str, on_row) -> list[dict]:  # fmt: skip
    """Every variant's rows for one case (one row per variant, its stages inside)."""
    q, k, v, do = inputs(case, seed, device)
    with torch.no_grad():
        idx = ms_select_torch(
            q, k, region=case.region, budget=case.budget, merge=case.merge, scope=case.scope
        )
        idx_sorted = sort_selection(idx)
        reference = {}
        rows = []
        for name, overrides in variants.items():
            config = dataclasses.replace(base_config, **overrides)
            row = dict(case=case.name, L=case.L, setting=case.setting, pe=case.pe, variant=name, stages={})
            try:
                runs = stage_runs(case, q, k, v, do, idx_sorted, config)
                for stage in stages:
                    got = runs[stage]()
                    reference.setdefault(stage, got)  # the first variant's is the reference
                    errs = [rel_err(a, b) for a, b in zip(got, reference[stage])]
                    entry = dict(max_rel_err=max(errs))
                    if entry["max_rel_err"] > tol:
                        entry["status"] = "failed check"
                    else:
                        entry["ms"] = cuda_time(runs[stage])
                        flops = 2.0 * case.D * PRODUCTS[stage] * case.ms_pairs()
                        entry["tflops"] = flops / entry["ms"] / 1e9
                        entry["status"] = "ok"
                    row["stages"][stage] = entry
                    del got
                row["status"] = "ok"
            except LaunchResourceError as err:
                row["status"] = f"launch: {err}"
            except torch.cuda.OutOfMemoryError as err:
                row["status"] = f"out of memory: {str(err).splitlines()[0][:120]}"
            rows.append(row)
            on_row(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def pick(rows: list[dict]) -> str:
    """The variant of one sweep with the least time summed over its stages and lengths, among
    those checked and timed at every length the sweep reached ('base' if no other qualifies)."""
    lengths = {row["L"] for row in rows}
    totals: dict[str, list[float]] = {}
    for row in rows:
        entries = row["stages"].values()
        ok = row["status"] == "ok" and entries and all(e.get("status") == "ok" for e in entries)
        totals.setdefault(row["variant"], []).append(sum(e["ms"] for e in entries) if ok else float("nan"))
    scored = {name: sum(t) for name, t in totals.items() if len(t) == len(lengths) and sum(t) == sum(t)}
    return min(scored, key=scored.get) if scored else "base"


def picked_launch(paths: list[str]) -> str:
    """The '+'-joined launch settings of each sweep's pick, merged (sweeps over disjoint fields:
    one over forward and dq, one over dk/dv); '' when every pick is the base."""
    fields: dict = {}
    for path in paths:
        name = pick(json.loads(Path(path).read_text())["rows"])
        fields |= parse_variants(name)[name]
    return "+".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())


def markdown(meta: dict, rows: list[dict], stages) -> str:
    lines = [
        f"# MS attention stages by launch variant, {meta['card']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, Triton {meta['triton']}; base launch config: "
        f"`{json.dumps(meta['launch_config'], sort_keys=True)}`",
        "",
        "ms (TFLOP/s counting every product the stage computes); each checked against the first variant.",
        "",
        "| case | variant | " + " | ".join(stages) + " | sum |",
        "|---|---|" + "---|" * (len(stages) + 1),
    ]
    for row in rows:
        cells, total = [], 0.0
        for stage in stages:
            entry = row["stages"].get(stage)
            if entry is None or entry.get("status") != "ok":
                cells.append(entry["status"] if entry else row["status"][:60])
                total = float("nan")
            else:
                cells.append(f"{entry['ms']:.2f} ({entry['tflops']:.0f})")
                total += entry["ms"]
        lines.append(f"| {row['case']} | `{row['variant']}` | " + " | ".join(cells) + f" | {total:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64K,128K,256K", help=f"comma list of {sorted(LENGTHS)}")
    parser.add_argument("--setting", default="paper", choices=sorted(SETTINGS))
    parser.add_argument("--pe", default="pre", choices=("pre", "selected"))
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--stages", default="fwd,dq,dkv")
    parser.add_argument(
        "--variants", default="base", help="';'-separated: base, or '+'-joined LaunchConfig fields"
    )
    parser.add_argument(
        "--tol", type=float, default=2e-2, help="relative L2 error allowed against the first variant"
    )
    parser.add_argument("--out", default="kernels/bench/results")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--time-limit-s", type=float, default=1e9, help="start no new length after this many seconds"
    )
    parser.add_argument(
        "--launch", default="", help="the base: '+'-joined LaunchConfig fields over the GPU config"
    )
    parser.add_argument("--pick", default="", help="comma list of sweep JSON files: print the merged "
                        "launch settings of each one's fastest variant (for --launch) and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.pick:
        missing = [p for p in args.pick.split(",") if not Path(p).is_file()]
        if missing:
            parser.error(f"--pick: no file at {missing}")
        print(picked_launch(args.pick.split(",")))
        return
    try:
        variants = parse_variants(args.variants)
    except ValueError as err:
        parser.error(f"--variants: {err}")
    lengths = args.lengths.split(",")
    unknown = [x for x in lengths if x not in LENGTHS]
    if unknown:
        parser.error(f"--lengths: unknown {unknown} (known: {sorted(LENGTHS)})")
    stages = args.stages.split(",")
    if not stages or any(s not in STAGES for s in stages):
        parser.error(f"--stages: a comma list of {STAGES}, got {args.stages!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (use --device cpu for the interpreter's smoke run)")
    try:
        base_config = dataclasses.replace(triton_impl.default_config(torch.device(args.device)),
                                          **launch_fields(args.launch))  # fmt: skip
    except ValueError as err:
        parser.error(f"--launch: {err}")
    for name, overrides in variants.items():  # every variant a valid config before any work
        try:
            dataclasses.replace(base_config, **overrides)
        except (TypeError, ValueError) as err:
            parser.error(f"--variants {name!r}: {err}")
    meta = environment(args.device)
    meta["launch_config"] = dataclasses.asdict(base_config)
    card = "".join(ch if ch.isalnum() else "_" for ch in meta["card"])
    stem = args.stem or f"stage_sweep_{meta['date'][:10]}_{card}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{stem}.jsonl"
    jsonl.write_text("")
    rows: list[dict] = []

    def on_row(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / f"{stem}.md").write_text(markdown(meta, rows, stages))

    began = time.monotonic()
    for length in lengths:
        if time.monotonic() - began > args.time_limit_s:
            print(f"time limit: skipping {length} and later lengths", flush=True)
            break
        case = Case(f"{args.setting}-L{length}", LENGTHS[length], args.kv_heads, args.setting, pe=args.pe)
        if args.device != "cuda":  # the interpreter's smoke run: the CPU preset's small heads
            case = dataclasses.replace(case, Hq=2, Hkv=1, D=32)
        sweep_case(case, variants, stages, base_config, args.tol, args.seed, args.device, on_row)


if __name__ == "__main__":
    main()
