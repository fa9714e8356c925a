"""MS ("merge and select") attention in vectorised PyTorch: the readable reference path.

Implements docs/ms-attention-contract.md on any device. The Triton kernels are tested
against ``ms_attend_torch`` (attention given the selection) and ``ms_select_torch``.

Shape legend
    B batch, L tokens, Hq query heads, Hkv key/value heads, D head dim.
    Hs selection heads: Hq for ``scope="head"``, Hkv for ``scope="group"``; r = Hq // Hs.
    w = region (tokens per region), T = budget (regions in a block's key set),
    m = merge (regions per query block), T-m regions selected per block.
    n = ceil(L / w) regions, G = ceil((n - T) / m) blocks (0 when n <= T).
    Block g holds regions [s, e) with s = T + g*m, e = min(s + m, n).

Choices the spec leaves to the implementation:
- Representatives, scores and attention run in float32 (float64 for float64 inputs); the
  output is cast back to q's dtype. Representatives are computed from detached q and k, so
  gradients reach q, k, v through the attention only.
- ``pool="attn"`` scales its pooling logits by ``1/sqrt(D)`` whatever ``scale`` is.
- Top-k ties go to the smaller region index. Scores compare as IEEE numbers: -0.0 equals
  +0.0 (both are ranked as +0.0 on every device). ``method="topk"`` (default) finds each row's
  top-(T-m) without sorting whole rows and is checked to give ``method="sort"``'s indices (a
  stable descending sort of every row, the original path) on every input; see ``row_top``.
- Every row has at least T-m+1 candidates (``select="paper"``: row i >= T may pick
  0..i-m; ``select="causal"``: any region before s >= T), so a row's top-(T-m) never holds a
  forbidden region and the merge always yields T-m distinct regions: ``ms_select_torch``
  never pads. ``ms_attend_torch`` still accepts -1 entries (keys ignored) so that
  hand-made or partially filled index tensors can be used; no block may be left without keys
  by them, since the block's own causal tokens are always attended.
- Memory is bounded by ``max_chunk_elems``: region scores are computed for a few blocks'
  rows at a time and attention logits for a few blocks (or dense-prefix rows) at a time, so
  no [L, L] or [n, n] matrix is formed whole at scale. Under autograd the saved activations
  still add up over chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rope import rope_cos_sin, rotate_half, selected_inv_freq

DEFAULT_MAX_CHUNK_ELEMS = 1 << 24
"""Largest score/logit tensor (in elements) formed at once, 64 MiB in float32."""
SELECT_METHODS = ("topk", "sort")
"""How ``select_blocks`` finds each row's top-(T-m): see ``row_top`` and ``row_top_sorted``."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; bf16, fp16 and fp32 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_regions(length: int, region: int) -> int:
    return -(-length // region)


def num_blocks(length: int, region: int, budget: int, merge: int) -> int:
    """G = ceil((n - T) / m), or 0 when ``n <= T`` (the input is attended densely)."""
    n = num_regions(length, region)
    return 0 if n <= budget else -(-(n - budget) // merge)


def ms_pair_count(length: int, region: int, budget: int, merge: int) -> int:
    """Causal query-key pairs MS attention computes for one head at ``length`` tokens: the dense
    prefix's ``P(P+1)/2`` (``P = T*w``), then per block of ``q`` query tokens its ``(T-m)*w``
    selected keys each plus its own causal ``q(q+1)/2``. ``L(L+1)/2`` when ``n <= T`` (dense)."""
    if num_regions(length, region) <= budget:
        return length * (length + 1) // 2
    prefix = budget * region
    pairs = prefix * (prefix + 1) // 2
    for lo in range(prefix, length, merge * region):
        size = min(merge * region, length - lo)
        pairs += size * (budget - merge) * region + size * (size + 1) // 2
    return pairs


def first_block_at(start: int, *, region: int, budget: int, merge: int) -> int:
    """Index of the block holding token ``start`` (0 while ``start`` lies in the dense prefix)."""
    return max(0, (start // region - budget) // merge)


def kv_head_of(num_sel_heads: int, num_kv_heads: int, device: torch.device) -> Tensor:
    """KV head read by each selection head ``[Hs]``; query head h reads ``h // (Hq // Hkv)``."""
    return torch.arange(num_sel_heads, device=device) // (num_sel_heads // num_kv_heads)


def region_representatives(x_BLHD: Tensor, region: int, pool: str) -> Tensor:
    """Detached per-region representatives ``[B, H, n, D]`` in the compute dtype.

    ``pool="mean"``: mean over the region's tokens. ``pool="attn"``: the mean attends over
    the region's tokens, ``softmax(mean . X^T / sqrt(D)) X``. The last region may be partial;
    both pools run over its valid tokens only.
    """
    B, L, H, D = x_BLHD.shape
    n = num_regions(L, region)
    x = x_BLHD.detach().to(compute_dtype(x_BLHD.dtype))
    x = F.pad(x, (0, 0, 0, 0, 0, n * region - L)).view(B, n, region, H, D)
    valid = (torch.arange(n * region, device=x.device) < L).view(n, region)  # [n, w]
    count = valid.sum(1).to(x.dtype)  # [n]
    rep = x.sum(2) / count[:, None, None]  # [B, n, H, D]; padding is zero
    if pool == "attn":
        logits = torch.einsum("bnwhd,bnhd->bnhw", x, rep) / math.sqrt(D)
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        rep = torch.einsum("bnhw,bnwhd->bnhd", logits.softmax(-1), x)
    return rep.transpose(1, 2)


def block_rows(
    first_block: int, num_blk: int, *, budget: int, merge: int, select: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Regions that vote for blocks ``[first_block, num_blk)`` and the last region each may pick.

    Returns ``rows`` and ``limit``, both ``[G', m]``: row ``a`` of block ``g`` is region
    ``rows[g, a]`` and may pick regions ``j <= limit[g, a]``. With ``select="paper"`` the rows
    of the last block may run past ``n - 1``; the caller drops those.
    """
    s = budget + merge * torch.arange(first_block, num_blk, device=device)[:, None]  # [G', 1]
    offset = torch.arange(merge, device=device)[None, :]  # [1, m]
    if select == "paper":
        rows = s + offset
        return rows, rows - merge
    return s - merge + offset, (s - 1).expand(-1, merge)


def row_top_sorted(scores: Tensor, n_sel: int) -> Tensor:
    """Each row's ``n_sel`` best columns, best first, ties to the smaller column: a stable
    descending sort of whole rows (``method="sort"``, the original path and the reference).

    scores ``[..., n]`` -> LongTensor ``[..., n_sel]``. -0.0 is ranked as +0.0 (adding +0.0
    turns -0.0 into +0.0), so that equal scores tie whatever sort the device runs.
    """
    return (scores + 0.0).sort(dim=-1, descending=True, stable=True).indices[..., :n_sel]


def _row_top_unchecked(scores: Tensor, n_sel: int) -> tuple[Tensor, Tensor]:
    """``row_top_sorted``'s answer for the rows where it can be had without a full sort.

    Returns ``top [..., n_sel]`` and ``exact [...]`` (bool). An unsorted ``topk`` returns a set
    R of n_sel columns; with v = min(R), the row has exactly ``n - n_sel`` scores ``< v`` iff R
    is the set of all scores ``>= v`` and no score is NaN (a NaN compares false both ways).
    Then R is the row's top set under any tie rule, and ordering R by (score descending,
    column ascending) gives the stable sort's first n_sel entries. Otherwise (a tie group
    straddles v, a NaN, v = -inf) ``exact`` is False and ``top`` is to be recomputed by
    ``row_top_sorted``. Which of several equal scores ``topk`` picks never matters: the count
    rejects the row whenever that choice was possible.
    """
    n = scores.shape[-1]
    values, cols = scores.topk(n_sel, dim=-1, largest=True, sorted=False)
    kth = values.amin(dim=-1, keepdim=True)
    exact = (scores < kth).sum(dim=-1) == n - n_sel
    cols, perm = cols.sort(dim=-1)  # column ascending: the stable sort's tie order
    order = (values.gather(-1, perm) + 0.0).sort(dim=-1, descending=True, stable=True).indices
    return cols.gather(-1, order), exact


def row_top(scores: Tensor, n_sel: int) -> Tensor:
    """``row_top_sorted(scores, n_sel)`` exactly, with a full sort only for the rows that need
    it (``method="topk"``): ``topk`` and a sort of the n_sel survivors per row, then the rows
    whose threshold is tied (or that hold a NaN) are sorted whole. scores ``[..., n]``."""
    top, exact = _row_top_unchecked(scores, n_sel)
    if not bool(exact.all()):
        redo = ~exact
        top[redo] = row_top_sorted(scores[redo], n_sel)
    return top


def _select_chunk(
    qrows: Tensor, kbar: Tensor, limit: Tensor, row_in_range: Tensor, *, merge: int, n_sel: int, method: str
) -> tuple[Tensor, Tensor | None]:
    """Steps 5, 7 and 8 for a few blocks: ``[B, Hs, Gc, T-m]`` and, for ``method="topk"``
    without its row check, whether every row was exact (a 0-dim bool tensor; None otherwise).

    qrows ``[B, Hs, r, Gc*m, D]`` (the blocks' voting rows), kbar ``[B, Hs, n, D]``, limit and
    row_in_range ``[Gc, m]``. ``method``: "sort", "topk" (row check done by the caller) or
    "topk-checked" (``row_top``).
    """
    B, Hs, n = kbar.shape[0], kbar.shape[1], kbar.shape[2]
    Gc = limit.shape[0]
    dev = kbar.device
    scores = torch.einsum("bsrid,bsjd->bsij", qrows, kbar).reshape(B, Hs, Gc, merge, n)
    scores = scores.masked_fill(torch.arange(n, device=dev) > limit[..., None], float("-inf"))
    exact = None
    if method == "sort":
        top = row_top_sorted(scores, n_sel)
    elif method == "topk-checked":
        top = row_top(scores, n_sel)
    else:
        top, exact_rows = _row_top_unchecked(scores, n_sel)
        exact = exact_rows.all()
    # Rank-major merge list: rank p of row a sits at p*m + a; rows past n - 1 sit past its end.
    ranks, rows = torch.arange(n_sel, device=dev), torch.arange(merge, device=dev)
    rank_major_pos = merge * ranks[None, :] + rows[:, None]  # [m, T-m]
    past_end = n_sel * merge
    pos = torch.where(row_in_range[:, :, None], rank_major_pos, past_end)  # [Gc, m, T-m]
    first_pos = torch.full((B, Hs, Gc, n), past_end, dtype=torch.long, device=dev)
    first_pos.scatter_reduce_(-1, top.flatten(-2), pos.flatten(-2).expand(B, Hs, -1, -1), reduce="amin")
    return first_pos.topk(n_sel, dim=-1, largest=False, sorted=True).indices, exact


def select_blocks(
    q: Tensor,
    k: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    pool: str,
    scope: str,
    select: str,
    first_block: int = 0,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
    method: str = "topk",
) -> Tensor:
    """Selected regions of blocks ``[first_block, G)``: LongTensor ``[B, Hs, G - first_block, T-m]``.

    Per block: score rows against all regions, keep each row's T-m best allowed regions (ties
    to the smaller j; ``method`` in ``SELECT_METHODS``: "topk" as ``row_top``, "sort" as
    ``row_top_sorted``, identical indices), then merge. The merge list is rank-major (rank p of
    row a sits at position ``p*m + a``); each region's first position in it is found with a
    scatter-min, and the T-m regions with the smallest first positions, in that order, are the
    block's selection. Rows past ``n - 1`` (paper mode, last block) sit at a position past the
    end of the list, so they never count. With "topk" the row checks of all chunks are read
    once at the end (one device sync per call); a chunk with an inexact row is redone with
    the per-row fallback.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    Hs = Hq if scope == "head" else Hkv
    n_sel = budget - merge
    n = num_regions(L, region)
    G = num_blocks(L, region, budget, merge)
    if first_block >= G:
        return torch.empty((B, Hs, 0, n_sel), dtype=torch.long, device=q.device)

    qbar = region_representatives(q, region, pool).reshape(B, Hs, Hq // Hs, n, D)
    kbar = region_representatives(k, region, pool)[:, kv_head_of(Hs, Hkv, q.device)]  # [B,Hs,n,D]
    rows, limit = block_rows(first_block, G, budget=budget, merge=merge, select=select, device=q.device)
    row_in_range = rows < n  # [G', m]
    rows = rows.clamp_max(n - 1)

    per_chunk = max(1, max_chunk_elems // (B * Hs * merge * n))
    chunks = [slice(g0, g0 + per_chunk) for g0 in range(0, rows.shape[0], per_chunk)]

    def chunk(c: slice, chunk_method: str) -> tuple[Tensor, Tensor | None]:
        qrows = qbar[:, :, :, rows[c].flatten()]  # [B, Hs, r, Gc*m, D]
        return _select_chunk(
            qrows, kbar, limit[c], row_in_range[c], merge=merge, n_sel=n_sel, method=chunk_method
        )

    selected, exact = zip(*(chunk(c, method) for c in chunks))
    selected = list(selected)
    if method == "topk" and not bool(torch.stack(exact).all()):
        for i, c in enumerate(chunks):
            if not bool(exact[i]):
                selected[i] = chunk(c, "topk-checked")[0]
    return torch.cat(selected, dim=2)


def ms_select_torch(
    q: Tensor,
    k: Tensor,
    *,
    region: int = 16,
    budget: int = 512,
    merge: int = 64,
    pool: str = "mean",
    scope: str = "head",
    select: str = "paper",
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
    method: str = "topk",
) -> Tensor:
    """Selected key regions per block, LongTensor ``[B, Hs, G, T-m]`` in merge order.

    q ``[B, L, Hq, D]``, k ``[B, L, Hkv, D]``; arguments are not validated here (the public
    ``ms_select`` does). Returns an empty ``[B, Hs, 0, T-m]`` tensor when ``n <= T``. Every
    entry of block g is a distinct region ``< T + g*m``; no padding occurs (module docstring).
    ``method`` ("topk" or "sort", ``SELECT_METHODS``) changes the speed, never the indices.
    """
    if method not in SELECT_METHODS:
        raise ValueError(f"method must be one of {SELECT_METHODS}, got {method!r}")
    return select_blocks(
        q,
        k,
        region=region,
        budget=budget,
        merge=merge,
        pool=pool,
        scope=scope,
        select=select,
        max_chunk_elems=max_chunk_elems,
        method=method,
    )


def _rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    cos, sin = rope_cos_sin(positions, inv_freq)
    return cos.to(dtype), sin.to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in x's own (compute) dtype; cos/sin broadcast against x."""
    return x * cos + rotate_half(x) * sin


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, drops: list[Tensor]) -> Tensor:
    """``softmax(q k^T * scale) v`` -> ``[..., M, r, D]``.

    q ``[..., M, r, D]`` (r query heads that share k and v, folded into the rows so that k and
    v are never repeated), k, v ``[..., N, D]``. ``drops`` mask (True: not attended) the
    consecutive key ranges that make up N, each broadcastable to ``[..., M, 1, N_i]``.
    """
    *lead, M, r, D = q.shape
    logits = (q.reshape(*lead, M * r, D) * scale) @ k.transpose(-1, -2)  # [..., M*r, N]
    logits = logits.view(*lead, M, r, -1)
    lo = 0
    for drop in drops:
        logits[..., lo : lo + drop.shape[-1]].masked_fill_(drop, float("-inf"))
        lo += drop.shape[-1]
    probs = logits.softmax(-1).view(*lead, M * r, -1)
    return (probs @ v).view(*lead, M, r, D)


def _dense_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_start: int,
    scale: float,
    inv_freq: Tensor | None,
    max_chunk_elems: int,
) -> Tensor:
    """Causal attention of queries ``[q_start, P)`` over keys ``[0, P)``, natural positions.

    q ``[B, P, Hq, D]``, k/v ``[B, P, Hkv, D]`` in the compute dtype -> ``[B, P - q_start, Hq, D]``.
    Query rows go in chunks; a chunk ending at row ``c`` only reads keys ``[0, c)``.
    """
    B, P, Hq, D = q.shape
    Hkv = k.shape[2]
    if inv_freq is not None:
        cos, sin = _rope_tables(torch.arange(P, device=q.device), inv_freq, q.dtype)
        q = _rotate(q, cos[:, None], sin[:, None])
        k = _rotate(k, cos[:, None], sin[:, None])
    q_h = q.view(B, P, Hkv, Hq // Hkv, D).transpose(1, 2)  # [B, Hkv, P, r, D]
    k_h, v_h = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, P, D]
    per_chunk = max(1, max_chunk_elems // (B * Hq * P))
    out = []
    for a in range(q_start, P, per_chunk):
        c = min(a + per_chunk, P)
        future = torch.arange(c, device=q.device) > torch.arange(a, c, device=q.device)[:, None, None]
        out.append(_softmax_attention(q_h[:, :, a:c], k_h[:, :, :c], v_h[:, :, :c], scale, [future]))
    return torch.cat(out, dim=2).transpose(1, 2).reshape(B, P - q_start, Hq, D)


def _block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    first_block: int,
    scale: float,
    inv_freq: Tensor | None,
    max_chunk_elems: int,
) -> Tensor:
    """Step 9 for blocks ``[first_block, G)``: ``[B, (G - first_block)*m*w, Hq, D]``.

    q ``[B, L, Hq, D]``, k/v ``[B, L, Hkv, D]`` in the compute dtype, idx ``[B, Hs, G, T-m]``.
    Output row 0 is token ``(T + first_block*m) * w``; rows past L are padding (they come
    after every real token, so no real token sees them) and are to be dropped. Each block's
    keys are its selected regions, gathered in ascending order (their positions for
    ``pe="selected"`` are then simply ``0 .. (T-m)*w - 1``), followed by its own ``m*w``
    tokens, attended causally.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    Hs, G, n_sel = idx.shape[1], idx.shape[2], idx.shape[3]
    w, mw, sel_len = region, merge * region, n_sel * region
    r = Hq // Hs
    dev = q.device
    idx = idx[:, :, first_block:]  # from here on, block 0 is block first_block
    num_out = G - first_block
    lo = (budget + first_block * merge) * w
    pad = (budget + G * merge) * w - L

    own_q = F.pad(q[:, lo:], (0, 0, 0, 0, 0, pad)).view(B, num_out, mw, Hs, r, D)
    own_q = own_q.permute(0, 3, 1, 2, 4, 5)  # [B, Hs, G', mw, r, D]
    own_k = F.pad(k[:, lo:], (0, 0, 0, 0, 0, pad)).view(B, num_out, mw, Hkv, D)
    own_v = F.pad(v[:, lo:], (0, 0, 0, 0, 0, pad)).view(B, num_out, mw, Hkv, D)
    kv_head = kv_head_of(Hs, Hkv, dev)
    own_k = own_k.permute(0, 3, 1, 2, 4)[:, kv_head]  # [B, Hs, G', mw, D]
    own_v = own_v.permute(0, 3, 1, 2, 4)[:, kv_head]
    k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D]

    # -1 (ignored) entries sort last, so valid regions keep positions 0.. in ascending order;
    # they then read region 0 and are masked out.
    ignored = torch.iinfo(idx.dtype).max
    idx = torch.where(idx < 0, ignored, idx).sort(dim=-1).values
    sel_drop = (idx == ignored).repeat_interleave(w, dim=-1)[:, :, :, None, None]  # [B,Hs,G',1,1,(T-m)w]
    first_tok = torch.where(idx == ignored, 0, idx)[..., None] * w
    sel_tok = (first_tok + torch.arange(w, device=dev)).flatten(-2)  # [B, Hs, G', (T-m)w]
    future = torch.arange(mw, device=dev) > torch.arange(mw, device=dev)[:, None, None]  # [mw, 1, mw]

    if inv_freq is not None:
        cos_q, sin_q = _rope_tables(torch.arange(sel_len, sel_len + mw, device=dev), inv_freq, q.dtype)
        cos_s, sin_s = _rope_tables(torch.arange(sel_len, device=dev), inv_freq, q.dtype)
        own_q = _rotate(own_q, cos_q[:, None], sin_q[:, None])
        own_k = _rotate(own_k, cos_q, sin_q)

    b_ix = torch.arange(B, device=dev)[:, None, None, None]
    h_ix = kv_head[None, :, None, None]
    per_chunk = max(1, max_chunk_elems // (B * Hq * mw * (sel_len + mw)))
    out = []
    for g0 in range(0, num_out, per_chunk):
        g1 = min(g0 + per_chunk, num_out)
        sel_k = k_t[b_ix, h_ix, sel_tok[:, :, g0:g1]]  # [B, Hs, Gc, (T-m)w, D]
        sel_v = v_t[b_ix, h_ix, sel_tok[:, :, g0:g1]]
        if inv_freq is not None:
            sel_k = _rotate(sel_k, cos_s, sin_s)
        keys = torch.cat([sel_k, own_k[:, :, g0:g1]], dim=3)  # [B, Hs, Gc, Tw, D]
        values = torch.cat([sel_v, own_v[:, :, g0:g1]], dim=3)
        drops = [sel_drop[:, :, g0:g1], future]
        out.append(_softmax_attention(own_q[:, :, g0:g1], keys, values, scale, drops))
    out = torch.cat(out, dim=2)  # [B, Hs, G', mw, r, D]
    return out.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, Hq, D)


def _check_start(start: int, length: int) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < length:
        raise ValueError(f"start must be an int in [0, L={length}), got {start!r}")


def _check_idx(
    idx: Tensor,
    expected_shape: tuple[int, ...],
    q: Tensor,
    *,
    budget: int,
    merge: int,
    first_block: int,
) -> None:
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError("idx must be an int32/int64 tensor of region indices")
    if tuple(idx.shape) != expected_shape:
        raise ValueError(
            f"idx must have shape [B, Hs, G, T-m] = {list(expected_shape)}, got {list(idx.shape)}"
        )
    if idx.device != q.device:
        raise ValueError(f"idx is on {idx.device} but q is on {q.device}")
    starts = budget + merge * torch.arange(first_block, expected_shape[2], device=idx.device)
    used = idx[:, :, first_block:]
    if ((used < -1) | (used >= starts[:, None])).any():
        raise ValueError("idx entries must be -1 (ignored) or a region before their block (< T + g*m)")


def ms_attend_torch(
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
    start: int = 0,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> Tensor:
    """MS attention given the selection: spec steps 1, 2 and 9 and the ``pe`` handling.

    Args:
        q: ``[B, L, Hq, D]``; k, v: ``[B, L, Hkv, D]``, causal, ``Hq % Hkv == 0``.
        idx: ``[B, Hs, G, T-m]`` integer regions selected for each block (any order, distinct;
            Hs = Hq for ``scope="head"``, Hkv for ``scope="group"``, whose selection is shared
            by the group's query heads). -1 entries are ignored keys; every other entry of
            block g must be a region before the block, ``< T + g*m``.
        inv_freq: ``pe="selected"``'s rotary inverse frequencies ``[D/2]`` (a position
            scheme's: NTK, YaRN, CRD NTK, ...); None: plain RoPE of ``rope_base``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        start: only query positions ``[start, L)`` are computed (KV-cache decoding: q, k, v
            are the full histories); blocks wholly before ``start`` are not read from idx.

    Returns:
        ``[B, L - start, Hq, D]`` in q's dtype. Tokens ``t < T*w`` (all tokens when
        ``n <= T``) attend causally to keys ``<= t``. Block g's tokens attend to the tokens of
        its selected regions and causally to the block's own tokens. With ``pe="selected"``
        RoPE (rotate-half, ``inv_freq``) is applied here: natural positions in the dense
        prefix; in a block, the selected regions in ascending order take positions
        ``0 .. (T-m)*w - 1`` and the block's tokens continue from ``(T-m)*w``. Softmax runs in
        float32 (float64 for float64 inputs).
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    _check_start(start, L)
    G = num_blocks(L, region, budget, merge)
    first_block = min(first_block_at(start, region=region, budget=budget, merge=merge), G)
    Hs = Hq if scope == "head" else Hkv
    _check_idx(idx, (B, Hs, G, budget - merge), q, budget=budget, merge=merge, first_block=first_block)

    dtype = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    inv_freq = selected_inv_freq(D, rope_base, inv_freq, q.device) if pe == "selected" else None
    prefix = min(budget * region, L)
    out = []
    if start < prefix:
        out.append(
            _dense_causal(
                qc[:, :prefix],
                kc[:, :prefix],
                vc[:, :prefix],
                q_start=start,
                scale=scale,
                inv_freq=inv_freq,
                max_chunk_elems=max_chunk_elems,
            )
        )
    if G > 0:
        blocks = _block_attention(
            qc,
            kc,
            vc,
            idx,
            region=region,
            budget=budget,
            merge=merge,
            first_block=first_block,
            scale=scale,
            inv_freq=inv_freq,
            max_chunk_elems=max_chunk_elems,
        )
        first_token = (budget + first_block * merge) * region
        out.append(blocks[:, max(start - first_token, 0) : L - first_token])
    return torch.cat(out, dim=1).to(q.dtype)


def ms_attention_torch(
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
    start: int = 0,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> Tensor:
    """MS attention (selection + ``ms_attend_torch``) -> ``[B, L - start, Hq, D]``, q's dtype.

    Arguments as the public ``ms_attention`` (not validated here), plus ``start``: q, k, v are
    the full histories and only query positions ``[start, L)`` are computed; only the blocks
    holding them are selected. With ``select="causal"`` this equals the full forward at those
    positions. With ``select="paper"`` the block of the last tokens is voted on by the rows
    that exist so far (its last region possibly partial, represented by its valid tokens),
    which differs from training, where all of the block's rows vote.
    """
    B, L, Hq, _ = q.shape
    if B < 1:  # the chunk sizes below divide by B
        raise ValueError(f"ms_attention needs a batch of at least 1, got q of shape {list(q.shape)}")
    _check_start(start, L)
    first_block = first_block_at(start, region=region, budget=budget, merge=merge)
    idx = select_blocks(
        q,
        k,
        region=region,
        budget=budget,
        merge=merge,
        pool=pool,
        scope=scope,
        select=select,
        first_block=first_block,
        max_chunk_elems=max_chunk_elems,
    )
    G = num_blocks(L, region, budget, merge)
    if idx.shape[2] < G:
        unread = idx.new_full((B, idx.shape[1], G - idx.shape[2], budget - merge), -1)
        idx = torch.cat([unread, idx], dim=2)
    return ms_attend_torch(
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
        start=start,
        max_chunk_elems=max_chunk_elems,
    )
