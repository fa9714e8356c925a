"""The MS selection is exact: the sort-free top-k against the stable sort, and the contract for
scores rounded in another order (kernels/README.md, "Exactness of the selection").

1. ``row_top`` (unsorted topk, a tie check at the threshold, a sort of the survivors, a full
   sort for the rows whose threshold is tied) equals ``row_top_sorted`` (a stable sort of whole
   rows) on every input: integer-valued scores full of ties, signed zeros, NaN, infinities,
   masked candidates; and ``ms_select_torch(method="topk")`` equals ``method="sort"`` on
   tie-heavy inputs (integer tokens, repeated regions, all-zero queries) at odd lengths, with
   partial last regions, GQA ratios 1-4, both pools, scopes and modes.
2. Exact scores (integer tokens, w a power of two) give identical indices whatever the summation
   order: PyTorch with other chunk shapes, in float64, the loop oracle, the fused Triton
   selection (through the interpreter, in a child process).
3. Rounded scores: every float32 path returns the float64 selection on every separated block
   (``exact.separated_blocks``), and the error bound behind it holds.

Shapes: q [B, L, Hq, D], k [B, L, Hkv, D]; indices [B, Hs, G, T-m].
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ctxlab.kernels.ms_attention import exact, torch_impl
from ctxlab.kernels.ms_attention.naive import ms_select_naive
from ctxlab.kernels.ms_attention.torch_impl import (
    kv_head_of,
    ms_select_torch,
    num_regions,
    region_representatives,
    row_top,
    row_top_sorted,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
on_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")
not_in_child = pytest.mark.skipif(INTERPRETED, reason="runs in the parent process")


@pytest.fixture
def fallback_rows(monkeypatch) -> list[int]:
    """Rows ``row_top`` hands to the full stable sort (its tie fallback), per call."""
    calls: list[int] = []

    def counted(scores, n_sel):
        calls.append(scores.shape[0] if scores.dim() == 2 else scores[..., 0].numel())
        return row_top_sorted(scores, n_sel)

    monkeypatch.setattr(torch_impl, "row_top_sorted", counted)
    return calls


def _scores(kind: str, rows: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "int":  # few distinct values: ties everywhere, also at the threshold
        return torch.randint(-2, 3, (rows, n), generator=gen).float()
    if kind == "all-equal":
        return torch.zeros(rows, n)
    if kind == "signed-zeros":  # -0.0 and +0.0 are equal scores: ties to the smaller column
        x = torch.randint(-1, 2, (rows, n), generator=gen).float()
        return torch.where(torch.rand(rows, n, generator=gen) < 0.5, x * 0.0, x)
    if kind == "masked":  # -inf beyond a per-row limit, as the forbidden candidates are
        x = torch.randint(0, 4, (rows, n), generator=gen).float()
        limit = torch.randint(n // 2, n, (rows, 1), generator=gen)
        return x.masked_fill(torch.arange(n) > limit, float("-inf"))
    if kind == "nan-inf":
        x = torch.randn(rows, n, generator=gen)
        x[torch.rand(rows, n, generator=gen) < 0.02] = float("nan")
        x[torch.rand(rows, n, generator=gen) < 0.02] = float("inf")
        x[torch.rand(rows, n, generator=gen) < 0.02] = float("-inf")
        return x
    if kind == "float64-ties":
        return torch.randint(0, 3, (rows, n), generator=gen).double() / 3
    return torch.randn(rows, n, generator=gen)  # "continuous": no ties


ROW_CASES = [
    # (id, kind, rows, n, n_sel)
    ("int-n63-k20", "int", 64, 63, 20),
    ("int-n97-k1", "int", 64, 97, 1),
    ("int-n97-k96", "int", 32, 97, 96),
    ("int-n1025-k448", "int", 8, 1025, 448),
    ("all-equal-n61-k7", "all-equal", 4, 61, 7),
    ("signed-zeros-n97-k30", "signed-zeros", 64, 97, 30),
    ("masked-n97-k12", "masked", 64, 97, 12),
    ("nan-inf-n200-k50", "nan-inf", 32, 200, 50),
    ("float64-ties-n63-k9", "float64-ties", 32, 63, 9),
    ("continuous-n1025-k100", "continuous", 16, 1025, 100),
]


@pytest.mark.parametrize("kind, rows, n, n_sel", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
@not_in_child
def test_row_top_equals_stable_sort(kind, rows, n, n_sel, fallback_rows):
    scores = _scores(kind, rows, n, seed=n + n_sel)
    want = row_top_sorted(scores, n_sel)
    assert torch.equal(row_top(scores, n_sel), want)
    assert torch.equal(row_top(scores.view(2, rows // 2, n), n_sel), want.view(2, rows // 2, n_sel))
    if kind in ("all-equal", "nan-inf"):
        assert sum(fallback_rows) > 0  # the fallback branch ran
    if kind == "continuous":
        assert fallback_rows == []  # distinct scores: no row needs the full sort


def _tokens(kind: str, shape, gen: torch.Generator, region: int) -> torch.Tensor:
    B, L, H, D = shape
    if kind == "float":
        return torch.randn(shape, generator=gen)
    if kind == "binary":
        return torch.randint(0, 2, shape, generator=gen).float()
    x = torch.randint(-1, 2, shape, generator=gen).float()
    if kind == "repeated":  # every region a copy of one of 3 regions: equal score columns
        n = num_regions(L, region)
        pick = torch.randint(0, 3, (n,), generator=gen).repeat_interleave(region)[:L]
        x = x[:, pick]
    return x


# (id, B L Hq Hkv D, region w, budget T, merge m, pool, scope, select, query kind, key kind)
SELECT_CASES = [
    ("L63-w4-gqa1-int", (1, 63, 2, 2, 4), 4, 6, 2, "mean", "head", "paper", "int", "int"),
    ("L97-w3-gqa3-repeated-group", (1, 97, 3, 1, 4), 3, 8, 3, "mean", "group", "paper", "int", "repeated"),
    ("L97-w5-gqa4-zero-q-causal", (1, 97, 4, 1, 4), 5, 6, 2, "mean", "head", "causal", "zero", "int"),
    (
        "L1025-w4-gqa2-binary-attn",
        (1, 1025, 2, 1, 2),
        4,
        24,
        6,
        "attn",
        "head",
        "paper",
        "binary",
        "repeated",
    ),
    ("L1025-w8-gqa4-int-causal-group", (2, 1025, 4, 1, 4), 8, 16, 5, "mean", "group", "causal", "int", "int"),
    (
        "L130-w3-gqa2-float-attn-group",
        (1, 130, 4, 2, 8),
        3,
        10,
        4,
        "attn",
        "group",
        "causal",
        "float",
        "float",
    ),
    ("L61-w1-gqa1-binary", (1, 61, 1, 1, 2), 1, 12, 5, "mean", "head", "paper", "binary", "binary"),
]


def _select_inputs(shape, region, q_kind, k_kind, seed):
    B, L, Hq, Hkv, D = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(B, L, Hq, D) if q_kind == "zero" else _tokens(q_kind, (B, L, Hq, D), gen, region)
    return q, _tokens(k_kind, (B, L, Hkv, D), gen, region)


@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select, q_kind, k_kind",
    [c[1:] for c in SELECT_CASES],
    ids=[c[0] for c in SELECT_CASES],
)
@not_in_child
def test_topk_selection_equals_sort_selection(
    shape, region, budget, merge, pool, scope, select, q_kind, k_kind, fallback_rows
):
    """Same scores, same indices: the sort-free path against the stable sort, whole and in
    chunks of one block (each chunk's row check deferred to the end of the call)."""
    q, k = _select_inputs(shape, region, q_kind, k_kind, seed=shape[1])
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    for chunk in (torch_impl.DEFAULT_MAX_CHUNK_ELEMS, 1):
        want = ms_select_torch(q, k, method="sort", max_chunk_elems=chunk, **opts)
        fallback_rows.clear()
        got = ms_select_torch(q, k, max_chunk_elems=chunk, **opts)
        assert torch.equal(got, want), (got != want).nonzero()[:5]
        if q_kind == "zero":
            assert sum(fallback_rows) > 0  # every score is 0: every row's threshold is tied
        if q_kind == "float":
            assert fallback_rows == []
    if q_kind in ("int", "zero") and pool == "mean" and (region & (region - 1)) == 0:
        assert torch.equal(got, ms_select_naive(q, k, **opts))  # exact scores: the oracle's


def test_method_is_validated():
    q = torch.randn(1, 40, 1, 4)
    with pytest.raises(ValueError, match="method"):
        ms_select_torch(q, q, region=2, budget=8, merge=2, method="radix")


# Exact float32 scores: integer tokens in {-2..2}, w a power of two (the mean divides exactly),
# D small, so every representative, product and partial sum is exact in any order.
EXACT_CASES = [
    ("L97-w4-gqa3-head", (1, 97, 3, 1, 8), 4, 8, 3, "head", "paper"),
    ("L1025-w8-gqa2-group-causal", (1, 1025, 4, 2, 4), 8, 20, 6, "group", "causal"),
    ("L63-w2-gqa4-repeated", (2, 63, 4, 1, 4), 2, 10, 4, "head", "causal"),
]


def _exact_inputs(shape, region, seed):
    q, k = _select_inputs(shape, region, "int", "repeated" if shape[0] == 2 else "int", seed)
    return q * 2, k


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, select",
    [c[1:] for c in EXACT_CASES],
    ids=[c[0] for c in EXACT_CASES],
)
@not_in_child
def test_exact_scores_give_identical_indices_in_any_order(shape, region, budget, merge, scope, select):
    q, k = _exact_inputs(shape, region, seed=3)
    opts = dict(region=region, budget=budget, merge=merge, pool="mean", scope=scope, select=select)
    want = ms_select_torch(q.double(), k.double(), method="sort", **opts)
    assert torch.equal(ms_select_torch(q, k, **opts), want)
    assert torch.equal(ms_select_torch(q, k, max_chunk_elems=1, **opts), want)
    assert torch.equal(ms_select_torch(q.bfloat16(), k.bfloat16(), **opts), want)
    assert torch.equal(ms_select_naive(q, k, **opts), want)


def _tf32(x):
    """x rounded to tf32 (10 explicit mantissa bits), to nearest."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _scores_in(dtype, q, k, region, pool, scope, precision="ieee"):
    """Scores with representatives in ``dtype``; ``precision="tf32x3"`` takes the dot products as
    Triton's tf32x3 does (hi*hi + hi*lo + lo*hi of tf32 splits, float32 sums)."""
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    Hs = Hq if scope == "head" else Hkv
    n = num_regions(L, region)
    qbar = region_representatives(q.to(dtype), region, pool).reshape(B, Hs, Hq // Hs, n, D).sum(2)
    kbar = region_representatives(k.to(dtype), region, pool)[:, kv_head_of(Hs, Hkv, q.device)]
    if precision == "tf32x3":
        qh, kh = _tf32(qbar), _tf32(kbar)
        ql, kl = _tf32(qbar - qh), _tf32(kbar - kh)
        dot = lambda a, b: torch.einsum("bsid,bsjd->bsij", a, b)  # noqa: E731
        return (dot(qh, kh) + dot(qh, kl) + dot(ql, kh)).double()
    return torch.einsum("bsid,bsjd->bsij", qbar, kbar).double()


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0], ids=["small", "unit", "large"])
@pytest.mark.parametrize(
    "pool, scope", [("mean", "head"), ("mean", "group"), ("attn", "head"), ("attn", "group")]
)
@not_in_child
def test_float32_score_error_is_within_the_stated_bound(pool, scope, scale, precision):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 97, 4, 16, generator=gen) * scale
    k = torch.randn(1, 97, 2, 16, generator=gen) * scale
    region = 5
    err = (
        _scores_in(torch.float32, q, k, region, pool, scope, precision)
        - _scores_in(torch.float64, q, k, region, pool, scope)
    ).abs()
    bound = exact.score_errors(
        exact.score_error_bound(q, k, region=region, pool=pool, scope=scope, precision=precision),
        torch.arange(num_regions(97, region)),
    )
    assert (err <= bound).all(), (err / bound).max()
    if precision == "tf32x3":  # the emulation rounds more than float32 does: not a vacuous check
        ieee = (
            _scores_in(torch.float32, q, k, region, pool, scope)
            - _scores_in(torch.float64, q, k, region, pool, scope)
        ).abs()
        assert not torch.equal(err, ieee), "the tf32x3 emulation rounded nothing"


# Rounded scores. "w3-int" has integer tokens but w=3: means like 1/3 are rounded, and exact
# ties (in exact arithmetic) abound, so many blocks are not separated.
ROUNDED_CASES = [
    ("L1025-w4-float-head", (1, 1025, 2, 1, 16), 4, 16, 4, "mean", "head", "paper", "float", 1.0),
    ("L130-w3-float-attn-group-causal", (1, 130, 4, 2, 8), 3, 10, 4, "attn", "group", "causal", "float", 1.0),
    ("L97-w5-float-large-attn", (1, 97, 3, 1, 8), 5, 6, 2, "attn", "head", "paper", "float", 20.0),
    ("L130-w3-int-near-ties", (1, 130, 4, 1, 2), 3, 12, 4, "mean", "head", "paper", "int", 1.0),
]


def _check_separated_blocks_agree(got, want, separated, kind):
    assert got.shape == want.shape == (*separated.shape, want.shape[-1])
    same = (got.long() == want).all(-1)
    assert bool((same | ~separated).all()), (~same & separated).nonzero()[:5]
    if kind == "float":
        assert separated.float().mean() > 0.5  # the statement is not vacuous here
    else:
        assert not separated.all()  # exact ties are never separated


@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select, kind, scale",
    [c[1:] for c in ROUNDED_CASES],
    ids=[c[0] for c in ROUNDED_CASES],
)
@not_in_child
def test_float32_paths_give_the_float64_selection_on_separated_blocks(
    shape, region, budget, merge, pool, scope, select, kind, scale
):
    q, k = _select_inputs(shape, region, kind, kind, seed=7)
    q, k = q * scale, k * scale
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    want = ms_select_torch(q.double(), k.double(), **opts)
    separated = exact.separated_blocks(q, k, **opts)
    for chunk in (torch_impl.DEFAULT_MAX_CHUNK_ELEMS, 1):
        _check_separated_blocks_agree(
            ms_select_torch(q, k, max_chunk_elems=chunk, **opts), want, separated, kind
        )


@not_in_child
def test_separation_sees_a_near_tie():
    """Two key regions whose float64 scores differ by less than the bound: not separated; far
    apart: separated."""
    region, budget, merge = 1, 3, 1
    q = torch.zeros(1, 6, 1, 2, dtype=torch.float64)
    q[0, :, 0] = torch.tensor([1.0, 0.0])
    k = torch.zeros(1, 6, 1, 2, dtype=torch.float64)
    k[0, :, 0, 0] = torch.tensor([0.0, 1.0, 1.0 + 2**-30, 0.5, 0.25, 0.0])
    opts = dict(region=region, budget=budget, merge=merge, pool="mean", scope="head", select="causal")
    near = exact.separated_blocks(q, k, **opts)
    k[0, 2, 0, 0] = 1.5
    far = exact.separated_blocks(q, k, **opts)
    # Block 0 (region 3) votes with row 2 over regions 0-2; block 1 with row 3 over 0-3.
    assert near.tolist() == [[[False, False, False]]]
    assert far.tolist() == [[[True, True, True]]]


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_fused_selection_in_the_interpreter():
    """Run this file's fused-selection tests under Triton's interpreter, in a child process
    (Triton reads TRITON_INTERPRET when first imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "fused_"]
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, select",
    [c[1:] for c in EXACT_CASES[:2]],
    ids=[c[0] for c in EXACT_CASES[:2]],
)
@on_interpreter
def test_fused_exact_scores_give_torch_indices(shape, region, budget, merge, scope, select):
    from ctxlab.kernels.ms_attention import triton_impl

    q, k = _exact_inputs(shape, region, seed=3)
    opts = dict(region=region, budget=budget, merge=merge, pool="mean", scope=scope, select=select)
    got = triton_impl.ms_select_triton(q, k, **opts)
    assert torch.equal(got.long(), ms_select_torch(q, k, method="sort", **opts))


@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select, kind, scale",
    [ROUNDED_CASES[1][1:], ROUNDED_CASES[3][1:]],
    ids=[ROUNDED_CASES[1][0], ROUNDED_CASES[3][0]],
)
@on_interpreter
def test_fused_rounded_scores_give_the_float64_selection_on_separated_blocks(
    shape, region, budget, merge, pool, scope, select, kind, scale
):
    from ctxlab.kernels.ms_attention import triton_impl

    q, k = _select_inputs(shape, region, kind, kind, seed=7)
    q, k = q * scale, k * scale
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    want = ms_select_torch(q.double(), k.double(), **opts)
    got = triton_impl.ms_select_triton(q, k, **opts)
    _check_separated_blocks_agree(got, want, exact.separated_blocks(q, k, **opts), kind)
