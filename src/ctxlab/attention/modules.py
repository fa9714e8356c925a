"""Dense causal attention: the core every other one is compared with, and the SDPA helpers
sparse cores fall back to.

Shapes: q ``[B, L, H, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), output ``[B, L, H, D]``.
With a cache, q/k/v are the new tokens only and queries sit at positions ``P .. P+L-1``
after the ``P`` cached tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxlab.attention.base import AttentionCore, QueryRows
from ctxlab.attention.cache import LayerCache


def sdpa_keeps_gqa(q: Tensor, mask: Tensor | None) -> bool:
    """Whether SDPA can take grouped K/V (``enable_gqa``) for ``q`` without its math fallback.

    On CUDA only the flash kernel takes GQA, and it needs fp16/bf16 and no explicit mask; any
    other CUDA call with ``enable_gqa`` (a float32 evaluation, a chunk with a cache) falls back to
    the math path, which materialises the ``[B, H, Lq, Lk]`` scores (64 GiB at 32K). There the K/V
    heads are repeated instead, which the memory-efficient kernel takes (O(L) memory)."""
    return not q.is_cuda or (mask is None and q.dtype in (torch.float16, torch.bfloat16))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Causal SDPA where the ``Lq`` queries are the last ``Lq`` of the ``Lk`` keys' positions.

    GQA is handled without materialising repeated K/V where SDPA's fused kernels allow it
    (:func:`sdpa_keeps_gqa`), with repeated K/V heads elsewhere.
    """
    Lq, Lk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    if Lq == Lk:
        mask, causal = None, True
    elif Lq == 1:
        mask, causal = None, False
    else:
        qpos = torch.arange(Lk - Lq, Lk, device=q.device)[:, None]
        mask, causal = torch.arange(Lk, device=q.device)[None, :] <= qpos, False  # [Lq, Lk]
    return sdpa(qt, kt, vt, attn_mask=mask, is_causal=causal, scale=scale).transpose(1, 2)


def dense_rows(
    q: Tensor, k: Tensor, v: Tensor, spans: tuple[tuple[int, int], ...], *, scale: float | None = None
) -> Tensor:
    """Causal attention of the query runs ``spans`` (``(start, stop)`` positions; q ``[B, R, H, D]``
    their rows concatenated) over the keys ``k, v [B, L, Hkv, D]`` up to each run's end: SDPA with
    a lower-right causal mask (flash attention on CUDA, no ``[R, L]`` mask)."""
    from torch.nn.attention.bias import causal_lower_right

    group = q.shape[2] // k.shape[2]
    if group > 1:  # the lower-right causal kernels take no grouped K/V
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out, at = [], 0
    for start, stop in spans:
        q_run = q[:, at : at + stop - start].transpose(1, 2)  # [B, H, stop - start, D]
        kt, vt = k[:, :stop].transpose(1, 2), v[:, :stop].transpose(1, 2)  # [B, H, stop, D]
        mask = causal_lower_right(stop - start, stop)
        out.append(F.scaled_dot_product_attention(q_run, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2))
        at += stop - start
    return torch.cat(out, dim=1)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:  # fmt: skip
    """``F.scaled_dot_product_attention`` on ``[..., H, L, D]`` with ``Hkv`` dividing ``H``: grouped
    K/V where the fused kernels take them (:func:`sdpa_keeps_gqa`), repeated K/V heads elsewhere."""
    gqa = k.shape[-3] != q.shape[-3]
    if gqa and not sdpa_keeps_gqa(q, attn_mask):
        group = q.shape[-3] // k.shape[-3]
        k, v, gqa = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def check_scale(scale) -> None:
    """ValueError naming ``attention.scale`` unless it is None or a finite number > 0."""
    ok = scale is None or (
        not isinstance(scale, bool) and isinstance(scale, int | float) and 0 < scale < float("inf")
    )
    if not ok:
        raise ValueError(f"attention.scale must be None or a finite number > 0, got {scale!r}")


@dataclass(frozen=True, kw_only=True)
class DenseSettings:
    scale: float | None = None
    """Softmax scale, ``1/sqrt(D)`` when None."""

    def __post_init__(self) -> None:
        check_scale(self.scale)


class DenseAttention(AttentionCore):
    """Full causal attention through PyTorch SDPA (flash/memory-efficient kernels on a GPU)."""

    Settings = DenseSettings

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        if cache is not None:
            k, v, _ = cache.append(k, v)
        return dense_attention(q, k, v, scale=self.settings.scale)

    def attend_rows(self, q: Tensor, k: Tensor, v: Tensor, rows: QueryRows) -> Tensor:
        return dense_rows(q, k, v, rows.spans, scale=self.settings.scale)

    def describe(self) -> str:
        return "dense"
