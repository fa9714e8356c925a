"""The Throughput callback: tokens/s counts training time only, however slow the validation.

The callback's clock is replaced by a fake one that only training and validation steps advance
(``FakeClock.sleep``), so the expected rates are exact and the test takes no real time.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ctxlab.train import callbacks
from ctxlab.train.callbacks import Throughput

ROWS, SEQ = 2, 17  # each batch: 2 rows of 17 tokens = 2 x 16 predicted tokens
TRAIN_STEP_S = 0.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Rows(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.full((SEQ,), i % 7)}


class SleepyModule(L.LightningModule):
    """A one-parameter model whose training step takes ``TRAIN_STEP_S`` and each validation
    batch ``val_step_s`` of fake time."""

    def __init__(self, clock: FakeClock, val_step_s: float) -> None:
        super().__init__()
        self.clock, self.val_step_s = clock, val_step_s
        self.w = torch.nn.Parameter(torch.ones(()))
        self.rates: list[float] = []  # every perf/tokens_per_s the callback logs

    def log(self, name, value, *args, **kwargs):
        if name == "perf/tokens_per_s":
            self.rates.append(float(value))
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        self.clock.sleep(TRAIN_STEP_S)
        return (self.w * batch["input_ids"].float()).mean()

    def validation_step(self, batch, batch_idx):
        self.clock.sleep(self.val_step_s)  # the deliberately slow validation

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(Rows(), batch_size=ROWS)

    def val_dataloader(self):
        return DataLoader(Rows(), batch_size=ROWS)


def fit(monkeypatch, val_step_s: float, *, log_every: int = 2, steps: int = 8, val_every: int = 2):
    clock = FakeClock()
    monkeypatch.setattr(callbacks, "time", clock)
    throughput, module = Throughput(log_every=log_every), SleepyModule(clock, val_step_s)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, val_check_interval=val_every, limit_val_batches=3,
        num_sanity_val_steps=2, log_every_n_steps=1, callbacks=[throughput], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)
    return throughput, module.rates, clock


@pytest.mark.parametrize("val_step_s", [0.0, 30.0], ids=["instant-validation", "slow-validation"])
def test_tokens_per_s_counts_training_time_only(monkeypatch, val_step_s):
    throughput, rates, clock = fit(monkeypatch, val_step_s)
    expected = ROWS * (SEQ - 1) / TRAIN_STEP_S  # 64 tokens/s, whatever the validation costs
    assert rates == pytest.approx([expected] * 4)  # 8 steps, a window every 2
    assert throughput.train_tokens == 8 * ROWS * (SEQ - 1)
    assert throughput.train_seconds == pytest.approx(8 * TRAIN_STEP_S)
    # The validations did run: 2 sanity batches and 3 batches after each of the 4 windows.
    assert clock.now - 1000.0 == pytest.approx(8 * TRAIN_STEP_S + (2 + 4 * 3) * val_step_s)


def test_window_spanning_a_validation_excludes_it(monkeypatch):
    """Validation every 2 steps inside windows of 4: each window holds one validation."""
    throughput, rates, _ = fit(monkeypatch, 30.0, log_every=4, steps=8, val_every=2)
    assert rates == pytest.approx([ROWS * (SEQ - 1) / TRAIN_STEP_S] * 2)
    assert throughput.train_seconds == pytest.approx(8 * TRAIN_STEP_S)
