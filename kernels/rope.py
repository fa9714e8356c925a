"""Rotary position embedding, Llama's rotate-half convention.

Shapes: ``x`` is ``[B, L, H, D]`` (BTHD); ``cos``/``sin`` are ``[B, L, D]`` or ``[L, D]``
and broadcast over heads. Tables are built in float32 and the rotation is computed in
float32, then cast back to ``x``'s dtype, so bf16 inputs lose nothing to the table.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """Plain RoPE inverse frequencies ``base^(-2i/D)`` for ``i < D/2``, float32 ``[D/2]``."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if base <= 1.0:
        raise ValueError(f"rope base must be > 1, got {base}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return (1.0 / (base**exponent)).to(torch.float32)


def selected_inv_freq(
    head_dim: int, rope_base: float, inv_freq: Tensor | None, device: torch.device
) -> Tensor:
    """The inverse frequencies a kernel rotates with: ``inv_freq`` (a position scheme's, any
    RoPE scaling) on ``device`` in float64, else plain RoPE's for ``rope_base``. ValueError
    unless ``inv_freq`` is ``[D/2]``, finite and positive."""
    if inv_freq is None:
        return rope_inv_freq(head_dim, rope_base, device).to(torch.float64)
    if not isinstance(inv_freq, Tensor) or inv_freq.shape != (head_dim // 2,):
        got = tuple(inv_freq.shape) if isinstance(inv_freq, Tensor) else type(inv_freq).__name__
        raise ValueError(f"inv_freq must be a tensor [D/2] = [{head_dim // 2}], got {got}")
    if not bool(torch.isfinite(inv_freq).all()) or not bool((inv_freq > 0).all()):
        raise ValueError("inv_freq must be finite and positive")
    return inv_freq.to(device=device, dtype=torch.float64)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer or float ``positions`` (any shape ``[...]``) -> ``[..., D]``.

    ``scaling`` multiplies both tables (YaRN's attention temperature enters this way, as in HF).
    Positions are taken in float64 before the product so that large (multi-million) positions
    keep their integer part exactly.
    """
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # [..., D/2]
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * scaling).to(torch.float32), (emb.sin() * scaling).to(torch.float32)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BLHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ([B, L, H, D]) by tables ``[B, L, D]`` or ``[L, D]``; returns x's dtype."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, L, 1, D]
    xf = x_BLHD.to(torch.float32)
    return (xf * cos + rotate_half(xf) * sin).to(x_BLHD.dtype)
