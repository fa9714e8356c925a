"""What ``ctxlab`` runs once Hydra has composed the config: a study (``ctxlab.study``) or one job
(``ctxlab.train.job``), after the composition checks (``ctxlab.config``)."""

from __future__ import annotations

from omegaconf import DictConfig

from ctxlab import distributed
from ctxlab.config import check_numbers, validate
from ctxlab.study import run_study
from ctxlab.train.job import run_job


def agree_run_dir(cfg: DictConfig) -> None:
    """Several ranks: every rank takes rank 0's ``run_dir`` (Hydra's time-stamped default may differ
    by a second between ranks; the directory Hydra made for another rank is removed)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    cfg.run_dir = str(distributed.agree_run_dir(cfg.run_dir, hydra_dir))


def run(cfg: DictConfig) -> dict:
    check_numbers(cfg)
    validate(cfg)
    if distributed.init(cfg.trainer) > 1:
        agree_run_dir(cfg)
    if cfg.get("study"):
        return run_study(cfg)
    return run_job(cfg)
