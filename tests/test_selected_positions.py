"""Selected-only positions (``position=selected``) with every RoPE scaling: the kernels take the
scheme's frequencies, not a base.

Shapes: q [B, L, Hq, D], k, v [B, L, Hkv, D]. Two yardsticks: below the dense prefix
(``L <= T*w``) MS attention with ``pe="selected"`` is dense attention at natural positions, so it
must equal dense attention after the scheme's own PyTorch rotation (``scheme.rotate``, YaRN's
temperature included); beyond it, the loop-based oracle (``ms_attention_naive``) rotating by the
scheme's frequencies at the re-indexed positions.
"""

from __future__ import annotations

import pytest
import torch

from ctxlab.attention import DenseAttention, MSAttention
from ctxlab.kernels.ms_attention.naive import ms_attention_naive
from ctxlab.position import CRDNTK, DynamicNTK, LinearPI, NTKAware, Rope, Selected, YaRN

D = 16
W, T, M = 4, 4, 2  # region, budget, merge: dense prefix of 16 tokens, blocks of 8

SCHEMES = {
    "rope": lambda: Rope(D, 500.0),
    "pi": lambda: LinearPI(D, 500.0, scale=4.0),
    "ntk": lambda: NTKAware(D, 500.0, scale=8.0),
    "dynamic_ntk": lambda: DynamicNTK(D, 500.0, scale=4.0, original_max_position=8),
    "yarn": lambda: YaRN(D, 500.0, scale=8.0, original_max_position=8),
    "crd_ntk": lambda: CRDNTK(D, 500.0, cycle=64, max_offset=64, scale_init=4.0, scale_inf=16.0),
}


def _qkv(L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, L, h, D, generator=g, dtype=torch.float64) for h in (4, 2, 2))


def _ms(scheme, select: str = "causal") -> MSAttention:
    core = MSAttention(region=W, budget=T, merge=M, select=select, backend="torch")
    core.configure_position(Selected(D, 500.0, frequencies=scheme))
    return core


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_dense_prefix_equals_the_schemes_own_rotation(name):
    """L <= T*w: MS attention rotating inside equals dense attention after ``scheme.rotate``."""
    scheme = SCHEMES[name]().eval()
    q, k, v = _qkv(T * W - 3, seed=1)
    ids = scheme.position_ids(1, q.shape[1])
    qr, kr = scheme.rotate(q, k, ids)
    # scheme.rotate rotates in float32 (kernels/rope.py), the kernels' tables are float32 too
    torch.testing.assert_close(_ms(scheme)(q, k, v), DenseAttention()(qr, kr, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("select", ["causal", "paper"])
def test_blocks_match_the_oracle_at_reindexed_positions(name, select):
    scheme = SCHEMES[name]().eval()
    q, k, v = _qkv(37, seed=2)
    inv_freq, mscale = scheme.frequencies_at(T * W)
    want = ms_attention_naive(
        q, k, v, region=W, budget=T, merge=M, select=select, pe="selected", inv_freq=inv_freq,
        scale=D**-0.5 * mscale**2,
    )  # fmt: skip
    torch.testing.assert_close(_ms(scheme, select)(q, k, v), want)


def test_scaled_frequencies_change_the_output():
    """A scaled scheme really reaches the kernel (not the plain base)."""
    q, k, v = _qkv(37, seed=3)
    plain, ntk = _ms(Rope(D, 500.0))(q, k, v), _ms(NTKAware(D, 500.0, scale=8.0))(q, k, v)
    assert (plain - ntk).abs().max() > 1e-3


def test_crd_ntk_training_scale_is_followed():
    """CRD NTK's growing training scale and its evaluation scale reach the core as they change."""
    scheme = SCHEMES["crd_ntk"]()
    core = _ms(scheme)
    q, k, v = _qkv(37, seed=4)
    outs = {}
    for label, mode, scale in (("s4", True, 4.0), ("s8", True, 8.0), ("eval", False, None)):
        scheme.train(mode)
        if scale is not None:
            scheme.set_scale(scale)
        inv_freq, _ = scheme.frequencies_at(T * W)
        want = ms_attention_naive(
            q, k, v, region=W, budget=T, merge=M, select="causal", pe="selected", inv_freq=inv_freq
        )
        outs[label] = core(q, k, v)
        torch.testing.assert_close(outs[label], want)
    assert (outs["s4"] - outs["s8"]).abs().max() > 1e-4 and (outs["s8"] - outs["eval"]).abs().max() > 1e-4


def test_kv_cache_decoding_with_a_scaled_scheme_equals_the_full_forward():
    from ctxlab.attention.cache import LayerCache

    core = _ms(YaRN(D, 500.0, scale=8.0, original_max_position=8).eval())
    q, k, v = _qkv(29, seed=5)
    full = core(q, k, v)
    cache = LayerCache()
    steps = [
        core(q[:, s:e], k[:, s:e], v[:, s:e], cache=cache)
        for s, e in ((0, 20), *((t, t + 1) for t in range(20, 29)))
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_bad_frequencies_are_refused():
    with pytest.raises(ValueError, match="position.frequencies must be one of"):
        Selected(D, 500.0, frequencies=Selected(D, 500.0))
    with pytest.raises(ValueError, match="base=500"):
        Selected(D, 500.0, frequencies=Rope(D, 10000.0))
