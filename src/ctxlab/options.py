"""The options of ctxlab's config groups, read from ``cfg/`` without composing a whole config.

A group is a folder of ``cfg/`` (``attention``, ``position``, ...); an option is one YAML file in
it. An option may build on other options of its own group through its ``defaults`` list
(``ms_causal`` on ``ms``, ``gpu`` on ``cpu``); ``option_node`` follows that chain, so the node it
returns is what the option contributes to a composed config before experiments and the command
line patch it. Generic code uses these to tell which settings an option has
(``declared_keys``) and to build an option by name outside a Hydra app (the evaluation
attention of ``eval.attention``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    """ctxlab's config folder: ``$CTXLAB_CFG`` if set, else ``cfg/`` of the source tree this
    module runs from (an editable install or a checkout on ``PYTHONPATH``), else the copy the
    wheel ships as ``ctxlab/cfg`` (``experiment/`` holds the copied ``experiments/*.yaml``).
    Where none has a ``config.yaml``, the source tree's path, which callers report as missing."""
    env = os.environ.get("CTXLAB_CFG")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    source, packaged = here.parents[1] / "cfg", here / "cfg"
    if (here.parents[1] / "pyproject.toml").is_file() and (source / "config.yaml").is_file():
        return source
    return packaged if (packaged / "config.yaml").is_file() else source


def groups() -> list[str]:
    """Every config group (a folder of ``cfg/`` holding options)."""
    root = config_dir()
    folders = (p for p in root.iterdir() if p.is_dir() and p.name != "hydra")
    return sorted(p.name for p in folders if any(p.glob("*.yaml")))


def option_names(group: str) -> list[str]:
    """The options of ``group``, by file name."""
    folder = config_dir() / group
    if not folder.is_dir():
        raise ValueError(f"no config group {group!r} in {config_dir()}")
    return sorted(p.stem for p in folder.glob("*.yaml"))


@cache
def _option_node(root: str, group: str, name: str) -> DictConfig:
    path = Path(root) / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{group}={name}: no such option (options: {', '.join(option_names(group))})")
    raw = OmegaConf.load(path)
    defaults = raw.pop("defaults", []) if isinstance(raw, DictConfig) else []
    node = OmegaConf.create({})
    own_seen = False
    for entry in defaults:
        if entry == "_self_":
            node = OmegaConf.merge(node, raw)
            own_seen = True
        elif isinstance(entry, str):
            node = OmegaConf.merge(node, _option_node(root, group, entry))
        else:
            raise ValueError(f"{path}: only same-group defaults are supported in an option, got {entry!r}")
    if not own_seen:
        node = OmegaConf.merge(node, raw)
    return node


def option_node(group: str, name: str) -> DictConfig:
    """What option ``name`` of ``group`` contributes to a composed config (its in-group defaults
    followed), unresolved: interpolations such as ``${model.head_dim}`` stay as they are."""
    return OmegaConf.create(OmegaConf.to_container(_option_node(str(config_dir()), group, name)))


def declared_keys(group: str, name: str) -> set[str]:
    """The top-level settings that option ``name`` of ``group`` has."""
    return set(_option_node(str(config_dir()), group, name).keys())


def group_keys(group: str) -> dict[str, list[str]]:
    """Every setting any option of ``group`` has -> the options that have it."""
    out: dict[str, list[str]] = {}
    for name in option_names(group):
        for key in declared_keys(group, name):
            out.setdefault(key, []).append(name)
    return out
