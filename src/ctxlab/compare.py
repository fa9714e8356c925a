"""Compare finished runs: one table (Markdown + CSV) and side-by-side plots.

Reads ``<run_dir>/results/summary.json`` of each run. Every perplexity column sits beside the
run's causality flag: a non-causal model's perplexity is not a valid language-model perplexity.
Usable as ``ctxlab-compare DIR [DIR ...] --out OUT`` (a DIR may be a sweep folder: every run
below it with results is taken).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ctxlab.eval.passkey import accuracy_matrix
from ctxlab.eval.plots import plot_passkey, plot_perplexity


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        if (p / "results" / "summary.json").exists():
            runs.append(p)
        else:
            runs.extend(sorted(s.parent.parent for s in p.glob("**/results/summary.json")))
    return runs


def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def compare_runs(run_dirs: list[Path], out_dir: Path, *, title: str = "comparison") -> dict:
    summaries = []
    for d in find_runs([Path(p) for p in run_dirs]):
        s = json.loads((d / "results" / "summary.json").read_text())
        s["_dir"] = str(d)
        summaries.append(s)
    if not summaries:
        raise FileNotFoundError(f"no results/summary.json under {', '.join(map(str, run_dirs))}")
    ppl_lengths = sorted({r["length"] for s in summaries for r in s.get("perplexity", [])})
    pk_lengths = sorted({r["length"] for s in summaries for r in s.get("passkey", [])})
    rows = []
    for s in summaries:
        row = {
            "name": s["name"],
            "attention": s.get("attention"),
            "position": s.get("position"),
            "causal": s.get("causal"),
            "train_len": s.get("train_length"),
            "val_ppl": s.get("val_ppl"),
        }
        ppl = {r["length"]: r["ppl"] for r in s.get("perplexity", [])}
        for n in ppl_lengths:
            row[f"ppl@{n}"] = ppl.get(n)
        pk: dict[int, list[float]] = {}
        for r in s.get("passkey", []):
            pk.setdefault(r["length"], []).append(r["accuracy"])
        for n in pk_lengths:
            row[f"passkey@{n}"] = sum(pk[n]) / len(pk[n]) if n in pk else None
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_csv = out_dir / "table.csv"
    with table_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = [
        "name",
        "causal",
        "val_ppl",
        *[f"ppl@{n}" for n in ppl_lengths],
        *[f"passkey@{n}" for n in pk_lengths],
    ]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if c == "causal":
                v = {True: "yes", False: "NO", None: "?"}[v]
            cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ppl@N: sliding-window perplexity at context N (test split); passkey@N: exact-match "
              "accuracy averaged over depths. causal=NO: the audit found outputs depending on later "
              "tokens, so that row's perplexity is not a valid language-model perplexity."]  # fmt: skip
    md = "\n".join(lines)
    table_md = out_dir / "table.md"
    table_md.write_text(md + "\n")
    train_len = next((s.get("train_length") for s in summaries if s.get("train_length")), None)
    ppl_png = plot_perplexity(
        {s["name"]: [r | {"causal": s.get("causal")} for r in s.get("perplexity", [])] for s in summaries
         if s.get("perplexity")}, out_dir / "perplexity.png", train_length=train_len, title=title,
    )  # fmt: skip
    panels = {s["name"]: accuracy_matrix(s["passkey"]) for s in summaries if s.get("passkey")}
    passkey_png = plot_passkey(panels, out_dir / "passkey.png") if panels else None
    return {"rows": rows, "markdown": md, "table_md": table_md, "table_csv": table_csv,
            "ppl_png": ppl_png, "passkey_png": passkey_png}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ctxlab-compare", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories or sweep folders")
    ap.add_argument("--out", type=Path, default=Path("compare"), help="output folder")
    ap.add_argument("--title", default="comparison")
    args = ap.parse_args(argv)
    report = compare_runs(args.runs, args.out, title=args.title)
    print(report["markdown"])
    print(
        f"\nwritten: {report['table_md']} {report['table_csv']} {report['ppl_png']} {report['passkey_png']}"
    )


if __name__ == "__main__":
    main()
