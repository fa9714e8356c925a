"""Perplexity against context length, two protocols.

``sliding`` (the default): for a context length ``L`` and stride ``S`` (``S <= L``), every test
document with at least ``L + 1`` tokens is cut into windows of ``L`` input tokens starting at
``0, S, 2S, ...`` (only whole windows). A window predicts the token after each of its inputs. The
first window of a document scores all ``L`` predictions; each later window scores only its last
``S`` predictions, the ones no earlier window scored, so every scored token is predicted once and,
after the first window, with at least ``L - S + 1`` tokens of context. Which tokens are scored
depends on ``L``: longer lengths skip shorter documents and score more of each.

``fixed_targets``: the scored tokens are the same at every length: the last ``T`` (``targets``)
tokens of each document that can take part at every length. At length ``L`` they are cut, from
the first, into runs of ``C`` targets, ``C = T`` when ``L >= T`` (one window) and ``C = S`` when
``L < T``; each run is scored by the window of ``L`` inputs that ends just before its last target,
so every target is predicted once, with at least ``L - C + 1`` tokens of context (``C`` is the
``stride`` reported for the length). A document takes part when it has a whole window for every
run at every length: ``max over L of (L + 1 + T - C)`` tokens, which is ``max(lengths) + 1``
whenever ``C = T`` or ``T - S <= max(lengths) - L`` (the usual grid).

Perplexity is ``exp(total NLL / scored tokens)``; the number of documents and scored tokens is
reported beside every figure, and documents too short are left out (never padded). The
interval ``[ppl_lo, ppl_hi]`` is a 95% bootstrap over blocks of ``block_tokens`` consecutive
scored tokens of a document (:mod:`ctxlab.eval.intervals`); blocks never span documents.

Shapes: a document is ``[N]`` token ids; a window is ``[L + 1]`` ids (``L`` inputs, ``L`` targets).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ctxlab.eval.intervals import bootstrap_ppl

PROTOCOLS = ("sliding", "fixed_targets")


@dataclass(kw_only=True)
class PerplexityConfig:
    """Grid and protocol of the perplexity evaluation."""

    lengths: list[int]
    """Context lengths L to evaluate, in tokens (from below the training length to far beyond)."""
    stride: float = 0.5
    """Window stride S: an int number of tokens (> 1) or a fraction of L (0 < S <= 1). Under
    ``fixed_targets`` a length ``L >= targets`` scores all targets in one window, whatever S."""
    protocol: str = "sliding"
    """Which tokens are scored: ``sliding`` (every token of each long-enough document, so the
    scored tokens change with L) or ``fixed_targets`` (the last ``targets`` tokens of each
    document, the same tokens at every L)."""
    targets: int = 0
    """Scored tokens per document under ``fixed_targets`` (required > 0 there, 0 otherwise)."""
    max_tokens: int = 0
    """Stop scoring a length after this many tokens (0: no cap). Bounds CPU time. ``sliding``
    only: under ``fixed_targets`` ``max_docs`` bounds the work (the same documents at every L)."""
    max_docs: int = 0
    """Use at most this many qualifying documents per length (0: all)."""
    block_tokens: int = 256
    """Scored tokens per bootstrap block (consecutive tokens of one document) for ppl_lo/ppl_hi."""
    chunk_size: int = 0
    """Run windows longer than this through the KV cache in chunks (0: never chunk)."""
    enabled: bool = True
    """Run the perplexity grid at all."""

    def __post_init__(self) -> None:
        self.lengths = [int(x) for x in self.lengths]
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"eval.perplexity.lengths must be a non-empty list of ints >= 2: {self.lengths}")
        if len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"eval.perplexity.lengths has repeated lengths: {self.lengths}")
        if self.stride <= 0 or (self.stride > 1 and self.stride != int(self.stride)):
            raise ValueError(
                f"eval.perplexity.stride must be a fraction in (0, 1] or an int > 1: {self.stride}"
            )
        for name in ("targets", "max_tokens", "max_docs", "chunk_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.perplexity.{name} must be >= 0")
        if self.block_tokens < 1:
            raise ValueError(f"eval.perplexity.block_tokens must be >= 1, got {self.block_tokens}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"eval.perplexity.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.protocol == "fixed_targets":
            if self.targets < 1:
                raise ValueError("eval.perplexity.protocol=fixed_targets needs eval.perplexity.targets > 0")
            if self.max_tokens:
                raise ValueError(
                    f"eval.perplexity.max_tokens={self.max_tokens} does not apply to "
                    "eval.perplexity.protocol=fixed_targets (every length scores the same tokens): "
                    "set max_tokens=0 and bound the work with max_docs"
                )
        elif self.targets:
            raise ValueError(
                f"eval.perplexity.targets={self.targets} applies only to protocol=fixed_targets, "
                f"not eval.perplexity.protocol={self.protocol}"
            )

    def stride_for(self, length: int) -> int:
        s = int(self.stride) if self.stride > 1 else max(1, int(round(self.stride * length)))
        if s > length:
            raise ValueError(f"eval.perplexity.stride={s} exceeds the context length {length}")
        return s

    def run_for(self, length: int) -> int:
        """Predictions a window scores after a document's first window (the reported ``stride``):
        ``S`` under ``sliding``; ``T`` (``L >= T``) or ``S`` (``L < T``) under ``fixed_targets``."""
        if self.protocol == "fixed_targets" and length >= self.targets:
            return self.targets
        return self.stride_for(length)

    def min_document(self) -> int:
        """Tokens a document needs to take part at every length under ``fixed_targets``."""
        return max(n + 1 + self.targets - self.run_for(n) for n in self.lengths)


@dataclass
class PerplexityResult:
    length: int
    stride: int
    n_docs: int
    n_tokens: int
    nll_sum: float
    per_doc_tokens: dict = field(default_factory=dict)
    block_nll: list[float] = field(default_factory=list)
    """Summed NLL of each bootstrap block, in document then position order."""
    block_tokens: list[int] = field(default_factory=list)
    """Scored tokens of each block (``block_tokens`` of the config, fewer at a document's end)."""
    block_doc: list[int] = field(default_factory=list)
    """The document index of each block (to check that two results' blocks pair up)."""
    ppl_lo: float = math.nan
    ppl_hi: float = math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens) if self.n_tokens else float("nan")

    def as_row(self) -> dict:
        return {
            "length": self.length,
            "stride": self.stride,
            "ppl": self.ppl,
            "ppl_lo": self.ppl_lo,
            "ppl_hi": self.ppl_hi,
            "nll": self.nll_sum / self.n_tokens if self.n_tokens else float("nan"),
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
        }

    def as_blocks(self) -> dict:
        """The blocks behind ``ppl_lo``/``ppl_hi`` (JSON-serialisable), e.g. for
        :func:`ctxlab.eval.intervals.paired_bootstrap_ppl_ratio` between two models."""
        return {
            "length": self.length,
            "block_nll": list(self.block_nll),
            "block_tokens": list(self.block_tokens),
            "block_doc": list(self.block_doc),
        }


class Window(NamedTuple):
    """One cell of the grid: ``documents[doc][begin : begin + length + 1]``, whose last
    ``n_scored`` predictions are scored; ``origin`` is the document's first scored position
    (where its bootstrap blocks start)."""

    length: int
    doc: int
    begin: int
    n_scored: int
    origin: int

    @property
    def targets(self) -> range:
        """Positions in the document of the scored tokens."""
        end = self.begin + self.length + 1
        return range(end - self.n_scored, end)


def windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, n_scored)`` for each sliding window of a document of ``n_tokens`` tokens."""
    out, begin = [], 0
    while begin + length + 1 <= n_tokens:
        out.append((begin, length if begin == 0 else stride))
        begin += stride
    return out


def fixed_target_windows(n_tokens: int, length: int, targets: int, run: int) -> list[tuple[int, int]]:
    """``(begin, n_scored)`` of the windows that score the last ``targets`` tokens of a document of
    ``n_tokens`` tokens at ``length``, in runs of ``run`` targets (the last run may be shorter)."""
    first, out = n_tokens - targets, []
    for start in range(first, n_tokens, run):
        end = min(start + run, n_tokens)
        begin = end - 1 - length
        if begin < 0:
            raise ValueError(f"a document of {n_tokens} tokens has no window of {length} before {end}")
        out.append((begin, end - start))
    return out


@torch.no_grad()
def token_nll(model, ids: Tensor, n_scored: int, chunk_size: int = 0) -> Tensor:
    """NLL of each of the last ``n_scored`` next-token predictions of ``ids`` ``[L + 1]``:
    ``[n_scored]`` float32."""
    inputs, targets = ids[None, :-1], ids[None, 1:]
    L = inputs.shape[1]
    if chunk_size and chunk_size < L:
        cache, hidden = model.new_cache(), []
        for s in range(0, L, chunk_size):
            h = model.hidden(inputs[:, s : s + chunk_size], cache=cache)
            keep = max(0, (s + h.shape[1]) - (L - n_scored))  # scored positions in this chunk
            if keep:
                hidden.append(h[:, h.shape[1] - min(keep, h.shape[1]) :])
        h = torch.cat(hidden, dim=1)
    else:
        h = model.hidden(inputs)[:, L - n_scored :]
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits[0], targets[0, L - n_scored :], reduction="none")


@torch.no_grad()
def window_nll(model, ids: Tensor, n_scored: int, chunk_size: int = 0) -> Tensor:
    """Summed NLL of the last ``n_scored`` next-token predictions of ``ids`` ``[L + 1]``."""
    return token_nll(model, ids, n_scored, chunk_size).sum()


def plan_windows(documents: Sequence[Tensor], cfg: PerplexityConfig) -> list[Window]:
    """The work of the grid, one :class:`Window` each, in the order one process scores them:
    lengths in ``cfg`` order, documents, then windows."""
    if cfg.protocol == "fixed_targets":
        return _plan_fixed_targets(documents, cfg)
    plan = []
    for length in cfg.lengths:
        stride = cfg.stride_for(length)
        docs = [i for i, d in enumerate(documents) if len(d) >= length + 1]
        if cfg.max_docs:
            docs = docs[: cfg.max_docs]
        total = 0
        for i in docs:
            for begin, n_scored in windows(len(documents[i]), length, stride):
                if cfg.max_tokens and total >= cfg.max_tokens:
                    break
                plan.append(Window(length, i, begin, n_scored, origin=1))
                total += n_scored
    return plan


def _plan_fixed_targets(documents: Sequence[Tensor], cfg: PerplexityConfig) -> list[Window]:
    need = cfg.min_document()
    docs = [i for i, d in enumerate(documents) if len(d) >= need]
    if not docs:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(
            f"eval.perplexity.protocol=fixed_targets: no document has the {need} tokens that the "
            f"longest length {max(cfg.lengths)} with targets={cfg.targets} needs; the longest "
            f"document has {longest} tokens"
        )
    if cfg.max_docs:
        docs = docs[: cfg.max_docs]
    plan = []
    for length in cfg.lengths:
        for i in docs:
            n = len(documents[i])
            for begin, n_scored in fixed_target_windows(n, length, cfg.targets, cfg.run_for(length)):
                plan.append(Window(length, i, begin, n_scored, origin=n - cfg.targets))
    return plan


def block_pieces(w: Window, block_tokens: int) -> list[tuple[int, int]]:
    """``(block, tokens)`` of each piece of ``w``'s scored tokens cut at the document's block
    boundaries (blocks of ``block_tokens`` scored tokens counted from ``w.origin``)."""
    out, t = [], w.targets
    pos = t.start
    while pos < t.stop:
        block = (pos - w.origin) // block_tokens
        end = min(t.stop, w.origin + (block + 1) * block_tokens)
        out.append((block, end - pos))
        pos = end
    return out


def cell_key(w: Window, ids: Tensor, cfg: PerplexityConfig) -> str:
    """The store key of window ``w`` (``ids``: its tokens): where it sits, the sizes of the block
    pieces its value sums, how it is run, and a hash of its tokens (a changed corpus never
    matches). What the key cannot see (the model, its attention) is the store's fingerprint."""
    digest = hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16]
    pieces = "+".join(str(n) for _, n in block_pieces(w, cfg.block_tokens))
    return f"ppl/L={w.length}/doc={w.doc}/begin={w.begin}/pieces={pieces}/chunk={cfg.chunk_size}/ids={digest}"


@torch.no_grad()
def perplexity_grid(
    model,
    documents: Sequence[Tensor],
    cfg: PerplexityConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    store=None,
) -> list[PerplexityResult]:
    """Evaluate every length of ``cfg.lengths`` on ``documents`` (1-D token tensors).

    Data-parallel when a process group of several ranks exists (``ctxlab.distributed``): the
    windows are dealt round-robin over the ranks, their NLLs gathered once, and every rank sums
    them in the single-process order, so the result is the single-process result. The progress
    bar (this rank's windows) shows on rank 0 only.

    ``store``: a :class:`ctxlab.eval.cells.CellStore`; a window found there is not scored again,
    and each scored window is put there as it finishes (its NLL per block piece), so a grid
    interrupted and run again with the same store finishes with the uninterrupted result."""
    from ctxlab import distributed

    plan = plan_windows(documents, cfg)
    mine = distributed.my_items(len(plan))
    bar = tqdm(mine, desc="perplexity", disable=not (progress and distributed.is_rank_zero()), leave=False)
    nll = {}
    for j in bar:
        w = plan[j]
        ids = documents[w.doc][w.begin : w.begin + w.length + 1]
        key = cell_key(w, ids, cfg) if store is not None else None
        if key is not None and key in store:
            nll[j] = store[key]
            continue
        bar.set_postfix(L=w.length)
        per_token = token_nll(model, ids.to(device), w.n_scored, cfg.chunk_size).double()
        sizes = [n for _, n in block_pieces(w, cfg.block_tokens)]
        nll[j] = [float(p.sum()) for p in torch.split(per_token, sizes)]
        if store is not None:
            store.put(key, nll[j])
    return _results(plan, distributed.gather_items(len(plan), nll), cfg)


def _results(plan: list[Window], pieces: list[list[float]], cfg: PerplexityConfig) -> list[PerplexityResult]:
    """Per length: the windows' block pieces summed into blocks, in plan order."""
    blocks: dict[int, dict[tuple[int, int], list]] = {n: {} for n in cfg.lengths}  # [nll, tokens]
    for w, values in zip(plan, pieces):
        for (block, n), value in zip(block_pieces(w, cfg.block_tokens), values, strict=True):
            acc = blocks[w.length].setdefault((w.doc, block), [0.0, 0])
            acc[0] += value
            acc[1] += n
    out = []
    for length in cfg.lengths:
        res = PerplexityResult(length=length, stride=cfg.run_for(length), n_docs=0, n_tokens=0, nll_sum=0.0)
        for (doc, _), (value, n) in blocks[length].items():
            res.block_nll.append(value)
            res.block_tokens.append(n)
            res.block_doc.append(doc)
            res.per_doc_tokens[doc] = res.per_doc_tokens.get(doc, 0) + n
        res.nll_sum = sum(res.block_nll)
        res.n_tokens = sum(res.block_tokens)
        res.n_docs = len(res.per_doc_tokens)
        res.ppl_lo, res.ppl_hi = bootstrap_ppl(res.block_nll, res.block_tokens)
        out.append(res)
    return out
