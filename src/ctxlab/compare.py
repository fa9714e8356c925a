"""Compare finished runs: one table (Markdown + CSV) and side-by-side plots.

Reads ``<run_dir>/results/summary.json`` of each run. Every perplexity column sits beside the
run's causality flag: a non-causal model's perplexity is not a valid language-model perplexity.
Usable as ``ctxlab-compare DIR [DIR ...] --out OUT`` (a DIR may be a sweep folder: every run
below it with results is taken).

The tables and plots also go to a W&B run (``job_type=compare``) in the runs' W&B project and
group, offline by default as the runs' own logger config is: ``wandb.Table`` for each table and
``wandb.Image`` for each PNG, under ``OUT/wandb/offline-run-*``; ``wandb sync`` uploads it later.

:func:`metrics_of` flattens a job's summary into the named metrics (``val_ppl``, ``ppl@N``,
``passkey@N``, ...) that the table's columns and the Optuna sweeper's ``objective`` use.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Literal

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


def metrics_of(summary: dict) -> dict:
    """A job's summary (``run_job``'s return value, ``results/summary.json``) as flat named
    metrics: ``val_ppl``, ``steps``, ``fit_seconds`` (the whole fit), ``train_seconds`` and
    ``train_tokens`` (training alone), ``tokens_per_s``, ``peak_mem_gib`` (GPU), ``peak_rss_gib``
    (host), ``causal``, ``ppl@N`` (sliding-window
    perplexity at context N), ``ppl_longest`` (at the grid's longest length), ``passkey@N``
    (exact-match accuracy at length N, averaged over depths and trials), ``passkey_mean``
    (over every length and depth), ``niah@N`` (the fraction of needle values found at length N,
    over every NIAH variant) and ``niah_mean``. A metric the job did not measure is absent."""
    keys = ("val_ppl", "steps", "fit_seconds", "train_seconds", "train_tokens", "causal", "tokens_per_s",
            "peak_mem_gib", "peak_rss_gib", "eval_scale")  # fmt: skip
    out = {k: summary[k] for k in keys if summary.get(k) is not None}
    ppl_rows = sorted(summary.get("perplexity") or [], key=lambda r: r["length"])
    for r in ppl_rows:
        out[f"ppl@{r['length']}"] = r["ppl"]
    if ppl_rows:
        out["ppl_longest"] = ppl_rows[-1]["ppl"]
    pk: dict[int, list[float]] = {}
    for r in summary.get("passkey") or []:
        pk.setdefault(r["length"], []).append(r["accuracy"])
    for n, accs in sorted(pk.items()):
        out[f"passkey@{n}"] = sum(accs) / len(accs)
    if pk:
        every = [a for accs in pk.values() for a in accs]
        out["passkey_mean"] = sum(every) / len(every)
    niah = sorted(summary.get("niah_by_length") or [], key=lambda r: r["length"])
    for r in niah:
        out[f"niah@{r['length']}"] = r["score"]
    if niah:
        out["niah_mean"] = sum(r["found"] for r in niah) / sum(r["asked"] for r in niah)
    return out


def metric_names(cfg) -> list[str]:
    """The metrics :func:`metrics_of` will find in the summary of a job with this composed config
    (so that a sweep's objective is checked before any job runs)."""
    names = []
    if cfg.phase.fit:
        names += ["val_ppl", "steps", "fit_seconds"]
    if cfg.phase.evaluate:
        ppl, pk = cfg.eval.perplexity, cfg.eval.passkey
        if ppl.enabled:
            names += [f"ppl@{n}" for n in ppl.lengths] + ["ppl_longest"]
        if pk.enabled:
            names += [f"passkey@{n}" for n in pk.lengths] + ["passkey_mean"]
        niah = cfg.eval.get("niah")
        if niah is not None and niah.enabled:
            names += [f"niah@{n}" for n in niah.lengths] + ["niah_mean"]
    return names


def run_config(run_dir: Path) -> dict:
    """The resolved config a run wrote (``config.yaml``), or {} where there is none."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
    return cfg if isinstance(cfg, dict) else {}


def read_summary(path: Path) -> dict:
    """A ``summary.json``; ValueError naming the file when it is not a JSON object."""
    try:
        s = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: unreadable summary ({e}); rerun that job's evaluation or remove the run"
        ) from e
    if not isinstance(s, dict) or "name" not in s:
        raise ValueError(f"{path}: not a ctxlab summary (no 'name')")
    return s


def run_summaries(run_dir: Path) -> list[dict]:
    """Every evaluation of a run: ``results/summary.json`` first, then ``results/eval_*/``, each
    labelled ``name`` (``<name> @<eval attention>`` where that is not the trained attention), with
    its run folder (``_dir``) and its results folder (``_results``)."""
    first = read_summary(run_dir / "results" / "summary.json")
    paths = [run_dir / p for p in (first.get("evaluations") or {}).values()]
    paths = [p for p in paths if p != run_dir / "results"] or sorted((run_dir / "results").glob("eval_*"))
    found = [(first, run_dir / "results")]
    found += [(read_summary(p / "summary.json"), p) for p in paths if (p / "summary.json").exists()]
    out = []
    for s, folder in found:
        ev = s.get("eval_attention")
        s["arm"] = s["name"]
        if ev not in (None, "trained"):
            s["name"] = f"{s['name']} @{ev}"
        s["_dir"], s["_results"] = str(run_dir), str(folder)
        out.append(s)
    return out


def distinguish_names(summaries: list[dict]) -> None:
    """Runs that share a name (two sweeps' ``dense+rope``) get the shortest tail of their run
    directory that tells them apart, ``dense+rope (sweep_a/3)``, in place, so neither their table
    rows nor their plot lines merge."""
    by_name: dict[str, list[dict]] = {}
    for s in summaries:
        by_name.setdefault(s["name"], []).append(s)
    for name, same in by_name.items():
        dirs = {s["_dir"] for s in same}
        if len(dirs) < 2:
            continue
        parts = {d: Path(d).resolve().parts for d in dirs}
        depth = max(len(p) for p in parts.values())
        for k in range(1, depth + 1):
            tails = {d: "/".join(p[-k:]) for d, p in parts.items()}
            if len(set(tails.values())) == len(tails):
                break
        for s in same:
            s["name"] = f"{name} ({tails[s['_dir']]})"


def compare_runs(run_dirs: list[Path], out_dir: Path, *, title: str = "comparison") -> dict:
    summaries = [s for d in find_runs([Path(p) for p in run_dirs]) for s in run_summaries(d)]
    if not summaries:
        raise FileNotFoundError(f"no results/summary.json under {', '.join(map(str, run_dirs))}")
    distinguish_names(summaries)
    ppl_lengths = sorted({r["length"] for s in summaries for r in s.get("perplexity", [])})
    pk_lengths = sorted({r["length"] for s in summaries for r in s.get("passkey", [])})
    niah_lengths = sorted({r["length"] for s in summaries for r in s.get("niah_by_length", [])})
    rows = []
    for s in summaries:
        m = metrics_of(s)
        row = {
            "name": s["name"],
            "attention": s.get("attention"),
            "position": s.get("position"),
            "causal": s.get("causal"),
            "train_len": s.get("train_length"),
            "val_ppl": s.get("val_ppl"),
            "steps": s.get("steps"),
            "fit_seconds": s.get("fit_seconds"),  # CSV and W&B only: wall time depends on the machine's load
        }
        row |= {f"ppl@{n}": m.get(f"ppl@{n}") for n in ppl_lengths}
        row |= {f"passkey@{n}": m.get(f"passkey@{n}") for n in pk_lengths}
        row |= {f"niah@{n}": m.get(f"niah@{n}") for n in niah_lengths}
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
        "train_len",
        "val_ppl",
        *[f"ppl@{n}" for n in ppl_lengths],
        *[f"passkey@{n}" for n in pk_lengths],
        *[f"niah@{n}" for n in niah_lengths],
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
    lines += ["", "train_len: the training length in tokens; "
              "ppl@N: sliding-window perplexity at context N (test split); passkey@N: exact-match "
              "accuracy averaged over depths. causal=NO: the audit found outputs depending on later "
              "tokens; no perplexity is computed for such an evaluation. `name @attention`: the same "
              "weights evaluated with another attention (eval.attention)."]  # fmt: skip
    if niah_lengths:
        lines.append(
            "niah@N: the fraction of needle values found at N tokens (eval.niah), over its variants."
        )
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
            "ppl_png": ppl_png, "passkey_png": passkey_png, "summaries": summaries}  # fmt: skip


def wandb_settings(summaries: list[dict], mode: str | None = None, group: str | None = None) -> dict:
    """Project, entity, group and mode of the compare run, taken from the runs' own logger configs
    (the group a sweep's runs share; offline unless they say otherwise); ``mode``/``group``
    override. ``mode`` is ``disabled`` when no run logged to W&B and none is asked for."""
    loggers = [run_config(Path(s["_dir"])).get("logger") or {} for s in summaries]
    wandb_loggers = [lg for lg in loggers if lg.get("kind") == "wandb"]

    def common(key: str):
        values = Counter(lg.get(key) for lg in wandb_loggers)
        return values.most_common(1)[0][0] if values else None

    if mode is None:
        mode = (common("mode") or "offline") if wandb_loggers else "disabled"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"W&B mode must be offline, online or disabled, got {mode!r}")
    groups = {lg.get("group") for lg in wandb_loggers}
    if group is None and len(groups) == 1:
        group = groups.pop()
    return {
        "project": common("project") or "ctxlab",
        "entity": common("entity"),
        "group": group,
        "mode": mode,
    }


WandbMode = Literal["offline", "online", "disabled"]


def log_to_wandb(report: dict, out_dir: Path, *, title: str, project: str, entity: str | None,
                 group: str | None, mode: WandbMode) -> Path | None:  # fmt: skip
    """One W&B run (``job_type=compare``) with the comparison table, a long-format perplexity and
    passkey table (one row per run x length (x depth), for W&B's own panels) and every PNG.
    Returns the run's folder (``out_dir/wandb/<offline-run-...>``), or None when ``mode`` is
    ``disabled``."""
    if mode == "disabled":
        return None
    from ctxlab.extras import require

    require("wandb", why=f"the comparison's W&B run (mode {mode}; --wandb disabled needs nothing)")
    import wandb

    summaries = report["summaries"]
    run = wandb.init(project=project, entity=entity, group=group, job_type="compare", name=f"compare {title}",
                     dir=str(out_dir), mode=mode, config={"runs": [s["_dir"] for s in summaries]},
                     settings=wandb.Settings(silent=True))  # fmt: skip
    try:
        rows = report["rows"]
        cols = list(rows[0])
        data: dict = {"compare/table": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}
        ppl = [[s["name"], s.get("causal"), r["length"], r["ppl"], r.get("n_docs"), r.get("n_tokens")]
               for s in summaries for r in s.get("perplexity") or []]  # fmt: skip
        if ppl:
            data["compare/perplexity"] = wandb.Table(
                columns=["name", "causal", "length", "ppl", "n_docs", "n_tokens"], data=ppl
            )
        pk = [
            [s["name"], r["length"], r["depth"], r["accuracy"]]
            for s in summaries
            for r in s.get("passkey") or []
        ]
        if pk:
            data["compare/passkey"] = wandb.Table(columns=["name", "length", "depth", "accuracy"], data=pk)
        for key, png in (
            ("compare/perplexity_plot", report["ppl_png"]),
            ("compare/passkey_plot", report["passkey_png"]),
        ):
            if png is not None:
                data[key] = wandb.Image(str(png))
        run.log(data)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ctxlab-compare", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories or sweep folders")
    ap.add_argument("--out", type=Path, default=Path("compare"), help="output folder")
    ap.add_argument("--title", default="comparison")
    ap.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="W&B mode of the compare run (default: the runs' logger.mode; disabled if none used W&B)",
    )
    ap.add_argument("--wandb-group", default=None, help="W&B group (default: the group the runs share)")
    args = ap.parse_args(argv)
    report = compare_runs(args.runs, args.out, title=args.title)
    print(report["markdown"])
    print(
        f"\nwritten: {report['table_md']} {report['table_csv']} {report['ppl_png']} {report['passkey_png']}"
    )
    settings = wandb_settings(report["summaries"], mode=args.wandb, group=args.wandb_group)
    run_dir = log_to_wandb(report, args.out, title=args.title, **settings)
    if run_dir is not None:
        where = f"group {settings['group']!r}" if settings["group"] else "no group"
        print(f"W&B ({settings['mode']}, project {settings['project']!r}, {where}): {run_dir}")
        if settings["mode"] == "offline":
            print(f"upload it later with: wandb sync {run_dir}")


if __name__ == "__main__":
    main()
