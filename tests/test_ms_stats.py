"""Selection statistics on hand-worked index tensors and on a real selection."""

from __future__ import annotations

import math

import pytest
import torch

from ctxlab.attention.stats import selection_stats
from ctxlab.kernels.ms_attention import ms_select

# budget=4, merge=2: blocks start at regions 4 and 6 and select 2 regions each.
IDX = torch.tensor(
    [
        [
            [[3, 0], [5, 4]],  # head 0: distances 1, 4 | 1, 2
            [[3, 1], [0, 5]],  # head 1: distances 1, 3 | 6, 1
        ]
    ]
)


def test_hand_worked_statistics():
    stats = selection_stats(IDX, budget=4, merge=2)
    assert stats["num_selections"] == 8
    assert stats["distance_bucket_lo"] == [1, 2, 4]
    # distance 1 four times; 2 and 3 in [2, 4); 4 and 6 in [4, 8).
    assert stats["distance_hist"] == pytest.approx([0.5, 0.25, 0.25])
    assert stats["mean_distance"] == pytest.approx(19 / 8)
    assert stats["local_share"] == pytest.approx(5 / 8)  # window T - m = 2
    # Both blocks: one shared region out of three.
    assert stats["head_jaccard"] == pytest.approx(1 / 3)


def test_local_window_and_ignored_entries():
    idx = IDX.clone()
    idx[0, 1, 1, 1] = -1  # head 1, block 1 keeps only region 0
    stats = selection_stats(idx, budget=4, merge=2, local_window=3)
    assert stats["num_selections"] == 7
    assert stats["local_share"] == pytest.approx(5 / 7)  # distances 1, 4, 1, 2, 1, 3, 6
    assert stats["distance_hist"] == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    assert stats["head_jaccard"] == pytest.approx((1 / 3 + 0) / 2)


def test_one_head_and_no_blocks_give_nan():
    assert math.isnan(selection_stats(IDX[:, :1], budget=4, merge=2)["head_jaccard"])
    empty = selection_stats(torch.empty(1, 2, 0, 2, dtype=torch.long), budget=4, merge=2)
    assert empty["num_selections"] == 0 and empty["distance_hist"] == []
    assert math.isnan(empty["local_share"])


@pytest.mark.parametrize(
    ("idx", "kwargs", "name"),
    [
        (IDX.float(), dict(budget=4, merge=2), "idx"),
        (IDX[0], dict(budget=4, merge=2), "idx"),
        (IDX, dict(budget=5, merge=2), "budget"),
        (IDX, dict(budget=4, merge=2, local_window=-1), "local_window"),
        (IDX.clone().fill_(4), dict(budget=4, merge=2), "idx"),
    ],
    ids=["float", "rank3", "budget", "window", "region-in-block"],
)
def test_bad_input_raises_naming_it(idx, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        selection_stats(idx, **kwargs)


def test_recency_scores_give_a_sliding_window():
    """Scores growing with j (k_j = e_j, q_i[j] = j) make every causal row pick the regions
    just before the block: all selections are local and all heads agree."""
    L, budget, merge = 24, 6, 2
    k = torch.eye(L, dtype=torch.float64)[None, :, None, :]
    q = torch.arange(L, dtype=torch.float64).expand(1, L, 3, L).contiguous()
    idx = ms_select(q, k, region=1, budget=budget, merge=merge, scope="head", select="causal")
    stats = selection_stats(idx, budget=budget, merge=merge)
    assert stats["local_share"] == 1.0
    assert stats["head_jaccard"] == 1.0
    assert stats["mean_distance"] == pytest.approx(2.5)  # distances 1..4


def test_selection_stats_callback_logs_train_and_val_statistics():
    """The Lightning callback arms the MS cores, logs the mean statistics over the MS layers
    under selection/train (every ``every`` steps) and selection/val (first batch), then disarms."""
    import lightning as L
    from helpers import tiny_model
    from torch.utils.data import DataLoader

    from ctxlab.attention.stats import selection_stats
    from ctxlab.train.callbacks import SelectionStats
    from ctxlab.train.module import LMModule

    model = tiny_model("causal", layers=2).train()
    ids = torch.randint(0, 64, (4, 41), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row} for row in ids]

    class Record(L.Callback):
        def __init__(self) -> None:
            self.logged: list[dict] = []

        def on_validation_end(self, trainer, pl_module):
            self.logged.append(dict(trainer.callback_metrics))

    rec = Record()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[SelectionStats(every=1), rec],
    )  # fmt: skip
    module = LMModule(model, lambda p: torch.optim.AdamW(p, lr=1e-3), seed=0)
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    metrics = rec.logged[-1]
    keys = {k for k in metrics if k.startswith("selection/")}
    assert {"selection/train/local_share", "selection/val/local_share"} <= keys, keys
    assert all(not c.record_selection and c.last_selection is None for c in model.cores)  # disarmed
    # the val figure is the mean over the layers of selection_stats on the first val batch
    model.eval()
    for c in model.cores:
        c.record_selection = True
    with torch.no_grad():
        model(ids[:2, :-1])
    want = sum(
        selection_stats(c.last_selection, budget=c.settings.budget, merge=c.settings.merge, local_window=4)[
            "local_share"
        ]
        for c in model.cores
    ) / len(model.cores)
    assert float(metrics["selection/val/local_share"]) == pytest.approx(want, abs=1e-6)
