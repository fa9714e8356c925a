"""MoBA in vectorised PyTorch: the gate, the attention given the gate's choice, the pair count.

Shape legend: B batch, Lk keys, Lq queries (the last Lq of the Lk positions: Lq = Lk in a full
forward, fewer after a KV cache), Hq query heads, Hkv kv heads, D head dim, b block size,
nb = ceil(Lk / b) key blocks, c queries per chunk.

Representatives and gate scores run in float32 (float64 for float64 inputs) from detached q and
k: the choice carries no gradient. Attention is computed a chunk of queries at a time, so no
``[Lq, Lk]`` matrix is formed whole beyond ``max_chunk_elems`` elements (under autograd the
saved chunks still add up: the GPU path is ``flex``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_MAX_CHUNK_ELEMS = 1 << 24
"""Largest score tensor (in elements) formed at once, 64 MiB in float32."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def block_means(k_BLHD: Tensor, block_size: int) -> Tensor:
    """Mean key of every block, ``[B, Hkv, nb, D]`` in the compute dtype (the last block over its
    valid tokens)."""
    B, L, H, D = k_BLHD.shape
    nb = num_blocks(L, block_size)
    kc = k_BLHD.detach().to(compute_dtype(k_BLHD.dtype))
    padded = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, nb * block_size - L))
    sums = padded.view(B, nb, block_size, H, D).sum(2)  # [B, nb, H, D]
    counts = (torch.arange(nb, device=k_BLHD.device) * block_size).neg().add(L).clamp(max=block_size)
    return (sums / counts[None, :, None, None].to(sums.dtype)).permute(0, 2, 1, 3)


def moba_select(
    q: Tensor, k: Tensor, *, block_size: int, top_k: int, max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS
) -> Tensor:
    """The earlier blocks each query attends to: bool ``[B, Hq, Lq, nb]``.

    Query at position t (block i = t // b) scores every earlier block j < i by ``q_t . mean(k_j)``
    and keeps the ``min(top_k, i)`` best, ties to the smaller j. Its own block is not marked
    here (it is always attended, causally)."""
    B, Lq, Hq, _ = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    nb = num_blocks(Lk, block_size)
    means = block_means(k, block_size).repeat_interleave(Hq // Hkv, 1)  # [B, Hq, nb, D]
    qc = q.detach().to(means.dtype)
    own = torch.arange(Lk - Lq, Lk, device=q.device) // block_size  # [Lq]
    chosen = torch.zeros(B, Hq, Lq, nb, dtype=torch.bool, device=q.device)
    kk = min(top_k, nb)
    if kk == 0:
        return chosen
    rows = max(1, max_chunk_elems // max(1, B * Hq * nb))
    for r0 in range(0, Lq, rows):
        r1 = min(r0 + rows, Lq)
        gate = torch.einsum("bthd,bhjd->bhtj", qc[:, r0:r1], means)  # [B, Hq, c, nb]
        earlier = torch.arange(nb, device=q.device)[None, :] < own[r0:r1, None]  # [c, nb]
        gate = gate.masked_fill(~earlier, float("-inf"))
        # A stable descending sort ranks ties by the smaller block index.
        top = torch.sort(gate, dim=-1, descending=True, stable=True).indices[..., :kk]
        valid = torch.gather(earlier.expand_as(gate), -1, top)
        chosen[:, :, r0:r1].scatter_(-1, top, valid)
    return chosen


def moba_attend_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chosen: Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> Tensor:
    """Attention given ``moba_select``'s choice -> ``[B, Lq, Hq, D]`` in q's dtype; differentiable
    in q, k, v. Query t sees the tokens of its chosen blocks and, causally, its own block's."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qc = q.to(dtype).transpose(1, 2)  # [B, Hq, Lq, D]
    kc = k.to(dtype).repeat_interleave(Hq // Hkv, 2).transpose(1, 2)  # [B, Hq, Lk, D]
    vc = v.to(dtype).repeat_interleave(Hq // Hkv, 2).transpose(1, 2)
    kpos = torch.arange(Lk, device=q.device)
    kblock = kpos // block_size
    rows = max(1, max_chunk_elems // max(1, B * Hq * Lk))
    out = []
    for r0 in range(0, Lq, rows):
        r1 = min(r0 + rows, Lq)
        qpos = torch.arange(Lk - Lq + r0, Lk - Lq + r1, device=q.device)  # [c]
        own = (kblock[None, :] == (qpos // block_size)[:, None]) & (kpos[None, :] <= qpos[:, None])
        keep = chosen[:, :, r0:r1][..., kblock] | own  # [B, Hq, c, Lk]
        logits = (qc[:, :, r0:r1] @ kc.transpose(-1, -2)) * scale
        weights = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        out.append(weights @ vc)
    return torch.cat(out, dim=2).transpose(1, 2).to(q.dtype)


def moba_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int,
    top_k: int,
    scale: float | None = None,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> Tensor:
    """``moba_select`` then ``moba_attend_torch``; q may hold fewer positions than k (the last
    ones: decoding after a KV cache)."""
    with torch.no_grad():
        chosen = moba_select(q, k, block_size=block_size, top_k=top_k, max_chunk_elems=max_chunk_elems)
    return moba_attend_torch(
        q, k, v, chosen, block_size=block_size, scale=scale, max_chunk_elems=max_chunk_elems
    )


def moba_pair_count(length: int, block_size: int, top_k: int) -> int:
    """Causal query-key pairs MoBA computes for one head at ``length`` tokens: every query of
    block i its own block causally plus ``min(top_k, i)`` whole earlier blocks."""
    pairs = 0
    for i in range(num_blocks(length, block_size)):
        size = min(block_size, length - i * block_size)
        pairs += size * (size + 1) // 2 + size * min(top_k, i) * block_size
    return pairs
