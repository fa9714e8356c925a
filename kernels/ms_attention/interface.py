"""The public MS attention API: ``ms_attention`` and ``ms_select``, with input validation.

Layout: q ``[B, L, Hq, D]``, k, v ``[B, L, Hkv, D]`` (BTHD), causal self-attention, query head
h reads kv head ``h // (Hq // Hkv)``. Softmax scale ``1/sqrt(D)`` unless given. The function
is defined in docs/ms-attention-contract.md; ``torch_impl`` documents the choices the
spec leaves open. Every bad argument raises ``ValueError`` naming it.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from ..rope import selected_inv_freq
from .limits import KERNEL_DTYPES, MIN_GPU_HEAD_DIM
from .torch_impl import ms_attention_torch, ms_select_torch

POOLS = ("mean", "attn")
SCOPES = ("head", "group")
SELECTS = ("paper", "causal")
PES = ("pre", "selected")
BACKENDS = ("auto", "torch", "triton")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def validate_ms_args(
    *,
    region: int = 16,
    budget: int = 512,
    merge: int = 64,
    pool: str = "mean",
    scope: str = "head",
    select: str = "paper",
    pe: str = "pre",
    rope_base: float = 10000.0,
    scale: float | None = None,
    backend: str = "auto",
) -> None:
    """Raise ``ValueError`` naming the first bad option; tensors are not needed.

    The config layer calls this to reject a bad configuration at composition time. Requires
    integers ``region >= 1`` and ``1 <= merge < budget``, a listed ``pool``, ``scope``,
    ``select``, ``pe`` and ``backend``, a finite ``rope_base > 1`` and a finite positive
    ``scale`` or None.
    """
    if not _is_int(region) or region < 1:
        raise ValueError(f"region must be an integer >= 1, got {region!r}")
    if not _is_int(budget) or budget < 2:
        raise ValueError(f"budget must be an integer >= 2 (it must exceed merge >= 1), got {budget!r}")
    if not _is_int(merge) or not 1 <= merge < budget:
        raise ValueError(f"merge must be an integer with 1 <= merge < budget={budget}, got {merge!r}")
    _check_choice("pool", pool, POOLS)
    _check_choice("scope", scope, SCOPES)
    _check_choice("select", select, SELECTS)
    _check_choice("pe", pe, PES)
    _check_choice("backend", backend, BACKENDS)
    if not _is_real(rope_base) or rope_base <= 1:
        raise ValueError(f"rope_base must be a finite number > 1, got {rope_base!r}")
    if scale is not None and (not _is_real(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")


def check_tensors(q: Tensor, k: Tensor, v: Tensor | None, *, pe: str) -> None:
    """Ranks, floating dtypes, matching devices/dtypes/shapes and GQA divisibility."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 ([B, L, H, D]), got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    B, L, Hq, D = q.shape
    for name, x in named.items():
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.shape[0] != B:
            raise ValueError(f"{name} has batch {x.shape[0]} but q has {B}")
        if x.shape[1] != L:
            raise ValueError(f"{name} has length {x.shape[1]} but q has {L}")
        if x.shape[3] != D:
            raise ValueError(f"{name} has head dim {x.shape[3]} but q has {D}")
    if v is not None and v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} heads but k has {k.shape[2]}")
    if B < 1 or L < 1 or D < 1 or Hq < 1 or k.shape[2] < 1:
        raise ValueError(f"q and k need B, L, H, D >= 1, got q {list(q.shape)} and k {list(k.shape)}")
    if Hq % k.shape[2]:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({k.shape[2]})")
    if pe == "selected" and D % 2:
        raise ValueError(f"pe='selected' applies rotary embeddings and needs an even head dim, q has D={D}")


def triton_takes(q: Tensor) -> bool:
    """Whether the compiled kernels take ``q``'s dtype and head dim (``triton_impl`` names the
    rule when ``backend="triton"`` is forced on a tensor they do not take)."""
    d = q.shape[-1]
    return q.dtype in KERNEL_DTYPES and d % 2 == 0 and d >= MIN_GPU_HEAD_DIM


def use_triton(q: Tensor, backend: str) -> bool:
    """Whether ``backend`` runs the Triton kernels for ``q``: ``"triton"`` always (CUDA, or Triton's
    CPU interpreter), ``"auto"`` for CUDA tensors the kernels take (:func:`triton_takes`) when the
    Triton module imports, ``"torch"`` never. RuntimeError for ``"triton"`` when the Triton module
    does not import."""
    if backend == "torch" or (backend == "auto" and not (q.is_cuda and triton_takes(q))):
        return False
    try:
        from .triton_impl import ms_attention_triton  # noqa: F401  (through sys.modules)
    except ImportError as err:
        if backend == "triton":
            raise RuntimeError(
                f"backend='triton' is unavailable: importing triton_impl failed ({err})"
            ) from err
        return False
    return True


def ms_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    region: int = 16,
    budget: int = 512,
    merge: int = 64,
    pool: str = "mean",
    scope: str = "head",
    select: str = "paper",
    pe: str = "pre",
    rope_base: float = 10000.0,
    inv_freq: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """MS attention of arXiv 2410.04211 -> ``[B, L, Hq, D]`` in q's dtype.

    Args:
        q: ``[B, L, Hq, D]``; k, v: ``[B, L, Hkv, D]``, same dtype and device, ``Hq % Hkv == 0``.
        region, budget, merge: w tokens per region, T key regions per block (its own m
            included), m query regions per block; ``1 <= merge < budget``.
        pool: region representatives, ``"mean"`` or ``"attn"``.
        scope: ``"head"`` (each query head selects) or ``"group"`` (one selection per kv head).
        select: ``"paper"`` (not causal: a block's own queries vote) or ``"causal"``.
        pe: ``"pre"`` (RoPE already in q, k) or ``"selected"`` (RoPE applied here at the
            block's re-indexed positions; needs an even D).
        rope_base, inv_freq: ``pe="selected"``'s rotation: a position scheme's inverse
            frequencies ``[D/2]`` (any RoPE scaling: NTK, YaRN, CRD NTK), or when None plain
            RoPE of ``rope_base``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA tensors whose dtype
            and head dim the kernels take, float32/16/bf16 and an even D >= 32, when its module
            imports; else torch).

    Inputs with ``ceil(L / region) <= budget`` give exactly dense causal attention. Gradients
    reach q, k, v through the attention only; the selection is not differentiated.
    """
    validate_ms_args(
        region=region,
        budget=budget,
        merge=merge,
        pool=pool,
        scope=scope,
        select=select,
        pe=pe,
        rope_base=rope_base,
        scale=scale,
        backend=backend,
    )
    check_tensors(q, k, v, pe=pe)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    options = dict(
        region=region,
        budget=budget,
        merge=merge,
        pool=pool,
        scope=scope,
        select=select,
        pe=pe,
        inv_freq=selected_inv_freq(q.shape[-1], rope_base, inv_freq, q.device) if pe == "selected" else None,
        scale=scale,
    )
    if use_triton(q, backend):
        from .triton_impl import ms_attention_triton

        return ms_attention_triton(q, k, v, **options)
    return ms_attention_torch(q, k, v, **options)


def ms_select(
    q: Tensor,
    k: Tensor,
    *,
    region: int = 16,
    budget: int = 512,
    merge: int = 64,
    pool: str = "mean",
    scope: str = "head",
    select: str = "paper",
) -> Tensor:
    """Selected key regions per block: LongTensor ``[B, Hs, G, budget - merge]``.

    ``Hs`` is Hq for ``scope="head"`` and Hkv for ``scope="group"``; ``G = ceil((n - T) / m)``
    blocks (0 when ``n = ceil(L / region) <= budget``). Row ``[b, h, g]`` lists block g's
    T-m distinct regions in merge order (rank-first interleave of the rows' top lists, first
    occurrence kept); all lie before the block, ``< T + g*m``.
    """
    validate_ms_args(region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select)
    check_tensors(q, k, None, pe="pre")
    return ms_select_torch(
        q, k, region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select
    )
