"""Triton kernels of MS ("merge and select") attention: forward, and the two backward passes.

Shapes (all contiguous):
  B batch, L tokens, HQ query heads, HKV kv heads, HS selection heads (HQ for scope="head",
  HKV for scope="group"), D head dim (even; HALF = D/2), w = W tokens per region,
  T budget, m = M merged regions per block, S = T - m selected regions per block,
  G = ceil((n - T) / m) blocks, P = min(T*w, L) tokens of the dense prefix.
  q, o, do, dq [B, L, HQ, D];  k, v, dk, dv [B, L, HKV, D];  lse, delta [B, HQ, L] float32;
  IDX [B, HS, G, S] int32, each row sorted ascending, -1 (padding) after the valid regions;
  COS, SIN [T*w (or L), HALF] float32 RoPE tables (pe="selected" only).

Work is cut into *segments*: the dense prefix [0, P) and each block g, tokens
[P + g*m*w, min(P + (g+1)*m*w, L)). A tile never straddles two segments. For a query tile the
key set is (a) the block's selected regions, streamed by index from k/v (never gathered into a
copy), then (b) its own segment up to the tile, causally. For RoPE on the fly (pe="selected") a
key or query sits at position `tok + shift` in its own segment (shift = 0 in the prefix,
S*w - block start in a block) and a selected key at `rank*w + tok % w`, rank being the region's
place in the sorted selection.

q and k are loaded as two [*, HALF] tiles so the rotate-half rotation needs no shuffle;
scores are then dot(q1, k1^T) + dot(q2, k2^T). Scores are kept in the log2 domain
(qk_scale = scale * log2(e)); LSE is stored in natural-log units. The backward is
FlashAttention-2's: delta = rowsum(do * o); dq per query tile on the forward's schedule;
dk/dv per key tile through a reverse index (per key tile, the blocks that selected one of its
regions and the rank of each region there), so the backward writes every gradient once:
deterministic, no atomics, no float32 scratch copy of dk/dv.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _segment(tile, L, P, W, M, S, n_pre_tiles, tiles_per_block, BLOCK: tl.constexpr):
    """Tile number -> (first token, segment start, segment end, block or -1, RoPE shift)."""
    if tile < n_pre_tiles:
        g = tile * 0 - 1
        seg_lo = tile * 0
        seg_hi = tile * 0 + P
        lo = tile * BLOCK
        shift = tile * 0
    else:
        rel = tile - n_pre_tiles
        g = rel // tiles_per_block
        seg_lo = P + g * M * W
        seg_hi = tl.minimum(seg_lo + M * W, L)
        lo = seg_lo + (rel % tiles_per_block) * BLOCK
        shift = S * W - seg_lo
    return lo, seg_lo, seg_hi, g, shift


@triton.jit
def _cos_sin(COS, SIN, pos, offs_h, mask, HALF: tl.constexpr):
    """RoPE tables at positions pos ([N]) -> cos, sin [N, BLOCK_H] float32."""
    ptrs = pos.to(tl.int64)[:, None] * HALF + offs_h[None, :]
    return tl.load(COS + ptrs, mask=mask, other=1.0), tl.load(SIN + ptrs, mask=mask, other=0.0)


@triton.jit
def _rotate(x1, x2, c, s):
    """Llama rotate-half on the halves: (x1 c - x2 s, x2 c + x1 s), in x1's dtype."""
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return (a * c - b * s).to(x1.dtype), (b * c + a * s).to(x1.dtype)


@triton.jit
def _unrotate(g1, g2, c, s):
    """Transpose of `_rotate` (float32): maps a gradient w.r.t. rotated x back to x."""
    return g1 * c + g2 * s, g2 * c - g1 * s


@triton.jit
def _load_halves(base, tok, row_stride, ok, offs_h, HALF: tl.constexpr):
    """Rows `tok` ([N]) of one head as two halves [N, BLOCK_H]; rows not `ok` read 0."""
    ptrs = base + tok.to(tl.int64)[:, None] * row_stride + offs_h[None, :]
    mask = ok[:, None] & (offs_h[None, :] < HALF)
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + HALF, mask=mask, other=0.0)


@triton.jit
def _load_full(base, tok, row_stride, ok, offs_d, HEAD_DIM: tl.constexpr):
    """Rows `tok` ([N]) of one head, whole [N, BLOCK_D]; rows not `ok` read 0."""
    ptrs = base + tok.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_keys(
    K,
    V,
    COS,
    SIN,
    tok,
    key_ok,
    kpos,
    kv_stride,
    offs_h,
    offs_d,
    ROPE: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Keys (halves, rotated at kpos under RoPE) and values of the tokens `tok` ([BLOCK_N])."""
    k1, k2 = _load_halves(K, tok, kv_stride, key_ok, offs_h, HALF)
    if ROPE:
        c, s = _cos_sin(COS, SIN, kpos, offs_h, key_ok[:, None] & (offs_h[None, :] < HALF), HALF)
        k1, k2 = _rotate(k1, k2, c, s)
    return k1, k2, _load_full(V, tok, kv_stride, key_ok, offs_d, HEAD_DIM)


@triton.jit
def _fwd_step(
    acc,
    l_i,
    m_i,
    q1,
    q2,
    K,
    V,
    COS,
    SIN,
    tok,
    key_ok,
    kpos,
    allowed,
    qk_scale,
    kv_stride,
    offs_h,
    offs_d,
    MASKED: tl.constexpr,
    ROPE: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One online-softmax step over the keys `tok` ([BLOCK_N]); `allowed` [BLOCK_M, BLOCK_N]."""
    k1, k2, v = _load_keys(K, V, COS, SIN, tok, key_ok, kpos, kv_stride, offs_h, offs_d, ROPE, HALF, HEAD_DIM)
    qk = tl.dot(q1, tl.trans(k1))
    qk = tl.dot(q2, tl.trans(k2), qk) * qk_scale
    if MASKED:
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def ms_attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    IDX,
    COS,
    SIN,
    L,
    P,
    W,
    M,
    S,
    G,
    n_pre_tiles,
    tiles_per_block,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (query tiles, B*HQ). Writes o for the tile's rows and their lse (natural log)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hkv = h // (HQ // HKV)
    hs = h // (HQ // HS)
    lo, seg_lo, seg_hi, g, shift = _segment(tile, L, P, W, M, S, n_pre_tiles, tiles_per_block, BLOCK_M)
    hi = tl.minimum(lo + BLOCK_M, seg_hi)

    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    q_off = b.to(tl.int64) * L * q_stride + h * HEAD_DIM
    k_base = K + b.to(tl.int64) * L * kv_stride + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * L * kv_stride + hkv * HEAD_DIM

    offs_m = lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < hi
    q1, q2 = _load_halves(Q + q_off, offs_m, q_stride, row_ok, offs_h, HALF)
    if ROPE:
        c, s = _cos_sin(COS, SIN, offs_m + shift, offs_h, row_ok[:, None] & (offs_h[None, :] < HALF), HALF)
        q1, q2 = _rotate(q1, q2, c, s)

    # m_i starts finite so that a step whose keys are all masked (padding) yields no NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # (a) the block's selected regions, read by index; a prefix tile has none.
    sel_len = tl.where(g >= 0, S * W, 0)
    sel = IDX + ((b * HS + hs).to(tl.int64) * G + g) * S
    for start in range(0, sel_len, BLOCK_N):
        flat = start + offs_n
        rank = flat // W
        region = tl.load(sel + rank, mask=rank < S, other=-1)
        key_ok = region >= 0
        tok = region * W + (flat - rank * W)
        acc, l_i, m_i = _fwd_step(
            acc,
            l_i,
            m_i,
            q1,
            q2,
            k_base,
            v_base,
            COS,
            SIN,
            tok,
            key_ok,
            flat,
            key_ok[None, :],
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            True,
            ROPE,
            HALF,
            HEAD_DIM,
        )

    # (b) the own segment: keys before the tile need no mask, the diagonal steps do.
    for start in range(seg_lo, lo, BLOCK_N):
        tok = start + offs_n
        acc, l_i, m_i = _fwd_step(
            acc,
            l_i,
            m_i,
            q1,
            q2,
            k_base,
            v_base,
            COS,
            SIN,
            tok,
            tok < hi,
            tok + shift,
            row_ok[:, None],
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            False,
            ROPE,
            HALF,
            HEAD_DIM,
        )
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        allowed = (tok[None, :] <= offs_m[:, None]) & (tok[None, :] < hi)
        acc, l_i, m_i = _fwd_step(
            acc,
            l_i,
            m_i,
            q1,
            q2,
            k_base,
            v_base,
            COS,
            SIN,
            tok,
            tok < hi,
            tok + shift,
            allowed,
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            True,
            ROPE,
            HALF,
            HEAD_DIM,
        )

    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = O + q_off + offs_m.to(tl.int64)[:, None] * q_stride + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit
def ms_attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    L,
    HQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[b, h, t] = sum_d o * do in float32. Grid (cdiv(L, BLOCK_M), B*HQ)."""
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    stride = HQ * HEAD_DIM
    base = b.to(tl.int64) * L * stride + h * HEAD_DIM
    row_ok = offs_m < L
    o = _load_full(O + base, offs_m, stride, row_ok, offs_d, HEAD_DIM).to(tl.float32)
    do = _load_full(DO + base, offs_m, stride, row_ok, offs_d, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dq_step(
    dq1,
    dq2,
    q1,
    q2,
    do,
    lse2,
    delta,
    K,
    V,
    COS,
    SIN,
    tok,
    key_ok,
    kpos,
    allowed,
    qk_scale,
    kv_stride,
    offs_h,
    offs_d,
    MASKED: tl.constexpr,
    ROPE: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """dq_rot += dS k over the keys `tok` ([BLOCK_N]), rotated frame, softmax scale not applied."""
    k1, k2, v = _load_keys(K, V, COS, SIN, tok, key_ok, kpos, kv_stride, offs_h, offs_d, ROPE, HALF, HEAD_DIM)
    qk = tl.dot(q1, tl.trans(k1))
    qk = tl.dot(q2, tl.trans(k2), qk) * qk_scale
    if MASKED:
        qk = tl.where(allowed, qk, float("-inf"))
    p = tl.math.exp2(qk - lse2[:, None])
    dp = tl.dot(do, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    return tl.dot(ds, k1, dq1), tl.dot(ds, k2, dq2)


@triton.jit
def ms_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    IDX,
    COS,
    SIN,
    L,
    P,
    W,
    M,
    S,
    G,
    n_pre_tiles,
    tiles_per_block,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (query tiles, B*HQ): the forward's schedule, P recomputed from lse."""
    HALF: tl.constexpr = HEAD_DIM // 2
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hkv = h // (HQ // HKV)
    hs = h // (HQ // HS)
    lo, seg_lo, seg_hi, g, shift = _segment(tile, L, P, W, M, S, n_pre_tiles, tiles_per_block, BLOCK_M)
    hi = tl.minimum(lo + BLOCK_M, seg_hi)

    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    q_off = b.to(tl.int64) * L * q_stride + h * HEAD_DIM
    k_base = K + b.to(tl.int64) * L * kv_stride + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * L * kv_stride + hkv * HEAD_DIM

    offs_m = lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < hi
    h_mask = row_ok[:, None] & (offs_h[None, :] < HALF)
    q1, q2 = _load_halves(Q + q_off, offs_m, q_stride, row_ok, offs_h, HALF)
    if ROPE:
        cq, sq = _cos_sin(COS, SIN, offs_m + shift, offs_h, h_mask, HALF)
        q1, q2 = _rotate(q1, q2, cq, sq)
    do = _load_full(DO + q_off, offs_m, q_stride, row_ok, offs_d, HEAD_DIM)
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)

    dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)

    sel_len = tl.where(g >= 0, S * W, 0)
    sel = IDX + ((b * HS + hs).to(tl.int64) * G + g) * S
    for start in range(0, sel_len, BLOCK_N):
        flat = start + offs_n
        rank = flat // W
        region = tl.load(sel + rank, mask=rank < S, other=-1)
        key_ok = region >= 0
        tok = region * W + (flat - rank * W)
        dq1, dq2 = _dq_step(
            dq1,
            dq2,
            q1,
            q2,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            COS,
            SIN,
            tok,
            key_ok,
            flat,
            key_ok[None, :],
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            True,
            ROPE,
            HALF,
            HEAD_DIM,
        )
    for start in range(seg_lo, lo, BLOCK_N):
        tok = start + offs_n
        dq1, dq2 = _dq_step(
            dq1,
            dq2,
            q1,
            q2,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            COS,
            SIN,
            tok,
            tok < hi,
            tok + shift,
            row_ok[:, None],
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            False,
            ROPE,
            HALF,
            HEAD_DIM,
        )
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        allowed = (tok[None, :] <= offs_m[:, None]) & (tok[None, :] < hi)
        dq1, dq2 = _dq_step(
            dq1,
            dq2,
            q1,
            q2,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            COS,
            SIN,
            tok,
            tok < hi,
            tok + shift,
            allowed,
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            True,
            ROPE,
            HALF,
            HEAD_DIM,
        )

    if ROPE:
        dq1, dq2 = _unrotate(dq1, dq2, cq, sq)
    dq_ptrs = DQ + q_off + offs_m.to(tl.int64)[:, None] * q_stride + offs_h[None, :]
    tl.store(dq_ptrs, (dq1 * scale).to(DQ.dtype.element_ty), mask=h_mask)
    tl.store(dq_ptrs + HALF, (dq2 * scale).to(DQ.dtype.element_ty), mask=h_mask)


@triton.jit
def _dkv_step(
    dk1,
    dk2,
    dv,
    k1,
    k2,
    v,
    ck,
    sk,
    Q,
    DO,
    LSE,
    DELTA,
    COS,
    SIN,
    t,
    q_hi,
    qpos,
    allowed,
    qk_scale,
    q_stride,
    offs_h,
    offs_d,
    MASKED: tl.constexpr,
    ROPE: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """dk, dv ([BLOCK_N, *]) += the contribution of the query rows t ([BLOCK_M]).

    Key-major products (FlashAttention-2's): everything computed in registers (P^T, dS^T) is
    the left operand, everything loaded is the right one, as Hopper's wgmma wants. `allowed`
    is [BLOCK_N, BLOCK_M]. Rows t >= q_hi read lse = +inf, hence P = 0, and add nothing.
    """
    row_ok = t < q_hi
    q1, q2 = _load_halves(Q, t, q_stride, row_ok, offs_h, HALF)
    if ROPE:
        c, s = _cos_sin(COS, SIN, qpos, offs_h, row_ok[:, None] & (offs_h[None, :] < HALF), HALF)
        q1, q2 = _rotate(q1, q2, c, s)
    do = _load_full(DO, t, q_stride, row_ok, offs_d, HEAD_DIM)
    lse2 = tl.load(LSE + t, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + t, mask=row_ok, other=0.0)
    qkT = tl.dot(k1, tl.trans(q1))
    qkT = tl.dot(k2, tl.trans(q2), qkT) * qk_scale
    if MASKED:
        qkT = tl.where(allowed, qkT, float("-inf"))
    pT = tl.math.exp2(qkT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
    if ROPE:
        # The keys were rotated at this range's positions: bring their gradient back now.
        u1, u2 = _unrotate(tl.dot(dsT, q1), tl.dot(dsT, q2), ck, sk)
        dk1 += u1
        dk2 += u2
    else:
        dk1 = tl.dot(dsT, q1, dk1)
        dk2 = tl.dot(dsT, q2, dk2)
    return dk1, dk2, dv


@triton.jit
def _dkv_keys(COS, SIN, k1, k2, kpos, ok, offs_h, ROPE: tl.constexpr, HALF: tl.constexpr):
    """Keys rotated at kpos (when ROPE) and the tables ([N, BLOCK_H]) to undo it."""
    if ROPE:
        c, s = _cos_sin(COS, SIN, kpos, offs_h, ok[:, None] & (offs_h[None, :] < HALF), HALF)
        r1, r2 = _rotate(k1, k2, c, s)
        return r1, r2, c, s
    else:
        return k1, k2, k1.to(tl.float32), k2.to(tl.float32)


@triton.jit
def ms_attn_bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    DK32,
    DV32,
    LSE,
    DELTA,
    COS,
    SIN,
    ORDER,
    ENT_OFF,
    ENT_G,
    ENT_RANK,
    L,
    P,
    W,
    M,
    S,
    R,
    n_tiles,
    n_pre_tiles,
    tiles_per_block,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    SELECTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (key tiles, B*HKV). One program owns BLOCK_N keys of one kv head and writes their
    dk, dv once, summing over the group's query heads (GQA) in a fixed order.

    Own segment: the prefix's or the block's later queries, causally. The blocks that selected
    these keys: with SELECTED, through the reverse index (built on the host, deterministic):
    for selection head `hs` and key tile `tile`, entries ENT_OFF[(b*HS + hs)*n_tiles + tile] ..
    [+1] hold, in ascending block order, a block g (ENT_G) that selected one of the tile's
    regions and, for each of the tile's R region slots (slot = tok // w - lo // w), the
    region's rank in g's sorted selection, -1 if g did not select it (ENT_RANK, [entries, R]);
    ORDER lists tiles heaviest first. Without SELECTED, `ms_attn_bwd_dkv_sel_kernel` has
    already summed that part into the float32 DK32, DV32 ([B, L, HKV, D]), added here.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    GROUP: tl.constexpr = HQ // HKV
    DIAG: tl.constexpr = (BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    tile = tl.load(ORDER + tl.program_id(0))
    bkv = tl.program_id(1)
    b = bkv // HKV
    hkv = bkv % HKV
    lo, seg_lo, seg_hi, g_own, shift = _segment(tile, L, P, W, M, S, n_pre_tiles, tiles_per_block, BLOCK_N)
    hi = tl.minimum(lo + BLOCK_N, seg_hi)

    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    kv_off = b.to(tl.int64) * L * kv_stride + hkv * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    tok = lo + tl.arange(0, BLOCK_N)
    key_ok = tok < hi
    k1, k2 = _load_halves(K + kv_off, tok, kv_stride, key_ok, offs_h, HALF)
    v = _load_full(V + kv_off, tok, kv_stride, key_ok, offs_d, HEAD_DIM)
    k1o, k2o, ck, sk = _dkv_keys(COS, SIN, k1, k2, tok + shift, key_ok, offs_h, ROPE, HALF)
    slot = tok // W - lo // W
    within = tok - (tok // W) * W

    dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for hh in range(GROUP):
        h = hkv * GROUP + hh
        hs = h // (HQ // HS)
        q_off = b.to(tl.int64) * L * q_stride + h * HEAD_DIM
        q_base = Q + q_off
        do_base = DO + q_off
        lse_base = LSE + (b * HQ + h).to(tl.int64) * L
        delta_base = DELTA + (b * HQ + h).to(tl.int64) * L

        # Own segment, causally: the diagonal query steps masked, the later ones not.
        for t0 in range(lo, lo + DIAG, BLOCK_M):
            t = t0 + offs_m
            dk1, dk2, dv = _dkv_step(
                dk1,
                dk2,
                dv,
                k1o,
                k2o,
                v,
                ck,
                sk,
                q_base,
                do_base,
                lse_base,
                delta_base,
                COS,
                SIN,
                t,
                seg_hi,
                t + shift,
                tok[:, None] <= t[None, :],
                qk_scale,
                q_stride,
                offs_h,
                offs_d,
                True,
                ROPE,
                HALF,
                HEAD_DIM,
            )
        for t0 in range(lo + DIAG, seg_hi, BLOCK_M):
            t = t0 + offs_m
            dk1, dk2, dv = _dkv_step(
                dk1,
                dk2,
                dv,
                k1o,
                k2o,
                v,
                ck,
                sk,
                q_base,
                do_base,
                lse_base,
                delta_base,
                COS,
                SIN,
                t,
                seg_hi,
                t + shift,
                key_ok[:, None],
                qk_scale,
                q_stride,
                offs_h,
                offs_d,
                False,
                ROPE,
                HALF,
                HEAD_DIM,
            )

        if SELECTED:
            # Every later block that selected one of this tile's regions: all its queries.
            ent = ENT_OFF + (b * HS + hs).to(tl.int64) * n_tiles + tile
            e_lo = tl.load(ent)
            e_hi = tl.load(ent + 1)
            for e in range(e_lo, e_hi):
                g = tl.load(ENT_G + e)
                rank = tl.load(ENT_RANK + e * R + slot, mask=key_ok, other=-1)
                sel_ok = rank >= 0
                k1s, k2s, cT, sT = _dkv_keys(COS, SIN, k1, k2, rank * W + within, sel_ok, offs_h, ROPE, HALF)
                q_lo = P + g * M * W
                q_hi = tl.minimum(q_lo + M * W, L)
                for t0 in range(q_lo, q_hi, BLOCK_M):
                    t = t0 + offs_m
                    dk1, dk2, dv = _dkv_step(
                        dk1,
                        dk2,
                        dv,
                        k1s,
                        k2s,
                        v,
                        cT,
                        sT,
                        q_base,
                        do_base,
                        lse_base,
                        delta_base,
                        COS,
                        SIN,
                        t,
                        q_hi,
                        t + (S * W - q_lo),
                        sel_ok[:, None],
                        qk_scale,
                        q_stride,
                        offs_h,
                        offs_d,
                        True,
                        ROPE,
                        HALF,
                        HEAD_DIM,
                    )

    dk1 = dk1 * scale
    dk2 = dk2 * scale
    h_mask = key_ok[:, None] & (offs_h[None, :] < HALF)
    d_mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows_h = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_h[None, :]
    rows_d = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_d[None, :]
    if not SELECTED:
        dk1 += tl.load(DK32 + rows_h, mask=h_mask, other=0.0)
        dk2 += tl.load(DK32 + rows_h + HALF, mask=h_mask, other=0.0)
        dv += tl.load(DV32 + rows_d, mask=d_mask, other=0.0)
    tl.store(DK + rows_h, dk1.to(DK.dtype.element_ty), mask=h_mask)
    tl.store(DK + rows_h + HALF, dk2.to(DK.dtype.element_ty), mask=h_mask)
    tl.store(DV + rows_d, dv.to(DV.dtype.element_ty), mask=d_mask)


@triton.jit
def ms_attn_bwd_dkv_sel_kernel(
    Q,
    K,
    V,
    DO,
    DK32,
    DV32,
    LSE,
    DELTA,
    IDX,
    COS,
    SIN,
    L,
    P,
    W,
    M,
    S,
    G,
    n_chunks,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (G * n_chunks, B*HS): dk, dv of the selected keys, the fast (atomic) way.

    One program takes chunk c of block g's selected tokens (BLOCK_N of the S*w, read by index
    like the forward: every lane a real key, none wasted), runs over all the block's queries
    of every query head sharing the selection, and adds the keys' dk, dv into the float32
    DK32, DV32 with atomics. The sum's order, hence its last bits, varies from run to run.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    REP: tl.constexpr = HQ // HS
    g = tl.program_id(0) // n_chunks
    chunk = tl.program_id(0) % n_chunks
    bhs = tl.program_id(1)
    b = bhs // HS
    hs = bhs % HS
    hkv = hs // (HS // HKV)

    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    kv_off = b.to(tl.int64) * L * kv_stride + hkv * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    flat = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = flat // W
    sel = IDX + (bhs.to(tl.int64) * G + g) * S
    region = tl.load(sel + rank, mask=rank < S, other=-1)
    key_ok = region >= 0
    tok = region * W + (flat - rank * W)
    k1, k2 = _load_halves(K + kv_off, tok, kv_stride, key_ok, offs_h, HALF)
    v = _load_full(V + kv_off, tok, kv_stride, key_ok, offs_d, HEAD_DIM)
    k1s, k2s, cT, sT = _dkv_keys(COS, SIN, k1, k2, flat, key_ok, offs_h, ROPE, HALF)

    q_lo = P + g * M * W
    q_hi = tl.minimum(q_lo + M * W, L)
    dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(REP):
        h = hs * REP + i
        q_off = b.to(tl.int64) * L * q_stride + h * HEAD_DIM
        lse_base = LSE + (b * HQ + h).to(tl.int64) * L
        delta_base = DELTA + (b * HQ + h).to(tl.int64) * L
        for t0 in range(q_lo, q_hi, BLOCK_M):
            t = t0 + offs_m
            dk1, dk2, dv = _dkv_step(
                dk1,
                dk2,
                dv,
                k1s,
                k2s,
                v,
                cT,
                sT,
                Q + q_off,
                DO + q_off,
                lse_base,
                delta_base,
                COS,
                SIN,
                t,
                q_hi,
                t + (S * W - q_lo),
                key_ok[:, None],
                qk_scale,
                q_stride,
                offs_h,
                offs_d,
                True,
                ROPE,
                HALF,
                HEAD_DIM,
            )

    h_mask = key_ok[:, None] & (offs_h[None, :] < HALF)
    rows_h = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_h[None, :]
    rows_d = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_d[None, :]
    tl.atomic_add(DK32 + rows_h, dk1 * scale, mask=h_mask)
    tl.atomic_add(DK32 + rows_h + HALF, dk2 * scale, mask=h_mask)
    tl.atomic_add(DV32 + rows_d, dv, mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
