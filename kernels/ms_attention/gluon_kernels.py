"""A warp-specialized MS forward for Hopper, written in Triton's Gluon dialect.

The same function as ``triton_kernels.ms_attn_fwd_kernel`` without RoPE on the fly (whole rows,
``pe="pre"``): each program is one query tile of ``2 * 64`` rows of one head, and its key set is
the block's selected regions (read by index, never gathered into a copy) and then its own
segment up to the tile, causally. What differs is the schedule. The Triton kernel's eight warps
load, multiply and take the softmax in lockstep, meeting at a barrier every key step (Nsight
Compute, session 13: barrier and wait stalls 39-53% of the samples, one program per SM). Here:

- a *load* partition (``LOAD_WARPS`` warps, few registers) computes each step's key rows (region
  index -> token) and issues ``cp.async`` copies of their k and v rows into a ring of ``STAGES``
  shared-memory slots, each copy arriving on the slot's *ready* mbarrier when it lands;
- two *consumer* partitions, one warpgroup each, own 64 query rows apiece (q in shared memory),
  and per step wait for the slot, fence (cp.async writes through the generic proxy, wgmma reads
  through the async proxy), score with one wgmma, take the online softmax in registers,
  accumulate p v with a second wgmma (p from registers), and release the slot on its *empty*
  mbarrier. The two consumers never wait for each other, so one's softmax overlaps the other's
  GEMMs (FlashAttention-3's "ping-pong", left to the warp schedulers).

Rows outside the key set are never read: a padding region or a key past the segment end reads
token 0 of the head (a valid row) and is masked to -inf in the scores, so no NaN can enter the
sums. Steps: ``n_sel`` over the selection (the last one masked when partial), then the own
segment from its first token in steps of BLOCK_N, unmasked up to the tile's first row and masked
(causally and at the segment end) from there. BLOCK_N divides 128 so that every tile's own
segment steps start at the segment start.

Compiled for sm_90 only (Gluon has no interpreter); ``triton_impl.ms_attn_fwd`` runs it with
``LaunchConfig.fwd_gluon`` on a CUDA device of compute capability 9.x.

The module also holds the backward's kernels on the same plan: ``ms_attn_bwd_dq_ws_kernel`` (dq on
the forward's schedule, ``dq_gluon``) and ``ms_attn_bwd_dkv_sel_ws_kernel`` (dk, dv of a block's
selected keys, ``dkv_gluon``; optionally the rows' lse and delta through the ring,
``gluon_dkv_row_stats``, and dq added inside by TMA reductions, ``fused_dq``). kernels/README.md
describes each and what it measured.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

ROWS = gl.constexpr(64)
"""Query rows per consumer warpgroup (one wgmma's M)."""
# Names that moved between Triton 3.6 (the GPU image's) and 3.9.
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
if hasattr(tma, "async_atomic_add"):
    _tma_add = tma.async_atomic_add
else:  # Triton 3.6 builds the op (cp.reduce.async.bulk.tensor) but its Gluon does not name it
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin

    @_builtin
    def _tma_add(tensor_desc, coord, src, _semantic=None):
        """Add the shared-memory tile `src` into the global tile of `tensor_desc` at `coord` (TMA)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        kind = _ir.DESCRIPTOR_REDUCE_KIND.ADD
        _semantic.builder.create_async_tma_reduce(kind, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _slot(i, STAGES: gl.constexpr):
    """Step i -> (its ring slot, the parity of the slot's current use)."""
    return i % STAGES, (i // STAGES) & 1


@gluon.jit
def _load_step(
    K, V, k_bufs, v_bufs, ready, empty, i, tok, kv_off, kv_stride, offs_d, STAGES: gl.constexpr,
    ARRIVE: gl.constexpr = True,
):  # fmt: skip
    """Copy the k and v rows `tok` ([BLOCK_N]) of step i into its slot once the slot is free; returns
    the slot. Without ARRIVE the caller adds its own copies to the slot, then arrives."""
    s, phase = _slot(i, STAGES)
    mbarrier.wait(empty.index(s), phase ^ 1)  # a fresh barrier passes parity 1 at once
    rows = kv_off + tok.to(gl.int64)[:, None] * kv_stride + offs_d[None, :]
    _cp_async(k_bufs.index(s), K + rows)
    _cp_async(v_bufs.index(s), V + rows)
    if ARRIVE:
        # Every load thread arrives once its own copies have landed (count = load threads).
        async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
    return s


@gluon.jit
def _load_partition(
    K,
    V,
    sel,
    k_bufs,
    v_bufs,
    ready,
    empty,
    kv_off,
    kv_stride,
    L,
    W,
    S,
    sel_len,
    seg_lo,
    n_seg,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
):
    """The producer: the selection's steps, then the own segment's."""
    VEC: gl.constexpr = 8  # 16-byte copies of bf16/fp16
    TD: gl.constexpr = HEAD_DIM // VEC
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TD, TD], [LOAD_WARPS, 1], [1, 0])
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    n_sel = gl.cdiv(sel_len, BLOCK_N)
    for i in range(n_sel):
        flat = i * BLOCK_N + offs_n
        rank = flat // W
        region = gl.load(sel + rank, mask=rank < S, other=-1)
        tok = gl.where(region >= 0, region * W + (flat - rank * W), 0)
        _load_step(K, V, k_bufs, v_bufs, ready, empty, i, tok, kv_off, kv_stride, offs_d, STAGES)
    for j in range(n_seg):
        tok = seg_lo + j * BLOCK_N + offs_n
        tok = gl.where(tok < L, tok, 0)
        _load_step(K, V, k_bufs, v_bufs, ready, empty, n_sel + j, tok, kv_off, kv_stride, offs_d, STAGES)


@gluon.jit
def _issue_scores(q_buf, k_bufs, ready, i, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, s_mma: gl.constexpr):
    """Issue step i's scores q k^T (asynchronous) once its slot has landed; returns them and the
    slot."""
    s, phase = _slot(i, STAGES)
    mbarrier.wait(ready.index(s), phase)
    fence_async_shared()
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_mma)
    return warpgroup_mma(q_buf, k_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True), s


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, o_mma: gl.constexpr):
    """p as the register operand of the p v GEMM."""
    return gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2))


@gluon.jit
def _consume_step(
    acc,
    m_i,
    l_i,
    q_buf,
    k_bufs,
    v_bufs,
    ready,
    empty,
    i,
    allowed,
    qk_scale,
    MASKED: gl.constexpr,
    STAGES: gl.constexpr,
    BLOCK_N: gl.constexpr,
    s_mma: gl.constexpr,
    o_mma: gl.constexpr,
):
    """One online-softmax step of a consumer over slot i's keys; `allowed` [ROWS, BLOCK_N]."""
    qk, s = _issue_scores(q_buf, k_bufs, ready, i, STAGES, BLOCK_N, s_mma)
    v = v_bufs.index(s)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    p, alpha, m_new, l_i = _online_softmax(qk, m_i, l_i, allowed, qk_scale, MASKED)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_mma))[:, None]
    p = _p_operand(p, v.dtype, o_mma)
    acc = warpgroup_mma(p, v, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(empty.index(s), count=1)
    return acc, m_new, l_i


@gluon.jit
def _online_softmax(qk, m_i, l_i, allowed, qk_scale, MASKED: gl.constexpr):
    """One step's probabilities (unnormalised, log2 domain), the accumulator's rescale factor and
    the rows' new max and sum."""
    if MASKED:
        qk = gl.where(allowed, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _take_turn(turn, k, PART: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, wait until the other consumer has issued its GEMMs of turn k - 1 (consumer 0)
    or k (consumer 1): the two consumers issue in turns, so one's softmax runs under the other's
    GEMMs instead of both waiting on the tensor cores at once (FlashAttention-3's ping-pong). A
    fresh barrier passes parity 1 at once: consumer 0 goes first."""
    if PINGPONG:
        mbarrier.wait(turn.index(PART), (k & 1) ^ (1 - PART))


@gluon.jit
def _pass_turn(turn, PART: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, hand the turn to the other consumer once this one's GEMMs are issued."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - PART), count=1)


@gluon.jit
def _consume_step_overlapped(
    acc,
    m_i,
    l_i,
    p_prev,
    q_buf,
    k_bufs,
    v_bufs,
    ready,
    empty,
    i,
    allowed,
    qk_scale,
    turn,
    MASKED: gl.constexpr,
    STAGES: gl.constexpr,
    BLOCK_N: gl.constexpr,
    s_mma: gl.constexpr,
    o_mma: gl.constexpr,
    PART: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Step i (>= 1) overlapped with step i - 1 (FlashAttention-3's intra-warpgroup pipelining):
    issue step i's scores, then step i - 1's p v (`p_prev`, its slot's v), wait for the scores
    only and take step i's softmax while p v is still on the tensor cores; then release step
    i - 1's slot and rescale. Returns step i's p as the next step's operand. With PINGPONG the
    two GEMMs are issued in this consumer's turn i (``_take_turn``)."""
    prev = (i - 1) % STAGES
    _take_turn(turn, i, PART, PINGPONG)
    qk, _ = _issue_scores(q_buf, k_bufs, ready, i, STAGES, BLOCK_N, s_mma)
    acc = warpgroup_mma(p_prev, v_bufs.index(prev), acc, is_async=True)
    _pass_turn(turn, PART, PINGPONG)
    qk = warpgroup_mma_wait(1, deps=(qk,))  # in order: the scores are done, p v may still run
    p, alpha, m_new, l_i = _online_softmax(qk, m_i, l_i, allowed, qk_scale, MASKED)
    acc, p_prev = warpgroup_mma_wait(0, deps=(acc, p_prev))
    mbarrier.arrive(empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_mma))[:, None]
    return acc, m_new, l_i, _p_operand(p, p_prev.dtype, o_mma)


@gluon.jit
def _step(
    acc, m_i, l_i, p_op, q_buf, k_bufs, v_bufs, ready, empty, i, allowed, qk_scale, turn,
    MASKED: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, s_mma: gl.constexpr,
    o_mma: gl.constexpr, PART: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """Step i: ``_consume_step`` (`p_op` passed through), or with OVERLAP
    ``_consume_step_overlapped`` (`p_op` is step i - 1's p, then step i's)."""
    if OVERLAP:
        acc, m_i, l_i, p_op = _consume_step_overlapped(
            acc, m_i, l_i, p_op, q_buf, k_bufs, v_bufs, ready, empty, i, allowed, qk_scale, turn, MASKED,
            STAGES, BLOCK_N, s_mma, o_mma, PART, PINGPONG,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _consume_step(
            acc, m_i, l_i, q_buf, k_bufs, v_bufs, ready, empty, i, allowed, qk_scale, MASKED, STAGES, BLOCK_N,
            s_mma, o_mma,
        )  # fmt: skip
    return acc, m_i, l_i, p_op


@gluon.jit
def _steps(
    acc,
    m_i,
    l_i,
    q_buf,
    k_bufs,
    v_bufs,
    ready,
    empty,
    rows,
    offs_n,
    none,
    lo,
    hi,
    sel_len,
    seg_lo,
    qk_scale,
    turn,
    STAGES: gl.constexpr,
    BLOCK_N: gl.constexpr,
    s_mma: gl.constexpr,
    o_mma: gl.constexpr,
    PART: gl.constexpr,
    OVERLAP: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """The consumer's steps: the selection's whole steps, its partial last step, the own segment
    before the tile, the diagonal steps. With OVERLAP each step's softmax runs under the previous
    step's p v (``_consume_step_overlapped``): the key set's first step goes alone (scores,
    softmax; a general mask, the selection's or the own segment's), the loops start at step 1, and
    the last step's p v follows them; with PINGPONG every issue takes a turn (step i's in turn i,
    the last p v in turn n_all)."""
    whole = sel_len // BLOCK_N
    n_sel = gl.cdiv(sel_len, BLOCK_N)
    n_before = (lo - seg_lo) // BLOCK_N
    n_all = n_sel + n_before + gl.cdiv(hi - lo, BLOCK_N)
    p_op = 0  # plain steps carry no p
    first = 0  # the first step the loops take
    if OVERLAP:
        tok = seg_lo - n_sel * BLOCK_N + offs_n  # step 0's token where it is an own-segment step
        own_ok = (tok[None, :] <= rows[:, None]) & (tok[None, :] < hi)
        mask0 = gl.where(n_sel > 0, (offs_n[None, :] < sel_len) & none & (rows[:, None] >= 0), own_ok)
        _take_turn(turn, 0, PART, PINGPONG)
        qk, _ = _issue_scores(q_buf, k_bufs, ready, 0, STAGES, BLOCK_N, s_mma)
        _pass_turn(turn, PART, PINGPONG)
        qk = warpgroup_mma_wait(0, deps=(qk,))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, mask0, qk_scale, True)
        p_op = _p_operand(p, k_bufs.dtype, o_mma)  # acc is still 0: no rescale
        first = 1
    for i in range(first, whole):
        acc, m_i, l_i, p_op = _step(
            acc, m_i, l_i, p_op, q_buf, k_bufs, v_bufs, ready, empty, i, none, qk_scale, turn, False, STAGES,
            BLOCK_N, s_mma, o_mma, PART, OVERLAP, PINGPONG,
        )  # fmt: skip
    for i in range(
        gl.maximum(whole, first) if OVERLAP else whole, n_sel
    ):  # the selection's partial last step
        allowed = (i * BLOCK_N + offs_n[None, :]) < sel_len
        acc, m_i, l_i, p_op = _step(
            acc, m_i, l_i, p_op, q_buf, k_bufs, v_bufs, ready, empty, i, allowed, qk_scale, turn, True,
            STAGES, BLOCK_N, s_mma, o_mma, PART, OVERLAP, PINGPONG,
        )  # fmt: skip
    first_own = gl.maximum(first - n_sel, 0) if OVERLAP else 0  # 1 where the overlap's step 0 was own
    for j in range(first_own, n_before):  # own segment before the tile
        acc, m_i, l_i, p_op = _step(
            acc, m_i, l_i, p_op, q_buf, k_bufs, v_bufs, ready, empty, n_sel + j, none, qk_scale, turn, False,
            STAGES, BLOCK_N, s_mma, o_mma, PART, OVERLAP, PINGPONG,
        )  # fmt: skip
    for j in range(gl.maximum(n_before, first_own) if OVERLAP else n_before, n_all - n_sel):  # diagonal
        tok = seg_lo + j * BLOCK_N + offs_n
        allowed = (tok[None, :] <= rows[:, None]) & (tok[None, :] < hi)
        acc, m_i, l_i, p_op = _step(
            acc, m_i, l_i, p_op, q_buf, k_bufs, v_bufs, ready, empty, n_sel + j, allowed, qk_scale, turn,
            True, STAGES, BLOCK_N, s_mma, o_mma, PART, OVERLAP, PINGPONG,
        )  # fmt: skip
    if OVERLAP:
        last = (n_all - 1) % STAGES
        _take_turn(turn, n_all, PART, PINGPONG)
        acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        _pass_turn(turn, PART, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(acc, p_op))[0]
        mbarrier.arrive(empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _consumer_partition(
    Q,
    O,
    LSE,
    q_bufs,
    k_bufs,
    v_bufs,
    ready,
    empty,
    q_off,
    q_stride,
    lse_off,
    lo,
    hi,
    q_start,
    sel_len,
    seg_lo,
    qk_scale,
    PART: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    OVERLAP: gl.constexpr,
    turn,
    PINGPONG: gl.constexpr,
):
    """A consumer: query rows [lo + PART*64, +64) of the tile, over every step of the key set;
    with OVERLAP each step's softmax runs under the previous step's p v (``_steps``)."""
    # The scores' wgmma is ROWS x BLOCK_N, the accumulator's ROWS x HEAD_DIM (p from registers).
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    q_buf = q_bufs.index(PART)
    _rows_to_shared(Q, q_buf, q_off, q_stride, lo, hi, q_start, PART, HEAD_DIM)
    fence_async_shared()
    _partition_barrier()  # the warpgroup's wgmma reads all four warps' rows

    rows = lo + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_mma))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_mma))
    # m_i starts finite so that a step whose keys are all masked yields no NaN.
    m_i = gl.full([ROWS], -1.0e30, gl.float32, gl.SliceLayout(1, s_mma))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_mma))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
    none = offs_n[None, :] < BLOCK_N  # an unused mask of the right layout for unmasked steps

    acc, m_i, l_i = _steps(
        acc, m_i, l_i, q_buf, k_bufs, v_bufs, ready, empty, rows, offs_n, none, lo, hi, sel_len, seg_lo,
        qk_scale, turn, STAGES, BLOCK_N, s_mma, o_mma, PART, OVERLAP, PINGPONG,
    )  # fmt: skip
    row_ok = (rows >= q_start) & (rows < hi)
    l_safe = gl.where(row_ok, l_i, 1.0)
    lse = (m_i + gl.log2(l_safe)) * 0.6931471805599453
    gl.store(LSE + lse_off + rows, lse, mask=row_ok)
    o = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_mma))[:, None]
    o_rows = lo + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_mma))
    o_ok = (o_rows >= q_start) & (o_rows < hi)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    o_ptrs = O + q_off + o_rows.to(gl.int64)[:, None] * q_stride + d[None, :]
    gl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_ok[:, None])


@gluon.jit
def _sel_len(sel, g, S, W, num_warps: gl.constexpr):
    """Tokens of block g's valid selected regions (0 in the prefix, g = -1)."""
    CHUNK: gl.constexpr = 32 * num_warps
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs = gl.arange(0, CHUNK, layout=layout)
    count = g * 0
    for r in range(0, gl.where(g >= 0, S, 0), CHUNK):
        region = gl.load(sel + r + offs, mask=r + offs < S, other=-1)
        count += gl.sum((region >= 0).to(gl.int32), 0)
    return count * W


@gluon.jit
def _tile(
    IDX,
    L,
    P,
    W,
    M,
    S,
    G,
    n_pre_tiles,
    tiles_per_block,
    first_tile,
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    num_warps: gl.constexpr,
    SELECTED: gl.constexpr = True,
):
    """Where program (tile, b*HQ + h) works (as ``triton_kernels._query_tile``): rows [lo, hi) of
    the segment starting at seg_lo (the dense prefix or block g), the q and k/v row offsets of its
    heads, its lse row, its block's selection row, the selection's tokens (0 without SELECTED: the
    selection row is not read) and the own segment's steps."""
    BLOCK_M: gl.constexpr = 2 * ROWS
    bh = gl.program_id(1)
    tile = gl.program_id(0) + first_tile
    b = bh // HQ
    h = bh % HQ
    hkv = h // (HQ // HKV)
    hs = h // (HQ // HS)
    pre = tile < n_pre_tiles
    rel = gl.maximum(tile - n_pre_tiles, 0)
    blk = rel // gl.maximum(tiles_per_block, 1)
    blk_lo = P + blk * M * W
    g = gl.where(pre, -1, blk)
    seg_lo = gl.where(pre, 0, blk_lo)
    seg_hi = gl.where(pre, P, gl.minimum(blk_lo + M * W, L))
    lo = gl.where(pre, tile * BLOCK_M, blk_lo + (rel - blk * tiles_per_block) * BLOCK_M)
    hi = gl.minimum(lo + BLOCK_M, seg_hi)
    q_off = b.to(gl.int64) * L * (HQ * HEAD_DIM) + h * HEAD_DIM
    kv_off = b.to(gl.int64) * L * (HKV * HEAD_DIM) + hkv * HEAD_DIM
    lse_off = bh.to(gl.int64) * L
    sel = IDX + ((b * HS + hs).to(gl.int64) * G + gl.maximum(g, 0)) * S
    if SELECTED:
        sel_len = _sel_len(sel, g, S, W, num_warps)
    else:
        sel_len = g * 0
    n_seg = (lo - seg_lo) // BLOCK_N + gl.cdiv(hi - lo, BLOCK_N)
    return lo, hi, seg_lo, q_off, kv_off, lse_off, sel, sel_len, n_seg


@gluon.jit
def _ring(
    dtype: gl.constexpr,
    STAGES: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
):
    """The k and v slots and their ready (count: the load threads) and empty (count: the two
    consumers) mbarriers."""
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=32 * LOAD_WARPS)
        mbarrier.init(empty.index(s), count=2)
    return k_bufs, v_bufs, ready, empty


@gluon.jit
def _rows_to_shared(X, buf, off, stride, lo, hi, q_start, PART: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Rows [lo + PART*64, +64) of q (or do) into the consumer's wgmma operand `buf`; rows outside
    [q_start, hi) read 0."""
    VEC: gl.constexpr = 8
    TD: gl.constexpr = HEAD_DIM // VEC
    io: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TD, TD], [4, 1], [1, 0])
    rows = lo + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
    ok = (rows >= q_start) & (rows < hi)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io))
    buf.store(
        gl.load(X + off + rows.to(gl.int64)[:, None] * stride + d[None, :], mask=ok[:, None], other=0.0)
    )


@gluon.jit
def ms_attn_fwd_ws_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    IDX,
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
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    REGION: gl.constexpr = 0,
    OVERLAP: gl.constexpr = False,
    PINGPONG: gl.constexpr = False,
    num_warps: gl.constexpr = 4,
):
    """Grid (query tiles of 128 rows from `first_tile`, B*HQ), 4 warps (the first consumer) plus
    the second consumer's warpgroup and the load warps. Writes what ``ms_attn_fwd_kernel`` writes."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(128 % BLOCK_N == 0, "BLOCK_N must divide the 128-row tile")
    if REGION > 0:
        W = REGION
    lo, hi, seg_lo, q_off, kv_off, lse_off, sel, sel_len, n_seg = _tile(
        IDX,
        L,
        P,
        W,
        M,
        S,
        G,
        n_pre_tiles,
        tiles_per_block,
        first_tile,
        HQ,
        HKV,
        HS,
        HEAD_DIM,
        BLOCK_N,
        num_warps,
    )
    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    k_bufs, v_bufs, ready, empty = _ring(dtype, STAGES, BLOCK_N, HEAD_DIM, LOAD_WARPS)
    gl.static_assert(OVERLAP or not PINGPONG, "PINGPONG takes turns in the overlapped steps")
    if PINGPONG:
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # consumer i's turn
        for c in gl.static_range(2):
            mbarrier.init(turn.index(c), count=1)
    else:
        turn = empty  # never waited on or arrived at without turns

    gl.warp_specialize(
        [
            (
                _consumer_partition,
                (
                    Q,
                    O,
                    LSE,
                    q_bufs,
                    k_bufs,
                    v_bufs,
                    ready,
                    empty,
                    q_off,
                    q_stride,
                    lse_off,
                    lo,
                    hi,
                    q_start,
                    sel_len,
                    seg_lo,
                    qk_scale,
                    0,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    OVERLAP,
                    turn,
                    PINGPONG,
                ),
            ),
            (
                _consumer_partition,
                (
                    Q,
                    O,
                    LSE,
                    q_bufs,
                    k_bufs,
                    v_bufs,
                    ready,
                    empty,
                    q_off,
                    q_stride,
                    lse_off,
                    lo,
                    hi,
                    q_start,
                    sel_len,
                    seg_lo,
                    qk_scale,
                    1,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    OVERLAP,
                    turn,
                    PINGPONG,
                ),
            ),
            (
                _load_partition,
                (
                    K,
                    V,
                    sel,
                    k_bufs,
                    v_bufs,
                    ready,
                    empty,
                    kv_off,
                    kv_stride,
                    L,
                    W,
                    S,
                    sel_len,
                    seg_lo,
                    n_seg,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    LOAD_WARPS,
                ),
            ),
        ],
        [4, LOAD_WARPS],
        [CONSUMER_REGS, LOAD_REGS],
    )


@gluon.jit
def _dq_step(
    dq,
    q_buf,
    do_buf,
    k_bufs,
    v_bufs,
    ready,
    empty,
    i,
    lse2,
    delta,
    allowed,
    qk_scale,
    MASKED: gl.constexpr,
    STAGES: gl.constexpr,
    BLOCK_N: gl.constexpr,
    s_mma: gl.constexpr,
    o_mma: gl.constexpr,
    SPLIT_WAITS: gl.constexpr,
):
    """dq += dS k over slot i's keys (softmax scale not applied): the scores and dP = do v^T by two
    wgmma issued together, P recomputed from lse (log2 units)."""
    s, phase = _slot(i, STAGES)
    mbarrier.wait(ready.index(s), phase)
    fence_async_shared()
    k = k_bufs.index(s)
    v = v_bufs.index(s)
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_mma)
    qk = warpgroup_mma(q_buf, k.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_buf, v.permute((1, 0)), zero, use_acc=False, is_async=True)
    if SPLIT_WAITS:  # P while dP is still on the tensor cores
        qk = warpgroup_mma_wait(1, deps=(qk,))
    else:
        qk, dp = warpgroup_mma_wait(0, deps=(qk, dp))
    p = gl.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = gl.where(allowed, p, 0.0)
    if SPLIT_WAITS:
        dp = warpgroup_mma_wait(0, deps=(dp,))
    ds = p * (dp - delta[:, None])
    ds = gl.convert_layout(ds.to(k.dtype), gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2))
    dq = warpgroup_mma(ds, k, dq, is_async=True)
    dq = warpgroup_mma_wait(0, deps=(dq,))
    mbarrier.arrive(empty.index(s), count=1)
    return dq


@gluon.jit
def _dq_consumer_partition(
    Q,
    DO,
    DQ,
    LSE,
    DELTA,
    q_bufs,
    do_bufs,
    k_bufs,
    v_bufs,
    ready,
    empty,
    q_off,
    q_stride,
    lse_off,
    lo,
    hi,
    q_start,
    sel_len,
    seg_lo,
    qk_scale,
    scale,
    DQ32,
    PART: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    SPLIT_WAITS: gl.constexpr,
):
    """A dq consumer: query rows [lo + PART*64, +64) of the tile over every step of the key set,
    the forward's steps and masks (``sel_len`` 0: the own segment only). With DQ32 (float32, q's
    layout, unscaled dS k) the rows' sums there are added before the scale and the cast."""
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    q_buf = q_bufs.index(PART)
    do_buf = do_bufs.index(PART)
    _rows_to_shared(Q, q_buf, q_off, q_stride, lo, hi, q_start, PART, HEAD_DIM)
    _rows_to_shared(DO, do_buf, q_off, q_stride, lo, hi, q_start, PART, HEAD_DIM)
    fence_async_shared()
    _partition_barrier()  # the warpgroup's wgmma read all four warps' rows

    rows = lo + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_mma))
    row_ok = (rows >= q_start) & (rows < hi)
    lse2 = gl.load(LSE + lse_off + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = gl.load(DELTA + lse_off + rows, mask=row_ok, other=0.0)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_mma))
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
    none = offs_n[None, :] < BLOCK_N

    whole = sel_len // BLOCK_N
    n_sel = gl.cdiv(sel_len, BLOCK_N)
    for i in range(whole):
        dq = _dq_step(
            dq,
            q_buf,
            do_buf,
            k_bufs,
            v_bufs,
            ready,
            empty,
            i,
            lse2,
            delta,
            none,
            qk_scale,
            False,
            STAGES,
            BLOCK_N,
            s_mma,
            o_mma,
            SPLIT_WAITS,
        )
    for i in range(whole, n_sel):
        allowed = (i * BLOCK_N + offs_n[None, :]) < sel_len
        dq = _dq_step(
            dq,
            q_buf,
            do_buf,
            k_bufs,
            v_bufs,
            ready,
            empty,
            i,
            lse2,
            delta,
            allowed,
            qk_scale,
            True,
            STAGES,
            BLOCK_N,
            s_mma,
            o_mma,
            SPLIT_WAITS,
        )
    n_before = (lo - seg_lo) // BLOCK_N
    for j in range(n_before):
        dq = _dq_step(
            dq,
            q_buf,
            do_buf,
            k_bufs,
            v_bufs,
            ready,
            empty,
            n_sel + j,
            lse2,
            delta,
            none,
            qk_scale,
            False,
            STAGES,
            BLOCK_N,
            s_mma,
            o_mma,
            SPLIT_WAITS,
        )
    for j in range(n_before, n_before + gl.cdiv(hi - lo, BLOCK_N)):
        tok = seg_lo + j * BLOCK_N + offs_n
        allowed = (tok[None, :] <= rows[:, None]) & (tok[None, :] < hi)
        dq = _dq_step(
            dq,
            q_buf,
            do_buf,
            k_bufs,
            v_bufs,
            ready,
            empty,
            n_sel + j,
            lse2,
            delta,
            allowed,
            qk_scale,
            True,
            STAGES,
            BLOCK_N,
            s_mma,
            o_mma,
            SPLIT_WAITS,
        )

    o_rows = lo + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_mma))
    o_ok = (o_rows >= q_start) & (o_rows < hi)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    rows_off = q_off + o_rows.to(gl.int64)[:, None] * q_stride + d[None, :]
    if DQ32 is not None:  # the selected keys' sums, added by the dk/dv kernels (fused dq)
        dq += gl.load(DQ32 + rows_off, mask=o_ok[:, None], other=0.0)
    gl.store(DQ + rows_off, (dq * scale).to(DQ.dtype.element_ty), mask=o_ok[:, None])


@gluon.jit
def ms_attn_bwd_dq_ws_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    IDX,
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
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    REGION: gl.constexpr = 0,
    SPLIT_WAITS: gl.constexpr = False,
    DQ32=None,
    num_warps: gl.constexpr = 4,
):
    """Grid (query tiles of 128 rows from `first_tile`, B*HQ): what ``ms_attn_bwd_dq_kernel``
    writes without RoPE on the fly, with the forward's partitions (the same load partition).

    With DQ32 (float32 ``[B, L, HQ, D]``: the selected keys' unscaled dS k, which the dk/dv
    kernels added with ``FUSED_DQ``) the kernel *finishes* the fused dq: each tile runs its own
    segment's steps only (the prefix's, or its block's own keys, causally) and adds its rows of
    DQ32 before the scale and the cast."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(128 % BLOCK_N == 0, "BLOCK_N must divide the 128-row tile")
    if REGION > 0:
        W = REGION
    lo, hi, seg_lo, q_off, kv_off, lse_off, sel, sel_len, n_seg = _tile(
        IDX,
        L,
        P,
        W,
        M,
        S,
        G,
        n_pre_tiles,
        tiles_per_block,
        first_tile,
        HQ,
        HKV,
        HS,
        HEAD_DIM,
        BLOCK_N,
        num_warps,
        DQ32 is None,  # finishing a fused dq: the selected keys' part is in DQ32 already
    )
    q_stride = HQ * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    do_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    k_bufs, v_bufs, ready, empty = _ring(dtype, STAGES, BLOCK_N, HEAD_DIM, LOAD_WARPS)

    gl.warp_specialize(
        [
            (
                _dq_consumer_partition,
                (
                    Q,
                    DO,
                    DQ,
                    LSE,
                    DELTA,
                    q_bufs,
                    do_bufs,
                    k_bufs,
                    v_bufs,
                    ready,
                    empty,
                    q_off,
                    q_stride,
                    lse_off,
                    lo,
                    hi,
                    q_start,
                    sel_len,
                    seg_lo,
                    qk_scale,
                    scale,
                    DQ32,
                    0,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    SPLIT_WAITS,
                ),
            ),
            (
                _dq_consumer_partition,
                (
                    Q,
                    DO,
                    DQ,
                    LSE,
                    DELTA,
                    q_bufs,
                    do_bufs,
                    k_bufs,
                    v_bufs,
                    ready,
                    empty,
                    q_off,
                    q_stride,
                    lse_off,
                    lo,
                    hi,
                    q_start,
                    sel_len,
                    seg_lo,
                    qk_scale,
                    scale,
                    DQ32,
                    1,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    SPLIT_WAITS,
                ),
            ),
            (
                _load_partition,
                (
                    K,
                    V,
                    sel,
                    k_bufs,
                    v_bufs,
                    ready,
                    empty,
                    kv_off,
                    kv_stride,
                    L,
                    W,
                    S,
                    sel_len,
                    seg_lo,
                    n_seg,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    LOAD_WARPS,
                ),
            ),
        ],
        [4, LOAD_WARPS],
        [CONSUMER_REGS, LOAD_REGS],
    )


@gluon.jit
def _selected_rows(sel, flat, S, W):
    """Places `flat` of a block's sorted selection `sel` ([S] regions, -1 padded): the token each
    reads (token 0 for padding) and whether it is a real key."""
    rank = flat // W
    region = gl.load(sel + rank, mask=rank < S, other=-1)
    ok = region >= 0
    return gl.where(ok, region * W + (flat - rank * W), 0), ok


@gluon.jit
def _keys_to_shared(
    K, buf, kv_off, kv_stride, sel, first, S, W, HEAD_DIM: gl.constexpr, WARPS: gl.constexpr = 4,
    ASYNC: gl.constexpr = False,
):  # fmt: skip
    """The k (or v) rows of selected places [first, first + 64) into the wgmma operand `buf`, by
    the WARPS warps calling: loaded and stored (a consumer), or with ASYNC copied by ``cp.async``
    (the persistent kernel's load partition; the caller arrives on a barrier for them). Padding
    places read token 0 (a valid row: their sums are computed, never stored)."""
    VEC: gl.constexpr = 8
    TD: gl.constexpr = HEAD_DIM // VEC
    io: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TD, TD], [WARPS, 1], [1, 0])
    tok, _ = _selected_rows(sel, first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io)), S, W)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io))
    rows = K + kv_off + tok.to(gl.int64)[:, None] * kv_stride + d[None, :]
    if ASYNC:
        _cp_async(buf, rows)
    else:
        buf.store(gl.load(rows))


@gluon.jit
def _dkv_load_steps(
    Q, DO, q_bufs, do_bufs, ready, empty, LSE, DELTA, lse_bufs, delta_bufs, lse_base, L, q_base, q_stride,
    t_first, q_hi, q_start, n_steps, base, REP: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr, ROW_STATS: gl.constexpr,
):  # fmt: skip
    """For each of the REP query heads sharing the selection, the block's query steps (q and do
    rows, contiguous), from the step holding `q_start`, into the ring from its step `base`. Rows
    outside [q_start, q_hi) read row q_hi - 1 (a valid row; the consumers give them P = 0). With
    ROW_STATS also the rows' lse and delta, into the slot's `lse_bufs`, `delta_bufs`."""
    VEC: gl.constexpr = 8
    TD: gl.constexpr = HEAD_DIM // VEC
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TD, TD], [LOAD_WARPS, 1], [1, 0])
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    offs_r = gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [LOAD_WARPS], [0]))
    for i in range(REP * n_steps):
        rep = i // n_steps
        t0 = t_first + (i - rep * n_steps) * BLOCK_M  # the step's first row
        t = t0 + offs_m
        t = gl.where((t >= q_start) & (t < q_hi), t, q_hi - 1)
        s = _load_step(
            Q, DO, q_bufs, do_bufs, ready, empty, base + i, t, q_base + rep * HEAD_DIM, q_stride, offs_d,
            STAGES, not ROW_STATS,
        )  # fmt: skip
        if ROW_STATS:  # the same clamped rows' lse and delta, then the slot's arrive
            tr = t0 + offs_r
            tr = lse_base + rep * L + gl.where((tr >= q_start) & (tr < q_hi), tr, q_hi - 1)
            _cp_async(lse_bufs.index(s), LSE + tr)
            _cp_async(delta_bufs.index(s), DELTA + tr)
            async_copy.mbarrier_arrive(ready.index(s), increment_count=False)


@gluon.jit
def _dkv_load_partition(
    Q,
    DO,
    q_bufs,
    do_bufs,
    ready,
    empty,
    LSE,
    DELTA,
    lse_bufs,
    delta_bufs,
    lse_base,
    L,
    q_base,
    q_stride,
    t_first,
    q_hi,
    q_start,
    n_steps,
    REP: gl.constexpr,
    BLOCK_M: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
    ROW_STATS: gl.constexpr,
):
    """The producer of the dk/dv kernel: the program's query steps (``_dkv_load_steps``)."""
    _dkv_load_steps(
        Q, DO, q_bufs, do_bufs, ready, empty, LSE, DELTA, lse_bufs, delta_bufs, lse_base, L, q_base, q_stride,
        t_first, q_hi, q_start, n_steps, 0, REP, BLOCK_M, HEAD_DIM, STAGES, LOAD_WARPS, ROW_STATS,
    )  # fmt: skip


@gluon.jit
def _ds_to_shared(ds, ds_bufs, ds_full, ds_empty, i, n_real, PART: gl.constexpr):
    """This consumer's dS^T of step i (its 64 keys x the step's rows) into its half of the step's
    dS buffer (two buffers, alternating by step) once both consumers have read the buffer's step
    i - 2; then arrive on the buffer's *full* mbarrier (count: the two consumers).

    Padding places (read token 0, sums never stored) must add nothing to dq. Padding comes last
    in the sorted selection, so the consumer's first `n_real` places are real keys and the rest
    padding; where there is any (at real sizes only in the first blocks), the padding rows of the
    tile are zeroed in shared memory after the store. The branch holds barriers and shared-memory
    traffic, so ptxas keeps it a branch: the other consumers' steps run no select at all (zeroing
    dS^T in registers, predicated, cost 32 FSEL a thread a step, 0.41 G instructions at paper 64K;
    Nsight Compute, session 18, where the kernel was no faster without them: kernels/README.md)."""
    j = i % 2
    phase = (i // 2) & 1
    mbarrier.wait(ds_empty.index(j), phase ^ 1)  # a fresh barrier passes parity 1 at once
    buf = ds_bufs.index(2 * j + PART)
    buf.store(ds)
    if n_real < ROWS:
        _partition_barrier()  # the rows other threads stored, before they are read back
        io: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        ok = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io)) < n_real
        tile = buf.load(io)
        _partition_barrier()
        buf.store(gl.where(ok[:, None], tile, gl.zeros_like(tile)))
    fence_async_shared()  # written through the generic proxy, read by wgmma through the async one
    _partition_barrier()  # all four warps' rows are in before the arrive
    mbarrier.arrive(ds_full.index(j), count=1)


@gluon.jit
def _dq_issue(k_bufs, ds_bufs, ds_full, i, PART: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Issue step i's dq for head-dim half PART over both consumers' 128 keys, once both have put
    their dS^T in the step's buffer: dS k with dS from shared memory (transposed views)."""
    HALF: gl.constexpr = HEAD_DIM // 2
    acc: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16]
    )
    j = i % 2
    mbarrier.wait(ds_full.index(j), (i // 2) & 1)
    zero = gl.zeros([ROWS, HALF], gl.float32, acc)
    k_half: gl.constexpr = PART * HALF
    ds0 = ds_bufs.index(2 * j).permute((1, 0))
    ds1 = ds_bufs.index(2 * j + 1).permute((1, 0))
    dq = warpgroup_mma(ds0, k_bufs.index(0).slice(k_half, HALF, dim=1), zero, use_acc=False, is_async=True)
    return warpgroup_mma(ds1, k_bufs.index(1).slice(k_half, HALF, dim=1), dq, is_async=True)


@gluon.jit
def _dq_reduce(DQD, dq_bufs, dq, row, col, PART: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Add the finished dq tile (64 rows x HEAD_DIM/2, half PART) into the float32 dq at (row, col)
    by one TMA reduction (FlashAttention-3's dq: the reduction runs on the TMA unit, 4 bytes per
    computed pair), through this consumer's shared-memory tile. The tile is dS k without the
    softmax scale, which the caller applies once to the finished sum (as FlashAttention-3's
    post-processing does): 32 multiplies a thread a step less."""
    buf = dq_bufs.index(PART)
    tma.store_wait(0)  # the thread that issued the previous reduction: it has read buf
    _partition_barrier()
    buf.store(dq)
    fence_async_shared()
    _partition_barrier()
    _tma_add(DQD, [row, col + PART * (HEAD_DIM // 2)], buf)


@gluon.jit
def _dkv_scores(k_buf, v_buf, q_bufs, do_bufs, ready, i, zero, STAGES: gl.constexpr):
    """Issue step i's S^T = k q^T and dP^T = v do^T once its slot has landed."""
    s, phase = _slot(i, STAGES)
    mbarrier.wait(ready.index(s), phase)
    fence_async_shared()
    qk = warpgroup_mma(k_buf, q_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(v_buf, do_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
    return qk, dp


@gluon.jit
def _step_rows(i, n_steps, t_first, BLOCK_M: gl.constexpr, offs_m):
    """Step i's query head (of the REP sharing the selection) and its rows' tokens."""
    rep = i // n_steps
    return rep, t_first + (i - rep * n_steps) * BLOCK_M + offs_m


@gluon.jit
def _dkv_probs(qk, dp, lse_bufs, delta_bufs, s, row_ok, qk_scale, s_mma: gl.constexpr):
    """P^T and dS^T (float32) of the step in slot s, from its scores and its rows' lse and delta
    in the slot (rows outside [q_start, q_hi): lse = +inf, P = 0; delta of a valid row, clamped)."""
    rows: gl.constexpr = gl.SliceLayout(0, s_mma)
    lse2 = gl.where(row_ok, lse_bufs.index(s).load(rows) * 1.4426950408889634, float("inf"))
    p = gl.exp2(qk * qk_scale - lse2[None, :])
    return p, p * (dp - delta_bufs.index(s).load(rows)[None, :])


@gluon.jit
def _dkv_operands(
    qk, dp, lse_bufs, delta_bufs, i, base, n_steps, t_first, q_start, q_hi, offs_m, qk_scale,
    dtype: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, s_mma: gl.constexpr,
    operand: gl.constexpr,
):  # fmt: skip
    """Step i's P^T and dS^T as the dv and dk GEMMs' register operands (``_dkv_probs``); the
    step is the ring's step base + i."""
    _, t = _step_rows(i, n_steps, t_first, BLOCK_M, offs_m)
    row_ok = (t >= q_start) & (t < q_hi)
    p, ds = _dkv_probs(qk, dp, lse_bufs, delta_bufs, (base + i) % STAGES, row_ok, qk_scale, s_mma)
    return gl.convert_layout(p.to(dtype), operand), gl.convert_layout(ds.to(dtype), operand)


@gluon.jit
def _dkv_steps_one_wait(
    dk, dv, k_buf, v_buf, q_bufs, do_bufs, ready, empty, lse_bufs, delta_bufs, n_all, n_steps, t_first,
    q_start, q_hi, offs_m, zero, qk_scale, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, s_mma: gl.constexpr,
    operand: gl.constexpr,
):  # fmt: skip
    """The consumer's n_all (>= 1) steps with one wait a step: step i - 1's dv += P^T do and
    dk += dS^T q are issued, then step i's score GEMMs behind them on the tensor cores; one wait
    (two groups left) finishes dv and dk and frees step i - 1's slot, the next finishes the scores.
    The default schedule waits for the scores, then again for dv and dk, so the tensor cores idle
    between a step's two pairs of GEMMs for the wait's round trip. The same sums in the same order.
    A slot is held into the next step: wants a third slot to keep the loads ahead."""
    dtype: gl.constexpr = q_bufs.dtype
    qk, dp = _dkv_scores(k_buf, v_buf, q_bufs, do_bufs, ready, 0, zero, STAGES)
    qk, dp = warpgroup_mma_wait(0, deps=(qk, dp))
    p_op, ds_op = _dkv_operands(
        qk, dp, lse_bufs, delta_bufs, 0, 0, n_steps, t_first, q_start, q_hi, offs_m, qk_scale, dtype, STAGES,
        BLOCK_M, s_mma, operand,
    )  # fmt: skip
    for i in range(1, n_all):
        prev = (i - 1) % STAGES
        dv = warpgroup_mma(p_op, do_bufs.index(prev), dv, is_async=True)
        dk = warpgroup_mma(ds_op, q_bufs.index(prev), dk, is_async=True)
        s, phase = _slot(i, STAGES)
        mbarrier.wait(ready.index(s), phase)
        fence_async_shared()
        qk = warpgroup_mma(k_buf, q_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        dv, dk, p_op, ds_op = warpgroup_mma_wait(1, deps=(dv, dk, p_op, ds_op))  # in order: dv, dk done
        mbarrier.arrive(empty.index(prev), count=1)
        dp = warpgroup_mma(v_buf, do_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        qk, dp = warpgroup_mma_wait(0, deps=(qk, dp))
        p_op, ds_op = _dkv_operands(
            qk, dp, lse_bufs, delta_bufs, i, 0, n_steps, t_first, q_start, q_hi, offs_m, qk_scale, dtype,
            STAGES, BLOCK_M, s_mma, operand,
        )  # fmt: skip
    last = (n_all - 1) % STAGES
    dv = warpgroup_mma(p_op, do_bufs.index(last), dv, is_async=True)
    dk = warpgroup_mma(ds_op, q_bufs.index(last), dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))[:2]
    mbarrier.arrive(empty.index(last), count=1)
    return dk, dv


@gluon.jit
def _dkv_consumer_partition(
    K,
    V,
    DK32,
    DV32,
    LSE,
    DELTA,
    sel,
    k_bufs,
    v_bufs,
    q_bufs,
    do_bufs,
    ready,
    empty,
    DQD,
    ds_bufs,
    dq_bufs,
    ds_full,
    ds_empty,
    lse_bufs,
    delta_bufs,
    dq_row,
    dq_col,
    kv_off,
    kv_stride,
    lse_base,
    L,
    S,
    W,
    chunk_lo,
    part_off,
    t_first,
    q_hi,
    q_start,
    n_steps,
    qk_scale,
    scale,
    PART: gl.constexpr,
    REP: gl.constexpr,
    BLOCK_M: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    PARTIAL: gl.constexpr,
    SPLIT_WAITS: gl.constexpr,
    FUSED_DQ: gl.constexpr,
    ROW_STATS: gl.constexpr,
    DQ_EARLY: gl.constexpr,
    ONE_WAIT: gl.constexpr,
):
    """A dk/dv consumer: selected places [chunk_lo + PART*64, +64) of the block, over every query
    step of the slots. Key-major products (FlashAttention-2's backward): S^T = k q^T and
    dP^T = v do^T by two wgmma issued together, then dv += P^T do and dk += dS^T q with P^T and
    dS^T from registers. With FUSED_DQ also each step's dq (``_dq_issue``, ``_dq_reduce``), head-dim
    half PART, issued after dv and dk have finished or, with DQ_EARLY, right behind them. With
    ROW_STATS the rows' lse and delta come from the slot, read once the score GEMMs are done (not
    from global memory before them: 32 registers less across the GEMMs). With ONE_WAIT (and
    ROW_STATS) one wait a step (``_dkv_steps_one_wait``)."""
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16]
    )
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2)
    k_buf = k_bufs.index(PART)
    v_buf = v_bufs.index(PART)
    first = chunk_lo + PART * ROWS
    _keys_to_shared(K, k_buf, kv_off, kv_stride, sel, first, S, W, HEAD_DIM)
    _keys_to_shared(V, v_buf, kv_off, kv_stride, sel, first, S, W, HEAD_DIM)
    fence_async_shared()
    _partition_barrier()  # the warpgroup's wgmma read all four warps' rows

    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_mma))
    zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_mma)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
    # Padding places read token 0: their dS^T rows are zeroed for dq (their dk, dv are never added)
    # by ``_ds_to_shared``, only in consumers that hold any (padding comes last: the real places
    # are the first n_real).
    if FUSED_DQ:
        _, real = _selected_rows(sel, first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_mma)), S, W)
        n_real = gl.sum(real.to(gl.int32), axis=0)
    if ONE_WAIT:  # noqa: SIM102  (a compile-time switch around a run-time test)
        if REP * n_steps > 0:  # a chunk of padding has no steps
            dk, dv = _dkv_steps_one_wait(
                dk, dv, k_buf, v_buf, q_bufs, do_bufs, ready, empty, lse_bufs, delta_bufs, REP * n_steps,
                n_steps, t_first, q_start, q_hi, offs_m, zero, qk_scale, STAGES, BLOCK_M, s_mma, operand,
            )  # fmt: skip
    for i in range(0 if ONE_WAIT else REP * n_steps):
        rep, t = _step_rows(i, n_steps, t_first, BLOCK_M, offs_m)
        row_ok = (t >= q_start) & (t < q_hi)
        if not ROW_STATS:
            lse_row = LSE + lse_base + rep * L
            lse2 = gl.load(lse_row + t, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = gl.load(DELTA + lse_base + rep * L + t, mask=row_ok, other=0.0)
        qk, dp = _dkv_scores(k_buf, v_buf, q_bufs, do_bufs, ready, i, zero, STAGES)
        s = i % STAGES
        q = q_bufs.index(s)
        do = do_bufs.index(s)
        if SPLIT_WAITS:
            # P^T while dP^T is still on the tensor cores, dS^T while dv += P^T do is.
            gl.static_assert(not ROW_STATS, "ROW_STATS takes the default schedule")
            qk = warpgroup_mma_wait(1, deps=(qk,))
            p = gl.exp2(qk * qk_scale - lse2[None, :])
            p_op = gl.convert_layout(p.to(q.dtype), operand)
            dv = warpgroup_mma(p_op, do, dv, is_async=True)
            dp, p_op = warpgroup_mma_wait(1, deps=(dp, p_op))
            ds_op = gl.convert_layout((p * (dp - delta[None, :])).to(q.dtype), operand)
            dk = warpgroup_mma(ds_op, q, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))[:2]
        else:
            qk, dp = warpgroup_mma_wait(0, deps=(qk, dp))
            if ROW_STATS:
                p, ds = _dkv_probs(qk, dp, lse_bufs, delta_bufs, s, row_ok, qk_scale, s_mma)
            else:
                p = gl.exp2(qk * qk_scale - lse2[None, :])  # rows outside [q_start, q_hi): lse = +inf, P = 0
                ds = p * (dp - delta[None, :])
            dv = warpgroup_mma(gl.convert_layout(p.to(q.dtype), operand), do, dv, is_async=True)
            dk = warpgroup_mma(gl.convert_layout(ds.to(q.dtype), operand), q, dk, is_async=True)
            if FUSED_DQ:
                _ds_to_shared(ds.to(q.dtype), ds_bufs, ds_full, ds_empty, i, n_real, PART)
                if DQ_EARLY:  # dq on the tensor cores behind dv and dk, one wait for the three
                    dq = _dq_issue(k_bufs, ds_bufs, ds_full, i, PART, HEAD_DIM)
                    dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
                else:
                    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            else:
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        mbarrier.arrive(empty.index(s), count=1)
        if FUSED_DQ:
            if not DQ_EARLY:
                dq = _dq_issue(k_bufs, ds_bufs, ds_full, i, PART, HEAD_DIM)
                dq = warpgroup_mma_wait(0, deps=(dq,))
            mbarrier.arrive(ds_empty.index(i % 2), count=1)  # both dS^T halves read
            row = dq_row + t_first + (i - rep * n_steps) * BLOCK_M
            _dq_reduce(DQD, dq_bufs, dq, row, dq_col + rep * HEAD_DIM, PART, HEAD_DIM)
    if FUSED_DQ:
        tma.store_wait(0)  # the last reduction has read its tile before the kernel's memory goes

    _dkv_add(
        dk, dv, DK32, DV32, sel, first, S, W, kv_off, kv_stride, part_off, scale, PARTIAL, HEAD_DIM, o_mma
    )


@gluon.jit
def _dkv_add(
    dk, dv, DK32, DV32, sel, first, S, W, kv_off, kv_stride, part_off, scale, PARTIAL: gl.constexpr,
    HEAD_DIM: gl.constexpr, o_mma: gl.constexpr,
):  # fmt: skip
    """A consumer's dk (times the softmax scale) and dv of selected places [first, first + 64):
    added into the float32 dk, dv by relaxed reductions, or with PARTIAL stored at `part_off`
    of the partial buffers; padding places are left out."""
    flat = first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_mma))
    tok, key_ok = _selected_rows(sel, flat, S, W)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    mask = key_ok[:, None] & (d[None, :] < HEAD_DIM)
    if PARTIAL:
        rows = part_off + flat.to(gl.int64)[:, None] * HEAD_DIM + d[None, :]
        gl.store(DK32 + rows, dk * scale, mask=mask)
        gl.store(DV32 + rows, dv, mask=mask)
    else:
        rows = kv_off + tok.to(gl.int64)[:, None] * kv_stride + d[None, :]
        gl.atomic_add(DK32 + rows, dk * scale, mask=mask, sem="relaxed")
        gl.atomic_add(DV32 + rows, dv, mask=mask, sem="relaxed")


@gluon.jit
def _dkv_item(
    rel, bhs, IDX, L, P, W, M, S, G, n_chunks, g0, window, q_start, HQ: gl.constexpr, HKV: gl.constexpr,
    HS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
):  # fmt: skip
    """Work item (rel, bhs) of the dk/dv kernels: the chunk of 128 selected places rel % n_chunks
    of block g0 + rel // n_chunks, selection head bhs % HS of batch row bhs // HS. Returns the batch
    row, the selection head, the k/v row offset of its kv head, the q/do row offset of its first
    query head, its first lse row, its selection row, the chunk's first place, its partial
    buffers' offset, the first query step's first row, the block's end and the query steps per
    head (0 for a chunk of padding)."""
    REP: gl.constexpr = HQ // HS
    BLOCK_N: gl.constexpr = 2 * ROWS
    g = g0 + rel // n_chunks
    chunk = rel % n_chunks
    b = bhs // HS
    hs = bhs % HS
    hkv = hs // (HS // HKV)
    kv_off = b.to(gl.int64) * L * (HKV * HEAD_DIM) + hkv * HEAD_DIM
    q_base = b.to(gl.int64) * L * (HQ * HEAD_DIM) + (hs * REP) * HEAD_DIM
    lse_base = (b * HQ + hs * REP).to(gl.int64) * L
    sel = IDX + (bhs.to(gl.int64) * G + g) * S
    chunk_lo = chunk * BLOCK_N
    part_off = ((bhs.to(gl.int64) * window + (g - g0)) * S * W) * HEAD_DIM
    q_lo = P + g * M * W
    q_hi = gl.minimum(q_lo + M * W, L)
    t_first = q_lo + gl.maximum(q_start - q_lo, 0) // BLOCK_M * BLOCK_M
    # The selection is sorted with its -1 padding last: a chunk whose first place is padding is
    # all padding and has nothing to add (no steps).
    first_region = gl.load(sel + chunk_lo // W, mask=chunk_lo // W < S, other=-1)
    n_steps = gl.where(first_region >= 0, gl.cdiv(q_hi - t_first, BLOCK_M), 0)
    return b, hs, kv_off, q_base, lse_base, sel, chunk_lo, part_off, t_first, q_hi, n_steps


@gluon.jit
def ms_attn_bwd_dkv_sel_ws_kernel(
    Q,
    K,
    V,
    DO,
    DK32,
    DV32,
    LSE,
    DELTA,
    IDX,
    DQD,
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
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PARTIAL: gl.constexpr,
    REGION: gl.constexpr = 0,
    SPLIT_WAITS: gl.constexpr = False,
    FUSED_DQ: gl.constexpr = False,
    ROW_STATS: gl.constexpr = False,
    DQ_EARLY: gl.constexpr = False,
    ONE_WAIT: gl.constexpr = False,
    num_warps: gl.constexpr = 4,
):
    """Grid (Gw * n_chunks, B*HS): what ``triton_kernels.ms_attn_bwd_dkv_sel_kernel`` adds (or,
    with PARTIAL, stores) without RoPE on the fly, for chunks of 128 selected places (two consumer
    warpgroups of 64 keys each, read by index once) over the block's query steps of BLOCK_M rows
    (streamed by the load partition through a ring of STAGES slots, shared by both consumers),
    for every query head sharing the selection. With FUSED_DQ also the steps' dq over the chunk's
    keys, added by TMA reductions into the float32 dq that the descriptor DQD (``[B*L, HQ*HEAD_DIM]``,
    64 x HEAD_DIM/2 tiles) covers; each consumer takes one head-dim half, so the two meet once a step
    (a buffer of both consumers' dS^T). Without FUSED_DQ, DQD is None."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(not (FUSED_DQ and (SPLIT_WAITS or PARTIAL)), "FUSED_DQ: the default schedule, atomics")
    gl.static_assert(not FUSED_DQ or BLOCK_M == ROWS, "FUSED_DQ steps 64 query rows")
    gl.static_assert(
        not ONE_WAIT or (ROW_STATS and not (FUSED_DQ or SPLIT_WAITS)), "ONE_WAIT: row stats, no dq"
    )
    if REGION > 0:
        W = REGION
    REP: gl.constexpr = HQ // HS
    kv_stride = HKV * HEAD_DIM
    q_stride = HQ * HEAD_DIM
    b, hs, kv_off, q_base, lse_base, sel, chunk_lo, part_off, t_first, q_hi, n_steps = _dkv_item(
        gl.program_id(0), gl.program_id(1), IDX, L, P, W, M, S, G, n_chunks, g0, window, q_start, HQ, HKV, HS,
        HEAD_DIM, BLOCK_M,
    )  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], kv_layout)
    q_bufs, do_bufs, ready, empty = _ring(dtype, STAGES, BLOCK_M, HEAD_DIM, LOAD_WARPS)
    if FUSED_DQ:
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_M], dtype)
        ds_bufs = gl.allocate_shared_memory(dtype, [4, ROWS, BLOCK_M], ds_layout)  # [step parity, consumer]
        dq_bufs = gl.allocate_shared_memory(gl.float32, [2, ROWS, HEAD_DIM // 2], DQD.layout)
        ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(2):
            mbarrier.init(ds_full.index(j), count=2)
            mbarrier.init(ds_empty.index(j), count=2)
    else:  # never read
        ds_bufs = q_bufs
        dq_bufs = q_bufs
        ds_full = ready
        ds_empty = empty
    stats_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stats_layout)
    delta_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stats_layout)
    dq_row = b * L
    dq_col = (hs * REP) * HEAD_DIM

    gl.warp_specialize(
        [
            (
                _dkv_consumer_partition,
                (
                    K,
                    V,
                    DK32,
                    DV32,
                    LSE,
                    DELTA,
                    sel,
                    k_bufs,
                    v_bufs,
                    q_bufs,
                    do_bufs,
                    ready,
                    empty,
                    DQD,
                    ds_bufs,
                    dq_bufs,
                    ds_full,
                    ds_empty,
                    lse_bufs,
                    delta_bufs,
                    dq_row,
                    dq_col,
                    kv_off,
                    kv_stride,
                    lse_base,
                    L,
                    S,
                    W,
                    chunk_lo,
                    part_off,
                    t_first,
                    q_hi,
                    q_start,
                    n_steps,
                    qk_scale,
                    scale,
                    0,
                    REP,
                    BLOCK_M,
                    HEAD_DIM,
                    STAGES,
                    PARTIAL,
                    SPLIT_WAITS,
                    FUSED_DQ,
                    ROW_STATS,
                    DQ_EARLY,
                    ONE_WAIT,
                ),
            ),
            (
                _dkv_consumer_partition,
                (
                    K,
                    V,
                    DK32,
                    DV32,
                    LSE,
                    DELTA,
                    sel,
                    k_bufs,
                    v_bufs,
                    q_bufs,
                    do_bufs,
                    ready,
                    empty,
                    DQD,
                    ds_bufs,
                    dq_bufs,
                    ds_full,
                    ds_empty,
                    lse_bufs,
                    delta_bufs,
                    dq_row,
                    dq_col,
                    kv_off,
                    kv_stride,
                    lse_base,
                    L,
                    S,
                    W,
                    chunk_lo,
                    part_off,
                    t_first,
                    q_hi,
                    q_start,
                    n_steps,
                    qk_scale,
                    scale,
                    1,
                    REP,
                    BLOCK_M,
                    HEAD_DIM,
                    STAGES,
                    PARTIAL,
                    SPLIT_WAITS,
                    FUSED_DQ,
                    ROW_STATS,
                    DQ_EARLY,
                    ONE_WAIT,
                ),
            ),
            (
                _dkv_load_partition,
                (
                    Q,
                    DO,
                    q_bufs,
                    do_bufs,
                    ready,
                    empty,
                    LSE,
                    DELTA,
                    lse_bufs,
                    delta_bufs,
                    lse_base,
                    L,
                    q_base,
                    q_stride,
                    t_first,
                    q_hi,
                    q_start,
                    n_steps,
                    REP,
                    BLOCK_M,
                    HEAD_DIM,
                    STAGES,
                    LOAD_WARPS,
                    ROW_STATS,
                ),
            ),
        ],
        [4, LOAD_WARPS],
        [CONSUMER_REGS, LOAD_REGS],
    )


@gluon.jit
def _dkv_persistent_loads(
    Q,
    K,
    V,
    DO,
    IDX,
    LSE,
    DELTA,
    k_bufs,
    v_bufs,
    q_bufs,
    do_bufs,
    ready,
    empty,
    kv_ready,
    kv_empty,
    lse_bufs,
    delta_bufs,
    n_items,
    n_rel,
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
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
):
    """The persistent dk/dv kernel's producer: per work item of the program (every
    ``num_programs``-th from its id), once the item's k/v buffer pair is free, the chunk's 128
    selected k and v rows by ``cp.async`` (arriving on the pair's *kv_ready*), then the item's
    query steps through the ring (``_dkv_load_steps``, row stats). So item j + 1's keys and first
    steps are in flight while the consumers finish item j and add its sums."""
    REP: gl.constexpr = HQ // HS
    kv_stride = HKV * HEAD_DIM
    q_stride = HQ * HEAD_DIM
    base = 0  # ring steps issued so far
    live = 0  # items with steps so far (the k/v pair alternates by item)
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        _, _, kv_off, q_base, lse_base, sel, chunk_lo, _, t_first, q_hi, n_steps = _dkv_item(
            item % n_rel, item // n_rel, IDX, L, P, W, M, S, G, n_chunks, g0, window, q_start, HQ, HKV, HS,
            HEAD_DIM, BLOCK_M,
        )  # fmt: skip
        if n_steps > 0:
            pair = live % 2
            mbarrier.wait(kv_empty.index(pair), ((live // 2) & 1) ^ 1)  # a fresh barrier passes parity 1
            for part in gl.static_range(2):
                first = chunk_lo + part * ROWS
                buf = pair * 2 + part
                _keys_to_shared(
                    K, k_bufs.index(buf), kv_off, kv_stride, sel, first, S, W, HEAD_DIM, LOAD_WARPS, True
                )
                _keys_to_shared(
                    V, v_bufs.index(buf), kv_off, kv_stride, sel, first, S, W, HEAD_DIM, LOAD_WARPS, True
                )
            async_copy.mbarrier_arrive(kv_ready.index(pair), increment_count=False)
            _dkv_load_steps(
                Q, DO, q_bufs, do_bufs, ready, empty, LSE, DELTA, lse_bufs, delta_bufs, lse_base, L, q_base,
                q_stride, t_first, q_hi, q_start, n_steps, base, REP, BLOCK_M, HEAD_DIM, STAGES, LOAD_WARPS,
                True,
            )  # fmt: skip
            base += REP * n_steps
            live += 1


@gluon.jit
def _dkv_persistent_consumer(
    IDX,
    DK32,
    DV32,
    k_bufs,
    v_bufs,
    q_bufs,
    do_bufs,
    ready,
    empty,
    kv_ready,
    kv_empty,
    lse_bufs,
    delta_bufs,
    n_items,
    n_rel,
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
    PART: gl.constexpr,
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
    PARTIAL: gl.constexpr,
):
    """A persistent dk/dv consumer: per work item, selected places [chunk_lo + PART*64, +64)
    from the item's k/v pair, over its query steps with the default schedule and row stats
    (``_dkv_consumer_partition``'s steps, the same sums in the same order), then the pair is
    released and dk, dv added (or stored, PARTIAL) while the producer fills the next item."""
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16]
    )
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2)
    REP: gl.constexpr = HQ // HS
    kv_stride = HKV * HEAD_DIM
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_mma))
    zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_mma)
    base = 0
    live = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        _, _, _, _, _, _, _, _, t_first, q_hi, n_steps = _dkv_item(
            item % n_rel, item // n_rel, IDX, L, P, W, M, S, G, n_chunks, g0, window, q_start, HQ, HKV, HS,
            HEAD_DIM, BLOCK_M,
        )  # fmt: skip
        if n_steps > 0:
            pair = live % 2
            mbarrier.wait(kv_ready.index(pair), (live // 2) & 1)
            fence_async_shared()  # the keys came by the generic proxy; wgmma reads by the async one
            k_buf = k_bufs.index(pair * 2 + PART)
            v_buf = v_bufs.index(pair * 2 + PART)
            dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
            dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
            for i in range(REP * n_steps):
                qk, dp = _dkv_scores(k_buf, v_buf, q_bufs, do_bufs, ready, base + i, zero, STAGES)
                s = (base + i) % STAGES
                qk, dp = warpgroup_mma_wait(0, deps=(qk, dp))
                p_op, ds_op = _dkv_operands(
                    qk, dp, lse_bufs, delta_bufs, i, base, n_steps, t_first, q_start, q_hi, offs_m, qk_scale,
                    q_bufs.dtype, STAGES, BLOCK_M, s_mma, operand,
                )  # fmt: skip
                dv = warpgroup_mma(p_op, do_bufs.index(s), dv, is_async=True)
                dk = warpgroup_mma(ds_op, q_bufs.index(s), dk, is_async=True)
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
                mbarrier.arrive(empty.index(s), count=1)
            mbarrier.arrive(kv_empty.index(pair), count=1)  # the item's GEMMs have read its keys
            # The item's places again, not held across its steps (the same integers).
            _b, _hs, kv_off, _q, _lse, sel, chunk_lo, part_off, _t, _hi, _n = _dkv_item(
                item % n_rel, item // n_rel, IDX, L, P, W, M, S, G, n_chunks, g0, window, q_start, HQ, HKV,
                HS, HEAD_DIM, BLOCK_M,
            )  # fmt: skip
            _dkv_add(
                dk, dv, DK32, DV32, sel, chunk_lo + PART * ROWS, S, W, kv_off, kv_stride, part_off, scale,
                PARTIAL, HEAD_DIM, o_mma,
            )  # fmt: skip
            base += REP * n_steps
            live += 1


@gluon.jit
def ms_attn_bwd_dkv_sel_persistent_kernel(
    Q,
    K,
    V,
    DO,
    DK32,
    DV32,
    LSE,
    DELTA,
    IDX,
    n_items,
    n_rel,
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
    HQ: gl.constexpr,
    HKV: gl.constexpr,
    HS: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
    LOAD_WARPS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PARTIAL: gl.constexpr,
    REGION: gl.constexpr = 0,
    num_warps: gl.constexpr = 4,
):
    """Grid (programs,): ``ms_attn_bwd_dkv_sel_ws_kernel``'s work with row stats and the default
    schedule, as persistent programs. The n_items = Gw * n_chunks * B*HS work items (that kernel's
    programs, in its grid's order) are dealt out every ``num_programs``-th; each program keeps two
    pairs of k/v buffers, so its load warpgroup copies item j + 1's 128 selected k and v rows (and
    the first query steps) while the consumers finish item j and add its sums, where the other
    kernel's consumers start each program by loading their keys themselves and end it with the
    reductions, one program per SM (registers), nothing else on it. The same sums per item."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    if REGION > 0:
        W = REGION
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [4, ROWS, HEAD_DIM], kv_layout)  # [item parity, consumer]
    v_bufs = gl.allocate_shared_memory(dtype, [4, ROWS, HEAD_DIM], kv_layout)
    q_bufs, do_bufs, ready, empty = _ring(dtype, STAGES, BLOCK_M, HEAD_DIM, LOAD_WARPS)
    kv_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(2):
        mbarrier.init(kv_ready.index(j), count=32 * LOAD_WARPS)
        mbarrier.init(kv_empty.index(j), count=2)
    stats_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stats_layout)
    delta_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stats_layout)

    gl.warp_specialize(
        [
            (
                _dkv_persistent_consumer,
                (
                    IDX,
                    DK32,
                    DV32,
                    k_bufs,
                    v_bufs,
                    q_bufs,
                    do_bufs,
                    ready,
                    empty,
                    kv_ready,
                    kv_empty,
                    lse_bufs,
                    delta_bufs,
                    n_items,
                    n_rel,
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
                    0,
                    HQ,
                    HKV,
                    HS,
                    HEAD_DIM,
                    BLOCK_M,
                    STAGES,
                    PARTIAL,
                ),
            ),
            (
                _dkv_persistent_consumer,
                (
                    IDX,
                    DK32,
                    DV32,
                    k_bufs,
                    v_bufs,
                    q_bufs,
                    do_bufs,
                    ready,
                    empty,
                    kv_ready,
                    kv_empty,
                    lse_bufs,
                    delta_bufs,
                    n_items,
                    n_rel,
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
                    1,
                    HQ,
                    HKV,
                    HS,
                    HEAD_DIM,
                    BLOCK_M,
                    STAGES,
                    PARTIAL,
                ),
            ),
            (
                _dkv_persistent_loads,
                (
                    Q,
                    K,
                    V,
                    DO,
                    IDX,
                    LSE,
                    DELTA,
                    k_bufs,
                    v_bufs,
                    q_bufs,
                    do_bufs,
                    ready,
                    empty,
                    kv_ready,
                    kv_empty,
                    lse_bufs,
                    delta_bufs,
                    n_items,
                    n_rel,
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
                    HQ,
                    HKV,
                    HS,
                    HEAD_DIM,
                    BLOCK_M,
                    STAGES,
                    LOAD_WARPS,
                ),
            ),
        ],  # fmt: skip
        [4, LOAD_WARPS],
        [CONSUMER_REGS, LOAD_REGS],
    )
