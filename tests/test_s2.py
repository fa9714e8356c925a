"""S2-Attn (LongLoRA's shifted sparse attention) against a naive masked float64 reference."""

from __future__ import annotations

import pytest
import torch

from ctxlab.attention.cache import LayerCache
from ctxlab.attention.modules import dense_attention
from ctxlab.attention.s2 import S2Attention, s2_attention, s2_group_size


def naive_s2(q, k, v, *, group: int, wrap: bool, scale: float | None = None):
    """Token-level masks from the definition: same group id and key not after the query, with
    the group id (and order) of the shifted heads taken on the shifted/rolled positions."""
    B, L, H, D = q.shape
    rep, shift = H // k.shape[2], group // 2
    t = torch.arange(L)
    outs = []
    for h in range(H):
        if h < H // 2:
            gid, order = t // group, t
        elif wrap:
            rolled = (t - shift) % L
            gid, order = rolled // group, rolled
        else:
            gid, order = torch.div(t - shift, group, rounding_mode="floor"), t
        allowed = (gid[:, None] == gid[None, :]) & (order[None, :] <= order[:, None])  # [L, L]
        qh, kh, vh = (x.double() for x in (q[:, :, h], k[:, :, h // rep], v[:, :, h // rep]))
        s = qh @ kh.transpose(1, 2) * (scale or D**-0.5)
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append(s.softmax(-1) @ vh)
    return torch.stack(outs, dim=2)


CASES = [
    # (B, L, H, Hkv, D, group, wrap)
    pytest.param(2, 32, 4, 4, 16, 8, True, id="mha-L32-G8-wrap"),
    pytest.param(1, 64, 8, 2, 8, 16, True, id="gqa4-L64-G16-wrap"),
    pytest.param(1, 36, 9, 3, 8, 9, True, id="smollm-heads9-kv3-oddG-wrap"),
    pytest.param(2, 63, 4, 2, 16, 16, False, id="gqa2-L63-partial-causal"),
    pytest.param(1, 97, 9, 3, 12, 24, False, id="heads9-L97-causal"),
    pytest.param(1, 10, 1, 1, 8, 4, False, id="one-head-all-shifted"),
    pytest.param(1, 12, 4, 4, 8, 16, False, id="group-longer-than-L"),
]


@pytest.mark.parametrize("grouped_kv", [True, False], ids=["grouped-kv", "repeated-kv"])
@pytest.mark.parametrize("B,L,H,Hkv,D,group,wrap", CASES)
def test_s2_matches_naive_forward_and_backward(B, L, H, Hkv, D, group, wrap, grouped_kv, monkeypatch):
    """repeated-kv: the path SDPA takes where its fused kernels cannot take grouped K/V (CUDA float32)."""
    import ctxlab.attention.modules as modules

    if not grouped_kv:
        monkeypatch.setattr(modules, "sdpa_keeps_gqa", lambda q, mask: False)
    g = torch.Generator().manual_seed(L * 31 + H)
    q, k, v = (torch.randn(B, L, h, D, generator=g, requires_grad=True) for h in (H, Hkv, Hkv))
    out = s2_attention(q, k, v, group=group, wrap=wrap)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = naive_s2(q64, k64, v64, group=group, wrap=wrap)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    do = torch.randn(out.shape, generator=g)
    out.backward(do)
    ref.backward(do.double())
    for name, a, b in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=name)


def test_wrap_leaks_future_and_causal_variant_does_not():
    L, group = 32, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, L, 4, 8, generator=g) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, -1], v2[:, -1] = torch.randn(2, 4, 8, generator=g)  # change only the last token
    for wrap, leaks in ((True, True), (False, False)):
        a = s2_attention(q, k, v, group=group, wrap=wrap)
        b = s2_attention(q, k2, v2, group=group, wrap=wrap)
        changed = (a[:, :-1] - b[:, :-1]).abs().amax() > 1e-6
        assert bool(changed) == leaks, f"wrap={wrap}"
        assert (a[:, :-1, :2] - b[:, :-1, :2]).abs().amax() < 1e-6  # unshifted heads: causal


def test_core_is_sparse_in_training_and_dense_otherwise():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 32, h, 8, generator=g) for h in (4, 2, 2))
    core = S2Attention(group_ratio=0.25)
    dense = dense_attention(q, k, v)
    torch.testing.assert_close(core.train()(q, k, v), s2_attention(q, k, v, group=8, wrap=True))
    assert (core.train()(q, k, v) - dense).abs().amax() > 1e-3
    torch.testing.assert_close(core.eval()(q, k, v), dense)
    # A cache (chunked evaluation, decoding) is dense even in training mode.
    cache = LayerCache()
    core.train()
    chunks = [core(q[:, s:e], k[:, s:e], v[:, s:e], cache=cache) for s, e in ((0, 20), (20, 21), (21, 32))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), dense, atol=1e-6, rtol=1e-6)
    assert core.causal and not core.training_causal and S2Attention(wrap=False).training_causal


def test_group_size_rule():
    assert s2_group_size(16384) == 4096
    assert s2_group_size(100, group_size=10) == 10
    assert s2_group_size(100, group_ratio=0.5) == 50
    with pytest.raises(ValueError, match="group size 1"):
        s2_group_size(4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"group_ratio": 0.0}, "group_ratio"),
        ({"group_ratio": 1.5}, "group_ratio"),
        ({"group_size": 1}, "group_size"),
        ({"group_size": -4}, "group_size"),
        ({"wrap": "yes"}, "wrap"),
    ],
)
def test_core_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S2Attention(**kwargs)


def test_function_rejects_bad_inputs():
    q, k = torch.randn(1, 30, 4, 8), torch.randn(1, 30, 2, 8)
    with pytest.raises(ValueError, match="multiple of the group size"):
        s2_attention(q, k, k, group=8, wrap=True)
    with pytest.raises(ValueError, match="group"):
        s2_attention(q, k, k, group=1, wrap=False)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        s2_attention(torch.randn(1, 8, 3, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), group=4)
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        s2_attention(q[0], k[0], k[0], group=5)
