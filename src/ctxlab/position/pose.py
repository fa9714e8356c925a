"""PoSE: positional skip-wise training (Zhu et al. 2023, arXiv 2309.10400).

Shapes: B batch, L tokens (the training window), N chunks; ids int64 ``[B, L]``.

A training window of ``L`` tokens is cut into ``N`` chunks; chunk ``c`` gets the ids
``t + u_c`` (``t`` the token's index in the window), with skip biases ``u_0 = 0`` and
``u_c ~ U{u_(c-1) .. T - L}`` for ``T = target_length``. So ids strictly increase, start at 0
and never exceed ``T - 1``, while the relative distances a window sees cover ``[1, T - 1]``.
Evaluation uses the natural ids.

Chunk cuts: ``N - 1`` distinct cut points drawn uniformly from ``1 .. L-1``, independently per
row. The official two-chunk code draws the first chunk's length from ``1 .. (L+1)//2``; we let
every split be equally likely, which extends to any ``N``. That code also takes the second
chunk's text from later in a longer document; which text fills the window is the data
module's choice, not the ids'.

PoSE only changes the ids; the frequencies that rotate them are those of ``frequencies``
(plain RoPE with ``base`` by default; the paper also pairs PoSE with ``pi``, ``ntk`` and ``yarn``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctxlab.position.base import PositionScheme, RotatesByFrequencies, check_int
from ctxlab.position.rope import Rope


class PoSE(RotatesByFrequencies, PositionScheme):
    """Positional skip-wise training ids; natural ids and ``frequencies``' rotation at evaluation.

    Args:
        head_dim: D, even.
        base: the RoPE base (used by the default plain-RoPE ``frequencies``; must equal the
            ``base`` of a given one).
        train_length: L, the training window (the data's sequence length).
        target_length: T >= L, the context the skipped ids simulate.
        chunks: N >= 2, chunks per window (paper: 2).
        frequencies: the scheme whose frequencies rotate the ids: ``rope`` (default), ``pi``,
            ``ntk``, ``dynamic_ntk`` or ``yarn``.
    """

    name = "pose"

    def __init__(
        self,
        head_dim: int,
        base: float,
        train_length: int,
        target_length: int,
        chunks: int = 2,
        frequencies: PositionScheme | None = None,
    ) -> None:
        super().__init__(head_dim, base)
        self.train_length = check_int("train_length", train_length, 2)
        self.target_length = check_int("target_length", target_length, 1)
        if target_length < train_length:
            raise ValueError(
                f"target_length={target_length} must be >= train_length={train_length}: "
                "PoSE simulates a longer context with a shorter window"
            )
        self.chunks = check_int("chunks", chunks, 2)
        if chunks > train_length:
            raise ValueError(f"chunks={chunks} cannot exceed train_length={train_length}")
        frequencies = Rope(head_dim, base) if frequencies is None else frequencies
        self._take_frequencies(frequencies, ("rope", "pi", "ntk", "dynamic_ntk", "yarn"))
        self._rebuild_tables()

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        # PoSE's own buffer only records the device; rotation uses `frequencies`.
        return {"inv_freq": self.frequencies.inv_freq.to(device)}

    def _training_ids(
        self,
        batch: int,
        length: int,
        start: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        if start != 0:
            raise ValueError(f"PoSE training ids start at 0 in every window, got start={start}")
        if length > self.target_length:
            raise ValueError(f"length={length} exceeds PoSE's target_length={self.target_length}")
        if length < self.chunks:
            raise ValueError(f"length={length} is shorter than chunks={self.chunks}")
        draw_device = generator.device if generator is not None else device
        # N-1 distinct cut points per row, uniform over 1..L-1, ascending.
        scores = torch.rand(batch, length - 1, generator=generator, device=draw_device)
        cuts = scores.topk(self.chunks - 1, dim=1).indices.sort(dim=1).values + 1  # [B, N-1]
        # Non-decreasing skip biases: u_0 = 0, u_c ~ U{u_(c-1) .. T-L}.
        room = self.target_length - length
        biases = [torch.zeros(batch, dtype=torch.long, device=draw_device)]
        for _ in range(self.chunks - 1):
            low = biases[-1]
            draw = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float64)
            biases.append(low + (draw * (room - low + 1)).long().clamp_max(room - low))
        bias_BN = torch.stack(biases, dim=1)  # [B, N]
        t = torch.arange(length, device=draw_device)
        chunk_BL = torch.searchsorted(cuts, t.expand(batch, length).contiguous(), right=True)
        return (t + bias_BN.gather(1, chunk_BL)).to(device)

    def _max_position_ids(self, train_length: int, eval_max_length: int) -> list[tuple[str, int]]:
        return [
            (f"target_length={self.target_length}", self.target_length - 1),
            (f"eval_max_length={eval_max_length}", eval_max_length - 1),
        ]

    def check_lengths(self, train_length: int, eval_max_length: int, dtype: torch.dtype) -> None:
        """As the base rule, and ``train_length`` must be the window PoSE was configured with."""
        super().check_lengths(train_length, eval_max_length, dtype)
        if train_length != self.train_length:
            raise ValueError(
                f"position=pose was built for train_length={self.train_length}, but the model "
                f"trains on train_length={train_length}"
            )

    def hf_rope_scaling(self) -> dict[str, Any] | None:
        return self.frequencies.hf_rope_scaling()

    def describe(self) -> str:
        return (
            f"pose(train_length={self.train_length}, target_length={self.target_length}, "
            f"chunks={self.chunks}, frequencies={self.frequencies.describe()})"
        )
