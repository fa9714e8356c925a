"""The evaluation protocol a context-extension study reports: intervals (Wilson, block bootstrap,
paired bootstrap), the fixed-targets perplexity protocol, and the resumable cell store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_model
from test_eval import ByteTok
from torch import nn

import ctxlab.eval.passkey as pk
from ctxlab import distributed
from ctxlab.attention.cache import KVCache
from ctxlab.eval.cells import CellStore, shard_path
from ctxlab.eval.intervals import bootstrap_ppl, paired_bootstrap_ppl_ratio, wilson
from ctxlab.eval.passkey import PasskeyConfig, extract_key, passkey_by_length, passkey_grid, trial_key
from ctxlab.eval.perplexity import PerplexityConfig, block_pieces, perplexity_grid, plan_windows, windows
from ctxlab.eval.plots import plot_passkey_by_length, plot_perplexity

Z2 = 1.96**2

# Intervals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # k = 0: lo = 0, hi = z^2 / (n + z^2) = 3.8416 / 23.8416
        (0, 20, 0.0, Z2 / (20 + Z2)),
        (20, 20, 20 / (20 + Z2), 1.0),
        # k = n/2: centre 1/2, half = z / (1 + z^2/n) * sqrt(1/(4n) + z^2/(4n^2)) = 0.200705
        (10, 20, 0.5 - 0.2007050856, 0.5 + 0.2007050856),
        # (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n) = (0.29208 -+ 0.267338) / 1.38416
        (1, 10, 0.01787575, 0.40415639),
    ],
    ids=["none-right", "all-right", "half", "one-of-ten"],
)
def test_wilson_matches_hand_computed_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-7)
    assert (got[0] == 0.0) == (k == 0) and (got[1] == 1.0) == (k == n)


def test_wilson_edge_cases():
    assert wilson(0, 0) == (0.0, 1.0)  # no trials: no information
    lo, hi = wilson(3, 17)
    assert wilson(14, 17) == pytest.approx((1 - hi, 1 - lo))  # symmetric in k <-> n - k
    assert wilson(50, 100, z=2.576)[0] < wilson(50, 100)[0]  # 99% is wider than 95%
    for k, n in [(-1, 5), (6, 5)]:
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson(k, n)


def _blocks(G, seed=0, tokens=256):
    rng = np.random.default_rng(seed)
    return list(rng.normal(3.0, 0.4, G) * tokens), [tokens] * G  # ~ e^3 perplexity, noisy blocks


def test_bootstrap_contains_the_estimate_shrinks_with_blocks_and_is_seeded():
    nll, tok = _blocks(40)
    ppl = math.exp(sum(nll) / sum(tok))
    lo, hi = bootstrap_ppl(nll, tok)
    assert lo < ppl < hi
    assert bootstrap_ppl(nll, tok, seed=0) == (lo, hi)  # deterministic by seed
    assert bootstrap_ppl(nll, tok, seed=1) != (lo, hi)
    lo_many, hi_many = bootstrap_ppl(*_blocks(1000))
    assert hi_many - lo_many < 0.4 * (hi - lo)  # ~ 1/sqrt(25) of the width
    lo90, hi90 = bootstrap_ppl(nll, tok, level=0.9)
    assert lo < lo90 < hi90 < hi
    assert bootstrap_ppl([10.0], [4]) == pytest.approx((math.exp(2.5), math.exp(2.5)))
    assert all(math.isnan(x) for x in bootstrap_ppl([], []))
    with pytest.raises(ValueError, match="2 block NLLs but 1 block token counts"):
        bootstrap_ppl([1.0, 2.0], [3])


def test_paired_bootstrap_separates_arms_that_unpaired_intervals_cannot():
    """B is A plus a small per-token penalty on every block; the blocks differ far more among
    themselves than the arms do, so the one-model intervals overlap, but the paired one excludes 1."""
    a_nll, tok = _blocks(60)
    rng = np.random.default_rng(7)
    b_nll = [x + t * (0.02 + 0.01 * rng.standard_normal()) for x, t in zip(a_nll, tok)]
    a_lo, a_hi = bootstrap_ppl(a_nll, tok)
    b_lo, b_hi = bootstrap_ppl(b_nll, tok)
    assert b_lo < a_hi  # unpaired: no verdict
    ratio, lo, hi = paired_bootstrap_ppl_ratio(a_nll, b_nll, tok)
    assert ratio == pytest.approx(math.exp((sum(a_nll) - sum(b_nll)) / sum(tok)))
    assert lo <= ratio <= hi < 1.0  # A beats B
    assert paired_bootstrap_ppl_ratio(a_nll, b_nll, tok) == (ratio, lo, hi)
    r2, lo2, hi2 = paired_bootstrap_ppl_ratio(b_nll, a_nll, tok)
    assert (r2, lo2, hi2) == pytest.approx((1 / ratio, 1 / hi, 1 / lo))


# Perplexity protocols ------------------------------------------------------------------------


class Recorder(nn.Module):
    """Uniform predictions over a vocabulary where every token id is unique in the corpus, so the
    ids it sees say which document positions a window holds and which it scores."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.windows = []  # (first input id, scored input ids)

    def new_cache(self):
        return KVCache(1)

    def hidden(self, ids, position_ids=None, cache=None):
        self.windows.append([int(ids[0, 0])])
        return nn.functional.one_hot(ids, self.vocab).float()

    def lm_head(self, h):
        self.windows[-1].append(h[0].argmax(-1).tolist())
        return torch.zeros(*h.shape[:-1], self.vocab)


def _unique_docs(lengths):
    """Documents of the given lengths whose ids are their global positions: id -> (doc, pos)."""
    docs, start = [], 0
    for n in lengths:
        docs.append(torch.arange(start, start + n))
        start += n
    return docs, start


@pytest.mark.parametrize("stride", [0.5, 3], ids=["half", "three"])
def test_fixed_targets_score_the_same_positions_once_with_the_stated_context(stride):
    docs, vocab = _unique_docs([70, 40, 33, 90, 66])  # 40 and 33 are too short for L=64
    T, lengths = 20, [8, 16, 32, 64]
    cfg = PerplexityConfig(
        lengths=lengths, stride=stride, protocol="fixed_targets", targets=T, block_tokens=8
    )
    assert cfg.min_document() == 65
    starts = {int(d[0]): i for i, d in enumerate(docs)}
    where = {int(t): (i, p) for i, d in enumerate(docs) for p, t in enumerate(d)}
    model = Recorder(vocab)
    res = perplexity_grid(model, docs, cfg, progress=False)
    plan = plan_windows(docs, cfg)
    assert len(model.windows) == len(plan)
    scored = {n: [] for n in lengths}
    for w, (first, inputs) in zip(plan, model.windows):
        doc, begin = where[first]
        assert (doc, begin) == (w.doc, w.begin) and doc in starts.values()
        for t in inputs:
            d, pos = where[t]  # the input at pos predicts pos + 1
            assert d == doc
            context = pos + 1 - begin
            assert context >= w.length - cfg.run_for(w.length) + 1
            scored[w.length].append((doc, pos + 1))
    expected = [(i, p) for i in (0, 3, 4) for p in range(len(docs[i]) - T, len(docs[i]))]
    for n in lengths:
        assert scored[n] == expected  # the same targets at every length, each once, in order
    assert [r.stride for r in res] == [cfg.stride_for(8), cfg.stride_for(16), T, T]
    for r in res:
        assert (r.n_docs, r.n_tokens) == (3, 3 * T)
        assert r.ppl == pytest.approx(vocab) and r.ppl_lo == pytest.approx(vocab)
        assert r.as_blocks()["block_tokens"] == [8, 8, 4] * 3  # blocks never span documents
        assert r.as_blocks()["block_doc"] == [0, 0, 0, 3, 3, 3, 4, 4, 4]


def test_fixed_targets_chunked_equals_one_pass_and_rows_have_intervals():
    model = tiny_model("dense")
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 64, (n,), generator=gen) for n in (80, 75, 30, 97)]
    cfg = dict(lengths=[16, 48, 64], stride=0.5, protocol="fixed_targets", targets=24, block_tokens=5)
    full = perplexity_grid(model, docs, PerplexityConfig(**cfg), progress=False)
    chunked = perplexity_grid(model, docs, PerplexityConfig(**cfg, chunk_size=7), progress=False)
    for a, b in zip(full, chunked):
        assert a.n_tokens == b.n_tokens == 3 * 24
        assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
        row = a.as_row()
        assert set(row) == {"length", "stride", "ppl", "ppl_lo", "ppl_hi", "nll", "n_docs", "n_tokens"}
        assert row["ppl_lo"] <= row["ppl"] <= row["ppl_hi"]
        json.dumps(row)
        json.dumps(a.as_blocks())


def test_fixed_targets_without_a_long_enough_document_names_both_lengths():
    cfg = PerplexityConfig(lengths=[16, 64], protocol="fixed_targets", targets=8)
    with pytest.raises(ValueError, match=r"65 tokens.*longest length 64.*longest\s+document has 50 tokens"):
        perplexity_grid(Recorder(100), [torch.arange(50), torch.arange(30)], cfg, progress=False)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(protocol="fixed_targets"), "targets > 0"),
        (dict(protocol="fixed_targets", targets=8, max_tokens=100), "max_tokens=100 does not apply"),
        (dict(targets=8), "targets=8 applies only to protocol=fixed_targets"),
        (dict(protocol="strided"), "protocol must be one of"),
        (dict(block_tokens=0), "block_tokens"),
    ],
    ids=["no-targets", "token-cap", "targets-sliding", "unknown", "no-blocks"],
)
def test_perplexity_config_rejects_protocol_mixups(kw, match):
    with pytest.raises(ValueError, match=match):
        PerplexityConfig(lengths=[16], **kw)


def test_sliding_protocol_is_unchanged_and_its_blocks_add_up():
    """The sliding numbers equal the pre-interval implementation (window NLL sums of a full
    forward), and the bootstrap blocks partition each document's scored tokens."""
    model = tiny_model("dense")
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 64, (n,), generator=gen) for n in (70, 20, 55, 41)]
    cfg = PerplexityConfig(lengths=[8, 16, 32], stride=0.5, max_tokens=90, block_tokens=7)
    res = perplexity_grid(model, docs, cfg, progress=False)
    for r in res:
        nll, n_tok, used = 0.0, 0, set()
        for i, d in enumerate(docs):  # the old loop, verbatim in effect
            if len(d) < r.length + 1:
                continue
            for begin, k in windows(len(d), r.length, r.stride):
                if n_tok >= cfg.max_tokens:
                    break
                ids = d[begin : begin + r.length + 1]
                with torch.no_grad():
                    logits = model(ids[None, :-1])[0, -k:]
                nll += float(nn.functional.cross_entropy(logits, ids[-k:], reduction="sum"))
                n_tok += k
                used.add(i)
        assert (r.n_tokens, r.n_docs) == (n_tok, len(used))
        assert r.ppl == pytest.approx(math.exp(nll / n_tok), rel=1e-6)
        assert r.ppl_lo <= r.ppl <= r.ppl_hi
        for doc, n in r.per_doc_tokens.items():
            sizes = [t for t, b in zip(r.block_tokens, r.block_doc) if b == doc]
            assert sizes == [7] * (n // 7) + ([n % 7] if n % 7 else [])
        assert sum(r.block_nll) == pytest.approx(r.nll_sum)


# Passkey by length ---------------------------------------------------------------------------


def test_passkey_by_length_pools_depths_with_wilson_intervals():
    rows = [
        {"length": 512, "depth": 0.0, "correct": 3, "trials": 5, "accuracy": 0.6},
        {"length": 512, "depth": 1.0, "correct": 5, "trials": 5, "accuracy": 1.0},
        {"length": 256, "depth": 0.0, "accuracy": 0.0, "trials": 5},  # written before `correct`
    ]
    out = passkey_by_length(rows)
    assert [r["length"] for r in out] == [512, 256]
    assert {k: out[0][k] for k in ("correct", "trials", "accuracy")} == {
        "correct": 8,
        "trials": 10,
        "accuracy": 0.8,
    }
    assert (out[0]["lo"], out[0]["hi"]) == wilson(8, 10)
    assert (out[1]["correct"], out[1]["lo"], out[1]["hi"]) == (0, 0.0, wilson(0, 5)[1])


def test_plots_draw_bands_and_error_bars(tmp_path):
    rows = [
        {"length": n, "ppl": p, "ppl_lo": p * 0.9, "ppl_hi": p * 1.1} for n, p in [(64, 9.0), (128, 12.0)]
    ]
    assert plot_perplexity({"a": rows, "b": [{"length": 64, "ppl": 8.0}]}, tmp_path / "p.png").stat().st_size
    by_len = passkey_by_length([{"length": 256, "depth": 0.0, "correct": 1, "trials": 4, "accuracy": 0.25}])
    out = plot_passkey_by_length({"a": by_len}, tmp_path / "k.png", train_length=128)
    assert out.stat().st_size > 0


# Resumable grid ------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


class Counting(nn.Module):
    """Counts the windows a model scores (one ``hidden`` call each, unchunked); raises once
    ``crash_after`` have finished."""

    def __init__(self, model, crash_after: int | None = None) -> None:
        super().__init__()
        self.model, self.crash_after, self.calls = model, crash_after, 0

    def hidden(self, ids, **kw):
        if self.crash_after is not None and self.calls == self.crash_after:
            raise Crash
        self.calls += 1
        return self.model.hidden(ids, **kw)

    def lm_head(self, h):
        return self.model.lm_head(h)


FP = {"checkpoint": "a.ckpt", "attention": "dense", "scale": 1.0}


def _ppl_case():
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 64, (n,), generator=gen) for n in (60, 45, 70)]
    return tiny_model("dense"), docs, PerplexityConfig(lengths=[8, 32], stride=0.5, block_tokens=6)


def _rows(results):
    return [(r.as_row(), r.as_blocks()) for r in results]


def test_interrupted_perplexity_grid_resumes_to_the_uninterrupted_result(tmp_path):
    model, docs, cfg = _ppl_case()
    total = len(plan_windows(docs, cfg))
    reference = _rows(perplexity_grid(model, docs, cfg, progress=False))
    path = tmp_path / "cells.jsonl"
    with CellStore(path, FP) as store, pytest.raises(Crash):
        perplexity_grid(Counting(model, crash_after=9), docs, cfg, progress=False, store=store)
    assert len(path.read_text().splitlines()) == 9
    again = Counting(model)
    with CellStore(path, FP) as store:
        assert len(store) == 9
        got = _rows(perplexity_grid(again, docs, cfg, progress=False, store=store))
    assert again.calls == total - 9  # the finished windows were not scored again
    assert got == reference  # exactly
    rerun = Counting(model)
    with CellStore(path, FP) as store:
        assert _rows(perplexity_grid(rerun, docs, cfg, progress=False, store=store)) == reference
    assert rerun.calls == 0


def test_a_truncated_last_line_is_dropped_and_recomputed(tmp_path):
    model, docs, cfg = _ppl_case()
    total = len(plan_windows(docs, cfg))
    path = tmp_path / "cells.jsonl"
    with CellStore(path, FP) as store, pytest.raises(Crash):
        perplexity_grid(Counting(model, crash_after=5), docs, cfg, progress=False, store=store)
    data = path.read_bytes()
    path.write_bytes(data[:-12])  # a crash in the middle of writing the fifth cell
    again = Counting(model)
    with CellStore(path, FP) as store:
        assert len(store) == 4
        got = _rows(perplexity_grid(again, docs, cfg, progress=False, store=store))
    assert again.calls == total - 4
    assert got == _rows(perplexity_grid(model, docs, cfg, progress=False))
    lines = path.read_text().splitlines()
    assert len(lines) == total and all(json.loads(x)["fp"] for x in lines)  # the cut line is gone


def test_another_fingerprint_recomputes_and_a_corrupt_line_is_an_error(tmp_path):
    model, docs, cfg = _ppl_case()
    total = len(plan_windows(docs, cfg))
    path = tmp_path / "cells.jsonl"
    with CellStore(path, FP) as store:
        perplexity_grid(model, docs, cfg, progress=False, store=store)
    other = Counting(model)
    with CellStore(path, FP | {"scale": 2.0}) as store:
        assert len(store) == 0
        perplexity_grid(other, docs, cfg, progress=False, store=store)
    assert other.calls == total
    assert len(CellStore(path, FP)) == total  # both fingerprints' cells live in one file
    changed = PerplexityConfig(lengths=[8, 32], stride=0.5, block_tokens=5)
    regrouped = Counting(model)
    with CellStore(path, FP) as store:  # block pieces are part of the key: never misread
        perplexity_grid(regrouped, docs, changed, progress=False, store=store)
    plan = plan_windows(docs, cfg)
    sizes = lambda w, n: [k for _, k in block_pieces(w, n)]  # noqa: E731
    assert 0 < regrouped.calls == sum(sizes(w, 6) != sizes(w, 5) for w in plan) < total
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(ValueError, match=r"cells.jsonl:1 is not a cell line"):
        CellStore(path, FP)


def test_each_rank_writes_its_own_file_and_reads_all(tmp_path, monkeypatch):
    model, docs, cfg = _ppl_case()
    path = tmp_path / "cells.jsonl"
    with CellStore(path, FP, shard=1) as store:
        perplexity_grid(model, docs, cfg, progress=False, store=store)
    assert not path.exists() and shard_path(path, 1) == tmp_path / "cells.rank1.jsonl"
    assert shard_path(path, 1).exists()
    resumed = Counting(model)
    with CellStore(path, FP) as store:  # a single process reads every rank's file
        perplexity_grid(resumed, docs, cfg, progress=False, store=store)
    assert resumed.calls == 0
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    store = CellStore(path, FP)
    assert store.own == tmp_path / "cells.rank3.jsonl" and len(store) == len(plan_windows(docs, cfg))


def test_interrupted_passkey_grid_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    tok = ByteTok()
    cfg = PasskeyConfig(lengths=[260, 300], depths=[0.0, 0.5, 1.0], trials=2)
    calls = {"n": 0, "crash_after": None}

    def fake_generate(model, ids, n_new, chunk_size=0):
        """Right unless the key is a multiple of 3: rows with mixed counts."""
        if calls["n"] == calls["crash_after"]:
            raise Crash
        calls["n"] += 1
        text = tok.decode(ids[0].tolist())
        key = extract_key(text[text.index("The pass key is ") :])
        return torch.tensor([tok.encode(" " + (key if int(key) % 3 else "00000") + ".")[:n_new]])

    monkeypatch.setattr(pk, "greedy_generate", fake_generate)
    reference = passkey_grid(None, tok, cfg, progress=False)
    right = [
        [int(trial_key(0, n, d, t, 5)) % 3 != 0 for t in range(2)] for n in cfg.lengths for d in cfg.depths
    ]
    assert [r["correct"] for r in reference] == [sum(r) for r in right]
    assert 0 < sum(map(sum, right)) < 12
    path, fp = tmp_path / "passkey.jsonl", {"checkpoint": "a.ckpt"}
    calls.update(n=0, crash_after=7)
    with CellStore(path, fp) as store, pytest.raises(Crash):
        passkey_grid(None, tok, cfg, progress=False, store=store)
    calls.update(n=0, crash_after=None)
    with CellStore(path, fp) as store:
        assert passkey_grid(None, tok, cfg, progress=False, store=store) == reference
    assert calls["n"] == 12 - 7
    by_length = passkey_by_length(reference)
    assert [(r["length"], r["correct"], r["trials"]) for r in by_length] == [
        (n, sum(map(sum, right[3 * i : 3 * i + 3])), 6) for i, n in enumerate(cfg.lengths)
    ]
