"""The attention contract: the part of a layer that maps (q, k, v) to outputs.

Shapes: q ``[B, L, H, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), output ``[B, L, H, D]``. With a
cache, q/k/v are the new tokens only and queries sit at positions ``P .. P+L-1`` after the
``P`` cached tokens.

Every member of the ``attention`` config group is an ``AttentionCore``. Generic code (the
models, the causality audit, checkpointing, callbacks, benchmarks, composition checks) calls
only the hooks below and never names a variant, so a new attention is a subclass, a config
file and a test case (``docs/extending.md``). A variant's settings are one frozen dataclass,
``Settings``, validated in its ``__post_init__`` and passed whole; the config file's keys are
its fields (``MSAttention(region=8)`` and ``MSAttention(MSSettings(region=8))`` are the same).

Hooks with defaults (a dense, causal core that rotates nothing needs none of them):

- ``causal`` / ``training_causal``: what the evaluated / trained function promises (the
  causality audit checks ``causal`` empirically);
- ``describe()``: one line for result tables;
- ``pair_fraction(L)``: the fraction of the ``L(L+1)/2`` causal query-key pairs computed;
- ``audit_length(minimum)``: a length at which the causality audit exercises the pattern;
- ``check_training_length(L)``: refuse, at composition time, a training length at which the
  core would not do what it is for;
- ``checkpoint_saves``: custom ops whose outputs activation checkpointing keeps instead of
  recomputing (``checkpoint_kwargs``);
- ``configure_position(scheme)``: take the model's position scheme (only cores with
  ``applies_positions`` can apply one inside attention, ``position=selected``);
- ``decode_exact``: whether one-token KV-cache steps reproduce the full forward;
- ``continues_foreign_cache(n_new)``: whether the core can continue from a cache that holds
  only k and v (transformers' own), or needs ctxlab's ``KVCache``;
- ``record_selection`` / ``selection_stats(local_window)``: what a sparse core chose, for
  the ``SelectionStats`` callback (``records_selection``);
- ``attend_rows(q, k, v, rows)``: the outputs of some query rows only (``QueryRows``), against
  the whole sequence's k and v, exactly as ``forward`` gives them; context parallelism calls it
  so that a rank computes its own rows only. The default, None, makes the caller run
  ``forward`` on the whole sequence.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ctxlab.attention.cache import LayerCache


@dataclass(frozen=True)
class QueryRows:
    """Which rows of a sequence an ``attend_rows`` call computes.

    ``spans``: the runs ``(start, stop)`` of token positions, in the order their rows are
    concatenated in the call's q. ``gather(x)``: the whole sequence ``[B, L, ...]`` of a tensor
    laid out like q's rows, detached (under context parallelism an all-gather: a collective, so a
    core either calls it on every rank or on none, which holds when whether it calls depends on
    its settings only)."""

    spans: tuple[tuple[int, int], ...]
    gather: Callable[[Tensor], Tensor]


class AttentionCore(nn.Module):
    """Base class of every attention core; see the module docstring for the hooks.

    Subclasses set ``Settings`` (a frozen dataclass, or None for a core without settings) and
    implement ``forward(q, k, v, cache=None)``. ``self.settings`` holds the validated settings.
    """

    Settings: ClassVar[type | None] = None
    applies_positions: ClassVar[bool] = False
    """True for a core that can apply the position scheme itself (``position=selected``)."""
    checkpoint_saves: ClassVar[tuple[str, ...]] = ()
    """``torch.library`` ops (``"namespace::name"``) whose outputs recomputation reuses."""
    records_selection: ClassVar[bool] = False
    """True for a core whose choices ``selection_stats`` describes."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        settings = cls.__dict__.get("Settings")
        if settings is not None:
            if not (dataclasses.is_dataclass(settings) and settings.__dataclass_params__.frozen):
                raise TypeError(f"{cls.__name__}.Settings must be a frozen dataclass")
            # The config's keys are the settings' fields: Hydra and ctxlab.config read them here.
            cls.__signature__ = inspect.Signature(
                [
                    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                    for f in dataclasses.fields(settings)
                ]
            )

    def __init__(self, settings: Any = None, /, **fields) -> None:
        super().__init__()
        kind = type(self).Settings
        if kind is None:
            if settings is not None or fields:
                given = ", ".join(fields) or type(settings).__name__
                raise ValueError(f"attention {type(self).__name__} takes no settings, got {given}")
        elif settings is None:
            settings = kind(**fields)
        elif fields or not isinstance(settings, kind):
            raise ValueError(
                f"attention {type(self).__name__} takes one {kind.__name__} or its fields as keywords"
            )
        self.settings = settings
        self.record_selection = False

    @property
    def causal(self) -> bool:
        """Whether the evaluated function is causal (no output depends on a later token)."""
        return True

    @property
    def training_causal(self) -> bool:
        """Whether the training-time function is causal."""
        return self.causal

    @property
    def decode_exact(self) -> bool:
        """Whether one-token steps through a KV cache give exactly the full forward's outputs
        (prefill chunks of a causal core always do)."""
        return self.causal

    def describe(self) -> str:
        """One line naming the core and its settings."""
        if self.settings is None:
            return type(self).__name__
        items = ",".join(
            f"{f.name}={getattr(self.settings, f.name)}" for f in dataclasses.fields(self.settings)
        )
        return f"{type(self).__name__}({items})"

    def extra_repr(self) -> str:
        return self.describe()

    def pair_fraction(self, length: int) -> float:
        """Fraction of the ``L(L+1)/2`` causal query-key pairs computed at ``length`` tokens."""
        return 1.0

    def audit_length(self, minimum: int) -> int:
        """A length, at least ``minimum``, at which the causality audit exercises the pattern."""
        return minimum

    def check_training_length(self, length: int) -> None:
        """ValueError naming the settings if training at ``length`` tokens defeats the core."""

    def configure_position(self, position) -> None:
        """Take the model's position scheme. The default core attends to rotated q and k and
        refuses a scheme that must be applied inside attention."""
        if position.applies_in_attention:
            raise ValueError(
                f"position={position.name} is applied inside attention, which {type(self).__name__} "
                "cannot do; use an attention that applies positions itself (attention=ms or ms_causal)"
            )

    def continues_foreign_cache(self, n_new: int) -> bool:
        """Whether ``n_new`` tokens can continue from a cache of k and v alone (transformers')."""
        return True

    def selection_stats(self, local_window: int) -> dict | None:
        """Statistics of the choices recorded while ``record_selection`` was on, or None."""
        return None

    def clear_selection(self) -> None:
        """Stop recording and drop what was recorded."""
        self.record_selection = False

    def attend_rows(self, q: Tensor, k: Tensor, v: Tensor, rows: QueryRows) -> Tensor | None:
        """The outputs ``[B, R, H, D]`` of the query rows ``rows.spans`` only: q ``[B, R, H, D]``
        holds those rows, k and v ``[B, L, Hkv, D]`` the whole sequence. They are the rows that
        ``forward`` on the whole sequence gives, differentiable in q, k and v; None when the core
        cannot compute rows alone (the caller then runs ``forward`` on the whole sequence)."""
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None) -> Tensor:
        raise NotImplementedError


def check_core(core: Any) -> AttentionCore:
    """``core`` if it is an ``AttentionCore``; else TypeError naming its class."""
    if not isinstance(core, AttentionCore):
        raise TypeError(
            f"attention core {type(core).__module__}.{type(core).__name__} does not derive from "
            "ctxlab.attention.AttentionCore; every member of the attention group must (docs/extending.md)"
        )
    return core


def build_cores(attention: Callable[[], Any], position, n_layers: int) -> list[AttentionCore]:
    """``n_layers`` cores from the factory ``attention``, each checked and told the position scheme."""
    cores = [check_core(attention()) for _ in range(n_layers)]
    for core in cores:
        core.configure_position(position)
    return cores


def _policy(saved: frozenset[str]):
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        name = getattr(op, "name", lambda: "")()
        if name in saved:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_kwargs(cores: Iterable[Any]) -> dict:
    """Keywords for non-reentrant ``torch.utils.checkpoint.checkpoint`` around layers with these
    cores: when any core names ``checkpoint_saves``, a selective policy that keeps those ops'
    outputs from the first forward and recomputes everything else."""
    saved = frozenset(op for c in cores for op in check_core(c).checkpoint_saves)
    kw: dict = {"use_reentrant": False}
    if saved:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kw["context_fn"] = lambda: create_selective_checkpoint_contexts(_policy(saved))
    return kw
