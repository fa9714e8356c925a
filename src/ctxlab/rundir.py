"""A run directory between attempts: who holds it, what a restart may change, what a killed
attempt left behind, and whether it can be written at all.

- :class:`RunLock`: ``<run_dir>/.lock`` names the process (PID, host, start time, command) that
  holds the directory. A second run into the same directory is refused while the first holds
  it. The lock is an ``flock`` on that file, which the kernel drops when its process dies
  (kill -9 included), so a crashed run never leaves it stuck: the next run takes it over and
  says whose it was. Where the file system has no ``flock``, a lock of a dead PID on this host
  is taken over the same way.
- :func:`changed_settings`: a restart into a run directory that holds trained state may change
  only the settings in ``MAY_CHANGE`` (the step budget, logging, validation cadence,
  evaluation); anything else differs from what the checkpoint was trained with.
- :func:`remove_orphans`: temporary files of atomic writes (``.<name>.tmp-<PID>``,
  ``*.tmp``) that a killed attempt left in ``checkpoints/``, ``weights/`` and ``csv/``.
- :func:`check_writable`: the run directory and its ``checkpoints/`` and ``results/`` take a
  file, checked before any training instead of after it.
- :class:`HoldRunDir`: the lock, taken before Hydra writes ``.hydra/`` and its log file (a
  multirun: before it writes its sweep directory).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from ctxlab.config import ConfigError

LOCK_NAME = ".lock"

# Settings a restart may change without invalidating the trained state: the step budget (and
# what interpolates it, the scheduler's total_steps, is compared at the recorded budget),
# logging, validation and checkpoint cadence, the evaluation, names and places.
MAY_CHANGE = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "logger",
    "callbacks",
    "eval",
    "hydra",
    "run_dir",
    "name",
    "study",
    "not_applied",
    "phase.evaluate",
    "data.cache_dir",
    "data.eval_batch_size",
)


class RunDirBusy(ConfigError):
    """Another live process holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, Linux), None if unknown: tells
    a live holder from a new process that reuses its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    cmd = " ".join(holder.get("argv") or [])
    return (
        f"PID {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}"
        + (f": {cmd[:200]}" if cmd else "")
        + ")"
    )


class RunLock:
    """Hold ``run_dir`` for this process (module docstring). ``acquire`` raises
    :class:`RunDirBusy` naming the holder; ``release`` empties the file and drops the lock."""

    def __init__(self, run_dir: str | os.PathLike, say=print) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.say = say
        self.fd: int | None = None

    def _record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "start_ticks": _process_start(pid), "argv": sys.argv}  # fmt: skip

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        try:
            holder = json.loads(raw.decode() or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"pid": None, "host": None, "started": "?", "unreadable": True}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock = True
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"run directory {self.path.parent} is in use by {_describe(holder)}: two runs in "
                    f"one directory would interleave their logs and checkpoints. Wait for it to end, "
                    f"or give this run another hydra.run.dir"
                ) from None
            except OSError:  # no flock on this file system: judge the recorded PID instead
                flock = False
            # Another process may have replaced the file between open and flock: lock the file
            # that is at the path now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = self._read(fd)
            if holder.get("pid") and holder.get("pid") != os.getpid():
                mine = holder.get("host") == socket.gethostname()
                if not flock and (not mine or _pid_alive(int(holder["pid"]), holder.get("start_ticks"))):
                    os.close(fd)
                    raise RunDirBusy(
                        f"run directory {self.path.parent} is in use by {_describe(holder)} (this file "
                        f"system has no flock: if that run is gone, remove {self.path})"
                    )
                self.say(
                    f"taking over the stale lock {self.path} of {_describe(holder)}: that run "
                    "ended without releasing it (killed, or requeued by SLURM)"
                )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(self._record()).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunDirBusy(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        import fcntl

        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly, nothing to take over
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of nested dicts (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out |= flat(v, key) if isinstance(v, dict) and v else {key: v}
    return out


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE)


def _empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


ABSENT = "(absent)"


def changed_settings(cfg: DictConfig, recorded: dict) -> dict[str, tuple[Any, Any]]:
    """Settings of ``cfg`` that differ from the ``recorded`` (resolved) config of the run, other
    than ``MAY_CHANGE``: ``{"attention._target_": (recorded, now)}``, ``ABSENT`` for a setting
    one side lacks. ``cfg`` is resolved with the recorded values of ``MAY_CHANGE`` first, so
    that a setting that merely follows one of them (the scheduler's ``total_steps:
    ${trainer.max_steps}``) does not count. A setting that one side lacks counts unless its
    value is empty (None, false, [] or {}): an option added to ctxlab's configs after the run
    was recorded."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    rec_flat = flat(recorded)
    for key, value in rec_flat.items():
        if _may_change(key) and OmegaConf.select(new, key, throw_on_missing=False) is not None:
            OmegaConf.update(new, key, value, merge=False, force_add=True)
    now = flat(OmegaConf.to_container(new, resolve=True))
    diff = {}
    for key in sorted(set(now) | set(rec_flat)):
        if _may_change(key):
            continue
        a, b = rec_flat.get(key, ABSENT), now.get(key, ABSENT)
        if a is ABSENT and _empty(b) or b is ABSENT and _empty(a):
            continue
        if a != b:
            diff[key] = (a, b)
    return diff


def describe_changes(diff: dict[str, tuple[Any, Any]], limit: int = 12) -> str:
    """``key: recorded -> now`` per setting; where a node's ``_target_`` changed (another option),
    the settings only one of the two options has are left out."""

    def short(v: Any) -> str:
        s = json.dumps(v) if not isinstance(v, str) else v
        return s if len(s) <= 80 else s[:77] + "..."

    swapped = {k.rsplit(".", 1)[0] for k in diff if k.endswith("._target_")}
    shown = {
        k: v for k, v in diff.items()
        if not (k.rsplit(".", 1)[0] in swapped and not k.endswith("._target_") and ABSENT in v)
    }  # fmt: skip
    parts = [f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in list(shown.items())[:limit]]
    more = f"; and {len(shown) - limit} more" if len(shown) > limit else ""
    return "; ".join(parts) + more


def has_trained_state(run_dir: Path) -> bool:
    """A checkpoint or saved weights: what a restart would resume or overwrite."""
    return any((run_dir / "checkpoints").glob("*.ckpt")) or (run_dir / "weights" / "meta.json").is_file()


def check_restart(cfg: DictConfig, run_dir: Path, what: str = "run directory") -> None:
    """Refuse, naming every differing setting, a job whose settings differ from the trained
    state's in ``run_dir`` (its ``config.yaml``) other than ``MAY_CHANGE``."""
    recorded_file = run_dir / "config.yaml"
    if not recorded_file.is_file() or not has_trained_state(run_dir):
        return
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(recorded_file))
    except Exception as e:
        raise ConfigError(
            f"{recorded_file} is unreadable ({e}): what {run_dir} was trained with is unknown"
        ) from e
    assert isinstance(recorded, dict)
    diff = changed_settings(cfg, recorded)
    if diff:
        raise ConfigError(
            f"{what} {run_dir} holds a run trained with other settings than this one's "
            f"(recorded -> now): {describe_changes(diff)}. Restart it with its own settings (a restart "
            f"may change only {', '.join(MAY_CHANGE[:8])}, logger.*, eval.*), or give these settings "
            "another hydra.run.dir"
        )


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete the temporary files of atomic writes (``.<name>.tmp-<PID>``, ``<name>.tmp``) left in
    ``checkpoints/``, ``weights/`` and ``csv/`` by an attempt that was killed while writing. Call only
    while holding the run's lock (no other writer). Returns what was removed."""
    removed = []
    for folder in (run_dir / "checkpoints", run_dir / "weights", run_dir / "csv"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and (".tmp-" in p.name or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def check_writable(folders: list[Path]) -> None:
    """ConfigError naming the first folder that cannot take a file: each existing folder gets a
    probe file; a missing one is judged by the folder that would hold it (nothing is created,
    so a job that fails its checks leaves no empty folders behind)."""
    for folder in folders:
        target = folder
        while not target.exists() and target.parent != target:
            target = target.parent
        try:
            if not target.is_dir():
                raise NotADirectoryError(20, "a file is in the way, not a folder")
            probe = target / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"{folder} is not writable ({e.strerror or e}): a run writes its checkpoints, results "
                "and logs there; fix its permissions or choose another hydra.run.dir"
            ) from e


_HELD: RunLock | None = None


def held(run_dir: Path) -> RunLock | None:
    """The lock :class:`HoldRunDir` took for ``run_dir`` before Hydra wrote into it, if any."""
    if _HELD is not None and _HELD.fd is not None and _HELD.path.parent.resolve() == Path(run_dir).resolve():
        return _HELD
    return None


class HoldRunDir(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in cfg/config.yaml): take the run directory's lock
    before Hydra writes into it. Hydra saves ``.hydra/*.yaml`` and opens its log file in the
    output directory before the task starts, so a lock taken by the task comes after a second
    run has already overwritten the first's ``.hydra/config.yaml``. ``on_run_start`` runs before
    that: a directory that cannot take a file, or that another run holds, stops this run there,
    having written nothing into it. The task (``ctxlab.train.job.claim_run_dir``) takes this lock over.
    A multirun holds its sweep directory the same way (before ``multirun.yaml`` is written); each
    of its jobs locks its own directory in the task.

    Under torchrun or SLURM only rank 0 writes the run directory: the other ranks' Hydra writes no
    ``.hydra/`` and no log file (their output would overwrite rank 0's with the same content, or
    another run's with theirs)."""

    def _hold(self, config: DictConfig, key: str) -> None:
        global _HELD
        from hydra.core.hydra_config import HydraConfig

        self._release()  # an earlier app of this process that ended without its end hook (an error)
        HydraConfig.instance().set_config(config)  # ${hydra:...} in the directory; Hydra does it next
        folder = Path(str(OmegaConf.select(config, key))).resolve()
        try:
            check_writable([folder])
            _HELD = RunLock(folder, lambda msg: print(f"[ctxlab] {msg}", flush=True)).acquire()
        except ConfigError as e:
            raise SystemExit(f"ctxlab: error: {e}") from None

    def _release(self) -> None:
        global _HELD
        if _HELD is not None:
            _HELD.release()
            _HELD = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        from ctxlab import distributed

        if distributed.is_rank_zero():
            self._hold(config, "hydra.run.dir")
            return
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = None
            handlers = config.hydra.job_logging.get("handlers") or {}
            files = [name for name, h in handlers.items() if "filename" in h]
            for name in files:
                del handlers[name]
            root = config.hydra.job_logging.get("root")
            if root is not None and root.get("handlers"):
                root.handlers = [h for h in root.handlers if h not in files]

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ctxlab import distributed

        if distributed.is_rank_zero():
            self._hold(config, "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()
