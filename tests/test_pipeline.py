"""The `ctxlab` app end to end (subprocesses, as a user runs it): every declared experiment as a
fast dev run, a pretrain -> resume -> extrapolate chain with real W&B offline files, and the
bad-input errors that must stop a job before work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import wandb_records, wandb_summary_keys

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
# A grid small enough for a fast dev run on 2 cores.
TINY_EVAL = [
    "eval.perplexity.lengths=[32,96]",
    "eval.perplexity.max_tokens=96",
    "eval.passkey.lengths=[300]",
    "eval.passkey.depths=[0.5]",
    "eval.passkey.trials=1",
]


def ctxlab(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ctxlab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ctxlab {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# What a CPU fast dev run of a GPU-sized experiment changes (its file says the same). Studies
# with the fixed-targets perplexity protocol score a fixed number of targets, not max_tokens.
FIXED_TARGETS = [
    "eval.perplexity.max_tokens=0",
    "eval.perplexity.targets=32",
    "eval.join_documents=3000",
    "eval.perplexity.chunk_size=0",
    "eval.passkey.chunk_size=0",
]
CPU_SIZED = {
    "finetune_smollm2": ["trainer=cpu", "data.seq_len=256", "attention.region=8", "attention.budget=8",
                         "attention.merge=2"],
    "study_smollm2_16k": ["trainer=cpu", "model.dtype=float32", "data.seq_len=256", "attention.region=8",
                          "attention.budget=8", "attention.merge=2", "eval.scale_search.length=512",
                          "eval.scale_search.max_tokens=512", "eval.scale_search.candidates=[1,4]",
                          *FIXED_TARGETS, "study.only=[base+ntk,ms_paper+crd,s2+pi]"],
    "study_pretrain_books_2k": ["trainer=cpu", "data.seq_len=256", "attention.budget=8", "attention.merge=2",
                                *FIXED_TARGETS, "study.only=[dense+rope/s1,ms_causal+selected/s1]"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_as_fast_dev_run(experiment, tmp_path):
    out = ctxlab(
        f"experiment={experiment}", f"hydra.run.dir={tmp_path}", "trainer.fast_dev_run=true", "logger=csv",
        "data.batch_size=2", *TINY_EVAL, *CPU_SIZED.get(experiment, []), cwd=tmp_path,
    )  # fmt: skip
    summaries = [*tmp_path.glob("**/results/summary.json"), *tmp_path.glob("**/results/eval_*/summary.json")]
    assert summaries, out.stdout[-2000:]
    for s in summaries:
        data = json.loads(s.read_text())
        assert data["passkey"] and data["causal"] in (True, False)
        # A perplexity only from a causal evaluation; the paper's selection gets none.
        assert bool(data.get("perplexity")) == data["causal"], (s, data.get("perplexity_skipped"))
    if experiment == "quickstart":
        table = (tmp_path / "compare" / "table.md").read_text()
        for arm in ("dense+rope", "ms_paper+rope", "ms_causal+selected", "ms_paper+selected"):
            assert f"| {arm} |" in table
        # The audit flags the paper's selection as non-causal and the causal mode as causal.
        found = [json.loads(s.read_text()) for s in summaries]
        causal = {(d["name"], d["eval_attention"]): d["causal"] for d in found}
        assert causal == {("dense+rope", "trained"): True, ("ms_paper+rope", "trained"): False,
                          ("ms_paper+rope", "ms_causal"): True, ("ms_causal+selected", "trained"): True,
                          ("ms_paper+selected", "trained"): False,
                          ("ms_paper+selected", "ms_causal"): True}  # fmt: skip
        assert "| ms_paper+selected @ms_causal |" in table
        assert (tmp_path / "compare" / "perplexity.png").stat().st_size > 0
        assert (tmp_path / "compare" / "passkey.png").stat().st_size > 0


COMMON = ["data.seq_len=64", "data.batch_size=2", "trainer.val_check_interval=2",
          "trainer.limit_val_batches=1",
          "trainer.log_every_n_steps=1", *TINY_EVAL]  # fmt: skip


@pytest.mark.slow
def test_pretrain_resume_extrapolate_with_wandb_offline(tmp_path):
    run = tmp_path / "run"
    ctxlab("trainer.max_steps=4", f"hydra.run.dir={run}", "logger=wandb", *COMMON, cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    tables = list((run / "wandb").glob("offline-run-*/files/media/table/eval/*.json"))
    assert any("perplexity" in t.name for t in tables), tables
    # The run's summary holds the named metrics, so W&B's run table sorts by them (read back).
    keys = wandb_summary_keys(offline[0])
    assert {"val_ppl", "steps", "ppl@32", "ppl@96", "passkey@300", "passkey_mean", "causal", "fit_seconds",
            "train_seconds", "tokens_per_s", "peak_rss_gib"} <= keys, keys  # fmt: skip
    records = wandb_records(offline[0])
    assert {r.run.job_type for r in records if r.WhichOneof("record_type") == "run"} == {"train"}
    models = [
        r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    ]
    assert [m.name for m in models] == [f"weights-{run_id}"]  # the trained weights/, for wandb sync
    summary = json.loads((run / "results" / "summary.json").read_text())
    assert summary["causal"] is True and summary["steps"] == 4
    assert (run / "plots" / "perplexity.png").exists() and (run / "plots" / "passkey.png").exists()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["versions"]["torch"] and "commit" in meta["git"]

    # Restart in the same directory with a longer budget: resumes, same W&B run id.
    out = ctxlab("trainer.max_steps=6", f"hydra.run.dir={run}", "logger=wandb", *COMMON, cwd=tmp_path)
    assert "resuming from" in out.stdout
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 6
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both sessions, one id

    # Evaluate the checkpoint under another position scheme.
    ev = tmp_path / "eval"
    ctxlab("phase=extrapolate", f"phase.checkpoint={last}", "position=ntk", f"hydra.run.dir={ev}",
           "logger=csv",
           *COMMON, cwd=tmp_path)  # fmt: skip
    rows = json.loads((ev / "results" / "perplexity.json").read_text())
    assert [r["length"] for r in rows] == [32, 96] and all(r["n_tokens"] > 0 for r in rows)

    # A checkpoint of another model is refused before any evaluation, naming the setting.
    bad = ctxlab("phase=extrapolate", f"phase.checkpoint={last}", "model.dim=64", "model.head_dim=16",
                 f"hydra.run.dir={tmp_path / 'bad'}", "logger=csv", *COMMON, cwd=tmp_path,
                 check=False)  # fmt: skip
    assert bad.returncode != 0 and "model.dim" in bad.stderr and "different model" in bad.stderr


def test_bad_inputs_stop_before_work(tmp_path):
    cases = {
        "no checkpoint file": (
            ["phase=extrapolate", f"phase.checkpoint={tmp_path}/none.ckpt"],
            "no checkpoint file",
        ),
        "missing data file": (["data=local", f"data.paths=[{tmp_path}/missing.txt]"], "missing.txt"),
        "seq_len too long": (["data.seq_len=100000000"], "seq_len"),
        "passkey too short": (["eval.passkey.lengths=[20]"], "passkey"),
        "bad option": (["attention=nosuch"], "nosuch"),
    }
    for name, (args, needle) in cases.items():
        out = ctxlab(*args, f"hydra.run.dir={tmp_path / 'r'}", "logger=csv", cwd=tmp_path, check=False)
        assert out.returncode != 0, name
        assert needle in out.stderr + out.stdout, (name, out.stderr[-2000:])
        assert not (tmp_path / "r" / "checkpoints").exists(), name
