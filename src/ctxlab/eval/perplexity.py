"""Perplexity against context length: the sliding-window protocol.

For a context length ``L`` and stride ``S`` (``S <= L``), every test document with at least
``L + 1`` tokens is cut into windows of ``L`` input tokens starting at ``0, S, 2S, ...`` (only
whole windows). A window predicts the token after each of its inputs. The first window of a
document scores all ``L`` predictions; each later window scores only its last ``S``
predictions, the ones no earlier window scored, so every scored token is predicted once and,
after the first window, with at least ``L - S`` tokens of context. Perplexity is
``exp(total NLL / scored tokens)``; the number of documents and scored tokens is reported
beside every figure, and documents shorter than ``L + 1`` are left out (never padded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm


@dataclass(kw_only=True)
class PerplexityConfig:
    """Grid and protocol of the perplexity evaluation."""

    lengths: list[int]
    """Context lengths L to evaluate, in tokens (from below the training length to far beyond)."""
    stride: float = 0.5
    """Window stride S: an int number of tokens (> 1) or a fraction of L (0 < S <= 1)."""
    max_tokens: int = 0
    """Stop scoring a length after this many tokens (0: no cap). Bounds CPU time."""
    max_docs: int = 0
    """Use at most this many qualifying documents per length (0: all)."""
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
        for name in ("max_tokens", "max_docs", "chunk_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.perplexity.{name} must be >= 0")

    def stride_for(self, length: int) -> int:
        s = int(self.stride) if self.stride > 1 else max(1, int(round(self.stride * length)))
        if s > length:
            raise ValueError(f"eval.perplexity.stride={s} exceeds the context length {length}")
        return s


@dataclass
class PerplexityResult:
    length: int
    stride: int
    n_docs: int
    n_tokens: int
    nll_sum: float
    per_doc_tokens: dict = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens) if self.n_tokens else float("nan")

    def as_row(self) -> dict:
        return {
            "length": self.length,
            "stride": self.stride,
            "ppl": self.ppl,
            "nll": self.nll_sum / self.n_tokens if self.n_tokens else float("nan"),
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
        }


def windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, n_scored)`` for each window of a document of ``n_tokens`` tokens."""
    out, begin = [], 0
    while begin + length + 1 <= n_tokens:
        out.append((begin, length if begin == 0 else stride))
        begin += stride
    return out


@torch.no_grad()
def window_nll(model, ids: Tensor, n_scored: int, chunk_size: int = 0) -> Tensor:
    """Summed NLL of the last ``n_scored`` next-token predictions of ``ids`` ``[L + 1]``."""
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
    return F.cross_entropy(logits[0], targets[0, L - n_scored :], reduction="sum")


def plan_windows(documents: Sequence[Tensor], cfg: PerplexityConfig) -> list[tuple[int, int, int, int]]:
    """The work of the grid, ``(length, document index, begin, n_scored)`` per window, in the
    order one process scores them: lengths in ``cfg`` order, documents, then windows."""
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
                plan.append((length, i, begin, n_scored))
                total += n_scored
    return plan


@torch.no_grad()
def perplexity_grid(
    model,
    documents: Sequence[Tensor],
    cfg: PerplexityConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[PerplexityResult]:
    """Evaluate every length of ``cfg.lengths`` on ``documents`` (1-D token tensors).

    Data-parallel when a process group of several ranks exists (``ctxlab.distributed``): the
    windows are dealt round-robin over the ranks, their NLLs gathered once, and every rank sums
    them in the single-process order, so the result is the single-process result. The progress
    bar (this rank's windows) shows on rank 0 only."""
    from ctxlab import distributed

    plan = plan_windows(documents, cfg)
    mine = distributed.my_items(len(plan))
    bar = tqdm(mine, desc="perplexity", disable=not (progress and distributed.is_rank_zero()), leave=False)
    nll = {}
    for j in bar:
        length, i, begin, n_scored = plan[j]
        bar.set_postfix(L=length)
        ids = documents[i][begin : begin + length + 1].to(device)
        nll[j] = float(window_nll(model, ids, n_scored, cfg.chunk_size))
    nlls = distributed.gather_items(len(plan), nll)
    results = {
        length: PerplexityResult(
            length=length, stride=cfg.stride_for(length), n_docs=0, n_tokens=0, nll_sum=0.0
        )
        for length in cfg.lengths
    }
    for (length, i, _, n_scored), value in zip(plan, nlls):
        res = results[length]
        res.nll_sum += value
        res.n_tokens += n_scored
        res.per_doc_tokens[i] = res.per_doc_tokens.get(i, 0) + n_scored
    for res in results.values():
        res.n_docs = len(res.per_doc_tokens)
    return [results[length] for length in cfg.lengths]
