"""Hyper-parameter search with ctxlab's Optuna sweeper (hydra/sweeper=optuna): Hydra's sweep
syntax becomes Optuna distributions, a trial's value is the named metric of the job's real
summary, a bad objective or search space fails before any job runs, and a small real study on
the CPU records every trial and the best one. The same study through launcher=slurm is in
test_slurm.py."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.ctxlab_optuna_sweeper.optuna_sweeper import objective_value, search_space

ENV = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
# Trials that train 2 steps of the tiny model at 64 tokens and report val_ppl (no eval grid).
FAST_TRIAL = [
    "logger=csv",
    "data.seq_len=64",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "phase.evaluate=false",
]


def ctxlab(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ctxlab", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def val_ppl_logged(job_dir: Path) -> float:
    """exp(last val/loss) from the job's own CSV log: what the trial's value must equal."""
    rows = [r for r in csv.DictReader((job_dir / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    return math.exp(float(rows[-1]["val/loss"]))


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    space, fixed = search_space(
        [
            "position.scale_inf=tag(log,interval(1,64))",
            "phase.optimizer.lr=interval(1e-4,1e-2)",
            "attention.region=range(4,17,4)",
            "attention.budget=int(interval(4,16))",
            "position=rope,selected",
            "attention.merge=choice(1,2)",
            "trainer.max_steps=10",
            "+extra=x",
        ]
    )
    assert space == {
        "position.scale_inf": FloatDistribution(1.0, 64.0, log=True),
        "phase.optimizer.lr": FloatDistribution(1e-4, 1e-2),
        "attention.region": IntDistribution(4, 16, step=4),
        "attention.budget": IntDistribution(4, 16),
        "position": CategoricalDistribution(["rope", "selected"]),
        "attention.merge": CategoricalDistribution([1, 2]),
    }
    assert fixed == ["trainer.max_steps=10", "+extra=x"]
    with pytest.raises(ValueError, match="understands interval"):
        search_space(["data.path=glob(*)"])


def test_objective_is_read_from_the_jobs_summary_by_name():
    summary = {
        "causal": True,
        "val_ppl": 8.0,
        "perplexity": [{"length": 512, "ppl": 9.25}, {"length": 1024, "ppl": 11.5}],
        "passkey": [
            {"length": 512, "depth": 0.0, "accuracy": 1.0},
            {"length": 512, "depth": 1.0, "accuracy": 0.0},
        ],
    }
    assert objective_value(summary, "ppl@1024") == 11.5
    assert objective_value(summary, "passkey@512") == 0.5
    assert objective_value(summary, "val_ppl") == 8.0
    assert objective_value(3.0, "anything") == 3.0
    with pytest.raises(ValueError, match=r"no 'ppl@4096'.*ppl@1024"):
        objective_value(summary, "ppl@4096")
    with pytest.raises(ValueError, match="non-causal is not a valid perplexity"):
        objective_value(summary | {"causal": False}, "ppl@512")
    assert objective_value(summary | {"causal": False}, "passkey@512") == 0.5  # retrieval stays valid
    with pytest.raises(ValueError, match="is nan"):
        objective_value({"val_ppl": float("nan")}, "val_ppl")
    with pytest.raises(ValueError, match="not a metrics dict"):
        objective_value(None, "val_ppl")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["hydra.sweeper.objective=ppl@4096"], "is not a metric these jobs report"),
        (["hydra.sweeper.objective=val_ppl", "hydra.sweeper.direction=up"], "minimize or maximize"),
        (["hydra.sweeper.objective=val_ppl", "attention=ms_causal", "attention.region=nosuch,8"], "nosuch"),
    ],
    ids=["objective-not-measured", "bad-direction", "bad-space"],
)
def test_bad_objective_or_space_fails_before_any_job(tmp_path, args, needle):
    sweep = tmp_path / "sweep"
    out = ctxlab(
        "-m", "hydra/sweeper=optuna", "phase.optimizer.lr=interval(1e-4,1e-2)", f"hydra.sweep.dir={sweep}",
        *FAST_TRIAL, *args, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr[-3000:]
    assert not (sweep / "0").exists()


@pytest.mark.slow
def test_optuna_study_of_real_jobs_records_trials_and_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    out = ctxlab(
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.objective=val_ppl", "hydra.sweeper.n_trials=3",
        "phase.optimizer.lr=tag(log,interval(1e-4,1e-1))", f"hydra.sweep.dir={sweep}", *FAST_TRIAL,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    study = json.loads((sweep / "optuna_study.json").read_text())
    assert study["objective"] == "val_ppl" and study["direction"] == "minimize"
    trials = study["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and all(t["state"] == "COMPLETE" for t in trials)
    lrs = [t["params"]["phase.optimizer.lr"] for t in trials]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    for t in trials:
        job = Path(t["job_dir"])
        assert job == (sweep / str(t["job_num"])).resolve()
        # The value is the job's own measurement, with the trial's learning rate.
        assert t["value"] == pytest.approx(val_ppl_logged(job), rel=1e-6)
        assert f"phase.optimizer.lr={t['params']['phase.optimizer.lr']}" in t["overrides"]
        assert json.loads((job / "meta.json").read_text())["seed"] == 1234
    best = min(trials, key=lambda t: t["value"])
    assert study["best"] == best
    assert len({t["value"] for t in trials}) == 3  # different learning rates, different results
