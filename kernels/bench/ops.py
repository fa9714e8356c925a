"""The attention implementations the benchmark compares, all on BTHD tensors.

Shapes: q [B, L, Hq, D], k, v [B, L, Hkv, D], idx [B, Hs, G, S] (S = T - m selected regions
per block, Hs = Hq for scope="head"), outputs [B, L, Hq, D].

- ``dense``: causal SDPA (the flash backend), the dense baseline. It is timed with k and v
  already repeated to Hq heads, so its cost is that of the attention kernel alone.
- ``gather``: the paper's approach: gather every block's selected K/V (plus its own tokens)
  into a copy, then one masked SDPA call over all blocks (plus a causal SDPA for the prefix).
- ``flex``: FlexAttention (compiled) with a BlockMask built from the same selection.
- ``triton``: ours, ``ms_attend_triton`` (the GPU launch config: dk/dv of the selected keys
  by relaxed atomics at w=16, by the reverse index when w is a multiple of the key tile).
- ``s2``: LongLoRA's shifted sparse attention (S2-Attn with its wrap-around roll, G = L/4), the
  baseline MS must beat: the first half of the heads attend causally inside groups of G tokens,
  the other half inside groups shifted by G/2, each group one flash SDPA call. The same function
  as ``ctxlab.attention.s2.s2_attention(wrap=True)`` (tests compare them), written here because
  the kernels layer imports nothing from ``src``.
- ``triton_det``: ours in deterministic mode (``LaunchConfig.deterministic``: bitwise-identical
  gradients run to run; partial sums and a fixed-order reduction at w=16).
Each builder returns ``fn(q, k, v) -> o`` with the selection bound in. ``gather`` and ``flex``
implement ``pe="pre"`` only (RoPE already in q and k). An op of another attention function
lives in its own folder (``kernels/<op>/bench.py``, registered here through ``_elsewhere``); its
``fn`` carries ``reference(q, k, v, start)`` and ``pairs``, which the runner checks and counts
with (``run.check_and_time``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ms_attention import triton_impl
from ..ms_attention.triton_impl import ms_attend_triton, sort_selection
from ..rope import rope_inv_freq
from .cases import Case


def _blocks_view(x: Tensor, case: Case, G: int) -> Tensor:
    """Tokens from the prefix end on, padded to G whole blocks: [B, G, m*w, H, D]."""
    B, L, H, D = x.shape
    P, mw = case.budget * case.region, case.merge * case.region
    x = F.pad(x, (0, 0, 0, 0, 0, P + G * mw - L))
    return x[:, P:].view(B, G, mw, H, D)


def dense(case: Case, idx: Tensor):
    def fn(q, k, v):
        rep = q.shape[2] // k.shape[2]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return o.transpose(1, 2)

    return fn


def s2(case: Case, idx: Tensor):
    G = case.s2_group()
    if G < 2 or case.L % G or case.Hq % 2 or case.Hkv % 2:
        raise ValueError(f"s2 needs L % (L/4) == 0 and even head counts, got {case}")

    def in_groups(q, k, v):  # [B, L, h, D] -> causal attention inside groups of G tokens
        B, L, h, D = q.shape

        def grouped(x):  # [B*n, h, G, D]
            return x.reshape(B * (L // G), G, x.shape[2], D).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            grouped(q), grouped(k), grouped(v), is_causal=True, enable_gqa=k.shape[2] != h
        )
        return o.transpose(1, 2).reshape(B, L, h, D)

    def fn(q, k, v):
        h0, kv0, shift = q.shape[2] // 2, k.shape[2] // 2, G // 2
        first = in_groups(q[:, :, :h0], k[:, :, :kv0], v[:, :, :kv0])
        rolled = [x[:, :, cut:].roll(-shift, dims=1) for x, cut in ((q, h0), (k, kv0), (v, kv0))]
        return torch.cat([first, in_groups(*rolled).roll(shift, dims=1)], dim=2)

    return fn


def gather(case: Case, idx: Tensor):
    """Paper-style: materialise each block's key set, then dense attention with a mask."""
    if case.pe != "pre":
        raise ValueError("the gather baseline implements pe='pre' only")
    B, Hs, G, S = idx.shape
    w, T, m = case.region, case.budget, case.merge
    mw, P = m * w, T * w
    dev = idx.device
    if (idx < 0).any():
        raise ValueError("the gather baseline needs a full selection (no -1 entries)")
    idx_s = sort_selection(idx).long()
    sel_tok = (idx_s[..., None] * w + torch.arange(w, device=dev)).flatten(-2)
    # One [m*w, T*w] mask serves every block and head: selected keys all visible, own causal.
    keep = torch.cat(
        [
            torch.ones(mw, S * w, dtype=torch.bool, device=dev),
            torch.ones(mw, mw, dtype=torch.bool, device=dev).tril(),
        ],
        -1,
    )

    def fn(q, k, v):
        L, Hq, Hkv = q.shape[1], q.shape[2], k.shape[2]
        rep_s, rep_kv = Hq // Hs, Hq // Hkv
        pre = F.scaled_dot_product_attention(
            q[:, :P].transpose(1, 2),
            k[:, :P].repeat_interleave(rep_kv, 2).transpose(1, 2),
            v[:, :P].repeat_interleave(rep_kv, 2).transpose(1, 2),
            is_causal=True,
        ).transpose(1, 2)
        if G == 0:
            return pre
        kv_head = torch.arange(Hs, device=dev) // (Hs // Hkv)
        b_ix = torch.arange(B, device=dev)[:, None, None, None]
        h_ix = kv_head[None, :, None, None]

        def keys(x):  # [B, Hs, G, T*w, D]: selected tokens, then the block's own
            x_t = x.transpose(1, 2)
            sel = x_t[b_ix, h_ix, sel_tok]
            own = _blocks_view(x, case, G)[:, :, :, kv_head].permute(0, 3, 1, 2, 4)
            return torch.cat([sel, own], 3).repeat_interleave(rep_s, 1)

        qb = _blocks_view(q, case, G).permute(0, 1, 3, 2, 4)  # [B, G, Hq, mw, D]
        kb = keys(k).transpose(1, 2)  # [B, G, Hq, T*w, D]
        vb = keys(v).transpose(1, 2)
        D = q.shape[-1]
        o = F.scaled_dot_product_attention(
            qb.reshape(B * G, Hq, mw, D),
            kb.reshape(B * G, Hq, -1, D),
            vb.reshape(B * G, Hq, -1, D),
            attn_mask=keep,
        )
        o = o.view(B, G, Hq, mw, D).permute(0, 1, 3, 2, 4).reshape(B, G * mw, Hq, D)
        return torch.cat([pre, o[:, : L - P]], 1)

    return fn


def flex(case: Case, idx: Tensor, block: int = 128):
    """FlexAttention over the same pattern: kv blocks listed per q block from the selection,
    the exact token mask applied inside them by ``mask_mod``."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if case.pe != "pre":
        raise ValueError("the flex baseline implements pe='pre' only")
    B, Hs, G, S = idx.shape
    w, T, m = case.region, case.budget, case.merge
    L, Hq, P = case.L, case.Hq, T * w
    dev = idx.device
    n = -(-L // w)
    nb = -(-L // block)
    if P % block or (m * w) % block:
        raise ValueError("flex needs the prefix and the blocks to be whole multiples of its block")
    region_sel = torch.zeros(B, Hs, max(G, 1), n, dtype=torch.bool, device=dev)
    if G:
        region_sel.scatter_(-1, idx.long().clamp_min(0), (idx >= 0))
    head_sel = torch.arange(Hq, device=dev) // (Hq // Hs)

    # Block-level mask [B, Hq, nb, nb]: any selected region in a kv block, or causal own part.
    qb = torch.arange(nb, device=dev)
    q_tok = qb * block
    g_of = torch.clamp((q_tok // w - T) // m, min=0)
    own_lo = torch.where(q_tok < P, 0, (T + g_of * m) * w) // block
    causal = (qb[None, :] <= qb[:, None]) & (qb[None, :] >= own_lo[:, None])  # [nb, nb]
    kv_of_region = torch.arange(n, device=dev) * w // block
    sel_blocks = torch.zeros(B, Hs, max(G, 1), nb, dtype=torch.int32, device=dev)
    sel_blocks.index_add_(3, kv_of_region, region_sel.to(torch.int32))
    block_sel = sel_blocks[:, head_sel][:, :, g_of] > 0  # [B, Hq, nb, nb]
    block_sel &= (q_tok >= P)[None, None, :, None]
    dense_mask = causal[None, None] | block_sel
    kv_num = dense_mask.sum(-1).to(torch.int32)
    kv_idx = torch.argsort((~dense_mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    def mask_mod(b, h, q_i, kv_i):
        g = torch.clamp((q_i // w - T) // m, min=0)
        own = (kv_i >= (T + g * m) * w) & (kv_i <= q_i)
        sel = region_sel[b, head_sel[h], torch.clamp(g, max=max(G, 1) - 1), kv_i // w]
        return torch.where(q_i < P, kv_i <= q_i, own | sel)

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(L, L))
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        o = compiled(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=mask,
            enable_gqa=Hq != k.shape[2],
        )
        return o.transpose(1, 2)

    return fn


def triton(case: Case, idx: Tensor, **overrides):
    """Ours. ``overrides`` replace fields of the GPU launch config; the runner installs it
    (``launch_config``) around forward and backward alike."""
    opts = dict(region=case.region, budget=case.budget, merge=case.merge, pe=case.pe)

    def fn(q, k, v):
        return ms_attend_triton(q, k, v, idx, scale=case.D**-0.5, **opts)

    fn.config = dataclasses.replace(triton_impl.GPU_CONFIG, **overrides)
    return fn


def triton_det(case: Case, idx: Tensor, **overrides):
    """Ours, deterministic mode (any other launch overrides as for ``triton``)."""
    return triton(case, idx, **{"deterministic": True, **overrides})


@contextlib.contextmanager
def launch_config(fn):
    """Make ``fn.config`` (if any) the GPU launch config while the block runs."""
    config = getattr(fn, "config", None)
    if config is None:
        yield
        return
    saved, triton_impl.GPU_CONFIG = triton_impl.GPU_CONFIG, config
    try:
        yield
    finally:
        triton_impl.GPU_CONFIG = saved


def stage_opts(case: Case, device) -> dict:
    """The keyword arguments every stage launcher of ours (``ms_attn_fwd``, ``bwd_dq``,
    ``bwd_dkv``) takes for ``case``: its setting, RoPE on the fly for pe="selected", the scale."""
    return dict(region=case.region, budget=case.budget, merge=case.merge, rope=case.pe != "pre",
                inv_freq=rope_inv_freq(case.D, 10000.0, device).double(), scale=case.D**-0.5)  # fmt: skip


def triton_parts(case: Case, idx: Tensor, q, k, v, do, config, time_fn) -> dict[str, float]:
    """Milliseconds of each stage of ours: forward, dq (with delta), and dk/dv by each path:
    ``dkv`` relaxed atomics, ``dkv_partial`` partial sums + fixed-order reduction and
    ``dkv_reverse`` the reverse index (both deterministic; their index construction included);
    then ``bwd``, the whole backward as ``ms_attn_bwd`` runs it with ``config`` (delta included):
    where ``fused_dq`` applies, dq is summed inside dk/dv and finished by the dq kernel over the
    own segment, so ``bwd`` is then less than dq + dkv."""
    idx_sorted = sort_selection(idx)
    opts = stage_opts(case, q.device)
    o, lse = triton_impl.ms_attn_fwd(q, k, v, idx_sorted, config=config, **opts)
    delta = triton_impl.bwd_preprocess(o, do)
    parts = {
        "fwd": time_fn(lambda: triton_impl.ms_attn_fwd(q, k, v, idx_sorted, config=config, **opts)),
        "dq": time_fn(
            lambda: triton_impl.bwd_dq(
                do, q, k, v, lse, triton_impl.bwd_preprocess(o, do), idx_sorted, config=config,
                **opts,
            )
        ),
    }  # fmt: skip
    for path in ("atomic", "partial", "reverse"):
        parts["dkv" if path == "atomic" else f"dkv_{path}"] = time_fn(
            lambda path=path: triton_impl.bwd_dkv(
                do, q, k, v, lse, delta, idx_sorted, config=config, path=path, **opts
            )
        )
    parts["bwd"] = time_fn(
        lambda: triton_impl.ms_attn_bwd(do, q, k, v, o, lse, idx_sorted, config=config, **opts)
    )
    return parts


def _elsewhere(module: str, name: str):
    """The builder ``name`` of ``module`` (an op of another folder, ``kernels/<op>/bench.py``),
    imported when first built."""

    def build(case: Case, idx: Tensor, **overrides):
        return getattr(importlib.import_module(module, __package__), name)(case, idx, **overrides)

    return build


OPS = {
    "dense": dense,
    "s2": s2,
    "gather": gather,
    "flex": flex,
    "triton": triton,
    "triton_det": triton_det,
    "moba": _elsewhere("..moba.bench", "moba"),
}


def _value(text: str):
    """A launch override's value: an int, a float, true/false, or else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def launch_fields(spec: str) -> dict:
    """'+'-joined ``KEY=VALUE`` LaunchConfig settings -> a dict, each key checked against the
    fields (a ValueError names an unknown one, or an item without '=')."""
    from ..ms_attention.triton_impl import LaunchConfig

    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    out = {}
    for item in (x for x in spec.split("+") if x):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"launch setting {item!r} is not KEY=VALUE")
        if key not in known:
            raise ValueError(
                f"launch setting {key!r} is not a LaunchConfig field ({', '.join(sorted(known))})"
            )
        out[key] = _value(value)
    return out


def build(op: str, case: Case, idx: Tensor):
    """``op`` is a key of OPS, optionally with launch overrides joined by "+":
    ``triton:sel_block_n=128+sel_warps=8``, ``triton:dkv_path=partial``."""
    name, _, spec = op.partition(":")
    overrides = {k: _value(v) for k, v in (item.split("=") for item in spec.split("+") if item)}
    return OPS[name](case, idx, **overrides)
