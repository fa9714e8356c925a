"""Running on SLURM: safe preemption and requeue, atomic checkpoints, and a sweep that is
validated in full before anything is submitted.

Who requeues. A multirun with ``launcher=slurm`` runs every job through submitit
(hydra-submitit-launcher), which asks SLURM for the pre-timeout signal (``#SBATCH
--signal=USR2@<signal_delay_s>``) and installs a handler for it that re-pickles the job and
calls ``scontrol requeue``. Lightning would do the same on its own (``SLURMEnvironment``
with ``auto_requeue=True`` saves an ``hpc_ckpt`` inside the signal handler, in the middle of
whatever step is running, and requeues): two requeue paths on one job fight. So submitit
owns the requeue, Lightning gets ``SLURMEnvironment(auto_requeue=False)`` (it still takes
its DDP ranks from SLURM), and :class:`PreemptionCheckpoint` sits between them: the signal
only raises a flag; at the end of the current training step (a consistent state) it writes
``run_dir/checkpoints/last.ckpt`` atomically, then hands over to submitit's handler. The
requeued job composes the same config, finds the same ``run_dir`` and resumes from
``last.ckpt`` with the same W&B run id (:func:`ctxlab.train.job.run_job`).

Every checkpoint Lightning writes goes through :class:`AtomicCheckpointIO` (temporary file,
fsync, ``os.replace``), so a job killed while saving leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from ctxlab.runfiles import is_write_failure, write_error

log = logging.getLogger(__name__)


def in_slurm_job() -> bool:
    """True inside a SLURM batch job or step (not an interactive ``srun --pty bash`` shell)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return "SLURM_JOB_ID" in os.environ and SLURMEnvironment.detect()


def in_submitit_job() -> bool:
    """True inside a job that submitit started on SLURM (its sbatch script exports this)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def preemption_signal() -> signal.Signals:
    """The pre-timeout signal: submitit's choice, ``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL``
    names another (USR1 is best avoided: NCCL may catch it)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig = getattr(signal, f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name (e.g. USR2)")
    return sig


def slurm_job_id() -> str:
    """``<array id>_<task id>`` for an array task, else ``SLURM_JOB_ID``."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id:
        return f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a reader never sees a half-written file: the
    checkpoint goes to a temporary file in the same folder, is fsynced, then ``os.replace``d
    onto the target (atomic on POSIX file systems). Local paths only. A failed write (a full disk)
    removes the temporary file and raises ``ctxlab.runfiles.RunWriteError`` naming the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except Exception as e:  # a full disk: torch.save reports "unexpected pos", not ENOSPC
            if is_write_failure(e):
                raise write_error(target, e, "checkpoint less often (trainer.val_check_interval)") from e
            raise
        finally:
            tmp.unlink(missing_ok=True)


def trainer_plugins() -> list:
    """Plugins every ctxlab Trainer gets: atomic checkpoints and, inside a SLURM job, a SLURM
    environment that leaves requeueing to :class:`PreemptionCheckpoint` and submitit."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    plugins: list = [AtomicCheckpointIO()]
    if in_slurm_job():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def scontrol_requeue(signum: int) -> None:
    """Requeue this SLURM job and exit: the fallback for jobs that submitit did not start
    (e.g. ``sbatch --requeue --signal=USR2@120 ctxlab ...``)."""
    job = slurm_job_id()
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    log.info("requeued SLURM job %s after signal %s", job, signal.Signals(signum).name)
    raise SystemExit(f"requeued SLURM job {job}")


def finish_wandb() -> None:
    """Finish the active W&B run, if any, before a requeue: ``scontrol requeue`` sends SIGTERM
    to every process of the job, W&B's service process included, and a run finished after
    that fails with "Connection lost" (which would replace the exit that requeues the job)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


class PreemptionCheckpoint(L.Callback):
    """On the pre-timeout signal: finish the running step, save ``path`` atomically, requeue.

    The signal handler only records the signal; the checkpoint is written at the end of the
    next training step (or at the end of training), where model, optimizer, scheduler and loop
    counters agree, so the resumed run continues exactly where this one stopped. With gradient
    accumulation only a batch that stepped the optimizer is such a step (the accumulated
    gradients are in no checkpoint). The hand-over waits for the next batch's start (or the end
    of training): Lightning logs a step's metrics, and runs a validation due at that step, after
    the batch-end hooks; the checkpoint holds that step, so the requeued job does neither again
    and they would be lost. Requeueing is delegated to ``requeue(signum)``: by default the
    handler that was installed before ours (submitit's ``checkpoint_and_try_requeue``, which
    re-pickles the job, calls ``scontrol requeue`` and exits), or :func:`scontrol_requeue` when
    there was none. Outside SLURM the callback does nothing unless ``requeue`` is given (tests).

    Args:
        path: the checkpoint the requeued job resumes from (``run_dir/checkpoints/last.ckpt``).
        signum: the signal to handle; default :func:`preemption_signal`.
        requeue: called with the signal number after the checkpoint is saved; must not return
            normally (requeue and exit, or raise).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        signum: int | None = None,
        requeue: Callable[[int], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.signum = signal.Signals(signum) if signum is not None else preemption_signal()
        self._requeue = requeue
        self.active = requeue is not None or in_slurm_job()
        self.pending: int | None = None
        self.saved: int | None = None  # the signal whose checkpoint is written; hand over next
        self._previous: Any = None
        self._installed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in ``setup``: Lightning snapshots every handler after ``setup`` and puts the
        # snapshot back when the fit ends, which would leave ours installed.
        if not self.active:
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._note_signal)
        self._installed = True

    def _note_signal(self, signum: int, frame: Any) -> None:
        log.warning(
            "caught %s: checkpoint at the end of this step, then requeue", signal.Signals(signum).name
        )
        self.pending = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) == 0
        if self.pending is not None and self.saved is None and stepped:
            self._checkpoint(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.saved is not None:
            self._hand_over(self.saved)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pending is not None and self.saved is None:
            self._checkpoint(trainer)
        if self.saved is not None:
            self._hand_over(self.saved)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._installed:
            return
        signal.signal(self.signum, self._previous)
        self._installed = False
        if self.pending is not None:
            # Arrived after the last step: the rest of the job (evaluation) is what's left to
            # redo, and the requeued job resumes from the final checkpoint it skips.
            self._hand_over(self.pending)

    def _checkpoint(self, trainer: L.Trainer) -> None:
        """Save ``path`` and record the preemption; the hand-over follows at the next batch's
        start or at the end of training (a signal meanwhile changes nothing)."""
        signum, self.pending = self.pending, None
        assert signum is not None
        trainer.save_checkpoint(str(self.path))
        self._write_record(trainer.global_step, signum)
        self.saved = signum

    def _write_record(self, step: int, signum: int) -> None:
        """One line per preemption in ``<run_dir>/preemptions.jsonl`` (run_dir = the
        checkpoint folder's parent), so a run's history shows where it was interrupted."""
        record = {
            "step": int(step),
            "signal": signal.Signals(signum).name,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        with (self.path.parent.parent / "preemptions.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[ctxlab] preempted at step {step}: saved {self.path}, requeueing", flush=True)

    def _hand_over(self, signum: int) -> None:
        self.pending = self.saved = None
        if self._installed:  # a signal from here on goes to the previous handler
            signal.signal(self.signum, self._previous)
            self._installed = False
        finish_wandb()
        if self._requeue is not None:
            self._requeue(signum)
        elif callable(self._previous):
            self._previous(signum, None)
        else:
            scontrol_requeue(signum)
        raise RuntimeError("the requeue step returned instead of exiting")


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job a multirun will launch, in launch order, as Hydra's basic
    sweeper builds them from ``hydra.sweeper.params`` and the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), max_batch_size=None)
    return [job for batch in batches for job in batch]


class ValidateSweep(HydraCallback):
    """Hydra callback: on multirun start, compose the config of every job of the grid exactly
    as the launcher will (``load_sweep_config``) and run :func:`ctxlab.config.validate` on
    each, so an unknown option or a bad combination fails before anything is submitted. Then
    writes ``<sweep dir>/sweep.json``: every job's number, directory, overrides and seed, the
    git commit and dirty flag, and package versions (each job's ``meta.json`` repeats its own).

    Only Hydra's basic sweeper has an enumerable grid. ctxlab's Optuna sweeper
    (``hydra/sweeper=optuna``) draws jobs as the search goes and checks the search space and
    every trial's config itself before launching it (its record is ``optuna_study.json``);
    with any other sweeper this callback validates the command line's config alone, saying so.

    Hydra turns an exception raised by a callback into a warning and carries on, so a bad
    job is reported on stderr and ends the command with ``SystemExit(1)`` instead.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.errors import HydraException

        from ctxlab.config import ConfigError

        try:
            self._validate_and_record(config)
        except (ConfigError, HydraException) as e:
            print(f"ctxlab: error: nothing was submitted: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from e

    def _validate_and_record(self, config: DictConfig) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from ctxlab.config import ConfigError, check_numbers, scope_options, validate
        from ctxlab.provenance import git_state, package_versions

        sweeper = str(config.hydra.sweeper.get("_target_", ""))
        loader = GlobalHydra.instance().config_loader()

        def job_config(overrides: list[str]) -> DictConfig:
            """A job's config as its task gets it: composed as the launcher will, then scoped."""
            cfg = loader.load_sweep_config(config, overrides)
            return scope_options(cfg, cfg.hydra.runtime.choices)

        if sweeper.startswith("hydra_plugins.ctxlab_optuna_sweeper."):
            print(
                "[ctxlab] Optuna sweep: every trial's config is validated before it is launched", flush=True
            )
            return
        if not sweeper.endswith("BasicSweeper"):
            print(
                f"[ctxlab] sweeper {sweeper} draws jobs as it goes: validated the base config only",
                file=sys.stderr,
            )
            base = job_config([])
            check_numbers(base)
            validate(base)
            return
        jobs = sweep_jobs(config)
        records = []
        for num, overrides in enumerate(jobs):
            try:
                job_cfg = job_config(overrides)
                check_numbers(job_cfg)
                validate(job_cfg)
            except ConfigError as e:
                raise ConfigError(f"sweep job #{num} ({' '.join(overrides)}): {e}") from e
            with open_dict(job_cfg):
                job_cfg.hydra.job.num = num
            job_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
            if any(len(part.encode()) > 255 for part in job_dir.parts):
                raise ConfigError(
                    f"sweep job #{num}: its directory name exceeds the 255 bytes a file system allows: "
                    f"{job_dir.name[:80]}...; set a shorter hydra.sweep.subdir, e.g. "
                    "hydra.sweep.subdir='${hydra.job.num}'"
                )
            records.append(
                {"num": num, "dir": str(job_dir.resolve()), "overrides": overrides, "seed": int(job_cfg.seed)}
            )
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "launcher": str(config.hydra.launcher.get("_target_", "")),
            "jobs": records,
            "git": git_state(),
            "versions": package_versions(),
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (sweep_dir / "sweep.json").write_text(json.dumps(manifest, indent=2))
        print(
            f"[ctxlab] validated {len(records)} sweep jobs; manifest {sweep_dir / 'sweep.json'}", flush=True
        )
