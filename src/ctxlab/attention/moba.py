"""MoBA, mixture of block attention (Lu et al. 2025, arXiv 2502.13189), as a layer core
(``attention=moba``).

Shapes: q ``[B, L, H, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), output ``[B, L, H, D]``. Keys are cut
into blocks of ``block_size`` tokens; each query attends causally to its own block and to the
``top_k`` earlier blocks whose mean key scores highest against it (``kernels/moba``). The gate
reads only whole blocks before the query's own, so the function is causal and a token decoded
through a KV cache (k and v only) gets exactly what the full forward gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ctxlab.attention.base import AttentionCore
from ctxlab.attention.cache import LayerCache
from ctxlab.kernels.moba import moba_attention, moba_attention_torch, moba_pair_count, validate_moba_args


@dataclass(frozen=True, kw_only=True)
class MoBASettings:
    """MoBA's settings (``cfg/attention/moba.yaml``), validated when built."""

    block_size: int = 512
    """b: tokens per key block."""
    top_k: int = 2
    """Earlier blocks each query attends to besides its own (the paper's k = top_k + 1)."""
    backend: str = "auto"
    """``torch``, ``flex`` (FlexAttention) or ``auto`` (flex on a GPU)."""
    scale: float | None = None
    """Softmax scale, ``1/sqrt(D)`` when None."""

    def __post_init__(self) -> None:
        try:
            validate_moba_args(
                block_size=self.block_size, top_k=self.top_k, scale=self.scale, backend=self.backend
            )
        except ValueError as e:
            raise ValueError(f"attention.{e}") from None


class MoBAAttention(AttentionCore):
    """MoBA as a layer core: ``moba_attention`` on a whole sequence, its PyTorch path over the
    cached keys with a KV cache."""

    Settings = MoBASettings

    def pair_fraction(self, length: int) -> float:
        s = self.settings
        return moba_pair_count(length, s.block_size, s.top_k) / (length * (length + 1) / 2)

    def audit_length(self, minimum: int) -> int:
        s = self.settings  # more earlier blocks than top_k, and a cut inside a block
        return max(minimum, (s.top_k + 3) * s.block_size + s.block_size // 2 + 1)

    def check_training_length(self, length: int) -> None:
        s = self.settings
        if -(-length // s.block_size) <= s.top_k + 1:
            raise ValueError(
                f"attention.block_size={s.block_size} and attention.top_k={s.top_k}: the training "
                f"length {length} holds at most top_k + 1 blocks, so every query would attend to "
                "every earlier token and MoBA would be exactly dense. Lower attention.block_size "
                "or attention.top_k, or raise data.seq_len."
            )

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        s = self.settings
        if cache is None:
            return moba_attention(
                q, k, v, block_size=s.block_size, top_k=s.top_k, scale=s.scale, backend=s.backend
            )
        k_all, v_all, _ = cache.append(k, v)
        return moba_attention_torch(q, k_all, v_all, block_size=s.block_size, top_k=s.top_k, scale=s.scale)

    def describe(self) -> str:
        s = self.settings
        return f"moba(b={s.block_size},top_k={s.top_k})"
