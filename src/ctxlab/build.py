"""What a job is built from: the model (ctxlab's decoder or an HF model with ctxlab attention),
the evaluation settings and the device."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def is_hf(cfg: DictConfig) -> bool:
    return cfg.model.get("kind") == "hf"


def build_model(cfg: DictConfig, position=None):
    """ctxlab's own decoder, or (``model.kind=hf``) a transformers model with ctxlab attention;
    ``position``: an existing position scheme to share (else one is built from ``cfg.position``)."""
    position = position if position is not None else instantiate(cfg.position)
    if is_hf(cfg):
        from ctxlab.extras import require

        source = cfg.model.get("source")
        needed = ("transformers", "peft", "gguf") if source == "smollm2" else ("transformers", "peft")
        require("hf", *needed, why=f"model.kind=hf (model.source={source})")
        from ctxlab.model.hf_build import build_hf_model

        return build_hf_model(instantiate(cfg.model), instantiate(cfg.attention), position)
    from ctxlab.model import Llama

    return Llama(instantiate(cfg.model), instantiate(cfg.attention), position)


def eval_configs(cfg: DictConfig):
    ppl = instantiate(cfg.eval.perplexity)
    pk = instantiate(cfg.eval.passkey)
    return ppl, pk


def device_of(cfg: DictConfig) -> torch.device:
    acc = str(cfg.trainer.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
