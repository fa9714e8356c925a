"""`ctxlab-export`: a fine-tuned HF run becomes a plain transformers checkpoint that reloads with
the same logits at any length, says which step it holds and generates; bad runs are refused
naming the culprit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctxlab.export import ExportError, checkpoint_step, export_run, load_run, main, rotary_error

TINY_HF = [
    "model=llama2_7b", "model.init_device=cpu", "model.dtype=float32", "model.head_dim=16",
    "+model.overrides.num_hidden_layers=2", "+model.overrides.hidden_size=64",
    "+model.overrides.intermediate_size=128", "+model.overrides.num_attention_heads=4",
    "+model.overrides.num_key_value_heads=2", "+model.overrides.head_dim=16",
    "+model.overrides.vocab_size=300",
]  # fmt: skip
FAST = ["phase=finetune", "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "data.batch_size=1", "logger=csv", "phase.evaluate=false"]  # fmt: skip


WINDOW = 32  # the tiny source model's max_position_embeddings (the fine-tuning rows are 32 too)


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
    assert "step 2 of 2 (the finished run's last step)" in proc.stderr
    assert (report["step"], report["finished"]) == (2, True)
    # The window is SmolLM2's 8192 times the NTK evaluation scale (scale_inf=64); the rotary
    # tables agree to float32 rounding up to it, and the tokenizer was saved knowing it.
    assert cfg["max_position_embeddings"] == report["max_position_embeddings"] == 8192 * 64
    assert report["rotary_checked_to"] == 8192 * 64 - 1 and report["rotary_error_vs_float32"] <= 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert tok.model_max_length == 8192 * 64
    assert tok.decode(tok("It is a truth").input_ids) == "It is a truth"
    # bfloat16 weights from a float32 fine-tune: judged against what the same cast costs ctxlab's
    # own model (a bare 0.1 refused this export, 1.2 logits off after 30 bf16 layers).
    half = export_run(run, tmp_path / "bf16", dtype="bfloat16")
    assert half["dtype"] == "bfloat16" and half["max_logit_diff"] <= 2 * half["cast_logit_diff"]


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
    # One step, a copy of that checkpoint kept, then resumed to the run's two steps.
    ctxlab(f"hydra.run.dir={hf}", *TINY_HF, *FAST, "data.seq_len=32", "trainer.max_steps=1", cwd=tmp_path)
    early = tmp_path / "early.ckpt"
    shutil.copy2(hf / "checkpoints" / "last.ckpt", early)
    ctxlab(f"hydra.run.dir={hf}", *TINY_HF, *FAST, "data.seq_len=32", cwd=tmp_path)
    with pytest.raises(ExportError, match="--checkpoint: no checkpoint file"):
        export_run(hf, tmp_path / "out", checkpoint=tmp_path / "missing.ckpt")
    with pytest.raises(ExportError, match="--prompt: .*no tokenizer"):
        export_run(hf, tmp_path / "out", prompt="hi")
    assert not (tmp_path / "out").exists()  # nothing written by a refused export
    lines = []
    report = export_run(hf, tmp_path / "out", say=lines.append)
    assert report["max_logit_diff"] < 1e-3
    assert lines == [
        f"exporting {hf / 'checkpoints' / 'last.ckpt'}: step 2 of 2 (the finished run's last step)"
    ]
    with pytest.raises(ExportError, match=r"early\.ckpt holds step 1 of 2, but the run finished at step 2"):
        export_run(hf, tmp_path / "mid", checkpoint=early)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ExportError, match="notes.ckpt is not a readable checkpoint"):
        export_run(hf, tmp_path / "mid", checkpoint=text)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(hf, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("position", "settings", "window"),
    [
        pytest.param("crd_ntk", [], WINDOW * 64, id="crd_ntk"),  # NTK evaluation scale scale_inf=64
        pytest.param("pi", ["position.scale=4"], WINDOW * 4, id="pi"),
        # HF's dynamic reads its original window from max_position_embeddings: the scheme's 16,
        # not the source's 32.
        pytest.param("dynamic_ntk", ["position.original_max_position=16"], 16, id="dynamic_ntk"),
    ],
)
def test_export_describes_the_fine_tuned_model_beyond_the_window(tmp_path, position, settings, window):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    ctxlab(f"hydra.run.dir={run}", *TINY_HF, f"+model.overrides.max_position_embeddings={WINDOW}", *FAST,
           f"data.seq_len={WINDOW}", f"position={position}", *settings, cwd=tmp_path)  # fmt: skip
    report = export_run(run, tmp_path / "out")
    _, model, _, _ = load_run(run, None)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    assert reloaded.config.max_position_embeddings == report["max_position_embeddings"] == window
    assert reloaded.config.rope_parameters == model.position.hf_rope_scaling()
    assert report["rotary_error_vs_float32"] <= 1
    x = torch.randint(0, 300, (2, 161), generator=torch.Generator().manual_seed(3))  # 5x the window
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-4, rtol=1e-4)
    if position == "dynamic_ntk":  # the source's window there (the old export) computes otherwise
        reloaded.config.max_position_embeddings = WINDOW
        stale = AutoModelForCausalLM.from_config(reloaded.config).eval()
        stale.load_state_dict(reloaded.state_dict())
        assert rotary_error(model, stale, x.shape[1]) > 100  # whole radians, not float32 rounding
        with torch.no_grad():
            assert (stale(x).logits - expected).abs().max() > 10 * 1e-4


@pytest.mark.slow
def test_unfinished_run_says_its_step_and_needs_allow_unfinished(tmp_path, capsys):
    """A run killed (-9) after its first checkpoint, long before its 200 steps."""
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", *TINY_HF, *FAST, "data.seq_len=32", "trainer.max_steps=200"]
    proc = subprocess.Popen([sys.executable, "-m", "ctxlab", *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 600
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last.is_file() and not (run / "results" / "fit.json").exists()
    step = checkpoint_step(last)
    assert 2 <= step < 200
    assert main([str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"holds step {step} of 200, from a run that did not finish" in err
    assert "--allow-unfinished" in err and not (tmp_path / "out").exists()
    assert main([str(run), str(tmp_path / "out"), "--allow-unfinished"]) == 0
    assert f"exporting {last}: step {step} of 200, from a run that did not finish" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "ctxlab_export.json").read_text())
    assert (report["step"], report["max_steps"], report["finished"]) == (step, 200, False)


def tiny_checkpoint(folder: Path, rope: dict) -> Path:
    """A one-layer Llama folder (window ``WINDOW``) with its own rope settings and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=WINDOW,
        rope_parameters={**rope, "rope_theta": 10000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "it": 2, "is": 3, "a": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>")
    tok.save_pretrained(str(folder))
    return folder


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": WINDOW}  # fmt: skip
LINEAR = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    ("source_rope", "scheme", "window"),
    [
        pytest.param(LLAMA3, "rope", None, id="llama3-source-rope-refused"),
        pytest.param(LINEAR, "ntk", None, id="linear-source-ntk-refused"),
        pytest.param(LINEAR, "pi", WINDOW * 4, id="linear-source-pi"),
        pytest.param({"rope_type": "default"}, "ntk", WINDOW * 4, id="default-source-ntk"),
    ],
)
def test_source_rope_scaling_is_checked_and_tokenizer_saved(tmp_path, source_rope, scheme, window):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxlab.attention import DenseAttention
    from ctxlab.model.hf import HFModelSpec
    from ctxlab.model.hf_build import build_hf_model
    from ctxlab.model.hf_lora import export_hf
    from ctxlab.position import LinearPI, NTKAware, Rope

    source = tiny_checkpoint(tmp_path / "source", source_rope)
    position = {"rope": lambda: Rope(16, 10000.0), "ntk": lambda: NTKAware(16, 10000.0, 4.0),
                "pi": lambda: LinearPI(16, 10000.0, 4.0)}[scheme]()  # fmt: skip
    spec = HFModelSpec(source=str(source), head_dim=16, gradient_checkpointing=False)
    if window is None:  # refused when the model is built, before any training (and at export)
        kind = source_rope["rope_type"]
        with pytest.raises(ValueError, match=f"with rope_type='{kind}'.*position={scheme} exports"):
            build_hf_model(spec, DenseAttention, position)
        return
    model = build_hf_model(spec, DenseAttention, position).eval()
    out = export_hf(model, tmp_path / "out", trained_length=WINDOW)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert reloaded.config.max_position_embeddings == window
    assert reloaded.config.rope_parameters == position.hf_rope_scaling()
    x = torch.randint(0, 64, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x), atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.model_max_length == window and tok.eos_token == "</s>"
    assert tok("it is a").input_ids == [2, 3, 4]
