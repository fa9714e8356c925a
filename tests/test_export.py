"""`ctxlab-export`: a fine-tuned HF run becomes a plain transformers checkpoint that reloads with
the same logits and generates; bad runs are refused naming the culprit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctxlab.export import ExportError, export_run

TINY_HF = [
    "model=llama2_7b", "model.init_device=cpu", "model.dtype=float32", "model.head_dim=16",
    "+model.overrides.num_hidden_layers=2", "+model.overrides.hidden_size=64",
    "+model.overrides.intermediate_size=128", "+model.overrides.num_attention_heads=4",
    "+model.overrides.num_key_value_heads=2", "+model.overrides.head_dim=16",
    "+model.overrides.vocab_size=300",
]  # fmt: skip
FAST = ["phase=finetune", "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "data.batch_size=1", "logger=csv", "phase.evaluate=false"]  # fmt: skip


def ctxlab(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ctxlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_smollm2_run_exports_reloads_and_generates(tmp_path):
    run = tmp_path / "run"
    ctxlab("experiment=finetune_smollm2", f"hydra.run.dir={run}", *FAST, "data.seq_len=256",
           "attention.region=8", "attention.budget=8", "attention.merge=2", cwd=tmp_path)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "ctxlab.export", str(run), str(tmp_path / "out"), "--prompt",
         "It is a truth universally acknowledged", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "ctxlab_export.json").read_text())
    assert report["max_logit_diff"] <= report["tolerance"]
    # CRD NTK evaluates with a fixed NTK scale, i.e. a larger RoPE base: the export carries it.
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"] == report["rope_parameters"]
    assert cfg["rope_parameters"]["rope_theta"] > 100000.0  # SmolLM2's own base
    assert isinstance(report["generated"], str) and report["generated"].strip()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_export_refusals_name_the_culprit(tmp_path):
    with pytest.raises(ExportError, match="has no config.yaml"):
        export_run(tmp_path, tmp_path / "out")
    own = tmp_path / "own"
    ctxlab(f"hydra.run.dir={own}", "trainer=cpu", "trainer.max_steps=1", "data.seq_len=32",
           "data.batch_size=1", "logger=csv", "phase.evaluate=false", cwd=tmp_path)  # fmt: skip
    with pytest.raises(ExportError, match="ctxlab's own decoder"):
        export_run(own, tmp_path / "out")
    hf = tmp_path / "hf"
    ctxlab(f"hydra.run.dir={hf}", *TINY_HF, *FAST, "data.seq_len=32", cwd=tmp_path)
    with pytest.raises(ExportError, match="--checkpoint: no checkpoint file"):
        export_run(hf, tmp_path / "out", checkpoint=tmp_path / "missing.ckpt")
    with pytest.raises(ExportError, match="--prompt: .*no tokenizer"):
        export_run(hf, tmp_path / "out", prompt="hi")
    assert not (tmp_path / "out").exists()  # nothing written by a refused export
    report = export_run(hf, tmp_path / "out")
    assert report["max_logit_diff"] < 1e-3
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(hf, tmp_path / "out")
