"""What "exact" means for the MS selection when scores are rounded: the contract, executable.

The selection (spec steps 5-8) is a discrete function of the score matrix S[i, j] = qbar_i .
kbar_j. Two implementations that compute bit-identical scores return identical indices, ties
included (tests/test_ms_select_exact.py). Implementations that round differently (PyTorch's
GEMM with other chunk shapes or on another device, Triton's ``tl.dot`` in the fused selection)
compute S in another summation order, and candidates whose scores lie closer than the rounding
error may swap. The contract (kernels/README.md, "Exactness of the selection"):

1. Inputs whose representatives and scores are exact in float32 (integer-valued tokens, w a
   power of two, small magnitudes): every implementation returns the same indices.
2. Otherwise, every float32 implementation (``select_precision="ieee"`` for the fused kernels;
   ``"tf32x3"`` with its larger product error, ``PRODUCT_ERROR``)
   returns the indices of the exact-arithmetic selection, for which ``ms_select_torch`` on
   float64 inputs stands in, on every *separated* block (``separated_blocks``): one whose
   voting rows' decisions (the order of each row's best T-m candidates and the cut after them)
   are each decided by a score gap larger than the error bound ``score_error_bound`` of both
   scores. Blocks that are not separated may differ by swapping near-tied candidates.

Shape legend: B batch, L tokens, Hq/Hkv query/kv heads, Hs selection heads, D head dim,
w region, T budget, m merge, n regions, G blocks; r = query heads summed into a
representative (Hq // Hs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .torch_impl import block_rows, kv_head_of, num_blocks, num_regions, region_representatives

FLOAT32_UNIT_ROUNDOFF = 2.0**-24

PRODUCT_ERROR = {"ieee": 0, "tf32x3": 48, "tf32": 32800}
"""Extra per-product rounding of a score's dot products, in units of the float32 unit roundoff u,
by ``tl.dot``'s input precision. "ieee": none (float32 products). "tf32x3": each factor x is split
into hi = tf32(x) and lo = tf32(x - hi) (10 explicit mantissa bits each, so |x - hi - lo| <=
2^-20 |x| even if the conversion truncates), and x*y is taken as hi*hi + hi*lo + lo*hi: the two
split errors and the dropped lo*lo add at most 3 * 2^-20 |x||y| = 48 u |x||y|. "tf32": hi*hi
alone, at most (2 * 2^-10 + 2^-20) |x||y| <= 32800 u |x||y|."""


def search_error(precision: str, head_dim: int) -> float:
    """Bound, per unit of |a| |b|, on the distance between two computations of the dot product
    a . b of float32 vectors of length ``head_dim``: one by ``tl.dot`` in ``precision``, one by
    float32 products summed in any order. Each is within (PRODUCT_ERROR + D + 1) u sum|a_i b_i|
    of the exact value (products, then D - 1 additions; Cauchy-Schwarz bounds the sum by
    |a| |b|), so the two are within their sum; 1% covers the higher-order terms."""
    if precision not in PRODUCT_ERROR:
        raise ValueError(f"precision must be one of {tuple(PRODUCT_ERROR)}, got {precision!r}")
    return 1.01 * (PRODUCT_ERROR[precision] + 2 * head_dim + 2) * FLOAT32_UNIT_ROUNDOFF


def _region_bounds(x_BLHD: Tensor, region: int, pool: str, heads: int) -> tuple[Tensor, Tensor]:
    """Per region, float64 ``[B, heads, n]``: N, the largest token norm summed over the
    ``H // heads`` heads a representative adds, and Lam, the largest pooling logit
    ``|x_t . mean| / sqrt(D)`` over those heads and tokens (0 for ``pool="mean"``)."""
    B, L, H, D = x_BLHD.shape
    n = num_regions(L, region)
    x = F.pad(x_BLHD.detach().double(), (0, 0, 0, 0, 0, n * region - L)).view(B, n, region, H, D)
    norm = x.norm(dim=-1).amax(2)  # [B, n, H]; padding rows are zero
    if pool == "attn":
        mean = region_representatives(x_BLHD.double(), region, "mean").transpose(1, 2)  # [B, n, H, D]
        lam = torch.einsum("bnwhd,bnhd->bnwh", x, mean).abs().amax(2) / math.sqrt(D)
    else:
        lam = torch.zeros_like(norm)
    norm = norm.view(B, n, heads, H // heads).sum(-1).transpose(1, 2)
    lam = lam.view(B, n, heads, H // heads).amax(-1).transpose(1, 2)
    return norm, lam


def score_error_bound(
    q: Tensor, k: Tensor, *, region: int, pool: str, scope: str, precision: str = "ieee"
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Factors of the bound on one computed score's rounding error:
    ``|S_computed[i, j] - S_exact[i, j]| <= 2u * (c + 2*LamQ[i] + 2*LamK[j]) * NQ[i] * NK[j]``,
    u the unit roundoff of the score dtype (2^-24 for float32).

    Returns ``NQ, LamQ, NK, LamK`` float64 ``[B, Hs, n]`` (keys mapped to the selection heads;
    N: a region's largest token norm, summed over the r heads a representative adds; Lam: its
    largest pooling logit, 0 for ``pool="mean"``) and ``c = D + 2w + r`` (plus
    ``PRODUCT_ERROR[precision]`` when the dots run in another input precision than float32).

    For ``pool="mean"`` this is standard forward error analysis: a representative's sum of at
    most w tokens and its division err by at most ``gamma_w * mean|x|`` per element, so its
    norm errs by at most ``gamma_w * N``; summing r heads adds ``gamma_r``; the dot product of
    length D errs by at most ``gamma_D * |qbar| |kbar|``; the factor 2 covers gamma's
    higher-order terms. ``pool="attn"`` adds the rounding of its pooling logits, which grows
    with their size (Lam): a first-order estimate, checked by the tests on inputs of large
    magnitude.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    Hs = Hq if scope == "head" else Hkv
    nq, lq = _region_bounds(q, region, pool, Hs)
    nk, lk = _region_bounds(k, region, pool, Hkv)
    kv_head = kv_head_of(Hs, Hkv, q.device)
    if precision not in PRODUCT_ERROR:
        raise ValueError(f"precision must be one of {tuple(PRODUCT_ERROR)}, got {precision!r}")
    c = D + 2 * region + Hq // Hs + PRODUCT_ERROR[precision]
    return nq, lq, nk[:, kv_head], lk[:, kv_head], float(c)


def score_errors(bound: tuple, rows: Tensor, unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF) -> Tensor:
    """``score_error_bound``'s bound for query regions ``rows`` ([R]) against every region:
    float64 ``[B, Hs, R, n]``; ``bound`` is that function's result."""
    nq, lq, nk, lk, c = bound
    nq, lq = nq[:, :, rows, None], lq[:, :, rows, None]
    return 2 * unit_roundoff * (c + 2 * lq + 2 * lk[:, :, None, :]) * nq * nk[:, :, None, :]


def separated_blocks(
    q: Tensor,
    k: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    pool: str,
    scope: str,
    select: str,
    unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF,
    max_chunk_elems: int = 1 << 22,
    precision: str = "ieee",
) -> Tensor:
    """Bool ``[B, Hs, G]``: the blocks whose selection no score error within
    ``score_error_bound`` can change.

    Per voting row (scores in float64, allowed candidates sorted by score, s_1 >= s_2 >= ...,
    with bounds e_p): every step inside the row's top list and the cut after it are decided,
    ``s_p - e_p > s_{p+1} + e_{p+1}`` for p <= T-m, and no candidate outside the list can reach
    it, ``min_{p <= T-m} (s_p - e_p) > max_{p > T-m} (s_p + e_p)``. Then any scores within the
    bounds give every row the same top list in the same order, hence the same merge. Rows past
    the last region (paper mode, last block) do not vote and count as separated.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    Hs = Hq if scope == "head" else Hkv
    n_sel = budget - merge
    n = num_regions(L, region)
    G = num_blocks(L, region, budget, merge)
    if G == 0:
        return torch.ones((B, Hs, 0), dtype=torch.bool, device=q.device)
    qbar = region_representatives(q.double(), region, pool).reshape(B, Hs, Hq // Hs, n, D).sum(2)
    kbar = region_representatives(k.double(), region, pool)[:, kv_head_of(Hs, Hkv, q.device)]
    bound = score_error_bound(q, k, region=region, pool=pool, scope=scope, precision=precision)
    rows, limit = block_rows(0, G, budget=budget, merge=merge, select=select, device=q.device)
    in_range = rows < n  # [G, m]
    rows = rows.clamp_max(n - 1)
    regions = torch.arange(n, device=q.device)

    per_chunk = max(1, max_chunk_elems // (B * Hs * merge * n))
    out = []
    for g0 in range(0, G, per_chunk):
        chunk = slice(g0, g0 + per_chunk)
        lim_c, ok_c = limit[chunk], in_range[chunk]
        Gc = lim_c.shape[0]
        flat = rows[chunk].flatten()
        scores = torch.einsum("bsid,bsjd->bsij", qbar[:, :, flat], kbar).view(B, Hs, Gc, merge, n)
        eps = score_errors(bound, flat, unit_roundoff).view(B, Hs, Gc, merge, n)
        allowed = regions <= lim_c[..., None]  # [Gc, m, n]
        s, perm = scores.masked_fill(~allowed, float("-inf")).sort(dim=-1, descending=True, stable=True)
        e = eps.gather(-1, perm)
        real = s > float("-inf")
        low, high = s - e, s + e
        steps = (low[..., :n_sel] > high[..., 1 : n_sel + 1]) | ~real[..., 1 : n_sel + 1]
        rest = high[..., n_sel:].masked_fill(~real[..., n_sel:], float("-inf")).amax(-1)
        cut = low[..., :n_sel].amin(-1) > rest
        row_ok = (steps.all(-1) & cut) | ~ok_c
        out.append(row_ok.all(-1))
    return torch.cat(out, dim=2)
