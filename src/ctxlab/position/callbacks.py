"""Lightning callback that drives CRD NTK's dynamically growing scale from the optimizer step.

The schedule itself lives in ``CRDNTK.scale_at`` (s = min(s0 * 2**(step // N), s_max));
this callback only applies it. The scale is a function of ``trainer.global_step``, so nothing
needs to be checkpointed: ``on_train_start`` re-derives it after a resume.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from ctxlab.position.crd_ntk import CRDNTK


def crd_schemes(module: nn.Module) -> list[CRDNTK]:
    """Every distinct ``CRDNTK`` inside ``module`` (a shared scheme is listed once)."""
    return [m for m in module.modules() if isinstance(m, CRDNTK)]


class NTKGrowth(pl.Callback):
    """Set every CRD NTK scheme's training scale for the current optimizer step and log it.

    The batch trained while ``global_step == g`` uses ``scale_at(g)``: the scale is set when
    training starts (or resumes) and again after every batch, once ``global_step`` has
    advanced. The value is logged as ``position/ntk_scale``.

    Raises ValueError at setup if the module holds no ``CRDNTK`` (the callback would do
    nothing), or several whose schedules disagree (one logged scale could not describe them).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        schemes = crd_schemes(pl_module)
        if not schemes:
            raise ValueError(
                "NTKGrowth needs position=crd_ntk, but the model holds no CRDNTK position scheme"
            )
        schedules = {(s.scale_init, s.grow_every, s.scale_max, s.dynamic) for s in schemes}
        if len(schedules) > 1:
            raise ValueError(f"NTKGrowth found CRDNTK schemes with different schedules {schedules}")

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        scale = 1.0
        for scheme in crd_schemes(pl_module):
            scale = scheme.scale_at(trainer.global_step)
            if scale != scheme.scale:
                scheme.set_scale(scale)
        return scale

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        scale = self._update(trainer, pl_module)
        pl_module.log("position/ntk_scale", scale, on_step=True, on_epoch=False)
