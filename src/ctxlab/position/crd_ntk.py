"""CRD NTK: Cyclic, Randomly truncated, Dynamically growing NTK (arXiv 2410.04211, fine-tuning).

Shapes: B batch, L tokens; ids int64 ``[B, L]``; frequencies float64 ``[D/2]``.

Three independent switches act in training only:

- ``random_offset``: each row draws ``r ~ U{0 .. max_offset}`` (every call of
  ``position_ids``, i.e. every training step) and its token ``t`` gets the id ``t + r``.
  One offset per sequence: the paper trains on one sequence per step, where this is its
  one offset per step; with several rows, each row covers a different range.
- ``cyclic``: ids are taken modulo ``cycle``, so offsets far beyond the training length
  wrap into ``[0, cycle)``; the cycle must hold a whole training row.
- ``dynamic``: the NTK scale starts at ``scale_init`` and doubles every ``grow_every``
  optimizer steps up to ``scale_max``; ``NTKGrowth`` (callbacks.py) drives it from
  Lightning's ``global_step`` through ``set_scale``. Off: the scale stays ``scale_init``.

The NTK scale ``s`` rotates with plain RoPE of base ``base * s^(D/(D-2))``. Evaluation
(``model.eval()``) uses natural ids and the fixed scale ``scale_inf``, which a sweep varies.

Defaults are the paper's where it gives them: cycle 32768 with 16K training rows, offsets up
to 4M (``max_offset = 2**22``), ``scale_init`` 16 doubling every 2000 steps. Ours where it
does not: ``scale_max = 64`` (two doublings, reached at step 4000) and ``scale_inf = 64``,
i.e. evaluation uses the largest scale training reached.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ctxlab.position.base import (
    PositionScheme,
    check_int,
    check_inv_freq,
    check_scale,
    inv_freq64,
    natural_ids,
    ntk_base,
)


class CRDNTK(PositionScheme):
    """The paper's fine-tuning position scheme; see the module docstring.

    Args:
        head_dim: D, even and > 2.
        base: the RoPE base the model was pre-trained with.
        cycle: C, the period of cyclic ids; must be >= the training length.
        max_offset: R, the largest random offset.
        scale_init: s0 >= 1, the NTK scale training starts with.
        grow_every: N, optimizer steps between doublings.
        scale_max: the largest training scale, >= scale_init.
        scale_inf: the fixed NTK scale used in evaluation.
        cyclic: take training ids modulo ``cycle``.
        random_offset: add a random offset to training ids.
        dynamic: let the training scale grow (else it stays ``scale_init``).
    """

    name = "crd_ntk"
    eval_scale_setting = "scale_inf"
    inv_freq_eval: Tensor

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        cycle: int = 32768,
        max_offset: int = 4194304,
        scale_init: float = 16.0,
        grow_every: int = 2000,
        scale_max: float = 64.0,
        scale_inf: float = 64.0,
        cyclic: bool = True,
        random_offset: bool = True,
        dynamic: bool = True,
    ) -> None:
        super().__init__(head_dim, base)
        if head_dim <= 2:
            raise ValueError(f"NTK scaling needs head_dim > 2, got {head_dim}")
        self.cycle = check_int("cycle", cycle, 1)
        self.max_offset = check_int("max_offset", max_offset, 0)
        self.scale_init = check_scale("scale_init", scale_init)
        self.grow_every = check_int("grow_every", grow_every, 1)
        self.scale_max = check_scale("scale_max", scale_max)
        if self.scale_max < self.scale_init:
            raise ValueError(f"scale_max={scale_max} must be >= scale_init={scale_init}")
        self.scale_inf = check_scale("scale_inf", scale_inf)
        self.cyclic = bool(cyclic)
        self.random_offset = bool(random_offset)
        self.dynamic = bool(dynamic)
        self._doublings = math.ceil(math.log2(self.scale_max / self.scale_init))
        # Every scale the schedule reaches lies between scale_init and the largest one.
        largest = ("scale_max", self.scale_max) if self.dynamic else ("scale_init", self.scale_init)
        for setting, scale in (largest, ("scale_inf", self.scale_inf)):
            try:
                check_inv_freq(self._inv_freq_at(scale, None), f"{setting}={scale:g}")
            except ValueError as err:
                raise ValueError(f"position=crd_ntk: {setting}={scale:g}: {err}") from None
        self._scale = self.scale_init
        self.register_buffer("inv_freq_eval", torch.empty(0), persistent=False)
        self._rebuild_tables()

    @property
    def scale(self) -> float:
        """The current training scale (the schedule's state)."""
        return self._scale

    def scale_at(self, step: int) -> float:
        """Training scale after ``step`` optimizer steps: ``min(s0 * 2**(step // N), s_max)``."""
        check_int("step", step, 0)
        if not self.dynamic:
            return self.scale_init
        doublings = min(step // self.grow_every, self._doublings)
        return min(self.scale_init * 2.0**doublings, self.scale_max)

    def set_scale(self, scale: float) -> None:
        """Rebuild the training frequencies for NTK scale ``scale`` (in place: same buffer)."""
        scale = check_scale("scale", scale)
        inv_freq = self._inv_freq_at(scale, self.inv_freq.device)
        check_inv_freq(inv_freq, f"scale={scale:g}")
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)
        self._scale = scale

    def _inv_freq_at(self, scale: float, device: torch.device | None) -> Tensor:
        return inv_freq64(self.head_dim, ntk_base(self.base, scale, self.head_dim), device)

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        return {
            "inv_freq": self._inv_freq_at(self._scale, device),
            "inv_freq_eval": self._inv_freq_at(self.scale_inf, device),
        }

    def _inv_freq_for(self, position_ids: Tensor) -> Tensor:
        return self.inv_freq if self.training else self.inv_freq_eval

    @property
    def rope_base(self) -> float:
        """The NTK base in use: the current scale's in training, ``scale_inf``'s in evaluation."""
        return ntk_base(self.base, self._scale if self.training else self.scale_inf, self.head_dim)

    def _training_ids(
        self,
        batch: int,
        length: int,
        start: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        ids = natural_ids(batch, length, start, device)
        if self.random_offset:
            draw_device = generator.device if generator is not None else device
            offset = torch.randint(
                0, self.max_offset + 1, (batch, 1), generator=generator, device=draw_device
            )
            ids = ids + offset.to(device)
        if self.cyclic:
            ids = ids % self.cycle
        return ids

    def _max_position_ids(self, train_length: int, eval_max_length: int) -> list[tuple[str, int]]:
        largest, setting = train_length - 1, f"train_length={train_length}"
        if self.random_offset:
            largest, setting = largest + self.max_offset, f"max_offset={self.max_offset}"
        if self.cyclic and largest >= self.cycle:
            largest, setting = self.cycle - 1, f"cycle={self.cycle}"
        return [(setting, largest), (f"eval_max_length={eval_max_length}", eval_max_length - 1)]

    def check_lengths(self, train_length: int, eval_max_length: int, dtype: torch.dtype) -> None:
        """As the base rule, and a cyclic scheme's ``cycle`` must hold a whole training row."""
        super().check_lengths(train_length, eval_max_length, dtype)
        if self.cyclic and self.cycle < train_length:
            raise ValueError(
                f"position=crd_ntk: cycle={self.cycle} is shorter than the training length "
                f"train_length={train_length}; a row would repeat ids"
            )

    def growth_callback(self) -> Any | None:
        """``NTKGrowth`` when the scale grows (``dynamic``), else None."""
        if not self.dynamic:
            return None
        from ctxlab.position.callbacks import NTKGrowth  # Lightning only where training needs it

        return NTKGrowth()

    def hf_rope_scaling(self) -> dict[str, Any]:
        """Evaluation as HF sees it: plain RoPE with ``scale_inf``'s NTK base, natural ids."""
        theta = ntk_base(self.base, self.scale_inf, self.head_dim)
        return {"rope_type": "default", "rope_theta": theta}

    def describe(self) -> str:
        growth = (
            f"scale {self.scale_init:g} x2 every {self.grow_every} steps up to {self.scale_max:g}"
            if self.dynamic
            else f"scale {self.scale_init:g} fixed"
        )
        return (
            f"crd_ntk(head_dim={self.head_dim}, base={self.base:g}, "
            f"cyclic={'C=' + str(self.cycle) if self.cyclic else 'off'}, "
            f"random_offset={'R=' + str(self.max_offset) if self.random_offset else 'off'}, "
            f"{growth}, now {self._scale:g}, eval scale {self.scale_inf:g})"
        )
