"""Shared test settings: offline everything, tiny shapes, and the GPU marker's skip."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves os.environ as it found it: a job run in-process sets Lightning's
    ``PL_GLOBAL_SEED``/``PL_SEED_WORKERS`` (seed_everything), which subprocesses of later tests
    would inherit (DDP workers re-seed from it and then differ from an in-process reference)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
