"""Context parallelism: one sequence over several ranks, exact against one process.

Shapes: B batch, L tokens of the whole sequence, n context-parallel ranks (``cp``), c = L / 2n
tokens per chunk, H query heads, Hkv key/value heads, D head dim.

The ranks form a DeviceMesh ``("dp", "cp")``: rank ``d * cp + r`` holds the rows of data-parallel
rank ``d`` (its sampler deals rows over the dp ranks only) and the sequence part ``r`` of each.
The sequence is cut into 2n chunks of c tokens and rank r holds chunks ``r`` and ``2n-1-r``
(the load-balanced causal sharding: every rank gets the same number of causal query-key pairs).
Everything per token (embeddings, projections, RoPE at the token's *global* position id, MLP,
the loss) runs on the rank's own 2c tokens; only attention needs other tokens:

- every attention core sees exactly what it sees on one process: the keys and values of the
  whole sequence are all-gathered over the cp group by an autograd-aware all-gather whose backward
  sums the gradient slices of every cp rank (reduce-scatter; all-reduce then slice on gloo, which
  has no reduce-scatter);
- a core that computes query rows alone (``AttentionCore.attend_rows``) computes only the rank's
  two query chunks against the whole K/V: dense attention each chunk over the keys up to its end
  (SDPA with a lower-right causal mask), S2 each run of the chunk inside one of its groups (sized
  from the whole length), MS attention its selection on the all-gathered queries (detached: the
  selection has no gradient; the paper's selection reads a block's own later queries) and then
  the attention of the rank's rows only;
- any other core runs on the whole gathered sequence (queries gathered too) and the rank keeps its
  own rows, which is exact but computes the whole layer on every rank. Gradients stay exact: rows
  a rank drops get a zero output gradient, so they add exactly nothing to dq, dk, dv.

The loss of a rank is the mean over its own tokens; with equal token counts per rank, the
gradient average over all dp x cp ranks (DDP's all-reduce, or FSDP2's reduce-scatter over its mesh
of every rank: ``trainer.strategy.name=fsdp``, the weights then sharded over all ranks) is exactly
the one-process gradient of the global batch (the all-gather's backward carries each rank's loss
gradient to the ranks whose keys it read).
Position ids are drawn for the whole sequence from the step's seeded generator on every rank
(CRD NTK's random offset is the same on all cp ranks of a row) and then split like the tokens.

This path (all-gather) runs on CPU (gloo, the tests) and on CUDA (NCCL). PyTorch's own
ring-attention API (``torch.distributed.tensor.experimental.context_parallel``) is not used:
it covers SDPA only, and one exact path for every core is what the tests check.

The split is active during ``fit`` only (:class:`ctxlab.train.module.LMModule` attaches it in
``on_fit_start``, detaches it in ``on_fit_end``); evaluation afterwards runs whole sequences,
its items dealt over all ranks as under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ctxlab.attention.base import AttentionCore, QueryRows, check_core
from ctxlab.config import ConfigError

SETTING = "trainer.strategy.context_parallel"


# The layout ---------------------------------------------------------------------------------


def chunk_order(n: int) -> list[int]:
    """The chunks of the whole sequence in rank order: rank r holds chunks ``r`` and ``2n-1-r``."""
    return [j for r in range(n) for j in (r, 2 * n - 1 - r)]


def check_length(length: int, n: int) -> None:
    """ConfigError unless ``length`` tokens split into 2n equal chunks."""
    if length % (2 * n):
        raise ConfigError(
            f"{SETTING}={n} cuts every sequence into 2 x {n} = {2 * n} equal chunks, but the training "
            f"length data.seq_len={length} is not divisible by {2 * n}"
        )


def shard(x: Tensor, n: int, rank: int, dim: int = 1) -> Tensor:
    """Rank ``rank``'s chunks ``rank`` and ``2n-1-rank`` of ``x`` along ``dim``, concatenated."""
    check_length(x.shape[dim], n)
    chunks = x.chunk(2 * n, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * n - 1 - rank]], dim=dim)


def own_spans(length: int, n: int, rank: int) -> tuple[tuple[int, int], ...]:
    """The token positions ``(start, stop)`` of rank ``rank``'s two chunks, in :func:`shard`'s order."""
    check_length(length, n)
    c = length // (2 * n)
    return tuple((j * c, (j + 1) * c) for j in (rank, 2 * n - 1 - rank))


def unshard(parts: list[Tensor], dim: int = 1) -> Tensor:
    """The whole sequence from every rank's :func:`shard` (in rank order)."""
    n = len(parts)
    pieces: list[Tensor | None] = [None] * (2 * n)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        pieces[r], pieces[2 * n - 1 - r] = first, second
    return torch.cat(pieces, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather of the ranks' shards into the whole sequence (dim 1); the backward sums the
    gradient of every rank's copy and returns this rank's shard of the sum."""

    @staticmethod
    def forward(ctx, x: Tensor, group, n: int, rank: int) -> Tensor:
        ctx.group, ctx.n, ctx.rank = group, n, rank
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return unshard(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        n, rank, group = ctx.n, ctx.rank, ctx.group
        if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter
            total = grad.contiguous()
            dist.all_reduce(total, group=group)
            return shard(total, n, rank), None, None, None
        stacked = torch.stack([shard(grad, n, r) for r in range(n)])  # [n, B, 2c, ...]
        out = torch.empty_like(stacked[0])
        dist.reduce_scatter_tensor(out, stacked, group=group)
        return out, None, None, None


# The attention core -------------------------------------------------------------------------


class ContextParallelCore(AttentionCore):
    """Stands where an attention core was during a context-parallel fit: gathers the sequence
    over the cp group and runs the core as one process would (module docstring). Calls with a
    KV cache (evaluation) go to the core unchanged; every hook of the contract is the core's."""

    def __init__(self, inner: AttentionCore, split: ContextParallel) -> None:
        self._inner = [check_core(inner)]  # before the base's __init__ sets record_selection
        super().__init__()
        self.inner = inner
        self._split = [split]  # not a child module
        self.applies_positions = inner.applies_positions
        self.checkpoint_saves = inner.checkpoint_saves
        self.records_selection = inner.records_selection

    @property
    def record_selection(self) -> bool:
        return self._inner[0].record_selection

    @record_selection.setter
    def record_selection(self, on: bool) -> None:
        self._inner[0].record_selection = on

    @property
    def causal(self) -> bool:
        return self.inner.causal

    @property
    def training_causal(self) -> bool:
        return self.inner.training_causal

    @property
    def decode_exact(self) -> bool:
        return self.inner.decode_exact

    def pair_fraction(self, length: int) -> float:
        return self.inner.pair_fraction(length)

    def audit_length(self, minimum: int) -> int:
        return self.inner.audit_length(minimum)

    def check_training_length(self, length: int) -> None:
        self.inner.check_training_length(length)

    def configure_position(self, position) -> None:
        self.inner.configure_position(position)

    def continues_foreign_cache(self, n_new: int) -> bool:
        return self.inner.continues_foreign_cache(n_new)

    def selection_stats(self, local_window: int) -> dict | None:
        return self.inner.selection_stats(local_window)

    def clear_selection(self) -> None:
        self.inner.clear_selection()

    def describe(self) -> str:
        return f"{self.inner.describe()} [context parallel x{self._split[0].cp}]"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache=None) -> Tensor:
        if cache is not None:
            return self.inner(q, k, v, cache=cache)
        split = self._split[0]
        k_full, v_full = split.gather(k), split.gather(v)
        own = self.inner.attend_rows(q, k_full, v_full, split.query_rows(k_full.shape[1]))
        if own is not None:
            return own
        o_full = self.inner(split.gather(q), k_full, v_full)
        return split.shard(o_full)


# The plan -----------------------------------------------------------------------------------


class ContextParallel:
    """The sequence split of a fit: the ``("dp", "cp")`` mesh, this rank's place in it, and the
    operations the trainer and the attention wrapper use. Build it after the default process
    group exists (collective: every rank builds it)."""

    def __init__(self, cp: int, device_type: str = "cpu") -> None:
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if dist.is_initialized() else 1
        check_sizes(cp, world)
        self.cp, self.dp = cp, world // cp
        self.mesh = init_device_mesh(device_type, (self.dp, cp), mesh_dim_names=("dp", "cp"))
        self.group = self.mesh.get_group("cp")
        self.cp_rank = self.mesh.get_local_rank("cp")
        self.dp_rank = self.mesh.get_local_rank("dp")

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        return shard(x, self.cp, self.cp_rank, dim)

    def gather(self, x: Tensor) -> Tensor:
        """The whole sequence ``[B, L, ...]`` from this rank's ``[B, 2c, ...]``; differentiable."""
        return _GatherSequence.apply(x, self.group, self.cp, self.cp_rank)

    def gather_detached(self, x: Tensor) -> Tensor:
        """The whole sequence of ``x``, without a gradient (what a core's selection reads)."""
        with torch.no_grad():
            return self.gather(x.detach())

    def query_rows(self, length: int) -> QueryRows:
        """This rank's rows of a sequence of ``length`` tokens, for ``AttentionCore.attend_rows``."""
        return QueryRows(spans=own_spans(length, self.cp, self.cp_rank), gather=self.gather_detached)

    def shard_batch(self, model: nn.Module, x: Tensor, y: Tensor, position_ids: Tensor | None):
        """This rank's tokens, targets and position ids of the whole rows ``x``, ``y`` ``[B, L]``.
        Position ids (``None``: the scheme's ids of the model's current mode) are those of the
        whole sequence, so every token keeps its global position."""
        B, L = x.shape
        check_length(L, self.cp)
        if position_ids is None:
            position_ids = model.position.position_ids(B, L, device=x.device)
        return self.shard(x), self.shard(y), self.shard(position_ids.expand(B, L))

    def attach(self, model: nn.Module) -> None:
        """Wrap every attention core of ``model`` (idempotent)."""
        cores = iter(model.cores)
        if any(isinstance(c, ContextParallelCore) for c in model.cores):
            return
        model.set_attention(lambda: ContextParallelCore(next(cores), self))

    def detach(self, model: nn.Module) -> None:
        """Put the original cores back."""
        cores = iter([c.inner if isinstance(c, ContextParallelCore) else c for c in model.cores])
        model.set_attention(lambda: next(cores))


def check_sizes(cp: Any, world: int) -> None:
    """ConfigError unless ``cp`` is an int >= 1 dividing the number of processes."""
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ConfigError(f"{SETTING} must be an int >= 1 (ranks that share one sequence), got {cp!r}")
    if world % cp:
        raise ConfigError(
            f"{SETTING}={cp} must divide the number of processes ({world}: trainer.devices x "
            f"trainer.num_nodes); data parallel runs over the remaining {world} / {cp} ranks"
        )


def check_config(cfg) -> None:
    """ConfigError, before any work, for a composed job config whose sequence split cannot run:
    ``trainer.strategy.context_parallel`` must be an int dividing the processes the trainer asks
    for, on the ``ddp`` or ``fsdp`` strategy, with ``data.seq_len`` divisible by twice its value."""
    from ctxlab.distributed import requested_processes

    strategy = cfg.trainer.get("strategy")
    cp = strategy.get("context_parallel") if hasattr(strategy, "get") else None
    if cp is None:
        return
    if strategy.get("name") not in ("ddp", "fsdp"):
        raise ConfigError(
            f"{SETTING}={cp} runs on trainer.strategy.name=ddp or fsdp, not {strategy.get('name')!r}"
        )
    check_sizes(cp, requested_processes(cfg.trainer))
    check_length(int(cfg.data.seq_len), cp)


def of(strategy) -> ContextParallel | None:
    """The strategy's sequence split, or None when it splits no sequence."""
    return getattr(strategy, "context_parallel_plan", None)


def _cp_class(name: str):
    from ctxlab.distributed import strategy_class

    base = strategy_class(name)

    class ContextParallelStrategy(base):
        """ctxlab's ``ddp`` or ``fsdp`` strategy over ``dp x cp`` ranks: the gradients are averaged
        over every rank (DDP's all-reduce, FSDP2's reduce-scatter over its mesh of all ranks; module
        docstring), the samplers deal rows over the dp ranks only, and the cp ranks of a dp rank
        read the same rows."""

        def __init__(self, *, context_parallel: int, **kw) -> None:
            super().__init__(**kw)
            world = dist.get_world_size() if dist.is_initialized() else context_parallel
            check_sizes(context_parallel, world)
            self.context_parallel = context_parallel
            self.context_parallel_plan: ContextParallel | None = None

        def setup_environment(self) -> None:
            super().setup_environment()
            device = "cuda" if self.root_device.type == "cuda" else "cpu"
            self.context_parallel_plan = ContextParallel(self.context_parallel, device)

        @property
        def distributed_sampler_kwargs(self) -> dict:
            plan = self.context_parallel_plan
            if plan is None:
                return super().distributed_sampler_kwargs
            return {"num_replicas": plan.dp, "rank": plan.dp_rank}

    ContextParallelStrategy.__name__ = ContextParallelStrategy.__qualname__ = (
        "ContextParallelDDP" if name == "ddp" else "ContextParallelFSDP2"
    )
    return ContextParallelStrategy


_CLASSES: dict[str, type] = {}


def build_strategy(context_parallel: int, name: str = "ddp", **kw):
    """ctxlab's ``name`` strategy (``ddp``: ``ContextParallelDDP``; ``fsdp``:
    ``ContextParallelFSDP2``) with the sequence split over ``context_parallel`` ranks; keywords
    as the plain strategy's, already completed by ``ctxlab.distributed.build_strategy``."""
    if name not in _CLASSES:
        _CLASSES[name] = _cp_class(name)
    return _CLASSES[name](context_parallel=context_parallel, **kw)
