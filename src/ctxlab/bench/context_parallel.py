"""The context-parallel benchmark's report: one table from the cases ``experiments/gpu/cp_bench.sh``
ran, each a separate ``ctxlab.bench.finetune`` process (one GPU, or torchrun with
``--context-parallel``), so an OOM or a time-out of one case cannot stop the others.

    python -m ctxlab.bench.context_parallel OUT [--baseline one_gpu.json ...]

reads ``OUT/cases/<tag>.json`` (what a finished case wrote) and ``OUT/cases/<tag>.status.json``
(what the script recorded for a case that did not finish: ``oom``, ``timeout``, ``error``,
``not run``), and writes ``OUT/cp_bench.json`` and ``OUT/cp_bench.md``. Scaling is the total
tokens/s of a case over the one-GPU tokens/s of the same variant at the longest length measured
on one GPU (128K): from this run, else from ``--baseline`` files (named in the table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_cases(out: Path) -> list[dict]:
    """One row per case, in the order the script ran them (``order`` in each status file)."""
    rows = []
    for status_file in sorted((out / "cases").glob("*.status.json")):
        status = json.loads(status_file.read_text())
        result_file = status_file.with_name(status_file.name.replace(".status.json", ".json"))
        row = {k: status[k] for k in ("order", "tag", "variant", "seq_len", "gpus")}
        row |= {"status": status["status"], "note": status.get("note", "")}
        if status["status"] == "ok" and result_file.is_file():
            result = json.loads(result_file.read_text())
            measured = result["rows"][0] if result["rows"] else {}
            row |= {k: measured.get(k) for k in (
                "status", "s_per_step", "tokens_per_s_per_gpu", "mfu", "peak_alloc_gib", "peak_reserved_gib",
                "step_times_s", "fraction_computed", "reason", "error",
            )}  # fmt: skip
            row["environment"] = result["environment"]
            row["context_parallel"] = result.get("context_parallel", 0)
            row["strategy"] = result.get("strategy")
            if row.get("tokens_per_s_per_gpu"):
                row["tokens_per_s_total"] = round(row["tokens_per_s_per_gpu"] * row["gpus"], 1)
        rows.append(row)
    return sorted(rows, key=lambda r: r["order"])


def one_gpu_rows(rows: list[dict], baselines: list[Path]) -> dict[str, dict]:
    """variant -> the one-GPU row of the longest length with a speed: this run's, else a file's."""
    best: dict[str, dict] = {}
    for r in rows:
        longer = r["variant"] not in best or r["seq_len"] > best[r["variant"]]["seq_len"]
        if r["gpus"] == 1 and r.get("tokens_per_s_per_gpu") and longer:
            best[r["variant"]] = r | {"source": "this run"}
    for f in baselines:
        for b in json.loads(f.read_text()).get("rows", []):
            v, tps = b.get("variant"), b.get("tokens_per_s_per_gpu")
            mine = best.get(v)
            if tps and (mine is None or (mine["source"] != "this run" and b["seq_len"] > mine["seq_len"])):
                best[v] = {"seq_len": b["seq_len"], "tokens_per_s_per_gpu": tps, "source": f.name}
    return best


def report(out: Path, baselines: list[Path]) -> dict:
    rows = load_cases(out)
    base = one_gpu_rows(rows, baselines)
    for r in rows:
        b = base.get(r["variant"])
        if r["gpus"] > 1 and b and r.get("tokens_per_s_total"):
            r["vs_one_gpu"] = round(r["tokens_per_s_total"] / b["tokens_per_s_per_gpu"], 3)
            r["vs_one_gpu_of"] = f"{b['seq_len']} on 1 GPU ({b['source']})"
    env = next((r["environment"] for r in rows if r.get("environment")), {})
    baselines_used = {
        v: {k: b[k] for k in ("seq_len", "tokens_per_s_per_gpu", "source")} for v, b in base.items()
    }
    result = {"environment": env, "rows": rows, "baselines": baselines_used}
    (out / "cp_bench.json").write_text(json.dumps(result, indent=2))
    (out / "cp_bench.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Context parallelism: the Llama 2 7B LoRA+ step (bf16, gradient checkpointing, random init)",
        "",
        (
            f"{env.get('date', '?')}; {env.get('device', '?')} x{env.get('n_devices', '?')}; torch "
            f"{env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), Triton {env.get('triton', '?')}, "
            f"transformers {env.get('transformers', '?')}; "
            f"commit {(env.get('git') or {}).get('commit') or '?'}."
            if env
            else "No case finished."
        ),
        "Each row of L tokens is split over the GPUs (`trainer.strategy.context_parallel`); one GPU "
        "runs the whole row. Peak memory is the largest of the GPUs. `vs 1 GPU`: total tokens/s over "
        "the one-GPU tokens/s of the same variant at the length named.",
        "",
        "| variant | L | GPUs | status | s/step | tokens/s total | tokens/s/GPU | MFU (dense-equiv.) | "
        "peak alloc GiB | peak reserved GiB | step times s | vs 1 GPU | strategy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        vs = f"{r['vs_one_gpu']:.2f}x ({r['vs_one_gpu_of']})" if r.get("vs_one_gpu") else "-"
        status = r["status"] + (f": {r['note']}" if r.get("note") else "")
        lines.append(
            f"| {r['variant']} | {r['seq_len']} | {r['gpus']} | {status} | {r.get('s_per_step') or '-'} | "
            f"{r.get('tokens_per_s_total') or '-'} | {r.get('tokens_per_s_per_gpu') or '-'} | "
            f"{r.get('mfu') or '-'} | {r.get('peak_alloc_gib') or '-'} | "
            f"{r.get('peak_reserved_gib') or '-'} | "
            f"{r.get('step_times_s') or '-'} | {vs} | {r.get('strategy') or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m ctxlab.bench.context_parallel", description=__doc__.split("\n")[0]
    )
    p.add_argument("out", type=Path, help="the folder cp_bench.sh wrote (with cases/)")
    p.add_argument("--baseline", type=Path, action="append", default=[], help="one-GPU result JSON(s)")
    a = p.parse_args(argv)
    result = report(a.out, [b for b in a.baseline if b.is_file()])
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
