"""Passkey retrieval (the landmark-attention prompt): lengths x depths x trials, greedy, exact match.

Prompt (token ids, built piece by piece so the length is exact for any tokenizer)::

    <task description> <filler ...> <needle: "The pass key is K. Remember it. K is the pass key.">
    <filler ...> <question: "What is the pass key? The pass key is">

``depth`` is the fraction of the filler that comes before the needle (0: right after the task
description, 1: right before the question). The filler is a repeated run of sentences and is
cut at a sentence boundary for the depth, and at the token level only at its very end so the
prompt has exactly ``length`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ctxlab.eval.generate import greedy_generate
from ctxlab.eval.intervals import wilson

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(kw_only=True)
class PasskeyConfig:
    """Grid of the passkey evaluation."""

    lengths: list[int]
    """Prompt lengths in tokens."""
    depths: list[float]
    """Needle depths, fractions in [0, 1]."""
    trials: int = 3
    """Random keys per (length, depth) cell."""
    digits: int = 5
    """Digits of the key (>= 5, as in the field's standard prompt)."""
    seed: int = 0
    """Seed of the keys; the same seed gives the same keys for every model."""
    chunk_size: int = 0
    """Prefill prompts in chunks of this many tokens through the KV cache (0: one pass)."""
    enabled: bool = True
    """Run the passkey grid at all."""

    def __post_init__(self) -> None:
        self.lengths = [int(x) for x in self.lengths]
        self.depths = [float(x) for x in self.depths]
        if not self.lengths or not self.depths:
            raise ValueError("eval.passkey.lengths and eval.passkey.depths must be non-empty")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"eval.passkey.depths must lie in [0, 1]: {self.depths}")
        if self.trials < 1:
            raise ValueError(f"eval.passkey.trials must be >= 1, got {self.trials}")
        if self.digits < 5:
            raise ValueError(f"eval.passkey.digits must be >= 5, got {self.digits}")


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    needle_start: int  # token index where the needle begins
    filler_tokens: int  # filler tokens in the prompt (before + after the needle)
    filler_before: int  # filler tokens before the needle


def min_prompt_length(tokenizer, digits: int = 5) -> int:
    key = "9" * digits
    return (
        len(tokenizer.encode(TASK))
        + len(tokenizer.encode(NEEDLE.format(key=key)))
        + len(tokenizer.encode(QUESTION))
    )


def make_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with the needle at ``depth`` of the filler."""
    task, question = tokenizer.encode(TASK), tokenizer.encode(QUESTION)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    n_filler = length - len(task) - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(
            f"eval.passkey length {length} is shorter than the prompt itself "
            f"({length - n_filler} tokens without filler)"
        )
    sentence = tokenizer.encode(FILLER)
    reps = n_filler // max(1, len(sentence)) + 2
    filler = (sentence * reps)[:n_filler]
    # Cut at a sentence boundary (a multiple of the filler's length) nearest to the depth.
    before = int(round(depth * n_filler / max(1, len(sentence)))) * len(sentence)
    before = min(before, n_filler)
    ids = task + filler[:before] + needle + filler[before:] + question
    assert len(ids) == length
    return PasskeyPrompt(ids, key, len(task) + before, n_filler, before)


def extract_key(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def trial_key(seed: int, length: int, depth: float, trial: int, digits: int) -> str:
    rng = random.Random(f"{seed}-{length}-{depth:.6f}-{trial}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def cell_key(prompt: PasskeyPrompt, length: int, depth: float, trial: int, cfg: PasskeyConfig) -> str:
    """The store key of one trial: its place in the grid, how it is run, and a hash of its prompt
    (a changed tokenizer never matches). The model is the store's fingerprint."""
    digest = hashlib.sha1(json.dumps(prompt.ids).encode()).hexdigest()[:16]
    return (
        f"passkey/L={length}/depth={depth:.6f}/trial={trial}/key={prompt.key}"
        f"/chunk={cfg.chunk_size}/ids={digest}"
    )


@torch.no_grad()
def passkey_grid(
    model, tokenizer, cfg: PasskeyConfig, *, device="cpu", progress: bool = True, store=None
) -> list[dict]:
    """One row per (length, depth): ``correct`` of ``trials`` keys, ``accuracy``, the raw answers.

    Data-parallel when a process group of several ranks exists (``ctxlab.distributed``): the
    lengths x depths x trials items are dealt round-robin over the ranks and their answers
    gathered once; every rank returns the single-process rows. The progress bar (this rank's
    items) shows on rank 0 only.

    ``store``: a :class:`ctxlab.eval.cells.CellStore`; a trial found there is not run again, and
    each trial's answer is put there as it finishes, so an interrupted grid resumes."""
    from ctxlab import distributed

    shortest = min_prompt_length(tokenizer, cfg.digits)
    too_short = [n for n in cfg.lengths if n < shortest]
    if too_short:
        raise ValueError(
            f"eval.passkey.lengths {too_short} are shorter than the passkey prompt ({shortest} tokens)"
        )
    cells = [(n, d) for n in cfg.lengths for d in cfg.depths]
    items = [(length, depth, t) for length, depth in cells for t in range(cfg.trials)]
    mine = distributed.my_items(len(items))
    bar = tqdm(mine, desc="passkey", disable=not (progress and distributed.is_rank_zero()), leave=False)
    answers = {}
    for j in bar:
        length, depth, t = items[j]
        key = trial_key(cfg.seed, length, depth, t, cfg.digits)
        prompt = make_prompt(tokenizer, length, depth, key)
        cell = cell_key(prompt, length, depth, t, cfg) if store is not None else None
        if cell is not None and cell in store:
            answers[j] = store[cell]
            continue
        ids = torch.tensor([prompt.ids], dtype=torch.long, device=device)
        n_new = len(tokenizer.encode(" " + key)) + 1
        out = greedy_generate(model, ids, n_new, chunk_size=cfg.chunk_size)
        answers[j] = extract_key(tokenizer.decode(out[0].tolist()))
        if store is not None:
            store.put(cell, answers[j])
    gathered = iter(distributed.gather_items(len(items), answers))
    rows = []
    for length, depth in cells:
        got = [next(gathered) for _ in range(cfg.trials)]
        keys = [trial_key(cfg.seed, length, depth, t, cfg.digits) for t in range(cfg.trials)]
        correct = sum(a == k for a, k in zip(got, keys))
        rows.append(
            {"length": length, "depth": depth, "correct": correct, "accuracy": correct / cfg.trials,
             "trials": cfg.trials, "answers": " ".join(got)}
        )  # fmt: skip
    return rows


def passkey_by_length(rows: Sequence[dict], z: float = 1.96) -> list[dict]:
    """Per length (in the rows' order), pooled over depths: ``length, correct, trials, accuracy``
    and the Wilson interval ``lo, hi`` (95% for ``z = 1.96``). Rows without ``correct`` (written
    before it existed) give ``round(accuracy * trials)``."""
    pooled: dict[int, list[int]] = {}
    for r in rows:
        correct = r.get("correct", round(r["accuracy"] * r["trials"]))
        acc = pooled.setdefault(r["length"], [0, 0])
        acc[0] += int(correct)
        acc[1] += int(r["trials"])
    out = []
    for length, (correct, trials) in pooled.items():
        lo, hi = wilson(correct, trials, z)
        accuracy = correct / trials if trials else float("nan")
        out.append({"length": length, "correct": correct, "trials": trials,
                    "accuracy": accuracy, "lo": lo, "hi": hi})  # fmt: skip
    return out


def accuracy_matrix(rows: Sequence[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
    return lengths, depths, [[acc[(n, d)] for n in lengths] for d in depths]
