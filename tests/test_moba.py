"""MoBA (``kernels/moba``): the PyTorch path and FlexAttention against the loop oracle.

Shapes: q [B, L, Hq, D], k, v [B, L, Hkv, D]. CPU: float64 outputs and every gradient of the
PyTorch path against ``moba_attention_naive``; FlexAttention's forward (torch 2.13 runs no flex
backward on the CPU) against the same oracle in float32. GPU (marker ``gpu``): FlexAttention's
bf16 forward and backward at real sizes, judged by the error relative to PyTorch's own bf16
computation of the same masked attention (at most 2x forward, 3x backward, both against a
float32 reference).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_within_pytorch_error

from ctxlab.kernels.moba import (
    moba_attention,
    moba_attention_naive,
    moba_attention_torch,
    moba_pair_count,
    moba_select,
)

# id, (B, L, Hq, Hkv, D), block_size, top_k
CASES = [
    ("L63-b4-k2-gqa2", (2, 63, 4, 2, 16), 4, 2),
    ("L97-b5-k3-gqa4-D20", (1, 97, 4, 1, 20), 5, 3),
    ("L64-b16-k1-mha", (1, 64, 2, 2, 16), 16, 1),
    ("L30-b8-k5-fewer-blocks-than-k", (1, 30, 2, 1, 8), 8, 5),
    ("L7-b16-one-partial-block", (1, 7, 2, 1, 8), 16, 2),
]


def _inputs(shape, seed=0, dtype=torch.float64, device="cpu"):
    B, L, Hq, Hkv, D = shape
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(B, L, h, D, generator=g, dtype=dtype, device=device) for h in (Hq, Hkv, Hkv, Hq))


def _grads(fn, q, k, v, do):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("shape, block_size, top_k", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_torch_path_matches_the_oracle_with_gradients(shape, block_size, top_k):
    q, k, v, do = _inputs(shape)
    opts = dict(block_size=block_size, top_k=top_k)
    # a small chunk limit: several query chunks per call
    out, grads = _grads(
        lambda q, k, v: moba_attention_torch(q, k, v, **opts, max_chunk_elems=512), q, k, v, do
    )
    ref, ref_grads = _grads(lambda q, k, v: moba_attention_naive(q, k, v, **opts), q, k, v, do)
    torch.testing.assert_close(out, ref)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g, r, msg=name)


@pytest.mark.parametrize(
    "shape, block_size, top_k", [c[1:] for c in CASES[:3]], ids=[c[0] for c in CASES[:3]]
)
def test_flex_forward_matches_the_oracle_on_the_cpu(shape, block_size, top_k):
    q, k, v, _ = _inputs(shape, seed=1)
    opts = dict(block_size=block_size, top_k=top_k)
    out = moba_attention(q.float(), k.float(), v.float(), **opts, backend="flex")
    torch.testing.assert_close(out.double(), moba_attention_naive(q, k, v, **opts), atol=2e-6, rtol=2e-5)


def test_compiled_flex_never_falls_back_to_the_unfused_path(monkeypatch):
    """Every new length compiles a graph of its own; past Dynamo's recompile limit a call would run
    flex_attention unfused, materializing [B, H, L, L] scores (the benchmark's 512 GiB requests at
    64K). ``run_compiled`` raises the limit for its calls: with the global limit at 1, three
    lengths compile on the CPU and no call takes the unfused path (its warning is an error here)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from ctxlab.kernels.moba import flex
    from ctxlab.kernels.moba.torch_impl import moba_select

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    flex._compiled.cache_clear()
    monkeypatch.setattr(
        flex, "_compiled", functools.cache(lambda: torch.compile(flex_attention, dynamic=False))
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without torch.compile.*")
        for L in (136, 200, 264):
            q, k, v = (torch.randn(1, L, 2, 16, generator=torch.Generator().manual_seed(L)) for _ in range(3))
            mask = flex.moba_block_mask(moba_select(q, k, block_size=32, top_k=2), L, 32)
            o = flex.run_compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
            want = moba_attention_torch(q, k, v, block_size=32, top_k=2)
            torch.testing.assert_close(o.transpose(1, 2), want, atol=2e-5, rtol=2e-5)
    assert torch._dynamo.config.recompile_limit == 1


def test_queries_after_a_cache_get_the_full_forwards_rows():
    q, k, v, _ = _inputs((1, 61, 4, 2, 16), seed=2)
    full = moba_attention_torch(q, k, v, block_size=4, top_k=2)
    for start in (0, 13, 40, 60):
        torch.testing.assert_close(
            moba_attention_torch(q[:, start:], k, v, block_size=4, top_k=2), full[:, start:]
        )


def test_the_gate_picks_the_best_earlier_blocks_and_never_a_later_one():
    q, k, _, _ = _inputs((1, 40, 2, 1, 8), seed=3)
    chosen = moba_select(q, k, block_size=8, top_k=2)  # [B, Hq, L, nb]
    own = torch.arange(40) // 8
    assert torch.equal(chosen.sum(-1)[0, 0], own.clamp(max=2))  # min(top_k, own block)
    assert not (chosen & (torch.arange(5)[None, :] >= own[:, None])).any()


@pytest.mark.parametrize("length, block_size, top_k", [(61, 4, 2), (64, 16, 1), (7, 16, 2), (1000, 64, 3)])
def test_pair_count_counts_the_pattern(length, block_size, top_k):
    q, k, _, _ = _inputs((1, length, 1, 1, 4), seed=4)
    chosen = moba_select(q, k, block_size=block_size, top_k=top_k)[0, 0]  # [L, nb]
    kblock, pos = torch.arange(length) // block_size, torch.arange(length)
    own = (kblock[None, :] == kblock[:, None]) & (pos[None, :] <= pos[:, None])
    assert int((chosen[:, kblock] | own).sum()) == moba_pair_count(length, block_size, top_k)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(scale=-1.0), "scale"),
        (dict(backend="triton"), "backend"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    q, k, v, _ = _inputs((1, 8, 2, 1, 8))
    with pytest.raises(ValueError, match=match):
        moba_attention(q, k, v, **{"block_size": 4, "top_k": 1, **kwargs})


def test_core_settings_are_validated_and_named():
    from ctxlab.attention.moba import MoBAAttention

    with pytest.raises(ValueError, match=r"attention\.top_k"):
        MoBAAttention(top_k=0)
    with pytest.raises(ValueError, match=r"attention\.block_size=512.*data\.seq_len"):
        MoBAAttention(block_size=512, top_k=2).check_training_length(1024)
    MoBAAttention(block_size=16, top_k=2).check_training_length(256)


GPU_CASES = [
    ("L4096-b512-k3-gqa4", (1, 4096, 16, 4, 128), 512, 3),
    ("L8192-b1024-k7-gqa4", (1, 8192, 16, 4, 128), 1024, 7),
    ("L3000-b256-k2-partial", (2, 3000, 8, 8, 64), 256, 2),
]


def _masked_sdpa(q, k, v, chosen, block_size, scale):
    """PyTorch's own computation of the same attention (an explicit mask, SDPA in q's dtype)."""
    L = q.shape[1]
    kb, pos = torch.arange(L, device=q.device) // block_size, torch.arange(L, device=q.device)
    keep = chosen[..., kb] | ((kb[None, :] == kb[:, None]) & (pos[None, :] <= pos[:, None]))
    rep = q.shape[2] // k.shape[2]
    kk, vv = (x.repeat_interleave(rep, 2).transpose(1, 2) for x in (k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kk, vv, attn_mask=keep, scale=scale
    )
    return o.transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, block_size, top_k", [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES]
)
def test_gpu_flex_bf16_error_within_pytorch_error(shape, block_size, top_k):
    q, k, v, do = (x.bfloat16().float() for x in _inputs(shape, seed=5, dtype=torch.float32, device="cuda"))
    scale = shape[-1] ** -0.5
    chosen = moba_select(q, k, block_size=block_size, top_k=top_k)  # bf16-exact inputs: one choice for all

    def torch_bf16(q, k, v):
        return _masked_sdpa(q, k, v, chosen, block_size, scale)

    reference = _grads(torch_bf16, q, k, v, do)  # float32
    bf = [x.bfloat16() for x in (q, k, v, do)]
    theirs = _grads(torch_bf16, *bf)
    flex = dict(block_size=block_size, top_k=top_k, scale=scale, backend="flex")
    mine = _grads(lambda q, k, v: moba_attention(q, k, v, **flex), *bf)
    assert_within_pytorch_error(mine, theirs, reference)
