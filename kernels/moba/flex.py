"""MoBA through FlexAttention (``torch.nn.attention.flex_attention``): the fast path on a GPU.

Shape legend: B batch, L tokens, Hq query heads, Hkv kv heads, D head dim, b block size,
nb = ceil(L / b) key blocks, n = ceil(L / 128) FlexAttention tiles of 128 tokens.

The gate's choice (``torch_impl.moba_select``, bool ``[B, Hq, L, nb]``) becomes a ``BlockMask``
built directly from tiles (no ``[L, L]`` mask is ever formed): a query tile lists the key tiles
of every block any of its queries chose, and its own blocks' tiles up to the diagonal; inside
those tiles ``mask_mod`` applies the exact per-query rule. FlexAttention runs forward and
backward on CUDA (compiled); on the CPU, torch 2.13 runs its forward only (eager), which the
tests use to compare it with the reference.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .torch_impl import moba_select

TILE = 128
"""FlexAttention's query and key tile (its default BLOCK_SIZE)."""

RECOMPILE_LIMIT = 64
"""Shapes one process may compile FlexAttention for (``dynamic=False``: one graph per length,
block count and head count). Past Dynamo's own limit (8 by default) a call silently runs
``flex_attention`` unfused, materializing the ``[B, Hq, L, L]`` scores: the kernel benchmark's
MoBA rows at 64K and 128K asked for 512 GiB and 2 TiB that way (H200, 2026-11-27, the 9th and
later shapes of the run). The compiled calls therefore run with at least this limit."""


def moba_block_mask(chosen: Tensor, length: int, block_size: int):
    """The ``BlockMask`` of MoBA's pattern for ``chosen`` (``[B, Hq, L, nb]``) at ``length`` tokens."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hq, L, nb = chosen.shape
    n = -(-L // TILE)
    dev = chosen.device
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, n * TILE - L))
    union = padded.view(B, Hq, n, TILE, nb).any(3)  # [B, Hq, n, nb]: blocks some query of a tile chose
    tiles = torch.arange(n, device=dev)
    starts = torch.arange(nb, device=dev) * block_size
    overlap = (starts[:, None] < (tiles[None, :] + 1) * TILE) & (
        starts[:, None] + block_size > tiles[None, :] * TILE
    )
    chosen_tiles = (union.to(torch.float32) @ overlap.to(torch.float32)) > 0  # [B, Hq, n, n]
    own_first = (tiles * TILE // block_size) * block_size // TILE  # first tile of the tile's own block
    own_tiles = (tiles[None, :] <= tiles[:, None]) & (tiles[None, :] >= own_first[:, None])  # [n, n]
    visible = chosen_tiles | own_tiles
    kv_num = visible.sum(-1).to(torch.int32)
    kv_idx = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    last_q, last_block = L - 1, nb - 1

    def mask_mod(b, h, q_i, kv_i):
        block = kv_i // block_size
        own = (block == q_i // block_size) & (kv_i <= q_i)
        return own | chosen[b, h, q_i.clamp(max=last_q), block.clamp(max=last_block)]

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(length, length)
    )


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def run_compiled(*args, **kwargs) -> Tensor:
    """The compiled ``flex_attention(*args, **kwargs)`` under a recompile limit of at least
    ``RECOMPILE_LIMIT`` (the global setting is left as it was)."""
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _compiled()(*args, **kwargs)


def moba_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, scale: float | None = None
) -> Tensor:
    """MoBA -> ``[B, L, Hq, D]`` in q's dtype by FlexAttention (compiled on CUDA, eager elsewhere);
    the same function as ``torch_impl.moba_attention_torch`` for a full sequence."""
    from torch.nn.attention.flex_attention import flex_attention

    L = q.shape[1]
    with torch.no_grad():
        chosen = moba_select(q, k, block_size=block_size, top_k=top_k)
    mask = moba_block_mask(chosen, L, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    attend = run_compiled if q.is_cuda else flex_attention
    o = attend(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return o.transpose(1, 2)


__all__ = ["RECOMPILE_LIMIT", "TILE", "moba_attention_flex", "moba_block_mask", "run_compiled"]
