"""Context-extension baselines that rescale RoPE's frequencies, each as HF defines it.

Shapes: B batch, L tokens, D head_dim; ids int64 ``[B, L]``; frequencies float64 ``[D/2]``.

All four use natural ids in training and evaluation; they differ only in their frequencies:

- ``pi`` (Chen et al. 2023, HF ``linear``): positions divided by ``scale``, i.e.
  ``inv_freq / scale``.
- ``ntk`` (bloc97, fixed NTK-aware): plain RoPE with base ``base * scale^(D/(D-2))``; HF has no
  rope type for it, but it is exactly HF ``default`` with that ``rope_theta``.
- ``dynamic_ntk`` (emozilla, HF ``dynamic``): the NTK base grows with the current length.
- ``yarn`` (Peng et al. 2023, HF ``yarn``): NTK-by-parts ramp between interpolated and original
  frequencies, plus an attention temperature multiplying cos and sin.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ctxlab.position.base import (
    PositionScheme,
    check_int,
    check_inv_freq,
    check_scale,
    inv_freq64,
    ntk_base,
)


class LinearPI(PositionScheme):
    """Linear position interpolation: ids behave as ``p / scale`` (HF ``rope_type="linear"``).

    Args:
        head_dim: D, even.
        base: the RoPE base the model was pre-trained with.
        scale: s >= 1, the interpolation factor (target length / pre-training length).
    """

    name = "pi"

    def __init__(self, head_dim: int, base: float, scale: float) -> None:
        super().__init__(head_dim, base)
        self.scale = check_scale("scale", scale)
        self._rebuild_tables()

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        # Scaling the frequencies is scaling the positions: angle = p * (inv_freq / s).
        inv_freq = inv_freq64(self.head_dim, self.base, device) / self.scale
        return {"inv_freq": inv_freq}

    def hf_rope_scaling(self) -> dict[str, Any]:
        return {"rope_type": "linear", "factor": self.scale, "rope_theta": self.base}

    def describe(self) -> str:
        return f"pi(head_dim={self.head_dim}, base={self.base:g}, scale={self.scale:g})"


class NTKAware(PositionScheme):
    """Fixed NTK-aware scaling: plain RoPE with base ``base * scale^(D/(D-2))``.

    The highest frequency is unchanged and the lowest slows down by exactly ``scale``.

    Args:
        head_dim: D, even and > 2.
        base: the RoPE base the model was pre-trained with.
        scale: s >= 1, the context-extension factor.
    """

    name = "ntk"

    def __init__(self, head_dim: int, base: float, scale: float) -> None:
        super().__init__(head_dim, base)
        self.scale = check_scale("scale", scale)
        self._scaled_base = ntk_base(self.base, self.scale, head_dim)
        self._rebuild_tables()
        check_inv_freq(self.inv_freq, f"scale={self.scale:g}")

    eval_scale_setting = "scale"  # training-free: the scale is chosen for the target length

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        self._scaled_base = ntk_base(self.base, self.scale, self.head_dim)
        return {"inv_freq": inv_freq64(self.head_dim, self._scaled_base, device)}

    @property
    def rope_base(self) -> float:
        return self._scaled_base

    def hf_rope_scaling(self) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self._scaled_base}

    def describe(self) -> str:
        return (
            f"ntk(head_dim={self.head_dim}, base={self.base:g}, scale={self.scale:g}, "
            f"scaled base={self._scaled_base:.6g})"
        )


class DynamicNTK(PositionScheme):
    """Dynamic NTK scaling, HF's formula (``rope_type="dynamic"``).

    For ids whose largest value is ``n - 1`` (over the whole batch, as HF takes it), with
    ``n' = max(n, original_max_position)``, the rotation uses plain RoPE with base
    ``base * (scale * n' / original_max_position - (scale - 1))^(D/(D-2))``: unchanged up to
    the original length, growing beyond it. The base is computed per call from the ids, on
    their device, with no host synchronisation.

    Statelessness: HF caches the largest base seen and keeps it while inputs stay longer than
    the original length; here every call derives its base from its own ids. The two agree on a
    fresh HF module and in KV-cache decoding, where the largest id only grows.

    HF reads the original length from ``config.max_position_embeddings``: set it to
    ``original_max_position`` when loading with ``hf_rope_scaling()``.

    Args:
        head_dim: D, even and > 2.
        base: the RoPE base the model was pre-trained with.
        scale: s >= 1, HF's ``factor``.
        original_max_position: the pre-training context length.
    """

    name = "dynamic_ntk"

    def __init__(self, head_dim: int, base: float, scale: float, original_max_position: int):
        super().__init__(head_dim, base)
        self.scale = check_scale("scale", scale)
        self.original_max_position = check_int("original_max_position", original_max_position, 1)
        if head_dim <= 2:
            raise ValueError(f"dynamic NTK scaling needs head_dim > 2, got {head_dim}")
        self._rebuild_tables()

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        return {"inv_freq": inv_freq64(self.head_dim, self.base, device)}

    def _inv_freq_for(self, position_ids: Tensor) -> Tensor:
        D, L0 = self.head_dim, self.original_max_position
        length = (position_ids.max().to(torch.float64) + 1).clamp_min(L0)
        base = self.base * (self.scale * length / L0 - (self.scale - 1)) ** (D / (D - 2))
        exponent = torch.arange(0, D, 2, dtype=torch.float64, device=position_ids.device) / D
        return 1.0 / base**exponent

    def hf_rope_scaling(self) -> dict[str, Any]:
        return {"rope_type": "dynamic", "factor": self.scale, "rope_theta": self.base}

    def describe(self) -> str:
        return (
            f"dynamic_ntk(head_dim={self.head_dim}, base={self.base:g}, scale={self.scale:g}, "
            f"original_max_position={self.original_max_position})"
        )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's temperature term ``0.1 * mscale * ln(s) + 1`` (1 for s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


class YaRN(PositionScheme):
    """YaRN, exactly as HF's ``_compute_yarn_parameters`` (``rope_type="yarn"``).

    Dimensions rotating more than ``beta_fast`` times over the original context keep their
    frequency, those rotating fewer than ``beta_slow`` times are interpolated by ``scale``, and
    a linear ramp over dimension index blends the two (bounds floored/ceiled when ``truncate``).
    cos and sin are multiplied by the attention factor: ``attention_factor`` if given, else
    ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` if both are given (DeepSeek), else
    ``0.1 ln(s) + 1``.

    Args:
        head_dim: D, even.
        base: the RoPE base the model was pre-trained with.
        scale: s >= 1, the context-extension factor.
        original_max_position: the pre-training context length.
        beta_fast: rotations above which a dimension is not interpolated (paper: 32).
        beta_slow: rotations below which a dimension is fully interpolated (paper: 1).
        mscale: DeepSeek's numerator coefficient of the temperature (with ``mscale_all_dim``).
        mscale_all_dim: DeepSeek's denominator coefficient.
        attention_factor: the temperature itself, overriding the formulas above.
        truncate: floor/ceil the ramp bounds to whole dimensions (HF's default True).
    """

    name = "yarn"

    def __init__(
        self,
        head_dim: int,
        base: float,
        scale: float,
        original_max_position: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float | None = None,
        mscale_all_dim: float | None = None,
        attention_factor: float | None = None,
        truncate: bool = True,
    ) -> None:
        super().__init__(head_dim, base)
        self.scale = check_scale("scale", scale)
        self.original_max_position = check_int("original_max_position", original_max_position, 1)
        if not 0 < beta_slow < beta_fast:
            raise ValueError(
                f"need 0 < beta_slow < beta_fast, got beta_slow={beta_slow}, beta_fast={beta_fast}"
            )
        if (mscale is None) != (mscale_all_dim is None):
            raise ValueError(
                "mscale and mscale_all_dim are used together (their ratio is the temperature); "
                f"got mscale={mscale}, mscale_all_dim={mscale_all_dim}"
            )
        for name, value in (
            ("mscale", mscale),
            ("mscale_all_dim", mscale_all_dim),
            ("attention_factor", attention_factor),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 when given, got {value}")
        self.beta_fast = float(beta_fast)
        self.beta_slow = float(beta_slow)
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim
        self.attention_factor = attention_factor
        self.truncate = bool(truncate)
        self._rebuild_tables()

    def _ramp_bounds(self) -> tuple[float, float]:
        """Dimension indices where the ramp from extrapolation to interpolation starts and ends."""

        def dim_rotating(rotations: float) -> float:
            # Index i whose wavelength fits `rotations` times into the original context.
            wavelengths = self.original_max_position / (rotations * 2 * math.pi)
            return self.head_dim * math.log(wavelengths) / (2 * math.log(self.base))

        low, high = dim_rotating(self.beta_fast), dim_rotating(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.head_dim - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        return low, high

    def _build_tables(self, device: torch.device | None) -> dict[str, Tensor]:
        extrapolated = inv_freq64(self.head_dim, self.base, device)  # [D/2]
        interpolated = extrapolated / self.scale
        low, high = self._ramp_bounds()
        index = torch.arange(self.head_dim // 2, dtype=torch.float64, device=device)
        interpolate = ((index - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: interpolate
        inv_freq = extrapolated * (1 - interpolate) + interpolated * interpolate
        return {"inv_freq": inv_freq}

    @property
    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale is not None and self.mscale_all_dim is not None:
            numerator = yarn_mscale(self.scale, self.mscale)
            return numerator / yarn_mscale(self.scale, self.mscale_all_dim)
        return yarn_mscale(self.scale)

    def hf_rope_scaling(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "rope_type": "yarn",
            "factor": self.scale,
            "original_max_position_embeddings": self.original_max_position,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "truncate": self.truncate,
            "rope_theta": self.base,
        }
        optional = {
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
            "attention_factor": self.attention_factor,
        }
        params.update({key: value for key, value in optional.items() if value is not None})
        return params

    def describe(self) -> str:
        return (
            f"yarn(head_dim={self.head_dim}, base={self.base:g}, scale={self.scale:g}, "
            f"original_max_position={self.original_max_position}, beta_fast={self.beta_fast:g}, "
            f"beta_slow={self.beta_slow:g}, attention scaling={self.attention_scaling:.6g})"
        )
