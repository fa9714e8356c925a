"""Where a job reports: one-line messages (``say``, rank 0 only), Lightning's loggers (CSV
always, W&B on request) and result rows written as JSON and CSV."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ctxlab import distributed
from ctxlab.runfiles import RunWriteError, atomic_write, write_error

log_prefix = "[ctxlab]"


def say(msg: str) -> None:
    if distributed.is_rank_zero():
        print(f"{log_prefix} {msg}", flush=True)


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
                text = io.StringIO(newline="")
                writer = csv.DictWriter(text, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
                atomic_write(path, text.getvalue())
                self.kept: tuple[int | None, list[str]] = (path.stat().st_size, list(fieldnames))

            def save(self) -> None:
                """Append the rows; a failed write (a full disk) cuts the file back to the rows it
                had, keeps this save's rows for the next, and names the file."""
                path = Path(self.metrics_file_path)
                self.kept = (path.stat().st_size if path.is_file() else None, list(self.metrics_keys))
                try:
                    super().save()
                except OSError as e:
                    size, self.metrics_keys = self.kept
                    with contextlib.suppress(OSError):
                        if size is None:
                            path.unlink(missing_ok=True)
                        else:
                            os.truncate(path, size)
                    raise e if isinstance(e, RunWriteError) else write_error(path, e) from e

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

            def finalize(self, status: str) -> None:
                try:
                    super().finalize(status)
                except RunWriteError as e:
                    if status != "failed":
                        raise
                    # The fit failed already (its error follows): this one must not replace it.
                    print(f"ctxlab: error: {e}", file=sys.stderr, flush=True)

        return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="",
                                  flush_logs_every_n_steps=max(1, flush_every))  # fmt: skip


class Loggers:
    """CSV always; W&B when ``logger.kind=wandb`` (offline by default), one run id per run_dir."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.csv = CSVMetrics.create(run_dir, int(cfg.trainer.get("log_every_n_steps") or 50))
        self.wandb = None
        if cfg.logger.kind == "wandb" and distributed.is_rank_zero():  # one W&B run, from rank 0
            from lightning.pytorch.loggers import WandbLogger

            from ctxlab.extras import require

            require("wandb", why="logger=wandb (logger=csv needs nothing)")
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

    def weights(self, folder: Path, meta: dict) -> None:
        """The run's trained weights (``weights/``: the fit's trainable parameters, adapters for a
        fine-tune) as a W&B artifact of type ``model``, named after the run and aliased with its
        step; offline it waits in the run's files for ``wandb sync``."""
        if self.wandb is None:
            return
        import wandb

        run = self.wandb.experiment
        artifact = wandb.Artifact(f"weights-{run.id}", type="model", metadata=meta)
        artifact.add_dir(str(folder))
        run.log_artifact(artifact, aliases=["latest", f"step{meta.get('steps')}"])

    def finish(self) -> None:
        if self.wandb is not None:
            import wandb

            wandb.finish()


def write_rows(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path.with_suffix(".json"), json.dumps(rows, indent=2))
    if rows:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write(path.with_suffix(".csv"), text.getvalue())
