"""``ctxlab-export RUN_DIR OUT``: a fine-tuned HF run as a plain transformers checkpoint.

Rebuilds the run's model from ``RUN_DIR/config.yaml`` (the resolved config every job writes),
loads the trained weights (``RUN_DIR/checkpoints/last.ckpt`` unless ``--checkpoint``), merges the
LoRA adapters, writes the rope settings of the run's position scheme into the config and saves
weights and tokenizer to ``OUT``. It then reloads ``OUT`` with ``AutoModelForCausalLM`` alone,
checks that its logits equal the ctxlab model's (dense attention, evaluation positions) on a
sample, and generates from ``--prompt``::

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


class ExportError(ValueError):
    """An export that cannot work; the message names the culprit."""


def load_run(run_dir: Path, checkpoint: Path | None):
    """(config, model with the trained weights, checkpoint used); errors before any weights."""
    from omegaconf import OmegaConf

    import ctxlab.config  # noqa: F401  (resolvers)
    from ctxlab.run import build_model, is_hf, load_weights

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
    model = build_model(cfg)
    load_weights(model, ckpt, "--checkpoint")
    return cfg, model.eval(), ckpt


def max_logit_diff(model, reloaded, n_tokens: int = 64) -> float:
    """Max |logit difference| between the ctxlab model and the reloaded export on one sample."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=g)
    with torch.no_grad():
        ours = model(x).float()
        theirs = reloaded(x).logits.float()
    return float((ours - theirs).abs().max())


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
) -> dict:
    """Export, reload, compare logits, generate; returns (and writes to OUT/ctxlab_export.json)
    a report. ``tolerance`` (default: 1e-3 for float32 weights, 0.1 otherwise) bounds the logit
    difference; beyond it the export is refused as wrong."""
    from ctxlab.model.hf_lora import export_hf

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"OUT: {out_dir} exists and is not empty; choose a new folder")
    cfg, model, ckpt = load_run(run_dir, Path(checkpoint) if checkpoint else None)
    src = model.source_dir  # its tokenizer files are copied along with the export
    if prompt is not None and (src is None or not any((src / f).exists() for f in TOKENIZER_MODELS)):
        raise ExportError(
            f"--prompt: the run's model ({cfg.model.source}) brought no tokenizer (a random shape has "
            "none); drop --prompt or export a run of a checkpoint with its tokenizer"
        )
    if dtype is not None:
        from ctxlab.model.hf_sources import torch_dtype

        torch_dtype(dtype)  # a bad name fails before the export
    export_hf(model, out_dir, dtype=dtype)
    weights_dtype = dtype or str(cfg.model.get("dtype", "float32"))
    tol = tolerance if tolerance is not None else (1e-3 if weights_dtype == "float32" else 0.1)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, dtype="auto").eval()
    diff = max_logit_diff(model, reloaded)
    if not diff <= tol:
        raise ExportError(
            f"the reloaded export's logits differ from the ctxlab model's by {diff:.3g} > {tol:g}; "
            f"{out_dir} is not a faithful export"
        )
    report = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "out_dir": str(out_dir),
              "dtype": weights_dtype, "rope_parameters": model.position.hf_rope_scaling(),
              "max_logit_diff": diff, "tolerance": tol}  # fmt: skip
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
    a = p.parse_args(argv)
    try:
        report = export_run(
            a.run_dir, a.out_dir, checkpoint=a.checkpoint, dtype=a.dtype, prompt=a.prompt,
            max_new_tokens=a.max_new_tokens, tolerance=a.tolerance,
        )  # fmt: skip
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"ctxlab-export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
