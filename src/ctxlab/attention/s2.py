"""LongLoRA's shifted sparse attention (S2-Attn, Chen et al. 2023, arXiv 2309.12307) as a core.

Shapes: B batch, L tokens, H query heads, Hkv key/value heads, D head dim, G group size
(tokens), n groups. q ``[B, L, H, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), output ``[B, L, H, D]``.

In training the sequence is cut into groups of G tokens (a quarter of the length by default)
and every token attends causally inside its own group only. The first ``H // 2`` heads use the
groups ``[0, G), [G, 2G), ...``; the other heads (LongLoRA's ``num_heads // 2:``) use groups
shifted by ``s = G // 2`` tokens, so information flows between neighbouring groups. With GQA,
a query head reads kv head ``h // (H // Hkv)`` as everywhere else in ctxlab.

How the shifted heads treat the ends of the sequence (``wrap``):

- ``wrap=True`` reproduces LongLoRA's code: the shifted heads roll the sequence by ``-s``,
  attend inside groups of the rolled sequence and roll back. Their last group holds the last
  ``s`` tokens followed by the first ``G - s``, and with the usual causal mask inside that
  group the first ``G - s`` tokens of the sequence see its last ``s`` tokens: S2-Attn with
  wrapping is **not causal in training**. It needs ``L % G == 0`` (LongLoRA asserts the same).
- ``wrap=False`` is the causal variant: the shifted heads' groups are ``[0, s)``,
  ``[s, s + G)``, ..., and a partial last group; no token sees a later one. Any ``L`` works.

At evaluation (``model.eval()``) and with a KV cache S2 attention is full dense causal
attention, as in LongLoRA (S2 is a training-time approximation), so evaluated perplexities are
those of a causal model either way; ``causal`` describes that evaluated function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxlab.attention.base import AttentionCore, QueryRows
from ctxlab.attention.cache import LayerCache
from ctxlab.attention.modules import check_scale, dense_attention, dense_rows, sdpa


def s2_group_size(length: int, *, group_ratio: float = 0.25, group_size: int = 0) -> int:
    """Tokens per group for a sequence of ``length``: ``group_size`` if > 0, else
    ``int(length * group_ratio)`` (LongLoRA's rule). Raises ValueError below 2 tokens."""
    group = group_size if group_size > 0 else int(length * group_ratio)
    if group < 2:
        raise ValueError(
            f"s2 attention: group size {group} (group_size={group_size}, group_ratio={group_ratio}, "
            f"length={length}) must be >= 2 tokens so that the shift s = G // 2 is >= 1"
        )
    return group


def _kv_heads(x_BLHD: Tensor, h0: int, h1: int, rep: int) -> Tensor:
    """The kv heads that query heads ``[h0, h1)`` read, ``[B, L, h, D]``.

    When the range starts and ends on kv-group boundaries this is a slice of ``Hkv`` heads (SDPA
    then broadcasts them over their query heads); otherwise each query head gets its kv head
    gathered (an odd head count such as SmolLM2's 9 query / 3 kv heads splits a kv group).
    """
    if h0 % rep == 0 and h1 % rep == 0:
        return x_BLHD[:, :, h0 // rep : h1 // rep]
    index = torch.arange(h0, h1, device=x_BLHD.device) // rep
    return x_BLHD.index_select(2, index)


def _causal(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """Causal SDPA over the leading dims; q ``[..., L, h, D]``, k, v ``[..., L, hkv, D]``."""
    o = sdpa(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), is_causal=True, scale=scale)
    return o.transpose(-3, -2)


def _causal_in_groups(q: Tensor, k: Tensor, v: Tensor, group: int, first: int, scale: float | None) -> Tensor:
    """Causal attention inside the groups ``[0, first)``, then ``[first + iG, first + (i+1)G)``,
    then a partial last group: an empty first or last group is skipped.

    The full groups run as one batched causal SDPA (``[B * n, h, G, D]``, flash-eligible, no
    mask); the two partial groups are plain causal attention on their slices.
    """
    B, L, h, D = q.shape
    first = min(first, L)
    n = (L - first) // group
    end = first + n * group
    parts = []
    if first > 0:
        parts.append(_causal(q[:, :first], k[:, :first], v[:, :first], scale))
    if n > 0:

        def grouped(x: Tensor) -> Tensor:  # [B, n*G, h, D] -> [B*n, G, h, D]
            return x[:, first:end].reshape(B * n, group, x.shape[2], D)

        o = _causal(grouped(q), grouped(k), grouped(v), scale)  # [B*n, G, h, D]
        parts.append(o.reshape(B, n * group, h, D))
    if end < L:
        parts.append(_causal(q[:, end:], k[:, end:], v[:, end:], scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def s2_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group: int, wrap: bool = True, scale: float | None = None
) -> Tensor:
    """Shifted sparse attention (training form); see the module docstring.

    Args:
        q: ``[B, L, H, D]``; k, v: ``[B, L, Hkv, D]`` with ``H % Hkv == 0``.
        group: G, tokens per group (>= 2); the shifted heads move by ``G // 2``.
        wrap: roll the shifted heads around the sequence end as LongLoRA does (not causal,
            needs ``L % G == 0``), or give them partial groups at both ends (causal).
        scale: softmax scale, ``1/sqrt(D)`` when None.

    Returns:
        ``[B, L, H, D]`` in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 2:
        raise ValueError(f"group must be an int >= 2, got {group!r}")
    _check_wrap(L, group, wrap)
    rep, h0, shift = H // Hkv, H // 2, group // 2
    outs = []
    if h0 > 0:
        kp, vp = _kv_heads(k, 0, h0, rep), _kv_heads(v, 0, h0, rep)
        outs.append(_causal_in_groups(q[:, :, :h0], kp, vp, group, 0, scale))
    qs, ks, vs = q[:, :, h0:], _kv_heads(k, h0, H, rep), _kv_heads(v, h0, H, rep)
    if wrap:
        rolled = [x.roll(-shift, dims=1) for x in (qs, ks, vs)]
        outs.append(_causal_in_groups(*rolled, group, 0, scale).roll(shift, dims=1))
    else:
        outs.append(_causal_in_groups(qs, ks, vs, group, shift, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _check_wrap(length: int, group: int, wrap: bool) -> None:
    if wrap and length % group:
        raise ValueError(
            f"s2 attention with wrap=True (LongLoRA's roll) needs the length L={length} to be a "
            f"multiple of the group size {group}; use wrap=False or another group size"
        )


def _group_causal_rows(
    q: Tensor, k: Tensor, v: Tensor, kv_heads: Tensor, *, first: int, group: int, shift: int, wrap: bool,
    scale: float | None,
) -> Tensor:  # fmt: skip
    """Causal attention inside S2's groups for queries at ``first .. first + len - 1``.

    q ``[B, len, h, D]`` (h query heads reading kv heads ``kv_heads`` of k, v ``[B, L, Hkv, D]``).
    Query t attends to keys ``[start, t]``, start being the first token of its group: groups
    ``[0, shift)``, then ``[shift + iG, shift + (i+1)G)``. With ``wrap`` (LongLoRA's roll;
    ``L % G == 0``) the first group is the tail of the last one: queries ``t < shift`` also see
    keys ``[L - G + shift, L)``. Each run of queries sharing a group is one SDPA call with a
    lower-right causal mask over its group's keys."""
    from torch.nn.attention.bias import causal_lower_right

    L, end_q = k.shape[1], first + q.shape[1]
    out, t = [], first
    while t < end_q:
        start = 0 if t < shift else shift + (t - shift) // group * group
        end = min(shift if t < shift else start + group, end_q)
        keys = [slice(start, end)]
        if wrap and t < shift:
            keys.insert(0, slice(L - group + shift, L))
        k_run = torch.cat([k[:, r] for r in keys], dim=1).index_select(2, kv_heads)  # [B, n, h, D]
        v_run = torch.cat([v[:, r] for r in keys], dim=1).index_select(2, kv_heads)
        o = F.scaled_dot_product_attention(
            q[:, t - first : end - first].transpose(1, 2), k_run.transpose(1, 2), v_run.transpose(1, 2),
            attn_mask=causal_lower_right(end - t, k_run.shape[1]), scale=scale,
        )  # fmt: skip
        out.append(o.transpose(1, 2))
        t = end
    return torch.cat(out, dim=1)


def s2_rows(
    q: Tensor, k: Tensor, v: Tensor, spans: tuple[tuple[int, int], ...], *, group: int, wrap: bool = True,
    scale: float | None = None,
) -> Tensor:  # fmt: skip
    """``s2_attention``'s rows for the query runs ``spans`` (``(start, stop)`` positions; q
    ``[B, R, H, D]`` their rows concatenated) over the whole sequence's ``k, v [B, L, Hkv, D]``:
    the first H/2 heads in groups of ``group`` tokens, the others in groups shifted by half of it
    (wrapping around the end with ``wrap``). ``group`` is the whole length's, as in training."""
    L, H = k.shape[1], q.shape[2]
    _check_wrap(L, group, wrap)
    rep = H // k.shape[2]
    heads = [(0, H // 2, 0, False), (H // 2, H, group // 2, wrap)]  # (h0, h1, shift, wrap)
    out, at = [], 0
    for start, stop in spans:
        q_run, halves = q[:, at : at + stop - start], []
        for h0, h1, shift, wrap_h in heads:
            if h1 > h0:
                kv_heads = torch.arange(h0, h1, device=q.device) // rep
                o = _group_causal_rows(
                    q_run[:, :, h0:h1], k, v, kv_heads, first=start, group=group, shift=shift, wrap=wrap_h,
                    scale=scale,
                )  # fmt: skip
                halves.append(o)
        out.append(torch.cat(halves, dim=2))
        at += stop - start
    return torch.cat(out, dim=1)


@dataclass(frozen=True, kw_only=True)
class S2Settings:
    """S2-Attn's settings (``cfg/attention/s2.yaml``), validated when built."""

    group_ratio: float = 0.25
    """Group size as a fraction of the training length (LongLoRA: 1/4)."""
    group_size: int = 0
    """Fixed group size in tokens; 0 uses ``group_ratio``."""
    wrap: bool = True
    """LongLoRA's wrap-around shift (not causal in training) or the causal variant (False)."""
    scale: float | None = None
    """Softmax scale, ``1/sqrt(D)`` when None."""

    def __post_init__(self) -> None:
        ratio, size = self.group_ratio, self.group_size
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"attention.group_ratio must be a number in (0, 1], got {ratio!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size == 1:
            raise ValueError(f"attention.group_size must be 0 (use group_ratio) or an int >= 2, got {size!r}")
        if not isinstance(self.wrap, bool):
            raise ValueError(f"attention.wrap must be a bool, got {self.wrap!r}")
        check_scale(self.scale)
        object.__setattr__(self, "group_ratio", float(ratio))

    def group(self, length: int) -> int:
        """Tokens per group at ``length`` tokens (``s2_group_size``)."""
        return s2_group_size(length, group_ratio=self.group_ratio, group_size=self.group_size)


class S2Attention(AttentionCore):
    """S2-Attn as a layer core: ``s2_attention`` in training, dense causal attention otherwise
    (what is evaluated is causal; training with ``wrap`` is not)."""

    Settings = S2Settings

    @property
    def training_causal(self) -> bool:
        """Whether the training-time function is causal (only without LongLoRA's wrap)."""
        return not self.settings.wrap

    def pair_fraction(self, length: int) -> float:
        """In training, the unshifted heads' pairs: causal inside whole groups of G and a partial
        last one (1 where no group of 2 tokens fits: such a length does not train)."""
        s = self.settings
        g = s.group_size if s.group_size > 0 else int(length * s.group_ratio)
        if g < 2:
            return 1.0
        whole, rest = divmod(length, g)
        return (whole * g * (g + 1) + rest * (rest + 1)) / (length * (length + 1))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        s = self.settings
        if cache is not None:
            k, v, _ = cache.append(k, v)
            return dense_attention(q, k, v, scale=s.scale)
        if not self.training:
            return dense_attention(q, k, v, scale=s.scale)
        return s2_attention(q, k, v, group=s.group(q.shape[1]), wrap=s.wrap, scale=s.scale)

    def attend_rows(self, q: Tensor, k: Tensor, v: Tensor, rows: QueryRows) -> Tensor:
        s = self.settings
        if not self.training:
            return dense_rows(q, k, v, rows.spans, scale=s.scale)
        return s2_rows(q, k, v, rows.spans, group=s.group(k.shape[1]), wrap=s.wrap, scale=s.scale)

    def describe(self) -> str:
        s = self.settings
        size = f"G={s.group_size}" if s.group_size else f"G=L*{s.group_ratio:g}"
        return f"s2({size},wrap={s.wrap}; dense at eval)"
