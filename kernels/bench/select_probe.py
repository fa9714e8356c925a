"""Time the fused Triton selection against ``ms_select_torch`` and check their agreement.

    python -m ctxlab.kernels.bench.select_probe --lengths 32K,128K --out DIR

Per case (bf16 random inputs, B=1, 32 query heads, D=128, scope="head"): the median
milliseconds of ``ms_select_torch`` (``torch_ms``: the sort-free default; ``torch_sort_ms``: the
stable-sort path, and whether the two gave identical indices, which they must) and of
``ms_select_triton`` under each launch variant (a variant starting ``shallow`` runs
``ms_select_shallow`` instead, and records how many items it sent to the full-depth kernel),
the fraction of blocks whose index rows are
identical to torch's and the mean overlap of the selected sets (float32 scores summed in
another order may swap near-tied regions). JSON lines go to
stdout and to ``<out>/select_probe.jsonl``; ``<out>/select_probe.md`` is rewritten after every
case from the whole JSONL file (``table``): milliseconds by variant and case, with the items
redone and whether every row equals torch's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..ms_attention import triton_impl
from ..ms_attention.torch_impl import ms_select_torch
from .cases import LENGTHS, SETTINGS
from .ops import launch_fields
from .run import cuda_time, selection_agreement


def probe(
    length: str, setting: str, kv_heads: int, select: str, variants: list[str], with_torch: bool
) -> dict:
    """One case: torch's and every variant's milliseconds, and their agreement."""
    w, T, m = SETTINGS[setting]
    L = LENGTHS[length]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, L, 32, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, L, kv_heads, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    opts = dict(region=w, budget=T, merge=m, pool="mean", scope="head", select=select)
    row = dict(length=length, setting=setting, kv=kv_heads, select=select)
    want = None
    with torch.no_grad():
        if with_torch:
            row["torch_ms"] = cuda_time(lambda: ms_select_torch(q, k, **opts), budget_ms=200, max_reps=5)
            row["torch_sort_ms"] = cuda_time(
                lambda: ms_select_torch(q, k, method="sort", **opts), budget_ms=200, max_reps=5
            )
            want = ms_select_torch(q, k, method="sort", **opts)
            row["torch_topk_equals_sort"] = torch.equal(ms_select_torch(q, k, **opts), want)
        for variant in variants:
            settings = "+".join(item for item in variant.split("+") if "=" in item)  # past the tag
            cfg = dataclasses.replace(triton_impl.GPU_CONFIG, **launch_fields(settings))
            shallow = variant.split("+")[0] == "shallow"

            def run(cfg=cfg, shallow=shallow):
                if shallow:
                    return triton_impl.select_shallow_counted(q, k, config=cfg, **opts)
                return triton_impl.ms_select_triton(q, k, config=cfg, **opts), None, None

            try:
                got, redone, retried = run()
                if shallow:
                    row[f"{variant}_redone"] = redone
                    row[f"{variant}_retried"] = retried
                row[f"{variant}_ms"] = cuda_time(run, budget_ms=300, max_reps=5)
                if want is not None:
                    row[f"{variant}_same_rows"], row[f"{variant}_overlap"] = selection_agreement(
                        got, want, -(-L // w)
                    )
            except Exception as err:  # noqa: BLE001 - a failing variant is reported
                row[f"{variant}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per variant (torch's two paths first), one column per case (length,
    setting, kv heads); a cell is the milliseconds, then "retried N" where the shallow retry
    (``shallow_retry_k``) took N items, "r N" where N items were redone by the full-depth kernel and
    "rows X" where fewer than all rows equal torch's (X the fraction), or the variant's error."""
    cases = [f"{r['length']} {r['setting']} kv{r['kv']}" for r in rows]
    variants: list[str] = []  # in the order the rows name them: "<variant>_ms" or "<variant>_error"
    for key in (key for r in rows for key in r):
        name = key.removesuffix("_ms").removesuffix("_error")
        if name != key and name not in variants:
            variants.append(name)
    lines = ["| variant | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for name in variants:
        cells = []
        for r in rows:
            if f"{name}_error" in r:
                cells.append("error: " + r[f"{name}_error"][:60])
                continue
            ms = r.get(f"{name}_ms")
            cell = "-" if ms is None else f"{ms:.2f}"
            if r.get(f"{name}_retried"):
                cell += f" (retried {r[f'{name}_retried']})"
            if r.get(f"{name}_redone"):
                cell += f" (r {r[f'{name}_redone']})"
            same = r.get(f"{name}_same_rows")
            if same is not None and same < 1.0:
                cell += f" (rows {same:.4f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="32K,128K")
    parser.add_argument("--settings", default="paper,sparse")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--select", default="paper")
    parser.add_argument(
        "--variants",
        default="base;select_precision=tf32x3;shallow;shallow+select_precision=tf32x3+shallow_rescore=true",
        help="';'-separated launch overrides, '+'-joined, e.g. select_rows=32+select_block_j=32",
    )
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out) / "select_probe.jsonl" if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    for length in args.lengths.split(","):
        for setting in args.settings.split(","):
            row = probe(length, setting, args.kv_heads, args.select, args.variants.split(";"), args.torch)
            line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(line, flush=True)
            if out:
                with out.open("a") as f:
                    f.write(line + "\n")
                rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
                out.with_suffix(".md").write_text(table(rows))
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
