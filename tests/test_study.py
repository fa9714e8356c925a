"""A declared study end to end on CPU: arms trained and evaluated, skipped when done, re-evaluated
from their saved weights when the grid grows (finished cells kept), retrained when their weights
are incomplete, and reported with intervals and paired comparisons (``ctxlab-report``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from ctxlab.eval.cells import CellStore
from ctxlab.eval.perplexity import PerplexityConfig, perplexity_grid
from ctxlab.report import blocks_from_cells, newcombe

ROOT = Path(__file__).resolve().parents[1]

STUDY = """# @package _global_
defaults:
  - override /model: tiny
  - override /data: books
  - override /trainer: cpu
  - override /eval: quick
name: tiny_study
data: {seq_len: 64, batch_size: 2}
attention: {region: 4, budget: 4, merge: 2}
trainer: {max_steps: 2, val_check_interval: 2, limit_val_batches: 1, log_every_n_steps: 1}
eval:
  join_documents: 400
  perplexity: {protocol: fixed_targets, targets: 64, lengths: [32, 96], max_tokens: 0, block_tokens: 16}
  passkey: {lengths: [300], depths: [0.5], trials: 2}
study:
  only: []
  arms:
    dense: [attention=dense]
    ms: [attention=ms_causal, "eval.attention=[trained,dense]"]
  report:
    comparisons:
      - [ms, dense]
      - [ms @dense, dense]
"""


def ctxlab(cfg_dir: Path, *args: str, cwd: Path) -> str:
    env = os.environ | {"CTXLAB_CFG": str(cfg_dir), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "ctxlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_a_study_resumes_extends_its_grid_and_reports(tmp_path):
    cfg = tmp_path / "cfg"
    shutil.copytree(ROOT / "cfg", cfg)  # the experiment symlink becomes a folder we can add to
    (cfg / "experiment" / "tiny_study.yaml").write_text(STUDY)
    run = tmp_path / "study"
    args = ["experiment=tiny_study", f"hydra.run.dir={run}", "logger=csv"]
    ctxlab(cfg, *args, cwd=tmp_path)
    arms = run / "arms"
    for arm in ("dense", "ms"):
        for f in ("weights/trainable.safetensors", "weights/meta.json", "results/fit.json",
                  "results/grid.json", "results/cells.jsonl", "results/summary.json"):  # fmt: skip
            assert (arms / arm / f).exists(), (arm, f)
    assert (arms / "ms" / "results" / "eval_dense" / "summary.json").exists()
    ckpt = arms / "dense" / "checkpoints" / "last.ckpt"
    trained_at = ckpt.stat().st_mtime_ns
    before = json.loads((arms / "dense" / "results" / "perplexity.json").read_text())
    cells_before = (arms / "dense" / "results" / "cells.jsonl").read_text().splitlines()

    out = ctxlab(cfg, *args, cwd=tmp_path)  # the same grid: nothing runs again
    assert out.count("results exist for this grid, skipped") == 2
    assert ckpt.stat().st_mtime_ns == trained_at

    # A longer grid: the saved weights are evaluated, the finished cells are kept, nothing retrains.
    out = ctxlab(cfg, *args, "eval.perplexity.lengths=[32,96,160]", cwd=tmp_path)
    assert out.count("trained earlier; evaluating its saved weights") == 2
    assert ckpt.stat().st_mtime_ns == trained_at
    after = json.loads((arms / "dense" / "results" / "perplexity.json").read_text())
    assert [r["length"] for r in after] == [32, 96, 160] and after[:2] == before
    cells = (arms / "dense" / "results" / "cells.jsonl").read_text().splitlines()
    assert len(cells) > len(cells_before) and cells[: len(cells_before)] == cells_before
    fit = json.loads((arms / "dense" / "results" / "fit.json").read_text())
    summary = json.loads((arms / "dense" / "results" / "summary.json").read_text())
    assert summary["steps"] == fit["steps"] == 2  # the fit's record survives the re-evaluation
    assert (arms / "dense" / "config.evaluate.yaml").exists() and (arms / "dense" / "config.yaml").exists()

    # Weights missing a file they list: that arm is trained again.
    (arms / "ms" / "weights" / "trainable.safetensors").unlink()
    (arms / "ms" / "results" / "grid.json").unlink()
    out = ctxlab(cfg, *args, "eval.perplexity.lengths=[32,96,160]", cwd=tmp_path)
    assert "[2/2] ms\n" in out.replace("[ctxlab] ", "")
    assert (arms / "ms" / "weights" / "trainable.safetensors").exists()

    env = os.environ | {"CTXLAB_CFG": str(cfg)}
    rep = subprocess.run([sys.executable, "-m", "ctxlab.report", str(run), "--experiment",
                          str(cfg / "experiment" / "tiny_study.yaml")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-3000:]
    tables = (run / "report" / "tables.md").read_text()
    assert "| dense | trained (causal) |" in tables and "| ms | dense (causal) |" in tables
    comp = (run / "report" / "comparisons.md").read_text()
    assert "| ms @dense | dense | 160 |" in comp
    data = json.loads((run / "report" / "report.json").read_text())
    row = next(r for r in data["comparisons"] if r["a"] == "ms @dense" and r["length"] == 32)
    assert row["ppl_ratio_lo"] <= row["ppl_ratio"] <= row["ppl_ratio_hi"]
    for png in ("perplexity.png", "passkey_by_length.png", "passkey_heatmaps.png"):
        assert (run / "report" / png).stat().st_size > 0


def test_blocks_rebuilt_from_cells_equal_the_grid_blocks(tmp_path):
    model = tiny_model()
    docs = [torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = PerplexityConfig(lengths=[16, 48, 128], protocol="fixed_targets", targets=64, max_tokens=0,
                           block_tokens=16)  # fmt: skip
    with CellStore(tmp_path / "cells.jsonl", {"m": 1}) as store:
        results = perplexity_grid(model, docs, cfg, progress=False, store=store)
    for r in results:
        nll, tokens = blocks_from_cells(tmp_path / "cells.jsonl", r.length, 16)
        assert tokens == list(r.block_tokens)
        assert nll == pytest.approx(list(r.block_nll), rel=1e-12)


def test_newcombe_interval_contains_the_difference_and_is_symmetric_under_swap():
    d, lo, hi = newcombe(12, 21, 3, 21)
    assert lo < d < hi and d == pytest.approx(9 / 21)
    d2, lo2, hi2 = newcombe(3, 21, 12, 21)
    assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
    assert newcombe(21, 21, 21, 21)[1:] == pytest.approx((-0.1546, 0.1546), abs=1e-3)
