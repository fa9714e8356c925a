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


def _task(cfg: DictConfig) -> None:
    from ctxlab.config import ConfigError
    from ctxlab.run import run

    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"ctxlab: error: {e}", file=sys.stderr, flush=True)
        raise


def main() -> None:
    import ctxlab.config  # noqa: F401  (registers ctxlab's OmegaConf resolvers)

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()
