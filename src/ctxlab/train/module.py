"""The LightningModule: next-token training of an already-built model.

Batches are ``{"input_ids": LongTensor [B, L + 1]}``; the module shifts them. Position ids
come from the model's position scheme: training ids in ``train()`` mode (CRD NTK's cyclic
random arcs, PoSE's skips), natural ids in ``eval()`` mode. Training ids are drawn from a
generator seeded by ``(seed, global_step)``, so a resumed run draws what the uninterrupted one
would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LMModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed

    def _loss(self, input_ids: Tensor, position_ids: Tensor | None) -> Tensor:
        x, y = input_ids[:, :-1], input_ids[:, 1:]
        logits = self.model(x, position_ids)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ids = batch["input_ids"]
        B, L1 = ids.shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        pos = self.model.position.position_ids(B, L1 - 1, generator=g).to(ids.device)
        loss = self._loss(ids, pos)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=B)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        ids = batch["input_ids"]
        loss = self._loss(ids, None)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=ids.shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss.detach().float()), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What ``load_weights`` checks before it accepts the checkpoint for another job.
        checkpoint["ctxlab"] = {
            "model": self.model.config.to_dict(),
            "model_class": type(self.model).__name__,
        }

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() < 2]
        opt = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak at ``total_steps``;
    ``total_steps=0`` keeps the rate constant after warm-up (the paper's fine-tuning schedule)."""
    import math

    if warmup_steps < 0 or total_steps < 0:
        raise ValueError("scheduler warmup_steps and total_steps must be >= 0")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not total_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
