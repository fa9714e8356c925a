"""Optional parts of ctxlab (pyproject's extras) and the error that names the one missing.

ctxlab's core needs none of them; a feature that does calls :func:`require` before it imports
the part's packages, so a user without them reads which extra to install instead of a bare
``ModuleNotFoundError`` from deep inside a job::

    ctxlab: logger=wandb needs ctxlab's optional part [wandb] (missing: wandb).
    Install it with: pip install 'ctxlab[wandb]'  (make setup installs every optional part)
"""

from __future__ import annotations

import importlib

from ctxlab.config import ConfigError

# extra -> the modules it provides (import names, not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "peft", "accelerate", "gguf"),
    "wandb": ("wandb",),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
    "tune": ("optuna",),
    "lmeval": ("lm_eval",),
}


class MissingExtra(ConfigError, ImportError):
    """An optional part that a chosen feature needs is not installed. A ConfigError (the CLI
    reports it as a bad setting) and an ImportError (callers that fall back on a missing
    import keep working)."""


def missing(extra: str, *modules: str) -> list[str]:
    """The modules of ``extra`` (all of them, or those named) that do not import."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown optional part {extra!r}; ctxlab's extras are {sorted(EXTRAS)}")
    wanted = modules or EXTRAS[extra]
    unknown = [m for m in wanted if m not in EXTRAS[extra]]
    if unknown:
        raise ValueError(f"{unknown} are not modules of ctxlab[{extra}] ({', '.join(EXTRAS[extra])})")
    out = []
    for name in wanted:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def require(extra: str, *modules: str, why: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` and the install command when any of its
    modules (all of them, or those named) does not import; ``why``: the feature that needs it
    (``"logger=wandb"``)."""
    absent = missing(extra, *modules)
    if absent:
        raise MissingExtra(
            f"{why} needs ctxlab's optional part [{extra}] (missing: {', '.join(absent)}). Install it "
            f"with: pip install 'ctxlab[{extra}]'  (make setup installs every optional part)"
        )
