"""MS attention as two steps, selection then attention, so activation checkpointing can keep the
selection.

Under gradient checkpointing every decoder layer runs its forward twice (once, then again in
the backward pass), and MS attention's selection with it; at 128K tokens the selection costs as
much as the attention (kernels/README.md). ``ms_selection`` is a ``torch.library`` custom op
(``ctxlab::ms_selection``), so a selective-checkpointing policy can name it: ``MSAttention``
lists it in ``checkpoint_saves``, and ``ctxlab.attention.base.checkpoint_kwargs`` makes the
recomputation reuse the indices of the first forward
(``[B, Hs, G, T-m]`` int64: 4 MiB per layer at 128K with paper settings) and recompute
everything else as before. The selection has no gradient, so values and gradients are unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ctxlab.kernels.ms_attention import ms_attend_torch, ms_select_torch
from ctxlab.kernels.ms_attention.interface import use_triton
from ctxlab.kernels.ms_attention.torch_impl import num_blocks

SELECTION_OP = "ctxlab::ms_selection"


@torch.library.custom_op(SELECTION_OP, mutates_args=())
def ms_selection(
    q: Tensor, k: Tensor, region: int, budget: int, merge: int, pool: str, scope: str, select: str,
    backend: str,
) -> Tensor:  # fmt: skip
    """``ms_select``'s indices (int64 ``[B, Hs, G, T-m]``) by the backend's selection: the Triton
    launch config's choice (``LaunchConfig.select_impl``) on CUDA, else ``ms_select_torch``."""
    opts = dict(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    if use_triton(q, backend):
        from ctxlab.kernels.ms_attention.triton_impl import ms_select_configured

        return ms_select_configured(q, k, **opts).long()
    return ms_select_torch(q, k, **opts).long()


@ms_selection.register_fake
def _(q, k, region, budget, merge, pool, scope, select, backend):
    B, L, Hq = q.shape[:3]
    heads = Hq if scope == "head" else k.shape[2]
    return q.new_empty((B, heads, num_blocks(L, region, budget, merge), budget - merge), dtype=torch.long)


def ms_attend(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, *, region: int, budget: int, merge: int, scope: str,
    pe: str, inv_freq: Tensor | None, scale: float | None, backend: str,
) -> Tensor:  # fmt: skip
    """Attention given ``ms_selection``'s indices, by the Triton kernels on CUDA (backend auto or
    triton) or the PyTorch path; differentiable in q, k, v. ``inv_freq``: ``pe="selected"``'s
    rotary inverse frequencies ``[D/2]`` (the position scheme's)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    opts = dict(region=region, budget=budget, merge=merge, pe=pe, inv_freq=inv_freq, scale=scale)
    if use_triton(q, backend):
        from ctxlab.kernels.ms_attention.triton_impl import ms_attend_triton

        return ms_attend_triton(q, k, v, idx, **opts)
    return ms_attend_torch(q, k, v, idx, scope=scope, **opts)


def ms_attend_rows(
    q: Tensor, q_all: Tensor, k: Tensor, v: Tensor, idx: Tensor, *, spans: tuple[tuple[int, int], ...],
    region: int, budget: int, merge: int, scope: str, pe: str, inv_freq: Tensor | None, scale: float | None,
    backend: str,
) -> Tensor:  # fmt: skip
    """``ms_attend``'s rows for the query runs ``spans`` only -> ``[B, R, Hq, D]``.

    q ``[B, R, Hq, D]``: the runs' rows concatenated (differentiable); q_all ``[B, L, Hq, D]``: the
    whole sequence's queries (detached), which fill the rows before a run that the kernels' layout
    needs and whose outputs are dropped; k, v ``[B, L, Hkv, D]`` the whole sequence; idx the whole
    sequence's selection. Given the selection, attention is causal, so a run ending at ``stop``
    needs the keys and the blocks of idx up to ``stop`` only. Either path computes each run from
    its start (``ms_attend_torch``'s / ``ms_attend_triton``'s ``start``): the run's rows and, on
    PyTorch, at most the rows of its first block before it; the Triton kernels skip the query
    tiles before the run and mask the rows of the one it starts in.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    opts = dict(region=region, budget=budget, merge=merge, pe=pe, inv_freq=inv_freq, scale=scale)
    offsets = [0]
    for start, stop in spans:
        offsets.append(offsets[-1] + stop - start)
    runs = [q[:, a:b] for a, b in zip(offsets, offsets[1:])]
    q_all = q_all.detach()
    if use_triton(q, backend):
        from ctxlab.kernels.ms_attention.triton_impl import ms_attend_triton as attend
    else:
        attend = functools.partial(ms_attend_torch, scope=scope)
    out = []
    for (start, stop), run in zip(spans, runs):
        q_upto = torch.cat([q_all[:, :start], run], dim=1)  # [B, stop, Hq, D]
        G = num_blocks(stop, region, budget, merge)
        out.append(attend(q_upto, k[:, :stop], v[:, :stop], idx[:, :, :G], start=start, **opts))
    return torch.cat(out, dim=1)
