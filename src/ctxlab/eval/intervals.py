"""Confidence intervals for the evaluation grid: Wilson for passkey accuracy, block bootstrap for
perplexity (one model, or the ratio of two models scored on the same blocks).

Perplexity is ``exp(sum NLL / sum tokens)`` over ``G`` blocks of consecutive scored tokens; the
bootstrap resamples whole blocks with replacement (neighbouring tokens are correlated, blocks much
less so) and reads the percentile interval of the resampled perplexities. Everything is numpy and
deterministic given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_DRAWS_PER_CHUNK = 1 << 22  # block indices drawn at once: bounds memory for grids of many blocks


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (``z = 1.96``: 95%).

    ``n = 0`` (no trials) gives ``(0.0, 1.0)``: no information, every proportion is possible.
    ``k = 0`` gives a lower bound of exactly 0 and ``k = n`` an upper bound of exactly 1."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _resampled_rate(nll: np.ndarray, tokens: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``sum nll / sum tokens`` of ``n_boot`` resamples with replacement of the ``G`` blocks
    (``nll``, ``tokens``: ``[G]``); returns ``[n_boot]``."""
    G = len(tokens)
    rng = np.random.default_rng(seed)
    rows = max(1, _DRAWS_PER_CHUNK // G)
    out = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, G, size=(min(rows, n_boot - start), G))  # [b, G]
        out.append(nll[idx].sum(axis=1) / tokens[idx].sum(axis=1))
    return np.concatenate(out)


def _blocks(block_nll: Sequence[float], block_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    nll = np.asarray(block_nll, dtype=np.float64)
    tokens = np.asarray(block_tokens, dtype=np.float64)
    if nll.shape[0] != tokens.shape[0]:
        raise ValueError(f"{nll.shape[0]} block NLLs but {tokens.shape[0]} block token counts")
    if (tokens <= 0).any():
        raise ValueError("every block must hold at least one token")
    return nll, tokens


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def bootstrap_ppl(
    block_nll: Sequence[float],
    block_tokens: Sequence[int],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``exp(sum block_nll / sum block_tokens)``, resampling the
    blocks with replacement. No blocks: ``(nan, nan)``; one block: the point estimate twice."""
    _check(n_boot, level)
    nll, tokens = _blocks(block_nll, block_tokens)
    if len(tokens) == 0:
        return math.nan, math.nan
    rate = _resampled_rate(nll, tokens, n_boot, seed)
    lo, hi = np.quantile(rate, [(1 - level) / 2, (1 + level) / 2])
    return math.exp(lo), math.exp(hi)


def paired_bootstrap_ppl_ratio(
    a_nll: Sequence[float],
    b_nll: Sequence[float],
    tokens: Sequence[int],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``ppl_A / ppl_B`` of two models scored on the same blocks (same tokens, same order) and its
    paired percentile bootstrap interval: each resample draws one set of blocks for both models,
    so the variation the two share (hard and easy documents) cancels. ``hi < 1``: A has the lower
    perplexity at the stated level; ``lo > 1``: B has. Returns ``(ratio, lo, hi)``."""
    _check(n_boot, level)
    a, tok = _blocks(a_nll, tokens)
    b, _ = _blocks(b_nll, tokens)
    if len(tok) == 0:
        return math.nan, math.nan, math.nan
    ratio = math.exp((a.sum() - b.sum()) / tok.sum())
    rate = _resampled_rate(a - b, tok, n_boot, seed)
    lo, hi = np.quantile(rate, [(1 - level) / 2, (1 + level) / 2])
    return ratio, math.exp(lo), math.exp(hi)
