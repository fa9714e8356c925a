"""A Hydra sweeper that searches with Optuna and takes each trial's value from the job's metrics.

Why not hydra-optuna-sweeper: its 1.3 release pins ``optuna<3``; pip resolves that to optuna
2.10 with SQLAlchemy 2, where a study in an RDB storage (``sqlite:///...``) fails on creation,
and it reads the objective as the job's return value cast to float. ctxlab's jobs return a
summary dict (:func:`ctxlab.train.job.run_job`), so the metric is picked by name
(``objective``, one of :func:`ctxlab.compare.metrics_of`'s keys) with a ``direction``.

Flow (one batch = ``n_jobs`` trials, launched together through whatever launcher is
configured, so ``launcher=slurm`` turns each batch into a SLURM job array):
1. parse the search space from ``hydra.sweeper.params`` and the command line's sweep
   overrides: ``interval(a,b)`` -> float, ``int(interval(a,b))`` -> int, ``tag(log, ...)`` ->
   log scale, ``range(a,b,s)`` -> stepped int/float, ``a,b,c`` / ``choice(...)`` -> categorical;
   plain overrides are passed to every trial unchanged;
2. before the first trial, compose a config for every categorical choice and both ends of
   every numeric range, and before each batch is launched, every trial's config, as the
   launcher will; run :func:`ctxlab.config.validate` on each and check that its job reports
   ``objective``; a bad space or objective fails before the first job runs;
3. launch, read the metric from each job's return value and tell Optuna; a failed job, a
   missing/None metric or a perplexity of a model the causality audit found non-causal (not a
   valid objective) is a failed trial; more than ``max_failure_rate`` of failed trials stops
   the search;
4. after every batch, write ``<sweep dir>/optuna_study.json``: every trial of this run (job
   number and directory, overrides, params, value, state, error) and the best of them.

With ``storage`` (e.g. ``sqlite:///study.db``) and a fixed ``study_name``, a second run adds
``n_trials`` trials to the stored study; its trial (and job) numbers continue from the stored
ones, and the sampler is reseeded so that it does not replay the stored study's first points.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, and @dataclass cannot resolve string annotations then.
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STUDY_FILE = "optuna_study.json"
# Perplexities: not a valid objective for a model that sees later tokens (the causality audit).
PERPLEXITY_PREFIXES = ("ppl@", "ppl_longest", "val_ppl")


def distribution_of(override: Override):
    """The Optuna distribution of one sweep override (see the module docstring for the syntax)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key = override.get_key_element()
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        values: list[Any] = list(override.sweep_iterator(transformer=Transformer.identity))
        if not values:
            raise ValueError(f"{override.input_line}: an empty range")
        if value.shuffle:
            return CategoricalDistribution(values)
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step or 1))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"{key}: the Optuna sweeper understands interval(), range(), choice() and a,b,c; "
        f"got {override.input_line!r}"
    )


def search_space(arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(name -> distribution for the searched overrides, the plain overrides every trial gets)."""
    parser = OverridesParser.create()
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in parser.parse_overrides(list(arguments)):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution_of(override)
        else:
            fixed.append(str(override.input_line))
    return space, fixed


def objective_value(return_value: Any, objective: str) -> float:
    """The objective from a job's return value (a ctxlab summary dict, or a plain number)."""
    from ctxlab.compare import metrics_of

    if isinstance(return_value, (int, float)) and not isinstance(return_value, bool):
        value = float(return_value)
    elif isinstance(return_value, dict):
        metrics = metrics_of(return_value)
        if metrics.get(objective) is None:
            reported = sorted(k for k, v in metrics.items() if v is not None)
            raise ValueError(f"the job reported no {objective!r} (it reported {reported})")
        if objective.startswith(PERPLEXITY_PREFIXES) and metrics.get("causal") is False:
            raise ValueError(
                f"{objective} of a model the causality audit found non-causal is not a valid perplexity"
            )
        value = float(metrics[objective])
    else:
        raise ValueError(f"the job returned {type(return_value).__name__}, not a metrics dict or a number")
    if not math.isfinite(value):
        raise ValueError(f"{objective} is {value}")
    return value


@dataclass
class TrialRecord:
    number: int
    job_num: int
    overrides: list[str]
    params: dict[str, Any]
    state: str = "RUNNING"
    value: float | None = None
    job_dir: str | None = None
    error: str | None = None


class OptunaSweeper(Sweeper):
    """Hydra sweeper driven by an Optuna study; the arguments are ``hydra.sweeper``'s keys
    (documented in ``cfg/hydra/sweeper/optuna.yaml``)."""

    def __init__(
        self,
        *,
        objective: str,
        direction: str = "minimize",
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.0,
        sampler: Any = None,
        storage: str | None = None,
        study_name: str | None = None,
        params: DictConfig | dict | None = None,
    ) -> None:
        if not objective or not isinstance(objective, str):
            raise ValueError("hydra.sweeper.objective must name a metric, e.g. ppl@1024 or passkey@512")
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction must be minimize or maximize, got {direction!r}")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError(f"hydra.sweeper.n_trials ({n_trials}) and n_jobs ({n_jobs}) must be >= 1")
        if not 0.0 <= float(max_failure_rate) <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {max_failure_rate}")
        self.objective = objective
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.sampler_cfg = sampler
        self.storage = storage
        self.study_name = study_name
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ctxlab.extras import require

        require("tune", why="hydra/sweeper=optuna")
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _sampler(self):
        """Hydra instantiates ``hydra.sweeper.sampler`` (it has a ``_target_``) with the sweeper;
        a plain mapping is instantiated here."""
        from hydra.utils import instantiate
        from optuna.samplers import BaseSampler

        if self.sampler_cfg is None or isinstance(self.sampler_cfg, BaseSampler):
            return self.sampler_cfg
        sampler = instantiate(self.sampler_cfg)
        if not isinstance(sampler, BaseSampler):
            raise ValueError(
                f"hydra.sweeper.sampler must build an optuna sampler, got {type(sampler).__name__}"
            )
        return sampler

    def _check_trials(self, overrides: list[list[str]]) -> None:
        """Compose each trial's config as the launcher will and check it before anything runs."""
        from ctxlab.compare import metric_names
        from ctxlab.config import ConfigError, scope_options, validate

        assert self.config is not None and self.hydra_context is not None
        for job_overrides in overrides:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job_overrides))
            if cfg.get("study"):
                raise ConfigError("a study (study.arms) cannot be an Optuna trial; tune one job's config")
            try:
                scope_options(cfg, cfg.hydra.runtime.choices)  # as the trial's task will (ctxlab.cli)
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"Optuna trial ({' '.join(job_overrides)}): {e}") from e
            names = metric_names(cfg)
            if self.objective not in names:
                raise ConfigError(
                    f"hydra.sweeper.objective={self.objective} is not a metric these jobs report; "
                    f"they report {', '.join(names) or 'nothing'} (the eval group's lengths decide ppl@N "
                    f"and passkey@N)"
                )

    def _check_space(self, space: dict[str, Any], fixed: list[str]) -> None:
        """Before the first trial: compose and check a config for every choice of every
        categorical parameter and both ends of every numeric one (the others at their first
        choice or low end), so a value that cannot work fails now, not trials later."""
        from optuna.distributions import CategoricalDistribution

        def probes(dist) -> list:
            return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]

        base = {name: probes(dist)[0] for name, dist in space.items()}
        configs = [
            [*fixed, *(f"{k}={value if k == name else v}" for k, v in base.items())]
            for name, dist in space.items()
            for value in probes(dist)
        ]
        self._check_trials(configs)

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        assert self.config is not None and self.launcher is not None
        params = [f"{k}={v}" for k, v in self.params.items()]
        space, fixed = search_space([*params, *arguments])
        if not space:
            raise ValueError(
                "the Optuna sweeper has nothing to search: give hydra.sweeper.params or a sweep "
                "override such as position.scale_inf='tag(log,interval(1,64))'"
            )
        self._check_space(space, fixed)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.study_name or sweep_dir.name, storage=self.storage, sampler=self._sampler(),
            direction=self.direction, load_if_exists=self.storage is not None,
        )  # fmt: skip
        if study.trials:
            # A resumed study: the seeded sampler would otherwise replay the points it drew first.
            study.sampler.reseed_rng()
        log.info(
            "Optuna study %s: %s %s over %s, %d trials, %d at a time",
            study.study_name, self.direction, self.objective, ", ".join(space), self.n_trials, self.n_jobs,
        )  # fmt: skip
        records: list[TrialRecord] = []
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        while len(records) < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - len(records))
            trials = [study.ask(fixed_distributions=space) for _ in range(batch)]
            overrides = [[*fixed, *(f"{k}={v}" for k, v in t.params.items())] for t in trials]
            self._check_trials(overrides)
            # Job number = trial number, so a study resumed from its storage gets new job folders.
            batch_records = [
                TrialRecord(t.number, t.number, o, dict(t.params)) for t, o in zip(trials, overrides)
            ]
            records += batch_records
            try:
                returns = list(self.launcher.launch(overrides, initial_job_idx=trials[0].number))
            except Exception as e:  # e.g. a SLURM job cancelled: submitit raises for the whole array
                returns = [e] * batch
            for trial, record, ret in zip(trials, batch_records, returns):
                self._tell(study, trial, record, ret)
            self._write(sweep_dir, study, records, started)
            failed = sum(r.state == "FAIL" for r in records)
            if failed > self.max_failure_rate * len(records):
                errors = "; ".join(f"trial {r.number}: {r.error}" for r in records if r.state == "FAIL")
                raise RuntimeError(
                    f"{failed} of {len(records)} Optuna trials failed, above hydra.sweeper.max_failure_rate="
                    f"{self.max_failure_rate} ({errors}); study so far in {sweep_dir / STUDY_FILE}"
                )
        best = self._best(records)
        if best is not None:
            log.info("Best trial %d: %s = %s with %s", best.number, self.objective, best.value, best.params)
        log.info("Optuna study written to %s", sweep_dir / STUDY_FILE)
        return records

    def _tell(self, study, trial, record: TrialRecord, ret: Any) -> None:
        from optuna.trial import TrialState

        try:
            if isinstance(ret, BaseException):
                raise ret
            if ret.hydra_cfg is not None:
                record.job_dir = str(Path(str(ret.hydra_cfg.hydra.runtime.output_dir)).resolve())
            value = objective_value(ret.return_value, self.objective)  # re-raises a failed job's error
        except Exception as e:
            record.state, record.error = "FAIL", f"{type(e).__name__}: {e}"
            log.warning("Optuna trial %d failed: %s", record.number, record.error)
            study.tell(trial, state=TrialState.FAIL)
            return
        record.state, record.value = "COMPLETE", value
        study.tell(trial, value)

    def _best(self, records: list[TrialRecord]) -> TrialRecord | None:
        done = [r for r in records if r.state == "COMPLETE"]
        if not done:
            return None
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda r: r.value)

    def _write(self, sweep_dir: Path, study, records: list[TrialRecord], started: str) -> None:
        best = self._best(records)
        doc = {
            "study_name": study.study_name,
            "storage": self.storage,
            "sampler": type(study.sampler).__name__,
            "objective": self.objective,
            "direction": self.direction,
            "n_trials": self.n_trials,
            "n_jobs": self.n_jobs,
            "search_space": {k: repr(v) for k, v in study.trials[0].distributions.items()}
            if study.trials
            else {},
            "started": started,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "trials": [r.__dict__ for r in records],
            "best": None if best is None else best.__dict__,
        }
        tmp = sweep_dir / f".{STUDY_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(sweep_dir / STUDY_FILE)
