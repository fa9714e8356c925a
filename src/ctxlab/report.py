"""A study's report: every arm's evaluations as tables with intervals, paired comparisons, plots.

``ctxlab-report <study run dir> [--experiment experiments/<study>.yaml]`` reads each arm's
``results/summary.json`` and its further evaluations (``results/eval_<name>/``), then writes into
``<dir>/report/``:

- ``tables.md``: perplexity against length (causal evaluations only) with 95% block-bootstrap
  intervals; passkey accuracy against length (correct/trials, Wilson 95% intervals); fit cost;
  the inference scale each arm chose on the validation split;
- ``comparisons.md``: the pairs the experiment file declares under ``study.report.comparisons``
  (``[A, B]`` by row label, ``arm`` or ``arm @eval``), at every length both measured: the paired
  bootstrap ratio ppl_A / ppl_B over the same scored blocks, and the difference of passkey
  accuracies with Newcombe's hybrid-score 95% interval;
- ``perplexity.png``, ``passkey_by_length.png``, ``passkey_heatmaps.png``;
- ``report.json``: everything above as data.

If ``<dir>/REPORT.md`` holds the markers ``<!-- tables:begin -->`` and ``<!-- tables:end -->``,
the text between them is replaced by the tables, so a hand-written report stays current.
Per-block NLLs come from ``perplexity_blocks.json`` or, for evaluations written before it
existed, from the evaluation's ``cells.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from ctxlab.compare import run_summaries
from ctxlab.eval.intervals import paired_bootstrap_ppl_ratio, wilson
from ctxlab.eval.passkey import accuracy_matrix, passkey_by_length
from ctxlab.eval.plots import plot_passkey, plot_passkey_by_length, plot_perplexity

BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"


def evaluations(root: Path) -> list[dict]:
    """Every evaluation of every arm under ``root/arms`` (or ``root`` itself if it is one run)."""
    runs = sorted(p.parent.parent for p in root.glob("arms/*/results/summary.json"))
    if not runs and (root / "results" / "summary.json").exists():
        runs = [root]
    if not runs:
        raise FileNotFoundError(f"no arms with results under {root}")
    return [s for run in runs for s in run_summaries(run)]


def blocks(ev: dict, length: int) -> tuple[list[float], list[int]] | None:
    """Per-block NLL sums and token counts of evaluation ``ev`` at ``length`` (None where not
    measured)."""
    folder = Path(ev["_results"])
    path = folder / "perplexity_blocks.json"
    if path.exists():
        for b in json.loads(path.read_text()):
            if b["length"] == length:
                return list(b["block_nll"]), list(b["block_tokens"])
        return None
    return blocks_from_cells(folder / "cells.jsonl", length, _block_tokens(folder))


def _block_tokens(folder: Path) -> int:
    run_results = folder if folder.name == "results" else folder.parent
    grid = run_results / "grid.json"
    if grid.exists():
        return int(json.loads(grid.read_text())["perplexity"].get("block_tokens", 256))
    return 256


def blocks_from_cells(path: Path, length: int, block_tokens: int) -> tuple[list[float], list[int]] | None:
    """Rebuild per-block NLLs from a cell store: the windows of ``length`` (of the store's last
    fingerprint), in document and position order, their pieces summed block by block (pieces never
    straddle a block, so a piece's first token says its block)."""
    if not path.exists():
        return None
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    lines = [x for x in lines if x["key"].startswith(f"ppl/L={length}/")]
    if not lines:
        return None
    fp = lines[-1]["fp"]
    cells = {}
    for x in lines:
        m = re.match(r"ppl/L=\d+/doc=(\d+)/begin=(\d+)/pieces=([\d+]+)/", x["key"])
        if x["fp"] == fp and m:
            cells[(int(m.group(1)), int(m.group(2)))] = (list(map(int, m.group(3).split("+"))), x["value"])
    nll: dict[int, float] = defaultdict(float)
    tokens: dict[int, int] = defaultdict(int)
    offset = 0
    for key in sorted(cells):
        sizes, values = cells[key]
        for n, v in zip(sizes, values):
            nll[offset // block_tokens] += v
            tokens[offset // block_tokens] += n
            offset += n
    order = sorted(nll)
    return [nll[i] for i in order], [tokens[i] for i in order]


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """Difference of two proportions p1 - p2 and Newcombe's hybrid-score 95% interval."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _fmt_ppl(r: dict) -> str:
    return f"{r['ppl']:.2f} [{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}]" if "ppl_lo" in r else f"{r['ppl']:.2f}"


def _fmt_pk(r: dict) -> str:
    return f"{r['correct']}/{r['trials']} [{r['lo']:.2f}, {r['hi']:.2f}]"


def tables(evs: list[dict]) -> str:
    ppl_lengths = sorted({r["length"] for e in evs for r in e.get("perplexity") or []})
    pk_lengths = sorted({r["length"] for e in evs for r in e.get("passkey") or []})
    train = next((e.get("train_length") for e in evs if e.get("train_length")), None)
    lines = [f"Training length {train} tokens. Intervals are 95%: perplexity by a bootstrap over blocks "
             "of scored tokens, passkey by Wilson's score interval over the trials of a length "
             "(pooled over depths).", "",
             "#### Perplexity against context length (causal evaluations only)", "",
             "| arm | eval attention | " + " | ".join(f"ppl@{n}" for n in ppl_lengths) + " |",
             "|---|---|" + "---|" * len(ppl_lengths)]  # fmt: skip
    for e in evs:
        rows = {r["length"]: r for r in e.get("perplexity") or []}
        if not rows:
            continue
        cells = [_fmt_ppl(rows[n]) if n in rows else "-" for n in ppl_lengths]
        lines.append(f"| {e['arm']} | {_eval_label(e)} | " + " | ".join(cells) + " |")
    skipped = [f"{e['name']}" for e in evs if e.get("perplexity_skipped")]
    if skipped:
        lines += ["", f"No perplexity for {', '.join(skipped)}: not causal."]
    lines += ["", "#### Passkey retrieval: correct/trials [95% interval]", "",
              "| arm | eval attention | " + " | ".join(f"{n}" for n in pk_lengths) + " |",
              "|---|---|" + "---|" * len(pk_lengths)]  # fmt: skip
    for e in evs:
        by = {r["length"]: r for r in passkey_by_length(e.get("passkey") or [])}
        if by:
            cells = [_fmt_pk(by[n]) if n in by else "-" for n in pk_lengths]
            lines.append(f"| {e['arm']} | {_eval_label(e)} | " + " | ".join(cells) + " |")
    lines += ["", "#### Fit and inference scale", "",
              "| arm | steps | train tokens | fit s | tokens/s | peak GiB | val ppl | scale (validation) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    seen = set()
    for e in evs:
        if e["arm"] in seen:
            continue
        seen.add(e["arm"])
        lines.append(_fit_row(e))
    return "\n".join(lines)


def _fit_row(e: dict) -> str:
    search = e.get("scale_search") or {}
    chosen = "-"
    if search:
        tried = ", ".join(f"{c['scale']:g}: {c['val_ppl']:.1f}" for c in search["candidates"])
        chosen = f"{search['setting']}={search['chosen']:g} (ppl@{search['length']}: {tried})"
    if e.get("val_ppl") is None:
        return f"| {e['arm']} | - | - | - | - | - | - | {chosen} |"
    keys = ("steps", "train_tokens", "fit_seconds", "tokens_per_s", "peak_mem_gib")
    cells = [e.get(k, "-") for k in keys]
    return f"| {e['arm']} | " + " | ".join(map(str, cells)) + f" | {e['val_ppl']:.2f} | {chosen} |"


def _eval_label(e: dict) -> str:
    ev = e.get("eval_attention") or "trained"
    return f"{ev} (causal)" if e.get("causal") else f"{ev} (NOT causal)"


def comparisons(evs: list[dict], pairs: list[list[str]]) -> tuple[str, list[dict]]:
    by_name = {e["name"]: e for e in evs}
    lines = ["| A | B | length | ppl A / ppl B [95%] | passkey A - B [95%] |", "|---|---|---|---|---|"]
    data = []
    for a_name, b_name in pairs:
        missing = [n for n in (a_name, b_name) if n not in by_name]
        if missing:
            lines.append(f"| {a_name} | {b_name} | - | not measured: {', '.join(missing)} | |")
            continue
        a, b = by_name[a_name], by_name[b_name]
        a_pk = {r["length"]: r for r in passkey_by_length(a.get("passkey") or [])}
        b_pk = {r["length"]: r for r in passkey_by_length(b.get("passkey") or [])}
        lengths = sorted({r["length"] for r in a.get("perplexity") or []} | set(a_pk))
        for n in lengths:
            row = {"a": a_name, "b": b_name, "length": n}
            ppl = "-"
            ab, bb = blocks(a, n), blocks(b, n)
            if ab and bb and ab[1] == bb[1]:
                ratio, lo, hi = paired_bootstrap_ppl_ratio(ab[0], bb[0], ab[1])
                row |= {"ppl_ratio": ratio, "ppl_ratio_lo": lo, "ppl_ratio_hi": hi}
                ppl = f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]"
            pk = "-"
            if n in a_pk and n in b_pk:
                pa, pb = a_pk[n], b_pk[n]
                d, lo, hi = newcombe(pa["correct"], pa["trials"], pb["correct"], pb["trials"])
                row |= {"passkey_diff": d, "passkey_diff_lo": lo, "passkey_diff_hi": hi}
                pk = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            data.append(row)
            lines.append(f"| {a_name} | {b_name} | {n} | {ppl} | {pk} |")
    lines += [
        "",
        "ppl ratio < 1 with its whole interval below 1: A has the lower perplexity on the same scored "
        "tokens; passkey difference > 0 with the interval above 0: A retrieves more.",
    ]
    return "\n".join(lines), data


def report(root: Path, experiment: Path | None = None, out: Path | None = None) -> dict:
    from omegaconf import OmegaConf

    out = out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    evs = evaluations(root)
    pairs: list[list[str]] = []
    if experiment is not None:
        study = OmegaConf.load(experiment).get("study") or {}
        pairs = [list(p) for p in (study.get("report") or {}).get("comparisons") or []]
    body = tables(evs)
    comp_md, comp = comparisons(evs, pairs) if pairs else ("", [])
    (out / "tables.md").write_text(body + "\n")
    if comp_md:
        (out / "comparisons.md").write_text(comp_md + "\n")
    train = next((e.get("train_length") for e in evs if e.get("train_length")), None)
    plot_perplexity({e["name"]: e["perplexity"] for e in evs if e.get("perplexity")}, out / "perplexity.png",
                    train_length=train, title="Perplexity against context length (95% bands)")  # fmt: skip
    plot_passkey_by_length({e["name"]: passkey_by_length(e["passkey"]) for e in evs if e.get("passkey")},
                           out / "passkey_by_length.png", train_length=train)  # fmt: skip
    plot_passkey({e["name"]: accuracy_matrix(e["passkey"]) for e in evs if e.get("passkey")},
                 out / "passkey_heatmaps.png")  # fmt: skip
    data = {"evaluations": [{k: v for k, v in e.items() if not k.startswith("_")} for e in evs],
            "comparisons": comp}  # fmt: skip
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    doc = root / "REPORT.md"
    if doc.exists() and BEGIN in doc.read_text() and END in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        block = body + ("\n\n#### Paired comparisons\n\n" + comp_md if comp_md else "")
        doc.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return {"out": out, "evaluations": len(evs), "comparisons": len(comp)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ctxlab-report", description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path, help="a study's run directory (with arms/) or its committed results")
    ap.add_argument("--experiment", type=Path, default=None, help="the study's file (for its comparisons)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default ROOT/report)")
    args = ap.parse_args(argv)
    try:
        r = report(args.root, args.experiment, args.out)
    except (FileNotFoundError, ValueError) as e:  # no study there, an unreadable file: named, no traceback
        sys.exit(f"ctxlab-report: error: {e}")
    print(f"report: {r['evaluations']} evaluations, {r['comparisons']} comparison rows -> {r['out']}")


if __name__ == "__main__":
    main()
