"""Jobs and studies: what `ctxlab` runs once Hydra has composed the config.

A job = one phase (fit from scratch, fit from a checkpoint, or evaluate a checkpoint) and,
when ``phase.evaluate``, the extrapolation grid. A study = several jobs ("arms", each a list of
overrides on top of the command line), run in turn, then compared in one table and plot.
Everything a job writes lands in ``run_dir``; a job restarted with the same ``run_dir``
resumes from ``checkpoints/last.ckpt`` with the same W&B run id, and a study skips arms whose
results already exist.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
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


def load_weights(model, path: str | os.PathLike, setting: str) -> dict:
    """Load a ctxlab checkpoint's model weights, refusing one made for a different model."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{setting}: no checkpoint file at {p}")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    meta = ckpt.get("ctxlab") if isinstance(ckpt, dict) else None
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


class Loggers:
    """CSV always; W&B when ``logger.kind=wandb`` (offline by default), one run id per run_dir."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        from lightning.pytorch.loggers import CSVLogger

        self.csv = CSVLogger(save_dir=str(run_dir), name="csv", version="")
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


def write_metadata(cfg: DictConfig, run_dir: Path) -> None:
    """``config.yaml`` and ``meta.json``; a later evaluation of the run's own weights writes
    ``config.evaluate.yaml`` and ``meta.evaluate.json`` instead, keeping the fit's record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    own = (
        cfg.phase.get("checkpoint")
        and Path(str(cfg.phase.checkpoint)).resolve() == (run_dir / "weights").resolve()
    )
    suffix = ".evaluate" if (not cfg.phase.fit and own) else ""
    (run_dir / f"config{suffix}.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    meta = {"git": git_state(), "versions": package_versions(), "seed": int(cfg.seed),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    (run_dir / f"meta{suffix}.json").write_text(json.dumps(meta, indent=2))


def run_job(cfg: DictConfig) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from ctxlab.slurm import PreemptionCheckpoint, trainer_plugins
    from ctxlab.train.callbacks import SelectionStats, Throughput
    from ctxlab.train.module import LMModule

    validate(cfg)
    world = distributed.init(cfg.trainer)  # several ranks: from torchrun or SLURM, else an error
    run_dir = Path(cfg.run_dir).resolve()
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
    try:
        if cfg.phase.fit:
            if cfg.phase.init_from:
                load_weights(model, cfg.phase.init_from, "phase.init_from")
            ckpt_dir = run_dir / "checkpoints"
            every = int(cfg.trainer.get("val_check_interval") or 0) or None
            callbacks = [
                ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step}", save_last=True,
                                every_n_train_steps=every, auto_insert_metric_name=False),
                Throughput(log_every=int(cfg.trainer.log_every_n_steps)),
                LearningRateMonitor(logging_interval="step"),
            ]  # fmt: skip
            if any(hasattr(c, "record_selection") for c in model.cores):
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
                loss_chunk=int(cfg.phase.get("loss_chunk", 4096)),
            )  # fmt: skip
            last = ckpt_dir / "last.ckpt"
            if last.exists():
                say(f"resuming from {last}")
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
            extra["fit_seconds"] = round(time.perf_counter() - t0, 1)
            if not trainer.fast_dev_run:
                trainer.save_checkpoint(str(last))
            val = trainer.callback_metrics.get("val/loss")
            extra["val_ppl"] = float(torch.exp(val)) if val is not None else None
            extra["steps"] = int(trainer.global_step)
            extra |= fit_throughput(cfg, extra, world)
            if distributed.is_sharded(model):  # evaluation runs different items per rank: whole replicas
                model = distributed.unsharded_copy(model, lambda: build_model(cfg, position=model.position))
            weights = run_dir / "weights"
            if distributed.is_rank_zero() and not trainer.fast_dev_run:
                save_run_weights(model, weights, cfg, extra)
                (run_dir / "results").mkdir(parents=True, exist_ok=True)
                (run_dir / "results" / "fit.json").write_text(json.dumps(extra, indent=2))
        elif cfg.phase.checkpoint:
            weights = Path(cfg.phase.checkpoint)
            load_any_weights(model, weights, "phase.checkpoint")
            fit = run_dir / "results" / "fit.json"
            if weights.resolve() == (run_dir / "weights").resolve() and fit.exists():
                extra |= json.loads(fit.read_text())  # re-evaluating this run's own fit
        else:
            weights = None
            say("evaluating the model's pre-trained weights (no phase.checkpoint)")
        summary = evaluate(model, dm, cfg, run_dir, loggers, extra, weights) if cfg.phase.evaluate else extra
        if cfg.phase.evaluate and distributed.is_rank_zero():
            grid = OmegaConf.to_container(cfg.eval, resolve=True)
            (run_dir / "results" / "grid.json").write_text(json.dumps(grid, indent=2))
    finally:
        loggers.finish()
    say(f"run directory: {run_dir}")
    return summary


def fit_throughput(cfg: DictConfig, extra: dict, world: int) -> dict:
    """Training tokens per second (all ranks) and the peak GPU memory of the fit."""
    out: dict = {}
    rows = extra["steps"] * int(cfg.data.batch_size) * int(cfg.trainer.get("accumulate_grad_batches") or 1)
    if extra.get("fit_seconds"):
        out["train_tokens"] = rows * world * int(cfg.data.seq_len)
        out["tokens_per_s"] = round(out["train_tokens"] / extra["fit_seconds"], 1)
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def save_run_weights(model, folder: Path, cfg: DictConfig, extra: dict) -> None:
    """The fit's trainable parameters (``ctxlab.weights``) with what they were trained with."""
    from ctxlab.weights import save_trainable

    settings = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("model", "attention", "position")}
    meta = {"steps": extra.get("steps"), "name": str(cfg.name), "settings": settings}
    save_trainable(model, folder, meta)
    say(f"trained weights: {folder}")


def load_any_weights(model, path: Path, setting: str) -> None:
    """A Lightning checkpoint file (``load_weights``) or a ``weights/`` folder of a finished run
    (``ctxlab.weights``); a run directory means its ``weights/``."""
    from ctxlab.weights import is_weights_dir, load_trainable

    if path.is_dir() and not is_weights_dir(path) and is_weights_dir(path / "weights"):
        path = path / "weights"
    if path.is_dir():
        if not is_weights_dir(path):
            raise FileNotFoundError(f"{setting}: {path} is neither a checkpoint file nor a weights folder")
        meta = load_trainable(model, path, setting)
        say(f"loaded {setting} {path} (trained {meta.get('steps')} steps)")
    else:
        load_weights(model, path, setting)


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
    is new or unfinished: evaluate them, finished cells are kept) or ``run``."""
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
    validate(cfg)
    if distributed.init(cfg.trainer) > 1:
        agree_run_dir(cfg)
    if cfg.get("study"):
        return run_study(cfg)
    return run_job(cfg)
