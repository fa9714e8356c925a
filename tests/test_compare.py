"""`ctxlab-compare` on a real small sweep's outputs: the Markdown/CSV table, the PNG plots, and
the W&B run (offline) that carries them, read back from its transaction log (`wandb leet
inspect --json`, W&B's own reader) and its media files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxlab.compare import metrics_of, wandb_settings

TINY = [
    "data.seq_len=64",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "eval.perplexity.lengths=[32,96]",
    "eval.perplexity.max_tokens=96",
    "eval.passkey.lengths=[300]",
    "eval.passkey.depths=[0.0,1.0]",
    "eval.passkey.trials=1",
    "hydra.sweep.subdir=${hydra.job.num}",
]
ENV = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_metrics_of_flattens_a_summary():
    summary = {
        "val_ppl": 9.5,
        "steps": 10,
        "causal": True,
        "perplexity": [{"length": 128, "ppl": 12.5}, {"length": 64, "ppl": 11.0}],
        "passkey": [
            {"length": 300, "depth": 0.0, "accuracy": 1.0},
            {"length": 300, "depth": 1.0, "accuracy": 0.0},
            {"length": 600, "depth": 0.0, "accuracy": 0.5},
        ],
    }
    assert metrics_of(summary) == {
        "val_ppl": 9.5,
        "steps": 10,
        "causal": True,
        "ppl@64": 11.0,
        "ppl@128": 12.5,
        "ppl_longest": 12.5,
        "passkey@300": 0.5,
        "passkey@600": 0.5,
        "passkey_mean": 0.5,
    }


def test_wandb_settings_follow_the_runs_logger(tmp_path):
    def run_dir(name: str, logger: str) -> dict:
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(logger)
        return {"_dir": str(d)}

    wb = "logger:\n  kind: wandb\n  project: p\n  entity: null\n  group: g\n  mode: offline\n"
    runs = [run_dir("a", wb), run_dir("b", wb)]
    assert wandb_settings(runs) == {"project": "p", "entity": None, "group": "g", "mode": "offline"}
    assert wandb_settings(runs, mode="disabled", group="h")["group"] == "h"
    csv_only = [run_dir("c", "logger:\n  kind: csv\n")]
    assert wandb_settings(csv_only)["mode"] == "disabled"
    with pytest.raises(ValueError, match="offline, online or disabled"):
        wandb_settings(runs, mode="cloud")


@pytest.mark.slow
def test_compare_a_real_sweep_logs_tables_and_plots_to_wandb(tmp_path):
    sweep, out_dir, group = tmp_path / "sweep", tmp_path / "compare", "h2-compare-test"
    run(
        [sys.executable, "-m", "ctxlab", "-m", f"hydra.sweep.dir={sweep}", "logger=wandb",
         f"logger.group={group}", "position=rope,pi", *TINY],
        cwd=tmp_path,
    )  # fmt: skip
    out = run(
        [sys.executable, "-m", "ctxlab.compare", str(sweep), "--out", str(out_dir), "--title", "t"], tmp_path
    )
    assert "wandb sync" in out.stdout

    rows = list(csv.DictReader((out_dir / "table.csv").open()))
    assert [r["name"] for r in rows] == ["dense+rope", "dense+pi"]
    assert all(math.isfinite(float(r["ppl@96"])) for r in rows)
    assert "| dense+pi | yes |" in (out_dir / "table.md").read_text()
    for png in ("perplexity.png", "passkey.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The W&B run: offline, in the sweep's group, with every table and image in its history.
    (run_dir,) = (out_dir / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    wandb_cli = Path(sys.executable).with_name("wandb")
    inspect = run([str(wandb_cli), "leet", "inspect", "--json", str(log_file)], tmp_path, timeout=120)
    records = [json.loads(line) for line in inspect.stdout.splitlines() if line.strip()]
    (run_record,) = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["run_group"] == group and run_record["project"] == "ctxlab"
    logged: dict = {}  # flattened: "<key>._type", "<key>.path", ...
    for r in records:
        if r["type"] == "history":
            logged |= r["history"]["item"]
    for key in ("compare/table", "compare/perplexity", "compare/passkey"):
        assert logged[f"{key}._type"] == "table-file", key
    for key in ("compare/perplexity_plot", "compare/passkey_plot"):
        assert logged[f"{key}._type"] == "image-file", key
        assert (run_dir / "files" / logged[f"{key}.path"]).stat().st_size > 1000

    # The table files hold exactly the comparison table's rows.
    table = json.loads((run_dir / "files" / logged["compare/table.path"]).read_text())
    assert table["columns"] == list(rows[0])
    for got, want in zip(table["data"], rows, strict=True):
        assert got[0] == want["name"]
        assert got[table["columns"].index("ppl@96")] == pytest.approx(float(want["ppl@96"]))
    long = json.loads((run_dir / "files" / logged["compare/perplexity.path"]).read_text())
    assert len(long["data"]) == 2 * 2  # 2 runs x 2 lengths
