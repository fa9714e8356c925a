"""MS attention: the vectorised PyTorch path against the loop oracle, the spec's worked rules,
dense equivalence, causality, KV-cache decoding, validation and low precision."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from ctxlab.kernels.ms_attention import (
    ms_attend_torch,
    ms_attention,
    ms_attention_torch,
    ms_select,
    ms_select_torch,
    validate_ms_args,
)
from ctxlab.kernels.ms_attention.naive import ms_attend_naive, ms_attention_naive, ms_select_naive
from ctxlab.kernels.rope import rope_cos_sin, rope_inv_freq, rotate_half

OPTIONS = [
    dict(pool=pool, scope=scope, select=select, pe=pe)
    for pool, scope, select, pe in itertools.product(
        ("mean", "attn"), ("head", "group"), ("paper", "causal"), ("pre", "selected")
    )
]


def options_id(opts: dict) -> str:
    return "-".join(opts[key] for key in ("pool", "scope", "select", "pe"))


@dataclass(frozen=True)
class Shape:
    B: int
    L: int
    Hq: int
    Hkv: int
    D: int
    region: int
    budget: int
    merge: int

    @property
    def id(self) -> str:
        return (
            f"B{self.B}-L{self.L}-h{self.Hq}/{self.Hkv}-D{self.D}-w{self.region}-T{self.budget}-m{self.merge}"
        )

    @property
    def ms(self) -> dict:
        return dict(region=self.region, budget=self.budget, merge=self.merge)


def make_qkv(shape: Shape, dtype=torch.float64, seed: int = 0, grad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.B, shape.L, shape.Hq, shape.D, generator=gen, dtype=torch.float64)
    k = torch.randn(shape.B, shape.L, shape.Hkv, shape.D, generator=gen, dtype=torch.float64)
    v = torch.randn(shape.B, shape.L, shape.Hkv, shape.D, generator=gen, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(grad) for x in (q, k, v)]


def output_and_grads(fn, q, k, v, seed: int = 1):
    out = fn(q, k, v)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_all_close(actual, expected, **tol):
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}", **tol)


# L=97 (99) with w=4: 25 regions, the last holding 1 (3) tokens; T=8, m=3: 6 blocks, the last of 2.
GQA_SHAPES = [
    Shape(B=2, L=97, Hq=2, Hkv=2, D=6, region=4, budget=8, merge=3),
    Shape(B=1, L=97, Hq=6, Hkv=2, D=6, region=4, budget=8, merge=3),
    Shape(B=1, L=99, Hq=4, Hkv=1, D=8, region=4, budget=8, merge=3),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=lambda s: s.id)
def test_torch_matches_naive_outputs_and_grads(shape: Shape, opts: dict):
    q, k, v = make_qkv(shape)
    kwargs = {**shape.ms, **opts}
    expected = output_and_grads(lambda *x: ms_attention_naive(*x, **kwargs), q, k, v)
    actual = output_and_grads(lambda *x: ms_attention_torch(*x, **kwargs), q, k, v)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


EDGE_CASES = [
    # merge=1 and T-m=1; lengths at, just past and well past the dense limit n = T.
    (Shape(B=1, L=40, Hq=2, Hkv=1, D=4, region=3, budget=5, merge=1), OPTIONS[0]),
    (Shape(B=1, L=40, Hq=2, Hkv=1, D=4, region=3, budget=5, merge=4), OPTIONS[5]),
    (Shape(B=1, L=13, Hq=3, Hkv=3, D=4, region=3, budget=4, merge=2), OPTIONS[14]),
    (Shape(B=1, L=64, Hq=4, Hkv=2, D=10, region=8, budget=3, merge=2), OPTIONS[11]),
    (Shape(B=2, L=63, Hq=1, Hkv=1, D=4, region=1, budget=9, merge=4), OPTIONS[6]),
    # A long odd length with small regions: 257 regions, 61 blocks, the last of one region.
    (Shape(B=1, L=1025, Hq=3, Hkv=1, D=6, region=4, budget=16, merge=4), OPTIONS[13]),
]


@pytest.mark.parametrize(
    ("shape", "opts"), EDGE_CASES, ids=[f"{s.id}-{options_id(o)}" for s, o in EDGE_CASES]
)
def test_torch_matches_naive_edge_shapes(shape: Shape, opts: dict):
    q, k, v = make_qkv(shape, seed=3)
    kwargs = {**shape.ms, **opts}
    sel = dict(pool=opts["pool"], scope=opts["scope"], select=opts["select"])
    for method in ("topk", "sort"):  # the sort-free default and the stable sort agree with the oracle
        torch.testing.assert_close(
            ms_select_torch(q, k, **shape.ms, **sel, method=method), ms_select_naive(q, k, **shape.ms, **sel)
        )
    expected = output_and_grads(lambda *x: ms_attention_naive(*x, **kwargs), q, k, v)
    actual = output_and_grads(lambda *x: ms_attention_torch(*x, **kwargs), q, k, v)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pe", ["pre", "selected"])
@pytest.mark.parametrize("scope", ["head", "group"])
def test_attend_matches_naive_on_arbitrary_index(scope: str, pe: str):
    """Any distinct regions before the block, in any order, with -1 entries ignored."""
    shape = Shape(B=2, L=61, Hq=4, Hkv=2, D=6, region=3, budget=6, merge=2)
    q, k, v = make_qkv(shape, seed=5)
    Hs = shape.Hq if scope == "head" else shape.Hkv
    G, n_sel = math.ceil((math.ceil(shape.L / 3) - 6) / 2), 4
    gen = torch.Generator().manual_seed(6)
    idx = torch.stack(
        [torch.randperm(6 + 2 * g, generator=gen)[:n_sel] for _ in range(shape.B * Hs) for g in range(G)]
    ).view(shape.B, Hs, G, n_sel)
    idx[0, 0, 1, 2] = -1
    idx[1, -1, G - 1, :3] = -1
    kwargs = dict(**shape.ms, scope=scope, pe=pe)
    expected = output_and_grads(lambda *x: ms_attend_naive(*x, idx, **kwargs), q, k, v)
    actual = output_and_grads(lambda *x: ms_attend_torch(*x, idx, **kwargs), q, k, v)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[15]], ids=options_id)
def test_chunking_does_not_change_results(opts: dict):
    """One block (or one dense row) per chunk gives what one chunk for everything gives."""
    shape = Shape(B=2, L=75, Hq=4, Hkv=2, D=6, region=2, budget=10, merge=3)
    q, k, v = make_qkv(shape, seed=7)
    kwargs = {**shape.ms, **opts}
    whole = output_and_grads(lambda *x: ms_attention_torch(*x, **kwargs, max_chunk_elems=1 << 30), q, k, v)
    chunked = output_and_grads(lambda *x: ms_attention_torch(*x, **kwargs, max_chunk_elems=1), q, k, v)
    assert_all_close(chunked, whole, rtol=1e-12, atol=1e-14)


def one_hot_keys(L: int) -> torch.Tensor:
    """With region=1 and k_j = e_j, representatives are the tokens and S[i, j] = q_i[j]."""
    return torch.eye(L, dtype=torch.float64)[None, :, None, :]


SCORE_ROWS = {
    2: [0, 0, 0, 0, 0, 0, 0, 0],  # all tied: the smaller j wins
    3: [1, 1, 5, 5, 0, 0, 0, 0],
    4: [1, 3, 2, 0, 0, 0, 0, 0],
    5: [0, 5, 0, 4, 0, 0, 0, 0],
    6: [0, 0, 7, 0, 9, 100, 100, 100],  # paper: 100s lie past j <= 6 - m and must be skipped
    7: [8, 0, 0, 0, 0, 6, 100, 100],
}


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize(
    ("select", "expected"),
    [
        # Block 0 (regions 4, 5) merges row 4 [1, 2] and row 5 [1, 3]: 1, (1), 2 | 3 dropped.
        # Block 1 (regions 6, 7) merges row 6 [4, 2] and row 7 [0, 5]: 4, 0 | 2, 5 dropped.
        ("paper", [[1, 2], [4, 0]]),
        # Block 0 merges row 2 [0, 1] and row 3 [2, 3]: 0, 2. Block 1: rows 4, 5 as above, j < 6.
        ("causal", [[0, 2], [1, 2]]),
    ],
)
def test_select_hand_worked_merge(select: str, expected: list, pool: str):
    L = 8
    q = torch.zeros(1, L, 1, L, dtype=torch.float64)
    for i, row in SCORE_ROWS.items():
        q[0, i, 0] = torch.tensor(row, dtype=torch.float64)
    idx = ms_select(q, one_hot_keys(L), region=1, budget=4, merge=2, pool=pool, select=select)
    assert idx.dtype == torch.long
    assert idx.tolist() == [[expected]]
    assert ms_select_naive(
        q, one_hot_keys(L), region=1, budget=4, merge=2, pool=pool, select=select
    ).tolist() == [[expected]]


def test_select_group_scope_sums_head_scores():
    """Head 0 and head 1 of one kv head: group scope ranks by the sum of their scores."""
    L = 6
    q = torch.zeros(1, L, 2, L, dtype=torch.float64)
    q[0, 4, 0, :3] = torch.tensor([3.0, 0, 0])
    q[0, 4, 1, :3] = torch.tensor([0.0, 2, 2])
    q[0, 5, :, 3] = 1.0
    k = one_hot_keys(L)
    per_head = ms_select(q, k, region=1, budget=4, merge=2, scope="head")
    shared = ms_select(q, k, region=1, budget=4, merge=2, scope="group")
    # Head 0: rows [0, 1] and [3, 0] -> 0, 3. Head 1: [1, 2] and [3, 0] -> 1, 3.
    assert per_head.tolist() == [[[[0, 3]], [[1, 3]]]]
    # Sum: row 4 scores [3, 2, 2] -> [0, 1]; row 5 [0, 0, 0, 2] -> [3, 0]; merged 0, 3.
    assert shared.tolist() == [[[[0, 3]]]]


@pytest.mark.parametrize("select", ["paper", "causal"])
@pytest.mark.parametrize("scope", ["head", "group"])
def test_select_contract(scope: str, select: str):
    """Shape [B, Hs, G, T-m]; each block's regions are distinct and lie before the block."""
    shape = Shape(B=2, L=203, Hq=6, Hkv=2, D=8, region=3, budget=12, merge=5)
    q, k, _ = make_qkv(shape, grad=False)
    idx = ms_select(q, k, **shape.ms, scope=scope, select=select)
    n = math.ceil(203 / 3)
    G = math.ceil((n - 12) / 5)
    assert idx.shape == (2, 6 if scope == "head" else 2, G, 7)
    block_start = 12 + 5 * torch.arange(G)
    assert ((idx >= 0) & (idx < block_start[:, None])).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()


def dense_causal_reference(q, k, v, scale=None):
    """Explicit float64 causal softmax attention with GQA by repetition."""
    group = q.shape[2] // k.shape[2]
    qt = q.double().transpose(1, 2)
    kt = k.double().repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.double().repeat_interleave(group, dim=2).transpose(1, 2)
    L = q.shape[1]
    logits = qt @ kt.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return (logits.softmax(-1) @ vt).transpose(1, 2)


def rope_natural(x):
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), rope_inv_freq(x.shape[-1], 10000.0))
    cos, sin = cos.double()[:, None], sin.double()[:, None]
    return x * cos + rotate_half(x) * sin


@pytest.mark.parametrize("pe", ["pre", "selected"])
@pytest.mark.parametrize("L", [1, 5, 31, 32], ids=lambda L: f"L{L}")
def test_short_inputs_are_dense_causal(L: int, pe: str):
    """n = ceil(L / w) <= T: exactly dense causal attention (natural positions for pe=selected)."""
    shape = Shape(B=2, L=L, Hq=6, Hkv=2, D=8, region=4, budget=8, merge=3)
    q, k, v = make_qkv(shape, grad=False)
    out = ms_attention(q, k, v, **shape.ms, pe=pe, scale=0.3, backend="torch")
    qr, kr = (rope_natural(q), rope_natural(k)) if pe == "selected" else (q, k)
    torch.testing.assert_close(out, dense_causal_reference(qr, kr, v, scale=0.3), rtol=1e-10, atol=1e-12)
    sdpa = F.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.3, enable_gqa=True
    )
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_dense_prefix_of_long_input():
    """Tokens t < T*w of a long input attend exactly as dense causal attention does."""
    shape = Shape(B=1, L=90, Hq=3, Hkv=1, D=8, region=4, budget=8, merge=3)
    q, k, v = make_qkv(shape, grad=False)
    out = ms_attention_torch(q, k, v, **shape.ms)
    torch.testing.assert_close(out[:, :32], dense_causal_reference(q, k, v)[:, :32], rtol=1e-10, atol=1e-12)


CAUSALITY_SHAPE = Shape(B=1, L=96, Hq=4, Hkv=2, D=8, region=4, budget=6, merge=3)


def perturbed_after(t: int, tensors, seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in tensors:
        y = x.detach().clone()
        y[:, t + 1 :] = torch.randn(y[:, t + 1 :].shape, generator=gen, dtype=y.dtype) * 3
        out.append(y)
    return out


@pytest.mark.parametrize("t", [30, 53, 70, 94], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("opts", [o for o in OPTIONS if o["select"] == "causal"], ids=options_id)
def test_causal_select_is_causal(opts: dict, t: int):
    q, k, v = make_qkv(CAUSALITY_SHAPE, grad=False)
    kwargs = {**CAUSALITY_SHAPE.ms, **opts}
    base = ms_attention_torch(q, k, v, **kwargs)
    moved = ms_attention_torch(*perturbed_after(t, (q, k, v)), **kwargs)
    torch.testing.assert_close(moved[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-13)
    assert not torch.allclose(moved[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("scope", ["head", "group"])
def test_paper_select_reads_later_queries_of_the_block(scope: str):
    """Only later queries change, yet earlier outputs of their block move (not causal)."""
    q, k, v = make_qkv(CAUSALITY_SHAPE, grad=False)
    kwargs = {**CAUSALITY_SHAPE.ms, "scope": scope, "select": "paper"}
    t = 24 + 12 * 2 + 1  # second token of block 2 (regions 12-14, tokens 48-59)
    base = ms_attention_torch(q, k, v, **kwargs)
    (q_moved,) = perturbed_after(t, (q,))
    moved = ms_attention_torch(q_moved, k, v, **kwargs)
    assert not torch.allclose(moved[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)


DECODE_SHAPE = Shape(B=2, L=37, Hq=4, Hkv=2, D=4, region=2, budget=4, merge=2)


@pytest.mark.parametrize("opts", [o for o in OPTIONS if o["select"] == "causal"], ids=options_id)
def test_decoding_token_by_token_equals_full_forward(opts: dict):
    """select=causal: token t decoded from the history [0, t] gets the full forward's output."""
    q, k, v = make_qkv(DECODE_SHAPE, grad=False)
    kwargs = {**DECODE_SHAPE.ms, **opts}
    full = ms_attention_torch(q, k, v, **kwargs)
    for t in range(DECODE_SHAPE.L):
        step = ms_attention_torch(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], start=t, **kwargs)
        assert step.shape == (2, 1, 4, 4)
        torch.testing.assert_close(step, full[:, t : t + 1], rtol=1e-12, atol=1e-13, msg=f"token {t}")


@pytest.mark.parametrize("start", [0, 3, 8, 9, 16, 21, 36], ids=lambda s: f"start{s}")
@pytest.mark.parametrize("select", ["paper", "causal"])
def test_start_returns_the_tail_of_the_forward_on_the_history(select: str, start: int):
    """For both selects, ``start`` only drops outputs; paper mode votes with the rows so far."""
    q, k, v = make_qkv(DECODE_SHAPE, grad=False)
    kwargs = {**DECODE_SHAPE.ms, "select": select, "pe": "selected", "pool": "attn"}
    tail = ms_attention_torch(q, k, v, start=start, **kwargs)
    torch.testing.assert_close(tail, ms_attention_torch(q, k, v, **kwargs)[:, start:], rtol=1e-12, atol=1e-13)


def test_paper_decoding_differs_from_training():
    """Paper mode: a decoded token's block has not seen its later rows, unlike the full pass."""
    q, k, v = make_qkv(DECODE_SHAPE, grad=False)
    kwargs = {**DECODE_SHAPE.ms, "select": "paper"}
    full = ms_attention_torch(q, k, v, **kwargs)
    steps = torch.cat(
        [
            ms_attention_torch(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], start=t, **kwargs)
            for t in range(37)
        ],
        dim=1,
    )
    assert not torch.allclose(steps, full)


BAD_OPTIONS = [
    (dict(merge=8, budget=8), "merge"),
    (dict(merge=0), "merge"),
    (dict(merge=2.0), "merge"),
    (dict(budget=-4), "budget"),
    (dict(budget=8.5), "budget"),
    (dict(region=0), "region"),
    (dict(region=True), "region"),
    (dict(pool="max"), "pool"),
    (dict(scope="token"), "scope"),
    (dict(select="future"), "select"),
    (dict(pe="alibi"), "pe"),
    (dict(backend="cuda"), "backend"),
    (dict(rope_base=1.0), "rope_base"),
    (dict(scale=0.0), "scale"),
    (dict(scale=float("nan")), "scale"),
]
SMALL = dict(region=2, budget=4, merge=2)


@pytest.mark.parametrize(
    ("bad", "name"), BAD_OPTIONS, ids=[f"{n}={list(b.values())[-1]!r}" for b, n in BAD_OPTIONS]
)
def test_bad_options_raise_naming_the_argument(bad: dict, name: str):
    q, k, v = make_qkv(Shape(1, 10, 2, 1, 4, 2, 4, 2), grad=False)
    kwargs = {**SMALL, **bad}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        validate_ms_args(**kwargs)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ms_attention(q, k, v, **kwargs)
    if name in ("region", "budget", "merge", "pool", "scope", "select"):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            ms_select(q, k, **kwargs)


def bad_tensors():
    q, k, v = make_qkv(Shape(1, 10, 4, 2, 4, 2, 4, 2), grad=False)
    return [
        ("rank", (q[0], k, v), "q"),
        ("int-dtype", (q.long(), k.long(), v.long()), "q"),
        ("dtype-mismatch", (q, k.float(), v), "k"),
        ("device-mismatch", (q, k, v.to("meta")), "v"),
        ("batch", (q, k.expand(2, -1, -1, -1), v), "k"),
        ("length", (q, k[:, :9], v), "k"),
        ("head-dim", (q, k, v[..., :2]), "v"),
        ("kv-heads", (q, k, v[:, :, :1]), "v"),
        ("gqa", (q[:, :, :3], k, v), "q"),
        ("empty", (q[:, :0], k[:, :0], v[:, :0]), "q"),
        ("not-tensor", (q.tolist(), k, v), "q"),
    ]


@pytest.mark.parametrize(("case", "tensors", "name"), bad_tensors(), ids=[c[0] for c in bad_tensors()])
def test_bad_tensors_raise_naming_the_argument(case: str, tensors, name: str):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ms_attention(*tensors, **SMALL)


def test_selected_pe_needs_an_even_head_dim():
    q, k, v = make_qkv(Shape(1, 10, 2, 1, 5, 2, 4, 2), grad=False)
    with pytest.raises(ValueError, match=r"\bpe\b"):
        ms_attention(q, k, v, **SMALL, pe="selected")


def test_attend_rejects_bad_index_and_start():
    shape = Shape(1, 20, 2, 1, 4, 2, 4, 2)
    q, k, v = make_qkv(shape, grad=False)
    idx = ms_select_torch(q, k, **shape.ms)
    with pytest.raises(ValueError, match=r"\bidx\b"):
        ms_attend_torch(q, k, v, idx[:, :, :2], **shape.ms)
    with pytest.raises(ValueError, match=r"\bidx\b"):
        ms_attend_torch(q, k, v, idx.float(), **shape.ms)
    late = idx.clone()
    late[0, 0, 1, 0] = 6  # block 1 starts at region 6
    with pytest.raises(ValueError, match=r"\bidx\b"):
        ms_attend_torch(q, k, v, late, **shape.ms)
    for start in (-1, 20, 2.0):
        with pytest.raises(ValueError, match=r"\bstart\b"):
            ms_attention_torch(q, k, v, **shape.ms, start=start)


def test_triton_backend_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ctxlab.kernels.ms_attention.triton_impl", None)
    q, k, v = make_qkv(Shape(1, 10, 2, 1, 4, 2, 4, 2), grad=False)
    with pytest.raises(RuntimeError, match="triton"):
        ms_attention(q, k, v, **SMALL, backend="triton")
    torch.testing.assert_close(
        ms_attention(q, k, v, **SMALL, backend="auto"), ms_attention(q, k, v, **SMALL, backend="torch")
    )


def test_auto_backend_on_cpu_is_the_torch_path():
    shape = Shape(1, 30, 4, 2, 4, 2, 4, 2)
    q, k, v = make_qkv(shape, grad=False)
    assert torch.equal(ms_attention(q, k, v, **shape.ms), ms_attention_torch(q, k, v, **shape.ms))


@pytest.mark.parametrize(
    ("dtype", "d", "takes"),
    [(torch.bfloat16, 32, True), (torch.float16, 128, True), (torch.float32, 64, True),
     (torch.float64, 64, False), (torch.bfloat16, 16, False), (torch.float32, 34, True),
     (torch.float32, 33, False)],
)  # fmt: skip
def test_auto_backend_takes_triton_only_for_what_the_kernels_take(dtype, d: int, takes: bool):
    """``auto`` on CUDA falls back to torch for a dtype or head dim the kernels refuse (a small
    model's D=16 works on a GPU); ``triton`` never falls back; CPU tensors are always torch."""
    from ctxlab.kernels.ms_attention import interface

    class FakeCuda:  # only what use_triton reads
        is_cuda, shape = True, (1, 8, 2, d)

    FakeCuda.dtype = dtype
    assert interface.triton_takes(FakeCuda()) is takes
    assert interface.use_triton(FakeCuda(), "auto") is takes
    assert interface.use_triton(FakeCuda(), "triton") is True
    assert interface.use_triton(torch.zeros(1, 8, 2, d, dtype=dtype), "auto") is False


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[15]], ids=options_id)
def test_bfloat16_runs_and_is_as_accurate_as_rounding(opts: dict):
    """bf16 in, bf16 out; errors against float64 on the same inputs stay within 2x (outputs)
    and 3x (gradients) of what rounding the float64 results to bf16 costs."""
    shape = Shape(B=1, L=75, Hq=4, Hkv=2, D=16, region=3, budget=8, merge=3)
    q, k, v = make_qkv(shape, dtype=torch.bfloat16)
    kwargs = {**shape.ms, **opts}
    low = output_and_grads(lambda *x: ms_attention(*x, **kwargs, backend="torch"), q, k, v)
    assert all(x.dtype == torch.bfloat16 and torch.isfinite(x).all() for x in low)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(low[0].shape, generator=gen, dtype=torch.float64).bfloat16().double()
    out64 = ms_attention_torch(q64, k64, v64, **kwargs)
    ref = (out64, *torch.autograd.grad(out64, (q64, k64, v64), grad_out))
    for name, a, r, factor in zip(("out", "dq", "dk", "dv"), low, ref, (2, 3, 3, 3)):
        rounding = max_error(r.bfloat16(), r)
        assert max_error(a, r) <= factor * rounding, name
