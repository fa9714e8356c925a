"""``ctxlab-export RUN_DIR OUT``: a fine-tuned HF run as a plain transformers checkpoint.

Rebuilds the run's model from ``RUN_DIR/config.yaml`` (the resolved config every job writes),
loads the trained weights (``RUN_DIR/checkpoints/last.ckpt`` unless ``--checkpoint``), merges the
LoRA adapters, writes the rope settings and context window of the run's position scheme into the
config and saves weights and tokenizer (``save_pretrained``) to ``OUT``
(``ctxlab.model.hf_lora.export_hf``). It says which training step it exports and refuses a
checkpoint that is not the finished run's last step unless ``--allow-unfinished``. It then
reloads ``OUT`` with ``AutoModelForCausalLM`` alone, checks that its logits equal the ctxlab
model's (dense attention, evaluation positions) on a sample and that its rotary tables equal the
scheme's, to float32's rounding, at positions up to the exported window (at least twice the
source model's), and generates from ``--prompt``::

    ctxlab-export outputs/2026-11-25/12-00-00 exported/ --prompt "The passkey is"
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# Files of which a tokenizer loads (tokenizers' JSON or a SentencePiece model).
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")
CHECK_TOKENS = 64  # tokens of the logit comparison
ANGLE_ROUNDINGS = 8  # float32 roundings allowed in HF's rotary angle (its inv_freq pow, the product)
TABLE_ROUNDING = 1e-6  # float32 cos/sin, computed at different precisions


class ExportError(ValueError):
    """An export that cannot work; the message names the culprit."""


def checkpoint_step(ckpt: Path) -> int:
    """The training step a Lightning checkpoint holds (read lazily: no weights are loaded)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: name it
        raise ExportError(f"--checkpoint: {ckpt} is not a readable checkpoint ({e})") from e
    if not isinstance(state, dict) or "global_step" not in state:
        raise ExportError(f"--checkpoint: {ckpt} is not a Lightning checkpoint (no global_step)")
    return int(state["global_step"])


def training_progress(run_dir: Path, cfg, step: int) -> dict:
    """Where ``step`` stands in the run: ``step``, ``max_steps`` (None without a step budget),
    ``final_step`` (the step the finished fit ended at, from ``results/fit.json``; None while
    the run has not finished) and ``finished`` (``step`` is that final step)."""
    fit = run_dir / "results" / "fit.json"
    final = json.loads(fit.read_text()).get("steps") if fit.is_file() else None
    budget = int(cfg.trainer.get("max_steps") or -1)
    return {"step": step, "max_steps": budget if budget > 0 else None, "final_step": final,
            "finished": final is not None and int(final) == step}  # fmt: skip


def describe_progress(progress: dict) -> str:
    of = f" of {progress['max_steps']}" if progress["max_steps"] else ""
    if progress["finished"]:
        return f"step {progress['step']}{of} (the finished run's last step)"
    if progress["final_step"] is None:
        return f"step {progress['step']}{of}, from a run that did not finish (no results/fit.json)"
    return f"step {progress['step']}{of}, but the run finished at step {progress['final_step']}"


def load_run(run_dir: Path, checkpoint: Path | None, *, allow_unfinished: bool = False):
    """(config, model with the trained weights, checkpoint used, training progress); refusals
    (an unfinished run, a source RoPE the scheme would drop) come before any weights load."""
    from omegaconf import OmegaConf

    import ctxlab.config  # noqa: F401  (resolvers)
    from ctxlab.build import build_model, is_hf
    from ctxlab.model.hf_lora import check_source_rope
    from ctxlab.weights import load_weights

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"RUN_DIR: {run_dir} has no config.yaml; pass the run directory of a ctxlab job")
    cfg = OmegaConf.load(cfg_path)
    if not is_hf(cfg):
        raise ExportError(
            f"{cfg_path}: model is ctxlab's own decoder ({cfg.model.get('_target_')}), not an HF model; "
            "only model=hf/smollm2/llama2_7b/mistral_7b runs export to transformers"
        )
    ckpt = checkpoint or run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise ExportError(f"--checkpoint: no checkpoint file at {ckpt}")
    progress = training_progress(run_dir, cfg, checkpoint_step(ckpt))
    if not progress["finished"] and not allow_unfinished:
        raise ExportError(
            f"{ckpt} holds {describe_progress(progress)}; pass --allow-unfinished to export it anyway"
        )
    model = build_model(cfg)
    try:
        check_source_rope(model)
    except ValueError as e:
        raise ExportError(str(e)) from e
    load_weights(model, ckpt, "--checkpoint")
    return cfg, model.eval(), ckpt, progress


def sample_logits(model, vocab_size: int, n_tokens: int = CHECK_TOKENS) -> torch.Tensor:
    """float32 logits ``[1, n_tokens, V]`` of ``model`` (ctxlab's or the reloaded HF model) on
    one fixed sample of random tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (1, n_tokens), generator=g)
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out).float()


def check_end(model, reloaded) -> int:
    """The positions the rotary check covers end here: at the exported window or twice the
    source model's, whichever is later (``dynamic``'s base has grown there and every factor
    shows), below the exact-float32 position limit."""
    from ctxlab.position.base import MAX_EXACT_POSITION

    source_window = int(model.hf.config.max_position_embeddings)
    return min(max(int(reloaded.config.max_position_embeddings), 2 * source_window), MAX_EXACT_POSITION)


def rotary_error(model, reloaded, end: int, samples: int = 4096) -> float:
    """How far the reloaded export's rotary tables are from the scheme's at ``samples``
    positions spread over ``0 .. end - 1``, in units of what float32 explains.

    HF forms each angle ``p * inv_freq`` in float32 (a few roundings of relative size 2**-24;
    ``ANGLE_ROUNDINGS`` of them allowed), the scheme in float64, so at position 500K the two
    differ by up to ~0.1 rad in the fastest frequency with both correct. Each cos/sin entry's
    difference is divided by that bound (plus the tables' own rounding); a result above 1 means
    the exported rope settings rotate differently from the fine-tuned model (a wrong base,
    factor or window is off by whole radians)."""
    ids_1L = torch.unique(torch.linspace(0, end - 1, samples).round().long()).unsqueeze(0)
    position = model.position
    with torch.no_grad():
        cos, sin = position.cos_sin(ids_1L)  # float32 [1, L, D]
        cos_hf, sin_hf = reloaded.model.rotary_emb(torch.zeros((), dtype=torch.float32), ids_1L)
    # The scheme's undilated frequencies bound every frequency it uses (dynamic NTK only slows them).
    inv_freq = position.inv_freq.double().repeat(2)  # [D], rotate-half layout
    angle_error = ANGLE_ROUNDINGS * 2.0**-24 * ids_1L[0, :, None].double() * inv_freq  # [L, D]
    bound = angle_error * position.attention_scaling + TABLE_ROUNDING
    err = torch.maximum((cos_hf[0].double() - cos[0]).abs(), (sin_hf[0].double() - sin[0]).abs())
    return float((err / bound).max())


def generate(reloaded, out_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by the reloaded export and the tokenizer saved with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = reloaded.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    dtype: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 32,
    tolerance: float | None = None,
    allow_unfinished: bool = False,
    say=None,
) -> dict:
    """Export, reload, compare logits, generate; returns (and writes to OUT/ctxlab_export.json)
    a report. ``tolerance`` (default: 1e-3 for float32 weights, 0.1 otherwise; for weights cast
    by ``dtype``, at least twice what the same cast changes the ctxlab model's logits) bounds the
    logit difference from the trained model; beyond it the export is refused as wrong. A
    checkpoint other than the finished run's last step is refused unless ``allow_unfinished``;
    ``say`` gets one line naming the step exported."""
    from ctxlab.model.hf_lora import export_hf

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"OUT: {out_dir} exists and is not empty; choose a new folder")
    cfg, model, ckpt, progress = load_run(
        run_dir, Path(checkpoint) if checkpoint else None, allow_unfinished=allow_unfinished
    )
    if say is not None:
        say(f"exporting {ckpt}: {describe_progress(progress)}")
    src = model.source_dir  # its tokenizer is saved with the export
    if prompt is not None and (src is None or not any((src / f).exists() for f in TOKENIZER_MODELS)):
        raise ExportError(
            f"--prompt: the run's model ({cfg.model.source}) brought no tokenizer (a random shape has "
            "none); drop --prompt or export a run of a checkpoint with its tokenizer"
        )
    from ctxlab.model.hf_sources import torch_dtype

    if dtype is not None:
        torch_dtype(dtype)  # a bad name fails before the export
    export_hf(model, out_dir, dtype=dtype, trained_length=int(cfg.data.seq_len))
    weights_dtype = dtype or str(cfg.model.get("dtype", "float32"))
    tol = tolerance if tolerance is not None else (1e-3 if weights_dtype == "float32" else 0.1)
    vocab = model.config.vocab_size
    ours = sample_logits(model, vocab)
    own_rounding = None
    if dtype is not None and torch_dtype(dtype) != next(model.parameters()).dtype:
        # A cast export is judged against what the cast costs ctxlab's own model (flash-attention's
        # rule: at most twice PyTorch's error in the same precision), not a bare tolerance.
        own_rounding = float((sample_logits(model.to(torch_dtype(dtype)), vocab) - ours).abs().max())
        tol = max(tol, 2 * own_rounding) if tolerance is None else tol
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, dtype="auto").eval()
    diff = float((sample_logits(reloaded, vocab) - ours).abs().max())
    if not diff <= tol:
        raise ExportError(
            f"the reloaded export's logits differ from the ctxlab model's by {diff:.3g} > {tol:g}; "
            f"{out_dir} is not a faithful export"
        )
    end = check_end(model, reloaded)
    rotary = rotary_error(model, reloaded, end)
    if not rotary <= 1.0:
        raise ExportError(
            f"the reloaded export rotates positions 0..{end - 1} differently from the ctxlab model "
            f"({rotary:.3g} times float32's rounding; config.json: rope_parameters="
            f"{reloaded.config.rope_parameters}, max_position_embeddings="
            f"{reloaded.config.max_position_embeddings}); {out_dir} is not a faithful export"
        )
    report = {"run_dir": str(run_dir), "checkpoint": str(ckpt), **progress, "out_dir": str(out_dir),
              "dtype": weights_dtype, "rope_parameters": model.position.hf_rope_scaling(),
              "max_position_embeddings": int(reloaded.config.max_position_embeddings),
              "source_max_position_embeddings": int(model.hf.config.max_position_embeddings),
              "max_logit_diff": diff, "tolerance": tol, "cast_logit_diff": own_rounding,
              "rotary_checked_to": end - 1,
              "rotary_error_vs_float32": rotary}  # fmt: skip
    if prompt is not None:
        report["prompt"], report["generated"] = prompt, generate(reloaded, out_dir, prompt, max_new_tokens)
    (out_dir / "ctxlab_export.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctxlab-export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a ctxlab run directory (holds config.yaml and checkpoints/)")
    p.add_argument("out_dir", help="new folder for the transformers checkpoint")
    p.add_argument("--checkpoint", default=None, help="weights (default RUN_DIR/checkpoints/last.ckpt)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", default=None, help="generate from this prompt with the exported model")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=None, help="max logit difference accepted")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a checkpoint that is not the finished run's last step")  # fmt: skip
    a = p.parse_args(argv)
    try:
        from ctxlab.extras import require

        require("hf", "transformers", "peft", why="ctxlab-export")
        report = export_run(
            a.run_dir, a.out_dir, checkpoint=a.checkpoint, dtype=a.dtype, prompt=a.prompt,
            max_new_tokens=a.max_new_tokens, tolerance=a.tolerance, allow_unfinished=a.allow_unfinished,
            say=lambda line: print(f"ctxlab-export: {line}", file=sys.stderr, flush=True),
        )  # fmt: skip
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"ctxlab-export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
