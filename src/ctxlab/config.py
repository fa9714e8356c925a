"""Composition-time checks: combinations the code cannot honour fail here, naming the settings,
before any data is read or any weight is built."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A composed configuration that cannot work; the message names the settings."""


def _target(node) -> str:
    return str(node.get("_target_", "")) if node is not None else ""


def is_ms(cfg: DictConfig) -> bool:
    return _target(cfg.attention).endswith("MSAttention")


def choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for ``group`` when known (Hydra app), else the target's class name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except Exception:
        return _target(cfg.get(group)).rsplit(".", 1)[-1] or "?"


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for any combination that cannot work."""
    from ctxlab.kernels.ms_attention import validate_ms_args

    pos_target = _target(cfg.position)
    if pos_target.endswith("Selected") and not is_ms(cfg):
        raise ConfigError(
            f"position=selected applies RoPE only to the tokens MS attention selects, but "
            f"attention={choice(cfg, 'attention')} selects nothing; use attention=ms or ms_causal"
        )
    seq_len = int(cfg.data.seq_len)
    if is_ms(cfg):
        a = cfg.attention
        try:
            validate_ms_args(
                region=a.region, budget=a.budget, merge=a.merge, pool=a.pool, scope=a.scope, select=a.select
            )
        except ValueError as e:
            raise ConfigError(f"attention.{e}") from e
        n = math.ceil(seq_len / a.region)
        if cfg.phase.fit and n <= a.budget:
            raise ConfigError(
                f"attention={choice(cfg, 'attention')} with attention.region={a.region} and "
                f"attention.budget={a.budget} covers {a.region * a.budget} tokens, but "
                f"data.seq_len={seq_len} is only {n} regions: at the training length MS attention "
                f"would be exactly dense attention. Lower attention.budget or attention.region, "
                f"or raise data.seq_len."
            )
    own_model = cfg.model.get("kind") != "hf"  # an HF model brings pre-trained weights
    if own_model and not cfg.phase.fit and not cfg.phase.get("checkpoint"):
        raise ConfigError("phase=extrapolate evaluates trained weights: set phase.checkpoint=<path to .ckpt>")
    if own_model and cfg.phase.name == "finetune" and not cfg.phase.get("init_from"):
        raise ConfigError("phase=finetune starts from trained weights: set phase.init_from=<path to .ckpt>")
    if cfg.logger.kind not in ("wandb", "csv"):
        raise ConfigError(f"logger.kind must be wandb or csv, got {cfg.logger.kind!r}")
    if cfg.trainer.get("max_steps", -1) in (None, 0):
        raise ConfigError("trainer.max_steps must be > 0 (or -1 with max_epochs)")
    study = cfg.get("study")
    if study is not None:
        arms = study.get("arms")
        if not arms:
            raise ConfigError("study.arms must name at least one arm (name: [overrides])")
        for name, overrides in arms.items():
            if not OmegaConf.is_list(overrides):
                raise ConfigError(f"study.arms.{name} must be a list of overrides, got {overrides!r}")


def _smollm2_dir() -> str:
    from ctxlab.model.hf_sources import smollm2_checkpoint

    return str(smollm2_checkpoint())


def _gpus_per_node(accelerator: str, devices):
    """GPUs a SLURM task array asks for per node: the trainer's devices on a GPU trainer, none on
    a CPU one (a CPU-only cluster rejects --gpus-per-node)."""
    if str(accelerator) not in ("gpu", "cuda"):
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"launcher=slurm with a GPU trainer needs an int trainer.devices, got {devices!r}")
    return devices


if not OmegaConf.has_resolver("ctxlab.gpus_per_node"):
    OmegaConf.register_new_resolver("ctxlab.gpus_per_node", _gpus_per_node)

# `${ctxlab.smollm2_dir:}`: the packaged SmolLM2 converted once to a checkpoint folder (with its
# tokenizer), resolved only when a config that names it is used.
if not OmegaConf.has_resolver("ctxlab.smollm2_dir"):
    OmegaConf.register_new_resolver("ctxlab.smollm2_dir", _smollm2_dir, use_cache=True)
