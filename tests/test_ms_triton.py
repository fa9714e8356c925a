"""The Triton MS attention kernels against the PyTorch path: outputs and every gradient.

CPU: the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, in a child pytest
process that ``test_interpreted`` starts) on tiny float32 shapes, compared with
``ms_attend_torch`` / ``ms_attention_torch`` in float64. GPU (marker ``gpu``): real sizes in
bf16, judged by the error relative to PyTorch's own bf16 error (at most 2x forward, 3x
backward, both against a float32 reference). Outputs are allocated NaN-filled (POISON) so an
element no program writes fails the comparison.

Shapes: q [B, L, Hq, D], k, v [B, L, Hkv, D]; idx [B, Hs, G, T-m].
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_within_pytorch_error

from ctxlab.kernels.ms_attention import exact, ms_attention, triton_impl
from ctxlab.kernels.ms_attention import triton_kernels as tk
from ctxlab.kernels.ms_attention.torch_impl import (
    ms_attend_torch,
    ms_attention_torch,
    ms_select_torch,
    num_blocks,
)
from ctxlab.kernels.rope import rope_cos_sin, rope_inv_freq, rotate_half

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton reads TRITON_INTERPRET once, when it is first imported (its own library functions
are defined then), so the interpreted tests run in a child pytest process of their own."""

on_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process (test_interpreted)"
)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(triton_impl, "POISON", True)


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreted():
    """Run this file's CPU tests under Triton's interpreter, in a child process, so the
    setting never reaches other test modules."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not gpu",
    ]
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout


def _inputs(B, L, Hq, Hkv, D, *, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=gen)
    k = torch.randn(B, L, Hkv, D, generator=gen)
    v = torch.randn(B, L, Hkv, D, generator=gen)
    do = torch.randn(B, L, Hq, D, generator=gen)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]


def _select_inputs(shape, values, seed):
    """q, k float32 for a selection case: integers drawn from ``values`` ([low, high): exact
    scores full of ties), "same" (every query region alike, random keys), or random floats (None)."""
    B, L, Hq, Hkv, D = shape
    gen = torch.Generator().manual_seed(seed)
    if values == "same":  # every region of q alike: all rows rank the keys the same way
        q = torch.randn(B, 1, Hq, D, generator=gen).expand(B, L, Hq, D).contiguous()
        return q, torch.randn(B, L, Hkv, D, generator=gen)
    if values is not None:
        q = torch.randint(*values, (B, L, Hq, D), generator=gen).float()
        return q, torch.randint(*values, (B, L, Hkv, D), generator=gen).float()
    q, k, _, _ = _inputs(B, L, Hq, Hkv, D, seed=seed)
    return q, k


def _grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn(q, k, v) for the upstream gradient do."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _assert_close(name, actual, expected, tol):
    assert not actual.isnan().any(), f"{name}: NaN (an unwritten or poisoned element)"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{name}: max error {err:.3g} (scale {scale:.3g})"


def _assert_matches_torch(q, k, v, do, idx, *, scope, start, opts, q_in=None, scale=0.2):
    """The Triton path from row ``start`` (``q_in``: q as the kernels get it, e.g. poisoned
    before ``start``) against ms_attend_torch in float64: o, dq, dk, dv within 1e-5 relative to
    their largest element. Returns the Triton path's output and gradients."""
    out, grads = _grads(
        lambda q, k, v: triton_impl.ms_attend_triton(q, k, v, idx, scale=scale, start=start, **opts),
        q if q_in is None else q_in, k, v, do[:, start:],
    )  # fmt: skip
    ref, ref_grads = _grads(
        lambda q, k, v: ms_attend_torch(q, k, v, idx, scope=scope, scale=scale, start=start, **opts),
        *(x.double() for x in (q, k, v, do[:, start:])),
    )
    _assert_close("o", out, ref, 1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, 1e-5)
    return out, grads


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch.use_deterministic_algorithms(on) for the block: it picks the dk/dv path."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def launch(**overrides):
    """The kernels' launch configs (GPU and interpreter) with ``overrides`` for the block; the
    interpreter's without ``fwd_gluon``, ``dq_gluon``, ``dkv_gluon`` and the ``gluon_*`` settings
    (Gluon has no interpreter, and its tiles are not 16 rows)."""
    saved = triton_impl.GPU_CONFIG, triton_impl.INTERPRETER_CONFIG
    triton_impl.GPU_CONFIG = dataclasses.replace(saved[0], **overrides)
    gluon = ("fwd_gluon", "dq_gluon", "dkv_gluon")
    interpreter = {
        name: value
        for name, value in overrides.items()
        if name not in gluon and not name.startswith("gluon_")
    }
    triton_impl.INTERPRETER_CONFIG = dataclasses.replace(saved[1], **interpreter)
    try:
        yield
    finally:
        triton_impl.GPU_CONFIG, triton_impl.INTERPRETER_CONFIG = saved


@contextlib.contextmanager
def dkv_mode(mode: str):
    """How the selected keys' dk/dv are summed: a ``dkv_path`` forced by the launch config
    ("atomic", "partial", "reverse"), "partial-windows" (partial sums one block at a time),
    "flag" (torch.use_deterministic_algorithms(True), the default path choice) or "config"
    (LaunchConfig.deterministic, the default path choice); a suffix "+fused" also adds dq inside
    the dk/dv kernels (``fused_dq``), "+whole" takes whole rows there (``whole_dkv``), "+tma" loads
    the own-segment kernel's rows by TMA descriptors (``dkv_tma``), "+ws" warp-specializes its
    query loop (``dkv_ws``), "+region" compiles the region size into forward and dq
    (``region_constexpr``), "+gluon", "+gluondq", "+gluondkv" take the Gluon forward, dq, dk/dv of
    the selected keys (``fwd_gluon``, ``dq_gluon``, ``dkv_gluon``), "+persistent" the latter as
    persistent programs (``gluon_dkv_persistent``); "+ownatomics" leaves a fused dq's own segment
    to the own-segment dk/dv kernel's atomics (``fused_dq_finish`` off)."""
    mode, *extras = mode.split("+")
    settings = {
        # fused dq at every block size (the GPU default starts at 1024 rows)
        "fused": dict(fused_dq=True, fused_dq_min_block=0),
        "ownatomics": dict(fused_dq_finish=False),
        "whole": dict(whole_dkv=True),
        "tma": dict(dkv_tma=True),
        "ws": dict(dkv_ws=True),
        "region": dict(region_constexpr=True),
        "gluon": dict(fwd_gluon=True),
        "gluondq": dict(dq_gluon=True),
        "gluondkv": dict(dkv_gluon=True),
        "persistent": dict(gluon_dkv_persistent=True),
    }
    if extras:
        with launch(**{k: v for x in extras for k, v in settings[x].items()}), dkv_mode(mode):
            yield
    elif mode == "flag":
        with deterministic_algorithms(True):
            yield
    elif mode == "config":
        with launch(deterministic=True):
            yield
    elif mode == "partial-windows":
        with launch(dkv_path="partial", dkv_partial_gib=1e-12):
            yield
    else:
        with launch(dkv_path=mode):
            yield


# Each case: (id, shape B L Hq Hkv D, region w, budget T, merge m, scope, pe, dk/dv mode
# (``dkv_mode``), seed). Lengths are odd and leave a partial last region and block; w=20 spans
# two 16-key tiles of the dk/dv kernel, w=3 puts several regions into one; the dense case has
# n <= T.
ATTEND_CASES = [
    ("gqa1-w4-L51-pre-head-atomic", (1, 51, 2, 2, 32), 4, 5, 2, "head", "pre", "atomic", 0),
    ("gqa3-w4-L37-pre-group-B2-flag", (2, 37, 3, 1, 32), 4, 4, 1, "group", "pre", "flag", 1),
    ("gqa4-w4-L47-rope-head-reverse", (1, 47, 4, 1, 32), 4, 4, 2, "head", "selected", "reverse", 2),
    (
        "gqa2-w3-L50-rope-group-D20-windows",
        (1, 50, 4, 2, 20),
        3,
        5,
        3,
        "group",
        "selected",
        "partial-windows",
        3,
    ),
    ("gqa1-w20-L97-rope-head-reverse", (1, 97, 1, 1, 32), 20, 3, 1, "head", "selected", "reverse", 4),
    ("gqa3-w5-L71-rope-head-partial", (1, 71, 3, 1, 32), 5, 4, 1, "head", "selected", "partial", 5),
    ("gqa2-w20-L97-pre-head-B2-config", (2, 97, 4, 2, 32), 20, 3, 1, "head", "pre", "config", 6),
    ("dense-n-le-T-L29", (1, 29, 2, 1, 32), 4, 8, 2, "head", "selected", "atomic", 7),
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, pe, dkv, seed",
    [c[1:] for c in ATTEND_CASES],
    ids=[c[0] for c in ATTEND_CASES],
)
@on_interpreter
def test_attend_matches_torch(shape, region, budget, merge, scope, pe, dkv, seed):
    """Given one selection, outputs and dq, dk, dv match ms_attend_torch (float64)."""
    q, k, v, do = _inputs(*shape, seed=seed)
    opts = dict(
        region=region, budget=budget, merge=merge, pe=pe, inv_freq=rope_inv_freq(shape[-1], 100.0).double()
    )
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)
    scale = 1.0 / math.sqrt(shape[-1])

    with dkv_mode(dkv):
        out, grads = _grads(
            lambda q, k, v: triton_impl.ms_attend_triton(q, k, v, idx, scale=scale, **opts),
            q, k, v, do,
        )  # fmt: skip
    ref, ref_grads = _grads(
        lambda q, k, v: ms_attend_torch(q, k, v, idx, scope=scope, **opts),
        *(x.double() for x in (q, k, v, do)),
    )
    _assert_close("o", out, ref, 1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, 1e-5)


# Each case: (id, shape, w, T, m, scope, pe, first row ``start``, dk/dv mode (``dkv_mode``),
# seed) for the whole-row scores (``LaunchConfig.whole_qk`` and ``whole_dkv``): a head dim below
# its tile (D=20: 32 columns, 12 masked), a partial last block, ``start`` inside a block, every
# dk/dv path and dq fused into dk/dv; under RoPE on the fly the settings are ignored.
WHOLE_CASES = [
    ("gqa2-w4-L51-head-D20-partial", (1, 51, 4, 2, 20), 4, 5, 2, "head", "pre", 0, "partial", 0),
    ("gqa3-w20-L97-group-B2-atomic-fused", (2, 97, 3, 1, 32), 20, 3, 1, "group", "pre", 0, "atomic+fused", 1),
    ("gqa2-w5-L71-head-start39-windows", (1, 71, 2, 1, 32), 5, 4, 1, "head", "pre", 39, "partial-windows", 2),
    ("gqa1-w16-L71-head-reverse-fused", (1, 71, 2, 2, 32), 16, 3, 1, "head", "pre", 0, "reverse+fused", 4),
    ("gqa1-w16-L97-head-start50-reverse", (1, 97, 2, 2, 32), 16, 3, 1, "head", "pre", 50, "reverse", 5),
    ("gqa4-w4-L47-rope-ignored", (1, 47, 4, 1, 32), 4, 4, 2, "head", "selected", 0, "atomic", 3),
]  # fmt: skip


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, pe, start, dkv, seed",
    [c[1:] for c in WHOLE_CASES],
    ids=[c[0] for c in WHOLE_CASES],
)
@on_interpreter
def test_whole_row_scores_match_torch(shape, region, budget, merge, scope, pe, start, dkv, seed):
    """With ``whole_qk`` and ``whole_dkv`` (one dot over the head dim in every kernel), outputs and
    dq, dk, dv match ms_attend_torch (float64); under RoPE on the fly the halves run, bit for bit
    as without them."""
    q, k, v, do = _inputs(*shape, seed=seed)
    opts = dict(region=region, budget=budget, merge=merge, pe=pe, start=start,
                inv_freq=rope_inv_freq(shape[-1], 100.0).double())  # fmt: skip
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)

    def attend(q, k, v):
        return triton_impl.ms_attend_triton(q, k, v, idx, scale=shape[-1] ** -0.5, **opts)

    do = do[:, start:]
    with dkv_mode(dkv):
        with launch(whole_qk=True, whole_dkv=True):
            out, grads = _grads(attend, q, k, v, do)
        if pe == "selected":
            halves, halves_grads = _grads(attend, q, k, v, do)
            assert torch.equal(out, halves) and all(map(torch.equal, grads, halves_grads))
            return
    ref, ref_grads = _grads(
        lambda q, k, v: ms_attend_torch(q, k, v, idx, scope=scope, scale=shape[-1] ** -0.5, **opts),
        *(x.double() for x in (q, k, v, do)),
    )
    _assert_close("o", out, ref, 1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, 1e-5)


# Each case: (id, shape, w, T, m, scope, pe, dk/dv mode, first row ``start``, seed). Interpreter
# tiles are 16 rows; the ids say where ``start`` falls: in the dense prefix, at its end, at a block
# boundary, inside a block and a region (w=20: inside a block's first of two tiles), the last row.
START_CASES = [
    ("prefix-mid-tile-L51-pre-head-atomic", (1, 51, 2, 2, 32), 4, 5, 2, "head", "pre", "atomic", 7, 0),
    ("prefix-end-L37-pre-group-B2-flag", (2, 37, 3, 1, 32), 4, 4, 1, "group", "pre", "flag", 16, 1),
    ("block-boundary-L51-rope-group-reverse", (1, 51, 4, 2, 32), 4, 5, 2, "group", "selected", "reverse",
     28, 2),
    ("in-region-L51-rope-head-partial", (1, 51, 2, 1, 32), 4, 5, 2, "head", "selected", "partial", 39, 3),
    ("in-region-w20-L97-pre-head-reverse", (1, 97, 2, 1, 32), 20, 3, 1, "head", "pre", "reverse", 67, 4),
    ("in-region-w3-L50-rope-group-windows", (1, 50, 4, 2, 20), 3, 5, 3, "group", "selected",
     "partial-windows", 31, 5),
    ("in-region-w5-L71-rope-head-atomic", (1, 71, 3, 1, 32), 5, 4, 1, "head", "selected", "atomic", 43, 6),
    ("last-row-L47-pre-head-partial", (1, 47, 4, 1, 32), 4, 4, 2, "head", "pre", "partial", 46, 7),
    # the own-segment kernel on TMA descriptors from row start (rows before it read 0, not NaN)
    ("in-region-w5-L71-pre-head-atomic-tma-ws", (1, 71, 4, 2, 32), 5, 4, 1, "head", "pre",
     "atomic+whole+tma+ws", 43, 8),
    ("in-region-w16-L97-pre-head-reverse-tma", (1, 97, 2, 2, 32), 16, 3, 1, "head", "pre",
     "reverse+whole+tma", 50, 9),
]  # fmt: skip


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, pe, dkv, start, seed",
    [c[1:] for c in START_CASES],
    ids=[c[0] for c in START_CASES],
)
@on_interpreter
def test_attend_from_start_matches_torch(shape, region, budget, merge, scope, pe, dkv, start, seed):
    """From a first row ``start``: outputs of rows >= start and dq, dk, dv of those rows alone match
    ms_attend_torch's ``start`` (float64). q's rows before ``start`` and the blocks of idx wholly
    before it are poison (NaN, out-of-range regions): the kernels must never read them."""
    q, k, v, do = _inputs(*shape, seed=seed)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)
    first_block = max(0, (start // region - budget) // merge)
    idx[:, :, :first_block] = 10**6
    opts = dict(
        region=region, budget=budget, merge=merge, pe=pe, inv_freq=rope_inv_freq(shape[-1], 100.0).double()
    )
    q_poisoned = q.clone()
    q_poisoned[:, :start] = float("nan")
    with dkv_mode(dkv):
        out, _ = _assert_matches_torch(q, k, v, do, idx, scope=scope, start=start, opts=opts, q_in=q_poisoned)
    assert out.shape == (shape[0], shape[1] - start, shape[2], shape[4])


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, pe, start, seed",
    [((1, 71, 3, 1, 32), 5, 4, 1, "head", "pre", 43, 0),
     ((2, 97, 2, 2, 32), 20, 3, 1, "group", "selected", 0, 1),
     ((1, 51, 4, 2, 20), 4, 5, 2, "head", "selected", 28, 2)],
    ids=["w5-L71-start43", "w20-L97-B2-rope", "w4-L51-D20-rope-start28"],
)  # fmt: skip
@on_interpreter
def test_region_constexpr_same_bits(shape, region, budget, merge, scope, pe, start, seed):
    """With the region size compiled into forward and dq (``region_constexpr``) every key's token
    is the same integer, so o, dq, dk, dv are the runtime region's bit for bit (w of 4, 5 and 20,
    RoPE on the fly and not, from a ``start``)."""
    q, k, v, do = _inputs(*shape, seed=seed)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)
    opts = dict(region=region, budget=budget, merge=merge, pe=pe, start=start,
                inv_freq=rope_inv_freq(shape[-1], 100.0).double())  # fmt: skip

    def attend(q, k, v):
        return triton_impl.ms_attend_triton(q, k, v, idx, scale=0.2, **opts)

    runtime, runtime_grads = _grads(attend, q, k, v, do[:, start:])
    with launch(region_constexpr=True):
        const, const_grads = _grads(attend, q, k, v, do[:, start:])
    assert torch.equal(runtime, const)
    assert all(map(torch.equal, runtime_grads, const_grads))


# Each case: (id, shape, w, T, m, scope, dk/dv mode, first row ``start``, seed) for dq summed
# inside the dk/dv kernels (``LaunchConfig.fused_dq``), pe="pre": both kernels that take it (the
# atomic path's selected-key programs, the reverse index's key tiles), GQA groups of 1-4, the
# dense prefix alone (n <= T), ``start`` inside a block, a head dim below its tile.
FUSED_DQ_CASES = [
    ("gqa1-w4-L51-head-atomic", (1, 51, 2, 2, 32), 4, 5, 2, "head", "atomic", 0, 0),
    ("gqa3-w4-L37-group-B2-atomic", (2, 37, 3, 1, 32), 4, 4, 1, "group", "atomic", 0, 1),
    ("gqa4-w20-L97-head-reverse", (1, 97, 4, 1, 32), 20, 3, 1, "head", "reverse", 0, 2),
    ("gqa2-w5-L71-head-start39-atomic", (1, 71, 2, 1, 32), 5, 4, 1, "head", "atomic", 39, 3),
    ("gqa2-w3-L50-group-D20-start31-reverse", (1, 50, 4, 2, 20), 3, 5, 3, "group", "reverse", 31, 4),
    ("dense-n-le-T-L29-atomic", (1, 29, 2, 1, 32), 4, 8, 2, "head", "atomic", 0, 5),
    # with dkv_tma: a key tile ending inside it (the prefix, w=5) reads the next segment's real
    # keys past its end, which meet only masked steps (no dq from them)
    ("gqa2-w5-L71-head-atomic-tma", (1, 71, 2, 1, 32), 5, 4, 1, "head", "atomic+whole+tma", 0, 6),
    # the own segment's dq by the own-segment kernel's atomics, not finished by the dq kernel
    ("gqa1-w4-L51-head-atomic-ownatomics", (1, 51, 2, 2, 32), 4, 5, 2, "head", "atomic+ownatomics", 0, 0),
    ("gqa2-w5-L71-head-start39-ownatomics", (1, 71, 2, 1, 32), 5, 4, 1, "head", "atomic+ownatomics", 39, 3),
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, dkv, start, seed",
    [c[1:] for c in FUSED_DQ_CASES],
    ids=[c[0] for c in FUSED_DQ_CASES],
)
@on_interpreter
def test_fused_dq_matches_torch(shape, region, budget, merge, scope, dkv, start, seed, monkeypatch):
    """With ``fused_dq`` (dq added by atomics inside the dk/dv kernels), outputs and dq, dk, dv
    from ``start`` match ms_attend_torch (float64); q's rows before ``start`` are poison and dq
    there is 0. The dq kernel never sums the selected keys: on the atomic path it runs over the own
    segment only and adds the buffer (``fused_dq_finish``), elsewhere (the reverse path,
    "+ownatomics") not at all."""
    finished = []
    dq_kernel = triton_impl.bwd_dq

    def own_segment_dq_only(*args, dq32=None, **kwargs):
        if dq32 is None:
            raise AssertionError("the dq kernel summed the selected keys with fused_dq")
        finished.append(True)
        return dq_kernel(*args, dq32=dq32, **kwargs)

    monkeypatch.setattr(triton_impl, "bwd_dq", own_segment_dq_only)
    q, k, v, do = _inputs(*shape, seed=seed)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)
    opts = dict(region=region, budget=budget, merge=merge, pe="pre", inv_freq=None)
    q_poisoned = q.clone()
    q_poisoned[:, :start] = float("nan")
    with dkv_mode(dkv), launch(fused_dq=True):
        _, grads = _assert_matches_torch(
            q, k, v, do, idx, scope=scope, start=start, opts=opts, q_in=q_poisoned
        )
    assert not grads[0][:, :start].any()
    assert bool(finished) == (dkv.startswith("atomic") and "ownatomics" not in dkv), finished


@on_interpreter
def test_fused_dq_gives_way_to_the_dq_kernel_when_its_buffer_does_not_fit(monkeypatch):
    """The fused backward's float32 dq buffer is twice q's bf16 bytes: where the device runs out of
    memory on that path, ``ms_attn_bwd`` runs the dq kernel over every key instead (which needs no
    such buffer), with the same gradients, rather than failing a length the default fit before."""
    real_fused, real_dq = triton_impl._bwd_fused, triton_impl.bwd_dq
    attempts, dq_runs = [], []

    def out_of_memory(*args, **kwargs):
        real_fused(*args, **kwargs)  # the fused path runs, then its last allocation fails
        attempts.append(True)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def dq_kernel(*args, dq32=None, **kwargs):
        dq_runs.append(dq32 is None)
        return real_dq(*args, dq32=dq32, **kwargs)

    monkeypatch.setattr(triton_impl, "_bwd_fused", out_of_memory)
    monkeypatch.setattr(triton_impl, "bwd_dq", dq_kernel)
    shape, region, budget, merge = (1, 51, 2, 2, 32), 4, 5, 2
    q, k, v, do = _inputs(*shape, seed=0)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope="head")
    opts = dict(region=region, budget=budget, merge=merge, pe="pre", inv_freq=None)
    with dkv_mode("atomic"), launch(fused_dq=True):
        _assert_matches_torch(q, k, v, do, idx, scope="head", start=0, opts=opts, q_in=q)
    # the fused attempt ran its dq kernel over the own segment (dq32) and failed; then the dq kernel
    # ran over every key
    assert attempts == [True] and dq_runs == [False, True], (attempts, dq_runs)


@pytest.mark.parametrize("mode", ["flag", "config", "rope"])
def test_fused_dq_gives_way(mode):
    """``fused_dq`` is set aside in deterministic mode (Torch's flag or the config's) and under
    RoPE on the fly: the dq kernel runs then."""
    cfg = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, fused_dq=True, deterministic=mode == "config")
    with deterministic_algorithms(mode == "flag"):
        assert not triton_impl.fused_dq_applies(cfg, rope=mode == "rope")
        assert triton_impl.fused_dq_applies(cfg, rope=mode == "rope", deterministic=False) == (mode != "rope")
    assert not triton_impl.fused_dq_applies(dataclasses.replace(cfg, fused_dq=False), rope=False)


def test_fused_dq_applies_from_its_block_size():
    """``fused_dq_min_block``: dq goes inside dk/dv only where a block has that many query rows
    (m·w); the GPU default takes it from the paper's blocks (16 x 64 = 1024 rows) up, not at
    (64, 64, 8) (512 rows), where the measured backward was slower."""
    gpu = triton_impl.GPU_CONFIG
    assert gpu.fused_dq and gpu.fused_dq_min_block == 1024
    assert triton_impl.fused_dq_applies(gpu, rope=False, deterministic=False, block_rows=16 * 64)
    assert not triton_impl.fused_dq_applies(gpu, rope=False, deterministic=False, block_rows=64 * 8)
    assert triton_impl.fused_dq_applies(gpu, rope=False, deterministic=False)  # no block given
    assert not triton_impl.fused_dq_applies(gpu, rope=False, deterministic=True, block_rows=1024)
    assert triton_impl.dq_finish_applies(gpu, "atomic") and not triton_impl.dq_finish_applies(gpu, "reverse")


def test_fused_dq_buffer_is_checked():
    """``bwd_dkv`` refuses a dq buffer it cannot fill (the partial path, RoPE on the fly, a wrong
    shape or dtype, not contiguous: the kernels and the Gluon kernel's TMA descriptor take it as
    laid out like q) before any launch, naming what is wrong."""
    q, k, v, do = _inputs(1, 29, 2, 1, 32)
    idx = torch.zeros(1, 2, 0, 6, dtype=torch.int32)
    lse = delta = torch.zeros(1, 2, 29)
    opts = dict(region=4, budget=8, merge=2, inv_freq=None, scale=0.2, config=triton_impl.INTERPRETER_CONFIG)
    for path, rope, buf, culprit in [
        ("partial", False, torch.zeros(q.shape), "'partial'"),
        ("atomic", True, torch.zeros(q.shape), "rope=True"),
        ("atomic", False, torch.zeros(1, 28, 2, 32), "(1, 28, 2, 32)"),
        ("reverse", False, torch.zeros(q.shape, dtype=torch.float64), "torch.float64"),
        ("atomic", False, torch.zeros(1, 29, 32, 2).transpose(2, 3), "contiguous=False"),
    ]:
        with pytest.raises(ValueError, match=re.escape(culprit)):
            triton_impl.bwd_dkv(do, q, k, v, lse, delta, idx, rope=rope, path=path, dq32=buf, **opts)
    # The own segment's dq left out of dk/dv needs a buffer the dq kernel finishes (atomic path).
    for path, buf, culprit in [
        ("atomic", None, "dq32=False"),
        ("reverse", torch.zeros(q.shape), "'reverse'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(culprit)):
            triton_impl.bwd_dkv(
                do, q, k, v, lse, delta, idx, rope=False, path=path, dq32=buf, own_dq=False, **opts
            )
    # ... and that buffer, as the dq kernel reads it, laid out like q in float32.
    for buf, culprit in [
        (torch.zeros(1, 28, 2, 32), "(1, 28, 2, 32)"),
        (torch.zeros(q.shape, dtype=torch.bfloat16), "torch.bfloat16"),
        (torch.zeros(1, 29, 32, 2).transpose(2, 3), "contiguous=False"),
    ]:
        with pytest.raises(ValueError, match=re.escape(culprit)):
            triton_impl.bwd_dq(do, q, k, v, lse, delta, idx, rope=False, dq32=buf, **opts)


@pytest.mark.parametrize("L", [51, 17], ids=["blocks", "dense-n-le-T"])
@on_interpreter
def test_rotate_q_kernel_places_rows_at_their_positions(L):
    """``ms_rotate_q_kernel`` (``rotate_q_once``) rotates each row of q at its own position: the
    prefix's rows at their index, a block's rows at S*w + their place in the block (w=4, T=5,
    m=2: P = 20, blocks of 8 tokens, S*w = 12), as ``apply_rotary`` does in float32."""
    from ctxlab.kernels.rope import apply_rotary

    q = _inputs(2, L, 3, 1, 16, seed=5)[0]
    inv_freq = rope_inv_freq(16, 100.0).double()
    geo = triton_impl.Geometry.of(L, 4, 5, 2, 16)
    cos, sin = triton_impl._tables(True, geo, 16, inv_freq, q.device)
    cfg = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, rotate_q_once=True)
    got, flagged = triton_impl._kernel_q(q, True, geo, cos, sin, cfg)
    t = torch.arange(L)
    pos = torch.where(t < geo.P, t, 12 + (t - geo.P) % 8)
    c, s_ = rope_cos_sin(pos, inv_freq)
    assert flagged and torch.allclose(got, apply_rotary(q, c, s_), atol=1e-6, rtol=1e-6)
    assert triton_impl._kernel_q(q, False, geo, cos, sin, cfg) == (q, False)  # no RoPE: q as is


ROTATED_Q_CASES = [c for c in START_CASES if c[6] == "selected"] + [
    ("dense-n-le-T-L29-atomic", (1, 29, 2, 1, 32), 4, 8, 2, "head", "selected", "atomic", 0, 7),
    ("from-0-L47-head-reverse", (1, 47, 4, 1, 32), 4, 4, 2, "head", "selected", "reverse", 0, 2),
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, pe, dkv, start, seed",
    [c[1:] for c in ROTATED_Q_CASES],
    ids=[c[0] for c in ROTATED_Q_CASES],
)
@on_interpreter
def test_q_rotated_once_matches_torch(shape, region, budget, merge, scope, pe, dkv, start, seed):
    """With ``rotate_q_once`` (RoPE on the fly: q rotated once into a copy the dk/dv kernels read
    as is), outputs from ``start`` and dq, dk, dv match ms_attend_torch (float64) on every dk/dv
    path, the dense case (n <= T) included."""
    q, k, v, do = _inputs(*shape, seed=seed)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)
    opts = dict(
        region=region, budget=budget, merge=merge, pe=pe, inv_freq=rope_inv_freq(shape[-1], 100.0).double()
    )
    with dkv_mode(dkv), launch(rotate_q_once=True):
        _assert_matches_torch(q, k, v, do, idx, scope=scope, start=start, opts=opts)


@pytest.mark.parametrize(
    "L, n, region, budget, merge, pe",
    [(40, 2, 3, 3, 2, "pre"), (56, 4, 5, 3, 2, "selected")],
    ids=["n2-w3", "n4-w5-selected"],
)
@on_interpreter
def test_attend_rows_match_the_whole_sequence(L, n, region, budget, merge, pe):
    """Context parallelism's MS rows on the Triton path (``ms_attend_rows``'s CUDA branch: one call
    per run, from the run's first row) equal the whole sequence's rows, outputs and gradients,
    with chunk boundaries that cut regions and blocks."""
    from ctxlab import context_parallel as cpl
    from ctxlab.attention.selection import ms_attend, ms_attend_rows

    q, k, v, do = _inputs(1, L, 4, 2, 32, seed=L)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, select="paper")
    opts = dict(region=region, budget=budget, merge=merge, scope="head", pe=pe, inv_freq=None, scale=None)
    want, want_grads = _grads(lambda q, k, v: ms_attend(q, k, v, idx, **opts, backend="triton"), q, k, v, do)

    def rows(q, k, v):
        opts_rows = dict(opts, backend="triton")
        parts = [
            ms_attend_rows(cpl.shard(q, n, r), q, k, v, idx, spans=cpl.own_spans(L, n, r), **opts_rows)
            for r in range(n)
        ]
        return cpl.unshard(parts)

    got, got_grads = _grads(rows, q, k, v, do)
    _assert_close("o", got, want, 1e-6)
    for name, g, r in zip(("dq", "dk", "dv"), got_grads, want_grads):
        _assert_close(name, g, r, 1e-6)


@pytest.mark.parametrize("dkv", ["atomic", "partial-windows", "reverse"])
@on_interpreter
def test_padding_entries_are_ignored(dkv):
    """-1 entries (a hand-made, partly filled selection) drop keys, and under pe="selected"
    the valid regions keep the positions 0.. in ascending order, as in ms_attend_torch."""
    region, budget, merge = 4, 6, 2
    q, k, v, do = _inputs(1, 57, 2, 1, 32, seed=6)
    G = num_blocks(57, region, budget, merge)
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack(
        [torch.randperm(budget + g * merge, generator=gen)[: budget - merge] for g in range(G)]
    )[None, None].repeat(1, 2, 1, 1)  # [1, Hs=2, G, 4]
    idx[0, 0, :, 1] = -1
    idx[0, 1, 1:, :3] = -1
    opts = dict(
        region=region, budget=budget, merge=merge, pe="selected", inv_freq=rope_inv_freq(32, 50.0).double()
    )
    with dkv_mode(dkv):
        out, grads = _grads(
            lambda q, k, v: triton_impl.ms_attend_triton(q, k, v, idx, scale=0.2, **opts),
            q, k, v, do,
        )  # fmt: skip
    ref, ref_grads = _grads(
        lambda q, k, v: ms_attend_torch(q, k, v, idx, scope="head", scale=0.2, **opts),
        *(x.double() for x in (q, k, v, do)),
    )
    _assert_close("o", out, ref, 1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, 1e-5)


# End to end through the public API: selection (both modes, both pools) and attention.
API_CASES = [
    ("paper-mean-head-pre-gqa3", (1, 45, 3, 1, 32), "paper", "mean", "head", "pre"),
    ("causal-attn-group-rope-gqa2", (1, 43, 4, 2, 32), "causal", "attn", "group", "selected"),
]


@pytest.mark.parametrize(
    "shape, select, pool, scope, pe", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
@on_interpreter
def test_public_api_matches_torch_backend(shape, select, pool, scope, pe):
    q, k, v, do = _inputs(*shape, seed=7)
    opts = dict(region=4, budget=4, merge=2, pool=pool, scope=scope, select=select, pe=pe)
    out, grads = _grads(lambda q, k, v: ms_attention(q, k, v, backend="triton", **opts), q, k, v, do)
    ref, ref_grads = _grads(
        lambda q, k, v: ms_attention_torch(q, k, v, **opts), *(x.double() for x in (q, k, v, do))
    )
    _assert_close("o", out, ref, 1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, 1e-5)


# The fused selection against ms_select_torch, index for index (merge order included). Each case:
# (id, shape B L Hq Hkv D, region w, budget T, merge m, pool, scope, select, integer inputs drawn
# from [low, high) or None for float ones, candidate capacity (0: auto), seed). Integer inputs
# make exact score ties everywhere (and exact float32 arithmetic, so both sides compute identical
# scores); a capacity below the candidate count forces the bisection. In the "tie-branch" cases
# (values in {0, 1}, D <= 4) many rows have a tie group straddling the capacity window
# (count(>= v) > capacity while count(> v) < T-m: 36 and 52 such rows), which only the region
# order may cut. Every other case has a partial last region.
SELECT_CASES = [
    ("paper-mean-head-gqa1-L61", (1, 61, 2, 2, 16), 4, 5, 2, "mean", "head", "paper", None, 0, 0),
    ("causal-mean-head-gqa4-L61", (1, 61, 4, 1, 16), 4, 5, 2, "mean", "head", "causal", None, 0, 1),
    ("paper-mean-group-gqa3-ties-L97", (1, 97, 3, 1, 8), 4, 6, 2, "mean", "group", "paper", (-1, 2), 16, 2),
    ("causal-group-gqa2-ties-B2-L73", (2, 73, 4, 2, 8), 2, 20, 3, "mean", "group", "causal", (-1, 2), 32, 3),
    ("paper-mean-head-bisect-L101", (1, 101, 1, 1, 16), 2, 16, 3, "mean", "head", "paper", None, 16, 4),
    ("causal-attn-head-gqa4-L71", (1, 71, 4, 1, 16), 4, 6, 2, "attn", "head", "causal", None, 16, 5),
    ("paper-attn-group-gqa3-w5-L83", (1, 83, 3, 1, 20), 5, 5, 1, "attn", "group", "paper", None, 0, 6),
    ("paper-tie-branch-L61", (1, 61, 2, 1, 4), 1, 6, 2, "mean", "head", "paper", (0, 2), 16, 0),
    ("causal-tie-branch-L45", (1, 45, 2, 1, 2), 1, 8, 3, "mean", "head", "causal", (0, 2), 16, 1),
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select, values, capacity, seed",
    [c[1:] for c in SELECT_CASES],
    ids=[c[0] for c in SELECT_CASES],
)
@on_interpreter
def test_select_matches_torch(shape, region, budget, merge, pool, scope, select, values, capacity, seed):
    q, k = _select_inputs(shape, values, seed)
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    config = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, select_capacity=capacity)
    got = triton_impl.ms_select_triton(q, k, config=config, **opts)
    want = ms_select_torch(q, k, **opts)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.long(), want), (got - want).abs().amax(-1)


@on_interpreter
def test_full_select_in_kv_order_matches_torch():
    """The full-depth kernel over every item, taken one (b, kv head) at a time
    (``select_order="kv"``): ms_select_torch's indices, ties included (B=2, 3 heads per kv head)."""
    q, k = _select_inputs((2, 61, 6, 2, 8), (-1, 2), 3)
    opts = dict(region=4, budget=5, merge=2, pool="mean", scope="head", select="causal")
    config = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, select_order="kv")
    got = triton_impl.ms_select_triton(q, k, config=config, **opts)
    assert torch.equal(got.long(), ms_select_torch(q, k, **opts))


# The shallow selection (``ms_select_shallow``): (id, shape, w, T, m, pool, scope, select, integer
# inputs or None, launch overrides, how its blocks must be decided). "shallow": every block by the
# two-pass top-K path alone (no item redone), so that path is what the comparison checks;
# "redo": some blocks must go to the full-depth kernel, by the reason the id names. "overflow":
# a row has more than shallow_cap candidates at or above its bound (here ties at the bound,
# n > cap); "deep": identical query regions vote identically, so K ranks hold K < T-m regions.
SHALLOW_CASES = [
    ("random-paper-head-L400", (1, 400, 2, 1, 16), 2, 40, 8, "mean", "head", "paper", None, {}, "shallow"),
    (
        "random-causal-attn-group-L403",
        (1, 403, 4, 2, 16),
        2,
        40,
        8,
        "attn",
        "group",
        "causal",
        None,
        {},
        "shallow",
    ),
    ("ties-paper-group-L97", (1, 97, 3, 1, 8), 4, 6, 2, "mean", "group", "paper", (-1, 2), {}, "shallow"),
    ("ties-causal-B2-L73", (2, 73, 4, 2, 8), 2, 20, 3, "mean", "group", "causal", (-1, 2), {}, "shallow"),
    ("tie-branch-paper-L61", (1, 61, 2, 1, 4), 1, 6, 2, "mean", "head", "paper", (0, 2), {}, "shallow"),
    ("overflow-ties-L200", (1, 200, 2, 1, 2), 1, 40, 8, "mean", "head", "paper", (0, 2), {}, "redo"),
    # items taken one (b, kv head) at a time (``select_order="kv"``): B=2, 2 kv heads of 3 heads
    (
        "kv-order-ties-head-B2-L97",
        (2, 97, 6, 2, 8),
        4,
        6,
        2,
        "mean",
        "head",
        "paper",
        (-1, 2),
        dict(select_order="kv"),
        "shallow",
    ),  # fmt: skip
    (
        "kv-order-overflow-redo-L120",
        (1, 120, 4, 2, 2),
        1,
        40,
        8,
        "mean",
        "head",
        "paper",
        (0, 2),
        dict(select_order="kv"),
        "redo",
    ),  # fmt: skip
    (
        "overflow-cap-L400",
        (1, 400, 2, 1, 16),
        2,
        40,
        8,
        "mean",
        "head",
        "causal",
        None,
        dict(shallow_cap=16, shallow_block_j=16),
        "redo",
    ),
    (
        "deep-identical-regions-L300",
        (1, 300, 2, 1, 16),
        2,
        40,
        8,
        "mean",
        "head",
        "paper",
        "same",
        {},
        "redo",
    ),
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select, values, overrides, decided",
    [c[1:] for c in SHALLOW_CASES],
    ids=[c[0] for c in SHALLOW_CASES],
)
@on_interpreter
def test_shallow_select_matches_torch(
    shape, region, budget, merge, pool, scope, select, values, overrides, decided
):
    q, k = _select_inputs(shape, values, 7)
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    config = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, **overrides)
    got, redone, _ = triton_impl.select_shallow_counted(q, k, config=config, **opts)
    want = ms_select_torch(q, k, **opts)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.long(), want), (got - want).abs().amax(-1)
    items = want.shape[0] * want.shape[1] * want.shape[2]
    if decided == "shallow":
        assert redone == 0, f"{redone} of {items} items were redone"
    else:
        assert 0 < redone <= items


# The retry (``shallow_retry_k``): blocks whose rows' 16 best hold too few distinct regions (a
# block choosing 92 of its first 100 candidates with 8 voting rows) are flagged by the first
# shallow run; a second run over just those items at 32 ranks decides most of them, and the
# full-depth kernel the rest. Every tier's indices are torch's.
RETRY_CASES = [
    ("random-paper-head", (1, 300, 2, 1, 16), 1, 100, 8, "head", "paper", None, {}),
    (
        "ties-causal-group-kv-order-masks",
        (2, 260, 4, 2, 16),
        1,
        100,
        8,
        "group",
        "causal",
        (-1, 2),
        dict(select_order="kv", shallow_rescore=True, shallow_mask_steps=2),
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, select, values, overrides",
    [c[1:] for c in RETRY_CASES],
    ids=[c[0] for c in RETRY_CASES],
)
@on_interpreter
def test_shallow_retry_decides_deep_blocks(shape, region, budget, merge, scope, select, values, overrides):
    q, k = _select_inputs(shape, values, 5)
    opts = dict(region=region, budget=budget, merge=merge, pool="mean", scope=scope, select=select)
    want = ms_select_torch(q, k, **opts)
    base = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, **overrides)
    counts = []
    for config in (base, dataclasses.replace(base, shallow_retry_k=32)):
        before = list(triton_impl.SHALLOW_ITEMS)
        got, redone, retried = triton_impl.select_shallow_counted(q, k, config=config, **opts)
        assert torch.equal(got.long(), want), (got - want).abs().amax(-1)
        counts.append([after - b for after, b in zip(triton_impl.SHALLOW_ITEMS, before)])
        assert counts[-1][1] == redone and counts[-1][2] == retried
    (items, flagged, none), (items2, full, retried) = counts
    assert items == items2 == want[..., 0].numel() and none == 0
    assert retried == flagged > full, counts  # the retry decided some of the flagged items
    assert flagged > 0


def test_flagged_items_are_listed_on_the_device():
    """``_flagged`` lists a run's flagged items in ascending order with their count, as tensors (no
    host sync): from the first run's flags (indexed by item) and from a retry's (indexed like its
    list, only the first ``count`` entries live, the rest 0)."""
    flag = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1], dtype=torch.int32)
    items, count = triton_impl._flagged(flag, None, None)
    assert count.tolist() == [4] and items[:4].tolist() == [1, 4, 5, 7] and items.dtype == torch.int32
    retry = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.int32)  # the retry's flags, like `items`
    items2, count2 = triton_impl._flagged(retry, items, count)
    assert count2.tolist() == [2] and items2[:2].tolist() == [1, 7]
    none, zero = triton_impl._flagged(torch.zeros(5, dtype=torch.int32), None, None)
    assert zero.tolist() == [0] and none.shape == (5,)
    empty, nothing = triton_impl._flagged(torch.zeros(0, dtype=torch.int32), None, None)
    assert nothing.tolist() == [0] and empty.numel() == 0


@on_interpreter
def test_shallow_selection_never_waits_for_the_host(monkeypatch):
    """The training path (``ms_select_shallow``: the pass, the retry of the items it flags, the
    full-depth kernel for those the retry flags) keeps the flagged items' lists and counts on the
    device: no ``nonzero``, ``item`` or ``tolist`` (each a device sync on a GPU, twice a layer
    before session 20), even in a case whose items reach the retry and the full-depth kernel."""
    shape, region, budget, merge, scope, select, values, overrides = RETRY_CASES[1][1:]
    q, k = _select_inputs(shape, values, 5)
    opts = dict(region=region, budget=budget, merge=merge, pool="mean", scope=scope, select=select)
    config = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, shallow_retry_k=32, **overrides)
    before = list(triton_impl.SHALLOW_ITEMS)
    with monkeypatch.context() as m:
        for name in ("nonzero", "item", "tolist"):
            m.setattr(torch.Tensor, name, lambda *a, _n=name, **kw: pytest.fail(f"host sync: {_n}"))
        m.setattr(torch, "nonzero", lambda *a, **kw: pytest.fail("host sync: torch.nonzero"))
        got = triton_impl.ms_select_shallow(q, k, config=config, **opts)
    assert torch.equal(got.long(), ms_select_torch(q, k, **opts))
    decided, redone, retried = (a - b for a, b in zip(triton_impl.SHALLOW_ITEMS, before))
    assert decided == got[..., 0].numel() and retried > redone >= 0, (decided, redone, retried)


# Search in a coarser precision, rank in float32 (``shallow_rescore``). The interpreter's dots
# ignore input_precision, so the coarser search is simulated: ``shallow_fault`` moves every score
# of the two passes by a pseudo-random amount within the row's bound (``shallow_score_err`` large
# enough to swap many candidates). Without re-scoring the selection changes; with it, it is
# ms_select_torch's again.
RESCORE_CASES = [
    ("random-paper-head-L200", (1, 200, 2, 1, 16), 2, 24, 4, "mean", "head", "paper", None),
    ("ties-causal-group-L97", (1, 97, 3, 1, 8), 4, 6, 2, "attn", "group", "causal", (-1, 2)),
    ("random-causal-D10", (1, 150, 2, 2, 10), 3, 12, 2, "mean", "head", "causal", None),  # D % 4 = 2
]


@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select, values",
    [c[1:] for c in RESCORE_CASES],
    ids=[c[0] for c in RESCORE_CASES],
)
@on_interpreter
def test_rescored_search_gives_the_float32_selection(
    shape, region, budget, merge, pool, scope, select, values
):
    q, k = _select_inputs(shape, values, 11)
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    want = ms_select_torch(q, k, **opts)
    fault = dataclasses.replace(triton_impl.INTERPRETER_CONFIG, shallow_fault=True, shallow_score_err=0.01)
    noisy, _, _ = triton_impl.select_shallow_counted(q, k, config=fault, **opts)
    fixed, _, _ = triton_impl.select_shallow_counted(
        q, k, config=dataclasses.replace(fault, shallow_rescore=True), **opts
    )
    assert not torch.equal(noisy.long(), want), "the simulated coarse search changed nothing"
    assert torch.equal(fixed.long(), want)
    # Four columns per load, split in registers: the same FMAs in the same order.
    wide, _, _ = triton_impl.select_shallow_counted(
        q, k, config=dataclasses.replace(fault, shallow_rescore=True, shallow_rescore_cols=4), **opts
    )
    assert torch.equal(wide, fixed)
    plain, _, _ = triton_impl.select_shallow_counted(
        q, k, config=dataclasses.replace(triton_impl.INTERPRETER_CONFIG, shallow_rescore=True), **opts
    )
    assert torch.equal(plain.long(), want)


# The second pass by bit masks (``shallow_mask_steps``, re-scored searches only): torch's indices,
# decided the way the case's name says, on random and tie-heavy inputs (ties put several
# candidates of a row in one step, so masks expand over several rounds) with masks expanded every
# 2 steps (chunk boundaries) or every 64 (one chunk), and where rows overflow or agree (redone).
MASK_CASES = [("random-paper-head-L400", 2), ("ties-causal-B2-L73", 2), ("overflow-ties-L200", 64),
              ("deep-identical-regions-L300", 2)]  # fmt: skip


@pytest.mark.parametrize("case, mask_steps", MASK_CASES, ids=[c for c, _ in MASK_CASES])
@on_interpreter
def test_shallow_masks_give_the_same_selection(case, mask_steps):
    _, shape, region, budget, merge, pool, scope, select, values, overrides, decided = next(
        c for c in SHALLOW_CASES if c[0] == case
    )
    q, k = _select_inputs(shape, values, 7)
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    masked = dataclasses.replace(
        triton_impl.INTERPRETER_CONFIG, shallow_rescore=True, shallow_mask_steps=mask_steps, **overrides
    )
    got, redone, _ = triton_impl.select_shallow_counted(q, k, config=masked, **opts)
    assert torch.equal(got.long(), ms_select_torch(q, k, **opts))
    assert (redone == 0) == (decided == "shallow"), redone


@pytest.mark.parametrize("case", [c[0] for c in RESCORE_CASES[:2]])
@on_interpreter
def test_shallow_masks_undo_a_coarse_search(case):
    _, shape, region, budget, merge, pool, scope, select, values = next(
        c for c in RESCORE_CASES if c[0] == case
    )
    q, k = _select_inputs(shape, values, 11)
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    fault = dataclasses.replace(
        triton_impl.INTERPRETER_CONFIG, shallow_fault=True, shallow_score_err=0.01, shallow_rescore=True,
        shallow_mask_steps=4,
    )  # fmt: skip
    got, _, _ = triton_impl.select_shallow_counted(q, k, config=fault, **opts)
    assert torch.equal(got.long(), ms_select_torch(q, k, **opts))


@triton.jit
def _popcount_kernel(X, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(OUT + offs, tk._popcount(x))
    tl.store(OUT + N + offs, tk._popcount((x & (-x)) - 1))  # the lowest set bit's index (64 for 0)


@on_interpreter
def test_popcount_and_lowest_bit():
    """``_popcount`` counts the set bits of int64s, the sign bit included; the index of the lowest
    set bit, which the masks' expansion takes as popcount(lowest - 1), is right for every bit."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**63), 2**63 - 1, (48,), dtype=torch.int64, generator=gen)
    bits = [1 << b if b < 63 else -(2**63) for b in range(0, 64, 4)]
    x = torch.cat([x, torch.tensor([0, -1, -(2**63), 2**63 - 1] + bits[:12], dtype=torch.int64)])
    out = torch.empty(2 * 64, dtype=torch.int32)
    _popcount_kernel[(1,)](x, out, N=64)
    want = [bin(v & (2**64 - 1)).count("1") for v in x.tolist()]
    low = [((v & (2**64 - 1)) & -(v & (2**64 - 1))).bit_length() - 1 if v else 64 for v in x.tolist()]
    assert out[:64].tolist() == want
    assert out[64:].tolist() == low


@triton.jit
def _columns_kernel(X, OUT, R: tl.constexpr, C: tl.constexpr):
    r, c, d = tl.arange(0, R), tl.arange(0, C), tl.arange(0, 4)
    x = tl.load(X + (r[:, None, None] * C + c[None, :, None]) * 4 + d[None, None, :])
    c0, c1, c2, c3 = tk._columns4(x, [R, C, 2, 2])
    at = r[:, None] * C + c[None, :]
    tl.store(OUT + at, c0)
    tl.store(OUT + R * C + at, c1)
    tl.store(OUT + 2 * R * C + at, c2)
    tl.store(OUT + 3 * R * C + at, c3)


@on_interpreter
def test_columns4_splits_in_order():
    """``_columns4`` returns the columns 0, 1, 2, 3 of [..., 4] (the re-scoring's FMAs must run
    in column order to give the ieee dot's sums)."""
    x = torch.arange(2 * 8 * 4, dtype=torch.float32).reshape(2, 8, 4)
    out = torch.empty(4, 2, 8)
    _columns_kernel[(1,)](x, out, R=2, C=8)
    assert torch.equal(out, x.permute(2, 0, 1))


def test_auto_selection_by_search_precision_and_merge():
    """``select_impl="auto"``: the shallow selection for any m when it searches on tensor cores and
    re-scores (the GPU default), else only from SHALLOW_MIN_MERGE regions per block."""
    resolve, gpu = triton_impl.resolve_select_impl, triton_impl.GPU_CONFIG
    ieee = dataclasses.replace(gpu, select_precision="ieee", shallow_rescore=False)
    assert gpu.shallow_rescore and gpu.select_impl == "auto"
    assert [resolve(gpu, m) for m in (2, 8, 64)] == ["shallow"] * 3
    assert [resolve(ieee, m) for m in (8, 31, 32, 64)] == ["torch", "torch", "shallow", "shallow"]
    assert resolve(triton_impl.LaunchConfig(), 8) == "torch"
    assert resolve(dataclasses.replace(gpu, select_impl="triton"), 64) == "triton"


def test_key_step_under_rope():
    """Forward and dq step over their ``block_n`` keys, at most ``rope_block_n`` with RoPE on the
    fly: the GPU default's 128-key steps ran out of shared memory in dq under RoPE (Triton 3.6,
    H200), so pe="selected" keeps the 64-key steps its GPU tests passed with."""
    gpu = triton_impl.GPU_CONFIG
    assert (gpu.key_step("fwd", False), gpu.key_step("dq", False)) == (128, 128)
    assert (gpu.key_step("fwd", True), gpu.key_step("dq", True)) == (64, 64)
    small = triton_impl.INTERPRETER_CONFIG
    assert small.key_step("fwd", True) == small.fwd_block_n == 16
    assert dataclasses.replace(gpu, rope_block_n=256).key_step("dq", True) == 128
    with pytest.raises(ValueError, match="rope_block_n"):
        dataclasses.replace(gpu, rope_block_n=8)
    with pytest.raises(ValueError, match="rope_block_n"):
        dataclasses.replace(gpu, rope_block_n=96)


def test_out_of_resources_names_the_launch_settings():
    """A launch that needs more shared memory than the card has (as dq under RoPE with 128-key
    steps did on an H200) is reported with the kernel and the LaunchConfig fields to lower."""
    from triton.runtime.errors import OutOfResources

    cfg, full = triton_impl.GPU_CONFIG, OutOfResources(263168, 232448, "shared memory")
    dq = triton_impl.launch_settings("ms_attn_bwd_dq_kernel", cfg, "dq_", rope=True)
    with pytest.raises(triton_impl.LaunchResourceError) as info, dq:
        raise full
    text = str(info.value)
    assert text.startswith("ms_attn_bwd_dq_kernel needs 263168 of shared memory where ")
    assert "has 232448, with the launch settings dq_block_m=128, dq_block_n=128, dq_warps=8, " in text
    assert "dq_stages=2, dq_gluon=True, rope_block_n=64: lower" in text and "fwd_" not in text
    assert info.value.__cause__ is full
    select = triton_impl.launch_settings("ms_select_shallow_kernel", cfg, "shallow_", "select_precision")
    with (
        pytest.raises(
            triton_impl.LaunchResourceError, match=r"settings select_precision='tf32', shallow_k=16, "
        ),
        select,
    ):
        raise full
    fwd = triton_impl.launch_settings("ms_attn_fwd_kernel", cfg, "fwd_")
    with pytest.raises(ValueError, match="other errors pass"), fwd:  # nothing else is touched
        raise ValueError("other errors pass")


def test_shallow_config_is_validated():
    for bad, match in (
        (dict(shallow_k=8), "shallow_k"),
        (dict(shallow_k=64, shallow_block_j=32), "shallow_k"),
        (dict(shallow_cap=16, shallow_block_j=32), "shallow_cap"),
        (dict(shallow_cap=48), "power of two"),
        (dict(select_impl="fast"), "select_impl"),
        (dict(select_order="head"), "select_order"),
        (dict(whole_qk=1), "whole_qk"),
        (dict(shallow_rescore=1), "shallow_rescore"),
        (dict(shallow_rescore_cols=2), "shallow_rescore_cols"),
        (dict(shallow_score_err=-1.0), "shallow_score_err"),
        (dict(shallow_mask_steps=3, shallow_rescore=True), "shallow_mask_steps"),
        (
            dict(shallow_mask_steps=4, shallow_rescore=True, shallow_block_j=128, shallow_cap=128),
            "shallow_block_j <= 64",
        ),
        (dict(shallow_stages=0), "shallow_stages"),
        (dict(shallow_retry_k=16), "shallow_retry_k"),  # not above shallow_k (16)
        (dict(shallow_retry_k=48), "shallow_retry_k"),
        (dict(shallow_retry_k=128), "shallow_retry_k"),  # above shallow_block_j (64)
        (dict(shallow_retry_cap=32), "shallow_retry_cap"),
        (dict(shallow_maxnreg=-1), "shallow_maxnreg"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(triton_impl.GPU_CONFIG, **bad)
    # Masks need re-scoring (they carry no keys): without it the GPU default's masks are ignored,
    # so turning re-scoring off is enough (the GPU tests do it for the ieee selection).
    assert triton_impl.GPU_CONFIG.shallow_mask_steps and triton_impl.GPU_CONFIG.shallow_rescore
    dataclasses.replace(triton_impl.GPU_CONFIG, shallow_rescore=False, shallow_block_j=128, shallow_cap=128)


@on_interpreter
def test_select_dense_input_has_no_blocks():
    q, k, _, _ = _inputs(1, 29, 2, 1, 16)
    got = triton_impl.ms_select_triton(
        q, k, region=4, budget=8, merge=2, pool="mean", scope="head", select="paper"
    )
    assert got.shape == (1, 2, 0, 6)


def _twice_identical(device, shape, dtype, region, budget, merge, mode):
    """In deterministic mode two backward passes give identical bits, and the path taken is
    the one the mode names. The modes that ask for deterministic mode (Torch's flag, the
    config's) ask for ``fused_dq`` too, which must then give way to the dq kernel; a forced
    deterministic dk/dv path leaves dq to the dq kernel (``fused_dq`` off)."""
    q, k, v, do = _inputs(*shape, dtype=dtype, device=device, seed=8)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge)
    opts = dict(region=region, budget=budget, merge=merge, pe="pre", scale=0.1)
    with dkv_mode(mode), launch(fused_dq=mode.split("+")[0] in ("flag", "config")):
        path = triton_impl.dkv_path(region, triton_impl.default_config(q.device))
        runs = [
            _grads(lambda q, k, v: triton_impl.ms_attend_triton(q, k, v, idx, **opts), q, k, v, do)
            for _ in range(2)
        ]
    assert path == ("reverse" if mode.startswith("reverse") else "partial")
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "mode", ["flag", "config", "partial-windows", "reverse", "reverse+whole", "config+whole"]
)
@on_interpreter
def test_backward_is_deterministic(mode):
    _twice_identical("cpu", (1, 41, 2, 1, 32), torch.float32, 4, 4, 2, mode)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU tests use compiled kernels")
@pytest.mark.parametrize("mode", ["flag", "config", "partial-windows", "reverse"])
def test_gpu_backward_is_deterministic(mode):
    _twice_identical("cuda", (1, 6000, 8, 2, 128), torch.bfloat16, 16, 64, 8, mode)


def test_dkv_path_choice():
    """auto: the reverse index when w is a multiple of the dk/dv key tile and each kv head serves
    one query head, else partial sums in deterministic mode (argument, launch setting or torch's
    flag) and atomics otherwise; a forced path is kept; atomics in deterministic mode are
    refused, naming both settings."""
    cfg = triton_impl.LaunchConfig(dkv_block_n=16)
    assert triton_impl.dkv_path(32, cfg) == "reverse"
    assert triton_impl.dkv_path(32, cfg, group=1, deterministic=True) == "reverse"
    assert triton_impl.dkv_path(32, cfg, group=4) == "atomic"
    assert triton_impl.dkv_path(32, cfg, group=4, deterministic=True) == "partial"
    assert triton_impl.dkv_path(32, dataclasses.replace(cfg, dkv_path="reverse"), group=4) == "reverse"
    assert triton_impl.dkv_path(20, cfg) == "atomic"
    assert triton_impl.dkv_path(20, cfg, deterministic=True) == "partial"
    assert triton_impl.dkv_path(20, dataclasses.replace(cfg, deterministic=True)) == "partial"
    assert (
        triton_impl.dkv_path(20, dataclasses.replace(cfg, deterministic=True), deterministic=False)
        == "atomic"
    )
    with deterministic_algorithms(True):
        assert triton_impl.dkv_path(20, cfg) == "partial"
        with pytest.raises(ValueError, match="dkv_path='atomic'"):
            triton_impl.dkv_path(20, dataclasses.replace(cfg, dkv_path="atomic"))
    assert triton_impl.dkv_path(32, dataclasses.replace(cfg, dkv_path="partial")) == "partial"
    assert (
        triton_impl.dkv_path(20, dataclasses.replace(cfg, dkv_path="reverse"), deterministic=True)
        == "reverse"
    )
    with pytest.raises(ValueError, match="dkv_path='atomic'"):
        triton_impl.LaunchConfig(deterministic=True, dkv_path="atomic")
    with pytest.raises(ValueError, match="dkv_path must be one of"):
        triton_impl.LaunchConfig(dkv_path="fast")
    with pytest.raises(ValueError, match="dkv_partial_gib"):
        triton_impl.LaunchConfig(dkv_partial_gib=0)


def test_partial_index_lists_every_selecting_block():
    """For every (window, b, kv head, region): the partial rows of exactly the (selection head,
    block of the window) pairs that selected the region, at its rank, ascending in (head, block)."""
    region, budget, merge, L = 3, 6, 2, 97
    q, k, _, _ = _inputs(2, L, 4, 2, 8, seed=9)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope="head")
    idx[0, 1, 2, 1] = -1  # an ignored entry is never listed
    idx = triton_impl.sort_selection(idx)
    B, Hs, G, S = idx.shape
    Hkv, n = 2, -(-L // region)
    for window in (1, 3, G):
        index = triton_impl.partial_index(idx, Hkv, n, window)
        assert index.n_windows == -(-G // window)
        for win in range(index.n_windows):
            for b in range(B):
                for hkv in range(Hkv):
                    for j in range(n):
                        key = ((win * B + b) * Hkv + hkv) * n + j
                        got = index.src[index.offsets[key] : index.offsets[key + 1]].tolist()
                        want = [
                            ((b * Hs + hs) * window + g - win * window) * S + rank
                            for hs in range(hkv * (Hs // Hkv), (hkv + 1) * (Hs // Hkv))
                            for g in range(win * window, min((win + 1) * window, G))
                            for rank in range(S)
                            if idx[b, hs, g, rank] == j
                        ]
                        assert got == want, (window, win, b, hkv, j)


def test_reverse_index_lists_every_selecting_block():
    """For every (head, key tile, block): the entry exists iff the block selected a region
    overlapping the tile, and its ranks name exactly those regions' places in the selection."""
    region, budget, merge, L = 5, 6, 2, 143
    q, k, _, _ = _inputs(2, L, 2, 1, 8, seed=9)
    idx = triton_impl.sort_selection(
        ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope="head")
    )
    B, Hs, G, S = idx.shape
    for block in (4, 16):
        geo = triton_impl.Geometry.of(L, region, budget, merge, block)
        rev = triton_impl.reverse_index(idx, geo)
        starts = geo.tile_start(torch.arange(geo.n_tiles))
        ends = torch.minimum(starts + block, geo.segment_end(torch.arange(geo.n_tiles)))
        assert torch.equal(rev.order.sort().values, torch.arange(geo.n_tiles, dtype=torch.int32))
        for b in range(B):
            for hs in range(Hs):
                for tile in range(geo.n_tiles):
                    key = (b * Hs + hs) * geo.n_tiles + tile
                    lo, hi = rev.offsets[key].item(), rev.offsets[key + 1].item()
                    got = {rev.block[e].item(): rev.rank[e].tolist() for e in range(lo, hi)}
                    first_region = starts[tile].item() // region
                    want = {}
                    for g in range(G):
                        ranks = [-1] * rev.slots
                        for r, j in enumerate(idx[b, hs, g].tolist()):
                            if j * region < ends[tile] and (j + 1) * region > starts[tile]:
                                ranks[j - first_region] = r
                        if any(x >= 0 for x in ranks):
                            want[g] = ranks
                    assert got == want, (b, hs, tile)
                    assert list(got) == sorted(got)


def test_geometry_tiles_cover_every_token_once():
    for L, region, budget, merge, block in [
        (61, 4, 5, 2, 16),
        (97, 20, 3, 1, 16),
        (29, 4, 8, 2, 16),
        (1000, 16, 8, 3, 64),
    ]:
        geo = triton_impl.Geometry.of(L, region, budget, merge, block)
        tiles = torch.arange(geo.n_tiles)
        starts = geo.tile_start(tiles)
        ends = torch.minimum(starts + block, geo.segment_end(tiles))
        covered = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())])
        assert torch.equal(covered, torch.arange(L))
        assert torch.equal(geo.tile_of(torch.arange(L)), torch.repeat_interleave(tiles, ends - starts))


@on_interpreter
def test_bad_inputs_raise_value_error():
    q, k, v, _ = _inputs(1, 20, 2, 1, 32)
    idx = torch.zeros(1, 2, 1, 2, dtype=torch.int32)
    opts = dict(
        region=4, budget=4, merge=2, rope=False, inv_freq=torch.empty(0, dtype=torch.float64), scale=0.1
    )
    with pytest.raises(ValueError, match="even head dim"):
        triton_impl.ms_attn_fwd(q[..., :31], k[..., :31], v[..., :31], idx, **opts)
    with pytest.raises(ValueError, match="int32"):
        triton_impl.ms_attn_fwd(q, k, v, idx.long(), **opts)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        triton_impl.ms_attn_fwd(q.double(), k.double(), v.double(), idx, **opts)
    with pytest.raises(ValueError, match="fwd_block_m"):
        triton_impl.LaunchConfig(fwd_block_m=48)
    with pytest.raises(ValueError, match="multiple of fwd_block_n"):
        triton_impl.LaunchConfig(fwd_block_m=32, fwd_block_n=64)


@pytest.mark.skipif(INTERPRETED, reason="needs compiled (not interpreted) kernels")
def test_cpu_tensors_need_the_interpreter():
    q, k, v, _ = _inputs(1, 20, 2, 1, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ms_attention(q, k, v, region=4, budget=4, merge=2, backend="triton")


@on_interpreter
def test_custom_op_has_fake_and_autograd():
    """torch.library's own checks of the op: schema, fake tensor and autograd registration."""
    q, k, v, _ = _inputs(1, 23, 2, 1, 32, seed=10)
    idx = triton_impl.sort_selection(ms_select_torch(q, k, region=4, budget=4, merge=2))
    args = (
        q.requires_grad_(),
        k.requires_grad_(),
        v.requires_grad_(),
        idx,
        4,
        4,
        2,
        True,
        rope_inv_freq(32, 1e4).double(),
        0.17,
    )
    for start in (0, 9):  # the default first row, and one inside the first tile
        torch.library.opcheck(
            torch.ops.ctxlab.ms_attn_fwd.default,
            args + (start,),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def _attend_in_dtype(q, k, v, idx, *, region, budget, merge, pe, inv_freq, scale):
    """PyTorch's own computation of the same function in q's dtype (bf16 matmuls, as a
    user's PyTorch model would do): the yardstick for the kernels' bf16 error."""
    B, L, Hq, D = q.shape
    Hkv, Hs = k.shape[2], idx.shape[1]
    rep = Hq // Hkv
    kk, vv = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    idx = triton_impl.sort_selection(idx).long().repeat_interleave(Hq // Hs, 1)
    prefix = min(budget * region, L)
    inv = inv_freq.to(q.device) if pe == "selected" else None

    def rotate(x, pos):  # float32 rotation, rounded once, as kernels/rope.py does
        c, s = rope_cos_sin(pos, inv)
        return (x.float() * c + rotate_half(x.float()) * s).to(x.dtype)

    def attend(qs, ks, vs, qpos, kpos, keep):  # [Hq, M, D], [Hq, N, D], [M], [N], [Hq?, M, N]
        if inv is not None:
            qs, ks = rotate(qs, qpos), rotate(ks, kpos)
        logits = (qs @ ks.transpose(-1, -2)) * scale
        probs = logits.float().masked_fill(~keep, float("-inf")).softmax(-1).to(q.dtype)
        return probs @ vs

    out = []
    for b in range(B):
        rows = []
        pos = torch.arange(prefix, device=q.device)
        causal = pos[None, :] <= pos[:, None]
        rows.append(
            attend(
                q[b, :prefix].transpose(0, 1),
                kk[b, :prefix].transpose(0, 1),
                vv[b, :prefix].transpose(0, 1),
                pos,
                pos,
                causal,
            )
        )
        for g in range(idx.shape[2]):
            lo = (budget + g * merge) * region
            hi = min(lo + merge * region, L)
            sel = idx[b, :, g]  # [Hq, S]
            tok = sel.clamp_min(0)[..., None] * region + torch.arange(region, device=q.device)
            tok = torch.cat([tok.flatten(1), torch.arange(lo, hi, device=q.device).expand(Hq, -1)], 1)
            heads = torch.arange(Hq, device=q.device)[:, None]
            ks, vs = kk[b, tok, heads], vv[b, tok, heads]  # [Hq, N, D]
            n_sel = sel.shape[1] * region
            qpos = torch.arange(n_sel, n_sel + hi - lo, device=q.device)
            kpos = torch.arange(n_sel + hi - lo, device=q.device)
            keep = torch.cat(
                [
                    (sel >= 0).repeat_interleave(region, 1)[:, None, :].expand(-1, hi - lo, -1),
                    (kpos[None, n_sel:] <= qpos[:, None]).expand(Hq, -1, -1),
                ],
                -1,
            )
            rows.append(attend(q[b, lo:hi].transpose(0, 1), ks, vs, qpos, kpos, keep))
        out.append(torch.cat(rows, 1).transpose(0, 1))
    return torch.stack(out)


GPU_CASES = [
    ("L4133-gqa4-w16-pre-head-atomic", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic"),
    ("L4133-gqa4-w16-pre-head-partial", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "partial"),
    ("L4133-gqa4-w16-pre-head-reverse", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "reverse"),
    ("L3001-gqa1-w32-rope-group-flag", (2, 3001, 4, 4, 64), 32, 32, 4, "group", "selected", "flag"),
    (
        "L2500-gqa3-w16-rope-head-windows",
        (1, 2500, 6, 2, 128),
        16,
        48,
        16,
        "head",
        "selected",
        "partial-windows",
    ),
    ("L5000-gqa4-w64-pre-group", (1, 5000, 8, 2, 128), 64, 16, 2, "group", "pre", "atomic"),
    ("L4133-gqa4-w16-group-atomic-fused", (1, 4133, 8, 2, 128), 16, 64, 8, "group", "pre", "atomic+fused"),
    ("L5000-gqa1-w64-head-reverse-fused", (1, 5000, 4, 4, 128), 64, 16, 2, "head", "pre", "reverse+fused"),
    ("L4133-gqa4-w16-head-atomic-whole", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic+whole"),
    ("L4133-gqa4-w16-group-partial-whole", (1, 4133, 8, 2, 128), 16, 64, 8, "group", "pre", "partial+whole"),
    ("L5000-gqa1-w64-head-reverse-whole", (1, 5000, 4, 4, 128), 64, 16, 2, "head", "pre", "reverse+whole"),
    ("L4133-gqa4-w16-head-tma-ws", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic+whole+tma+ws"),
    ("L5000-gqa1-w64-head-reverse-tma", (1, 5000, 4, 4, 128), 64, 16, 2, "head", "pre", "reverse+whole+tma"),
    ("L4133-gqa4-w16-head-atomic-region", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic+region"),
    ("L2500-gqa3-w20-rope-head-region", (1, 2500, 6, 2, 128), 20, 48, 16, "head", "selected", "flag+region"),
    ("L4133-gqa4-w16-gluon", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic+whole+region+gluon"),
    ("L5000-gqa1-w64-group-gluon", (1, 5000, 4, 4, 128), 64, 16, 2, "group", "pre", "reverse+whole+gluon"),
    ("L3001-gqa2-w20-d64-gluon", (2, 3001, 4, 2, 64), 20, 40, 6, "head", "pre", "partial+region+gluon"),
    ("L4133-gqa4-w16-gluondq", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic+whole+region+gluondq"),
    ("L3001-gqa2-w20-d64-gluondq", (2, 3001, 4, 2, 64), 20, 40, 6, "group", "pre", "reverse+gluondq"),
    ("L4133-gqa4-w16-gluondkv", (1, 4133, 8, 2, 128), 16, 64, 8, "head", "pre", "atomic+region+gluondkv"),
    ("L3001-gqa2-w20-d64-gluondkv", (2, 3001, 4, 2, 64), 20, 40, 6, "group", "pre", "partial+gluondkv"),
    (
        "L5000-gqa4-w64-group-gluondkv",
        (1, 5000, 8, 2, 128),
        64,
        16,
        2,
        "group",
        "pre",
        "atomic+region+gluondkv",
    ),
    (
        "L4133-gqa4-w16-gluondkv-persistent",
        (1, 4133, 8, 2, 128),
        16,
        64,
        8,
        "head",
        "pre",
        "atomic+region+gluondkv+persistent",
    ),
    (
        "L3001-gqa2-w20-d64-gluondkv-persistent",
        (2, 3001, 4, 2, 64),
        20,
        40,
        6,
        "group",
        "pre",
        "partial+gluondkv+persistent",
    ),
    (
        "L4133-gqa4-w16-gluondkv-fused",
        (1, 4133, 8, 2, 128),
        16,
        64,
        8,
        "head",
        "pre",
        "atomic+region+gluondkv+fused",
    ),
    (
        "L3001-gqa2-w20-d64-gluondkv-fused",
        (2, 3001, 4, 2, 64),
        20,
        40,
        6,
        "group",
        "pre",
        "atomic+gluondkv+fused",
    ),
    # The GPU default at a paper-sized block (m·w = 1024 rows): dq inside the Gluon dk/dv of the
    # selected keys, finished by the Gluon dq kernel over the own segment (fused_dq_min_block).
    ("L9000-gqa4-w16-m64-default", (1, 9000, 8, 2, 128), 16, 96, 64, "head", "pre", "atomic"),
    (
        "L4133-gqa4-w16-gluondkv-fused-ownatomics",
        (1, 4133, 8, 2, 128),
        16,
        64,
        8,
        "head",
        "pre",
        "atomic+region+gluondkv+fused+ownatomics",
    ),
]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU tests use compiled kernels")
@pytest.mark.parametrize(
    "shape, region, budget, merge, scope, pe, dkv",
    [c[1:] for c in GPU_CASES],
    ids=[c[0] for c in GPU_CASES],
)
def test_gpu_bf16_error_within_pytorch_error(shape, region, budget, merge, scope, pe, dkv):
    """bf16 kernel error <= 2x (forward) and 3x (gradients) PyTorch's own bf16 error."""
    q, k, v, do = _inputs(*shape, dtype=torch.float32, device="cuda", seed=11)
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope=scope)
    opts = dict(
        region=region, budget=budget, merge=merge, pe=pe, scale=shape[-1] ** -0.5,
        inv_freq=rope_inv_freq(shape[-1], 10000.0, "cuda").double(),
    )  # fmt: skip
    reference = _grads(lambda q, k, v: _attend_in_dtype(q, k, v, idx, **opts), q, k, v, do)
    bf = [x.bfloat16() for x in (q, k, v, do)]
    theirs = _grads(lambda q, k, v: _attend_in_dtype(q, k, v, idx, **opts), *bf)
    with dkv_mode(dkv):
        mine = _grads(lambda q, k, v: triton_impl.ms_attend_triton(q, k, v, idx, **opts), *bf)
    assert_within_pytorch_error(mine, theirs, reference)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU tests use compiled kernels")
def test_gpu_shallow_selection_never_syncs():
    """On the GPU the training path's selection (the pass, the retry, the full-depth kernel) runs
    under ``torch.cuda.set_sync_debug_mode("error")``: no host sync (each cost the step an idle
    GPU, twice a layer, before session 20), and the fused selection's indices."""
    q, k = (x.cuda() for x in _select_inputs((1, 20000, 8, 2, 128), None, 3))
    opts = dict(region=16, budget=512, merge=64, pool="mean", scope="head", select="paper")
    triton_impl.ms_select_shallow(q, k, **opts)  # compiled outside the check
    torch.cuda.synchronize()
    before = list(triton_impl.SHALLOW_ITEMS)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = triton_impl.ms_select_shallow(q, k, **opts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _, redone, retried = (a - b for a, b in zip(triton_impl.SHALLOW_ITEMS, before))
    assert retried > 0, "the case must reach the retry"
    # The same float32 scores as the full-depth fused selection, so its very indices (random floats:
    # ms_select_torch sums in another order, and equals them only under the exactness contract).
    assert torch.equal(got, triton_impl.ms_select_triton(q, k, **opts)), (redone, retried)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU tests use compiled kernels")
@pytest.mark.parametrize("dkv", ["partial", "reverse"])
@pytest.mark.parametrize("start", [0, 1000])
def test_gpu_dkv_tma_same_bits(dkv, start):
    """The own-segment dk/dv kernel fed by TMA descriptors (``dkv_tma``) returns the bits of the
    pointer loads, on deterministic paths; warp-specialized (``dkv_ws``, which the reverse path
    leaves out: two consumer partitions in Triton 3.6) its dk came back up to 1 bf16 ulp apart
    on an H200 (session 12), so there dk and dv within 2^-7 of their largest element. From a
    ``start`` inside a block, q's rows before it are NaN, which the descriptors (from row
    ``start``) never read."""
    shape = (1, 4133, 8, 2, 128) if dkv == "partial" else (1, 5000, 4, 4, 128)
    region, budget, merge = (16, 64, 8) if dkv == "partial" else (64, 16, 2)
    q, k, v, do = (x.bfloat16() for x in _inputs(*shape, dtype=torch.float32, device="cuda", seed=13))
    idx = ms_select_torch(q, k, region=region, budget=budget, merge=merge, scope="head")
    q_in = q.clone()
    q_in[:, :start] = float("nan")

    def run():
        return _grads(
            lambda q, k, v: triton_impl.ms_attend_triton(
                q, k, v, idx, region=region, budget=budget, merge=merge, pe="pre",
                scale=shape[-1] ** -0.5, inv_freq=None, start=start,
            ), q_in, k, v, do[:, start:],
        )  # fmt: skip

    with dkv_mode(dkv + "+whole"):
        out, grads = run()
    assert not any(g.isnan().any() for g in grads[1:])
    for extra in ("+tma", "+tma+ws"):
        with dkv_mode(dkv + "+whole" + extra):
            out2, grads2 = run()
        assert torch.equal(out, out2)
        for name, g, g2 in zip(("dq", "dk", "dv"), grads, grads2):
            diff = (g.float() - g2.float()).abs().max().item()
            if extra == "+tma" or name == "dq":
                assert torch.equal(g, g2), f"{extra}: {name} differs by up to {diff:.3g}"
            else:
                assert diff <= 2**-7 * g.float().abs().max().item(), f"{extra}: {name} differs by {diff:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU tests use compiled kernels")
@pytest.mark.parametrize(
    "shape, region, budget, merge, start",
    [((1, 4133, 8, 2, 128), 16, 64, 8, 1000), ((1, 20000, 4, 1, 128), 16, 512, 64, 0),
     ((2, 3001, 4, 4, 64), 64, 16, 2, 2100)],
    ids=["L4133-w16-start1000", "L20000-paper-settings", "L3001-w64-d64-start2100"],
)  # fmt: skip
def test_gpu_gluon_kernels_match_triton_kernels(shape, region, budget, merge, start):
    """The warp-specialized Gluon forward (``fwd_gluon``), dq (``dq_gluon``) and dk/dv of the
    selected keys (``dkv_gluon``, atomic and partial paths) against the Triton kernels on the same
    selection: o, dq, dk, dv within 2^-7 of their largest element (one bf16 rounding, different
    float32 sums), lse within 1e-3; from a ``start`` inside a block the rows before it stay
    unwritten (NaN poison; dq: zero) and the NaN rows of q and do there are never read. Skipped off
    Hopper (the kernels are sm_90)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are compiled for sm_90")
    q, k, v, do = (x.bfloat16() for x in _inputs(*shape, dtype=torch.float32, device="cuda", seed=17))
    q[:, :start] = float("nan")
    do[:, :start] = float("nan")
    idx = triton_impl.sort_selection(
        ms_select_torch(q.nan_to_num(), k, region=region, budget=budget, merge=merge, scope="head")
    )
    opts = dict(region=region, budget=budget, merge=merge, rope=False, inv_freq=None, scale=shape[-1] ** -0.5,
                start=start)  # fmt: skip
    base = dataclasses.replace(triton_impl.GPU_CONFIG, fwd_gluon=False, dq_gluon=False, dkv_gluon=False)
    gluon = dataclasses.replace(
        base, fwd_gluon=True, dq_gluon=True, gluon_dkv_row_stats=False, gluon_dkv_persistent=False
    )
    assert triton_impl.gluon_applies(gluon, False, q)
    assert triton_impl.gluon_applies(gluon, False, q, "dq")
    o_ref, lse_ref = triton_impl.ms_attn_fwd(q, k, v, idx, config=base, **opts)  # outputs NaN-poisoned
    o, lse = triton_impl.ms_attn_fwd(q, k, v, idx, config=gluon, **opts)
    assert o[:, :start].isnan().all() and lse[..., :start].isnan().all()
    assert not o[:, start:].isnan().any() and not lse[..., start:].isnan().any()
    err = (o[:, start:].float() - o_ref[:, start:].float()).abs().max().item()
    assert err <= 2**-7 * o_ref[:, start:].float().abs().max().item(), err
    torch.testing.assert_close(lse[..., start:], lse_ref[..., start:], rtol=0, atol=1e-3)
    # The forward with each softmax under the previous step's p v (``gluon_fwd_overlap``), and with
    # the consumers issuing in turns (``gluon_fwd_pingpong``): the same operations in the same
    # order, so the same bits, with two and three slots.
    for stages, pingpong in ((2, False), (3, False), (3, True)):
        overlap = dataclasses.replace(
            gluon, gluon_fwd_overlap=True, gluon_stages=stages, gluon_fwd_pingpong=pingpong
        )
        o2, lse2 = triton_impl.ms_attn_fwd(q, k, v, idx, config=overlap, **opts)
        assert torch.equal(o2[:, start:], o[:, start:]), (stages, pingpong)
        assert torch.equal(lse2[..., start:], lse[..., start:]), (stages, pingpong)
        assert o2[:, :start].isnan().all()

    delta = triton_impl.bwd_preprocess(o_ref, do, start)
    dq_ref = triton_impl.bwd_dq(do, q, k, v, lse_ref, delta, idx, config=base, **opts)
    dq = triton_impl.bwd_dq(do, q, k, v, lse_ref, delta, idx, config=gluon, **opts)
    assert (dq[:, :start] == 0).all() and not dq[:, start:].isnan().any()
    err = (dq[:, start:].float() - dq_ref[:, start:].float()).abs().max().item()
    assert err <= 2**-7 * dq_ref[:, start:].float().abs().max().item(), err

    # dq with its consumers' waits split (``gluon_split_waits``): the same sums, the same bits.
    split = dataclasses.replace(gluon, gluon_split_waits=True)
    assert torch.equal(triton_impl.bwd_dq(do, q, k, v, lse_ref, delta, idx, config=split, **opts), dq)

    # dk, dv of the selected keys (``dkv_gluon``) on both paths it serves, waits split or not; the
    # partial sums' bits are the same on every run (each element stored once, reduced in a fixed
    # order), and the same with the waits split.
    gluon = dataclasses.replace(gluon, dkv_gluon=True)
    row_stats = dataclasses.replace(gluon, gluon_dkv_row_stats=True)  # lse, delta through the ring
    assert triton_impl.gluon_applies(gluon, False, q, "dkv")
    for path in ("atomic", "partial"):
        ref = triton_impl.bwd_dkv(do, q, k, v, lse_ref, delta, idx, config=base, path=path, **opts)
        for cfg in (gluon, dataclasses.replace(gluon, gluon_split_waits=True), row_stats):
            got = triton_impl.bwd_dkv(do, q, k, v, lse_ref, delta, idx, config=cfg, path=path, **opts)
            for name, g, r in zip(("dk", "dv"), got, ref):
                assert not g.isnan().any(), (path, name)
                err = (g.float() - r.float()).abs().max().item()
                assert err <= 2**-7 * r.float().abs().max().item(), (path, name, cfg.gluon_split_waits, err)
            if cfg is row_stats:
                # One wait a step (2 and 3 slots), and persistent programs (one per SM, and 3
                # programs: many chunks each, both k/v buffer pairs, padding chunks between): the
                # same sums in the same order, so on the partial path the same bits.
                variants = [(f"one wait, {n} slots", dict(gluon_dkv_one_wait=True, gluon_dkv_stages=n))
                            for n in (2, 3)]  # fmt: skip
                persistent = dict(gluon_dkv_persistent=True)
                variants += [(f"persistent, {n or 'SM'} programs", persistent | dict(gluon_dkv_programs=n))
                             for n in (0, 3)]  # fmt: skip
                for label, change in variants:
                    got1 = triton_impl.bwd_dkv(
                        do, q, k, v, lse_ref, delta, idx, config=dataclasses.replace(row_stats, **change),
                        path=path, **opts,
                    )  # fmt: skip
                    for name, g1, g in zip(("dk", "dv"), got1, got):
                        err = (g1.float() - g.float()).abs().max().item()
                        assert err <= 2**-7 * g.float().abs().max().item(), (path, name, label, err)
                        if path == "partial":
                            assert torch.equal(g1, g), (name, label)
            if path == "partial":
                again_cfg = cfg if cfg is row_stats else gluon
                again = triton_impl.bwd_dkv(
                    do, q, k, v, lse_ref, delta, idx, config=again_cfg, path=path, **opts
                )
                assert all(torch.equal(a, b) for a, b in zip(got, again))

    # dq inside the Gluon dk/dv kernel (``fused_dq``: dS k per step, added by TMA reductions) against
    # the dq kernel; dk, dv as the Triton kernels'. Rows before ``start`` receive only zeros.
    ref = triton_impl.bwd_dkv(do, q, k, v, lse_ref, delta, idx, config=base, path="atomic", **opts)
    for cfg in (gluon, row_stats, dataclasses.replace(row_stats, gluon_dq_early=True)):
        dq32 = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
        fused = dataclasses.replace(cfg, fused_dq=True)
        got = triton_impl.bwd_dkv(
            do, q, k, v, lse_ref, delta, idx, config=fused, path="atomic", dq32=dq32, **opts
        )
        assert (dq32[:, :start] == 0).all() and not dq32.isnan().any()
        dq32 *= opts["scale"]  # the kernels add dS k; ms_attn_bwd applies the scale once
        err = (dq32[:, start:] - dq_ref[:, start:].float()).abs().max().item()
        bound = 2**-7 * dq_ref[:, start:].float().abs().max().item()
        assert err <= bound, ("fused dq", cfg, err)
        for name, g, r in zip(("dk", "dv"), got, ref):
            err = (g.float() - r.float()).abs().max().item()
            assert err <= 2**-7 * r.float().abs().max().item(), ("fused", name, cfg, err)

    # The fused dq finished by a dq kernel (``fused_dq_finish``): the dk/dv kernels add the selected
    # keys' dS k (the own-segment kernel none), then the Triton or the Gluon dq kernel runs over the
    # own segment only and adds the buffer, scaled and cast once.
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    fused = dataclasses.replace(row_stats, fused_dq=True)
    got = triton_impl.bwd_dkv(
        do, q, k, v, lse_ref, delta, idx, config=fused, path="atomic", dq32=dq32, own_dq=False, **opts
    )
    for name, g, r in zip(("dk", "dv"), got, ref):
        err = (g.float() - r.float()).abs().max().item()
        assert err <= 2**-7 * r.float().abs().max().item(), ("fused, own dq left out", name, err)
    for dq_cfg in (base, gluon):
        finished = triton_impl.bwd_dq(do, q, k, v, lse_ref, delta, idx, config=dq_cfg, dq32=dq32, **opts)
        assert (finished[:, :start] == 0).all() and not finished[:, start:].isnan().any()
        err = (finished[:, start:].float() - dq_ref[:, start:].float()).abs().max().item()
        bound = 2**-7 * dq_ref[:, start:].float().abs().max().item()
        assert err <= bound, ("finished dq", dq_cfg.dq_gluon, err)


# The fused selection at real sizes. Integer inputs (w a power of two, so every representative
# and score is exact in float32 whatever the summation order) must give ms_select_torch's
# indices exactly, ties included; random bf16 inputs may swap near-tied regions through float32
# rounding (cuBLAS and tl.dot sum in different orders), so there the selected sets must agree
# almost everywhere.
GPU_SELECT_CASES = [
    ("L8200-paper-head-gqa4", (1, 8200, 8, 2, 128), 16, 64, 8, "mean", "head", "paper"),
    ("L8192-causal-group-gqa4", (1, 8192, 8, 2, 128), 16, 64, 8, "mean", "group", "causal"),
    ("L33000-paper-settings-attn", (1, 33000, 4, 1, 128), 16, 512, 64, "attn", "head", "paper"),
    ("L20000-sparse-causal", (1, 20000, 4, 4, 64), 64, 64, 8, "mean", "head", "causal"),
]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU tests use compiled kernels")
@pytest.mark.parametrize(
    "shape, region, budget, merge, pool, scope, select",
    [c[1:] for c in GPU_SELECT_CASES],
    ids=[c[0] for c in GPU_SELECT_CASES],
)
def test_gpu_select_matches_torch(shape, region, budget, merge, pool, scope, select):
    B, L, Hq, Hkv, D = shape
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    gen = torch.Generator(device="cuda").manual_seed(12)
    q = torch.randint(-2, 3, (B, L, Hq, D), generator=gen, device="cuda").bfloat16()
    k = torch.randint(-2, 3, (B, L, Hkv, D), generator=gen, device="cuda").bfloat16()
    # ms_select_torch's sort-free path against its stable sort: CUDA's topk and sort, ties.
    want = ms_select_torch(q, k, method="sort", **opts)
    assert torch.equal(ms_select_torch(q, k, **opts), want)
    if pool == "mean":
        got = triton_impl.ms_select_triton(q, k, **opts)
        assert torch.equal(got.long(), want)
        assert torch.equal(triton_impl.ms_select_shallow(q, k, **opts).long(), want)
        for steps in (4, 64):  # the second pass by bit masks, on ties
            masked = dataclasses.replace(triton_impl.GPU_CONFIG, shallow_mask_steps=steps)
            assert torch.equal(triton_impl.ms_select_shallow(q, k, config=masked, **opts).long(), want)
    q, k = torch.randn_like(q.float()).bfloat16(), torch.randn_like(k.float()).bfloat16()
    got = triton_impl.ms_select_triton(q, k, **opts).long()
    ieee = dataclasses.replace(triton_impl.GPU_CONFIG, select_precision="ieee", shallow_rescore=False)
    shallow, redone, _ = triton_impl.select_shallow_counted(q, k, config=ieee, **opts)
    # The same float32 scores (tl.dot, ieee) as the full-depth kernel: the same indices.
    assert torch.equal(shallow.long(), got), f"{redone} items redone"
    # The default (a tf32 search, re-scored): the same indices too, with the second pass by
    # prefix sums or by bit masks (expanded every 4 or 64 steps).
    assert torch.equal(triton_impl.ms_select_shallow(q, k, **opts).long(), got)
    for steps in (0, 4, 64):
        masked = dataclasses.replace(triton_impl.GPU_CONFIG, shallow_mask_steps=steps)
        got_masked, redone_masked, _ = triton_impl.select_shallow_counted(q, k, config=masked, **opts)
        assert torch.equal(got_masked.long(), got), f"mask steps {steps}: {redone_masked} items redone"
    want = ms_select_torch(q, k, **opts)
    assert torch.equal(want, ms_select_torch(q, k, method="sort", **opts))
    # The contract for rounded scores: the float64 selection on every separated block.
    separated = exact.separated_blocks(q, k, **opts)
    reference = ms_select_torch(q.double(), k.double(), **opts)
    for name, idx in (("fused", got), ("torch", want)):
        differs = ~(idx == reference).all(-1)
        assert not (differs & separated).any(), (
            f"{name}: {(differs & separated).sum()} separated blocks differ"
        )
    # The shallow selection with tf32x3 dots: the contract with tf32x3's product error.
    fast = triton_impl.ms_select_shallow(
        q, k, config=dataclasses.replace(ieee, select_precision="tf32x3"), **opts
    ).long()
    separated_tf32x3 = exact.separated_blocks(q, k, precision="tf32x3", **opts)
    differs = ~(fast == reference).all(-1)
    assert not (differs & separated_tf32x3).any(), f"tf32x3: {(differs & separated_tf32x3).sum()} differ"
    # tf32x3 search, float32 ranking: the float32 contract (the same separated blocks as above).
    rescored = triton_impl.ms_select_shallow(
        q, k, config=dataclasses.replace(
            triton_impl.GPU_CONFIG, select_precision="tf32x3", shallow_rescore=True
        ), **opts
    ).long()  # fmt: skip
    differs = ~(rescored == reference).all(-1)
    assert not (differs & separated).any(), f"tf32x3 + rescore: {(differs & separated).sum()} differ"
    # Re-scored as the ieee dot sums (one FMA per column, in order): the exact selection's own
    # indices, bit for bit, whichever tensor-core precision searched.
    assert torch.equal(rescored, shallow.long()), "tf32x3 + rescore differs from the ieee selection"
    n = -(-L // region)
    member = torch.zeros(*want.shape[:3], n, dtype=torch.int32, device="cuda")
    member.scatter_add_(-1, got, torch.ones_like(got, dtype=torch.int32))
    member.scatter_add_(-1, want, torch.ones_like(want, dtype=torch.int32))
    overlap = (member == 2).sum(-1).float() / want.shape[-1]  # [B, Hs, G]
    assert overlap.mean() >= 0.99 and overlap.min() >= 0.9, (overlap.mean(), overlap.min())


def _compile_for_h100(fn, sig: dict, consts: dict, divisible=(), source=None, **options):
    """``fn`` compiled for an H100 (sm_90: PTX and cubin) with the installed Triton, without a
    GPU: ``sig`` its runtime arguments' types in order, ``consts`` its constexprs (``source``: the
    source class, Gluon's for a Gluon kernel); skips where
    this Triton build has no CUDA backend with ptxas. As a launch specializes them: every pointer
    and the integers named in ``divisible`` are known multiples of 16. That decides whether loads
    are vectorized and pipelined, hence the shared memory a kernel needs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build has no CUDA backend with ptxas")
    attrs = {  # by the argument's place in the kernel's signature (sig may list them in any order)
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in sig.items()
        if kind.startswith("*") or name in divisible
    }
    source = (source or ASTSource)(
        fn=fn, signature=sig | dict.fromkeys(consts, "constexpr"), constexprs=consts, attrs=attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize(
    "kernel, mode",
    [("sel", "atomic"), ("sel", "partial"), ("sel", "fused"), ("sel", "whole"), ("dkv", "fused"),
     ("dkv", "reverse-fused"), ("dkv", "whole"), ("dkv", "tma"), ("dkv", "tma-ws"), ("reduce", 16),
     ("reduce", 3)],
    ids=["sel-atomic", "sel-partial", "sel-fused-dq", "sel-whole-rows", "dkv-fused-dq",
         "dkv-reverse-fused-dq", "dkv-whole-rows", "dkv-tma", "dkv-tma-ws", "reduce-w16", "reduce-w3"],
)  # fmt: skip
def test_dkv_kernels_compile_for_h100(kernel, mode):
    """The dk/dv kernels compile for an H100 (sm_90: PTX and cubin) without a GPU, with the
    installed Triton: the atomic one emits relaxed reductions, the partial one plain stores and
    no atomics; with dq fused in (``fused_dq``), both the selected keys' kernel and the key
    tiles' kernel add dq by relaxed reductions; with whole rows (``whole_dkv``) too, both
    without register spills, in the card's shared memory; on TMA descriptors (``dkv_tma``) the
    key tiles' kernel loads by ``cp.async.bulk.tensor``, and with ``dkv_ws`` Triton's Hopper pass
    splits it into producer and consumer partitions (``ttg.warp_specialize``)."""
    from ctxlab.kernels.ms_attention import triton_kernels as tk

    def ptr(t):
        return "*" + t

    gpu = triton_impl.GPU_CONFIG
    options = dict(num_warps=4, num_stages=2)
    fused = mode in ("fused", "reverse-fused")
    tma = str(mode).startswith("tma")
    whole = mode == "whole" or tma
    if kernel == "sel":
        fn = tk.ms_attn_bwd_dkv_sel_kernel
        sig = {name: ptr("bf16") for name in ("Q", "K", "V", "DO")}
        sig |= {name: ptr("fp32") for name in ("DK32", "DV32", "DQ32", "LSE", "DELTA")}
        sig |= dict(IDX=ptr("i32"), COS=ptr("fp32"), SIN=ptr("fp32"))
        sig |= {name: "i32" for name in ("L", "P", "W", "M", "S", "G", "n_chunks", "g0", "window", "q_start")}
        sig |= dict(qk_scale="fp32", scale="fp32")
        consts = dict(HQ=32, HKV=8, HS=32, HEAD_DIM=128, BLOCK_H=64, BLOCK_D=128, ROPE=not (fused or whole),
                      PARTIAL=mode == "partial", QROT=mode == "partial", FUSED_DQ=fused, WHOLE=whole,
                      BLOCK_M=gpu.sel_block_m, BLOCK_N=gpu.sel_block_n)  # fmt: skip
        options = dict(num_warps=gpu.sel_warps, num_stages=gpu.sel_stages)
    elif kernel == "dkv":
        fn = tk.ms_attn_bwd_dkv_kernel
        sig = {name: ptr("bf16") for name in ("Q", "K", "V", "DO", "DK", "DV")}
        sig |= {name: ptr("fp32") for name in ("DK32", "DV32", "DQ32", "LSE", "DELTA", "COS", "SIN")}
        sig |= {name: ptr("i32") for name in ("ORDER", "ENT_OFF", "ENT_G", "ENT_RANK")}
        sig |= {name: "i32" for name in ("L", "P", "W", "M", "S", "R", "n_tiles", "n_pre_tiles",
                                         "tiles_per_block", "q_start")}  # fmt: skip
        sig |= dict(qk_scale="fp32", scale="fp32")
        consts = dict(HQ=32, HKV=8, HS=32, HEAD_DIM=128, BLOCK_H=64, BLOCK_D=128, ROPE=False,
                      SELECTED=mode not in ("fused", "tma-ws"), QROT=False, FUSED_DQ=fused, WHOLE=whole,
                      BLOCK_M=gpu.dkv_block_m, BLOCK_N=gpu.dkv_block_n)  # fmt: skip
        options = dict(num_warps=gpu.dkv_warps, num_stages=gpu.dkv_stages)
        if tma:  # the descriptors' types: [1, rows, D] blocks of bf16
            for name, rows in (("QD", gpu.dkv_block_m), ("DOD", gpu.dkv_block_m), ("KD", gpu.dkv_block_n),
                               ("VD", gpu.dkv_block_n)):  # fmt: skip
                sig[name] = f"tensordesc<bf16[1,{rows},128]>"
            consts["WS"] = mode == "tma-ws"
        else:  # as a launch without descriptors passes them: None, constexpr
            consts |= dict(QD=None, DOD=None, KD=None, VD=None, WS=False)
    else:
        fn = tk.ms_attn_bwd_dkv_reduce_kernel
        sig = {name: ptr("fp32") for name in ("PDK", "PDV", "DK32", "DV32")}
        sig |= dict(OFFSETS=ptr("i64"), SRC=ptr("i64"), L="i32", W="i32", n="i32")
        consts = dict(HKV=8, HEAD_DIM=128, BLOCK_W=triton.next_power_of_2(mode), BLOCK_D=128)
    compiled = _compile_for_h100(fn, sig, consts, **options)
    ptx = compiled.asm["ptx"]
    atomics = re.findall(r"\b(?:red|atom)\.[\w.]+", ptx)  # PTX reductions and atomics
    if mode == "atomic" or fused:
        assert atomics and all(".relaxed." in a for a in atomics), set(atomics)
    if mode == "partial" or (kernel == "dkv" and not fused):
        assert atomics == []
    if fused or whole:
        assert ".local" not in ptx  # no register spills
        assert compiled.metadata.shared <= H100_SHARED_BYTES, compiled.metadata.shared
    if tma:
        assert "cp.async.bulk.tensor" in ptx
        assert ("ttg.warp_specialize" in compiled.asm["ttgir"]) == (mode == "tma-ws")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize(
    "precision, rescore, cols, mask_steps",
    [("ieee", False, 1, 0), ("tf32", True, 1, 0), ("tf32", True, 4, 0), ("tf32", True, 4, 16)],
)
def test_shallow_selection_compiles_for_h100(precision, rescore, cols, mask_steps):
    """The shallow selection kernel compiles for an H100 (sm_90) without a GPU, with the installed
    Triton, at the paper's shape: the ieee search, and the tf32 search with each re-scoring (whose
    four-column variant splits its loads in registers), and with the second pass's bit masks,
    whose step then needs no scan in shared memory."""
    sig = dict(QREP="*fp32", KREP="*fp32", OUT="*i32", FLAG="*i32", LIST="*i64", TOPK="*i32",
               SEEN="*i32", MASKS="*i64", QNORM="*fp32", KMAX="*fp32", ITEMS="*i32", COUNT="*i32",
               score_err="fp32")  # fmt: skip
    sig |= dict.fromkeys(("n", "G", "T", "M", "S", "n_bhs", "n_items"), "i32")
    consts = dict(HS=32, HKV=8, HEAD_DIM=128, BLOCK_D=128, CAUSAL=False, HAS_ITEMS=False, RM=64,
                  K=32, CAP=128, BLOCK_J=64, SORT_ROWS=4, PREC=precision, RESCORE=rescore, RESCORE_COLS=cols,
                  FAULT=False, KV_MAJOR=cols == 4, MASK_STEPS=mask_steps)  # fmt: skip
    options, variants = dict(num_warps=8), [consts]
    if mask_steps:  # the GPU default: 4 warps, 2 stages (two programs per SM), 16 of 64 per row,
        # and the retry over the flagged items (32 of 128)
        gpu = triton_impl.GPU_CONFIG
        assert gpu.shallow_mask_steps == mask_steps and gpu.shallow_retry_k
        options = dict(num_warps=gpu.shallow_warps, num_stages=gpu.shallow_stages)
        variants = [
            consts | dict(K=gpu.shallow_k, CAP=gpu.shallow_cap),
            consts | dict(K=gpu.shallow_retry_k, CAP=gpu.shallow_retry_cap, HAS_ITEMS=True),
        ]
    for variant in variants:
        compiled = _compile_for_h100(tk.ms_select_shallow_kernel, sig, variant, ("n",), **options)
        ptx = compiled.asm["ptx"]
        assert ("mma" in ptx) == (precision != "ieee")  # tensor cores for tf32 only
        assert ".local" not in ptx  # no register spills
        assert compiled.metadata.shared <= H100_SHARED_BYTES, compiled.metadata.shared


H100_SHARED_BYTES = 232448  # per block, sm_90 (the H100's and the H200's opt-in limit)


def _sass_instructions(compiled) -> int:
    """Machine instructions (sm_90 SASS, by the cuobjdump of Triton's CUDA backend) of a kernel
    compiled by ``_compile_for_h100``: what runs, where PTX still holds one ``div`` for ptxas's
    long division sequence."""
    return len(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+\S", _sass(compiled), re.M))


def _sass(compiled) -> str:
    """The sm_90 SASS text of a kernel compiled by ``_compile_for_h100`` (Triton's cuobjdump)."""
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton build has no cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return sass


def _compile_attention_for_h100(kernel: str, cfg, rope: bool):
    """The forward (``kernel="fwd"``) or dq kernel compiled for sm_90 with ``cfg``'s launch
    settings at the paper's 128K shape in bf16, D = 128 (pointers and the lengths specialized
    as multiples of 16, as at launch: their loads pipelined; stages and ``REGION`` as the launch
    takes them from ``cfg``)."""
    # the kernels' pointer arguments, in order
    tensors = ("Q", "K", "V", "O", "LSE") if kernel == "fwd" else ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA")
    sig = {name: "*fp32" if name in ("LSE", "DELTA") else "*bf16" for name in tensors}
    sig |= dict(IDX="*i32", COS="*fp32", SIN="*fp32")
    sig |= dict.fromkeys(("L", "P", "W", "M", "S", "G", "n_pre_tiles", "tiles_per_block", "q_start",
                          "first_tile"), "i32")  # fmt: skip
    sig |= dict.fromkeys(("qk_scale",) if kernel == "fwd" else ("qk_scale", "scale"), "fp32")
    consts = dict(HQ=32, HKV=8, HS=32, HEAD_DIM=128, BLOCK_H=64, BLOCK_D=128, ROPE=rope,
                  WHOLE=cfg.whole_qk and not rope, BLOCK_M=getattr(cfg, f"{kernel}_block_m"),
                  BLOCK_N=cfg.key_step(kernel, rope), REGION=cfg.region_const(kernel, rope, 16))  # fmt: skip
    fn = tk.ms_attn_fwd_kernel if kernel == "fwd" else tk.ms_attn_bwd_dq_kernel
    if kernel == "dq":
        consts["DQ32"] = None  # not finishing a fused dq
    options = dict(num_warps=getattr(cfg, f"{kernel}_warps"), num_stages=cfg.stages(kernel, rope))
    # paper settings at 128K: L, P = 8192, W = 16, M = 64, S = 448, 64 prefix tiles, from row 0
    divisible = ("L", "P", "W", "M", "S", "n_pre_tiles", "q_start", "first_tile")
    return _compile_for_h100(fn, sig, consts, divisible, **options)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize("kernel", ["fwd", "dq"])
@pytest.mark.parametrize("rope", [False, True], ids=["pre", "rope"])
def test_attention_kernels_fit_an_h100_with_gpu_defaults(kernel, rope):
    """Forward and dq compile for sm_90 with the GPU launch config (tiles, warps, stages, the key
    step under RoPE, whole-row scores) within an H100's shared memory and without spills, with
    the installed Triton. The GPU tests remain the judge (the GPU image runs another Triton)."""
    compiled = _compile_attention_for_h100(kernel, triton_impl.GPU_CONFIG, rope)
    assert compiled.metadata.shared <= H100_SHARED_BYTES, compiled.metadata.shared
    assert ".local" not in compiled.asm["ptx"]  # no register spills


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize("kernel", ["fwd", "dq"])
def test_region_constexpr_drops_the_integer_divisions(kernel):
    """Compiled for sm_90 at the paper's shape (w = 16): with the region size a constant
    (``region_constexpr``) the selected-key steps' integer divisions are gone (at most the
    tile's own, per program, remain) and the kernel is shorter; with it at run time every step
    divides (Triton 3.6: 64 ``div.s32`` in the forward, 48 in dq)."""
    runtime = _compile_attention_for_h100(
        kernel, dataclasses.replace(triton_impl.GPU_CONFIG, region_constexpr=False), False
    )
    const = _compile_attention_for_h100(
        kernel, dataclasses.replace(triton_impl.GPU_CONFIG, region_constexpr=True), False
    )
    divisions = [len(re.findall(r"\b(?:div|rem)\.s32", c.asm["ptx"])) for c in (runtime, const)]
    assert divisions[0] >= 16 and divisions[1] <= 2, divisions

    counts = [_sass_instructions(c) for c in (runtime, const)]
    assert counts[1] < 0.95 * counts[0], counts
    assert const.metadata.shared <= H100_SHARED_BYTES and ".local" not in const.asm["ptx"]


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize("kernel", ["fwd", "dq"])
def test_gpu_defaults_keep_wgmma_async(kernel):
    """Compiled for sm_90 with the GPU launch config at the paper's shape (w = 16), forward and
    dq keep their wgmma asynchronous: at most one wait per four HGMMA. When ptxas serializes them
    (C7515), each HGMMA gets its own wait: Triton 3.6 did so to the forward with the region size
    compiled in at 3 stages, which is why GPU_CONFIG runs it at 2 (session 13). The installed
    Triton compiles here; the GPU image's may differ (kernels/README.md names how to check it)."""
    sass = _sass(_compile_attention_for_h100(kernel, triton_impl.GPU_CONFIG, False))
    hgmma, waits = sass.count("HGMMA"), sass.count("WARPGROUP.DEPBAR")
    assert hgmma >= 4 * waits > 0, (hgmma, waits)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize(
    "kernel, block_n, stages",
    [
        ("fwd", 128, 2),
        ("fwd", 64, 4),
        ("fwd-overlap", 128, 2),
        ("fwd-overlap", 128, 3),
        ("fwd-pingpong", 128, 3),
        ("dq", 128, 2),
        ("dq", 64, 3),
        ("dkv", 128, 2),
        ("dkv-partial", 128, 3),
        ("dq-split", 128, 2),
        ("dkv-split", 128, 2),
        ("dkv-fused", 128, 2),
        ("dkv-fused-rows", 128, 2),
        ("dkv-fused-early", 128, 2),
        ("dkv-rows", 128, 2),
        ("dkv-onewait", 128, 3),
        ("dkv-persistent", 128, 2),
        ("dq-finish", 128, 2),
    ],
)
def test_gluon_kernels_compile_for_h100(kernel, block_n, stages):
    """The Gluon forward, dq and dk/dv of the selected keys compile for sm_90 without a GPU, with
    the installed Triton, at the paper's shape: the load partition copies by ``cp.async`` and
    arrives on the slots' mbarriers when the copies land, the partitions move registers
    (``setmaxnreg``), the consumers' wgmma stay asynchronous (at most one wait per four HGMMA:
    the forward's and dq's steps wait once per GEMM pair, dk/dv's twice per four GEMMs of 24 HGMMA)
    and the buffers fit an H100's shared memory; dk/dv adds its sums with relaxed reductions
    (``RED``, no ``ATOM``) or, with ``PARTIAL``, stores them; with ``gluon_split_waits`` (the
    ``-split`` cases) a wait leaves one GEMM group in flight; with ``FUSED_DQ`` (``-fused``) dk/dv
    also adds dq by TMA reductions (``UTMAREDG``, no per-element ``ATOM``), five GEMMs a step, and
    writes dS^T with matrix stores from the registers dk's GEMM reads, with no select or multiply
    more than the kernel without dq; with
    ``ROW_STATS`` (``-rows``) the loads copy lse and delta too; with ``DQ_EARLY`` (``-early``) the
    dq GEMM joins dv's and dk's wait (four waits per five GEMMs' 32 HGMMA, not six); with
    ``OVERLAP`` (``fwd-overlap``, three slots fit too) the forward issues p v (wgmma reading p from
    registers) behind the next step's scores and waits with p v still in flight; with ``ONE_WAIT``
    (``dkv-onewait``) dk/dv's steps wait once with S^T in flight, no wgmma serialized; with
    ``DQ32`` (``dq-finish``, ``fused_dq_finish``) dq runs the own segment's steps only (the
    selected keys' loops compiled out: half the HGMMA) and adds the float32 buffer's rows."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from ctxlab.kernels.ms_attention import gluon_kernels

    common = dict(HQ=32, HKV=8, HS=32, HEAD_DIM=128, STAGES=stages,
                  LOAD_WARPS=triton_impl.GPU_CONFIG.gluon_load_warps, LOAD_REGS=triton_impl.GLUON_LOAD_REGS,
                  CONSUMER_REGS=triton_impl.GLUON_CONSUMER_REGS)  # fmt: skip
    split = kernel.endswith("-split")
    early = kernel.endswith("-early")  # gluon_dq_early (with row stats): dq issued behind dv, dk
    one_wait = kernel.endswith("-onewait")  # gluon_dkv_one_wait (with row stats)
    persistent = kernel.endswith("-persistent")  # gluon_dkv_persistent (row stats, its own kernel)
    finish = kernel.endswith("-finish")  # fused_dq_finish: dq over the own segment, plus DQ32
    rows = kernel.endswith("-rows") or early or one_wait  # gluon_dkv_row_stats: lse, delta through the ring
    pingpong = kernel.endswith("-pingpong")  # gluon_fwd_pingpong (with the overlap)
    overlap = kernel.endswith("-overlap") or pingpong  # gluon_fwd_overlap
    suffixes = ("-split", "-rows", "-early", "-overlap", "-pingpong", "-onewait", "-persistent", "-finish")
    for suffix in suffixes:
        kernel = kernel.removesuffix(suffix)
    if kernel == "fwd":
        common |= dict(OVERLAP=overlap, PINGPONG=pingpong)
    elif not persistent:
        common |= dict(SPLIT_WAITS=split)
    if kernel.startswith("dkv"):
        tensors = ("Q", "K", "V", "DO", "DK32", "DV32", "LSE", "DELTA")
        ints = ("L", "P", "W", "M", "S", "G", "n_chunks", "g0", "window", "q_start")
        divisible = ("L", "P", "W", "M", "S", "q_start")
        consts = common | dict(BLOCK_M=triton_impl.GLUON_DKV_BLOCK_M, PARTIAL=kernel == "dkv-partial")
        if persistent:  # its items' count and their count per (batch row, head) come first
            ints = ("n_items", "n_rel", *ints)
            fn = gluon_kernels.ms_attn_bwd_dkv_sel_persistent_kernel
        else:
            consts |= dict(FUSED_DQ=kernel == "dkv-fused", ROW_STATS=rows, DQ_EARLY=early, ONE_WAIT=one_wait)
            fn = gluon_kernels.ms_attn_bwd_dkv_sel_ws_kernel
    else:
        tensors = (
            ("Q", "K", "V", "O", "LSE") if kernel == "fwd" else ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA")
        )
        ints = ("L", "P", "W", "M", "S", "G", "n_pre_tiles", "tiles_per_block", "q_start", "first_tile")
        consts = common | dict(BLOCK_N=block_n)
        fn = (
            gluon_kernels.ms_attn_fwd_ws_kernel if kernel == "fwd" else gluon_kernels.ms_attn_bwd_dq_ws_kernel
        )
        divisible = ("L", "P", "W", "M", "S", "n_pre_tiles", "q_start", "first_tile")
    sig = {name: "*fp32" if name in ("LSE", "DELTA", "DK32", "DV32") else "*bf16" for name in tensors}
    sig |= dict(IDX="*i32")
    if kernel.startswith("dkv") and not persistent:  # dq's TMA descriptor, None without FUSED_DQ
        layout = gl.NVMMASharedLayout.get_default_for([triton_impl.GLUON_DKV_BLOCK_M, 64], gl.float32)
        if consts["FUSED_DQ"]:
            sig["DQD"] = f"tensordesc<fp32[{triton_impl.GLUON_DKV_BLOCK_M},64],{layout!r}>"
        else:
            sig["DQD"] = "constexpr"
            consts["DQD"] = None
    sig |= dict.fromkeys(ints, "i32")
    sig |= dict.fromkeys(("qk_scale",) if kernel == "fwd" else ("qk_scale", "scale"), "fp32")
    if kernel == "dq":
        if finish:
            sig["DQ32"] = "*fp32"
        else:
            consts["DQ32"] = None

    def compile_(sig, consts):
        return _compile_for_h100(
            fn, sig, consts | dict(REGION=16, num_warps=4), divisible, source=GluonASTSource, num_warps=4,
            maxnreg=triton_impl.GLUON_MAXNREG,
        )  # fmt: skip

    compiled = compile_(sig, consts)
    ptx, sass = compiled.asm["ptx"], _sass(compiled)
    assert "cp.async.mbarrier.arrive.noinc" in ptx and "setmaxnreg" in ptx
    hgmma, waits = sass.count("HGMMA"), sass.count("WARPGROUP.DEPBAR")
    assert hgmma >= 4 * waits > 0, (hgmma, waits)
    assert "LDGSTS" in sass and compiled.metadata.shared <= H100_SHARED_BYTES
    if kernel == "dkv":
        assert "RED" in sass and "ATOM" not in sass and "UTMAREDG" not in sass
    elif kernel == "dkv-fused":
        assert "UTMAREDG.2D.ADD" in sass and "ATOM" not in sass and hgmma == 64, hgmma
        assert waits == (4 if early else 6), waits
        # dS^T goes to shared memory (STSM) as converted for dk. dq adds no select and no multiply
        # to the kernel without it: the padding places' zeroing is a branch taken only by chunks
        # holding padding (in registers it cost 32 FSEL a thread a step), and dq goes unscaled
        # (scaling each step's tile cost 32 FMUL).
        assert "STSM" in sass
        without = consts | dict(FUSED_DQ=False, DQ_EARLY=False, DQD=None)
        alone = _sass(compile_(sig | dict(DQD="constexpr"), without))
        for op in (r"\bFSEL\b", r"\bFMUL\b"):
            assert len(re.findall(op, sass)) == len(re.findall(op, alone)), op
    elif kernel == "dkv-partial":
        assert "RED" not in sass and "ATOM" not in sass
    elif kernel == "dq":
        # dq over every key (the selected keys' two loops, the own segment's two) or, finishing a
        # fused dq, over the own segment's only: the selected keys' loops are compiled out.
        plain = {name: kind for name, kind in sig.items() if name != "DQ32"}
        whole = _sass(compile_(plain, consts | dict(DQ32=None))) if finish else sass
        assert whole.count("HGMMA") == (2 * hgmma if finish else hgmma), (hgmma, whole.count("HGMMA"))
    # gluon_split_waits: a wait that leaves one GEMM group in flight (dP while P is formed); the
    # forward's overlap: the group left in flight is p v (A from registers), issued after the scores.
    assert ("WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass) == (split or overlap or one_wait)
    if persistent:
        # The keys come by cp.async from the load partition (the consumers' plain loads of the
        # one-shot kernel are gone: no LDG of k, v rows), two pairs of k/v buffers and the ring
        # fit, and the sums go out by relaxed reductions; the steps wait twice for four GEMMs.
        assert "RED" in sass and "ATOM" not in sass and waits == 4 and hgmma == 48, (waits, hgmma)
        assert compiled.metadata.shared >= 4 * 2 * 64 * 128 * 2  # k and v, two pairs of 2 x 64 rows
        assert "LDG.E.128" not in sass, "the consumers load no k, v rows themselves"
    # one wait a step: no wgmma serialized for lack of registers (a wait after each of the 96 HGMMA)
    if one_wait:
        assert waits == 8 and "STL" not in sass.split("WARPGROUP.DEPBAR.LE gsb0, 0x1")[0][-4000:], waits
    if kernel == "fwd":
        events = re.findall(r"HGMMA\.\S+ R\d+, (R\d+|gdesc)|WARPGROUP\.DEPBAR\.LE gsb0, (0x\d)", sass)
        order = ["pv" if a.startswith("R") else "qk" if a else f"wait{b[-1]}" for a, b in events]
        pairs = {(order[i - 1], order[i]) for i in range(1, len(order)) if order[i - 1] != order[i]}
        assert (("pv", "wait1") in pairs) == overlap and (("qk", "pv") in pairs) == overlap, pairs


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
def test_h100_guard_sees_the_launch_the_h200_refused():
    """The guard above has teeth: dq under RoPE with 128-key steps and two stages, the launch an
    H200 refused in session 8 (263 KB of shared memory under Triton 3.6), compiles here to more
    than an H100 has (263,168 bytes under Triton 3.9)."""
    cfg = dataclasses.replace(
        triton_impl.GPU_CONFIG, dq_block_n=128, dq_stages=2, dq_warps=8, rope_block_n=128
    )
    assert _compile_attention_for_h100("dq", cfg, rope=True).metadata.shared > H100_SHARED_BYTES


def test_gluon_kernels_apply_only_where_they_compile():
    """``fwd_gluon`` and ``dq_gluon`` check their tiles when the config is built, and the launch
    takes a Gluon kernel only without RoPE on the fly, on a CUDA tensor of a Hopper GPU: elsewhere
    (here: CPU tensors, the interpreter) the Triton kernel runs."""
    with pytest.raises(ValueError, match="fwd_gluon=True needs fwd_block_m=128"):
        dataclasses.replace(triton_impl.GPU_CONFIG, fwd_gluon=True, fwd_block_m=64, fwd_block_n=64)
    with pytest.raises(ValueError, match="dq_gluon=True needs dq_block_m=128"):
        dataclasses.replace(triton_impl.GPU_CONFIG, dq_gluon=True, gluon_dq_block_n=32)
    with pytest.raises(ValueError, match="gluon_load_warps"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_load_warps=3)
    with pytest.raises(ValueError, match="gluon_dkv_stages"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_stages=0)
    with pytest.raises(ValueError, match="gluon_fwd_overlap=True needs gluon_stages >= 2.*gluon_stages=1"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_fwd_overlap=True, gluon_stages=1)
    with pytest.raises(ValueError, match="gluon_fwd_pingpong=True needs gluon_fwd_overlap=True"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_fwd_pingpong=True)
    with pytest.raises(ValueError, match="gluon_dkv_one_wait=True needs gluon_dkv_row_stats=True.*got False"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_one_wait=True, gluon_dkv_row_stats=False)
    with pytest.raises(ValueError, match="gluon_dkv_one_wait=True needs .*gluon_split_waits=False"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_one_wait=True, gluon_split_waits=True)
    # One wait yields to dq inside (the fused kernel has its own schedule), as persistent does.
    dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_one_wait=True, fused_dq=True)
    for regs in (224, 236, 248):
        with pytest.raises(ValueError, match=f"gluon_dkv_fused_regs must be 0 .*232 or 240, got {regs}"):
            dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_fused_regs=regs)
    with pytest.raises(ValueError, match="fused_dq_min_block must be an int >= 0, got -1"):
        dataclasses.replace(triton_impl.GPU_CONFIG, fused_dq_min_block=-1)
    # The persistent dk/dv has the default schedule with row stats only: asked for another schedule
    # (or dq inside), the one-shot kernel runs it.
    persistent = dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_persistent=True)
    assert triton_impl.dkv_persistent_applies(persistent, fused=False)
    assert not triton_impl.dkv_persistent_applies(persistent, fused=True)
    for change in (
        dict(gluon_dkv_row_stats=False), dict(gluon_dkv_one_wait=True), dict(gluon_split_waits=True),
        dict(gluon_dkv_persistent=False),
    ):  # fmt: skip
        assert not triton_impl.dkv_persistent_applies(dataclasses.replace(persistent, **change), fused=False)
    with pytest.raises(ValueError, match="gluon_dkv_programs must be an int >= 0.*got -1"):
        dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_programs=-1)
    for regs in (224, 236, 248):  # setmaxnreg: multiples of 8; 504 - 2 * regs left to the loads
        with pytest.raises(ValueError, match=f"gluon_dkv_consumer_regs must be 232 or 240, got {regs}"):
            dataclasses.replace(triton_impl.GPU_CONFIG, gluon_dkv_consumer_regs=regs)
    cfg = dataclasses.replace(triton_impl.GPU_CONFIG, fwd_gluon=True)
    q = torch.zeros(1, 16, 2, 128, dtype=torch.bfloat16)
    assert not triton_impl.gluon_applies(cfg, False, q)  # a CPU tensor
    assert not triton_impl.gluon_applies(dataclasses.replace(cfg, dq_gluon=True), False, q, "dq")
    assert not triton_impl.gluon_applies(dataclasses.replace(cfg, dkv_gluon=True), False, q, "dkv")
    assert not triton_impl.gluon_applies(dataclasses.replace(cfg, fwd_gluon=False), False, q)


def test_bench_launch_overrides_and_summary():
    """The benchmark's op strings set launch fields of any type, ``triton_det`` is the
    deterministic mode, and the summary row divides by the bound (dense x pair fraction)."""
    from ctxlab.kernels.bench import ops, run
    from ctxlab.kernels.bench.cases import registry

    case = registry(**run.PRESETS["cpu"])["tiny-L61-kv1-head-pre"]
    idx = torch.zeros(1, 2, 1, 2, dtype=torch.long)
    fn = ops.build("triton:dkv_path=partial+dkv_partial_gib=0.5+sel_warps=8", case, idx)
    assert (fn.config.dkv_path, fn.config.dkv_partial_gib, fn.config.sel_warps) == ("partial", 0.5, 8)
    assert ops.build("triton_det", case, idx).config.deterministic is True
    assert ops.build("triton:deterministic=true", case, idx).config.deterministic is True
    rows = [
        dict(case="c", op="dense", L=61, status="ok", **{"fwd+bwd_ms": 10.0}),
        dict(case="c", op="triton", L=61, status="ok", computed_pair_fraction=0.25,
             configured_select="shallow", shallow_select_ms=0.5, select_ms=3.0, torch_select_ms=1.0,
             torch_sort_select_ms=2.0, **{"fwd+bwd_ms": 4.0}),
        dict(case="c", op="triton_det", L=61, status="ok", **{"fwd+bwd_ms": 5.0}),
        dict(case="c", op="s2", L=61, status="ok", **{"fwd+bwd_ms": 7.5}),
    ]  # fmt: skip
    line = run.summary(rows, {61: rows[0]})[-1]
    assert (
        line == "| c | 10.0 | 7.5 | - | 4.0 | 5.0 | 0.5 / 3.0 / 1.0 / 2.0 | 4.5 | 2.5 | 1.80 | 2.22 | 1.67 |"
    )
    rows[1]["configured_select"] = "torch"  # 'ours + sel' adds the configured selection's time
    line = run.summary(rows, {61: rows[0]})[-1]
    assert (
        line == "| c | 10.0 | 7.5 | - | 4.0 | 5.0 | 0.5 / 3.0 / 1.0 / 2.0 | 5.0 | 2.5 | 2.00 | 2.00 | 1.50 |"
    )


@pytest.mark.skipif(INTERPRETED, reason="starts its own interpreted process")
def test_bench_runs_positions_on_the_selected_tokens(tmp_path):
    """``--pe selected`` times ours with RoPE applied on the fly (the paper's pre-training): the
    CPU smoke run of the benchmark checks it against its float32 reference, and an op that
    implements pe="pre" only (gather) is recorded as an error naming that, not run wrongly."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "ctxlab.kernels.bench.run", "--preset", "cpu", "--device", "cpu",
           "--ops", "gather,triton,dense", "--pe", "selected", "--out", str(tmp_path),
           "--stem", "pe"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "pe.json").read_text())
    assert saved["meta"]["launch_config"] == dataclasses.asdict(triton_impl.INTERPRETER_CONFIG)
    rows = {r["op"]: r for r in saved["rows"]}
    assert {r["case"] for r in rows.values()} == {"tiny-L61-kv1-head-selected"}
    assert rows["triton"]["status"] == "ok" and rows["triton"]["errors"]["o_tail"] < 1e-4
    # every stage of ours, the whole backward as the launch config runs it last
    assert list(rows["triton"]["parts_ms"]) == ["fwd", "dq", "dkv", "dkv_partial", "dkv_reverse", "bwd"]
    assert rows["gather"]["status"] == "error: ValueError: the gather baseline implements pe='pre' only"
    assert rows["dense"]["status"] == "ok"


@pytest.mark.skipif(INTERPRETED, reason="starts its own interpreted process")
def test_stage_sweep_checks_and_times_each_variant(tmp_path):
    """The stage sweep's CPU smoke run: every variant's forward, dq and whole backward are checked
    against the first variant's (whole-row scores, another key step and dq fused into the dk/dv
    kernels agree to float32 rounding) and timed, rows written as they finish; a variant that is
    no valid launch config is refused by name before any work."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "ctxlab.kernels.bench.stage_sweep", "--device", "cpu", "--lengths", "61",
           "--setting", "tiny", "--stages", "fwd,dq,bwd", "--out", str(tmp_path), "--stem", "sw"]  # fmt: skip
    variants = ["base", "whole_qk=true", "fwd_block_n=8", "fused_dq=true"]
    proc = subprocess.run(cmd + ["--variants", ";".join(variants)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "sw.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == variants
    for row in rows:
        assert row["status"] == "ok" and set(row["stages"]) == {"fwd", "dq", "bwd"}
        for entry in row["stages"].values():
            assert entry["status"] == "ok" and entry["max_rel_err"] < 1e-5 and entry["ms"] > 0
    assert "| tiny-L61 | `whole_qk=true` |" in (tmp_path / "sw.md").read_text()
    bad = subprocess.run(cmd + ["--variants", "base;fwd_block_m=8", "--stem", "bad"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "--variants 'fwd_block_m=8'" in bad.stderr
    assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.skipif(INTERPRETED, reason="starts its own interpreted process")
def test_profile_stage_runs_each_stage_on_cpu():
    """``experiments/gpu/profile_stage.py`` (the launch Nsight Compute catches) runs every stage it
    offers on CPU, dk/dv with dq inside (``dkvdq``) and the whole backward (``bwd``) among them, and
    refuses a bad launch setting by name before any work."""
    script = pathlib.Path(__file__).parents[1] / "experiments" / "gpu" / "profile_stage.py"
    env = os.environ | {"TRITON_INTERPRET": "1"}
    base = [sys.executable, str(script), "--device", "cpu", "--setting", "tiny", "--length", "61"]
    for stage in ("fwd", "dq", "dkv", "dkvdq", "bwd"):
        proc = subprocess.run(base + ["--stage", stage], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"profile_stage: tiny-L61 {stage} ran twice" in proc.stdout
    bad = subprocess.run(base + ["--launch", "no_such_field=1"], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "--launch" in bad.stderr and "no_such_field" in bad.stderr
    bad = subprocess.run(base + ["--kv-heads", "7"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--kv-heads" in bad.stderr


def test_stage_sweep_pick_merges_each_sweeps_fastest_variant(tmp_path):
    """``--pick``: per sweep the variant with the least total over stages and lengths, counting
    only variants checked and timed at every length reached; the picks of two sweeps (disjoint
    fields) merge into one --launch string."""
    from ctxlab.kernels.bench.stage_sweep import pick, picked_launch

    def row(variant, L, ms, status="ok"):
        return dict(variant=variant, L=L, status="ok", stages={"fwd": dict(status=status, ms=ms)})

    fwd = [row("base", 1, 10), row("whole_qk=true", 1, 8), row("fwd_stages=3", 1, 1, "failed check"),
           row("base", 2, 10), row("whole_qk=true", 2, 9), row("fwd_stages=3", 2, 1)]  # fmt: skip
    assert pick(fwd) == "whole_qk=true"  # the faster total is checked at every length
    assert pick([row("base", 1, 10), row("fwd_stages=3", 1, 5), row("base", 2, 10)]) == "base"  # missed L=2
    dkv = [row("base", 1, 10), row("sel_block_m=32+sel_stages=3", 1, 9)]
    for name, rows in (("fwd", fwd), ("dkv", dkv)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    paths = [str(tmp_path / "fwd.json"), str(tmp_path / "dkv.json")]
    assert picked_launch(paths) == "whole_qk=true+sel_block_m=32+sel_stages=3"


def test_select_probe_table_shows_time_redone_items_and_disagreement():
    """The selection probe's Markdown table: a line per variant (torch's first, in the order the
    rows name them), a column per case; a cell flags redone items, rows unlike torch's and
    errors, and a variant missing from a case is '-'."""
    from ctxlab.kernels.bench.select_probe import table

    rows = [
        dict(length="128K", setting="paper", kv=8, torch_ms=154.0, torch_sort_ms=211.8, shallow_ms=15.2,
             shallow_redone=0, shallow_same_rows=1.0, **{"shallow+shallow_mask_steps=16_ms": 10.56,
             "shallow+shallow_mask_steps=16_redone": 3, "shallow+shallow_mask_steps=16_same_rows": 0.99}),
        dict(length="256K", setting="sparse", kv=8, torch_ms=39.5, torch_sort_ms=38.2, shallow_ms=14.4,
             shallow_error="LaunchResourceError: needs 263168 of shared memory"),
    ]  # fmt: skip
    lines = table(rows).splitlines()
    assert lines[0] == "| variant | 128K paper kv8 | 256K sparse kv8 |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| torch", "| torch_sort", "| shallow", "| shallow+shallow_mask_steps=16"
    ]  # fmt: skip
    assert lines[4] == "| shallow | 15.20 | error: LaunchResourceError: needs 263168 of shared memory |"
    assert lines[5] == "| shallow+shallow_mask_steps=16 | 10.56 (r 3) (rows 0.9900) | - |"


@pytest.mark.parametrize("L, Hq, Hkv", [(256, 4, 2), (512, 8, 2), (384, 6, 6)], ids=["gqa2", "gqa4", "mha"])
def test_bench_s2_is_longlora_s2_and_its_reference_checks_it(L, Hq, Hkv):
    """The benchmark's S2 op computes ``ctxlab.attention.s2.s2_attention`` with LongLoRA's wrap
    at G = L/4, and the benchmark's float32 reference of the probed rows (each head half's own
    window of keys) agrees with it, while dense attention's rows do not pass as S2."""
    from ctxlab.attention.s2 import s2_attention
    from ctxlab.kernels.bench import ops, run
    from ctxlab.kernels.bench.cases import Case

    case = Case("s2-test", L, Hkv, "paper", Hq=Hq, D=16)
    gen = torch.Generator().manual_seed(L + Hq)
    q, k, v = (torch.randn(1, L, h, 16, generator=gen) for h in (Hq, Hkv, Hkv))
    out = ops.build("s2", case, torch.zeros(1))(q, k, v)
    torch.testing.assert_close(out, s2_attention(q, k, v, group=L // 4, wrap=True), rtol=1e-5, atol=1e-5)
    start, end = run.probe_rows(case, "s2")
    assert (start, end) == (L - L // 4, L - L // 8)
    ref = run.reference_tail(case, q, k, v, None, "s2")
    assert run.rel_err(out[:, start:end], ref) < 1e-5
    dense = run.reference_tail(case, q, k, v, None, "dense")  # the last 256 rows
    assert run.rel_err(dense[:, -(L - start) :][:, : end - start], ref) > 1e-2
    assert case.s2_pairs() == Hq * 4 * (L // 4) * (L // 4 + 1) // 2


@pytest.mark.parametrize("rope", [False, True], ids=["pre", "rope"])
def test_forward_launch_stages_and_region_by_rope(monkeypatch, rope):
    """The GPU defaults launch the forward with the region size compiled in and ``fwd_stages``
    without RoPE on the fly, and with w at run time and ``rope_fwd_stages`` under it (there the
    constant cost 6-13% and 2 stages 15-20%, session 13); ``rope_fwd_stages`` is checked."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(kwargs)

    monkeypatch.setattr(tk, "ms_attn_fwd_kernel", Recorder())
    monkeypatch.setattr(triton_impl, "interpreted", lambda: True)
    cfg = dataclasses.replace(triton_impl.GPU_CONFIG, fwd_stages=2, rope_fwd_stages=3)
    q = torch.zeros(1, 64, 2, 32)
    idx = triton_impl.sort_selection(torch.zeros(1, 2, 1, 2, dtype=torch.long))
    triton_impl.ms_attn_fwd(q, q, q, idx, region=16, budget=3, merge=1, rope=rope,
                            inv_freq=rope_inv_freq(32, 100.0), scale=0.2, config=cfg)  # fmt: skip
    assert (seen["REGION"], seen["num_stages"]) == ((0, 3) if rope else (16, 2))
    with pytest.raises(ValueError, match="rope_fwd_stages must be >= 1, got 0"):
        dataclasses.replace(cfg, rope_fwd_stages=0)


def test_selection_kernels_do_not_compile_again_for_new_counts():
    """The selection kernels' item counts are loop bounds only. Triton specializes an int argument
    on being 1 or a multiple of 16, which for a count buys nothing and compiles another kernel per
    case (before the retry read its count on the device, a training step could meet a new case and
    compile mid-step); the counts (``SELECT_COUNTS``) are left unspecialized, the shapes are not."""
    assert tk.SELECT_COUNTS == ("n_items",)
    for kernel in (tk.ms_select_kernel, tk.ms_select_shallow_kernel):
        if INTERPRETED:  # the interpreter keeps the decorator's arguments and never specializes
            assert tuple(kernel.kwargs["do_not_specialize"]) == tk.SELECT_COUNTS
            continue
        params = {p.name: p for p in kernel.params}
        assert all(params[name].do_not_specialize for name in tk.SELECT_COUNTS)
        assert not params["n"].do_not_specialize and not params["G"].do_not_specialize
