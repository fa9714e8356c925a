"""The numeric environment of a training session, and the CPU thread count that a resumed run
keeps.

Float32 results on the CPU depend on more than the seed and the state: the number of intra-op
threads decides how ATen and MKL split a reduction or a matmul's inner dimension, so two
processes with other thread counts part in the last bit within a step or two; denormal flushing,
oneDNN and the CPU's vector instructions (AVX2 or AVX-512 kernels) matter too. A process's
default thread count follows the CPUs it may run on (its affinity, ``OMP_NUM_THREADS``), so a
SLURM job that is requeued onto another CPU allocation, or a job compared with a process started
elsewhere, would compute differently without saying so.

So a fit pins its intra-op threads (:func:`pin_cpu_threads`) from the top-level ``cpu_threads``
setting: a number pins that many; ``null`` keeps the process's default on a fresh fit and, on a
resume, takes the count the checkpoint was trained with (recorded in it by :func:`for_checkpoint`),
so a preempted-and-resumed run computes as the uninterrupted one. Every session appends what it
ran with to ``run_dir/numerics.jsonl`` (:func:`record_numerics`); :func:`differences` names the
settings in which two records part.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_KEY = "ctxlab_numerics"
# Environment variables of the threading and math libraries torch uses (OpenMP, MKL, oneDNN).
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "DNNL_", "ONEDNN_", "ATEN_")
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE")
# The settings that change float32 results (two sessions that differ in one may part in the last
# bit). The affinity and SLURM's allocation only matter through num_threads.
NUMERIC_KEYS = ("num_threads", "denormals_flushed", "cpu_capability", "mkldnn", "mkl",
                "float32_matmul_precision", "deterministic_algorithms", "torch", "math_env")  # fmt: skip
# Of ENV_PREFIXES' variables, the ones that only name thread counts (num_threads holds the
# outcome) or silence a duplicate-library check are no numeric setting of their own.
NOT_NUMERIC_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_DUPLICATE_LIB_OK")


def denormals_flushed() -> bool:
    """True when this thread flushes float32 denormals to zero (``torch.set_flush_denormal``)."""
    return bool((torch.tensor([1e-38], dtype=torch.float32) / 1024).item() == 0.0)


def numeric_environment() -> dict[str, Any]:
    """What this process computes with: threads (intra-op, inter-op), the CPUs it may run on,
    the threading libraries' environment variables, denormal flushing, oneDNN/MKL, the CPU
    kernels' instruction set, torch's matmul precision and determinism flags."""
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "env": env,
        "math_env": {k: v for k, v in env.items() if k not in NOT_NUMERIC_ENV},
        "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
        "denormals_flushed": denormals_flushed(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "mkl": torch.backends.mkl.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": str(torch.__version__),  # a plain str: checkpoints load with weights_only
        "host": platform.node(),
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's, b's)}`` for every :data:`NUMERIC_KEYS` setting in which two records part (a
    key one record lacks is skipped: a record written by an older ctxlab)."""
    return {k: (a[k], b[k]) for k in NUMERIC_KEYS if k in a and k in b and a[k] != b[k]}


def for_checkpoint() -> dict[str, Any]:
    """The numeric settings a checkpoint records (``checkpoint[CHECKPOINT_KEY]``): what a resume
    needs to compute as this session did."""
    env = numeric_environment()
    return {k: env[k] for k in NUMERIC_KEYS}


def checkpoint_record(path: Path) -> dict[str, Any] | None:
    """The numeric record of checkpoint ``path`` (memory-mapped: its tensors are not read); None
    for a checkpoint without one (written by an older ctxlab) or an unreadable file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None
    record = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    return dict(record) if isinstance(record, dict) else None


def check_cpu_threads(value: Any) -> int | None:
    """``cpu_threads`` as an int >= 1, or None; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cpu_threads must be an int >= 1 or null (the process's default), got {value!r}")
    return value


def resolve_cpu_threads(configured: Any, recorded: int | None, default: int) -> tuple[int, str]:
    """The intra-op thread count of a session and why: ``configured`` (the ``cpu_threads``
    setting) when given; else ``recorded`` (the count the checkpoint being resumed was trained
    with) when there is one; else the process's ``default``."""
    n = check_cpu_threads(configured)
    if n is not None:
        return n, "cpu_threads"
    if recorded is not None:
        return int(recorded), "checkpoint"
    return default, "default"


def pin_cpu_threads(configured: Any, resume_from: Path | None) -> dict[str, Any]:
    """Set torch's intra-op threads for this session (:func:`resolve_cpu_threads`; the record of
    ``resume_from``, the checkpoint a fit resumes from, if any) before any work. Returns what
    the session's record notes: the count, its source, the process's default and, on a resume,
    the checkpoint's numeric record and the settings in which this session parts from it."""
    default = torch.get_num_threads()
    recorded = checkpoint_record(resume_from) if resume_from is not None else None
    threads, source = resolve_cpu_threads(
        configured, recorded.get("num_threads") if recorded else None, default
    )
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    note: dict[str, Any] = {"cpu_threads": threads, "cpu_threads_source": source, "default_threads": default}
    if recorded is not None:
        note["checkpoint"] = recorded
        note["differs_from_checkpoint"] = {
            k: list(v) for k, v in differences(recorded, for_checkpoint()).items()
        }
    return note


def record_numerics(run_dir: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Append this session's numeric environment (after ``extra``: its role, the thread count's
    source, ...) as one line of ``run_dir/numerics.jsonl``; returns the record."""
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), **extra}
    record |= numeric_environment()
    path = Path(run_dir) / "numerics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_numerics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every session's record in ``run_dir/numerics.jsonl``, oldest first."""
    path = Path(run_dir) / "numerics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
