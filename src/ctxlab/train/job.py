"""One job: one phase (fit from scratch, fit from a checkpoint, or evaluate a checkpoint) and,
when ``phase.evaluate``, the extrapolation grid (``ctxlab.evaluation``).

Everything a job writes lands in ``run_dir``; a job restarted with the same ``run_dir`` resumes
from ``checkpoints/last.ckpt`` with the same W&B run id. SIGTERM saves ``last.ckpt`` after the
current step and says how to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctxlab import context_parallel, distributed
from ctxlab.build import build_model, eval_configs
from ctxlab.config import ConfigError, validate
from ctxlab.evaluation import evaluate
from ctxlab.loggers import Loggers, say
from ctxlab.provenance import check_trained_settings, record_suffix, trained_settings, write_metadata
from ctxlab.runfiles import atomic_write, check_fit_space
from ctxlab.train import numerics
from ctxlab.weights import load_any_weights, load_weights, save_run_weights


def check_before_work(cfg: DictConfig, dm, model) -> None:
    """Cheap checks that need the tokenizer/data/model but no training."""
    from ctxlab.eval.passkey import min_prompt_length

    ppl_cfg, pk_cfg = eval_configs(cfg)
    if hasattr(dm, "validate"):
        dm.validate()
    vocab = dm.tokenizer.vocab_size
    if model.config.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={model.config.vocab_size} < the tokenizer's vocabulary {vocab}")
    if cfg.phase.evaluate and pk_cfg.enabled:
        shortest = min_prompt_length(dm.tokenizer, pk_cfg.digits)
        bad = [n for n in pk_cfg.lengths if n < shortest]
        if bad:
            raise ConfigError(
                f"eval.passkey.lengths {bad} are shorter than the passkey prompt itself ({shortest} tokens)"
            )
    niah = cfg.eval.get("niah")
    niah_lengths = list(niah.lengths) if cfg.phase.evaluate and niah is not None and niah.enabled else []
    if niah_lengths:
        from ctxlab.eval.niah import check_niah

        try:
            check_niah(instantiate(niah), dm.tokenizer)
        except ValueError as e:
            raise ConfigError(f"eval.niah: {e}") from e
    longest = (
        max([*ppl_cfg.lengths, *pk_cfg.lengths, *niah_lengths])
        if cfg.phase.evaluate
        else int(cfg.data.seq_len)
    )
    model.position.check_lengths(int(cfg.data.seq_len), longest, torch.float32)
    if cfg.phase.evaluate:
        from ctxlab.evaluation import check_eval_attentions

        try:
            check_eval_attentions(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from e


class Interrupted(SystemExit):
    """The job got SIGTERM; exits with 128 + SIGTERM after saying where it stopped."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class _Signals:
    """SIGTERM outside a fit ends the job with :class:`Interrupted` (Python's default would kill it
    without a word); inside one, Lightning's handler (which keeps ours in its chain) lets the
    current step finish first, and ``fitting`` makes ours leave it at that."""

    def __init__(self) -> None:
        self.fitting = False
        self.previous = None

    def _handler(self, signum, frame) -> None:
        if not self.fitting:
            raise Interrupted()

    def __enter__(self) -> _Signals:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def resume_command() -> str:
    """The command line that resumes this job: the same one, pinned to its run or sweep
    directory (Hydra's default directory is a new time stamp)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    args = list(sys.argv[1:])
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            key, where = "hydra.sweep.dir", hc.sweep.dir
        else:
            key, where = "hydra.run.dir", hc.runtime.output_dir
        if not any(a.lstrip("+").startswith(f"{key}=") for a in args):
            args.append(f"{key}={Path(where).resolve()}")
    launcher = ["ctxlab"]
    if distributed.started_by_torchrun():  # the ranks must be started again as they were
        launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "1")]
        if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":  # plus the rendezvous options used before
            launcher += ["--nnodes", os.environ["GROUP_WORLD_SIZE"]]
        launcher += ["-m", "ctxlab"]
    return shlex.join([*launcher, *args])


def newest_checkpoint(ckpt_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint with the highest step: ``step<N>.ckpt`` by name, ``last.ckpt`` by its
    ``global_step`` (memory-mapped: its tensors are not read)."""
    found = []
    for p in ckpt_dir.glob("*.ckpt"):
        if m := re.fullmatch(r"step(\d+)\.ckpt", p.name):
            found.append((p, int(m[1])))
        elif p.name == "last.ckpt":
            with contextlib.suppress(Exception):
                ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
                found.append((p, int(ckpt["global_step"])))
    return max(found, key=lambda t: t[1]) if found else None


def report_interrupt(run_dir: Path, during: str, saved_step: int | None, fit: bool) -> None:
    if saved_step is not None:
        where = f"; saved checkpoints/last.ckpt at step {saved_step}"
    elif fit and (ckpt := newest_checkpoint(run_dir / "checkpoints")) is not None:
        where = f"; the newest checkpoint is {ckpt[0].relative_to(run_dir)} (step {ckpt[1]})"
    elif fit:
        where = "; no checkpoint was written: a restart trains from the start"
    else:
        where = ""
    kept = " The evaluation cells finished so far are kept." if during == "evaluation" else ""
    print(
        f"ctxlab: interrupted by SIGTERM during {during} in {run_dir}{where}.{kept} Resume with the same "
        f"command:\n  {resume_command()}",
        file=sys.stderr, flush=True,
    )  # fmt: skip


def claim_run_dir(cfg: DictConfig, run_dir: Path, world: int):
    """Rank 0 takes ``run_dir`` before any work: writable folders, the lock (``ctxlab.rundir``),
    a restart's settings against the recorded ones, and the temporary files a killed attempt
    left. Every rank fails the same way. Returns rank 0's lock (None on the others)."""
    from ctxlab import rundir

    lock, problem = None, None
    if distributed.is_rank_zero():
        try:
            folders = [run_dir] + [run_dir / d for d in ("checkpoints", "results", "csv", "weights")]
            rundir.check_writable(folders)
            lock = rundir.held(run_dir) or rundir.RunLock(run_dir, say).acquire()  # held: since Hydra's start
            if record_suffix(cfg, run_dir) == "":
                rundir.check_restart(cfg, run_dir)
            removed = rundir.remove_orphans(run_dir)
            if removed:
                say(f"removed {len(removed)} temporary files a killed attempt left: "
                    f"{', '.join(p.name for p in removed[:5])}")  # fmt: skip
        except ConfigError as e:
            if lock is not None:
                lock.release()
            problem = e
    if world > 1:
        message = distributed.broadcast(str(problem) if problem else None)
        if message and problem is None:
            raise ConfigError(message)
    if problem is not None:
        raise problem
    return lock


def check_resumable(last: Path) -> None:
    """A ``last.ckpt`` that is not a whole zip archive (torch's format) is refused before the fit,
    naming it, instead of failing inside Lightning. Reads only the archive's directory."""
    try:
        with zipfile.ZipFile(last) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(
            f"{last} is damaged ({e}): move it away to resume from an earlier checkpoint of "
            f"{last.parent} (copy it to last.ckpt) or to train from the start"
        ) from e


def run_job(cfg: DictConfig) -> dict:
    validate(cfg)
    context_parallel.check_config(cfg)
    world = distributed.init(cfg.trainer)  # several ranks: from torchrun or SLURM, else an error
    run_dir = Path(cfg.run_dir).resolve()
    lock = claim_run_dir(cfg, run_dir, world)
    threads = torch.get_num_threads()  # _run_job pins them (cpu_threads); the caller's come back after
    try:
        with _Signals() as signals:
            return _run_job(cfg, run_dir, world, signals)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if lock is not None:
            lock.release()


def _run_job(cfg: DictConfig, run_dir: Path, world: int, signals: _Signals) -> dict:
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ctxlab.slurm import trainer_plugins
    from ctxlab.train.callbacks import instantiate_callbacks
    from ctxlab.train.module import LMModule

    if distributed.is_rank_zero():
        write_metadata(cfg, run_dir)
    # Before any work: a resumed fit computes with the thread count its checkpoint was trained with.
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = last if cfg.phase.fit and last.exists() else None
    try:
        threads = numerics.pin_cpu_threads(cfg.get("cpu_threads"), resume)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if distributed.is_rank_zero():
        numerics.record_numerics(run_dir, stage="fit" if cfg.phase.fit else "evaluation",
                                 resumed=resume is not None, **threads)  # fmt: skip
    if threads.get("differs_from_checkpoint"):
        parted = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in threads["differs_from_checkpoint"].items())
        say(f"resuming with other numeric settings than {last.name} was trained with ({parted}): the run "
            "will not be bit-identical to an uninterrupted one (numerics.jsonl)")  # fmt: skip
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = instantiate(cfg.data)
    model = build_model(cfg)
    check_before_work(cfg, dm, model)  # on every rank: the same config fails the same way everywhere
    check_fit_space(cfg, run_dir, model)
    if world > 1:
        distributed.local_zero_first(dm.prepare_data)  # one rank per node tokenizes into the cache
    loggers = Loggers(cfg, run_dir)
    extra: dict = {}
    stage = "training" if cfg.phase.fit else "evaluation"
    sigterm = None
    try:
        if cfg.phase.fit:
            if cfg.phase.init_from:
                load_weights(model, cfg.phase.init_from, "phase.init_from")
            ckpt_dir = run_dir / "checkpoints"
            built = instantiate_callbacks(cfg.get("callbacks"))  # the callbacks config group
            sigterm, throughput = built.get("sigterm_checkpoint"), built.get("throughput")
            callbacks = list(built.values())
            growth = model.position.growth_callback()  # a scheme's own (CRD NTK's growing scale)
            if growth is not None:
                callbacks.append(growth)
            trainer = instantiate(
                cfg.trainer, callbacks=callbacks, logger=loggers.all, default_root_dir=str(run_dir),
                plugins=trainer_plugins(),
            )  # fmt: skip
            # fsdp: the module shards its model per decoder layer in configure_model.
            module = distributed.module_class(LMModule, trainer.strategy)(
                model, instantiate(cfg.phase.optimizer),
                instantiate(cfg.phase.scheduler) if cfg.phase.scheduler else None, seed=int(cfg.seed),
                loss_chunk=int(cfg.phase.get("loss_chunk", 4096)), record=trained_settings(cfg, model),
            )  # fmt: skip
            last = ckpt_dir / "last.ckpt"
            if last.exists():
                check_resumable(last)
                say(f"resuming from {last}")
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            signals.fitting = True
            try:
                trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
            finally:
                signals.fitting = False
            extra["fit_seconds"] = round(time.perf_counter() - t0, 1)
            if not trainer.fast_dev_run:
                trainer.save_checkpoint(str(last))
            val = trainer.callback_metrics.get("val/loss")
            extra["val_ppl"] = float(torch.exp(val)) if val is not None else None
            extra["steps"] = int(trainer.global_step)
            extra |= fit_throughput(throughput, world) if throughput is not None else {}
            if distributed.is_sharded(model):  # evaluation runs different items per rank: whole replicas
                model = distributed.unsharded_copy(model, lambda: build_model(cfg, position=model.position))
            weights = run_dir / "weights"
            if distributed.is_rank_zero() and not trainer.fast_dev_run:
                save_run_weights(model, weights, cfg, extra)
                loggers.weights(weights, {"steps": extra.get("steps"), "name": str(cfg.name)})
                (run_dir / "results").mkdir(parents=True, exist_ok=True)
                atomic_write(run_dir / "results" / "fit.json", json.dumps(extra, indent=2))
        elif cfg.phase.checkpoint:
            weights = Path(cfg.phase.checkpoint)
            meta = load_any_weights(model, weights, "phase.checkpoint")
            allowed = check_trained_settings(meta, cfg, model, weights, "phase.checkpoint")
            if allowed:  # recorded in every summary of this evaluation
                extra["other_settings"] = {"allowed_by": "phase.allow_other_settings", "differences": allowed}
            fit = run_dir / "results" / "fit.json"
            if weights.resolve() == (run_dir / "weights").resolve() and fit.exists():
                extra |= json.loads(fit.read_text())  # re-evaluating this run's own fit
        else:
            weights = None
            say("evaluating the model's pre-trained weights (no phase.checkpoint)")
        stage = "evaluation"
        summary = evaluate(model, dm, cfg, run_dir, loggers, extra, weights) if cfg.phase.evaluate else extra
        if cfg.phase.evaluate and distributed.is_rank_zero():
            grid = OmegaConf.to_container(cfg.eval, resolve=True)
            atomic_write(run_dir / "results" / "grid.json", json.dumps(grid, indent=2))
    except (SIGTERMException, Interrupted) as e:
        if distributed.is_rank_zero():
            report_interrupt(run_dir, stage, sigterm.saved_step if sigterm else None, bool(cfg.phase.fit))
        raise Interrupted() from e
    finally:
        loggers.finish()
    say(f"run directory: {run_dir}")
    return summary


def fit_throughput(throughput, world: int) -> dict:
    """Training tokens (all ranks), training seconds (validation excluded: ``Throughput``'s
    clock), their rate, the peak GPU memory of the fit and the process's peak host memory."""
    out: dict = {}
    if throughput.train_seconds > 0:
        out["train_tokens"] = throughput.train_tokens * world
        out["train_seconds"] = round(throughput.train_seconds, 1)
        out["tokens_per_s"] = round(out["train_tokens"] / throughput.train_seconds, 1)
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def peak_rss_gib() -> float | None:
    """The process's peak resident memory so far (host memory: what a CPU run's peak is)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return round(kib * (1 if sys.platform == "darwin" else 1024) / 2**30, 3)
