"""MS (merge and select) attention, arXiv 2410.04211, as a layer core (``attention=ms``).

Shapes: q ``[B, L, H, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), output ``[B, L, H, D]``; the
selection is ``[B, Hs, G, T-m]`` (``docs/ms-attention-contract.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ctxlab.attention.base import AttentionCore, QueryRows
from ctxlab.attention.cache import LayerCache
from ctxlab.attention.modules import dense_attention
from ctxlab.attention.selection import SELECTION_OP, ms_attend, ms_attend_rows, ms_selection
from ctxlab.kernels.ms_attention import ms_attention_torch, ms_select, validate_ms_args
from ctxlab.kernels.ms_attention.interface import check_tensors as check_ms_tensors
from ctxlab.kernels.ms_attention.torch_impl import ms_pair_count

DECODE_MODES = ("auto", "dense", "sparse")


@dataclass(frozen=True, kw_only=True)
class MSSettings:
    """MS attention's settings (``cfg/attention/ms.yaml``), validated when built."""

    region: int = 16
    """w: tokens per region."""
    budget: int = 512
    """T: key regions every merged query block attends to, its own regions included."""
    merge: int = 64
    """m: consecutive query regions merged into one block, ``1 <= m < T``."""
    pool: str = "mean"
    """Region representative: ``mean`` or ``attn`` (the paper's compressed token)."""
    scope: str = "head"
    """Selection per query head (``head``) or per kv head (``group``)."""
    select: str = "paper"
    """``paper`` (not causal: a block's own queries vote) or ``causal``."""
    decode: str = "auto"
    """After an MS prefill: ``dense`` over the cache (the paper), ``sparse`` or ``auto``."""
    backend: str = "auto"
    """``torch``, ``triton`` or ``auto`` (Triton on a GPU)."""
    scale: float | None = None
    """Softmax scale, ``1/sqrt(D)`` when None."""

    def __post_init__(self) -> None:
        try:
            validate_ms_args(
                region=self.region, budget=self.budget, merge=self.merge, pool=self.pool, scope=self.scope,
                select=self.select, backend=self.backend, scale=self.scale,
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"attention.{e}") from None
        if self.decode not in DECODE_MODES:
            raise ValueError(f"attention.decode must be one of {DECODE_MODES}, got {self.decode!r}")

    @property
    def select_kwargs(self) -> dict:
        """The arguments of ``ms_select``."""
        return dict(
            region=self.region, budget=self.budget, merge=self.merge, pool=self.pool, scope=self.scope,
            select=self.select,
        )  # fmt: skip


class MSAttention(AttentionCore):
    """MS attention (``ctxlab.attention.ms_attention``) as a layer core.

    Training and full-sequence evaluation run selection, then attention, on the whole sequence.
    With a KV cache (chunked evaluation, generation):

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

    Settings = MSSettings
    applies_positions = True
    checkpoint_saves = (SELECTION_OP,)
    records_selection = True

    def __init__(self, settings: MSSettings | None = None, /, **fields) -> None:
        super().__init__(settings, **fields)
        self.pe = "pre"
        self._position: list = []  # the scheme it rotates with (pe="selected"); not a child
        self.last_selection: Tensor | None = None

    @property
    def causal(self) -> bool:
        return self.settings.select == "causal"

    def configure_position(self, position) -> None:
        """Rotate inside attention, by the scheme's frequencies, when the scheme asks for it."""
        if position.applies_in_attention:
            if self.settings.decode == "dense":
                raise ValueError(
                    "attention.decode=dense cannot be combined with position=selected: dense "
                    "decoding has no re-indexed positions; use attention.decode=sparse or auto"
                )
            self.pe, self._position = "selected", [position]

    def _rotation(self, length: int, head_dim: int) -> tuple[Tensor | None, float | None]:
        """(inverse frequencies or None, softmax scale) for a sequence of ``length`` tokens.

        With ``pe="selected"`` the positions rotated run below ``min(L, T*w)``; the scheme's
        frequencies are asked for now, so a scale that grows in training or differs in
        evaluation is followed. Its attention scaling (YaRN's temperature) multiplies both
        rotated q and k, so it enters as its square in the softmax scale."""
        s = self.settings
        if self.pe != "selected":
            return None, s.scale
        inv_freq, mscale = self._position[0].frequencies_at(min(length, s.budget * s.region))
        scale = head_dim**-0.5 if s.scale is None else s.scale
        return inv_freq, scale * mscale**2

    @property
    def sparse_decode(self) -> bool:
        decode = self.settings.decode
        return decode == "sparse" or (decode == "auto" and self.pe == "selected")

    @property
    def decode_exact(self) -> bool:
        # Dense decoding (the paper's inference) is not the sparse function that was trained.
        return self.causal and self.sparse_decode

    def continues_foreign_cache(self, n_new: int) -> bool:
        # A prefill chunk or a sparse decode step selects over past queries, which only ctxlab's
        # KVCache keeps.
        return n_new == 1 and not self.sparse_decode

    def pair_fraction(self, length: int) -> float:
        s = self.settings
        return ms_pair_count(length, s.region, s.budget, s.merge) / (length * (length + 1) / 2)

    def audit_length(self, minimum: int) -> int:
        s = self.settings  # the dense prefix, three blocks and half a region
        return max(minimum, (s.budget + 3 * s.merge) * s.region + s.region // 2 + 1)

    def check_training_length(self, length: int) -> None:
        s = self.settings
        if math.ceil(length / s.region) <= s.budget:
            raise ValueError(
                f"attention.region={s.region} and attention.budget={s.budget} cover "
                f"{s.region * s.budget} tokens, but the training length {length} is only "
                f"{math.ceil(length / s.region)} regions: at the training length MS attention would "
                "be exactly dense attention. Lower attention.budget or attention.region, or raise "
                "data.seq_len."
            )

    def selection_stats(self, local_window: int) -> dict | None:
        from ctxlab.attention.stats import selection_stats

        idx = self.last_selection
        if idx is None or idx.shape[2] == 0:
            return None
        s = self.settings
        return selection_stats(idx, budget=s.budget, merge=s.merge, local_window=local_window)

    def clear_selection(self) -> None:
        super().clear_selection()
        self.last_selection = None

    def _select(self, q: Tensor, k: Tensor) -> Tensor:
        """The selection of the whole sequence (q ``[B, L, H, D]``, k ``[B, L, Hkv, D]``), recorded
        for ``selection_stats`` when asked; no gradient."""
        s = self.settings
        with torch.no_grad():
            if self.record_selection:
                self.last_selection = ms_select(q.detach(), k.detach(), **s.select_kwargs)
            return ms_selection(q.detach(), k.detach(), **s.select_kwargs, backend=s.backend)

    def attend_rows(self, q: Tensor, k: Tensor, v: Tensor, rows: QueryRows) -> Tensor:
        """The rows ``rows.spans``: the selection on the whole sequence's queries (``rows.gather``;
        paper selection reads a block's own later queries, causal the m regions before it), then
        the attention of these rows only (``ms_attend_rows``)."""
        s = self.settings
        q_all = rows.gather(q)
        check_ms_tensors(q_all, k, v, pe=self.pe)
        idx = self._select(q_all, k)
        inv_freq, scale = self._rotation(k.shape[1], q.shape[-1])
        return ms_attend_rows(
            q, q_all, k, v, idx, spans=rows.spans, region=s.region, budget=s.budget, merge=s.merge,
            scope=s.scope, pe=self.pe, inv_freq=inv_freq, scale=scale, backend=s.backend,
        )  # fmt: skip

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        s = self.settings
        if cache is None:
            # Selection, then attention: checkpointing can keep the selection (checkpoint_saves).
            check_ms_tensors(q, k, v, pe=self.pe)
            idx = self._select(q, k)
            inv_freq, scale = self._rotation(q.shape[1], q.shape[-1])
            return ms_attend(
                q, k, v, idx, region=s.region, budget=s.budget, merge=s.merge, scope=s.scope, pe=self.pe,
                inv_freq=inv_freq, scale=scale, backend=s.backend,
            )  # fmt: skip
        start = cache.length
        if q.shape[1] == 1 and not self.sparse_decode:
            k_all, v_all, _ = cache.append(k, v, q)
            return dense_attention(q, k_all, v_all, scale=s.scale)
        k_all, v_all, q_all = cache.append(k, v, q)
        inv_freq, scale = self._rotation(k_all.shape[1], q.shape[-1])
        return ms_attention_torch(
            q_all, k_all, v_all, start=start, **s.select_kwargs, pe=self.pe, inv_freq=inv_freq, scale=scale
        )  # fmt: skip

    def describe(self) -> str:
        s = self.settings
        return (
            f"ms(w={s.region},T={s.budget},m={s.merge},select={s.select},"
            f"pool={s.pool},scope={s.scope},pe={self.pe})"
        )
