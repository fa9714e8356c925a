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
