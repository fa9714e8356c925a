"""Several processes: who starts the ranks, the training strategies, data-parallel evaluation.

Ranks are started by ``torchrun`` (``python -m torch.distributed.run``) or by SLURM (one task
per device: ``launcher=slurm`` ties ``tasks_per_node`` to ``trainer.devices``), never by
Lightning re-running the command line: Lightning's subprocess launcher starts ``sys.argv``
again for every extra device, which inside a Hydra multirun re-runs the whole sweep.
:func:`check_launch` refuses such a configuration before any work, and the strategies of
:func:`build_strategy` refuse to launch processes themselves.

Every rank composes the same config, so every rank validates it and fails the same way. Rank 0
alone writes the run directory's files and logs to W&B; the run directory is rank 0's
(:func:`agree_run_dir`), since Hydra's default ``outputs/<phase>/<time stamp>`` may differ by a
second between ranks.

Evaluation is data-parallel: the work items of a grid (perplexity windows, passkey trials) are
dealt round-robin over the ranks (:func:`my_items`), each rank runs its own, and one
``all_gather_object`` (:func:`gather_items`) gives every rank the results in the original
order, which are then reduced exactly as one process would.
"""

from __future__ import annotations

import atexit
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ctxlab.config import ConfigError

T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp")


# Who started this process ------------------------------------------------------------------


def started_by_torchrun() -> bool:
    """torchrun (and ``python -m torch.distributed.run``) exports these to every worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def slurm_tasks() -> int | None:
    """Tasks of this SLURM job step (``srun``/submitit), or None outside a SLURM batch job."""
    if "SLURM_JOB_ID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return int(os.environ["SLURM_NTASKS"]) if SLURMEnvironment.detect() else None


def requested_processes(trainer_cfg) -> int:
    """Processes a trainer config asks for: devices per node x nodes."""
    devices = trainer_cfg.get("devices", 1)
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        n = torch.cuda.device_count() if gpu else 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        n = devices
    elif isinstance(devices, str):  # "0,1,3": device indices
        n = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, Sequence):
        n = len(devices)
    else:
        raise ConfigError(f"trainer.devices={devices!r} must be an int >= 1, -1, 'auto' or a list of indices")
    return n * int(trainer_cfg.get("num_nodes", 1) or 1)


def check_launch(trainer_cfg) -> int:
    """Raise ``ConfigError`` unless the processes that exist match what ``trainer_cfg`` asks for.

    One process asking for one device passes. Several devices need as many processes started
    by torchrun (``WORLD_SIZE``) or as many SLURM tasks (``SLURM_NTASKS``). Returns the world
    size."""
    n = requested_processes(trainer_cfg)
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1)
    how = f"trainer.devices={devices}" + (f" x trainer.num_nodes={nodes}" if nodes != 1 else "")
    how += f" asks for {n} process{'es' if n > 1 else ''}"
    hint = (
        f"start one process per device: `torchrun --nproc_per_node {n} -m ctxlab ...` "
        f"(or `python -m torch.distributed.run ...`), or on SLURM `launcher=slurm -m` (tasks_per_node "
        f"follows trainer.devices) or `srun --ntasks-per-node={n} ctxlab ...`"
    )
    tasks = slurm_tasks()
    if started_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if tasks is not None and world > 1:
            raise ConfigError(
                f"torchrun started {world} processes inside a SLURM job step; Lightning would take the "
                f"ranks from SLURM (SLURM_NTASKS={tasks}) instead: let SLURM start them "
                f"(`srun --ntasks-per-node={n}` or launcher=slurm), not torchrun"
            )
        if world != n:
            raise ConfigError(f"{how}, but torchrun started WORLD_SIZE={world}: {hint}")
        return world
    if tasks is not None and tasks > 1:
        if tasks != n:
            raise ConfigError(f"{how}, but this SLURM job step has SLURM_NTASKS={tasks} tasks: {hint}")
        return tasks
    if n > 1:
        raise ConfigError(
            f"{how}, but this process was not started by torchrun (no LOCAL_RANK/WORLD_SIZE) nor as one "
            f"of {n} SLURM tasks. ctxlab never lets Lightning re-run the command line for the other "
            f"ranks (that breaks Hydra multiruns): {hint}"
        )
    return 1


# The process group -------------------------------------------------------------------------


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank; before the process group exists, what the launcher says."""
    if is_initialized():
        return dist.get_rank()
    if started_by_torchrun():
        return int(os.environ.get("RANK", 0))
    if (slurm_tasks() or 1) > 1:
        return int(os.environ.get("SLURM_PROCID", 0))
    return 0


def is_rank_zero() -> bool:
    return rank() == 0


def init(trainer_cfg, *, timeout_s: float = 1800.0) -> int:
    """Check the launch (:func:`check_launch`) and, for several processes, initialise the default
    process group the way Lightning would (its cluster environments give address, port and ranks;
    NCCL on GPUs, gloo on CPUs), so evaluation can gather before and after a fit. Lightning's
    strategies find it initialised and use it. Returns the world size."""
    world = check_launch(trainer_cfg)
    if world == 1 or is_initialized():
        return world
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = TorchElasticEnvironment() if started_by_torchrun() else SLURMEnvironment(auto_requeue=False)
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        torch.cuda.set_device(env.local_rank())
    dist.init_process_group(
        "nccl" if gpu else "gloo",
        rank=env.global_rank(),
        world_size=env.world_size(),
        timeout=timedelta(seconds=timeout_s),
    )
    # Left to the interpreter's exit, a live process group's threads can be torn down while still
    # joinable: the rank then aborts ("terminate called without an active exception", SIGABRT)
    # after its work is done, and torchrun or SLURM report the job failed. Destroy it first.
    _destroy_at_exit()
    return world


def _destroy_at_exit() -> None:
    """Destroy the process group at the interpreter's exit (a no-op without one); registered once."""
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # at exit nothing is left to save; say why, do not mask the exit code
            print(f"ctxlab: destroying the process group at exit failed: {e!r}", flush=True)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def local_zero_first(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on each node's local rank 0, then on the other ranks (e.g. tokenize into a
    cache once, then load it). A failure on any first rank is raised on every rank, so none is
    left waiting at a collective."""
    if world_size() == 1:
        fn()
        return
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank())))
    failure: Exception | None = None
    if local == 0:
        try:
            fn()
        except Exception as e:
            failure = e
    note = f"rank {rank()}: {type(failure).__name__}: {failure}" if failure is not None else None
    errors = [e for e in all_gather(note) if e]
    if failure is not None:
        raise failure
    if errors:
        raise RuntimeError(f"another rank failed: {'; '.join(errors)}")
    if local != 0:
        fn()


def agree_run_dir(run_dir: str | os.PathLike, hydra_output_dir: str | None = None) -> Path:
    """Rank 0's ``run_dir`` on every rank.

    Hydra's default ``outputs/<phase>/<time stamp>`` is resolved by each rank on its own, so two
    ranks may disagree by a second. When this rank's directory differs from rank 0's, the
    directory Hydra created for this rank (``hydra_output_dir``) is removed if it holds nothing but
    Hydra's own files (``.hydra/*.yaml``, ``*.log``). Pass ``hydra.run.dir`` to avoid the question.
    """
    mine = Path(run_dir).resolve()
    root = Path(broadcast(str(mine)))
    if root != mine and hydra_output_dir is not None:
        stray = Path(hydra_output_dir).resolve()
        if stray == mine and stray.is_dir() and _only_hydra_files(stray):
            shutil.rmtree(stray, ignore_errors=True)
    return root


def _only_hydra_files(folder: Path) -> bool:
    for p in folder.iterdir():
        if p.name == ".hydra" and p.is_dir():
            if any(not f.name.endswith(".yaml") for f in p.iterdir()):
                return False
        elif not (p.is_file() and p.suffix == ".log"):
            return False
    return True


# Data-parallel evaluation ------------------------------------------------------------------


def my_items(n: int) -> range:
    """Indices ``0 .. n-1`` of a work list that this rank runs: every ``world``-th from ``rank``
    (round-robin, so long and short items of a sorted grid spread evenly over the ranks)."""
    return range(rank(), n, world_size()) if world_size() > 1 else range(n)


def gather_items(n: int, mine: dict[int, T]) -> list[T]:
    """The results of all ``n`` items, in item order, on every rank, from each rank's
    ``{index: result}`` (one ``all_gather_object``). Every index must come from exactly one rank."""
    if world_size() == 1:
        parts = [mine]
    else:
        parts = all_gather(mine)
    out: dict[int, T] = {}
    for part in parts:
        dup = out.keys() & part.keys()
        if dup:
            raise RuntimeError(f"evaluation items {sorted(dup)[:5]} were computed by two ranks")
        out.update(part)
    missing = sorted(set(range(n)) - out.keys())
    if missing or len(out) != n:
        raise RuntimeError(f"evaluation items {missing[:5]} were computed by no rank")
    return [out[i] for i in range(n)]


# Strategies --------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a ctxlab model: ``Llama.layers`` or, for ``HFCausalLM``, the HF
    model's ``model.layers`` (LoRA adapters are injected in place, so they sit inside them). Each
    is one FSDP unit; the attention core (dense, MS, S2) is a plain child of its block."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    hf = getattr(model, "hf", None)
    inner = getattr(hf, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    raise TypeError(f"{type(model).__name__} has no decoder layers that FSDP could shard one by one")


def minority_dtype_modules(unit: nn.Module, skip: list[nn.Module] = ()) -> list[nn.Module]:
    """Submodules of ``unit`` whose own parameters are all of a dtype other than the unit's main
    one (by element count), outside ``skip``: each must be its own FSDP2 unit, because a unit's
    parameters must share one dtype (peft keeps LoRA adapters in float32 inside bf16 layers).
    ValueError when one module mixes dtypes in its own parameters."""
    skipped = {id(m) for s in skip for m in s.modules()}
    counts: dict[torch.dtype, int] = {}
    owners = []
    for m in unit.modules():
        if id(m) in skipped:
            continue
        own = list(m.parameters(recurse=False))
        for p in own:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
        if own:
            owners.append((m, {p.dtype for p in own}))
    if len(counts) <= 1:
        return []
    main = max(counts, key=counts.__getitem__)
    parts = []
    for m, dtypes in owners:
        if len(dtypes) > 1:
            raise ValueError(
                f"FSDP: {type(m).__name__} holds parameters of several dtypes ({sorted(map(str, dtypes))}); "
                "cast the model to one dtype (model.dtype) before sharding"
            )
        if main not in dtypes and m is not unit:
            parts.append(m)
    return parts


def apply_fsdp2(
    model: nn.Module,
    mesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 (``fully_shard``) on every decoder layer, then on the model (embeddings, final norm,
    output head). ctxlab's trainer calls ``model.hidden`` and ``model.lm_head`` besides
    ``forward``, so ``hidden`` is registered as a forward method: the root's parameters are
    gathered for it as for ``forward``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        for part in minority_dtype_modules(layer):  # e.g. float32 LoRA adapters in a bf16 layer
            fully_shard(part, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for part in minority_dtype_modules(model, skip=decoder_layers(model)):
        fully_shard(part, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if hasattr(model, "hidden"):
        register_fsdp_forward_method(model, "hidden")
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP (2 or 1) manages ``model``'s parameters."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())


def unsharded_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain (unsharded) model with ``model``'s full weights, on every rank.

    Evaluation runs different items on different ranks, so a sharded model (whose every forward
    is a collective) cannot evaluate; ``build()`` returns a fresh model of the same structure, into
    which the gathered state dict is loaded strictly. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    fresh = build()
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in full.items()}, strict=True)
    return fresh


class _Refuse:
    """Stands where Lightning's subprocess launcher would (it re-runs ``sys.argv`` for the missing
    ranks): constructing the Trainer is harmless, ``fit`` stops before any work."""

    is_interactive_compatible = False

    def __init__(self, strategy_name: str, n: int) -> None:
        self.message = (
            f"{strategy_name}: {n} devices but no launcher started the processes; start them with "
            f"torchrun or SLURM (see ctxlab.distributed.check_launch)"
        )

    def launch(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError(self.message)


class _NoLauncher:
    """ctxlab's strategies never let Lightning launch processes itself."""

    def _configure_launcher(self) -> None:
        env = self.cluster_environment
        if env is not None and not env.creates_processes_externally and self.num_processes > 1:
            self._launcher = _Refuse(type(self).__name__, self.num_processes)
            return
        super()._configure_launcher()


def _ddp_class():
    from lightning.pytorch.strategies import DDPStrategy

    class DDP(_NoLauncher, DDPStrategy):
        """Lightning's DDP (gradients all-reduced after every backward), ranks from outside."""

    return DDP


def _fsdp2_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2(_NoLauncher, ModelParallelStrategy):
        """FSDP2 through Lightning's ModelParallelStrategy: a one-dimensional device mesh of all
        ranks (data parallel = world size, no tensor parallelism), full checkpoints on rank 0. The
        LightningModule shards its model in ``configure_model`` (:class:`FSDP2Mixin`)."""

        def __init__(self, *, param_dtype=None, reduce_dtype=torch.float32, reshard_after_forward=True, **kw):
            kw.setdefault("save_distributed_checkpoint", False)
            super().__init__(data_parallel_size=1, tensor_parallel_size=1, **kw)
            self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
            self.reshard_after_forward = reshard_after_forward

        def setup_environment(self) -> None:
            self._data_parallel_size = self.world_size  # every rank holds one shard
            self._tensor_parallel_size = 1
            super().setup_environment()

    return FSDP2


_CLASSES: dict[str, Any] = {}


def strategy_class(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy.name={name!r} must be one of {STRATEGIES}")
    if name not in _CLASSES:
        _CLASSES[name] = _ddp_class() if name == "ddp" else _fsdp2_class()
    return _CLASSES[name]


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    d = getattr(torch, str(value), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"{value!r} is not a torch dtype name (e.g. bfloat16, float32)")
    return d


def build_strategy(name: str, **kw):
    """The Lightning strategy ``name`` (``ddp`` or ``fsdp``) for a Trainer whose processes were
    started by torchrun or SLURM.

    - ``ddp``: ``DDPStrategy`` (``find_unused_parameters=False``, ``gradient_as_bucket_view=True``
      unless given); NCCL on GPUs, gloo on CPUs.
    - ``fsdp``: FSDP2 (``fully_shard``) through ``ModelParallelStrategy`` on a 1-D mesh of every
      rank; keywords ``param_dtype`` / ``reduce_dtype`` (dtype or name, e.g. "bfloat16") form the
      ``MixedPrecisionPolicy``, ``reshard_after_forward`` is passed to each layer. The
      LightningModule must shard in ``configure_model``: inherit :class:`FSDP2Mixin` (it shards
      ``self.model`` one decoder layer at a time). Checkpoints are full (one file, rank 0) unless
      ``save_distributed_checkpoint=True``.

    - ``context_parallel=n`` (either strategy): each row's sequence split over n ranks, data
      parallel over the others (:mod:`ctxlab.context_parallel`); under ``fsdp`` the weights stay
      sharded over every rank (the n ranks of a row hold different tokens, not different weights).

    Other keywords go to the Lightning strategy. Neither strategy launches processes itself. The
    process group the strategy creates is destroyed at exit, as :func:`init` does for its own:
    Lightning's teardown keeps it, and a group left to the interpreter's exit can abort a rank
    after its work is done (seen once in a CI run of the 4-process context-parallel test).
    """
    _destroy_at_exit()
    cp = kw.pop("context_parallel", None)
    cls = strategy_class(name)
    if name == "ddp":
        kw = {"find_unused_parameters": False, "gradient_as_bucket_view": True} | kw
    else:
        for key in ("param_dtype", "reduce_dtype"):
            if key in kw:
                kw[key] = _dtype(kw[key])
    if cp is not None:
        from ctxlab import context_parallel

        return context_parallel.build_strategy(cp, name=name, **kw)
    return cls(**kw)


class FSDP2Mixin:
    """``configure_model`` for a LightningModule holding ``self.model``: under the ``fsdp``
    strategy, :func:`apply_fsdp2` with the strategy's mesh and precision; otherwise nothing."""

    def configure_model(self) -> None:
        strategy = self.trainer.strategy
        if not isinstance(strategy, strategy_class("fsdp")) or is_sharded(self.model):
            return
        apply_fsdp2(
            self.model,
            self.device_mesh["data_parallel"],
            param_dtype=strategy.param_dtype,
            reduce_dtype=strategy.reduce_dtype,
            reshard_after_forward=strategy.reshard_after_forward,
        )


_MODULES: dict[type, type] = {}


def module_class(base: type, strategy) -> type:
    """``base`` (a LightningModule class) itself, or, for the ``fsdp`` strategy, ``base`` with
    :class:`FSDP2Mixin`'s ``configure_model``."""
    if not isinstance(strategy, strategy_class("fsdp")):
        return base
    if base not in _MODULES:
        _MODULES[base] = type(f"FSDP2{base.__name__}", (FSDP2Mixin, base), {"__module__": __name__})
    return _MODULES[base]
