"""Needle in a haystack with real text, RULER's NIAH variants, built from the shipped corpus.

A sample hides needles ``One of the magic numbers for <key> is <value>.`` between the sentences
of a stretch of real prose and asks for the values of one key (RULER's prompt, shortened so that
byte-token models fit several needles into a few hundred tokens)::

    Some special magic numbers are hidden in the following text. Memorize them.
    <haystack sentences, needles between them>
    What are all the magic numbers for <key>? The magic numbers for <key> are

Variants (RULER's, arXiv 2404.06654): ``single`` (one key, one value), ``multikey`` (four keys
with one value each; the three others distract), ``multivalue`` (one key with four values, all
asked for). Keys are adjective-noun pairs, values 7-digit numbers. The haystack is the shipped
books' test split (``ctxlab.data.corpus``, its default split: seed 0, 10% test), whitespace
collapsed, every document after the previous one; each sample starts at its own sentence,
wrapping round to the first document where the text runs out.

A sample of length ``L`` is a prompt of at most ``L`` tokens of the given tokenizer, and within a
word of it: the haystack's last sentence is cut after a word. Everything
is drawn from ``random.Random`` seeded by the seed, variant, length and index, so the same
settings give the same samples on every machine and for every model of the same tokenizer.

Scoring (RULER's ``string_match_all``): the fraction of the asked values that appear in the
generated text. ``niah@L`` pools found values over the variants' samples at ``L``, with a Wilson
interval of that proportion (values of one sample are not independent trials; the interval is
indicative for ``multivalue``).

The same samples serve ctxlab's evaluation (``eval.niah``: :func:`niah_grid`) and lm-eval's tasks
(``ctxlab/lm_eval_tasks``: :func:`lm_eval_dataset`), and can be written to JSONL files
(:func:`write_samples`, ``python -m ctxlab.eval.niah``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ctxlab.eval.generate import greedy_generate
from ctxlab.eval.intervals import wilson

VARIANTS = {  # name -> (keys, values per key)
    "single": (1, 1),
    "multikey": (4, 1),
    "multivalue": (1, 4),
}
HEAD = "Some special magic numbers are hidden in the following text. Memorize them.\n"
NEEDLE = "One of the magic numbers for {key} is {value}."
QUESTION = "\nWhat are all the magic numbers for {key}? The magic numbers for {key} are"
ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
    "lively", "misty", "noble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
    "wary", "young", "zesty", "bold", "crisp", "dim", "early", "fierce",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "ribbon",
    "saddle", "tunnel", "umbrella", "violin", "wagon", "yacht", "zephyr", "beacon", "cabin",
    "dune", "ember", "fossil",
)  # fmt: skip
MIN_HAYSTACK = 8  # tokens of haystack a prompt needs at least (else the length is too short)


@dataclass(kw_only=True)
class NiahConfig:
    """The needle-in-a-haystack grid of ``eval.niah``."""

    lengths: list[int]
    """Prompt lengths in tokens."""
    variants: list[str]
    """RULER's NIAH variants: ``single``, ``multikey``, ``multivalue``."""
    trials: int = 4
    """Samples per (variant, length)."""
    seed: int = 0
    """Seed of keys, values, needle depths and haystack starts (the same for every model)."""
    chunk_size: int = 0
    """Prefill prompts in chunks of this many tokens through the KV cache (0: one pass)."""
    max_new_tokens: int = 0
    """Tokens generated per sample (0: the answer's own length plus 8)."""
    enabled: bool = False
    """Run the grid at all (off by default: grids recorded before it existed stay the same)."""

    def __post_init__(self) -> None:
        self.lengths = [int(x) for x in self.lengths]
        self.variants = [str(v) for v in self.variants]
        if not self.lengths or min(self.lengths) < 1 or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"eval.niah.lengths must be distinct positive ints, got {self.lengths}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"eval.niah.variants {bad or '[]'}: choose among {list(VARIANTS)}")
        if self.trials < 1:
            raise ValueError(f"eval.niah.trials must be >= 1, got {self.trials}")
        for name in ("chunk_size", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.niah.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class NiahSample:
    """One prompt: ``prompt`` is the whole text the model continues; ``outputs`` the values asked."""

    variant: str
    length: int
    index: int
    prompt: str
    query: str
    outputs: list[str]
    depths: list[float]
    n_tokens: int

    @property
    def answer(self) -> str:
        return ", ".join(self.outputs)


@functools.cache
def haystack_sentences() -> tuple[str, ...]:
    """The sentences of the shipped books' test split (module docstring), in order."""
    from ctxlab.data.corpus import load_corpus

    test = load_corpus(source="books", val_fraction=0.1, test_fraction=0.1, seed=0)["test"]
    text = " ".join(re.sub(r"\s+", " ", t).strip() for t in test["text"])
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


def score(generated: str, outputs: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``outputs`` found in ``generated``."""
    text = generated.lower()
    return sum(o.lower() in text for o in outputs) / len(outputs)


def _keys_and_values(rng: random.Random, variant: str) -> tuple[list[str], list[list[str]]]:
    n_keys, n_values = VARIANTS[variant]
    pairs = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], n_keys)
    values = [[str(rng.randint(1_000_000, 9_999_999)) for _ in range(n_values)] for _ in pairs]
    return pairs, values


def make_sample(tokenizer, variant: str, length: int, index: int, seed: int = 0) -> NiahSample:
    """Sample ``index`` of ``variant`` at ``length`` tokens of ``tokenizer`` (module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"NIAH variant {variant!r}: choose among {list(VARIANTS)}")
    rng = random.Random(f"niah/{seed}/{variant}/{length}/{index}")
    keys, values = _keys_and_values(rng, variant)
    query = keys[0]
    needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    head, tail = HEAD, QUESTION.format(key=query)
    fixed = len(tokenizer.encode(head + tail)) + sum(len(tokenizer.encode(" " + n)) for n in needles)
    budget = length - fixed
    if budget < MIN_HAYSTACK:
        raise ValueError(
            f"NIAH length {length} is too short for the {variant} prompt: it needs {fixed} tokens "
            f"without haystack and at least {MIN_HAYSTACK} of haystack"
        )
    sentences = _haystack(tokenizer, rng, budget)
    depths = sorted(rng.random() for _ in needles)
    while True:
        places = [round(d * len(sentences)) for d in depths]
        parts = list(sentences)
        for place, needle in sorted(zip(places, needles), key=lambda t: -t[0]):
            parts.insert(place, needle)
        prompt = head + " ".join(parts) + tail
        n = len(tokenizer.encode(prompt))
        words = sentences[-1].split(" ")
        if n <= length or (len(sentences) == 1 and len(words) == 1):
            break
        # The joined text tokenizes a little longer than its pieces did: drop the last word.
        sentences = sentences[:-1] + ([" ".join(words[:-1])] if len(words) > 1 else [])
    if n > length:
        raise ValueError(f"NIAH length {length}: the {variant} prompt takes {n} tokens even with one word")
    return NiahSample(variant, length, index, prompt, query, list(values[0]), depths, n)


def _haystack(tokenizer, rng: random.Random, budget: int) -> list[str]:
    """Sentences from a seeded start that fill at most ``budget`` tokens, the last one cut after
    the word that fills it (a sentence's tokens alone, plus one for the joining space, bound
    its share closely from above)."""
    every = haystack_sentences()
    i = rng.randrange(len(every))
    out: list[str] = []
    used = 0
    while True:
        s = every[i % len(every)]
        n = len(tokenizer.encode(" " + s))
        if used + n <= budget:
            out.append(s)
            used += n
            i += 1
            continue
        words = s.split(" ")
        lo, hi = 0, len(words)  # the most words of s that fit: binary search on their tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if used + len(tokenizer.encode(" " + " ".join(words[:mid]))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            out.append(" ".join(words[:lo]))
        return out or [words[0]]


def samples(tokenizer, variants: Sequence[str], lengths: Sequence[int], trials: int, seed: int = 0):
    """Every sample of the grid, variants outermost, then lengths, then indices."""
    return [make_sample(tokenizer, v, n, i, seed) for v in variants for n in lengths for i in range(trials)]


def lm_eval_dataset(tokenizer, variant: str, lengths: Sequence[int], trials: int, seed: int = 0):
    """The samples of one variant as a ``datasets`` test split, for lm-eval's ``custom_dataset``;
    ``answer`` is the values joined by ``", "``, ``target`` the same after a space (lm-eval 0.4.13
    puts no delimiter between a loglikelihood request's context and its target)."""
    import datasets

    rows = [
        asdict(s) | {"answer": s.answer, "target": " " + s.answer}
        for s in samples(tokenizer, [variant], lengths, trials, seed)
    ]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def write_samples(path: str | Path, tokenizer, variants, lengths, trials: int, seed: int = 0) -> Path:
    """The grid's samples as JSONL (one sample a line, ``asdict(NiahSample)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in samples(tokenizer, variants, lengths, trials, seed):
            f.write(json.dumps(asdict(s)) + "\n")
    return path


def cell_key(sample: NiahSample, ids: list[int], n_new: int, chunk_size: int) -> str:
    digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]
    where = f"niah/{sample.variant}/L={sample.length}/i={sample.index}"
    return f"{where}/new={n_new}/chunk={chunk_size}/ids={digest}"


@torch.no_grad()
def niah_grid(
    model, tokenizer, cfg: NiahConfig, *, device="cpu", store=None, progress: bool = True
) -> list[dict]:
    """One row per (variant, length): ``found`` of ``asked`` values, ``score``, its Wilson ``lo``,
    ``hi``, the prompts' mean length and the answers. Samples are dealt over the ranks like the
    passkey grid's; ``store`` (a ``CellStore``) keeps each finished sample's answer."""
    from ctxlab import distributed

    grid = samples(tokenizer, cfg.variants, cfg.lengths, cfg.trials, cfg.seed)
    mine = distributed.my_items(len(grid))
    bar = tqdm(mine, desc="niah", disable=not (progress and distributed.is_rank_zero()), leave=False)
    answers = {}
    for j in bar:
        s = grid[j]
        ids = tokenizer.encode(s.prompt)
        n_new = cfg.max_new_tokens or len(tokenizer.encode(" " + s.answer)) + 8
        key = cell_key(s, ids, n_new, cfg.chunk_size)
        if store is not None and key in store:
            answers[j] = store[key]
            continue
        out = greedy_generate(model, torch.tensor([ids], device=device), n_new, chunk_size=cfg.chunk_size)
        answers[j] = tokenizer.decode(out[0].tolist())
        if store is not None:
            store.put(key, answers[j])
    got = distributed.gather_items(len(grid), answers)
    rows = []
    for v in cfg.variants:
        for n in cfg.lengths:
            idx = [j for j, s in enumerate(grid) if s.variant == v and s.length == n]
            found = sum(round(score(got[j], grid[j].outputs) * len(grid[j].outputs)) for j in idx)
            asked = sum(len(grid[j].outputs) for j in idx)
            lo, hi = wilson(found, asked)
            rows.append({
                "variant": v, "length": n, "found": found, "asked": asked, "score": found / asked,
                "lo": lo, "hi": hi, "trials": len(idx),
                "prompt_tokens": sum(grid[j].n_tokens for j in idx) / len(idx),
                "answers": " | ".join(got[j].strip().replace("\n", " ")[:64] for j in idx),
            })  # fmt: skip
    return rows


def niah_by_length(rows: Sequence[dict]) -> list[dict]:
    """Per length, pooled over variants: ``found``, ``asked``, ``score`` and its Wilson interval."""
    pooled: dict[int, list[int]] = {}
    for r in rows:
        acc = pooled.setdefault(r["length"], [0, 0])
        acc[0] += r["found"]
        acc[1] += r["asked"]
    out = []
    for n, (found, asked) in pooled.items():
        lo, hi = wilson(found, asked)
        out.append({"length": n, "found": found, "asked": asked, "score": found / asked, "lo": lo, "hi": hi})
    return out


def check_niah(cfg: NiahConfig, tokenizer) -> None:
    """ValueError naming the first (variant, length) whose prompt cannot be built (too short)."""
    for v in cfg.variants:
        make_sample(tokenizer, v, min(cfg.lengths), 0, cfg.seed)


def comparable_grid(ev: dict) -> dict:
    """An evaluation grid (``eval`` as a dict) without ``niah`` when it is off, so a grid
    recorded before ``eval.niah`` existed equals today's grid with NIAH off."""
    niah = ev.get("niah")
    if niah is None or niah.get("enabled"):
        return ev
    return {k: v for k, v in ev.items() if k != "niah"}


def evaluate_niah(
    model, tokenizer, cfg, out: Path, loggers, summary: dict, store, tag: str, writes: bool
) -> None:
    """``eval.niah`` of one evaluation (``ctxlab.evaluation``): rows into ``summary`` (``niah``,
    ``niah_by_length``), ``out/niah.{csv,json}``, a W&B table; cells kept in ``store``."""
    from hydra.utils import instantiate

    from ctxlab.build import device_of
    from ctxlab.loggers import say, write_rows

    ncfg = instantiate(cfg.eval.niah)
    rows = niah_grid(model, tokenizer, ncfg, device=device_of(cfg), store=store)
    summary["niah"] = rows
    summary["niah_by_length"] = niah_by_length(rows)
    if writes:
        write_rows(out / "niah", rows)
        loggers.table(f"eval{tag}/niah", rows)
    for r in summary["niah_by_length"]:
        say(f"niah @ {r['length']:>7}: {r['found']}/{r['asked']} values = {r['score']:.2f} "
            f"[{r['lo']:.2f}, {r['hi']:.2f}]")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctxlab.eval.niah", description="Write NIAH samples as JSONL.")
    p.add_argument("out", help="the JSONL file to write")
    p.add_argument("--tokenizer", default="byte", help="a ctxlab tokenizer spec (byte, tiktoken, hf:<dir>)")
    p.add_argument("--lengths", default="512,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from ctxlab.data.tokenizers import build_tokenizer

    cfg = NiahConfig(
        lengths=a.lengths.split(","), variants=a.variants.split(","), trials=a.trials, seed=a.seed
    )
    path = write_samples(a.out, build_tokenizer(a.tokenizer), cfg.variants, cfg.lengths, cfg.trials, cfg.seed)
    print(f"{path}: {len(cfg.variants) * len(cfg.lengths) * cfg.trials} samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
