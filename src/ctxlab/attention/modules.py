"""Attention cores: the part of a layer that maps (q, k, v) to outputs.

Shapes: q ``[B, L, H, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), output ``[B, L, H, D]``.
With a cache, q/k/v are the new tokens only and queries sit at positions ``P .. P+L-1``
after the ``P`` cached tokens.

Every core exposes ``causal`` (what the configuration promises; the causality audit checks it
empirically) and ``describe()`` for result tables.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxlab.attention.cache import LayerCache
from ctxlab.attention.selection import ms_attend, ms_selection
from ctxlab.kernels.ms_attention import ms_attention_torch, ms_select, validate_ms_args
from ctxlab.kernels.ms_attention.interface import check_tensors as check_ms_tensors

DECODE_MODES = ("auto", "dense", "sparse")


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


class DenseAttention(nn.Module):
    """Full causal attention through PyTorch SDPA (flash/memory-efficient kernels on a GPU)."""

    causal = True

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        if cache is not None:
            k, v, _ = cache.append(k, v)
        return dense_attention(q, k, v, scale=self.scale)

    def describe(self) -> str:
        return "dense"


class MSAttention(nn.Module):
    """MS (merge and select) attention, ``ctxlab.attention.ms_attention``, as a layer core.

    Training and full-sequence evaluation run ``ms_attention`` on the whole sequence. With a KV
    cache (chunked evaluation, generation):

    - a chunk of several new tokens (prefill) runs the MS schedule for those query positions
      over the cached history (``select="causal"``: exactly the full forward; ``select="paper"``:
      blocks cut by a chunk boundary see only their rows so far);
    - one new token (decoding) runs ``decode="dense"`` (full attention over the cache, what the
      paper does at inference) or ``decode="sparse"`` (the MS schedule for that position: with
      ``select="causal"`` exactly what a full forward gives; with ``select="paper"`` the block's
      selection uses only the part of the block decoded so far, unlike training).
      ``decode="auto"`` is sparse when positions are applied inside attention (``pe="selected"``,
      since dense decoding has no re-indexed positions) and dense otherwise.
    """

    def __init__(
        self,
        *,
        region: int = 16,
        budget: int = 512,
        merge: int = 64,
        pool: str = "mean",
        scope: str = "head",
        select: str = "paper",
        decode: str = "auto",
        backend: str = "auto",
        scale: float | None = None,
    ) -> None:
        super().__init__()
        validate_ms_args(
            region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select, backend=backend,
            scale=scale,
        )  # fmt: skip
        if decode not in DECODE_MODES:
            raise ValueError(f"attention.decode must be one of {DECODE_MODES}, got {decode!r}")
        self.region, self.budget, self.merge = region, budget, merge
        self.pool, self.scope, self.select = pool, scope, select
        self.decode, self.backend, self.scale = decode, backend, scale
        self.pe = "pre"
        self.rope_base = 10000.0
        self.record_selection = False
        self.last_selection: Tensor | None = None

    @property
    def causal(self) -> bool:
        return self.select == "causal"

    def configure_position(self, position) -> None:
        """Called by the model: RoPE inside attention when the scheme asks for it."""
        if position.applies_in_attention:
            if self.decode == "dense":
                raise ValueError(
                    "attention.decode=dense cannot be combined with position=selected: dense "
                    "decoding has no re-indexed positions; use attention.decode=sparse or auto"
                )
            self.pe, self.rope_base = "selected", float(position.rope_base)

    @property
    def select_kwargs(self) -> dict:
        """The arguments of ``ms_select``."""
        return dict(
            region=self.region, budget=self.budget, merge=self.merge, pool=self.pool,
            scope=self.scope, select=self.select,
        )  # fmt: skip

    @property
    def ms_kwargs(self) -> dict:
        """The arguments of ``ms_attention`` (selection plus positions and scale)."""
        return self.select_kwargs | dict(pe=self.pe, rope_base=self.rope_base, scale=self.scale)

    @property
    def sparse_decode(self) -> bool:
        return self.decode == "sparse" or (self.decode == "auto" and self.pe == "selected")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        if cache is None:
            if self.record_selection:
                with torch.no_grad():
                    self.last_selection = ms_select(q.detach(), k.detach(), **self.select_kwargs)
            # Selection, then attention: checkpointing can keep the selection (attention.selection).
            check_ms_tensors(q, k, v, pe=self.pe)
            with torch.no_grad():
                idx = ms_selection(q.detach(), k.detach(), **self.select_kwargs, backend=self.backend)
            return ms_attend(
                q, k, v, idx, region=self.region, budget=self.budget, merge=self.merge, scope=self.scope,
                pe=self.pe, rope_base=self.rope_base, scale=self.scale, backend=self.backend,
            )  # fmt: skip
        start = cache.length
        if q.shape[1] == 1 and not self.sparse_decode:
            k_all, v_all, _ = cache.append(k, v, q)
            return dense_attention(q, k_all, v_all, scale=self.scale)
        k_all, v_all, q_all = cache.append(k, v, q)
        return ms_attention_torch(q_all, k_all, v_all, start=start, **self.ms_kwargs)

    def describe(self) -> str:
        return (
            f"ms(w={self.region},T={self.budget},m={self.merge},select={self.select},"
            f"pool={self.pool},scope={self.scope},pe={self.pe})"
        )


def ms_fraction_computed(L: int, region: int, budget: int, merge: int) -> float:
    """Fraction of the L(L+1)/2 causal query-key pairs that MS attention computes."""
    n = math.ceil(L / region)
    if n <= budget:
        return 1.0
    prefix = budget * region
    pairs = prefix * (prefix + 1) // 2
    s = budget
    while s < n:
        e = min(s + merge, n)
        q0, q1 = s * region, min(e * region, L)
        nq = q1 - q0
        pairs += nq * (budget - merge) * region + nq * (nq + 1) // 2
        s = e
    return pairs / (L * (L + 1) / 2)
