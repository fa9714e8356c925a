"""The `ctxlab` Hydra app: `ctxlab [group=option ...] [key=value ...]`, `ctxlab --cfg job`.

An option's own settings apply to the options that have them (ctxlab.config.scope_options):
every job's config is scoped before it runs, and ``--cfg job`` prints the scoped config."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """ctxlab's config folder (``ctxlab.options.config_dir``: ``$CTXLAB_CFG``, the source tree's
    ``cfg/``, the installed copy); exits naming the folder where it has no ``config.yaml``."""
    from ctxlab.options import config_dir as find

    path = find()
    if not (path / "config.yaml").is_file():
        where = "CTXLAB_CFG" if os.environ.get("CTXLAB_CFG") else "nor in the installed ctxlab/cfg"
        raise SystemExit(
            f"ctxlab: no config.yaml in {path} ({where}); set CTXLAB_CFG to ctxlab's cfg/ folder"
        )
    return str(path)


def _task(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from ctxlab.config import ConfigError, scope_options
    from ctxlab.loggers import say
    from ctxlab.run import run
    from ctxlab.runfiles import RunWriteError, write_error

    try:
        # Every job of a multirun passes here. A study's arms are composed, scoped and reported
        # one by one (run_study); its base config is only scoped.
        scope_options(cfg, HydraConfig.get().runtime.choices, say=None if cfg.get("study") else say)
        # The job's summary is its return value: sweepers (hydra/sweeper=optuna) read metrics from it.
        return run(cfg)
    except (ConfigError, FileNotFoundError, RunWriteError) as e:
        print(f"ctxlab: error: {e}", file=sys.stderr, flush=True)
        raise
    except OSError as e:  # a write that no run-file writer wrapped: still name the file and the space
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        error = write_error(e.filename or cfg.run_dir, e)
        print(f"ctxlab: error: {error}", file=sys.stderr, flush=True)
        raise error from e


def expose_plugins() -> None:
    """Let Hydra's plugin scan see ctxlab's own plugins (hydra/sweeper=optuna) in an editable
    install. Hydra finds plugins by listing the ``hydra_plugins`` namespace package's folders,
    and a PEP 660 editable install serves ``src/hydra_plugins`` through an import hook that
    such a listing cannot see (hydra issues #2359, #3252); a wheel install puts it in site-packages."""
    import hydra_plugins

    here = str(Path(__file__).resolve().parents[1] / "hydra_plugins")
    if Path(here).is_dir() and here not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(here)


def show_job_config(argv: list[str]) -> bool:
    """``ctxlab --cfg job [-p PACKAGE] [--resolve] [overrides]``: print the job's config as its task
    gets it, scoped by ctxlab.config.scope_options (Hydra's own ``--cfg job`` prints the
    composition before ctxlab's rule applies). False, printing nothing, for any other command line
    (``--cfg hydra|all``, ``--config-name``, ``--info``, ...), which Hydra handles as usual."""
    if not {"--cfg", "-c"} & set(argv) or "--version" in argv:
        return False
    import argparse

    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError:
        return False
    if unknown:  # a malformed command line: Hydra reports it
        return False
    others = ("help", "hydra_help", "info", "shell_completion", "config_path", "config_name", "config_dir",
              "experimental_rerun")  # fmt: skip
    if args.cfg != "job" or any(getattr(args, name) for name in others):
        return False
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from ctxlab.config import ConfigError, compose_job

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="cli"):
            cfg = compose_job(args.overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves under --resolve, as in Hydra
            OmegaConf.set_readonly(cfg.hydra, None)
            with open_dict(cfg):
                del cfg["hydra"]
            package = None if args.package in (None, "_global_") else args.package
            node = cfg if package is None else OmegaConf.select(cfg, package)
            if node is None:
                raise SystemExit(f"package '{package}' not found in config")
            if not OmegaConf.is_config(node):
                print(node)
                return True
            if package is not None:
                print(f"# @package {package}")
            if args.resolve:
                OmegaConf.resolve(node)
            sys.stdout.write(OmegaConf.to_yaml(node))
    except ConfigError as e:
        raise SystemExit(f"ctxlab: error: {e}") from e
    except (HydraException, OmegaConfBaseException) as e:
        raise SystemExit(
            f"{e}\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
        ) from e
    return True


# Command-line choices that need an optional part (``ctxlab.extras``) before Hydra can compose them:
# Hydra alone would report a missing config group option, not the missing package.
PLUGIN_EXTRAS = {"launcher=slurm": "slurm", "hydra/launcher=submitit_slurm": "slurm",
                 "hydra/sweeper=optuna": "tune"}  # fmt: skip


def check_plugin_extras(argv: list[str]) -> None:
    from ctxlab.extras import MissingExtra, require

    for arg in argv:
        extra = PLUGIN_EXTRAS.get(arg.lstrip("+"))
        if extra is not None:
            try:
                require(extra, why=arg)
            except MissingExtra as e:
                raise SystemExit(f"ctxlab: error: {e}") from e


def main() -> None:
    from ctxlab.config import force_add_settings, swept_keys  # also registers ctxlab's resolvers

    expose_plugins()
    check_plugin_extras(sys.argv[1:])

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    # A setting of a config group that the chosen option lacks must reach ctxlab's rule
    # (ctxlab.config.scope_options, in _task) instead of Hydra's "not in struct" error: pass it to
    # Hydra as a force-add, ++G.key=value. Flags start with "-" and are left as they are.
    sys.argv[1:] = force_add_settings(sys.argv[1:], plain=swept_keys(sys.argv[1:]))
    if show_job_config(sys.argv[1:]):
        return
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()
