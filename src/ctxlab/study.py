"""Studies: several jobs ("arms", each a list of overrides on top of the command line), run in
turn, then compared in one table and plot. Every arm is composed and validated before any runs;
an arm whose results exist for the same grid is skipped, one with trained weights is evaluated
again only."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ctxlab import distributed
from ctxlab.config import ConfigError, validate
from ctxlab.loggers import say
from ctxlab.train.job import run_job
from ctxlab.weights import weights_complete


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_study(cfg: DictConfig) -> dict:
    """Compose every arm first (so a bad arm fails before any work), then run them in turn."""
    from hydra.core.hydra_config import HydraConfig

    from ctxlab.compare import compare_runs
    from ctxlab.config import check_study_overrides, compose_job

    root = Path(cfg.run_dir).resolve()
    base = [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.", "hydra/", "study"))]
    # A command-line override applies to every arm, or is refused here, before any arm runs.
    check_study_overrides(base, cfg.study.arms)
    arms = {}
    for name, overrides in cfg.study.arms.items():
        arm_dir = root / "arms" / slug(name)
        ov = [*base, *overrides, f"run_dir={arm_dir}", "study=null", f"name={name}"]
        try:
            # Scoped with the arm's own choices: settings its options lack are dropped and reported.
            arm_cfg = compose_job(ov, say=lambda line, name=name: say(f"study arm {name!r}: {line}"))
            validate(arm_cfg)
        except ConfigError as e:
            raise ConfigError(f"study arm {name!r}: {e}") from e
        arms[name] = (arm_cfg, arm_dir)
    say(f"study with {len(arms)} arms under {root}")
    t0 = time.perf_counter()
    only = list(cfg.study.get("only") or [])
    unknown = [n for n in only if n not in arms]
    if unknown:
        raise ConfigError(f"study.only names arms the study does not have: {unknown} (arms: {list(arms)})")
    for name, (arm_cfg, arm_dir) in arms.items():  # an arm whose settings changed: refused before any work
        if not only or name in only:
            arm_state(arm_cfg, arm_dir)
    for i, (name, (arm_cfg, arm_dir)) in enumerate(arms.items()):
        if only and name not in only:
            say(f"[{i + 1}/{len(arms)}] {name}: not in study.only, left for later")
            continue
        state = distributed.broadcast(arm_state(arm_cfg, arm_dir))  # rank 0 decides
        if state == "done":
            say(f"[{i + 1}/{len(arms)}] {name}: results exist for this grid, skipped")
            continue
        if state == "evaluate":
            say(f"[{i + 1}/{len(arms)}] {name}: trained earlier; evaluating its saved weights")
            arm_cfg = evaluation_only(arm_cfg, arm_dir)
        else:
            say(f"[{i + 1}/{len(arms)}] {name}")
        run_job(arm_cfg)
    if not distributed.is_rank_zero():
        return {}
    report = compare_runs([d for _, d in arms.values()], root / "compare", title=str(cfg.name))
    say(f"study finished in {time.perf_counter() - t0:.0f} s")
    print(report["markdown"], flush=True)
    say(f"tables: {report['table_md']}  {report['table_csv']}")
    say(f"plots:  {report['ppl_png']}  {report['passkey_png']}")
    return report


def arm_state(cfg: DictConfig, run_dir: Path) -> str:
    """``done`` (results of this very grid exist), ``evaluate`` (trained weights exist, the grid
    is new or unfinished: evaluate them, finished cells are kept) or ``run``. An arm whose
    directory holds training under other settings than the arm's now (other than those a
    restart may change, ``ctxlab.rundir.MAY_CHANGE``: the evaluation grid among them) is
    refused with ConfigError naming them, instead of reusing stale weights and results."""
    from ctxlab.rundir import check_restart

    if cfg.phase.fit:
        check_restart(cfg, run_dir, what=f"study arm {str(cfg.name)!r}: its directory")
    from ctxlab.eval.niah import comparable_grid

    grid = run_dir / "results" / "grid.json"
    current = comparable_grid(OmegaConf.to_container(cfg.eval, resolve=True))
    finished = (run_dir / "results" / "summary.json").exists()
    if finished and grid.exists() and comparable_grid(json.loads(grid.read_text())) == current:
        return "done"
    trained = weights_complete(run_dir / "weights") and (run_dir / "results" / "fit.json").exists()
    if cfg.phase.fit and trained:
        return "evaluate"
    if not cfg.phase.fit and finished and not grid.exists():
        return "done"  # an evaluation-only arm from before grids were recorded
    return "run"


def evaluation_only(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` turned into an evaluation of the run's own saved weights (``weights/``)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.phase.fit = False
        cfg.phase.checkpoint = str(run_dir / "weights")
    return cfg
