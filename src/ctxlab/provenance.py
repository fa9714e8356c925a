"""Provenance: what a run records about itself and about the weights it trains.

A run directory's ``config.yaml`` and ``meta.json`` (``write_metadata``: the composed config, the
git state, package versions, seed, command line), and what a checkpoint or ``weights/`` folder
records about how it was trained (``trained_settings``), which ``check_trained_settings``
compares with an evaluation's settings before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctxlab.config import ConfigError
from ctxlab.loggers import say
from ctxlab.runfiles import atomic_write


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in (
        "torch",
        "triton",
        "lightning",
        "hydra-core",
        "omegaconf",
        "transformers",
        "datasets",
        "wandb",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def record_suffix(cfg: DictConfig, run_dir: Path) -> str:
    """``""`` (``config.yaml``, the run's own record) or ``".evaluate"`` for an evaluation of the
    run's own weights, which keeps the fit's record."""
    own = (
        cfg.phase.get("checkpoint")
        and Path(str(cfg.phase.checkpoint)).resolve() == (run_dir / "weights").resolve()
    )
    return ".evaluate" if (not cfg.phase.fit and own) else ""


def write_metadata(cfg: DictConfig, run_dir: Path) -> None:
    """``config.yaml`` and ``meta.json``; a later evaluation of the run's own weights writes
    ``config.evaluate.yaml`` and ``meta.evaluate.json`` instead, keeping the fit's record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = record_suffix(cfg, run_dir)
    atomic_write(run_dir / f"config{suffix}.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    meta = {"git": git_state(), "versions": package_versions(), "seed": int(cfg.seed),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    atomic_write(run_dir / f"meta{suffix}.json", json.dumps(meta, indent=2))


def scheme_record(position) -> dict:
    """How a position scheme enters the model: what ``check_trained_settings`` compares."""
    return {"name": position.name, "base": float(position.base),
            "applies_in_attention": bool(position.applies_in_attention)}  # fmt: skip


def trained_settings(cfg: DictConfig, model) -> dict:
    """What a checkpoint or a ``weights/`` folder records about how it was trained: the model,
    attention and position settings, the options chosen, and how the position scheme enters
    the model (``check_trained_settings`` compares them with an evaluation's)."""
    from ctxlab.config import choice

    groups = ("model", "attention", "position")
    return {
        "settings": {g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups},
        "choices": {g: choice(cfg, g) for g in ("attention", "position")},
        "position_scheme": scheme_record(model.position),
    }


# Attention settings that choose an implementation of the same function, not the function.
IMPLEMENTATION_KEYS = frozenset({"backend"})


def _recorded_scheme(meta: dict) -> dict | None:
    """The recorded position scheme, or (records from before it was kept) the one its settings
    build; None when they no longer build."""
    if meta.get("position_scheme"):
        return meta["position_scheme"]
    try:
        return scheme_record(instantiate(meta["settings"]["position"]))
    except Exception:
        return None


def _scheme_line(scheme: dict) -> str:
    where = "inside MS attention" if scheme["applies_in_attention"] else "before attention"
    return f"position={scheme['name']} (base={scheme['base']:g}, RoPE {where})"


def _attention_difference(meta: dict, cfg: DictConfig) -> str | None:
    def comparable(node: dict) -> dict:
        return {k: v for k, v in node.items() if k not in IMPLEMENTATION_KEYS}

    from ctxlab.config import choice

    trained = comparable(meta["settings"]["attention"])
    current = comparable(OmegaConf.to_container(cfg.attention, resolve=True))  # type: ignore[arg-type]
    if trained == current:
        return None
    was = (meta.get("choices") or {}).get("attention") or str(trained.get("_target_")).rsplit(".", 1)[-1]
    now = choice(cfg, "attention")
    if trained.get("_target_") != current.get("_target_"):
        return f"trained with attention={was}, evaluated with attention={now}"
    keys = [k for k in sorted(set(trained) | set(current)) if trained.get(k) != current.get(k)]
    return (
        f"trained with attention={was} " + ", ".join(f"{k}={trained.get(k)!r}" for k in keys)
        + ", evaluated with " + ", ".join(f"attention.{k}={current.get(k)!r}" for k in keys)
    )  # fmt: skip


def check_trained_settings(meta: dict, cfg: DictConfig, model, path: Path, setting: str) -> list[str]:
    """Compare what ``path`` was trained with (``trained_settings``, in ``meta``) with the
    attention and position this job evaluates it under. The attention must be the same option
    with the same settings (``eval.attention`` evaluates under others on purpose); positions must
    enter the model the same way with the same RoPE base (RoPE scalings at inference, ``ntk``,
    ``yarn``, ..., of a RoPE-trained model are what ``phase=extrapolate`` is for). Raises
    ConfigError naming both settings, unless ``phase.allow_other_settings``; returns the
    differences allowed so (for the summary)."""
    if not meta.get("settings"):
        say(f"{setting}: {path} records no training settings (made before they were kept): not checked")
        return []
    problems = [p for p in [_attention_difference(meta, cfg)] if p]
    scheme, now = _recorded_scheme(meta), scheme_record(model.position)
    if scheme is None:
        target = meta["settings"]["position"].get("_target_")
        if target != OmegaConf.select(cfg, "position._target_"):
            problems.append(f"trained with position {target}, evaluated with {_scheme_line(now)}")
    elif (scheme["applies_in_attention"], scheme["base"]) != (now["applies_in_attention"], now["base"]):
        problems.append(f"trained with {_scheme_line(scheme)}, evaluated with {_scheme_line(now)}")
    if problems and not cfg.phase.get("allow_other_settings", False):
        raise ConfigError(
            f"{setting}: {path} was not trained with this job's settings: {'; '.join(problems)}. Choose "
            "the settings it was trained with, evaluate it under other attentions with eval.attention, "
            "or set phase.allow_other_settings=true to evaluate it like this on purpose"
        )
    for p in problems:
        say(f"WARNING (phase.allow_other_settings=true): {setting} {p}")
    return problems
