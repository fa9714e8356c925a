"""The position-scheme contract: which position ids a model sees and how they rotate q and k.

Shapes: B batch, L tokens, H heads, D head_dim. Position ids are int64 ``[B, L]``; cos/sin
tables are float32 ``[B, L, D]``; q and k are ``[B, L, H, D]`` (BTHD).

One scheme object is shared by every layer of a model. The model asks it for position ids
(``position_ids``), then for the rotation (``rotate`` or ``cos_sin``) of those ids. Training and
evaluation differ only through ``self.training``: in training a scheme may hand out its own
ids (CRD NTK's cyclic random offsets, PoSE's skips); in evaluation every scheme hands out the
natural ids ``start .. start+L-1``, so KV-cache decoding (``start`` = tokens already cached)
and a full forward pass give each token the same id.

Frequencies are computed and stored in float64 (``[D/2]``, a few hundred bytes), and angles
are formed in float64 from the int64 ids, so the float32 cos/sin tables are correct to float32
rounding at any position in use: float32 inverse frequencies alone would put some angles
0.12 rad off at position 4M (D=128, base 10000). A cast of the model
(``model.to(torch.bfloat16)``, Lightning's ``*-true`` precisions) would round these buffers to
the model's dtype, and a bfloat16 frequency turns position 32768 by tens of radians the wrong
way; so ``_apply`` rebuilds every table in float64 on the new device after any cast or move.

Precision rule (enforced by ``check_lengths``). The same ids are also consumed where the angle
is a float32 product ``float(p) * inv_freq``: HF's rotary embedding when a fine-tuned model is
reloaded (whatever the model's dtype) and fused rotary kernels. There an id at or above 2**24
is no longer an exact float32 integer (and the highest frequency's angle is already off by up
to ``p * 2**-24`` radians below that). Every id a scheme can hand out (training ids including
cyclic, offset and skip ranges; evaluation ids up to ``eval_max_length``) must therefore stay
below ``MAX_EXACT_POSITION = 2**24``. The model dtype does not relax this: q and k of every
supported dtype are rotated in float32 by ``ctxlab.kernels.rope.apply_rotary``, and HF forms
its angles in float32 for every dtype. Scaling cannot cost precision here (NTK keeps the
highest frequency and only slows the others; angles are float64), so scales, including every
scale a growth schedule reaches, are checked only for finite, non-underflowing frequencies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ctxlab.kernels.rope import apply_rotary, rope_cos_sin

MAX_EXACT_POSITION = 2**24
"""Position ids must stay below this: the largest range of integers float32 holds exactly."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_scale(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number >= 1; else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 1, got {value!r}")
    if not (math.isfinite(value) and value >= 1.0):
        raise ValueError(f"{name} must be a finite number >= 1 (1 = no scaling), got {value!r}")
    return float(value)


def check_inv_freq(inv_freq: Tensor, setting: str) -> None:
    """Raise ValueError naming ``setting`` unless every frequency is finite and normal (float64)."""
    if not bool(torch.isfinite(inv_freq).all()):
        raise ValueError(f"{setting} gives non-finite rotary frequencies")
    if float(inv_freq.min()) < torch.finfo(torch.float64).tiny:
        raise ValueError(f"{setting} gives rotary frequencies that underflow float64")


def inv_freq64(head_dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """RoPE inverse frequencies ``base^(-2i/D)``, float64 ``[D/2]``.

    The values of ``ctxlab.kernels.rope.rope_inv_freq`` before its float32 cast; position
    schemes keep them in float64 (see the module docstring).
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return 1.0 / base**exponent


def ntk_base(base: float, scale: float, head_dim: int) -> float:
    """NTK-aware base ``base * scale^(D/(D-2))`` (bloc97): the lowest frequency slows by s."""
    if head_dim <= 2:
        raise ValueError(f"NTK scaling needs head_dim > 2 (exponent D/(D-2)), got {head_dim}")
    try:
        scaled = base * scale ** (head_dim / (head_dim - 2))
    except OverflowError:
        scaled = math.inf
    if not math.isfinite(scaled):
        raise ValueError(f"NTK scale {scale:g} makes the base {base:g} * s^(D/(D-2)) overflow")
    return scaled


def natural_ids(batch: int, length: int, start: int, device: torch.device | str | None) -> Tensor:
    """``start .. start+length-1`` for every row, int64 ``[B, L]``."""
    row = torch.arange(start, start + length, dtype=torch.long, device=device)
    return row.expand(batch, length).clone()


class PositionScheme(nn.Module):
    """Base class of every member of the ``position`` config group.

    Subclasses set ``name`` (the config option it implements), build their frequency tables
    in ``_build_tables`` and override ``_inv_freq_for`` / ``_training_ids`` /
    ``_max_position_ids`` where they differ from plain RoPE with natural ids.

    Attributes:
        head_dim: D, the rotated size of a head (even).
        base: the configured (unscaled) RoPE base.
        applies_in_attention: True only for ``selected``, whose RoPE is applied inside MS
            attention; ``rotate`` is then the identity.
    """

    name: ClassVar[str] = ""
    applies_in_attention: ClassVar[bool] = False
    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        check_int("head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1.0:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        """Float64 frequency buffers by name (at least ``inv_freq``, ``[D/2]``) on ``device``."""
        raise NotImplementedError

    def _rebuild_tables(self, device: torch.device | None = None) -> None:
        for name, table in self._build_tables(device).items():
            setattr(self, name, table)

    def _apply(self, fn, recurse=True):
        # Keep the tables float64 and exact whatever cast or move the model goes through.
        super()._apply(fn, recurse)
        self._rebuild_tables(self.inv_freq.device)
        return self

    @property
    def rope_base(self) -> float:
        """The base the scheme rotates with; for schemes whose frequencies are not a plain base
        (``pi``, ``dynamic_ntk``, ``yarn``) the unscaled base they start from."""
        return self.base

    @property
    def attention_scaling(self) -> float:
        """Factor multiplying both cos and sin (YaRN's temperature; 1 elsewhere), as in HF."""
        return 1.0

    def _inv_freq_for(self, position_ids: Tensor) -> Tensor:
        """Inverse frequencies, float64 ``[D/2]``, used to rotate these ids."""
        return self.inv_freq

    def frequencies_at(self, length: int) -> tuple[Tensor, float]:
        """(inverse frequencies float64 ``[D/2]``, attention scaling) that rotate the positions
        ``0 .. length-1`` now (training or evaluation): the tables an attention core that
        applies positions itself (``position=selected``) hands its kernels."""
        check_int("length", length, 1)
        ids = torch.full((1, 1), length - 1, dtype=torch.long, device=self.inv_freq.device)
        return self._inv_freq_for(ids), self.attention_scaling

    def position_ids(
        self,
        batch: int,
        length: int,
        *,
        start: int = 0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Position ids, int64 ``[B, L]``, on ``device`` (default: the scheme's buffers' device).

        Training mode: the scheme's training ids (natural unless the scheme says otherwise);
        random draws use ``generator`` when given. Evaluation mode: ``start .. start+L-1``.
        """
        check_int("batch", batch, 1)
        check_int("length", length, 1)
        check_int("start", start, 0)
        device = self.inv_freq.device if device is None else torch.device(device)
        if self.training:
            return self._training_ids(batch, length, start, generator, device)
        return natural_ids(batch, length, start, device)

    def _training_ids(
        self,
        batch: int,
        length: int,
        start: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        return natural_ids(batch, length, start, device)

    def cos_sin(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin tables for ``position_ids`` (int ``[B, L]``): float32 ``[B, L, D]`` each.

        Angles are formed in float64 from the integer ids; YaRN's attention scaling multiplies
        both tables, as HF does.
        """
        check_position_ids(position_ids)
        return rope_cos_sin(position_ids, self._inv_freq_for(position_ids), self.attention_scaling)

    def rotate(self, q_BLHD: Tensor, k_BLHD: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q ``[B, L, Hq, D]`` and k ``[B, L, Hkv, D]`` by the ids' angles (rotate-half).

        ``position_ids`` is ``[B, L]`` or ``[1, L]`` (shared by the batch). Rotation runs in
        float32; the results come back in q's and k's dtypes.
        """
        check_rotate_inputs(q_BLHD, k_BLHD, position_ids, self.head_dim)
        cos, sin = self.cos_sin(position_ids)
        return apply_rotary(q_BLHD, cos, sin), apply_rotary(k_BLHD, cos, sin)

    def hf_rope_scaling(self) -> dict[str, Any] | None:
        """The HF ``rope_parameters`` dict (transformers >= 5; ``rope_scaling`` before) that makes
        an HF Llama rotate as this scheme does at evaluation, or None where HF has no equivalent.
        """
        raise NotImplementedError

    def check_lengths(self, train_length: int, eval_max_length: int, dtype: torch.dtype) -> None:
        """Raise ValueError, naming the setting, if these lengths break the scheme.

        Checks the scheme's own constraints and the precision rule of this module: every
        position id the scheme can hand out in training (rows of ``train_length`` tokens) or
        evaluation (up to ``eval_max_length`` tokens) stays below ``MAX_EXACT_POSITION``.
        ``dtype`` is the model's dtype; it must be one of ``SUPPORTED_DTYPES``.
        """
        check_int("train_length", train_length, 1)
        check_int("eval_max_length", eval_max_length, 1)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        for setting, max_id in self._max_position_ids(train_length, eval_max_length):
            if max_id >= MAX_EXACT_POSITION:
                raise ValueError(
                    f"position={self.name}: {setting} gives position ids up to {max_id:,}, but ids "
                    f"must stay below 2**24 = {MAX_EXACT_POSITION:,} to remain exact where angles "
                    f"are float32 products (HF reload, fused rotary kernels), for {dtype} too"
                )

    def _max_position_ids(self, train_length: int, eval_max_length: int) -> list[tuple[str, int]]:
        """(setting that sets it, largest id) for training and for evaluation."""
        return [
            (f"train_length={train_length}", train_length - 1),
            (f"eval_max_length={eval_max_length}", eval_max_length - 1),
        ]

    def check_attention(self, *, attention: str, pe: str | None) -> None:
        """Raise ValueError, naming both settings, if the chosen attention cannot honour the scheme.

        ``pe`` is MS attention's ``pe`` option (``"pre"`` or ``"selected"``), None for an attention
        without one. ``selected`` needs ``pe="selected"`` (RoPE applied inside MS attention to the
        selected tokens); every other scheme rotates q and k before attention, so it needs an
        attention that does not rotate them again (``pe`` None or ``"pre"``).
        """
        if self.applies_in_attention and pe != "selected":
            raise ValueError(
                f"position={self.name} encodes positions inside MS attention and needs its "
                f"pe='selected', but attention={attention} has pe={pe!r}"
            )
        if not self.applies_in_attention and pe not in (None, "pre"):
            raise ValueError(
                f"position={self.name} rotates q and k before attention and needs pe='pre', but "
                f"attention={attention} has pe={pe!r}, which would rotate them again"
            )

    def growth_callback(self) -> Any | None:
        """The Lightning callback this scheme needs during training, or None (most schemes)."""
        return None

    eval_scale_setting: ClassVar[str | None] = None
    """The setting (``position.<name>``) that fixes the scale used at evaluation, for schemes
    whose inference scale is free to choose after training (CRD NTK's ``scale_inf``, a
    training-free NTK ``scale``); None where there is none. ``eval.scale_search`` tunes it."""

    @property
    def eval_scale(self) -> float | None:
        """The evaluation scale now in use (None where the scheme has none)."""
        return None if self.eval_scale_setting is None else float(getattr(self, self.eval_scale_setting))

    def set_eval_scale(self, scale: float) -> None:
        """Use ``scale`` from now on in evaluation (rebuilding the tables)."""
        if self.eval_scale_setting is None:
            raise ValueError(f"position={self.name} has no evaluation scale to set")
        setattr(self, self.eval_scale_setting, check_scale(self.eval_scale_setting, scale))
        self._rebuild_tables(self.inv_freq.device)

    def describe(self) -> str:
        """One line naming the scheme and its settings."""
        return f"{self.name}(head_dim={self.head_dim}, base={self.base:g})"

    def extra_repr(self) -> str:
        return self.describe()


class RotatesByFrequencies:
    """Mixin (before ``PositionScheme`` in the bases) for a scheme that rotates by another scheme's
    frequencies, ``self.frequencies``: PoSE (its own training ids) and ``selected`` (positions
    applied inside attention). ``_take_frequencies`` checks and registers that scheme."""

    frequencies: PositionScheme

    def _take_frequencies(self, frequencies: PositionScheme, allowed: tuple[str, ...]) -> None:
        if frequencies.name not in allowed:
            raise ValueError(
                f"position.frequencies must be one of {', '.join(allowed)}, got position={frequencies.name}"
            )
        if frequencies.head_dim != self.head_dim or frequencies.base != self.base:
            raise ValueError(
                f"position.frequencies ({frequencies.describe()}) must have position={self.name}'s "
                f"head_dim={self.head_dim} and base={self.base:g}"
            )
        self.frequencies = frequencies

    def _inv_freq_for(self, position_ids: Tensor) -> Tensor:
        return self.frequencies._inv_freq_for(position_ids)

    @property
    def attention_scaling(self) -> float:
        return self.frequencies.attention_scaling

    @property
    def rope_base(self) -> float:
        return self.frequencies.rope_base

    def frequencies_at(self, length: int) -> tuple[Tensor, float]:
        return self.frequencies.frequencies_at(length)


def check_position_ids(position_ids: Tensor) -> None:
    if not isinstance(position_ids, Tensor) or position_ids.dtype != torch.int64:
        raise ValueError(
            "position_ids must be an int64 tensor (exact integer positions), got "
            f"{getattr(position_ids, 'dtype', type(position_ids))}"
        )
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, L], got shape {tuple(position_ids.shape)}")


def check_rotate_inputs(q_BLHD: Tensor, k_BLHD: Tensor, position_ids: Tensor, head_dim: int):
    if q_BLHD.dim() != 4 or k_BLHD.dim() != 4:
        shapes = f"{tuple(q_BLHD.shape)} and {tuple(k_BLHD.shape)}"
        raise ValueError(f"q and k must be [B, L, H, D], got shapes {shapes}")
    batch, length, _, dim = q_BLHD.shape
    if k_BLHD.shape[0] != batch or k_BLHD.shape[1] != length or k_BLHD.shape[3] != dim:
        shapes = f"k {tuple(k_BLHD.shape)}, q {tuple(q_BLHD.shape)}"
        raise ValueError(f"{shapes}: k does not match q in B, L or D")
    if dim != head_dim:
        raise ValueError(f"q and k have head dim {dim}, but the scheme has head_dim={head_dim}")
    check_position_ids(position_ids)
    if position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids must be [{batch}, {length}] or [1, {length}] for q of shape "
            f"{tuple(q_BLHD.shape)}, got {tuple(position_ids.shape)}"
        )
