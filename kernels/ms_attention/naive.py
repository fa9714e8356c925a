"""MS attention, deliberately naive: loops over batch, head, block, row and query token.

The test oracle for ``torch_impl`` (and through it, the Triton kernels). It follows
docs/ms-attention-contract.md step by step with Python lists wherever the spec speaks of
lists, so it shares no indexing trick with the vectorised path. Slow: use small L only.

Shape legend: B batch, L tokens, Hq query heads, Hkv kv heads, D head dim, Hs selection heads
(Hq for ``scope="head"``, Hkv for ``scope="group"``), w region, T budget, m merge,
n = ceil(L / w) regions, G = ceil((n - T) / m) blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rope import rope_cos_sin, rotate_half, selected_inv_freq


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _representative(tokens: Tensor, pool: str) -> Tensor:
    """One region's representative from its valid tokens ``[t, D]`` -> ``[D]``."""
    mean = tokens.mean(dim=0)
    if pool == "mean":
        return mean
    weights = torch.softmax(tokens @ mean / math.sqrt(tokens.shape[-1]), dim=0)
    return weights @ tokens


def _rotate(x: Tensor, positions: list[int], inv_freq: Tensor) -> Tensor:
    """RoPE (rotate-half) on rows ``x [N, D]`` at ``positions``, in x's dtype."""
    cos, sin = rope_cos_sin(torch.tensor(positions, device=x.device), inv_freq)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def ms_select_naive(
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
    """Spec steps 3-8 with explicit loops -> LongTensor ``[B, Hs, G, T-m]`` in merge order."""
    B, L, Hq, _ = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    w, T, m = region, budget, merge
    n = math.ceil(L / w)
    G = math.ceil((n - T) / m) if n > T else 0
    Hs = Hq if scope == "head" else Hkv
    dtype = _compute_dtype(q.dtype)
    qd, kd = q.detach().to(dtype), k.detach().to(dtype)

    out = torch.full((B, Hs, G, T - m), -1, dtype=torch.long)
    for b in range(B):
        qbar = [[_representative(qd[b, i * w : (i + 1) * w, h], pool) for i in range(n)] for h in range(Hq)]
        kbar = [[_representative(kd[b, j * w : (j + 1) * w, h], pool) for j in range(n)] for h in range(Hkv)]
        for hs in range(Hs):
            q_heads = [hs] if scope == "head" else list(range(hs * group, (hs + 1) * group))
            kv_head = hs // group if scope == "head" else hs

            def score(i: int, j: int, q_heads=q_heads, kv_head=kv_head, qbar=qbar, kbar=kbar) -> float:
                return sum(float(qbar[h][i] @ kbar[kv_head][j]) for h in q_heads)

            for g in range(G):
                s = T + g * m
                e = min(s + m, n)
                rows = range(s, e) if select == "paper" else range(s - m, s)
                ranked_rows = []
                for i in rows:
                    allowed = range(i - m + 1) if select == "paper" else range(s)
                    ranked = sorted(allowed, key=lambda j, i=i: (-score(i, j), j))
                    ranked_rows.append(ranked[: T - m])
                merged: list[int] = []
                for rank in range(T - m):
                    for ranked in ranked_rows:
                        if ranked[rank] not in merged:
                            merged.append(ranked[rank])
                out[b, hs, g] = torch.tensor(merged[: T - m])
    return out.to(q.device)


def ms_attend_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    *,
    region: int = 16,
    budget: int = 512,
    merge: int = 64,
    scope: str = "head",
    pe: str = "pre",
    rope_base: float = 10000.0,
    inv_freq: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention given the selection ``idx [B, Hs, G, T-m]``, one query token at a time.

    Each token's key list is built explicitly: all earlier tokens in the dense part, else the
    tokens of its block's selected regions (ascending; -1 entries skipped) followed by the
    block's own tokens up to itself, with the ``pe="selected"`` positions of the spec.
    Returns ``[B, L, Hq, D]`` in q's dtype.
    """
    B, L, Hq, D = q.shape
    group = Hq // k.shape[2]
    w, T, m = region, budget, merge
    n = math.ceil(L / w)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = _compute_dtype(q.dtype)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    inv_freq = selected_inv_freq(D, rope_base, inv_freq, q.device)

    rows_b = []
    for b in range(B):
        rows_h = []
        for h in range(Hq):
            kv_head = h // group
            sel_head = h if scope == "head" else kv_head
            rows_t = []
            for t in range(L):
                if n <= T or t < T * w:
                    keys = list(range(t + 1))
                    key_pos, query_pos = keys, t
                else:
                    g = (t // w - T) // m
                    s = T + g * m
                    regions = sorted(j for j in idx[b, sel_head, g].tolist() if j >= 0)
                    selected = [j * w + u for j in regions for u in range(w)]
                    own = list(range(s * w, t + 1))
                    keys = selected + own
                    own_start = (T - m) * w
                    key_pos = list(range(len(selected))) + [own_start + u - s * w for u in own]
                    query_pos = own_start + t - s * w
                qt, kt, vt = qd[b, t, h][None], kd[b, keys, kv_head], vd[b, keys, kv_head]
                if pe == "selected":
                    qt, kt = _rotate(qt, [query_pos], inv_freq), _rotate(kt, key_pos, inv_freq)
                weights = torch.softmax((kt @ qt[0]) * scale, dim=0)
                rows_t.append(weights @ vt)
            rows_h.append(torch.stack(rows_t))
        rows_b.append(torch.stack(rows_h, dim=1))
    return torch.stack(rows_b).to(q.dtype)


def ms_attention_naive(
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
) -> Tensor:
    """``ms_select_naive`` then ``ms_attend_naive`` -> ``[B, L, Hq, D]`` in q's dtype."""
    idx = ms_select_naive(
        q, k, region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select
    )
    return ms_attend_naive(
        q,
        k,
        v,
        idx,
        region=region,
        budget=budget,
        merge=merge,
        scope=scope,
        pe=pe,
        rope_base=rope_base,
        inv_freq=inv_freq,
        scale=scale,
    )
