"""MoBA, deliberately naive: loops over batch, head and query token.

The test oracle for ``torch_impl`` and ``flex``. It follows ``kernels/moba/README.md`` step by
step with Python lists, so it shares no masking trick with the vectorised paths. Slow: small L.

Shape legend: B batch, L tokens, Hq query heads, Hkv kv heads, D head dim, b block size,
nb = ceil(L / b) key blocks, k = top_k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def moba_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, scale: float | None = None
) -> Tensor:
    """q ``[B, L, Hq, D]``, k, v ``[B, L, Hkv, D]`` -> ``[B, L, Hq, D]`` in q's dtype (computed in
    float64). Query t of block i = t // b attends causally to block i's tokens ``<= t`` and to all
    tokens of the ``min(top_k, i)`` earlier blocks j < i with the largest gate ``q_t . mean(k_j)``
    (ties to the smaller j)."""
    B, L, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.empty(B, L, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh, vh = kd[b, :, h // group], vd[b, :, h // group]  # [L, D]
            for t in range(L):
                own = t // block_size
                gates = [(float(qd[b, t, h] @ kh[j * block_size : (j + 1) * block_size].mean(0)), j)
                         for j in range(own)]  # fmt: skip
                chosen = sorted(j for _, j in sorted(gates, key=lambda g: (-g[0], g[1]))[:top_k])
                keys = [u for j in chosen for u in range(j * block_size, (j + 1) * block_size)]
                keys += list(range(own * block_size, t + 1))
                weights = torch.softmax((kh[keys] @ qd[b, t, h]) * scale, dim=0)
                out[b, t, h] = weights @ vh[keys]
    return out.to(q.dtype)
