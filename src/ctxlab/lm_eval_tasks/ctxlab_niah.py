"""Dataset builders and scoring of ctxlab's NIAH tasks for lm-eval (the YAML files beside this
file; ``ctxlab.eval.niah`` makes the samples).

Task settings come from lm-eval's metadata, which holds the ``--model_args`` too:
``max_seq_lengths`` (prompt lengths in tokens, default [512, 1024]), ``trials`` (samples per
length, default 20), ``seed`` (default 0); the prompts are sized in the tokens of ``tokenizer``
(a ctxlab tokenizer spec, or a tokenizer folder) or else of the run's tokenizer (``run=<dir>``)."""

from __future__ import annotations

from pathlib import Path

from ctxlab.eval import niah

# Lengths with a metric of their own (niah@N) in the task files; others count in `score` only.
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def _tokenizer(kwargs: dict):
    from ctxlab.data.tokenizers import build_tokenizer

    spec = str(kwargs.get("tokenizer") or "")
    if spec:
        # A bare folder too: lm-eval's RULER tasks read the same key as a transformers name or path.
        return build_tokenizer(f"hf:{spec}" if Path(spec).is_dir() else spec)
    if kwargs.get("run"):
        from ctxlab.lm_eval import run_config, run_tokenizer

        return run_tokenizer(run_config(kwargs["run"]))
    raise ValueError(
        "ctxlab's NIAH tasks size their prompts in the model's tokens: give run=<ctxlab run dir> in "
        "--model_args, or tokenizer=<byte|tiktoken|hf:dir> in --metadata"
    )


def _dataset(variant: str, kwargs: dict):
    lengths = kwargs.get("max_seq_lengths") or [512, 1024]
    lengths = [int(x) for x in ([lengths] if isinstance(lengths, int | str) else lengths)]
    trials, seed = int(kwargs.get("trials", 20)), int(kwargs.get("seed", 0))
    return niah.lm_eval_dataset(_tokenizer(kwargs), variant, lengths, trials, seed)


def single(**kwargs):
    return _dataset("single", kwargs)


def multikey(**kwargs):
    return _dataset("multikey", kwargs)


def multivalue(**kwargs):
    return _dataset("multivalue", kwargs)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER's ``string_match_all`` as ``score`` and as ``niah@<its length>`` (-1 for the other
    lengths, which :func:`aggregate` skips)."""
    s = niah.score(results[0], doc["outputs"])
    out = {f"niah@{n}": -1.0 for n in LENGTHS}
    if doc["length"] in LENGTHS:
        out[f"niah@{doc['length']}"] = s
    out["score"] = s
    return out


def aggregate(values: list[float]) -> float:
    kept = [v for v in values if v != -1]
    return sum(kept) / len(kept) if kept else -1.0
