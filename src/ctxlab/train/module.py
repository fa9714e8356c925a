"""The LightningModule: next-token training of an already-built model.

Batches are ``{"input_ids": LongTensor [B, L + 1]}``; the module shifts them. Position ids
come from the model's position scheme: training ids in ``train()`` mode (CRD NTK's cyclic
random arcs, PoSE's skips), natural ids in ``eval()`` mode. Training ids are drawn from a
generator seeded by ``(seed, global_step)``, so a resumed run draws what the uninterrupted one
would have drawn.

The loss never holds the whole ``[B, L, V]`` logits: ``chunked_cross_entropy`` runs the output
head over ``loss_chunk`` tokens at a time and recomputes each chunk's logits in the backward
pass. At 128K tokens and a 32,000 vocabulary, full float32 logits and their gradient would take
33 GiB; chunks of 4,096 tokens take 1 GiB.

Under a context-parallel strategy (``ctxlab.context_parallel``) each rank computes the loss of
its own share of every row's tokens (their mean: the DDP average over ranks is then the
one-process gradient); the split is attached in ``on_fit_start`` and removed in ``on_fit_end``.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ctxlab import context_parallel
from ctxlab.train import numerics


def _chunk_loss_sum(head: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    logits = head(h)  # float32 at least (bf16 logits lose the loss's precision)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, head: nn.Module, targets: Tensor, chunk: int) -> Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``targets`` without materialising
    all logits: ``hidden [B, L, E]``, ``targets [B, L]``; ``chunk`` tokens of logits (float32)
    exist at a time, in the forward and (recomputed) in the backward pass."""
    if chunk <= 0:
        raise ValueError(f"loss chunk must be > 0 tokens, got {chunk}")
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    n = y.numel()
    if n <= chunk:
        return _chunk_loss_sum(head, h, y) / n
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for i in range(0, n, chunk):
        part = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, *part, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, *part)
    return total / n


class LMModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        *,
        seed: int = 0,
        loss_chunk: int = 4096,
        record: dict | None = None,
    ) -> None:
        """``loss_chunk``: tokens of logits computed at a time for the loss (0: all at once);
        ``record``: what the training ran with (``ctxlab.provenance.trained_settings``: the model,
        attention and position settings), kept in every checkpoint."""
        super().__init__()
        if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
            raise ValueError(f"phase.loss_chunk must be an int >= 0 (0: no chunking), got {loss_chunk!r}")
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.loss_chunk = loss_chunk
        self.record = dict(record or {})
        self.context_parallel: context_parallel.ContextParallel | None = None

    def on_fit_start(self) -> None:
        # A context-parallel strategy splits every sequence during fit (ctxlab.context_parallel).
        self.context_parallel = context_parallel.of(self.trainer.strategy)
        if self.context_parallel is not None:
            self.context_parallel.attach(self.model)

    def on_fit_end(self) -> None:
        if self.context_parallel is not None:
            self.context_parallel.detach(self.model)
            self.context_parallel = None

    def _loss(self, input_ids: Tensor, position_ids: Tensor | None) -> Tensor:
        x, y = input_ids[:, :-1], input_ids[:, 1:]
        if self.context_parallel is not None:  # this rank's tokens; the loss is their mean
            x, y, position_ids = self.context_parallel.shard_batch(self.model, x, y, position_ids)
        if self.loss_chunk:
            h = self.model.hidden(x, position_ids)
            return chunked_cross_entropy(h, self.model.lm_head, y, self.loss_chunk)
        logits = self.model(x, position_ids)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def _data_parallel(self) -> tuple[int, int]:
        """(ranks the rows are dealt over, this rank's place among them): (1, 0) on one process."""
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ids = batch["input_ids"]
        B, L1 = ids.shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        # Random position ids (CRD NTK's offsets, PoSE's skips) are drawn for the step's global
        # batch, the same on every rank, and each data-parallel rank takes its own rows: the
        # sampler deals rows round-robin, so rank r holds global rows r, r + dp, ... Every row thus
        # gets its own draw (not one per local index, repeated on every rank) and the ranks
        # together see what one process with the global batch sees.
        dp, dp_rank = self._data_parallel()
        pos = self.model.position.position_ids(B * dp, L1 - 1, generator=g)
        if pos.shape[0] == B * dp and dp > 1:
            pos = pos[dp_rank::dp]
        loss = self._loss(ids, pos.to(ids.device))
        # sync_dist: under DDP/FSDP the logged loss is the mean over every rank's rows.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=B,
                 sync_dist=True)  # fmt: skip
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
        # What ``load_weights`` and ``check_trained_settings`` check before a job takes the
        # checkpoint: the model's shape, and the attention and positions it was trained with.
        checkpoint["ctxlab"] = {
            "model": self.model.config.to_dict(),
            "model_class": type(self.model).__name__,
            **self.record,
        }
        # The thread count and other numeric settings, which a resumed fit keeps (ctxlab.train.numerics).
        checkpoint[numerics.CHECKPOINT_KEY] = numerics.for_checkpoint()

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
