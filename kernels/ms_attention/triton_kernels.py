"""Triton kernels of MS ("merge and select") attention: selection, forward, the backward passes.

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
FlashAttention-2's: delta = rowsum(do * o); dq per query tile on the forward's schedule (or,
with ``fused_dq``, added by atomics inside the dk/dv kernels, as FlashAttention-2's CUDA
backward does, and no dq kernel); dk/dv of the own segment per key tile. The selected keys'
dk/dv come one of three ways (``triton_impl.dkv_path``): a reverse index (per key tile, the
blocks that selected one of its regions and the rank of each region there: every gradient
written once, deterministic); per (block, chunk of selected tokens) programs adding into float32
buffers with relaxed atomics (fast, last bits vary run to run); or the same programs writing
per-block partial sums (PDK, PDV [B*HS, Gw, S*w, D] float32, a window of Gw blocks at a time)
that ``ms_attn_bwd_dkv_reduce_kernel`` then adds per region in a fixed order (deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


SELECT_COUNTS = ("n_items",)
"""The selection kernels' item counts, only loop bounds: Triton would specialize on them (a value
of 1, a multiple of 16) and compile another kernel for each case, for nothing. (Until session 20
the retry and the full-depth kernel took the data-dependent number of items a step flagged here,
so a training step could meet a new case and compile mid-step; they now read it on the device,
``COUNT``, and take the list's capacity here.)"""


@triton.jit
def _segment(tile, L, P, W, M, S, n_pre_tiles, tiles_per_block, BLOCK: tl.constexpr):
    """Tile number -> (first token, segment start, segment end, block or -1, RoPE shift).

    Without branches (selects): Triton's Hopper warp specialization refuses a kernel with an
    if/else on runtime values."""
    pre = tile < n_pre_tiles
    rel = tl.maximum(tile - n_pre_tiles, 0)
    blk = rel // tl.maximum(tiles_per_block, 1)
    blk_lo = P + blk * M * W
    g = tl.where(pre, -1, blk)
    seg_lo = tl.where(pre, 0, blk_lo)
    seg_hi = tl.where(pre, P, tl.minimum(blk_lo + M * W, L))
    lo = tl.where(pre, tile * BLOCK, blk_lo + (rel - blk * tiles_per_block) * BLOCK)
    shift = tl.where(pre, 0, S * W - blk_lo)
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
def _rotated(COS, SIN, x1, x2, pos, ok, offs_h, ROPE: tl.constexpr, HALF: tl.constexpr):
    """Halves rotated at positions pos ([N]) when ROPE, and the tables ([N, BLOCK_H]) that undo
    it (without ROPE: x1, x2 unchanged and float32 copies standing in for the tables)."""
    if ROPE:
        c, s = _cos_sin(COS, SIN, pos, offs_h, ok[:, None] & (offs_h[None, :] < HALF), HALF)
        r1, r2 = _rotate(x1, x2, c, s)
        return r1, r2, c, s
    else:
        return x1, x2, x1.to(tl.float32), x2.to(tl.float32)


@triton.jit
def _load_rotated(base, tok, row_stride, ok, COS, SIN, pos, offs_h, ROPE: tl.constexpr, HALF: tl.constexpr):
    """Rows `tok` of one head as halves, rotated at `pos` under RoPE, with the tables."""
    x1, x2 = _load_halves(base, tok, row_stride, ok, offs_h, HALF)
    return _rotated(COS, SIN, x1, x2, pos, ok, offs_h, ROPE, HALF)


@triton.jit
def _load_rows(
    X, rows, row_stride, ok, COS, SIN, pos, offs_h, offs_d, ROPE: tl.constexpr, HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr, WHOLE: tl.constexpr,
):  # fmt: skip
    """Rows of q or k as (x1, x2, tables): with WHOLE the whole rows as x1 (and as x2, unused; the
    tables stand-ins as without RoPE), else `_load_rotated`'s halves. The query tile of forward
    and dq, the query steps and selected keys of the dk/dv kernels."""
    if WHOLE:
        x = _load_full(X, rows, row_stride, ok, offs_d, HEAD_DIM)
        return x, x, x.to(tl.float32), x.to(tl.float32)
    else:
        return _load_rotated(X, rows, row_stride, ok, COS, SIN, pos, offs_h, ROPE, HALF)


@triton.jit
def _selected_tokens(sel, start, offs_n, S, W):
    """Keys start + offs_n of a block's sorted selection `sel` ([S] regions, -1 padded):
    (their place in the list, the token each reads, whether it is a real key)."""
    flat = start + offs_n
    rank = flat // W
    region = tl.load(sel + rank, mask=rank < S, other=-1)
    return flat, region * W + (flat - rank * W), region >= 0


@triton.jit
def _selected_len(sel, g, S, W, BLOCK: tl.constexpr):
    """Tokens of block g's valid selected regions (0 in the prefix, g = -1): the row `sel`
    ([S] regions) holds its -1 padding after them, so they are its first tokens."""
    offs = tl.arange(0, BLOCK)
    count = g * 0
    for r in range(0, tl.where(g >= 0, S, 0), BLOCK):
        region = tl.load(sel + r + offs, mask=r + offs < S, other=-1)
        count += tl.sum((region >= 0).to(tl.int32), 0)
    return count * W


@triton.jit
def _query_tile(
    tile,
    bh,
    L,
    P,
    W,
    M,
    S,
    n_pre_tiles,
    tiles_per_block,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Where the forward's and dq's program (tile, b*HQ + h) works: its rows [lo, hi), its
    segment [seg_lo, seg_hi), block g (-1 in the prefix), RoPE shift, selection head hs,
    the q row offset and the k, v head offsets."""
    b = bh // HQ
    h = bh % HQ
    hkv = h // (HQ // HKV)
    hs = h // (HQ // HS)
    lo, seg_lo, seg_hi, g, shift = _segment(tile, L, P, W, M, S, n_pre_tiles, tiles_per_block, BLOCK_M)
    hi = tl.minimum(lo + BLOCK_M, seg_hi)
    q_off = b.to(tl.int64) * L * (HQ * HEAD_DIM) + h * HEAD_DIM
    kv_off = b.to(tl.int64) * L * (HKV * HEAD_DIM) + hkv * HEAD_DIM
    return b, hs, lo, hi, seg_lo, seg_hi, g, shift, q_off, kv_off


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
    k1, k2, _, _ = _load_rotated(K, tok, kv_stride, key_ok, COS, SIN, kpos, offs_h, ROPE, HALF)
    return k1, k2, _load_full(V, tok, kv_stride, key_ok, offs_d, HEAD_DIM)


@triton.jit
def _tile_scores(
    q1, q2, K, V, COS, SIN, tok, key_ok, kpos, kv_stride, offs_h, offs_d, ROPE: tl.constexpr,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, WHOLE: tl.constexpr,
):  # fmt: skip
    """Unscaled scores of the query tile against the keys `tok` ([BLOCK_M, BLOCK_N]), and the
    values; the keys too (as (k1, k2), or (k, k) when WHOLE: one dot over the whole head dim)."""
    if WHOLE:
        k = _load_full(K, tok, kv_stride, key_ok, offs_d, HEAD_DIM)
        v = _load_full(V, tok, kv_stride, key_ok, offs_d, HEAD_DIM)
        return tl.dot(q1, tl.trans(k)), k, k, v
    else:
        k1, k2, v = _load_keys(
            K, V, COS, SIN, tok, key_ok, kpos, kv_stride, offs_h, offs_d, ROPE, HALF, HEAD_DIM
        )
        qk = tl.dot(q1, tl.trans(k1))
        return tl.dot(q2, tl.trans(k2), qk), k1, k2, v


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
    WHOLE: tl.constexpr,
):
    """One online-softmax step over the keys `tok` ([BLOCK_N]); `allowed` [BLOCK_M, BLOCK_N].
    WHOLE: q1 is the whole q tile ([BLOCK_M, BLOCK_D], q2 unused) and the scores one dot."""
    qk, _, _, v = _tile_scores(q1, q2, K, V, COS, SIN, tok, key_ok, kpos, kv_stride, offs_h, offs_d, ROPE,
                          HALF, HEAD_DIM, WHOLE)  # fmt: skip
    # The row maximum of the raw scores, scaled after (qk_scale > 0: the same value), so that
    # scaling and shifting are one FMA per score.
    if MASKED:
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _fwd_selected(
    acc, l_i, m_i, q1, q2, K, V, COS, SIN, sel, lo, hi, S, W, offs_n, qk_scale, kv_stride, offs_h,
    offs_d, MASKED: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    WHOLE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Forward steps over the places [lo, hi) of a block's selection `sel`, BLOCK_N at a time."""
    for start in range(lo, hi, BLOCK_N):
        flat, tok, key_ok = _selected_tokens(sel, start, offs_n, S, W)
        acc, l_i, m_i = _fwd_step(
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
            flat,
            key_ok[None, :],
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            MASKED,
            ROPE,
            HALF,
            HEAD_DIM,
            WHOLE,
        )
    return acc, l_i, m_i


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
    q_start,
    first_tile,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    WHOLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REGION: tl.constexpr = 0,
):
    """Grid (query tiles from `first_tile`, the tile holding row `q_start`; B*HQ). Writes o
    for the tile's rows from `q_start` on and their lse (natural log); rows before `q_start`
    are not read (their q reads 0) nor written. REGION > 0: the region size W as a constant."""
    if REGION > 0:  # the region size compiled in: its divisions become shifts or multiplies
        W = REGION
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    tile = tl.program_id(0) + first_tile
    b, hs, lo, hi, seg_lo, seg_hi, g, shift, q_off, kv_off = _query_tile(
        tile, bh, L, P, W, M, S, n_pre_tiles, tiles_per_block, HQ, HKV, HS, HEAD_DIM, BLOCK_M
    )
    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    k_base = K + kv_off
    v_base = V + kv_off

    offs_m = lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m >= q_start) & (offs_m < hi)
    q1, q2, _, _ = _load_rows(
        Q + q_off,
        offs_m,
        q_stride,
        row_ok,
        COS,
        SIN,
        offs_m + shift,
        offs_h,
        offs_d,
        ROPE,
        HALF,
        HEAD_DIM,
        WHOLE,
    )

    # m_i starts finite so that a step whose keys are all masked (padding) yields no NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # (a) the block's selected regions, read by index; a prefix tile has none. Whole steps of
    # valid keys need no mask; the last partial step does; steps of padding alone are skipped.
    sel = IDX + ((b * HS + hs).to(tl.int64) * G + g) * S
    sel_len = _selected_len(sel, g, S, W, BLOCK_N)
    whole = sel_len // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_selected(
        acc, l_i, m_i, q1, q2, k_base, v_base, COS, SIN, sel, 0, whole, S, W, offs_n, qk_scale,
        kv_stride, offs_h, offs_d, False, ROPE, HALF, HEAD_DIM, WHOLE, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_selected(
        acc, l_i, m_i, q1, q2, k_base, v_base, COS, SIN, sel, whole, sel_len, S, W, offs_n, qk_scale,
        kv_stride, offs_h, offs_d, True, ROPE, HALF, HEAD_DIM, WHOLE, BLOCK_N,
    )  # fmt: skip

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
            WHOLE,
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
            WHOLE,
        )

    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = O + q_off + offs_m.to(tl.int64)[:, None] * q_stride + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit
def ms_rotate_q_kernel(
    Q, QR, COS, SIN, L, P, W, M, S, HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (row tiles, B*HQ): QR = q rotated at each row's own position, as the attention
    kernels rotate it on the fly (the prefix's rows at their index, a block's at S*w + their
    place in the block), so that the dk/dv kernels, which read q once per query step, may read
    it as is (QROT). Forward and dq rotate q once per program themselves."""
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    off = (bh // HQ).to(tl.int64) * L * (HQ * HEAD_DIM) + (bh % HQ) * HEAD_DIM
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = t < L
    pos = tl.where(t < P, t, S * W + (t - P) % (M * W))
    offs_h = tl.arange(0, BLOCK_H)
    x1, x2, _, _ = _load_rotated(Q + off, t, HQ * HEAD_DIM, ok, COS, SIN, pos, offs_h, True, HALF)
    ptrs = QR + off + t.to(tl.int64)[:, None] * (HQ * HEAD_DIM) + offs_h[None, :]
    mask = ok[:, None] & (offs_h[None, :] < HALF)
    tl.store(ptrs, x1, mask=mask)
    tl.store(ptrs + HALF, x2, mask=mask)


@triton.jit
def ms_attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    L,
    q_start,
    HQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[b, h, t] = sum_d o * do in float32 for t >= q_start. Grid (cdiv(L - q_start,
    BLOCK_M), B*HQ)."""
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    offs_m = q_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
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
    WHOLE: tl.constexpr,
):
    """dq_rot += dS k over the keys `tok` ([BLOCK_N]), rotated frame, softmax scale not applied.
    WHOLE: q1 and dq1 are whole rows ([BLOCK_M, BLOCK_D]; q2, dq2 unused)."""
    qk, k1, k2, v = _tile_scores(q1, q2, K, V, COS, SIN, tok, key_ok, kpos, kv_stride, offs_h, offs_d, ROPE,
                            HALF, HEAD_DIM, WHOLE)  # fmt: skip
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])  # one FMA per score
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    if WHOLE:
        return tl.dot(ds, k1, dq1), dq2
    else:
        return tl.dot(ds, k1, dq1), tl.dot(ds, k2, dq2)


@triton.jit
def _dq_selected(
    dq1, dq2, q1, q2, do, lse2, delta, K, V, COS, SIN, sel, lo, hi, S, W, offs_n, qk_scale, kv_stride,
    offs_h, offs_d, MASKED: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr, WHOLE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq steps over the places [lo, hi) of a block's selection `sel`, BLOCK_N at a time."""
    for start in range(lo, hi, BLOCK_N):
        flat, tok, key_ok = _selected_tokens(sel, start, offs_n, S, W)
        dq1, dq2 = _dq_step(
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
            flat,
            key_ok[None, :],
            qk_scale,
            kv_stride,
            offs_h,
            offs_d,
            MASKED,
            ROPE,
            HALF,
            HEAD_DIM,
            WHOLE,
        )
    return dq1, dq2


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
    q_start,
    first_tile,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    WHOLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REGION: tl.constexpr = 0,
    DQ32=None,
):
    """Grid (query tiles from `first_tile`, B*HQ): the forward's schedule, P recomputed from
    lse; rows before `q_start` are neither read nor written. REGION > 0: W as a constant. With
    DQ32 (float32 ``[B, L, HQ, D]``, the selected keys' unscaled dS k added by the fused dk/dv
    kernels) the tiles run their own segment's steps only and add their rows of DQ32 before the
    scale and the cast (``LaunchConfig.fused_dq_finish``)."""
    FINISH: tl.constexpr = DQ32 is not None
    if REGION > 0:  # the region size compiled in: its divisions become shifts or multiplies
        W = REGION
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    tile = tl.program_id(0) + first_tile
    b, hs, lo, hi, seg_lo, seg_hi, g, shift, q_off, kv_off = _query_tile(
        tile, bh, L, P, W, M, S, n_pre_tiles, tiles_per_block, HQ, HKV, HS, HEAD_DIM, BLOCK_M
    )
    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    k_base = K + kv_off
    v_base = V + kv_off

    offs_m = lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m >= q_start) & (offs_m < hi)
    h_mask = row_ok[:, None] & (offs_h[None, :] < HALF)
    q1, q2, cq, sq = _load_rows(
        Q + q_off,
        offs_m,
        q_stride,
        row_ok,
        COS,
        SIN,
        offs_m + shift,
        offs_h,
        offs_d,
        ROPE,
        HALF,
        HEAD_DIM,
        WHOLE,
    )
    do = _load_full(DO + q_off, offs_m, q_stride, row_ok, offs_d, HEAD_DIM)
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)

    dq1 = tl.zeros(q1.shape, dtype=tl.float32)  # whole rows or a half, as q1
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)

    # The selected keys as in the forward: whole steps unmasked, the partial one masked.
    if not FINISH:
        sel = IDX + ((b * HS + hs).to(tl.int64) * G + g) * S
        sel_len = _selected_len(sel, g, S, W, BLOCK_N)
        whole = sel_len // BLOCK_N * BLOCK_N
        dq1, dq2 = _dq_selected(
            dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, COS, SIN, sel, 0, whole, S, W, offs_n,
            qk_scale, kv_stride, offs_h, offs_d, False, ROPE, HALF, HEAD_DIM, WHOLE, BLOCK_N,
        )  # fmt: skip
        dq1, dq2 = _dq_selected(
            dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, COS, SIN, sel, whole, sel_len, S, W, offs_n,
            qk_scale, kv_stride, offs_h, offs_d, True, ROPE, HALF, HEAD_DIM, WHOLE, BLOCK_N,
        )  # fmt: skip
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
            WHOLE,
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
            WHOLE,
        )

    if WHOLE:
        rows = q_off + offs_m.to(tl.int64)[:, None] * q_stride + offs_d[None, :]
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        if FINISH:
            dq1 += tl.load(DQ32 + rows, mask=mask, other=0.0)
        tl.store(DQ + rows, (dq1 * scale).to(DQ.dtype.element_ty), mask=mask)
    else:
        if ROPE:
            dq1, dq2 = _unrotate(dq1, dq2, cq, sq)
        rows = q_off + offs_m.to(tl.int64)[:, None] * q_stride + offs_h[None, :]
        if FINISH:
            dq1 += tl.load(DQ32 + rows, mask=h_mask, other=0.0)
            dq2 += tl.load(DQ32 + rows + HALF, mask=h_mask, other=0.0)
        tl.store(DQ + rows, (dq1 * scale).to(DQ.dtype.element_ty), mask=h_mask)
        tl.store(DQ + rows + HALF, (dq2 * scale).to(DQ.dtype.element_ty), mask=h_mask)


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
    q_first,
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
    ROTATED_DK: tl.constexpr = False,
    QROT: tl.constexpr = False,
    DQ32=None,
    FUSED_DQ: tl.constexpr = False,
    WHOLE: tl.constexpr = False,
    QD=None,
    DOD=None,
    tma_b=0,
    tma_row=0,
    tma_col=0,
):
    """dk, dv ([BLOCK_N, *]) += the contribution of the query rows t ([BLOCK_M]).

    Key-major products (FlashAttention-2's): everything computed in registers (P^T, dS^T) is
    the left operand, everything loaded is the right one, as Hopper's wgmma wants. `allowed`
    is [BLOCK_N, BLOCK_M]. Rows t < q_first or t >= q_hi read q = do = 0 and lse = +inf, hence
    P = 0, and add nothing. Under RoPE dk comes back to the keys' own frame each step, unless
    ROTATED_DK: then dk1, dk2 stay in the rotated frame (the caller, whose keys keep one
    rotation over all its steps, unrotates the sum once). QROT: Q holds q already rotated at the
    rows' positions (``ms_rotate_q_kernel``), read as is. FUSED_DQ (without RoPE on the fly: the
    keys are then the scores' own): the rows' dq gets dS k added into the float32 DQ32 (laid
    out as Q) with relaxed atomics, the dq kernel's work without its recompute; the softmax
    scale is left to the caller, applied once to the finished sum (``bwd_dkv``'s caller).
    WHOLE (without RoPE on the fly): k1 and dk1 are whole rows ([BLOCK_N, BLOCK_D]; k2, dk2
    unused), q is loaded whole and the scores are one dot over the head dim. QD, DOD (with
    WHOLE): TMA descriptors of q and do, which load the rows at [tma_b, tma_row, tma_col] (rows
    outside [q_first, q_hi) then read 0 or their own finite values, added as P = 0), not Q, DO.
    """
    row_ok = (t >= q_first) & (t < q_hi)
    if QD is not None:
        q1 = QD.load([tma_b, tma_row, tma_col]).reshape(t.shape[0], HEAD_DIM)
        q2 = q1
        do = DOD.load([tma_b, tma_row, tma_col]).reshape(t.shape[0], HEAD_DIM)
    else:
        q1, q2, _, _ = _load_rows(
            Q, t, q_stride, row_ok, COS, SIN, qpos, offs_h, offs_d, ROPE and not QROT, HALF, HEAD_DIM, WHOLE
        )
        do = _load_full(DO, t, q_stride, row_ok, offs_d, HEAD_DIM)
    lse2 = tl.load(LSE + t, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + t, mask=row_ok, other=0.0)
    qkT = tl.dot(k1, tl.trans(q1))
    if not WHOLE:
        qkT = tl.dot(k2, tl.trans(q2), qkT)
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])  # one FMA per score
    if MASKED:
        pT = tl.where(allowed, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
    if FUSED_DQ:
        ds = tl.trans(dsT)
        if WHOLE:
            dq_ptrs = DQ32 + t.to(tl.int64)[:, None] * q_stride + offs_d[None, :]
            dq_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(dq_ptrs, tl.dot(ds, k1), mask=dq_mask, sem="relaxed")
        else:
            dq_ptrs = DQ32 + t.to(tl.int64)[:, None] * q_stride + offs_h[None, :]
            dq_mask = row_ok[:, None] & (offs_h[None, :] < HALF)
            tl.atomic_add(dq_ptrs, tl.dot(ds, k1), mask=dq_mask, sem="relaxed")
            tl.atomic_add(dq_ptrs + HALF, tl.dot(ds, k2), mask=dq_mask, sem="relaxed")
    if ROPE and not ROTATED_DK:
        # The keys were rotated at this range's positions: bring their gradient back now.
        u1, u2 = _unrotate(tl.dot(dsT, q1), tl.dot(dsT, q2), ck, sk)
        dk1 += u1
        dk2 += u2
    else:
        dk1 = tl.dot(dsT, q1, dk1)
        if not WHOLE:
            dk2 = tl.dot(dsT, q2, dk2)
    return dk1, dk2, dv


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
    DQ32,
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
    q_start,
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
    QROT: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    WHOLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QD=None,
    DOD=None,
    KD=None,
    VD=None,
    WS: tl.constexpr = False,
):
    """Grid (key tiles, B*HKV). One program owns BLOCK_N keys of one kv head and writes their
    dk, dv once, summing over the group's query heads (GQA) in a fixed order.

    Own segment: the prefix's or the block's later queries, causally. The blocks that selected
    these keys: with SELECTED, through the reverse index (built on the host, deterministic):
    for selection head `hs` and key tile `tile`, entries ENT_OFF[(b*HS + hs)*n_tiles + tile] ..
    [+1] hold, in ascending block order, a block g (ENT_G) that selected one of the tile's
    regions and, for each of the tile's R region slots (slot = tok // w - lo // w), the
    region's rank in g's sorted selection, -1 if g did not select it (ENT_RANK, [entries, R]);
    ORDER lists tiles heaviest first. Without SELECTED, `ms_attn_bwd_dkv_sel_kernel` (atomics)
    or it and `ms_attn_bwd_dkv_reduce_kernel` (partial sums) have already summed that part
    into the float32 DK32, DV32 ([B, L, HKV, D]), added here. Query rows before `q_start`
    add nothing: the query steps wholly before it are skipped, the rest masked. FUSED_DQ: every
    step also adds its rows' dq into the float32 DQ32 ([B, L, HQ, D]) with atomics
    (``_dkv_step``); the dq kernel is then not run. QD, DOD, KD, VD (with WHOLE, all or none):
    TMA descriptors of q, do (``[B, L - q_start, HQ * D]``, from row q_start: the rows before
    it read 0) and k, v (``[B, L, HKV * D]``), blocks ``[1, BLOCK_M or BLOCK_N, D]``; the
    program then loads its keys and its query steps through them, and with WS the own
    segment's query steps run as one loop, every step masked, warp-specialized (Triton's Hopper
    producer/consumer partitions, which take only loops fed by TMA).
    """
    TMA: tl.constexpr = QD is not None
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
    if TMA:  # keys past hi (the next segment's, or zeros past L): a tile with them has masked
        # (diagonal) steps only, where they are left out
        k1 = KD.load([b, lo, hkv * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
        k2 = k1
        v = VD.load([b, lo, hkv * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
    else:
        if WHOLE:
            k1 = _load_full(K + kv_off, tok, kv_stride, key_ok, offs_d, HEAD_DIM)
            k2 = k1
        else:
            k1, k2 = _load_halves(K + kv_off, tok, kv_stride, key_ok, offs_h, HALF)
        v = _load_full(V + kv_off, tok, kv_stride, key_ok, offs_d, HEAD_DIM)
    k1o, k2o, ck, sk = _rotated(COS, SIN, k1, k2, tok + shift, key_ok, offs_h, ROPE, HALF)
    slot = tok // W - lo // W
    within = tok - (tok // W) * W
    # Own-segment query steps before the one holding q_start are skipped (the same steps as
    # without q_start, so the sums keep their order).
    skip = tl.maximum(q_start - lo, 0) // BLOCK_M * BLOCK_M

    dk1 = tl.zeros(k1.shape, dtype=tl.float32)  # whole rows or a half, as k1
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for hh in range(GROUP):
        h = hkv * GROUP + hh
        hs = h // (HQ // HS)
        q_off = b.to(tl.int64) * L * q_stride + h * HEAD_DIM
        q_base = Q + q_off
        do_base = DO + q_off
        dq_base = DQ32 + q_off
        lse_base = LSE + (b * HQ + h).to(tl.int64) * L
        delta_base = DELTA + (b * HQ + h).to(tl.int64) * L

        # Own segment, causally: the diagonal query steps masked, the later ones not (with WS
        # one loop, every step masked: Triton's Hopper partitions take no loop before theirs).
        diag_end = lo + skip if WS else lo + DIAG
        if not WS:
            for t0 in range(lo + skip, diag_end, BLOCK_M):
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
                    q_start,
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
                    not SELECTED,  # the own segment alone: one rotation, undone at the end
                    QROT,
                    dq_base,
                    FUSED_DQ,
                    WHOLE,
                    QD,
                    DOD,
                    b,
                    t0 - q_start,
                    h * HEAD_DIM,
                )
        for t0 in tl.range(tl.maximum(lo + skip, diag_end), seg_hi, BLOCK_M, warp_specialize=WS):
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
                q_start,
                seg_hi,
                t + shift,
                tok[:, None] <= t[None, :],
                qk_scale,
                q_stride,
                offs_h,
                offs_d,
                WS,
                ROPE,
                HALF,
                HEAD_DIM,
                not SELECTED,
                QROT,
                dq_base,
                FUSED_DQ,
                WHOLE,
                QD,
                DOD,
                b,
                t0 - q_start,
                h * HEAD_DIM,
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
                k1s, k2s, cT, sT = _rotated(COS, SIN, k1, k2, rank * W + within, sel_ok, offs_h, ROPE, HALF)
                q_lo = P + g * M * W
                q_hi = tl.minimum(q_lo + M * W, L)
                t_first = q_lo + tl.maximum(q_start - q_lo, 0) // BLOCK_M * BLOCK_M
                for t0 in range(t_first, q_hi, BLOCK_M):
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
                        q_start,
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
                        False,
                        QROT,
                        dq_base,
                        FUSED_DQ,
                        WHOLE,
                        QD,
                        DOD,
                        b,
                        t0 - q_start,
                        h * HEAD_DIM,
                    )

    if ROPE and not SELECTED:  # summed in the keys' rotated frame (one rotation, tok + shift)
        dk1, dk2 = _unrotate(dk1, dk2, ck, sk)
    dk1 = dk1 * scale
    dk2 = dk2 * scale
    h_mask = key_ok[:, None] & (offs_h[None, :] < HALF)
    d_mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows_h = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_h[None, :]
    rows_d = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_d[None, :]
    if not SELECTED:
        dv += tl.load(DV32 + rows_d, mask=d_mask, other=0.0)
    if WHOLE:
        if not SELECTED:
            dk1 += tl.load(DK32 + rows_d, mask=d_mask, other=0.0)
        tl.store(DK + rows_d, dk1.to(DK.dtype.element_ty), mask=d_mask)
    else:
        if not SELECTED:
            dk1 += tl.load(DK32 + rows_h, mask=h_mask, other=0.0)
            dk2 += tl.load(DK32 + rows_h + HALF, mask=h_mask, other=0.0)
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
    DQ32,
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
    g0,
    window,
    q_start,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    PARTIAL: tl.constexpr,
    QROT: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    WHOLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (Gw * n_chunks, B*HS): dk, dv of the selected keys of blocks g0 .. g0 + Gw - 1.

    One program takes chunk c of block g's selected tokens (BLOCK_N of the S*w, read by index
    like the forward: every lane a real key, none wasted) and runs over all the block's queries
    of every query head sharing the selection. Without PARTIAL it adds the keys' dk, dv into
    the float32 DK32, DV32 ([B, L, HKV, D]) with relaxed atomics: only the sum is wanted, no
    ordering of other memory accesses, and the sum's order (hence its last bits) varies from
    run to run anyway. With PARTIAL, DK32, DV32 are the partial buffers
    ([B*HS, window, S*w, D]) and the program stores its sums at (b*HS + hs, g - g0, place in
    the selection): every element written once, by one program, so the values are the same on
    every run; ``ms_attn_bwd_dkv_reduce_kernel`` adds them up. Query rows before `q_start`
    add nothing (the host starts g0 at the block holding it; its earlier steps are skipped).
    FUSED_DQ (atomics only): the steps also add the rows' dq into DQ32, as ``_dkv_step`` says.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    REP: tl.constexpr = HQ // HS
    g = g0 + tl.program_id(0) // n_chunks
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
    sel = IDX + (bhs.to(tl.int64) * G + g) * S
    flat, tok, key_ok = _selected_tokens(sel, chunk * BLOCK_N, tl.arange(0, BLOCK_N), S, W)
    k1s, k2s, cT, sT = _load_rows(
        K + kv_off, tok, kv_stride, key_ok, COS, SIN, flat, offs_h, offs_d, ROPE, HALF, HEAD_DIM, WHOLE
    )
    v = _load_full(V + kv_off, tok, kv_stride, key_ok, offs_d, HEAD_DIM)

    q_lo = P + g * M * W
    q_hi = tl.minimum(q_lo + M * W, L)
    t_first = q_lo + tl.maximum(q_start - q_lo, 0) // BLOCK_M * BLOCK_M
    # A chunk of -1 padding alone has nothing to add: its loop is empty.
    t_end = tl.where(tl.max(key_ok.to(tl.int32), 0) > 0, q_hi, t_first)
    dk1 = tl.zeros(k1s.shape, dtype=tl.float32)  # whole rows or a half, as k1s
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(REP):
        h = hs * REP + i
        q_off = b.to(tl.int64) * L * q_stride + h * HEAD_DIM
        lse_base = LSE + (b * HQ + h).to(tl.int64) * L
        delta_base = DELTA + (b * HQ + h).to(tl.int64) * L
        for t0 in range(t_first, t_end, BLOCK_M):
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
                q_start,
                q_hi,
                t + (S * W - q_lo),
                key_ok[:, None],
                qk_scale,
                q_stride,
                offs_h,
                offs_d,
                False,  # a padding key's row (k = v = 0) is computed but never stored
                ROPE,
                HALF,
                HEAD_DIM,
                True,  # the keys keep their rank's rotation over every step: unrotated below
                QROT,
                DQ32 + q_off,
                FUSED_DQ,
                WHOLE,
            )

    if ROPE:
        dk1, dk2 = _unrotate(dk1, dk2, cT, sT)
    h_mask = key_ok[:, None] & (offs_h[None, :] < HALF)
    d_mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    if PARTIAL:
        part = ((bhs.to(tl.int64) * window + (g - g0)) * S * W + flat.to(tl.int64)) * HEAD_DIM
        if WHOLE:
            tl.store(DK32 + part[:, None] + offs_d[None, :], dk1 * scale, mask=d_mask)
        else:
            tl.store(DK32 + part[:, None] + offs_h[None, :], dk1 * scale, mask=h_mask)
            tl.store(DK32 + part[:, None] + HALF + offs_h[None, :], dk2 * scale, mask=h_mask)
        tl.store(DV32 + part[:, None] + offs_d[None, :], dv, mask=d_mask)
    else:
        rows_h = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_h[None, :]
        rows_d = kv_off + tok.to(tl.int64)[:, None] * kv_stride + offs_d[None, :]
        if WHOLE:
            tl.atomic_add(DK32 + rows_d, dk1 * scale, mask=d_mask, sem="relaxed")
        else:
            tl.atomic_add(DK32 + rows_h, dk1 * scale, mask=h_mask, sem="relaxed")
            tl.atomic_add(DK32 + rows_h + HALF, dk2 * scale, mask=h_mask, sem="relaxed")
        tl.atomic_add(DV32 + rows_d, dv, mask=d_mask, sem="relaxed")


@triton.jit
def ms_attn_bwd_dkv_reduce_kernel(
    PDK,
    PDV,
    DK32,
    DV32,
    OFFSETS,
    SRC,
    L,
    W,
    n,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (n, B*HKV): region j of kv head hkv gets the partial sums of one window of blocks.

    OFFSETS[(b*HKV + hkv)*n + j] .. [+1] index SRC (int64): each entry is a partial row
    (b*HS + hs)*window*S + (g - g0)*S + rank, i.e. the region's w tokens in the partial
    buffers ``ms_attn_bwd_dkv_sel_kernel`` filled, for every selection head hs of the group
    and block g of the window that selected j, ascending in (hs, g). They are summed in that
    order and added to DK32, DV32 ([B, L, HKV, D] float32) by this program alone: a fixed
    order of additions, so the result is bitwise the same on every run.
    """
    j = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HKV
    hkv = bkv % HKV
    key = bkv.to(tl.int64) * n + j
    e_lo = tl.load(OFFSETS + key)
    e_hi = tl.load(OFFSETS + key + 1)
    if e_hi > e_lo:
        offs_t = tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        t_ok = offs_t < W
        mask = t_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        acc_k = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
        for e in range(e_lo, e_hi):
            src = tl.load(SRC + e)
            ptrs = (src * W + offs_t.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
            acc_k += tl.load(PDK + ptrs, mask=mask, other=0.0)
            acc_v += tl.load(PDV + ptrs, mask=mask, other=0.0)
        tok = j * W + offs_t
        ok = mask & (tok < L)[:, None]
        stride = HKV * HEAD_DIM
        rows = (b.to(tl.int64) * L + tok.to(tl.int64))[:, None] * stride + hkv * HEAD_DIM + offs_d[None, :]
        tl.store(DK32 + rows, tl.load(DK32 + rows, mask=ok, other=0.0) + acc_k, mask=ok)
        tl.store(DV32 + rows, tl.load(DV32 + rows, mask=ok, other=0.0) + acc_v, mask=ok)


# --- Selection (spec steps 4-8): representatives, scores, per-row top-(T-m), merge. -------------
#
# Shapes: QREP [B, HS, n, D] float32 (query representatives, summed over the group's query heads
# for scope="group"), KREP [B, HKV, n, D] float32, OUT [B, HS, G, S] int32 (merge order).
# Scratch, one slice per program: LIST [P, ROWS, CAP] int64, TOPK [P, RM, KP] int32,
# SEEN [P, n] int32 (zero-initialised; stamped with item + 1, so it is never cleared).


@triton.jit
def ms_select_reps_kernel(
    X,
    REP,
    L,
    n,
    W,
    sqrt_d,
    H: tl.constexpr,
    HR: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ATTN: tl.constexpr,
):
    """Grid (cdiv(n, BLOCK_R), B*HR): REP[b, hr, i] = sum over the H // HR heads of head group hr
    of region i's representative (mean over its valid tokens; with ATTN the mean then attends
    over them, softmax(mean . x / sqrt(D)) x), in float32, as ``region_representatives``."""
    SUM: tl.constexpr = H // HR
    bh = tl.program_id(1)
    b = bh // HR
    hr = bh % HR
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < n
    count = tl.maximum(tl.minimum(W, L - offs_r * W), 1)
    stride = H * HEAD_DIM
    out = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(SUM):
        base = X + b.to(tl.int64) * L * stride + (hr * SUM + i) * HEAD_DIM
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for t in range(W):
            ok = r_ok & (t < count)
            acc += _load_full(base, offs_r * W + t, stride, ok, offs_d, HEAD_DIM).to(tl.float32)
        rep = acc / count.to(tl.float32)[:, None]
        if ATTN:
            # softmax over the region's tokens, computed as torch does: max, sum of exp, then
            # the probabilities times the tokens.
            mx = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
            for t in range(W):
                ok = r_ok & (t < count)
                x = _load_full(base, offs_r * W + t, stride, ok, offs_d, HEAD_DIM).to(tl.float32)
                mx = tl.maximum(mx, tl.where(ok, tl.sum(x * rep, 1) / sqrt_d, float("-inf")))
            mx = tl.where(r_ok, mx, 0.0)
            den = tl.zeros([BLOCK_R], dtype=tl.float32)
            for t in range(W):
                ok = r_ok & (t < count)
                x = _load_full(base, offs_r * W + t, stride, ok, offs_d, HEAD_DIM).to(tl.float32)
                den += tl.where(ok, tl.exp(tl.sum(x * rep, 1) / sqrt_d - mx), 0.0)
            den = tl.where(r_ok, den, 1.0)
            pooled = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            for t in range(W):
                ok = r_ok & (t < count)
                x = _load_full(base, offs_r * W + t, stride, ok, offs_d, HEAD_DIM).to(tl.float32)
                p = tl.where(ok, tl.exp(tl.sum(x * rep, 1) / sqrt_d - mx) / den, 0.0)
                pooled += p[:, None] * x
            rep = pooled
        out += rep
    ptrs = REP + (bh.to(tl.int64) * n + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, out, mask=r_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _sortable(s):
    """float32 -> int32 with the same order; -0.0 is +0.0 (torch.sort sees them equal)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _scores(qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Float32 scores of the rows `qr` ([ROWS, BLOCK_D]) against regions j0 + offs_j, which of them
    are candidates (region <= the row's limit), and the regions."""
    j = j0 + offs_j
    kt = tl.load(
        k_base + j.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=(j < n)[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    s = tl.dot(qr, tl.trans(kt), input_precision=PREC)
    valid = row_ok[:, None] & (j[None, :] <= limit[:, None])
    return s, valid, j


@triton.jit
def _score_keys(qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """``_scores`` as sortable keys."""
    s, valid, j = _scores(qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM, PREC)
    return _sortable(s), valid, j


@triton.jit
def _unsortable(key):
    """The float32 of a ``_sortable`` key."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _popcount(x):
    """Set bits of each int64 in x (SWAR: no libdevice, so the interpreter runs it too). The
    arithmetic shifts are safe: each mask clears the bits a sign extension would fill."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def _expand_masks(
    mask_base,
    list_base,
    j0,
    n_steps,
    filled,
    CAP: tl.constexpr,
    RM: tl.constexpr,
    CH: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Append the regions of the bit masks MASKS [RM, CH] (bit c of row a, step t: region
    j0 + t*BLOCK_J + c collected) to the rows' candidate lists after their ``filled`` entries, as
    (0, -region) composites (the re-scoring gives them their keys); returns the new counts (a
    count over CAP flags the row; entries past CAP are not written)."""
    a = tl.arange(0, RM)
    t = tl.arange(0, CH)
    x = tl.load(mask_base + a[:, None] * CH + t[None, :], mask=(t < n_steps)[None, :], other=0)
    cnt = _popcount(x)
    pos = filled[:, None] + tl.cumsum(cnt, 1) - cnt  # each (row, step)'s first slot
    first = j0 + t * BLOCK_J
    for _ in range(0, tl.max(tl.max(cnt, 1), 0)):
        has = x != 0
        low = x & (-x)  # the lowest set bit
        region = first[None, :] + _popcount(low - 1)
        ok = has & (pos < CAP)
        tl.store(list_base + a[:, None] * CAP + pos, (2147483647 - region).to(tl.int64), mask=ok)
        pos += has.to(tl.int32)
        x = x ^ low
    return filled + tl.sum(cnt, 1)


@triton.jit
def _search_keys(
    qr,
    k_base,
    j0,
    n,
    limit,
    row_ok,
    offs_j,
    offs_d,
    i,
    delta,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
    FAULT: tl.constexpr,
):
    """The shallow search's keys: ``_score_keys``, or with FAULT (tests only) the scores moved
    by a fixed pseudo-random amount within +-delta of the row, as a search in another precision
    may round them."""
    s, valid, j = _scores(qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM, PREC)
    if FAULT:
        h = (i[:, None] * 7919 + j[None, :] * 104729) % 2001
        s = s + delta[:, None] * ((h - 1000).to(tl.float32) / 1000.0)
    return _sortable(s), valid, j


@triton.jit
def _indicator(N_DIMS: tl.constexpr, j: tl.constexpr):
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(x, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    """One bitonic step on the i-th innermost axis of the [2]*N_DIMS hypercube x. The partner
    is sum - x (exact in wrapping integer arithmetic), where ``tl.sort`` uses an xor-reduction
    that Triton's interpreter evaluates element by element in Python."""
    y = tl.sum(x, N_DIMS - 1 - i, keep_dims=True) - x
    return tl.where((x > y) != (flip ^ _indicator(N_DIMS, i)).to(tl.int1), y, x)


@triton.jit
def _sort_descending(x, N_DIMS: tl.constexpr, LOG_N: tl.constexpr):
    """Bitonic sort of an integer tensor of 2**N_DIMS elements along its last axis (2**LOG_N
    long), largest first: the network of ``tl.sort(x, descending=True)``."""
    h = tl.reshape(x, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_N + 1):
        for i in tl.static_range(stage):
            if stage < LOG_N:
                h = _compare_and_swap(h, _indicator(N_DIMS, stage), stage - 1 - i, N_DIMS)
            else:
                h = _compare_and_swap(h, 1, stage - 1 - i, N_DIMS)
    return tl.reshape(h, x.shape)


@triton.jit
def _program_scratch(LIST, TOPK, SEEN, n, LIST_SIZE: tl.constexpr, TOPK_SIZE: tl.constexpr):
    """This program's slices of the selection kernels' scratch: its candidate list, its top
    lists and its seen-stamps (``n`` regions)."""
    pid = tl.program_id(0).to(tl.int64)
    return LIST + pid * LIST_SIZE, TOPK + pid * TOPK_SIZE, SEEN + pid * n


@triton.jit
def _select_item(
    item, n, G, T, M, n_bhs, HS: tl.constexpr, HKV: tl.constexpr, CAUSAL: tl.constexpr, KV_MAJOR: tl.constexpr
):
    """Item (b, hs, g) -> (g, b*HS + hs, b, kv head, the block's first region s, its first voting
    row, the number of voting rows). Larger g first: by default across all heads (items g = G-1
    of every head, then G-2, ...); with KV_MAJOR within each (b, kv head) in turn (its group's
    heads at g = G-1, then G-2, ...), so that programs running at once read one kv head's
    key representatives and these stay in L2."""
    if KV_MAJOR:
        group: tl.constexpr = HS // HKV
        per_kv = G * group
        bkv = item // per_kv
        rest = item % per_kv
        g = G - 1 - rest // group
        b = bkv // HKV
        hkv = bkv % HKV
        bhs = b * HS + hkv * group + rest % group
    else:
        g = G - 1 - item // n_bhs
        bhs = item % n_bhs
        b = bhs // HS
        hkv = (bhs % HS) // (HS // HKV)
    s = T + g * M
    if CAUSAL:
        first_row = s - M
        n_rows = M
    else:
        first_row = s
        n_rows = tl.minimum(M, n - s)
    return g, bhs, b, hkv, s, first_row, n_rows


@triton.jit
def _voting_rows(
    q_base,
    s,
    first_row,
    n_rows,
    r0,
    offs_d,
    M,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Voting rows r0 .. r0 + ROWS of the block starting at region s (spec step 6): which are
    rows, their regions i, the last region each may pick (-1 for none), one past the last
    candidate any of them may pick, and their representatives ([ROWS, BLOCK_D], zero past D)."""
    a = r0 + tl.arange(0, ROWS)
    row_ok = a < n_rows
    i = first_row + a
    if CAUSAL:
        limit = tl.where(row_ok, s - 1, -1)
        j_end = s
    else:
        limit = tl.where(row_ok, i - M, -1)
        j_end = first_row + tl.minimum(r0 + ROWS, n_rows) - M
    qr = tl.load(
        q_base + i.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    return row_ok, i, limit, j_end, qr


@triton.jit
def _merge_ranks(
    topk_base, seen_base, out_base, stamp, n_rows, n, S, max_rank, KP: tl.constexpr, RM: tl.constexpr
):
    """Spec step 8 on the rows' top lists TOPK [RM, KP] (rank p of row a at a*KP + p; entries
    >= n are absent): walk rank by rank (every row's p-th region, rows in order), dropping
    regions seen before (SEEN == stamp) or earlier in the same rank, until S are found or
    ``max_rank`` ranks are read. Returns how many were found."""
    offs_rm = tl.arange(0, RM)
    row_ok = offs_rm < n_rows
    found = 0
    p = 0
    while (found < S) & (p < max_rank):
        col = tl.load(topk_base + offs_rm * KP + p, mask=row_ok, other=-1)
        ok = row_ok & (col >= 0) & (col < n)
        earlier = (col[:, None] == col[None, :]) & (offs_rm[None, :] < offs_rm[:, None]) & ok[None, :]
        seen = tl.load(seen_base + col, mask=ok, other=0) == stamp
        new = ok & ~seen & (tl.max(earlier.to(tl.int32), 1) == 0)
        slot = found + tl.cumsum(new.to(tl.int32), 0) - 1
        tl.store(out_base + slot, col, mask=new & (slot < S))
        tl.store(seen_base + col, tl.zeros([RM], dtype=tl.int32) + stamp, mask=new)
        found += tl.sum(new.to(tl.int32), 0)
        p += 1
        tl.debug_barrier()
    return found


@triton.jit(do_not_specialize=SELECT_COUNTS)
def ms_select_kernel(
    QREP,
    KREP,
    OUT,
    LIST,
    TOPK,
    SEEN,
    ITEMS,
    COUNT,
    n,
    G,
    T,
    M,
    S,
    n_bhs,
    n_items,
    HS: tl.constexpr,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ITEMS: tl.constexpr,
    ROWS: tl.constexpr,
    RM: tl.constexpr,
    KP: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BINS: tl.constexpr,
    SORT_ROWS: tl.constexpr,
    PREC: tl.constexpr,
    KV_MAJOR: tl.constexpr,
):
    """Grid (P,): program p selects the regions of items p, p + P, ...; item = one (b, hs, g),
    larger g (more candidates) first (with HAS_ITEMS, the first COUNT[0] items listed in ITEMS
    [n_items] int32: the shallow selection's fallback). Spec steps 5-8, never writing the score matrix:

    1. per tile of ROWS voting rows, the row's candidates are scored tile by tile (BLOCK_J
       regions, recomputed on every pass) as int32 keys ordered like the float scores;
    2. a threshold per row by BINS-way bisection over the key range: the smallest key `lo`
       with K <= count(key >= lo) <= CAP, where K = S. If one key value straddles the window
       (count(>= v) > CAP but count(> v) < K: a large tie), that value's first occurrences in
       region order fill the list up to K, as the tie rule (smaller region first) wants;
    3. the row's surviving regions go to LIST as (key, -region) int64 composites, are sorted
       descending (score, then smaller region first) and the first K land in TOPK;
    4. the rank-first merge walks TOPK column by column (rank p of every row, rows in order),
       dropping regions seen before (SEEN) or earlier in the same column, until S are found.
    """
    CAP_DIMS: tl.constexpr = CAP.bit_length() - 1
    SORT_DIMS: tl.constexpr = CAP_DIMS + SORT_ROWS.bit_length() - 1
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    list_base, topk_base, seen_base = _program_scratch(LIST, TOPK, SEEN, n, ROWS * CAP, RM * KP)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    offs_b = tl.arange(0, BINS)
    offs_c = tl.arange(0, CAP)
    if HAS_ITEMS:  # the live entries of the list, counted on the device (no host sync)
        n_live = tl.load(COUNT)
    else:
        n_live = n_items
    for it in range(pid, n_live, n_prog):
        if HAS_ITEMS:
            item = tl.load(ITEMS + it)
        else:
            item = it
        g, bhs, b, hkv, s, first_row, n_rows = _select_item(
            item, n, G, T, M, n_bhs, HS, HKV, CAUSAL, KV_MAJOR
        )
        q_base = QREP + bhs.to(tl.int64) * n * HEAD_DIM
        k_base = KREP + (b * HKV + hkv).to(tl.int64) * n * HEAD_DIM

        for r0 in range(0, n_rows, ROWS):
            row_ok, i, limit, j_end, qr = _voting_rows(
                q_base, s, first_row, n_rows, r0, offs_d, M, ROWS, HEAD_DIM, CAUSAL
            )

            # Pass 1: the key range of every row.
            k_min = tl.zeros([ROWS], dtype=tl.int32) + 2147483647
            k_max = tl.zeros([ROWS], dtype=tl.int32) - 2147483647
            for j0 in range(0, j_end, BLOCK_J):
                key, valid, _ = _score_keys(qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM, PREC)
                k_min = tl.minimum(k_min, tl.min(tl.where(valid, key, 2147483647), 1))
                k_max = tl.maximum(k_max, tl.max(tl.where(valid, key, -2147483647), 1))
            lo = k_min.to(tl.int64)
            hi = k_max.to(tl.int64) + 1
            c_lo = limit + 1  # count(key >= lo): every candidate
            c_hi = tl.zeros([ROWS], dtype=tl.int32)  # count(key >= hi)
            done = c_lo <= CAP

            # Pass 2..: shrink [lo, hi) BINS-fold per pass, keeping c_lo >= S > c_hi.
            while tl.min(done.to(tl.int32), 0) == 0:
                span = hi - lo
                thr = lo[:, None] + (span[:, None] * offs_b[None, :] + BINS - 1) // BINS  # [ROWS, BINS]
                thr32 = thr.to(tl.int32)
                counts = tl.zeros([ROWS, BINS], dtype=tl.int32)
                for j0 in range(0, j_end, BLOCK_J):
                    key, valid, _ = _score_keys(
                        qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM, PREC
                    )
                    above = (key[:, :, None] >= thr32[:, None, :]) & valid[:, :, None]
                    counts += tl.sum(above.to(tl.int32), 1)
                enough = counts >= S
                new_lo = tl.max(tl.where(enough, thr, lo[:, None]), 1)
                new_c_lo = tl.min(tl.where(enough, counts, 2147483647), 1)
                new_hi = tl.min(tl.where(enough, hi[:, None], thr), 1)
                new_c_hi = tl.max(tl.where(enough, c_hi[:, None], counts), 1)
                lo = tl.where(done, lo, new_lo)
                c_lo = tl.where(done, c_lo, new_c_lo)
                hi = tl.where(done, hi, new_hi)
                c_hi = tl.where(done, c_hi, new_c_hi)
                done = done | (c_lo <= CAP) | (hi - lo <= 1)

            # A tie straddling the window: keys > lo all, then key == lo while the quota lasts.
            tie = c_lo > CAP
            cut = tl.where(tie, lo, lo - 1).to(tl.int32)
            quota = tl.where(tie, S - c_hi, 0)

            for c0 in range(0, CAP, BLOCK_J):
                cols = c0 + offs_j
                tl.store(
                    list_base + tl.arange(0, ROWS)[:, None] * CAP + cols[None, :],
                    tl.zeros([ROWS, BLOCK_J], dtype=tl.int64) - 9223372036854775807 - 1,
                    mask=(cols < CAP)[None, :],
                )
            tl.debug_barrier()
            filled = tl.zeros([ROWS], dtype=tl.int32)
            ties = tl.zeros([ROWS], dtype=tl.int32)
            for j0 in range(0, j_end, BLOCK_J):
                key, valid, j = _score_keys(qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, HEAD_DIM, PREC)
                eq = (valid & (key == cut[:, None])).to(tl.int32)
                tie_rank = ties[:, None] + tl.cumsum(eq, 1) - 1
                take = valid & ((key > cut[:, None]) | ((eq > 0) & (tie_rank < quota[:, None])))
                pos = filled[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
                comp = key.to(tl.int64) * 4294967296 + (2147483647 - j[None, :]).to(tl.int64)
                tl.store(list_base + tl.arange(0, ROWS)[:, None] * CAP + pos, comp, mask=take)
                filled += tl.sum(take.to(tl.int32), 1)
                ties += tl.sum(eq, 1)
            tl.debug_barrier()

            for rs in range(0, ROWS // SORT_ROWS):
                rows = rs * SORT_ROWS + tl.arange(0, SORT_ROWS)
                comp = tl.load(list_base + rows[:, None] * CAP + offs_c[None, :])
                comp = _sort_descending(comp, SORT_DIMS, CAP_DIMS)
                region = (2147483647 - (comp & 0xFFFFFFFF)).to(tl.int32)
                keep = ((r0 + rows) < n_rows)[:, None] & (offs_c[None, :] < S)
                tl.store(topk_base + (r0 + rows)[:, None] * KP + offs_c[None, :], region, mask=keep)
            tl.debug_barrier()

        # Rank-first merge with first-occurrence de-duplication.
        out_base = OUT + (bhs.to(tl.int64) * G + g) * S
        _merge_ranks(topk_base, seen_base, out_base, item + 1, n_rows, n, S, S, KP, RM)


@triton.jit
def _sort_rows_desc(base, stride, width_dims: tl.constexpr, SORT_ROWS: tl.constexpr, WIDTH: tl.constexpr, r0):
    """Load rows r0 .. r0 + SORT_ROWS of a [*, stride] integer scratch (WIDTH columns) and
    return them sorted descending along the row."""
    rows = r0 + tl.arange(0, SORT_ROWS)
    cols = tl.arange(0, WIDTH)
    x = tl.load(base + rows[:, None] * stride + cols[None, :])
    return _sort_descending(x, width_dims + SORT_ROWS.bit_length() - 1, width_dims)


@triton.jit
def _columns4(x, SHAPE2: tl.constexpr):
    """The four columns of x [..., 4] in order (x reshaped to SHAPE2 = [..., 2, 2]): split in
    registers, no arithmetic."""
    even, odd = tl.split(tl.reshape(x, SHAPE2))  # columns (0, 2) and (1, 3)
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _rescored_rows(
    list_base,
    q_base,
    k_base,
    first_row,
    n_rows,
    r0,
    CAP: tl.constexpr,
    CAP_DIMS: tl.constexpr,
    SORT_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    COLS: tl.constexpr,
):
    """Rows r0 .. r0 + SORT_ROWS of the collected lists with every present candidate re-scored in
    float32 (the same (key, -region) composites), sorted descending.

    A score is summed as the ieee ``tl.dot`` of the search kernels sums it: one fused multiply-add
    per column, d = 0 .. D-1 in order, from zero. So a re-scored score is bit for bit the score
    the exact (ieee) selection ranks by, and re-scoring changes no index of that selection.
    COLS = 1 reads one column of every candidate per step; COLS = 4 reads four contiguous columns
    per lane (16 bytes) and splits them in registers (``_columns4``), the same FMAs in the same
    order (columns past D read as zeros: fma(0, 0, acc) = acc)."""
    rows = r0 + tl.arange(0, SORT_ROWS)
    cols = tl.arange(0, CAP)
    comp = tl.load(list_base + rows[:, None] * CAP + cols[None, :])
    present = comp != -9223372036854775807 - 1
    region = tl.where(present, 2147483647 - (comp & 0xFFFFFFFF), 0)
    q_rows = q_base + (first_row + rows).to(tl.int64) * HEAD_DIM
    k_rows = k_base + region.to(tl.int64) * HEAD_DIM
    row_ok = rows < n_rows
    acc = tl.zeros([SORT_ROWS, CAP], dtype=tl.float32)
    if COLS == 1:
        for d in range(HEAD_DIM):
            qv = tl.load(q_rows + d, mask=row_ok, other=0.0)
            kv = tl.load(k_rows + d, mask=present, other=0.0)
            acc = tl.fma(qv[:, None], kv, acc)
    else:
        c4 = tl.arange(0, 4)
        for d0 in range(0, HEAD_DIM, 4):
            dd = d0 + c4
            qv = tl.load(
                q_rows[:, None] + dd[None, :], mask=row_ok[:, None] & (dd < HEAD_DIM)[None, :], other=0.0
            )
            kv = tl.load(
                k_rows[:, :, None] + dd[None, None, :],
                mask=present[:, :, None] & (dd < HEAD_DIM)[None, None, :],
                other=0.0,
            )
            q0, q1, q2, q3 = _columns4(qv, [SORT_ROWS, 2, 2])
            k0, k1, k2, k3 = _columns4(kv, [SORT_ROWS, CAP, 2, 2])
            acc = tl.fma(q0[:, None], k0, acc)
            acc = tl.fma(q1[:, None], k1, acc)
            acc = tl.fma(q2[:, None], k2, acc)
            acc = tl.fma(q3[:, None], k3, acc)
    comp = tl.where(present, _sortable(acc).to(tl.int64) * 4294967296 + (2147483647 - region), comp)
    return _sort_descending(comp, CAP_DIMS + SORT_ROWS.bit_length() - 1, CAP_DIMS)


@triton.jit(do_not_specialize=SELECT_COUNTS)
def ms_select_shallow_kernel(
    QREP,
    KREP,
    OUT,
    FLAG,
    LIST,
    TOPK,
    SEEN,
    MASKS,
    QNORM,
    KMAX,
    ITEMS,
    COUNT,
    score_err,
    n,
    G,
    T,
    M,
    S,
    n_bhs,
    n_items,
    HS: tl.constexpr,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ITEMS: tl.constexpr,
    RM: tl.constexpr,
    K: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_J: tl.constexpr,
    SORT_ROWS: tl.constexpr,
    PREC: tl.constexpr,
    RESCORE: tl.constexpr,
    RESCORE_COLS: tl.constexpr,
    FAULT: tl.constexpr,
    KV_MAJOR: tl.constexpr,
    MASK_STEPS: tl.constexpr,
):
    """The shallow exact selection. Grid (P,), persistent over items (b, hs, g) like
    ``ms_select_kernel`` (with HAS_ITEMS, the first COUNT[0] items listed in ITEMS [n_items] int32,
    FLAG then indexed like ITEMS: the retry of the items a shallower run flagged); all RM >= m voting rows
    of a block are scored together.

    The merge (spec step 8) reads a row's list rank by rank, and a block's S regions are
    normally found within the first few ranks of every row. So each row keeps only its K best
    candidates (score descending, smaller region first), and the block is exact whenever the
    rank-first walk over those K ranks finds S distinct regions: every region with a rank < K in
    some row comes before every region without one, and those are exactly what the walk sees.
    Otherwise FLAG[item] = 1 and the caller redoes the item with the full-depth kernel.

    1. Pass 1 scores the rows against every candidate, BLOCK_J regions at a time, keeping per
       row and lane c the largest key of the regions j = c (mod BLOCK_J). The K-th largest of
       these BLOCK_J lane maxima (K distinct regions) is a lower bound theta on the row's K-th
       best key.
    2. Pass 2 recomputes the scores and appends every candidate with key >= theta (K or more:
       typically 1.1-1.5 K) to the row's list of CAP (key, -region) composites, in region order;
       a row with more than CAP flags the item. With MASK_STEPS > 0 (RESCORE only) a step keeps
       one int64 bit mask per row instead (a row reduction: no prefix sum and no scatter per
       step, which need the tile in another layout, through shared memory), and every
       MASK_STEPS steps ``_expand_masks`` appends the masks' regions to the lists, keyless:
       the re-scoring computes every key. The list's order is not the same; its sorted
       contents, hence the indices, are.
    3. Each list is sorted descending; its first K regions are the row's top list (TOPK).
    4. The rank-first merge over K ranks (``_merge_ranks``); fewer than S found flags the item.

    With RESCORE the two passes may round differently from the ranking (PREC "tf32x3" or
    "tf32": tensor cores): a score of row i then lies within delta_i = score_err * |qbar_i| *
    max_j |kbar_j| (QNORM [B*HS, n], KMAX [B*HKV]) of its float32 value, so the bound is lowered
    by 2 delta_i (every candidate whose float32 score reaches the K-th best is collected) and the
    collected candidates are re-scored in float32 before the sort, summed as the ieee dot sums
    (``_rescored_rows``): the top K of the ieee selection's own scores, whatever PREC rounded.
    """
    CAP_DIMS: tl.constexpr = CAP.bit_length() - 1
    J_DIMS: tl.constexpr = BLOCK_J.bit_length() - 1
    INT32_MIN: tl.constexpr = -2147483648
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    list_base, topk_base, seen_base = _program_scratch(LIST, TOPK, SEEN, n, RM * CAP, RM * K)
    tl.static_assert(MASK_STEPS == 0 or (RESCORE and BLOCK_J <= 64), "masks: re-scored, <= 64 lanes")
    mask_base = MASKS + pid.to(tl.int64) * (RM * MASK_STEPS)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, CAP)
    lane_bit = tl.full([BLOCK_J], 1, tl.int64) << offs_j.to(tl.int64)
    a = tl.arange(0, RM)
    if HAS_ITEMS:  # the live entries of the list, counted on the device (no host sync)
        n_live = tl.load(COUNT)
    else:
        n_live = n_items
    for it in range(pid, n_live, n_prog):
        if HAS_ITEMS:
            item = tl.load(ITEMS + it)
        else:
            item = it
        g, bhs, b, hkv, s, first_row, n_rows = _select_item(
            item, n, G, T, M, n_bhs, HS, HKV, CAUSAL, KV_MAJOR
        )
        q_base = QREP + bhs.to(tl.int64) * n * HEAD_DIM
        k_base = KREP + (b * HKV + hkv).to(tl.int64) * n * HEAD_DIM
        row_ok, i, limit, j_end, qr = _voting_rows(
            q_base, s, first_row, n_rows, 0, offs_d, M, RM, HEAD_DIM, CAUSAL
        )

        if RESCORE or FAULT:
            qn = tl.load(QNORM + bhs.to(tl.int64) * n + i, mask=row_ok, other=0.0)
            delta = score_err * qn * tl.load(KMAX + b * HKV + hkv)
        else:
            delta = tl.zeros([RM], dtype=tl.float32)

        # Pass 1: lane maxima, then theta = the K-th largest of them (via LIST as scratch).
        lanes = tl.zeros([RM, BLOCK_J], dtype=tl.int32) + INT32_MIN
        for j0 in range(0, j_end, BLOCK_J):
            key, valid, _ = _search_keys(
                qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, i, delta, HEAD_DIM, PREC, FAULT
            )
            lanes = tl.maximum(lanes, tl.where(valid, key, INT32_MIN))
        tl.store(list_base + a[:, None] * CAP + offs_j[None, :], lanes.to(tl.int64))
        tl.debug_barrier()
        for r0 in range(0, RM, SORT_ROWS):
            srt = _sort_rows_desc(list_base, CAP, J_DIMS, SORT_ROWS, BLOCK_J, r0)
            theta = tl.sum(tl.where(offs_j[None, :] == K - 1, srt, 0), 1)  # [SORT_ROWS]
            tl.store(topk_base + (r0 + tl.arange(0, SORT_ROWS)) * K, theta.to(tl.int32))
        tl.debug_barrier()
        theta = tl.load(topk_base + a * K)
        if RESCORE:  # lowered by 2 delta: the search's scores are within delta of float32's
            theta = tl.where(theta == INT32_MIN, INT32_MIN, _sortable(_unsortable(theta) - 2.0 * delta))
        tl.debug_barrier()

        # Pass 2: every candidate at or above theta, in region order.
        tl.store(
            list_base + a[:, None] * CAP + offs_c[None, :],
            tl.zeros([RM, CAP], dtype=tl.int64) - 9223372036854775807 - 1,
        )
        tl.debug_barrier()
        filled = tl.zeros([RM], dtype=tl.int32)
        if MASK_STEPS > 0:
            # Per row and step one int64 bit mask of the candidates taken (a row reduction, no
            # scan, no scatter in the loop); every MASK_STEPS steps the masks are expanded into
            # the lists. The composites carry no key: re-scoring gives them theirs.
            for c0 in range(0, j_end, BLOCK_J * MASK_STEPS):
                c_end = tl.minimum(j_end, c0 + BLOCK_J * MASK_STEPS)
                for j0 in range(c0, c_end, BLOCK_J):
                    key, valid, _ = _search_keys(
                        qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, i, delta, HEAD_DIM, PREC, FAULT
                    )
                    take = valid & (key >= theta[:, None])
                    bits = tl.sum(tl.where(take, lane_bit[None, :], 0), 1)  # distinct bits: sum = or
                    tl.store(mask_base + a * MASK_STEPS + (j0 - c0) // BLOCK_J, bits)
                tl.debug_barrier()
                filled = _expand_masks(
                    mask_base,
                    list_base,
                    c0,
                    tl.cdiv(c_end - c0, BLOCK_J),
                    filled,
                    CAP,
                    RM,
                    MASK_STEPS,
                    BLOCK_J,
                )
                tl.debug_barrier()
        else:
            for j0 in range(0, j_end, BLOCK_J):
                key, valid, j = _search_keys(
                    qr, k_base, j0, n, limit, row_ok, offs_j, offs_d, i, delta, HEAD_DIM, PREC, FAULT
                )
                take = valid & (key >= theta[:, None])
                pos = filled[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
                comp = key.to(tl.int64) * 4294967296 + (2147483647 - j[None, :]).to(tl.int64)
                tl.store(list_base + a[:, None] * CAP + pos, comp, mask=take & (pos < CAP))
                filled += tl.sum(take.to(tl.int32), 1)
        overflow = tl.max((filled > CAP).to(tl.int32), 0)
        tl.debug_barrier()

        # Each row's top K, best first (absent entries decode to a region >= n).
        for r0 in range(0, RM, SORT_ROWS):
            if RESCORE:
                srt = _rescored_rows(
                    list_base,
                    q_base,
                    k_base,
                    first_row,
                    n_rows,
                    r0,
                    CAP,
                    CAP_DIMS,
                    SORT_ROWS,
                    HEAD_DIM,
                    RESCORE_COLS,
                )
            else:
                srt = _sort_rows_desc(list_base, CAP, CAP_DIMS, SORT_ROWS, CAP, r0)
            region = (2147483647 - (srt & 0xFFFFFFFF)).to(tl.int32)
            rows = r0 + tl.arange(0, SORT_ROWS)
            tl.store(topk_base + rows[:, None] * K + offs_c[None, :], region, mask=(offs_c < K)[None, :])
        tl.debug_barrier()

        out_base = OUT + (bhs.to(tl.int64) * G + g) * S
        found = _merge_ranks(topk_base, seen_base, out_base, item + 1, n_rows, n, S, K, K, RM)
        tl.store(FLAG + it, ((found < S) | (overflow > 0)).to(tl.int32))
