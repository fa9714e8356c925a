"""The `ctxlab` Hydra app: `ctxlab [group=option ...] [key=value ...]`, `ctxlab --cfg job`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """``cfg/`` of the source tree (editable install), or ``$CTXLAB_CFG``."""
    env = os.environ.get("CTXLAB_CFG")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "cfg"
    if not (path / "config.yaml").exists():
        raise SystemExit(f"ctxlab: no config.yaml in {path}; set CTXLAB_CFG to ctxlab's cfg/ folder")
    return str(path)


def _task(cfg: DictConfig) -> dict:
    from ctxlab.config import ConfigError
    from ctxlab.run import run

    try:
        # The job's summary is its return value: sweepers (hydra/sweeper=optuna) read metrics from it.
        return run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"ctxlab: error: {e}", file=sys.stderr, flush=True)
        raise


def expose_plugins() -> None:
    """Let Hydra's plugin scan see ctxlab's own plugins (hydra/sweeper=optuna) in an editable
    install. Hydra finds plugins by listing the ``hydra_plugins`` namespace package's folders,
    and a PEP 660 editable install serves ``src/hydra_plugins`` through an import hook that
    such a listing cannot see (hydra issues #2359, #3252); a wheel install puts it in site-packages."""
    import hydra_plugins

    here = str(Path(__file__).resolve().parents[1] / "hydra_plugins")
    if Path(here).is_dir() and here not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(here)


def main() -> None:
    import ctxlab.config  # noqa: F401  (registers ctxlab's OmegaConf resolvers)

    expose_plugins()

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()
