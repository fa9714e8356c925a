"""Needle in a haystack of book text (ctxlab.eval.niah): deterministic samples of the asked
length, RULER's scoring, ``eval.niah`` in a job (results files, summary, W&B with the run's
other metrics, its job type and its weights as an artifact, read back from the offline run)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, wandb_records, wandb_summary_keys

from ctxlab.data.tokenizers import ByteTokenizer, TiktokenTokenizer
from ctxlab.eval import niah
from ctxlab.eval.cells import CellStore
from ctxlab.eval.intervals import wilson
from ctxlab.eval.niah import NiahConfig, comparable_grid, make_sample, niah_by_length, niah_grid, score

BYTES = ByteTokenizer()


@pytest.mark.parametrize("tokenizer", [BYTES, TiktokenTokenizer()], ids=["byte", "cl100k"])
@pytest.mark.parametrize("variant", list(niah.VARIANTS))
def test_samples_are_deterministic_and_as_long_as_asked(tokenizer, variant):
    length = 1000
    a = make_sample(tokenizer, variant, length, 3, seed=7)
    assert a == make_sample(tokenizer, variant, length, 3, seed=7)
    assert a != make_sample(tokenizer, variant, length, 4, seed=7)
    n = len(tokenizer.encode(a.prompt))
    assert n == a.n_tokens and length - 16 <= n <= length  # cut within a word of the length
    n_keys, n_values = niah.VARIANTS[variant]
    assert len(a.outputs) == n_values and len(set(a.outputs)) == n_values
    needles = a.prompt.count("One of the magic numbers for ")
    assert needles == n_keys * n_values
    for v in a.outputs:
        assert f"One of the magic numbers for {a.query} is {v}." in a.prompt
    assert a.prompt.endswith(f"The magic numbers for {a.query} are")
    assert a.prompt.startswith(niah.HEAD)


def test_haystack_is_the_shipped_books_test_split():
    sentences = niah.haystack_sentences()
    assert len(sentences) > 1000 and sentences[0].startswith("MANSFIELD PARK")
    sample = make_sample(BYTES, "single", 2000, 0)
    body = sample.prompt[len(niah.HEAD) :]
    assert sum(s in body for s in sentences[:20000]) >= 3  # whole sentences of real text


def test_a_length_too_short_for_the_prompt_is_named():
    with pytest.raises(ValueError, match="NIAH length 300 is too short for the multikey prompt"):
        make_sample(BYTES, "multikey", 300, 0)
    with pytest.raises(ValueError, match="eval.niah.variants \\['nosuch'\\]"):
        NiahConfig(lengths=[512], variants=["nosuch"])
    with pytest.raises(ValueError, match="eval.niah.lengths"):
        NiahConfig(lengths=[512, 512], variants=["single"])


def test_score_is_rulers_string_match_all():
    assert score("the numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert score("only 456", ["123", "456"]) == 0.5
    assert score("", ["1"]) == 0.0


def _answering(monkeypatch, found: dict[str, int]):
    """Make the grid's decoding answer with the first ``found[variant]`` asked values (no model
    of this size finds needles), counting the calls."""
    calls = []

    def fake_generate(model, ids, n_new, *, chunk_size=0):
        prompt = BYTES.decode(ids[0].tolist())
        for variant, k in found.items():
            for s in niah.samples(BYTES, [variant], [512], 3):
                if s.prompt == prompt:
                    calls.append(s)
                    return torch.tensor([BYTES.encode(" " + ", ".join(s.outputs[:k]) + ".")])
        raise AssertionError("not a prompt of the grid")

    monkeypatch.setattr(niah, "greedy_generate", fake_generate)
    return calls


def test_grid_rows_pool_values_with_wilson_intervals_and_resume(monkeypatch, tmp_path):
    calls = _answering(monkeypatch, {"single": 1, "multivalue": 2})
    cfg = NiahConfig(lengths=[512], variants=["single", "multivalue"], trials=3)
    with CellStore(tmp_path / "cells.jsonl", {"fp": 1}) as store:
        rows = niah_grid(tiny_model(vocab=259), BYTES, cfg, store=store, progress=False)
    single, multi = rows
    assert (single["found"], single["asked"], single["score"]) == (3, 3, 1.0)
    assert (multi["found"], multi["asked"], multi["score"]) == (6, 12, 0.5)
    assert (multi["lo"], multi["hi"]) == pytest.approx(wilson(6, 12))
    (pooled,) = niah_by_length(rows)
    assert (pooled["found"], pooled["asked"]) == (9, 15)
    assert (pooled["lo"], pooled["hi"]) == pytest.approx(wilson(9, 15))
    assert len(calls) == 6
    # Every sample's answer was kept: the same grid again decodes nothing and gives the same rows.
    with CellStore(tmp_path / "cells.jsonl", {"fp": 1}) as store:
        assert niah_grid(tiny_model(vocab=259), BYTES, cfg, store=store, progress=False) == rows
    assert len(calls) == 6


def test_grids_recorded_before_niah_equal_todays_with_niah_off():
    old = {"perplexity": {"lengths": [64]}, "passkey": {"lengths": [300]}}
    off = old | {"niah": {"lengths": [512], "enabled": False}}
    on = old | {"niah": {"lengths": [512], "enabled": True}}
    assert comparable_grid(off) == comparable_grid(old) == old
    assert comparable_grid(on) != comparable_grid(old)


def ctxlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "ctxlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_job_with_niah_writes_results_and_a_sortable_wandb_run(tmp_path):
    run = tmp_path / "run"
    out = ctxlab(
        "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "data.seq_len=64", "data.batch_size=2", "logger=wandb",
        "eval.perplexity.lengths=[32]", "eval.perplexity.max_tokens=32", "eval.passkey.lengths=[300]",
        "eval.passkey.depths=[0.5]", "eval.passkey.trials=1", "eval.causality.enabled=false",
        "eval.niah.enabled=true", "eval.niah.lengths=[400,512]", "eval.niah.trials=1",
        "eval.niah.variants=[single,multivalue]", "eval.niah.max_new_tokens=4", f"hydra.run.dir={run}",
        cwd=tmp_path,
    )  # fmt: skip
    assert "niah @     512:" in out.stdout
    rows = json.loads((run / "results" / "niah.json").read_text())
    assert [(r["variant"], r["length"], r["asked"]) for r in rows] == [
        ("single", 400, 1), ("single", 512, 1), ("multivalue", 400, 4), ("multivalue", 512, 4)
    ]  # fmt: skip
    with (run / "results" / "niah.csv").open() as f:
        assert [int(r["length"]) for r in csv.DictReader(f)] == [400, 512, 400, 512]
    summary = json.loads((run / "results" / "summary.json").read_text())
    assert [r["length"] for r in summary["niah_by_length"]] == [400, 512]
    cells = (run / "results" / "cells.jsonl").read_text()
    assert cells.count('"key":"niah/') == 4
    from ctxlab.compare import compare_runs

    table = Path(compare_runs([run], tmp_path / "compare")["table_md"]).read_text()
    assert "| niah@400 | niah@512 |" in table

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    keys = wandb_summary_keys(run_file)
    wanted = {"val_ppl", "ppl@32", "passkey@300", "niah@400", "niah@512", "niah_mean", "fit_seconds",
              "train_seconds", "train_tokens", "tokens_per_s", "peak_rss_gib"}  # fmt: skip
    assert wanted <= keys, wanted - keys
    records = wandb_records(run_file)
    (job,) = {r.run.job_type for r in records if r.WhichOneof("record_type") == "run"}
    assert job == "train"
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = [a for a in artifacts if a.type == "model"]  # the others: the evaluation's tables
    assert artifact.type == "model" and artifact.name.startswith("weights-")
    files = {e.path for e in artifact.manifest.contents}
    assert {"meta.json", "trainable.safetensors"} <= files
    assert {"latest", "step2"} <= set(artifact.aliases)


def test_a_niah_length_too_short_stops_the_job_before_work(tmp_path):
    env = os.environ | {"WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "ctxlab", "logger=csv", "eval.niah.enabled=true",
         "eval.niah.lengths=[300,512]", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "eval.niah: NIAH length 300 is too short for the multikey prompt" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert not (tmp_path / "r" / "checkpoints").exists()
