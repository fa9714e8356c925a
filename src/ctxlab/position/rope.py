"""Plain RoPE and ``selected`` (RoPE applied inside attention to the selected tokens only).

Shapes: B batch, L tokens, H heads, D head_dim; ids int64 ``[B, L]``; tables float32 ``[B, L, D]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctxlab.position.base import PositionScheme, RotatesByFrequencies, check_rotate_inputs, inv_freq64


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


class Selected(RotatesByFrequencies, Rope):
    """``selected``: positional encoding only on the tokens a sparse attention selects.

    The model does not rotate q and k (``rotate`` is the identity); an attention core that
    applies positions itself (MS attention with ``pe="selected"``) rotates inside each block's
    key set, with positions re-indexed there (docs/ms-attention-contract.md), by the
    frequencies of ``frequencies`` (``frequencies_at``): plain RoPE of ``base`` by default, or
    any RoPE scaling (``pi``, ``ntk``, ``dynamic_ntk``, ``yarn``, ``crd_ntk``; its training
    state, CRD NTK's growing scale included, is followed). ``position_ids`` and ``cos_sin``
    still give the natural ids and their tables, for callers that want them. HF has no
    equivalent, so ``hf_rope_scaling`` is None: such a model does not reload as a plain HF
    Llama with the same positions.

    Args:
        head_dim: D, even.
        base: the RoPE base (must equal the ``base`` of a given ``frequencies``).
        frequencies: the scheme whose frequencies rotate the selected tokens (default plain
            RoPE of ``base``).
    """

    name = "selected"
    applies_in_attention = True
    FREQUENCY_SCHEMES = ("rope", "pi", "ntk", "dynamic_ntk", "yarn", "crd_ntk")

    def __init__(self, head_dim: int, base: float = 10000.0, frequencies: PositionScheme | None = None):
        super().__init__(head_dim, base)
        self._take_frequencies(
            Rope(head_dim, base) if frequencies is None else frequencies, self.FREQUENCY_SCHEMES
        )

    def rotate(self, q_BLHD: Tensor, k_BLHD: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Identity: MS attention applies RoPE itself (``pe="selected"``)."""
        check_rotate_inputs(q_BLHD, k_BLHD, position_ids, self.head_dim)
        return q_BLHD, k_BLHD

    def hf_rope_scaling(self) -> None:
        return None

    def describe(self) -> str:
        if self.frequencies.name == "rope":  # the description recorded before frequencies existed
            return f"selected(head_dim={self.head_dim}, base={self.base:g}, applied inside MS attention)"
        return f"selected({self.frequencies.describe()}, applied inside attention)"
