"""The public MoBA API: ``moba_attention``, with input validation.

Layout: q ``[B, L, Hq, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), causal self-attention, query head
h reads kv head ``h // (Hq // Hkv)``. Softmax scale ``1/sqrt(D)`` unless given. Every bad
argument raises ``ValueError`` naming it.
"""

from __future__ import annotations

import numbers

from torch import Tensor

from ..ms_attention.interface import check_tensors
from .torch_impl import moba_attention_torch

BACKENDS = ("auto", "torch", "flex")


def validate_moba_args(
    *, block_size: int, top_k: int, scale: float | None = None, backend: str = "auto"
) -> None:
    """Raise ``ValueError`` naming the first bad option; tensors are not needed."""
    for name, value, low in (("block_size", block_size, 1), ("top_k", top_k, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < float("inf")
    ):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def moba_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 512,
    top_k: int = 2,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """MoBA (Lu et al. 2025, arXiv 2502.13189) -> ``[B, L, Hq, D]`` in q's dtype.

    Args:
        q: ``[B, L, Hq, D]``; k, v: ``[B, L, Hkv, D]``, same dtype and device, ``Hq % Hkv == 0``.
        block_size: b, tokens per key block.
        top_k: earlier blocks each query attends to besides its own (the paper's top-k counts
            the own block too: its k = top_k + 1).
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"torch"`` (chunked PyTorch, any device), ``"flex"`` (FlexAttention: forward
            and backward on CUDA, forward only on the CPU) or ``"auto"`` (flex on CUDA).

    Query t of block i = t // b attends causally to its own block and to all tokens of the
    ``min(top_k, i)`` earlier blocks with the largest gate ``q_t . mean(k_j)`` (no scale; ties
    to the smaller j). Gradients reach q, k, v through the attention only.
    """
    validate_moba_args(block_size=block_size, top_k=top_k, scale=scale, backend=backend)
    check_tensors(q, k, v, pe="pre")
    if backend == "flex" or (backend == "auto" and q.is_cuda):
        from .flex import moba_attention_flex

        return moba_attention_flex(q, k, v, block_size=block_size, top_k=top_k, scale=scale)
    return moba_attention_torch(q, k, v, block_size=block_size, top_k=top_k, scale=scale)
