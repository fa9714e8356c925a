"""Training callbacks (throughput/MFU, selection statistics, a checkpoint on SIGTERM) and the
loop that builds the ``callbacks`` config group's."""

from __future__ import annotations

import signal
import time
from typing import Any

import lightning as L
import torch


def instantiate_callbacks(node) -> dict[str, L.Callback]:
    """Every entry of the ``callbacks`` config node that has a ``_target_``, built, by name (an
    entry set to null is dropped); ValueError naming an entry that builds no Lightning callback."""
    from hydra.utils import instantiate

    built = {}
    for name, entry in (node or {}).items():
        if entry is None or "_target_" not in entry:
            continue
        callback = instantiate(entry)
        if not isinstance(callback, L.Callback):
            raise ValueError(f"callbacks.{name}: {entry._target_} is not a Lightning callback")
        built[str(name)] = callback
    return built


# Dense bf16 tensor-core peaks (FLOP/s) for MFU; other devices log throughput only.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token by the usual MFU convention: 6 N for the weights (forward and
    backward, recomputation and LoRA's skipped weight gradients not counted) plus dense causal
    attention, 6 x 2 x E x L / 2 per layer, whatever the attention actually computes."""
    return 6 * config.n_params() + 12 * config.n_layers * config.dim * seq_len / 2


class Throughput(L.Callback):
    """Logs tokens/s and, on a known GPU, MFU (6 N tokens + attention FLOPs, dense-equivalent).

    The clock runs from the first training batch and stops while Lightning validates inside the
    fit (``val_check_interval``), so validation time never counts as training time; the data
    loader's time between batches does. Every ``log_every`` batches the tokens and seconds since
    the last log give the window's rate. ``train_tokens`` and ``train_seconds`` total the whole
    fit (this rank's tokens, validation excluded).
    """

    def __init__(self, log_every: int = 10) -> None:
        self.log_every = log_every
        self._t0: float | None = None  # start of the running stretch of training time; None: stopped
        self._window_seconds = 0.0  # training seconds of the window before the running stretch
        self._tokens = 0
        self.train_tokens = 0
        self.train_seconds = 0.0

    def _lap(self, pl_module) -> None:
        """Move the running stretch into the window and the totals, restarting it now."""
        if self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self._window_seconds += now - self._t0
        self.train_seconds += now - self._t0
        self._t0 = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._lap(pl_module)  # the clock stops; the next training batch restarts it
        self._t0 = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._lap(pl_module)  # the last stretch after the last log counts in the totals
        self._t0 = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        split = getattr(pl_module, "context_parallel", None)  # this rank computes 1/cp of each row
        tokens = ids.shape[0] * (ids.shape[1] - 1) // (split.cp if split is not None else 1)
        self._tokens += tokens
        self.train_tokens += tokens
        if (batch_idx + 1) % self.log_every:
            return
        self._lap(pl_module)
        if self._window_seconds <= 0:
            return
        tps = self._tokens / self._window_seconds  # this rank's tokens: per GPU under DDP/FSDP
        pl_module.log("perf/tokens_per_s_per_device", tps, on_step=True)
        pl_module.log("perf/tokens_per_s", tps * trainer.world_size, on_step=True)
        on_gpu = pl_module.device.type == "cuda"
        peak = device_peak_flops() if on_gpu else None
        if peak:
            flops = model_flops_per_token(pl_module.model.config, ids.shape[1] - 1)
            pl_module.log("perf/mfu", tps * flops / peak, on_step=True)
        if on_gpu:
            pl_module.log("perf/peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30, on_step=True)
        self._window_seconds, self._tokens = 0.0, 0


class SelectionStats(L.Callback):
    """Every ``every`` training steps (and on each validation's first batch) records the
    selection of every layer whose core records one (``AttentionCore.records_selection``) for
    one batch and logs its statistics: how often each region
    distance is selected, the share inside the local neighbourhood, overlap between heads."""

    def __init__(self, every: int = 50, local_window: int = 4) -> None:
        self.every = every
        self.local_window = local_window

    def _cores(self, pl_module):
        return [c for c in pl_module.model.cores if c.records_selection]

    def _arm(self, pl_module, on: bool) -> None:
        for c in self._cores(pl_module):
            if on:
                c.record_selection = True
            else:
                c.clear_selection()

    def _log(self, pl_module, prefix: str) -> None:
        stats = [s for c in self._cores(pl_module) if (s := c.selection_stats(self.local_window)) is not None]
        if stats:  # every rank records the same layers at the same step: the ranks' mean is logged
            for key in stats[0]:
                if isinstance(stats[0][key], int | float):
                    pl_module.log(f"{prefix}/{key}", sum(s[key] for s in stats) / len(stats), sync_dist=True)
        self._arm(pl_module, False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._arm(pl_module, True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if any(c.record_selection for c in self._cores(pl_module)):
            self._log(pl_module, "selection/train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._arm(pl_module, True)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0:
            self._log(pl_module, "selection/val")


class SigtermCheckpoint(L.Callback):
    """On SIGTERM, end the fit at the end of the current step with ``path`` saved there, where
    model, optimizer, scheduler and data position agree, so a restart resumes exactly there;
    then raise Lightning's ``SIGTERMException`` before the next batch (``saved_step``: the step
    saved, None if none was; a signal during the last step lets the fit finish).

    From the start of training this callback owns SIGTERM: its handler only raises a flag.
    Lightning's own handler broadcasts from inside the signal handler, a collective that can
    pair with another rank's gradient all-reduce, and leaves ranks that got the signal at
    different steps without a common step to save at. Here, at every step's end, the ranks
    agree with one boolean all-reduce (any rank's flag stops every rank: SLURM and torchrun
    signal all of them, not necessarily between the same two steps), then all save together (a
    save is collective under FSDP; DDP writes from rank 0) and stop at the same step. With
    gradient accumulation, only a step that updated the weights is a place to stop."""

    def __init__(self, path) -> None:
        self.path = path
        self.saved_step: int | None = None
        self.requested = False
        self.stopping = False  # saved; the fit ends before the next batch
        self._previous: Any = None

    def _flag(self, signum, frame) -> None:
        self.requested = True

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested = self.requested or trainer.received_sigterm  # one that came during setup
        try:
            self._previous = signal.signal(signal.SIGTERM, self._flag)
        except ValueError:  # not the main thread: Lightning's handling stays
            self._previous = None

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)):
            return
        stop = self.requested
        if trainer.world_size > 1:  # every rank reaches here once per step: the same collectives
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self.stopping:
            return
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(str(self.path))
            self.saved_step = int(trainer.global_step)
        self.stopping = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Stop here, not where the checkpoint was saved: Lightning logs a step's metrics after its
        # batch-end hooks, and that step is in the checkpoint, so a restart does not log it again.
        if self.stopping:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()
