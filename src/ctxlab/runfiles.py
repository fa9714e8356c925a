"""Writing a run's files on a disk that may fill up: nothing silent, nothing half-written.

- :func:`atomic_write`: a file is written under a temporary name beside it, fsynced, then renamed
  onto its name, so a reader (and a restart) sees the old content or the new, never a part; the
  temporary file is removed when the write fails.
- :func:`write_error`: a failed write of a run file (``OSError``, or the ``RuntimeError`` that
  ``torch.save`` makes of one: "unexpected pos", "file write failed") as a
  :class:`RunWriteError` that names the file, the free space of its file system and what to
  change, instead of an error buried under Lightning's.
- :func:`check_free_space`: before training, the run directory's file system must hold the
  checkpoints the run will write (:func:`space_needed`); a run that would fill it is refused
  before its first step instead of losing its last checkpoint at the end.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ctxlab.config import ConfigError

# Room for what a run writes besides checkpoints and weights: metrics, logs, results, plots.
MARGIN_BYTES = 64 << 20
# What torch.save's zip writer (a RuntimeError) and safetensors (a SafetensorError) report when the
# file under them fails to take bytes.
WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left",
                  "IoError(")  # fmt: skip
WHERE = "free space there, or give the run a directory on a file system with room (hydra.run.dir)"


class RunWriteError(OSError):
    """A run file could not be written; the message says which, the free space and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the file system that holds ``path`` or, where it does not
    exist yet, its nearest existing parent; None where that cannot be told."""
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_write_failure(exc: BaseException) -> bool:
    """An ``OSError``, or torch.save's or safetensors' error around one."""
    return isinstance(exc, OSError) or any(s in str(exc) for s in WRITE_FAILURES)


def write_error(path: str | os.PathLike, exc: BaseException, hint: str | None = None) -> RunWriteError:
    """``exc``, raised while writing ``path``, as a :class:`RunWriteError` naming ``path``, the free
    space of its file system and the settings to change (``hint``: one more)."""
    path = Path(path)
    cause: BaseException | None = exc  # torch.save's RuntimeError holds the file's OSError
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    code = getattr(cause, "errno", None)
    why = os.strerror(code) if code else f"{type(exc).__name__}: {str(exc)[:200]}"
    full = code in (errno.ENOSPC, errno.EDQUOT) or (code is None and "unexpected pos" in str(exc))
    what = (
        "the disk is full (or the quota is used up)"
        if full
        else "check that the folder exists and takes files"
    )
    message = (
        f"could not write {path} ({why}): {human(free_bytes(path.parent))} free on its file system; "
        f"{what}. Files written before are intact. {WHERE[0].upper()}{WHERE[1:]}"
        + (f", or {hint}" if hint else "")
    )
    return RunWriteError(code or errno.EIO, message, str(path))


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it (``.<name>.tmp-<PID>``,
    which :func:`ctxlab.rundir.remove_orphans` clears after a kill), fsynced, then renamed onto
    ``path``. Raises :class:`RunWriteError` (``write_error``) with the temporary file removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e


def checkpoint_bytes(model) -> int:
    """A training checkpoint's size: every parameter and buffer, plus two optimizer moments per
    trainable parameter (AdamW, the default optimizer), each of the parameter's dtype."""

    def size(t) -> int:
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return (
        sum(size(p) for p in params)
        + sum(size(b) for b in model.buffers())
        + 2 * sum(size(p) for p in params if p.requires_grad)
    )


def space_needed(run_dir: Path, ckpt: int, weights: int) -> int:
    """Free bytes a fit into ``run_dir`` needs: it keeps ``last.ckpt`` and the newest
    ``step<N>.ckpt`` and writes each save as a whole temporary copy beside them (3 checkpoints;
    those already there are replaced in place of new ones), the trained weights unless saved
    before, and ``MARGIN_BYTES`` for metrics, logs and results."""
    ckpts = run_dir / "checkpoints"
    kept = int((ckpts / "last.ckpt").is_file()) + int(any(ckpts.glob("step*.ckpt")))
    saved = (run_dir / "weights" / "meta.json").is_file()
    return ckpt * (3 - kept) + (0 if saved else weights) + MARGIN_BYTES


def check_free_space(run_dir: Path, model) -> None:
    """ConfigError, before training, when ``run_dir``'s file system has less free space than a fit
    of ``model`` into it needs (:func:`space_needed`), naming both amounts and what to change."""
    ckpt = checkpoint_bytes(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need, free = space_needed(run_dir, ckpt, weights), free_bytes(run_dir)
    if free is not None and free < need:
        raise ConfigError(
            f"{run_dir} is on a file system with {human(free)} free, but this fit needs about "
            f"{human(need)}: checkpoints of {human(ckpt)} each (the weights and AdamW's two moments "
            f"per trainable parameter; last.ckpt, the newest step<N>.ckpt and a temporary copy while "
            f"saving), the trained weights ({human(weights)}) and {human(MARGIN_BYTES)} for logs and "
            f"results. {WHERE[0].upper()}{WHERE[1:]}"
        )


def check_fit_space(cfg, run_dir: Path, model) -> None:
    """:func:`check_free_space` for a job that trains and saves checkpoints (not a fast dev run),
    judged by rank 0 (which writes the run directory) and raised on every rank."""
    from ctxlab import distributed

    if not cfg.phase.fit or cfg.trainer.get("fast_dev_run"):
        return
    problem = None
    if distributed.is_rank_zero():
        try:
            check_free_space(run_dir, model)
        except ConfigError as e:
            problem = str(e)
    problem = distributed.broadcast(problem)
    if problem:
        raise ConfigError(problem)
