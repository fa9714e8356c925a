"""Jobs and studies: what `ctxlab` runs once Hydra has composed the config.

A job = one phase (fit from scratch, fit from a checkpoint, or evaluate a checkpoint) and,
when ``phase.evaluate``, the extrapolation grid. A study = several jobs ("arms", each a list of
overrides on top of the command line), run in turn, then compared in one table and plot.
Everything a job writes lands in ``run_dir``; a job restarted with the same ``run_dir``
resumes from ``checkpoints/last.ckpt`` with the same W&B run id, and a study skips arms whose
results already exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ctxlab import distributed
from ctxlab.config import ConfigError, validate

log_prefix = "[ctxlab]"


def say(msg: str) -> None:
    if distributed.is_rank_zero():
        print(f"{log_prefix} {msg}", flush=True)


def is_hf(cfg: DictConfig) -> bool:
    return cfg.model.get("kind") == "hf"


def build_model(cfg: DictConfig, position=None):
    """ctxlab's own decoder, or (``model.kind=hf``) a transformers model with ctxlab attention;
    ``position``: an existing position scheme to share (else one is built from ``cfg.position``)."""
    position = position if position is not None else instantiate(cfg.position)
    if is_hf(cfg):
        from ctxlab.model.hf import build_hf_model

        return build_hf_model(instantiate(cfg.model), instantiate(cfg.attention), position)
    from ctxlab.model import Llama

    return Llama(instantiate(cfg.model), instantiate(cfg.attention), position)


def eval_configs(cfg: DictConfig):
    ppl = instantiate(cfg.eval.perplexity)
    pk = instantiate(cfg.eval.passkey)
    return ppl, pk


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


def device_of(cfg: DictConfig) -> torch.device:
    acc = str(cfg.trainer.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def read_checkpoint(path: Path, setting: str) -> dict:
    """``torch.load`` of a checkpoint file, with an error naming ``setting`` for a file that is
    not one (a truncated copy, a text file) instead of torch's unpickling error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(
            f"{setting}: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "a truncated copy or another kind of file? Give the path of a complete .ckpt file or of "
            "a run's weights/ folder"
        ) from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{setting}: {path} holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


def load_weights(model, path: str | os.PathLike, setting: str) -> dict:
    """Load a ctxlab checkpoint's model weights, refusing one made for a different model."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{setting}: no checkpoint file at {p}")
    ckpt = read_checkpoint(p, setting)
    meta = ckpt.get("ctxlab")
    if meta is None or "state_dict" not in ckpt:
        raise ValueError(f"{setting}: {p} is not a ctxlab checkpoint (no ctxlab metadata)")
    saved, current = meta["model"], model.config.to_dict()
    ignore = {"gradient_checkpointing"}
    diff = {
        k: (saved.get(k), current.get(k))
        for k in current
        if k not in ignore and saved.get(k) != current.get(k)
    }
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ValueError(f"{setting}: {p} was trained with a different model ({details})")
    # Rotary tables are derived from the position config, not learned: never load them.
    state = {
        k[len("model.") :]: v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.") and not k.startswith("model.position.")
    }
    own = {k for k in model.state_dict() if not k.startswith("position.")}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        raise ValueError(
            f"{setting}: {p} does not match the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(state, strict=False)
    return ckpt


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


class CSVMetrics:
    """Lightning's CSV logger, but a restarted run keeps what earlier attempts wrote: rows are
    appended to ``csv/metrics.csv`` (Lightning's own writer deletes it on start), each with an
    ``attempt`` column (1, 2, ... per start of the run directory), since steps after an attempt's
    last checkpoint are trained and logged again by the next one. Rows are on disk at every
    checkpoint and every ``flush_every`` steps, so a killed attempt keeps them; a row it left
    half-written is dropped, and a new column rewrites the file atomically."""

    @staticmethod
    def create(run_dir: Path, flush_every: int):
        import csv

        from lightning.pytorch.loggers import CSVLogger
        from lightning.pytorch.loggers.csv_logs import ExperimentWriter
        from lightning.pytorch.loggers.logger import rank_zero_experiment

        class AppendingWriter(ExperimentWriter):
            def __init__(self, log_dir: str) -> None:
                super().__init__(log_dir)
                self.attempt = 1
                path = Path(self.metrics_file_path)
                if not path.is_file():
                    return
                data = path.read_bytes()
                if data and not data.endswith(b"\n"):  # a row cut short by a kill
                    with path.open("r+b") as f:
                        f.truncate(data.rfind(b"\n") + 1)
                with path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    self.metrics_keys = sorted(reader.fieldnames or [])
                    done = [int(r["attempt"]) for r in reader if (r.get("attempt") or "").isdigit()]
                self.attempt = max(done, default=1) + 1

            def _check_log_dir_exists(self) -> None:
                """Lightning's deletes an existing metrics.csv: keep it."""

            def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
                path = Path(self.metrics_file_path)
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
                os.replace(tmp, path)

            def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
                super().log_metrics(metrics_dict, step)
                self.metrics[-1]["attempt"] = self.attempt

        class AppendingCSVLogger(CSVLogger):
            @property
            @rank_zero_experiment
            def experiment(self):
                if self._experiment is None:
                    self._fs.makedirs(self.root_dir, exist_ok=True)
                    self._experiment = AppendingWriter(log_dir=self.log_dir)
                return self._experiment

            def after_save_checkpoint(self, checkpoint_callback) -> None:
                self.save()  # the rows up to a checkpoint outlive a kill -9 after it

        return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="",
                                  flush_logs_every_n_steps=max(1, flush_every))  # fmt: skip


class Loggers:
    """CSV always; W&B when ``logger.kind=wandb`` (offline by default), one run id per run_dir."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.csv = CSVMetrics.create(run_dir, int(cfg.trainer.get("log_every_n_steps") or 50))
        self.wandb = None
        if cfg.logger.kind == "wandb" and distributed.is_rank_zero():  # one W&B run, from rank 0
            try:
                import wandb  # noqa: F401  (WandbLogger needs it; fail here with a clear message)
                from lightning.pytorch.loggers import WandbLogger
            except ImportError as e:
                raise ConfigError("logger=wandb needs the wandb package: install it or use logger=csv") from e
            id_file = run_dir / "wandb_id.txt"
            if id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = secrets.token_hex(4)  # W&B ids are [a-z0-9]; this one survives restarts
                id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = WandbLogger(
                project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                tags=list(cfg.logger.tags), name=str(cfg.name), id=run_id, resume="allow",
                save_dir=str(run_dir), offline=cfg.logger.mode == "offline",
                mode=None if cfg.logger.mode == "offline" else cfg.logger.mode,
                job_type="train" if cfg.phase.fit else "evaluate",
            )  # fmt: skip
            self.wandb.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    @property
    def all(self) -> list:
        return [self.csv] + ([self.wandb] if self.wandb is not None else [])

    def table(self, key: str, rows: list[dict]) -> None:
        if self.wandb is not None and rows:
            cols = list(rows[0])
            self.wandb.log_table(key=key, columns=cols, data=[[r[c] for c in cols] for r in rows])

    def image(self, key: str, path: Path) -> None:
        if self.wandb is not None:
            self.wandb.log_image(key=key, images=[str(path)])

    def summary(self, summary: dict, prefix: str = "") -> None:
        """The run's named metrics (``compare.metrics_of``: ``val_ppl``, ``ppl@N``, ``passkey@N``,
        fit time, throughput, memory) into W&B's run summary, so its run table sorts by them."""
        if self.wandb is None:
            return
        from ctxlab.compare import metrics_of

        self.wandb.experiment.summary.update({prefix + k: v for k, v in metrics_of(summary).items()})

    def finish(self) -> None:
        if self.wandb is not None:
            import wandb

            wandb.finish()


def write_rows(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    if rows:
        with path.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def evaluate(
    model, dm, cfg: DictConfig, run_dir: Path, loggers: Loggers, extra: dict, weights: Path | None = None
) -> dict:
    """The extrapolation grid under every evaluation attention (``ctxlab.evaluation``)."""
    from ctxlab.evaluation import evaluate as run_evaluations

    return run_evaluations(model, dm, cfg, run_dir, loggers, extra, weights)


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
    check = getattr(model.position, "check_lengths", None)
    if check is not None:
        longest = max([*ppl_cfg.lengths, *pk_cfg.lengths]) if cfg.phase.evaluate else int(cfg.data.seq_len)
        check(int(cfg.data.seq_len), longest, torch.float32)
    if cfg.phase.evaluate:
        from ctxlab.evaluation import check_eval_attentions

        try:
            check_eval_attentions(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from e


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
    (run_dir / f"config{suffix}.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    meta = {"git": git_state(), "versions": package_versions(), "seed": int(cfg.seed),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    (run_dir / f"meta{suffix}.json").write_text(json.dumps(meta, indent=2))


def check_numbers(cfg: DictConfig) -> None:
    """Settings that must be whole numbers, named when they are not (``data.seq_len=abc``)
    before anything computes with them."""
    wanted = {"data.seq_len": 1, "data.batch_size": 1}
    if OmegaConf.select(cfg, "data.eval_batch_size") is not None:
        wanted["data.eval_batch_size"] = 1
    for key, minimum in wanted.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < -1:
        raise ConfigError(f"trainer.max_steps={steps!r} must be an integer > 0 (or -1 with max_epochs)")


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
    return shlex.join(["ctxlab", *args])


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
            lock = rundir.RunLock(run_dir, say).acquire()
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
    world = distributed.init(cfg.trainer)  # several ranks: from torchrun or SLURM, else an error
    run_dir = Path(cfg.run_dir).resolve()
    lock = claim_run_dir(cfg, run_dir, world)
    try:
        with _Signals() as signals:
            return _run_job(cfg, run_dir, world, signals)
    finally:
        if lock is not None:
            lock.release()


def _run_job(cfg: DictConfig, run_dir: Path, world: int, signals: _Signals) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ctxlab.slurm import PreemptionCheckpoint, trainer_plugins
    from ctxlab.train.callbacks import SelectionStats, SigtermCheckpoint, Throughput
    from ctxlab.train.module import LMModule

    if distributed.is_rank_zero():
        write_metadata(cfg, run_dir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = instantiate(cfg.data)
    model = build_model(cfg)
    check_before_work(cfg, dm, model)  # on every rank: the same config fails the same way everywhere
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
            every = int(cfg.trainer.get("val_check_interval") or 0) or None
            sigterm = SigtermCheckpoint(ckpt_dir / "last.ckpt")
            callbacks = [
                ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step}", save_last=True,
                                every_n_train_steps=every, auto_insert_metric_name=False),
                throughput := Throughput(log_every=int(cfg.trainer.log_every_n_steps)),
                LearningRateMonitor(logging_interval="step"),
                sigterm,
            ]  # fmt: skip
            if any(c.records_selection for c in model.cores):
                callbacks.append(SelectionStats(every=max(1, int(cfg.trainer.log_every_n_steps) * 5)))
            growth = getattr(model.position, "growth_callback", None)
            if growth is not None and growth() is not None:
                callbacks.append(growth())
            # Inside a SLURM job: on the pre-timeout signal, save last.ckpt after this step and requeue.
            callbacks.append(PreemptionCheckpoint(ckpt_dir / "last.ckpt"))
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
            extra |= fit_throughput(throughput, world)
            if distributed.is_sharded(model):  # evaluation runs different items per rank: whole replicas
                model = distributed.unsharded_copy(model, lambda: build_model(cfg, position=model.position))
            weights = run_dir / "weights"
            if distributed.is_rank_zero() and not trainer.fast_dev_run:
                save_run_weights(model, weights, cfg, extra)
                (run_dir / "results").mkdir(parents=True, exist_ok=True)
                (run_dir / "results" / "fit.json").write_text(json.dumps(extra, indent=2))
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
            (run_dir / "results" / "grid.json").write_text(json.dumps(grid, indent=2))
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
    clock), their rate, and the peak GPU memory of the fit."""
    out: dict = {}
    if throughput.train_seconds > 0:
        out["train_tokens"] = throughput.train_tokens * world
        out["train_seconds"] = round(throughput.train_seconds, 1)
        out["tokens_per_s"] = round(out["train_tokens"] / throughput.train_seconds, 1)
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def save_run_weights(model, folder: Path, cfg: DictConfig, extra: dict) -> None:
    """The fit's trainable parameters (``ctxlab.weights``) with what they were trained with."""
    from ctxlab.weights import save_trainable

    meta = {"steps": extra.get("steps"), "name": str(cfg.name), **trained_settings(cfg, model)}
    save_trainable(model, folder, meta)
    say(f"trained weights: {folder}")


def load_any_weights(model, path: Path, setting: str) -> dict:
    """A Lightning checkpoint file (``load_weights``) or a ``weights/`` folder of a finished run
    (``ctxlab.weights``); a run directory means its ``weights/``. Returns what the weights
    record about their training (``trained_settings``; empty where they record nothing)."""
    from ctxlab.weights import is_weights_dir, load_trainable

    if path.is_dir() and not is_weights_dir(path) and is_weights_dir(path / "weights"):
        path = path / "weights"
    if path.is_dir():
        if not is_weights_dir(path):
            raise FileNotFoundError(f"{setting}: {path} is neither a checkpoint file nor a weights folder")
        try:
            meta = load_trainable(model, path, setting)
        except json.JSONDecodeError as e:
            raise ValueError(f"{setting}: {path / 'meta.json'} is not valid JSON ({e})") from e
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:  # a damaged safetensors file
            why = f"{type(e).__name__}: {e}"
            raise ValueError(f"{setting}: {path} is not a readable weights folder ({why})") from e
        say(f"loaded {setting} {path} (trained {meta.get('steps')} steps)")
        return meta
    return load_weights(model, path, setting).get("ctxlab") or {}


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
    grid = run_dir / "results" / "grid.json"
    current = OmegaConf.to_container(cfg.eval, resolve=True)
    finished = (run_dir / "results" / "summary.json").exists()
    if finished and grid.exists() and json.loads(grid.read_text()) == current:
        return "done"
    trained = weights_complete(run_dir / "weights") and (run_dir / "results" / "fit.json").exists()
    if cfg.phase.fit and trained:
        return "evaluate"
    if not cfg.phase.fit and finished and not grid.exists():
        return "done"  # an evaluation-only arm from before grids were recorded
    return "run"


def weights_complete(folder: Path) -> bool:
    """A ``weights/`` folder with every file its ``meta.json`` lists (a copy that left its large
    file behind on the training machine is not: that arm is trained again)."""
    from ctxlab.weights import read_meta

    if not (folder / "meta.json").exists():
        return False
    return all((folder / f).is_file() for f in read_meta(folder).get("files", {}).values())


def evaluation_only(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` turned into an evaluation of the run's own saved weights (``weights/``)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.phase.fit = False
        cfg.phase.checkpoint = str(run_dir / "weights")
    return cfg


def agree_run_dir(cfg: DictConfig) -> None:
    """Several ranks: every rank takes rank 0's ``run_dir`` (Hydra's time-stamped default may differ
    by a second between ranks; the directory Hydra made for another rank is removed)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    cfg.run_dir = str(distributed.agree_run_dir(cfg.run_dir, hydra_dir))


def run(cfg: DictConfig) -> dict:
    check_numbers(cfg)
    validate(cfg)
    if distributed.init(cfg.trainer) > 1:
        agree_run_dir(cfg)
    if cfg.get("study"):
        return run_study(cfg)
    return run_job(cfg)
