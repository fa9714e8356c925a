"""Plain RoPE and ``selected`` (RoPE applied inside MS attention to the selected tokens only).

Shapes: B batch, L tokens, H heads, D head_dim; ids int64 ``[B, L]``; tables float32 ``[B, L, D]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctxlab.position.base import PositionScheme, check_rotate_inputs, inv_freq64


class Rope(PositionScheme):
    """Plain RoPE (Su et al.): ``inv_freq_i = base^(-2i/D)``, natural ids in training and eval.

    Args:
        head_dim: D, even.
        base: the RoPE base (Llama 2: 10000, Llama 3: 500000).
    """

    name = "rope"

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__(head_dim, base)
        self._rebuild_tables()

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        return {"inv_freq": inv_freq64(self.head_dim, self.base, device)}

    def hf_rope_scaling(self) -> dict[str, Any] | None:
        return {"rope_type": "default", "rope_theta": self.base}


class Selected(Rope):
    """``selected``: positional encoding only on the tokens MS attention selects.

    The model does not rotate q and k (``rotate`` is the identity); MS attention with
    ``pe="selected"`` applies plain RoPE with ``rope_base`` inside each block's key set, with
    positions re-indexed there (see SPEC-ms-attention.md). ``position_ids`` and ``cos_sin``
    still give the natural ids and their plain-RoPE tables, for callers that want them.
    HF has no equivalent, so ``hf_rope_scaling`` is None: such a model does not reload as a
    plain HF Llama with the same positions.

    Args:
        head_dim: D, even.
        base: the RoPE base MS attention rotates with.
    """

    name = "selected"
    applies_in_attention = True

    def rotate(self, q_BLHD: Tensor, k_BLHD: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Identity: MS attention applies RoPE itself (``pe="selected"``)."""
        check_rotate_inputs(q_BLHD, k_BLHD, position_ids, self.head_dim)
        return q_BLHD, k_BLHD

    def hf_rope_scaling(self) -> None:
        return None

    def describe(self) -> str:
        settings = f"head_dim={self.head_dim}, base={self.base:g}"
        return f"selected({settings}, applied inside MS attention)"
