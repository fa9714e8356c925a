"""MS attention on Triton: host launchers, the reverse index, custom ops and the entry point.

Shape legend: B batch, L tokens, Hq query heads, Hkv kv heads, Hs selection heads (Hq for
scope="head", Hkv for scope="group"), D head dim, w region, T budget, m merge, S = T - m
selected regions per block, G blocks, P = min(T*w, L) dense-prefix tokens, E reverse-index
entries, R region slots per key tile.

Layers (STYLE.md): the ``@triton.jit`` kernels live in ``triton_kernels``; ``ms_attn_fwd`` and
``ms_attn_bwd`` allocate and launch, no autograd; ``torch.ops.ctxlab.ms_attn_fwd`` /
``ms_attn_bwd`` are ``torch.library`` custom ops with fake (meta) implementations, so
``torch.compile`` traces through them, and the forward op carries the autograd formula;
``ms_attention_triton`` is what ``interface.ms_attention(..., backend="triton")`` calls.
``ms_select_triton`` is the fused selection (representatives, scores, per-row top-(T-m) and
the merge; ``ms_select_torch``'s indices); the attention kernels take its indices.

Tensors must be CUDA tensors, or CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1`` when ``triton_kernels`` is imported; kernels are looked up on that
module at each launch, so reloading it switches modes); float32, float16 or bfloat16;
D even and ``>= 32`` on a GPU (a tl.dot needs 16 columns per half).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from ..rope import rope_cos_sin, selected_inv_freq
from . import triton_kernels as tk
from .exact import search_error
from .limits import KERNEL_DTYPES, MIN_GPU_HEAD_DIM
from .torch_impl import _check_start, first_block_at, ms_select_torch, num_blocks

LOG2E = 1.4426950408889634

POISON = False
"""When True, outputs are allocated NaN-filled (-2 for indices), so an element a kernel fails to write shows.
Tests turn it on; it costs one fill per output."""


DKV_PATHS = ("auto", "atomic", "partial", "reverse")
"""Values of ``LaunchConfig.dkv_path``."""

SELECT_IMPLS = ("auto", "torch", "triton", "shallow")
"""Values of ``LaunchConfig.select_impl``."""


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of the three kernels.

    fwd_*, dq_*: forward and dq kernels (same schedule): ``block_m`` query rows per program,
    ``block_n`` keys per step, ``block_m % block_n == 0`` (the unmasked key loop ends at the
    tile's first row). dkv_*: ``block_n`` keys per program (also the reverse index's key tile),
    ``block_m`` query rows per step. sel_*: the atomic kernel for the selected keys' dk, dv,
    ``block_n`` selected tokens per program, ``block_m`` query rows per step.
    select_*: the selection kernel (``ms_select_triton``): ``rows`` voting rows scored at once
    against ``block_j`` regions per step, a ``bins``-way bisection per pass for each row's
    threshold, ``sort_rows`` rows sorted at once, a candidate list of ``capacity`` entries per
    row (0: twice the next power of two >= T-m), ``programs`` persistent programs (0: four per
    SM), ``precision`` of the float32 score dots (``tl.dot``'s input_precision).
    deterministic, dkv_path, dkv_partial_gib: how the backward sums the selected keys' dk/dv
    (``dkv_path``).
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    region_constexpr: bool = False
    """The region size w compiled into the forward and dq kernels (one compile per w), so that
    each selected-key step's ``place // w`` and ``place % w`` (the token of each key) are shifts
    or multiplies, not integer divisions. The same integers, hence the same outputs bit for bit.
    Compiled for sm_90 (Triton 3.6, paper 128K shape): forward 6,064 -> 5,376 instructions at w = 16
    and 4,928 at w = 64, dq 5,096 -> 4,528 and 4,048; the 64 (forward) and 48 (dq) ``div.s32`` of
    the selected-key loops gone. On in ``GPU_CONFIG``, with 2 forward stages: at 3 stages and
    w = 16, Triton 3.6's ptxas serializes the forward's wgmma (C7515: a wait after every HGMMA,
    found by Nsight Compute, session 13), which ate the gain; 2 stages keep them asynchronous.
    Under RoPE on the fly the forward keeps w at run time (and ``rope_fwd_stages``): there the
    constant made it 6-13% slower (paper 64K-128K, H200, session 13); dq takes it either way."""
    rope_fwd_stages: int = 3
    """The forward's pipeline stages under RoPE on the fly (``pe="selected"``; ``fwd_stages``
    otherwise). At paper settings on an H200 (session 13), the RoPE forward took 15-20% less time
    at 3 stages than at 2 (34.8 against 43.7 ms at 64K, 75.4 against 88.9 at 128K)."""
    fwd_gluon: bool = False
    """The forward without RoPE on the fly runs the warp-specialized Gluon kernel
    (``gluon_kernels.ms_attn_fwd_ws_kernel``, sm_90 only): a load partition issues each step's
    k/v rows by ``cp.async`` into a ring of ``gluon_stages`` slots, and two consumer warpgroups
    of 64 query rows each score, take the softmax and accumulate on their own, meeting the loads
    at mbarriers instead of a barrier of all warps every step. Needs ``fwd_block_m`` = 128 and
    ``fwd_block_n`` 64 or 128; applies to bf16/fp16 inputs of head dim 64 or 128 on a CUDA device
    of compute capability 9.x (``gluon_applies``), elsewhere the Triton forward runs. On in
    ``GPU_CONFIG``: 14-20% less time than the Triton forward in all 8 cases, paper and (64, 64, 8),
    32K-256K (H200, Triton 3.6, session 14: paper 64K 18.15 -> 15.42 ms, 428 -> 504 TFLOP/s); 64-key
    steps with 4 slots were 2-9% slower than 128 with 2, 3 slots no faster, and 1 or 2 load warps
    1.9x and 1.15x slower than 4 (paper 64K)."""
    gluon_stages: int = 2
    """Ring slots (k and v tiles of ``fwd_block_n`` rows) of the Gluon forward."""
    gluon_fwd_overlap: bool = False
    """The Gluon forward's consumers overlap each step's softmax with the previous step's p v
    (FlashAttention-3's intra-warpgroup pipelining): step i's scores and step i - 1's p v are
    issued together, the wait leaves p v on the tensor cores while step i's softmax runs, and
    step i - 1's slot is released after it. The same operations in the same order, so the same
    bits (GPU test). A slot is held one step longer: needs ``gluon_stages`` >= 2, and 3 to keep the
    loads ahead. Measured (H200, session 19, forward alone, paper 32K-128K and (64, 64, 8)
    32K-64K): at 2 slots 15-21% slower, at 3 within -6..+1% of the default; off."""
    gluon_fwd_pingpong: bool = False
    """With ``gluon_fwd_overlap``: the two consumers issue their GEMMs in turns (FlashAttention-3's
    ping-pong, by a pair of mbarriers), so one's softmax runs under the other's GEMMs instead of
    both consumers, started by the same slot, reaching the tensor cores and their softmax at once.
    The same bits. Measured (H200, session 19): at 3 slots +0.2..+1.2% against the default, though
    the consumers' waits on their own wgmma fell from 20% to 1.4% of Nsight Compute's samples; the
    tensor pipe stayed 60% busy (kernels/README.md); off."""
    dq_block_m: int = 128
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    dq_gluon: bool = False
    """dq without RoPE on the fly by the warp-specialized Gluon kernel
    (``gluon_kernels.ms_attn_bwd_dq_ws_kernel``): the forward's load partition and two consumer
    warpgroups, each recomputing its 64 rows' scores and dP = do v^T (two wgmma issued together)
    and adding dS k. Needs ``dq_block_m`` = 128 and steps over ``gluon_dq_block_n`` keys; applies where
    ``fwd_gluon`` does (``gluon_applies(..., "dq")``). On in ``GPU_CONFIG``: 12-16% less time
    in dq in all 6 cases timed (H200, Triton 3.6, session 14: paper 32K-128K, (64, 64, 8) 32K-128K;
    paper 64K 22.02 -> 18.40 ms, 529 -> 633 TFLOP/s). 64-key steps with 3 slots were 2-5% faster
    still at 32K and 128K and level at 64K: not adopted, a candidate."""
    gluon_dq_stages: int = 2
    """Ring slots of the Gluon dq kernel (``gluon_dq_block_n`` rows of k and v each)."""
    gluon_dq_block_n: int = 128
    """Keys per step of the Gluon dq kernel (64 or 128; the Triton dq's is ``dq_block_n``). 64 with
    3 slots: 1.4% faster at paper 64K, 1.0% slower at 128K (H200, session 15): 128 kept."""
    gluon_load_warps: int = 4
    """Warps of the Gluon forward's and dq's load partition (a warpgroup: its registers are set per
    warpgroup)."""
    rope_block_n: int = 64
    """With RoPE applied on the fly (``pe="selected"``) forward and dq step over at most this
    many keys: their rotated key tiles take more shared memory. At 128 keys with two stages the
    dq kernel needed 263 KB under Triton 3.6, over the H100's and H200's 227 KB (H200, session 8),
    while 64 is the setting every GPU test of the RoPE path passed with."""
    rotate_q_once: bool = False
    """Under RoPE on the fly (``pe="selected"``): the dk/dv launch first rotates q once at its
    rows' positions into a copy (``ms_rotate_q_kernel``; one more q-sized buffer while it runs)
    and both dk/dv kernels read it as is, instead of loading cos/sin tables and rotating q in
    every query step. Forward and dq load q once per program and rotate it there. The GPU
    default: dk/dv 2.0x faster at paper 64K-128K on an H200, the same values (session 9)."""
    whole_qk: bool = False
    """Forward and dq without RoPE on the fly: q and k whole, their scores one dot over the head
    dim (and dq one accumulator), where by default they go as two halves, two dots of D/2 (the
    layout RoPE on the fly needs). The same function; float32 sums in another order."""
    whole_dkv: bool = False
    """The dk/dv kernels (own segment and selected keys, every path) without RoPE on the fly: q
    and k whole, the scores one dot over the head dim and dk one accumulator, where by default
    they go as two halves (``whole_qk`` for the forward and dq). The same function; float32 sums
    in another order."""
    dkv_block_n: int = 64
    dkv_block_m: int = 64
    dkv_warps: int = 4
    dkv_stages: int = 2
    dkv_tma: bool = False
    """The own-segment dk/dv kernel (``ms_attn_bwd_dkv_kernel``) loads its keys and its query
    steps' q and do through TMA tensor descriptors (Hopper and later) instead of pointer loads.
    Only where the kernels load whole rows (``whole_dkv``, no RoPE on the fly) and the head dim
    is a power of two (a TMA block is the whole head); under the interpreter the descriptors are
    emulated. The same sums as the pointer loads (bit-identical on an H200). Measured within 3%
    of them either way (H200, Triton 3.6, paper and (64, 64, 8) settings, 32K-256K, session 12):
    off; it is the path Triton's Hopper warp specialization needs (``dkv_ws``)."""
    dkv_ws: bool = False
    """With ``dkv_tma``: the own segment's query loop (one loop, every step masked) is
    warp-specialized (Triton's Hopper producer/consumer partitions, ``tl.range(...,
    warp_specialize=True)``, which only take loops fed by TMA descriptors, in a kernel without
    runtime if/else). Triton's Hopper pass asks for ``dkv_warps`` = 4 and, in Triton 3.6, 64-key
    tiles of 64-row steps (128 fail in the pass); not on the reverse index's path, whose loop
    over the selecting blocks it refuses. Measured 6-16% slower dk/dv than without (H200, Triton
    3.6, session 12), hence off; its dk, dv sums differ from the pointer loads' in the last bf16
    bit."""
    sel_block_n: int = 64
    sel_block_m: int = 64
    sel_warps: int = 4
    sel_stages: int = 2
    dkv_gluon: bool = False
    """The dk/dv of the selected keys (the "atomic" and "partial" paths) without RoPE on the fly by
    the warp-specialized Gluon kernel (``gluon_kernels.ms_attn_bwd_dkv_sel_ws_kernel``): chunks of
    128 selected places, two consumer warpgroups of 64 keys each (k and v read by index once, dk
    and dv accumulated in registers), and a load warpgroup streaming the block's query steps
    (``GLUON_DKV_BLOCK_M`` rows of q and do) by ``cp.async`` through ``gluon_dkv_stages`` slots
    that both consumers read. Per step two wgmma give S^T and dP^T, two more add P^T do and dS^T q.
    ``sel_block_n``, ``sel_block_m`` and ``sel_warps`` are the Triton kernel's and do not apply.
    Applies where ``fwd_gluon`` does (``gluon_applies(..., "dkv")``); with ``fused_dq`` it also adds
    dq, by TMA reductions (``FUSED_DQ``: each consumer one head-dim half of the step's dS k over the
    chunk's 128 keys, 4 bytes per pair). Off by default (``LaunchConfig``), where it measured no
    faster than the Triton kernel (H200, Triton 3.6, session 15: the dk/dv stage within
    -3..+1% at paper settings and 1-7% slower at (64, 64, 8), 32K-256K, the partial path's within
    -3..+2%); Nsight Compute put both kernels' tensor pipes at 51% busy (kernels/README.md). On in
    ``GPU_CONFIG`` since session 16, with ``gluon_dkv_row_stats`` (see there)."""
    gluon_dkv_stages: int = 2
    """Ring slots of the Gluon dk/dv kernel (``GLUON_DKV_BLOCK_M`` rows of q and do each)."""
    gluon_dkv_row_stats: bool = False
    """The Gluon dk/dv kernel's load warpgroup copies each step's lse and delta rows into the ring
    slot with q and do, and the consumers read them once the score GEMMs are done, instead of
    loading them from global memory before the GEMMs (32 registers held across them): compiled
    for sm_90 with Triton 3.6, spills 120 -> 48 bytes, with ``fused_dq`` 440 -> 0 (session 16). The
    same sums (GPU test: partial-path bits repeat). Measured (H200, session 16, whole backward,
    against ``GPU_CONFIG`` before it): 2.3-3.8% faster at paper settings, 32K-128K; at (64, 64, 8)
    within -2.2..+2.8%."""
    gluon_dq_early: bool = False
    """With ``fused_dq`` and ``dkv_gluon``: each step's dq GEMM is issued right behind dv += P^T do
    and dk += dS^T q (one wait for the three), not after they have finished. Measured (H200,
    session 16, whole backward, with row stats): -2.8..+1.7% against the late issue (another run),
    and with it 2-11% slower than the dq kernel beside the Gluon dk/dv at paper and (64, 64, 8)
    settings, 32K-128K, so ``fused_dq`` stays off."""
    gluon_dkv_one_wait: bool = False
    """With ``gluon_dkv_row_stats`` (and without ``gluon_split_waits``; where ``fused_dq`` applies,
    the fused kernel's own schedule runs instead): the Gluon
    dk/dv consumers wait once a step for their GEMMs instead of twice. Step i - 1's dv += P^T do and
    dk += dS^T q are issued, then step i's S^T behind them; one wait finishes dv and dk (S^T left in
    flight) and frees step i - 1's slot, then dP^T is issued and waited for. (Issuing both score
    GEMMs there needs P^T, dS^T, S^T, dP^T, dk and dv live at once: ptxas then serializes every
    wgmma for lack of registers.) The same sums in the same order: the partial path's bits equal
    the default's (GPU test). A slot is held into the next step. Measured (H200, session 19, the
    dk/dv stage, paper 64K-128K and (64, 64, 8) 32K-64K): -0.2..+1.5% at 2 slots, up to 7% slower at
    3; off."""
    gluon_dkv_persistent: bool = False
    """Where the Gluon dk/dv takes its default schedule with row stats (``gluon_dkv_row_stats``, and
    no ``fused_dq`` in effect, ``gluon_split_waits`` or ``gluon_dkv_one_wait``, which it then
    yields to: ``dkv_persistent_applies``): the Gluon dk/dv of the selected keys as persistent
    programs, one per SM (``gluon_kernels.ms_attn_bwd_dkv_sel_persistent_kernel``), each taking every
    ``programs``-th chunk of the launch. Its load warpgroup copies the next chunk's 128 k and v
    rows by ``cp.async`` into a second pair of buffers (and that chunk's first query steps into
    the ring) while the consumers finish the current chunk and add its sums, where the one-shot
    kernel's consumers load their keys themselves at the start of each program (a barrier: the
    hottest wait of the (64, 64, 8) profile, session 18) and the SM holds nothing else while they
    add dk, dv at its end. The same sums per chunk (GPU test: partial-path bits equal the
    default's). 198 KB of shared memory at 2 slots, so 2 is the most slots it takes. Measured
    (H200, Triton 3.6, session 20, against the one-shot kernel in the same runs): the dk/dv stage
    1.3-3.4% faster (paper 64K with 32 kv heads 32.47 -> 31.94 ms, with 8 kv heads 64K 31.86 ->
    31.07, 128K 65.60 -> 64.74; (64, 64, 8) 32K 9.53 -> 9.21, 64K 19.76 -> 19.47), the whole
    backward 0.9-3.9% (paper 32K-128K, (64, 64, 8) 32K), and in the 7B LoRA+ step at 64K the
    kernel 941 against 997 ms a step. On in ``GPU_CONFIG`` since session 20."""
    gluon_dkv_programs: int = 0
    """Programs of the persistent dk/dv kernel (``gluon_dkv_persistent``): 0 for one per SM (what it
    is built for; it needs the whole SM), fewer to give each program more chunks (the tests)."""
    gluon_dkv_consumer_regs: int = 232
    """Registers per thread of the Gluon dk/dv kernel's consumer warpgroups (``setmaxnreg``); its
    load warpgroup keeps the rest of the register file, ``504 - 2 *`` this (232: 40, 240: 24)."""
    gluon_split_waits: bool = False
    """The Gluon dq and dk/dv consumers wait for their score GEMMs one at a time: P (P^T) is
    formed while dP (dP^T) is still on the tensor cores, and in dk/dv dS^T while dv += P^T do is
    (``WARPGROUP.DEPBAR`` with one group left in flight), where by default each step waits for both
    score GEMMs, then for both of its update GEMMs. The same sums. Compiled for sm_90 without
    spills beyond the default's (session 15); not yet timed, so off."""
    select_rows: int = 16
    select_block_j: int = 64
    select_bins: int = 16
    select_sort_rows: int = 2
    select_capacity: int = 0
    select_programs: int = 0
    select_warps: int = 4
    select_precision: str = "ieee"
    select_order: str = "block"
    """The order the selection kernels' persistent programs take items (b, hs, g) in, larger g
    first either way: ``"block"`` across all heads, ``"kv"`` one (b, kv head) at a time, so
    the programs running at once share one kv head's key representatives (at paper settings
    and 256K the eight kv heads' representatives take 64 MiB, over an H100's or H200's 50 MiB
    L2). The same indices either way."""
    select_impl: str = "auto"
    """Which selection ``ms_attention_triton`` runs: ``"torch"`` (``ms_select_torch``),
    ``"triton"`` (the fused full-depth ``ms_select_triton``), ``"shallow"``
    (``ms_select_shallow``: each row's ``shallow_k`` best only, the full-depth kernel for the
    blocks that need more) or ``"auto"``: shallow when its search runs on tensor cores
    (``shallow_rescore``, the GPU default), or when ``merge >= SHALLOW_MIN_MERGE`` (its tile of
    voting rows is then full), else torch. The same indices either way. Measured
    (kernels/README.md): with the ieee search shallow beat torch's topk at the paper's m = 64 at
    every length (H200, 128K: 91 vs 157 ms) and lost at m = 8 from 64K (128K: 20 vs 13 ms); with
    the re-scored tf32 search it beat torch's at m = 64 and m = 8 at every length from 32K to
    256K (H100, 128K: 32.7 vs 169.6 and 10.6 vs 14.7 ms)."""
    shallow_k: int = 32
    """Ranks per row the shallow selection keeps (a power of two, >= 16 for the sort)."""
    shallow_cap: int = 128
    """Candidates per row the shallow selection's second pass may collect (a power of two,
    >= shallow_k and >= shallow_block_j); a row with more sends its block to the full kernel."""
    shallow_retry_k: int = 0
    """0, or the ranks per row of a second shallow run over the items the first one flagged (a
    power of two > ``shallow_k``, <= ``shallow_block_j``), with lists of ``shallow_retry_cap``;
    the full-depth kernel then redoes what that run flags. A block with few more candidates than
    it selects (the first selecting blocks: at paper settings 512 candidates for 448 places)
    needs deep ranks, one such block per head; the retry keeps them off the full-depth kernel."""
    shallow_retry_cap: int = 128
    """Candidates per row of the retry run (``shallow_retry_k``): a power of two >= it and >=
    ``shallow_block_j``."""
    shallow_block_j: int = 64
    """Regions per step of the shallow selection (its lane count; >= shallow_k, >= 16)."""
    shallow_sort_rows: int = 4
    """Rows the shallow selection sorts at once."""
    shallow_warps: int = 8
    shallow_stages: int = 3
    """Pipeline stages of the shallow selection's loads (Triton's num_stages)."""
    shallow_maxnreg: int = 0
    """Registers per thread the shallow selection may use (0: ptxas decides; it takes 254 with 8
    warps, one program per SM); Triton's maxnreg."""
    shallow_mask_steps: int = 0
    """0, or a power of two: with ``shallow_rescore`` (and ``shallow_block_j`` <= 64), the second
    pass keeps one bit mask per row and step, and appends the regions of every
    ``shallow_mask_steps`` steps' masks to the lists at once, keyless (the re-scoring computes
    the keys; without re-scoring the lists need the search's keys, so the setting is ignored).
    It saves the per-step prefix sum and scatter, which Triton runs through shared memory: in
    the sm_90 code (Triton 3.9) the second pass's step has 806 instructions and 15 barriers with
    them, 465 and 5 without. The same indices either way."""
    shallow_rescore: bool = False
    """Search in ``select_precision`` (tf32x3 or tf32: tensor cores) and rank in float32: each
    row's bound is lowered by twice the two roundings' distance (``exact.search_error``) and the
    candidates it collects are re-scored in float32, summed as the ieee dot sums (one FMA per
    column, in order), before the sort. The indices are then the exact (ieee) selection's, bit
    for bit, whatever the search rounded. With it, ``select_precision`` is the shallow search's
    only: the full-depth kernel (``select_impl="triton"``, and the blocks the shallow selection
    sends to it) scores in ieee. The GPU default (``GPU_CONFIG``): a tf32 search re-scored,
    5-7x faster than the ieee search at 128K-256K on an H200 (kernels/README.md)."""
    shallow_rescore_cols: int = 1
    """Columns of a candidate's representative the re-scoring reads per lane and step: 1 (one
    4-byte column) or 4 (16 contiguous bytes, split in registers: the same FMAs in the same
    order, so the same bits). Four (the GPU default) halved the selection's time on an H200
    (paper settings, 256K: 46.6 against 84.4 ms; session 8, kernels/README.md)."""
    shallow_score_err: float = 0.0
    """The search's distance bound per unit of |qbar| max|kbar| (0: ``exact.search_error`` of
    ``select_precision``); a larger value collects more, a smaller one is not safe."""
    shallow_fault: bool = False
    """Tests only: move the search's scores by a pseudo-random amount within the bound, as a
    coarser precision may round them; re-scoring must undo it."""
    deterministic: bool = False
    """Bitwise-identical gradients run to run, as ``torch.use_deterministic_algorithms(True)``
    asks (either one is enough): the selected keys' dk/dv then never go through atomics."""
    dkv_path: str = "auto"
    """How the selected keys' dk/dv are summed over the blocks that selected them: "atomic"
    (relaxed float32 atomics), "partial" (per-block partial sums, then a fixed-order reduction;
    deterministic), "reverse" (the reverse index; deterministic) or "auto": "reverse" when w is a
    multiple of ``dkv_block_n`` (no lane wasted) and every kv head serves one query head, else
    "partial" in deterministic mode and "atomic" otherwise (H200 measurements at ``dkv_path``)."""
    fused_dq: bool = False
    """dq added inside the dk/dv kernels, each query step's dS k into a float32 dq buffer (laid
    out as q: 4 bytes per element, B*L*Hq*D) with relaxed atomics, and no dq kernel: the
    backward then computes 5 products per query-key pair, not 7 (the dq kernel's second
    recompute of the scores and dP is gone), at the cost of 4*D/block_n bytes of float32
    reductions per computed pair (block_n: the dk/dv program's keys). Measured 6-22% slower
    than the dq kernel on an H200 (session 11, kernels/README.md), hence off. With ``dkv_gluon`` the
    selected keys' dq is added by the TMA unit instead (cp.reduce.async.bulk, 4 bytes per pair):
    with ``gluon_dkv_row_stats`` (no spills) within -2.1..+1.4% of the dq kernel beside the Triton
    dk/dv at paper 64K-128K, 3-14% slower at paper 32K and at (64, 64, 8), and 2-11% slower than
    the dq kernel beside the Gluon dk/dv (session 16); with 15% fewer instructions executed (no
    select, no multiply in its steps: dS k is summed unscaled and scaled once) still 1-13% slower
    (session 18: latency-bound, kernels/README.md). The own segment's dq was the loss: with
    ``fused_dq_finish`` (the dq kernel runs the own segment's steps only and adds the buffer) the
    whole backward took 3.5-7.0% less time than with the dq kernel at paper settings, 64K-128K, and
    the 7B LoRA+ step at 64K 9.025 s against S2's 9.054 (H200, session 21), so ``GPU_CONFIG`` has it
    on where a block has 1024 query rows or more (``fused_dq_min_block``). Applies only
    outside deterministic mode (the atomics' order varies, and with it dq's last bits) and
    without RoPE on the fly (``pe="selected"``: the keys there carry per-block rotations);
    otherwise the dq kernel runs."""
    fused_dq_finish: bool = True
    """With ``fused_dq`` on the "atomic" path (``dq_finish_applies``): the own segment's dq (the
    prefix's, and each block's own keys) comes from the dq kernel (Gluon or Triton, as ``dq_gluon``
    decides) run over those steps only, which then adds the selected keys' sums that the dk/dv
    kernels left in the float32 buffer, scales and casts (``DQ32``), instead of from relaxed
    atomics in the own-segment Triton dk/dv kernel (4 bytes a pair). By Nsight Compute and the
    stage timings of sessions 16-18 those atomics were where the fused path lost what it saved: at
    paper 64K the Gluon dk/dv of the selected keys took about 12 ms more with dq inside, against
    the dq kernel's 18.5, while the own-segment kernel with dq took about 7 ms more than without.
    Measured (H200, session 21, whole backward, fused at 240 registers): with it 51.32 -> 47.72 ms
    against the dq kernel at paper 64K with 32 kv heads, where without it (the atomics) 54.58."""
    fused_dq_min_block: int = 0
    """``fused_dq`` applies only where a block has at least this many query rows (m·w): a dk/dv
    program of the selected keys then runs m·w/64 query steps, over which its dq reductions and its
    keys' gathering are spread. ``GPU_CONFIG`` takes 1024 (H200, session 21, whole backward with
    ``fused_dq_finish`` against the dq kernel: 3.5-7.0% less time at paper settings, m·w = 1024,
    64K-128K; 1.3% more at (64, 64, 8), m·w = 512, 32K)."""
    gluon_dkv_fused_regs: int = 0
    """Registers per thread of the Gluon dk/dv consumers with dq inside (``fused_dq``); 0 takes
    ``gluon_dkv_consumer_regs``. ``GPU_CONFIG`` takes 240 (H200, session 21, whole backward at paper
    64K-128K: 1.9-3.6% less time than at 232; session 18 found the same)."""
    dkv_partial_gib: float = 1.0
    """GiB of float32 partial sums "partial" may hold at once (dk and dv together): the blocks
    go through it in windows, one window's partial sums and reduction at a time."""

    def key_step(self, kernel: str, rope: bool) -> int:
        """Keys per step of the forward (``kernel="fwd"``) or dq kernel: its ``block_n``, at most
        ``rope_block_n`` under RoPE on the fly."""
        block_n = getattr(self, f"{kernel}_block_n")
        return min(block_n, self.rope_block_n) if rope else block_n

    def stages(self, kernel: str, rope: bool) -> int:
        """Pipeline stages of the forward (``kernel="fwd"``) or dq kernel: ``rope_fwd_stages`` for
        the forward under RoPE on the fly, else its ``*_stages``."""
        return self.rope_fwd_stages if rope and kernel == "fwd" else getattr(self, f"{kernel}_stages")

    def region_const(self, kernel: str, rope: bool, region: int) -> int:
        """The forward's, dq's or Gluon dk/dv's ``REGION`` constexpr for region size ``region``: the
        size itself with ``region_constexpr`` (except the forward under RoPE on the fly), else 0
        (run time)."""
        return region if self.region_constexpr and not (rope and kernel == "fwd") else 0

    def __post_init__(self) -> None:
        if self.rope_fwd_stages < 1:
            raise ValueError(f"rope_fwd_stages must be >= 1, got {self.rope_fwd_stages}")
        for name in (
            "fwd_block_m",
            "fwd_block_n",
            "dq_block_m",
            "dq_block_n",
            "rope_block_n",
            "dkv_block_n",
            "dkv_block_m",
            "sel_block_n",
            "sel_block_m",
            "select_rows",
            "select_block_j",
            "select_bins",
            "select_sort_rows",
            "shallow_k",
            "shallow_cap",
            "shallow_retry_cap",
            "shallow_block_j",
            "shallow_sort_rows",
        ):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.fwd_block_m % self.fwd_block_n:
            raise ValueError("fwd_block_m must be a multiple of fwd_block_n")
        if self.dq_block_m % self.dq_block_n:
            raise ValueError("dq_block_m must be a multiple of dq_block_n")
        if self.rope_block_n < 16:
            raise ValueError(f"rope_block_n must be >= 16 (a tl.dot side), got {self.rope_block_n}")
        if self.select_rows < 16 or self.select_block_j < 16:
            raise ValueError("select_rows and select_block_j must be >= 16 (they are tl.dot sides)")
        if self.select_rows % self.select_sort_rows:
            raise ValueError("select_rows must be a multiple of select_sort_rows")
        if self.select_bins < 2:
            raise ValueError(f"select_bins must be >= 2, got {self.select_bins}")
        if self.select_capacity < 0 or self.select_capacity & (self.select_capacity - 1):
            raise ValueError(
                f"select_capacity must be 0 (auto) or a power of two, got {self.select_capacity}"
            )
        if self.select_programs < 0:
            raise ValueError(f"select_programs must be >= 0 (0: auto), got {self.select_programs}")
        if self.select_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"select_precision must be ieee, tf32x3 or tf32, got {self.select_precision!r}")
        if self.select_impl not in SELECT_IMPLS:
            raise ValueError(f"select_impl must be one of {SELECT_IMPLS}, got {self.select_impl!r}")
        if self.select_order not in ("block", "kv"):
            raise ValueError(f"select_order must be block or kv, got {self.select_order!r}")
        flags = ("shallow_rescore", "shallow_fault", "whole_qk", "rotate_q_once", "fused_dq",
                 "fused_dq_finish", "whole_dkv", "dkv_tma", "dkv_ws", "region_constexpr", "fwd_gluon",
                 "dq_gluon", "dkv_gluon")  # fmt: skip
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.shallow_k < 16 or self.shallow_block_j < self.shallow_k:
            raise ValueError(
                f"shallow_k must be >= 16 and <= shallow_block_j, got {self.shallow_k} and "
                f"{self.shallow_block_j}"
            )
        if self.shallow_retry_k and (
            self.shallow_retry_k & (self.shallow_retry_k - 1)
            or not self.shallow_k < self.shallow_retry_k <= self.shallow_block_j
            or self.shallow_retry_cap < max(self.shallow_retry_k, self.shallow_block_j)
        ):
            raise ValueError(
                f"shallow_retry_k must be 0 or a power of two > shallow_k and <= shallow_block_j, with "
                f"shallow_retry_cap >= both, got shallow_retry_k={self.shallow_retry_k}, shallow_k="
                f"{self.shallow_k}, shallow_block_j={self.shallow_block_j}, shallow_retry_cap="
                f"{self.shallow_retry_cap}"
            )
        if self.shallow_stages < 1 or self.shallow_maxnreg < 0:
            raise ValueError(
                f"shallow_stages must be >= 1 and shallow_maxnreg >= 0 (0: ptxas decides), got "
                f"{self.shallow_stages} and {self.shallow_maxnreg}"
            )
        if self.shallow_mask_steps < 0 or self.shallow_mask_steps & (self.shallow_mask_steps - 1):
            raise ValueError(f"shallow_mask_steps must be 0 or a power of two, got {self.shallow_mask_steps}")
        if self.shallow_mask_steps and self.shallow_rescore and self.shallow_block_j > 64:
            raise ValueError(
                f"shallow_mask_steps={self.shallow_mask_steps} keeps one int64 mask per step, so it "
                f"needs shallow_block_j <= 64, got {self.shallow_block_j} (or set shallow_mask_steps=0)"
            )
        if self.shallow_rescore_cols not in (1, 4):
            raise ValueError(f"shallow_rescore_cols must be 1 or 4, got {self.shallow_rescore_cols!r}")
        if not self.shallow_score_err >= 0:
            raise ValueError(f"shallow_score_err must be >= 0, got {self.shallow_score_err!r}")
        if self.shallow_cap < self.shallow_block_j:
            raise ValueError(
                f"shallow_cap must be >= shallow_block_j (the lanes are sorted in its rows), got "
                f"{self.shallow_cap} < {self.shallow_block_j}"
            )
        if self.dkv_path not in DKV_PATHS:
            raise ValueError(f"dkv_path must be one of {DKV_PATHS}, got {self.dkv_path!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be a bool, got {self.deterministic!r}")
        if self.deterministic and self.dkv_path == "atomic":
            raise ValueError(
                "deterministic=True cannot be honoured with dkv_path='atomic' (float atomics add in "
                "a varying order): choose dkv_path 'auto', 'partial' or 'reverse'"
            )
        if self.fwd_gluon and (self.fwd_block_m != 128 or self.fwd_block_n not in (64, 128)):
            raise ValueError(
                f"fwd_gluon=True needs fwd_block_m=128 (two consumer warpgroups of 64 rows) and "
                f"fwd_block_n 64 or 128, got {self.fwd_block_m} and {self.fwd_block_n}"
            )
        if self.dq_gluon and (self.dq_block_m != 128 or self.gluon_dq_block_n not in (64, 128)):
            raise ValueError(
                f"dq_gluon=True needs dq_block_m=128 (two consumer warpgroups of 64 rows) and "
                f"gluon_dq_block_n 64 or 128, got {self.dq_block_m} and {self.gluon_dq_block_n}"
            )
        if self.gluon_dq_stages < 1:
            raise ValueError(f"gluon_dq_stages must be >= 1, got {self.gluon_dq_stages}")
        if self.gluon_dkv_stages < 1:
            raise ValueError(f"gluon_dkv_stages must be >= 1, got {self.gluon_dkv_stages}")
        if self.gluon_dkv_consumer_regs % 8 or not 232 <= self.gluon_dkv_consumer_regs <= 240:
            raise ValueError(
                f"gluon_dkv_consumer_regs must be 232 or 240, got {self.gluon_dkv_consumer_regs}"
            )
        if self.gluon_dkv_fused_regs and (
            self.gluon_dkv_fused_regs % 8 or not 232 <= self.gluon_dkv_fused_regs <= 240
        ):
            raise ValueError(
                f"gluon_dkv_fused_regs must be 0 (gluon_dkv_consumer_regs), 232 or 240, got "
                f"{self.gluon_dkv_fused_regs}"
            )
        if not isinstance(self.fused_dq_min_block, int) or self.fused_dq_min_block < 0:
            raise ValueError(f"fused_dq_min_block must be an int >= 0, got {self.fused_dq_min_block!r}")
        if self.gluon_dkv_one_wait and (not self.gluon_dkv_row_stats or self.gluon_split_waits):
            raise ValueError(
                "gluon_dkv_one_wait=True needs gluon_dkv_row_stats=True and gluon_split_waits=False, "
                f"got {self.gluon_dkv_row_stats}, {self.gluon_split_waits}"
            )
        if not isinstance(self.gluon_dkv_programs, int) or self.gluon_dkv_programs < 0:
            raise ValueError(
                f"gluon_dkv_programs must be an int >= 0 (0: one per SM), got {self.gluon_dkv_programs!r}"
            )
        if self.gluon_fwd_pingpong and not self.gluon_fwd_overlap:
            raise ValueError(
                "gluon_fwd_pingpong=True needs gluon_fwd_overlap=True (the turns are taken in its steps)"
            )
        if self.gluon_fwd_overlap and self.gluon_stages < 2:
            raise ValueError(
                f"gluon_fwd_overlap=True needs gluon_stages >= 2 (each slot is held into the next step), "
                f"got gluon_stages={self.gluon_stages}"
            )
        if self.gluon_stages < 1 or self.gluon_load_warps not in (1, 2, 4):
            raise ValueError(
                f"gluon_stages must be >= 1 and gluon_load_warps 1, 2 or 4, got {self.gluon_stages} "
                f"and {self.gluon_load_warps}"
            )
        if self.dkv_ws and not self.dkv_tma:
            raise ValueError("dkv_ws=True needs dkv_tma=True (warp specialization takes TMA-fed loops)")
        if not self.dkv_partial_gib > 0:
            raise ValueError(f"dkv_partial_gib must be > 0, got {self.dkv_partial_gib!r}")


GPU_CONFIG = LaunchConfig(
    fwd_block_n=128,
    fwd_stages=2,
    region_constexpr=True,
    fwd_gluon=True,
    dq_gluon=True,
    dq_block_n=128,
    whole_qk=True,
    rotate_q_once=True,
    select_precision="tf32",
    shallow_rescore=True,
    shallow_rescore_cols=4,
    shallow_mask_steps=16,
    shallow_warps=4,
    shallow_stages=2,
    shallow_k=16,
    shallow_cap=64,
    shallow_retry_k=32,
    whole_dkv=True,
    dkv_gluon=True,
    gluon_dkv_row_stats=True,
    gluon_dkv_persistent=True,
    fused_dq=True,
    fused_dq_min_block=1024,
    gluon_dkv_fused_regs=240,
)
"""The launch settings on CUDA: the shallow selection searches with tf32 dots and re-scores its
candidates in float32 (``shallow_rescore``, four columns per load), so its indices are those of the
ieee selection; its second pass keeps bit masks (``shallow_mask_steps``), and it runs 4 warps and 2
stages, two programs per SM (H200, session 10, paper 256K: 46.5 -> 33.7 ms with masks expanded
every 64 steps, 38.7 with masks alone); each row keeps its 16 best (``shallow_k``) in a list of 64
(``shallow_cap``), and the blocks that need deeper rows (one per head at paper settings, the first
that selects) are retried at 32 of 128 (``shallow_retry_k``) before the full-depth kernel (H200,
session 17, paper 32K / 64K / 128K / 256K, one run: 1.69 / 3.98 / 10.69 / 30.31 ms with 32 of 128,
2.43 / 4.06 / 8.91 / 24.18 with 16 of 64 and the full-depth kernel redoing 32-33 items, 1.64 /
3.69 / 8.07 / 23.67 with the retry; every block's indices equal to ``ms_select_torch``'s); forward
and dq step over 128 keys (forward in two stages), with the
region size compiled in, and, without RoPE on the fly, score with one dot over the head dim
(``whole_qk``); under RoPE on the fly the dk/dv kernels read q rotated once
(``rotate_q_once``), and without it they too score with one dot (``whole_dkv``). Each setting was
timed against the one it replaced in one run (H200, paper settings, 32K-256K): the selection
2.0-2.5x faster and forward + backward 4.5-7.4% faster (session 8); whole rows 1-5% faster forward
and 5-6% faster dq, then three forward stages 3-4% faster forward (64K-256K, session 9,
``kernels/bench/stage_sweep.py``); under RoPE on the fly q rotated once for dk/dv, 2.0x faster
dk/dv (paper 64K-128K, session 9); whole rows in dk/dv 0.5-1.5% faster forward + backward in all 8
cases, paper and (64, 64, 8), 32K-256K (session 11, one run). ``fused_dq`` stays off: dq by atomics
inside dk/dv made the whole backward 6-22% slower in every case (its best tile variant per case;
session 11, kernels/README.md). ``dkv_tma`` and ``dkv_ws`` stay off: TMA loads within 3% of the
pointer loads, the warp-specialized loop 6-16% slower dk/dv (session 12). The region size compiled
into forward and dq (``region_constexpr``) with the forward back at 2 stages: forward + dq 3.6-5.3%
faster at paper settings and 9-12% faster at (64, 64, 8), 32K-256K, against the previous default in
one run (session 13); at 3 stages the forward's wgmma were serialized. Under RoPE on the fly the
forward keeps w at run time and 3 stages (``rope_fwd_stages``): 15-20% less time there. On
Hopper the forward without RoPE on the fly is the warp-specialized Gluon kernel (``fwd_gluon``):
14-20% less time than the Triton forward above in all 8 cases, paper and (64, 64, 8), 32K-256K
(H200, session 14, one run: paper 64K 18.15 -> 15.42 ms, 428 -> 504 TFLOP/s), and dq the Gluon
dq kernel (``dq_gluon``): 12-16% less time in dq (paper 64K 22.02 -> 18.40 ms). The dk/dv of the
selected keys is the Gluon kernel with the rows' lse and delta through its ring (``dkv_gluon``,
``gluon_dkv_row_stats``): the whole backward 2.3-3.8% faster at paper settings, 32K-128K, in two
runs (H200, session 16: paper 64K 53.24 -> 52.00 and 53.85 -> 52.11 ms), and at (64, 64, 8) within
-2.2..+2.8% (slower at 64K in both runs); since session 20 as persistent programs
(``gluon_dkv_persistent``: the whole backward 0.9-3.9% faster, paper 32K-128K and (64, 64, 8) 32K).
Since session 21, where a block has 1024 query rows or more (the paper's 16 x 64), dq is summed
inside the Gluon dk/dv (``fused_dq``, 240 registers a consumer, ``gluon_dkv_fused_regs``) and
finished by the Gluon dq kernel over the own segment (``fused_dq_finish``): the whole backward
51.32 -> 47.72 ms at paper 64K with 32 kv heads, 50.15 -> 47.12 and 104.71 -> 101.00 with 8 kv heads
at 64K and 128K (H200, one run); at (64, 64, 8) 32K it was 1.3% slower, so smaller blocks keep
the dq kernel and the persistent dk/dv."""
INTERPRETER_CONFIG = LaunchConfig(
    fwd_block_m=16,
    fwd_block_n=16,
    dq_block_m=16,
    dq_block_n=16,
    dkv_block_n=16,
    dkv_block_m=16,
    sel_block_n=16,
    sel_block_m=16,
    select_block_j=16,
    select_sort_rows=16,
    select_programs=3,
    select_impl="shallow",  # CPU tests run the Triton selections (shallow, then full) end to end
    shallow_k=16,
    shallow_cap=64,
    shallow_block_j=32,
    shallow_sort_rows=16,
    shallow_warps=4,
)


def interpreted() -> bool:
    """Whether the kernels were defined under Triton's CPU interpreter."""
    return type(tk.ms_attn_fwd_kernel).__name__ == "InterpretedFunction"


SHALLOW_MIN_MERGE = 32
"""``select_impl="auto"`` runs the shallow selection from this many merged regions per block."""


def resolve_select_impl(config: LaunchConfig, merge: int) -> str:
    """The selection ``config.select_impl`` ("auto" or one of the others) runs for blocks of
    ``merge`` regions (``LaunchConfig.select_impl`` says how "auto" decides)."""
    if config.select_impl == "auto":
        return "shallow" if config.shallow_rescore or merge >= SHALLOW_MIN_MERGE else "torch"
    return config.select_impl


def default_config(device: torch.device) -> LaunchConfig:
    return GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG


class LaunchResourceError(RuntimeError):
    """A kernel's launch settings need more of a GPU resource (shared memory, registers) than the
    card has; the message names the kernel and the ``LaunchConfig`` fields that decide it."""


@contextlib.contextmanager
def launch_settings(kernel: str, config: LaunchConfig, *prefixes: str, rope: bool = False):
    """Turns Triton's ``OutOfResources`` raised by the launch of ``kernel`` inside the block into
    a ``LaunchResourceError`` naming the fields of ``config`` that start with one of ``prefixes``
    (``rope_block_n`` too where ``rope``), so the settings to lower are the ones named."""
    try:
        yield
    except OutOfResources as e:
        names = [f.name for f in dataclasses.fields(config) if f.name.startswith(prefixes)]
        if rope:
            names.append("rope_block_n")
            if kernel == "ms_attn_fwd_kernel":
                names.append("rope_fwd_stages")
        settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in names)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "this device"
        raise LaunchResourceError(
            f"{kernel} needs {e.required} of {e.name} where {device} has {e.limit}, with the "
            f"launch settings {settings}: lower the block sizes or stages among them "
            "(dataclasses.replace(triton_impl.GPU_CONFIG, ...), or --launch KEY=VALUE in the "
            "benchmarks)"
        ) from e


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON:
        # Integer outputs (region indices) get -2: neither a region nor the -1 padding.
        fill = float("nan") if dtype.is_floating_point else -2
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Geometry:
    """How L tokens split into the dense prefix and G blocks, and into tiles of ``block``.

    Tiles never straddle segments: ``n_pre_tiles`` tiles cover [0, P), then each block
    [P + g*m*w, min(P + (g+1)*m*w, L)) gets ``tiles_per_block`` tiles (the last block fewer).
    """

    L: int
    region: int
    budget: int
    merge: int
    G: int
    P: int
    block: int
    n_pre_tiles: int
    tiles_per_block: int
    n_tiles: int

    @staticmethod
    def of(L: int, region: int, budget: int, merge: int, block: int) -> Geometry:
        G = num_blocks(L, region, budget, merge)
        P = L if G == 0 else budget * region
        n_pre = triton.cdiv(P, block)
        per_block = triton.cdiv(merge * region, block)
        n_tiles = n_pre
        if G > 0:
            last = L - (P + (G - 1) * merge * region)
            n_tiles += (G - 1) * per_block + triton.cdiv(last, block)
        return Geometry(L, region, budget, merge, G, P, block, n_pre, per_block, n_tiles)

    def tile_start(self, tile: Tensor) -> Tensor:
        """First token of each tile (any integer tensor of tile numbers)."""
        rel = tile - self.n_pre_tiles
        in_block = (
            self.P
            + torch.div(rel, self.tiles_per_block, rounding_mode="floor") * (self.merge * self.region)
            + torch.remainder(rel, self.tiles_per_block) * self.block
        )
        return torch.where(tile < self.n_pre_tiles, tile * self.block, in_block)

    def tile_of(self, tok: Tensor) -> Tensor:
        """Tile holding each token."""
        mw = self.merge * self.region
        rel = tok - self.P
        in_block = (
            self.n_pre_tiles
            + torch.div(rel, mw, rounding_mode="floor") * self.tiles_per_block
            + torch.div(torch.remainder(rel, mw), self.block, rounding_mode="floor")
        )
        return torch.where(tok < self.P, torch.div(tok, self.block, rounding_mode="floor"), in_block)

    def first_tile(self, start: int) -> int:
        """The tile holding token ``start`` (an int): the first a call from row ``start`` runs."""
        if start < self.P:
            return start // self.block
        g, within = divmod(start - self.P, self.merge * self.region)
        return self.n_pre_tiles + g * self.tiles_per_block + within // self.block

    def segment_end(self, tile: Tensor) -> Tensor:
        """One past the last token of each tile's segment."""
        g = torch.div(tile - self.n_pre_tiles, self.tiles_per_block, rounding_mode="floor")
        block_end = torch.clamp(self.P + (g + 1) * self.merge * self.region, max=self.L)
        return torch.where(tile < self.n_pre_tiles, torch.full_like(tile, self.P), block_end)


def sort_selection(idx: Tensor) -> Tensor:
    """Each block's selected regions ascending, -1 padding last: int32 ``[B, Hs, G, S]``.

    The kernels read a block's keys in this order; under ``pe="selected"`` a region's rank
    in it is its position slot (as in ``ms_attend_torch``).
    """
    pad = torch.iinfo(torch.int32).max
    idx = idx.to(torch.int32)
    ordered = torch.where(idx < 0, pad, idx).sort(dim=-1).values
    return torch.where(ordered == pad, -1, ordered).contiguous()


@dataclass(frozen=True)
class ReverseIndex:
    """For each (b, hs, key tile), the blocks that selected one of the tile's regions.

    ``offsets`` int32 ``[B*Hs*n_tiles + 1]`` (CSR over ``(b*Hs + hs)*n_tiles + tile``);
    ``block`` int32 ``[E]``, ascending within a tile; ``rank`` int32 ``[E, R]``: rank of the
    tile's region slot r (``region - tile_start // w``) in the block's sorted selection, or -1;
    ``order`` int32 ``[n_tiles]``: tiles by decreasing work, so the programs of popular
    regions (attention sinks: selected by nearly every block) start first.
    """

    offsets: Tensor
    block: Tensor
    rank: Tensor
    order: Tensor
    slots: int


def reverse_index(idx_sorted: Tensor, geo: Geometry) -> ReverseIndex:
    """Build the dk/dv kernel's reverse index from the sorted selection ``[B, Hs, G, S]``."""
    B, Hs, G, S = idx_sorted.shape
    dev = idx_sorted.device
    w, bn = geo.region, geo.block
    slots = (bn - 1) // w + 2
    n_keys = B * Hs * geo.n_tiles
    if G == 0:
        order = torch.arange(geo.n_tiles, device=dev, dtype=torch.int32)
        return ReverseIndex(
            torch.zeros(n_keys + 1, dtype=torch.int32, device=dev),
            torch.zeros(1, dtype=torch.int32, device=dev),
            torch.full((1, slots), -1, dtype=torch.int32, device=dev),
            order,
            slots,
        )
    region = idx_sorted.long()
    valid = region >= 0
    rank = torch.arange(S, device=dev).expand_as(region)
    g = torch.arange(G, device=dev)[:, None].expand_as(region)
    bhs = torch.arange(B * Hs, device=dev).view(B, Hs, 1, 1).expand_as(region)
    first = geo.tile_of(region.clamp_min(0) * w)
    last = geo.tile_of(region.clamp_min(0) * w + w - 1)
    keys, ranks, slot_of = [], [], []
    for c in range(triton.cdiv(w, bn) + 1):  # tiles a region overlaps
        tile = first + c
        ok = valid & (tile <= last)
        slot = region - torch.div(geo.tile_start(tile), w, rounding_mode="floor")
        keys.append(((bhs * geo.n_tiles + tile) * G + g)[ok])
        ranks.append(rank[ok])
        slot_of.append(slot[ok])
    key = torch.cat(keys)
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    rank_tab = torch.full((uniq.numel(), slots), -1, dtype=torch.int32, device=dev)
    rank_tab[inverse, torch.cat(slot_of)] = torch.cat(ranks).to(torch.int32)
    bhs_tile = torch.div(uniq, G, rounding_mode="floor")
    counts = torch.bincount(bhs_tile, minlength=n_keys)
    offsets = torch.zeros(n_keys + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)

    tiles = torch.arange(geo.n_tiles, device=dev)
    own = geo.segment_end(tiles) - geo.tile_start(tiles)
    selected = counts.view(B * Hs, geo.n_tiles).sum(0) * (geo.merge * w)
    order = torch.argsort(own * B * Hs + selected, descending=True, stable=True)
    return ReverseIndex(
        offsets.to(torch.int32),
        (uniq % G).to(torch.int32),
        rank_tab,
        order.to(torch.int32),
        slots,
    )


def rope_tables(n_pos: int, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin ``[n_pos, D/2]`` float32 of positions ``0 .. n_pos-1`` rotated by ``inv_freq``
    ``[D/2]`` (a position scheme's; angles in float64, as ``kernels/rope.py``)."""
    cos, sin = rope_cos_sin(torch.arange(n_pos, device=inv_freq.device), inv_freq)
    half = inv_freq.shape[0]
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def _tables(rope: bool, geo: Geometry, head_dim: int, inv_freq: Tensor, device: torch.device):
    if rope:
        if inv_freq.shape != (head_dim // 2,):
            raise ValueError(f"inv_freq must be [D/2] = [{head_dim // 2}], got {tuple(inv_freq.shape)}")
        return rope_tables(max(geo.P, 1), inv_freq.to(device))
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    return dummy, dummy


def _kernel_q(q: Tensor, rope: bool, geo: Geometry, cos: Tensor, sin: Tensor, cfg: LaunchConfig):
    """The q the dk/dv kernels read, and their QROT flag: under RoPE on the fly with
    ``cfg.rotate_q_once``, a copy of q rotated once at its rows' positions
    (``ms_rotate_q_kernel``), read as is; else q itself, rotated in every query step."""
    if not (rope and cfg.rotate_q_once):
        return q, False
    B, L, Hq, D = q.shape
    q_rot = torch.empty_like(q)
    block = 64
    tk.ms_rotate_q_kernel[(triton.cdiv(L, block), B * Hq)](
        q, q_rot, cos, sin, L, geo.P, geo.region, geo.merge, geo.budget - geo.merge,
        HQ=Hq, HEAD_DIM=D, BLOCK_H=max(triton.next_power_of_2(D // 2), 16), BLOCK=block,
    )  # fmt: skip
    return q_rot, True


def _check_launch(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> None:
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"q is on {q.device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before ctxlab.kernels.ms_attention.triton_kernels is imported"
        )
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"the Triton kernels need an even head dim, q has D={q.shape[-1]}")
    if q.device.type == "cuda" and q.shape[-1] < MIN_GPU_HEAD_DIM:
        raise ValueError(f"the Triton kernels need D >= {MIN_GPU_HEAD_DIM} on a GPU, q has D={q.shape[-1]}")
    if idx.dtype != torch.int32 or not idx.is_contiguous():
        raise ValueError("idx must be a contiguous int32 tensor (see sort_selection)")


def _consts(q: Tensor, k: Tensor, idx: Tensor) -> dict:
    Hq, D = q.shape[2], q.shape[3]
    return dict(
        HQ=Hq,
        HKV=k.shape[2],
        HS=idx.shape[1],
        HEAD_DIM=D,
        BLOCK_H=max(triton.next_power_of_2(D // 2), 16),
        BLOCK_D=max(triton.next_power_of_2(D), 16),
    )


def select_capacity(n_sel: int, config: LaunchConfig) -> tuple[int, int]:
    """(KP, CAP): the top-list width (a power of two >= n_sel, >= 16) and candidate capacity."""
    kp = max(triton.next_power_of_2(n_sel), 16)
    cap = config.select_capacity or 2 * kp
    if cap < kp:
        raise ValueError(f"select_capacity={cap} is below the top-list width {kp} (T-m={n_sel})")
    return kp, cap


def region_reps(x: Tensor, heads: int, *, region: int, pool: str) -> Tensor:
    """Representatives ``[B, heads, n, D]`` float32 of x ``[B, L, H, D]``, each the sum over
    ``H // heads`` consecutive heads (scope="group" sums a kv group's query heads)."""
    B, L, H, D = x.shape
    n = triton.cdiv(L, region)
    rep = _empty((B, heads, n, D), torch.float32, x.device)
    block_r = 16
    tk.ms_select_reps_kernel[(triton.cdiv(n, block_r), B * heads)](
        x, rep, L, n, region, math.sqrt(D),
        H=H, HR=heads, HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16), BLOCK_R=block_r,
        ATTN=pool == "attn",
    )  # fmt: skip
    return rep


def _select_inputs(
    q: Tensor,
    k: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    pool: str,
    scope: str,
    select: str,
    config: LaunchConfig | None,
) -> tuple[LaunchConfig, Tensor, Tensor | None, Tensor | None]:
    """What both selection kernels start from: the launch config, the int32 output
    ``[B, Hs, G, T-m]`` and the float32 representatives ``[B, Hs, n, D]`` / ``[B, Hkv, n, D]``
    (None when G = 0: no block, nothing to select)."""
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"q is on {q.device}: the Triton selection needs CUDA tensors, or TRITON_INTERPRET=1"
        )
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    q, k = q.contiguous(), k.contiguous()
    cfg = config or default_config(q.device)
    B, L, Hq, _ = q.shape
    Hkv = k.shape[2]
    Hs = Hq if scope == "head" else Hkv
    G = num_blocks(L, region, budget, merge)
    out = _empty((B, Hs, G, budget - merge), torch.int32, q.device)
    if G == 0:
        return cfg, out, None, None
    return (
        cfg,
        out,
        region_reps(q, Hs, region=region, pool=pool),
        region_reps(k, Hkv, region=region, pool=pool),
    )


def _programs(cfg: LaunchConfig, device: torch.device, n_items: int, listed: bool = False) -> int:
    """Programs of a selection launch over ``n_items`` items: ``select_programs``, or four per SM;
    one per SM for a list counted on the device (``listed``: the retry and the full-depth kernel,
    which a few percent of the items reach, and each program holds scratch rows)."""
    if cfg.select_programs:
        programs = cfg.select_programs
    elif device.type == "cuda":
        programs = (1 if listed else 4) * _sm_count(device)
    else:
        programs = 2
    return max(1, min(programs, n_items))


def _select_full(
    qrep: Tensor,
    krep: Tensor,
    out: Tensor,
    cfg: LaunchConfig,
    items: Tensor | None,
    count: Tensor | None = None,
    *,
    budget: int,
    merge: int,
    select: str,
) -> None:
    """The full-depth fused kernel into ``out`` [B, Hs, G, S] for every item, or for the first
    ``count`` (int32 [1], on the device) listed in ``items`` (int32)."""
    B, Hs, n, D = qrep.shape
    G, n_sel = out.shape[2], out.shape[3]
    kp, cap = select_capacity(n_sel, cfg)
    rm = max(triton.next_power_of_2(merge), 2)
    n_items = B * Hs * G if items is None else items.numel()
    programs = _programs(cfg, qrep.device, n_items, listed=items is not None)
    rows = cfg.select_rows
    scratch_list = torch.empty((programs, rows, cap), dtype=torch.int64, device=qrep.device)
    scratch_top = torch.empty((programs, rm, kp), dtype=torch.int32, device=qrep.device)
    seen = torch.zeros((programs, n), dtype=torch.int32, device=qrep.device)
    with launch_settings("ms_select_kernel", cfg, "select_"):
        tk.ms_select_kernel[(programs,)](
            qrep, krep, out, scratch_list, scratch_top, seen, out if items is None else items,
            out if count is None else count, n, G, budget, merge, n_sel, B * Hs, n_items,
            HS=Hs, HKV=krep.shape[1], HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16),
            CAUSAL=select == "causal", HAS_ITEMS=items is not None, ROWS=rows, RM=rm, KP=kp, CAP=cap,
            BLOCK_J=cfg.select_block_j, BINS=cfg.select_bins, SORT_ROWS=cfg.select_sort_rows,
            PREC="ieee" if cfg.shallow_rescore else cfg.select_precision, KV_MAJOR=cfg.select_order == "kv",
            num_warps=cfg.select_warps,
        )  # fmt: skip


def ms_select_triton(
    q: Tensor,
    k: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    pool: str,
    scope: str,
    select: str,
    config: LaunchConfig | None = None,
) -> Tensor:
    """The fused selection: int32 ``[B, Hs, G, T-m]`` in merge order, the indices of
    ``ms_select_torch`` (spec steps 4-8, the same tie rules), G = 0 when ``n <= T``.

    Representatives and scores are float32. Scores are recomputed per pass and never stored:
    memory beyond the representatives is a few scratch rows per program. Identical float32
    scores give identical indices; scores computed in another summation order (a GPU GEMM)
    can differ in the last bit, which may swap near-tied regions.
    """
    cfg, out, qrep, krep = _select_inputs(
        q, k, region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select,
        config=config,
    )  # fmt: skip
    if qrep is not None:
        _select_full(qrep, krep, out, cfg, None, budget=budget, merge=merge, select=select)
    return out


class _ShallowCounts:
    """Running totals of the shallow selection in this process: items (b, hs, g) decided, items
    redone by the full-depth kernel, items retried at ``shallow_retry_k``. The last two are counted
    on the device, so that no launch waits for the host; reading the totals (iterating, indexing)
    synchronizes. Benchmarks read the difference over a step; nothing resets them."""

    def __init__(self) -> None:
        self._decided = 0
        self._device: dict[torch.device, Tensor] = {}  # int64 [redone, retried] per device

    def add(self, decided: int, redone: Tensor, retried: Tensor) -> None:
        self._decided += decided
        acc = self._device.setdefault(redone.device, torch.zeros(2, dtype=torch.int64, device=redone.device))
        acc += torch.cat([redone, retried])

    def __iter__(self):
        redone = retried = 0
        for acc in self._device.values():
            r, t = acc.tolist()
            redone, retried = redone + r, retried + t
        return iter((self._decided, redone, retried))

    def __getitem__(self, i: int) -> int:
        return tuple(self)[i]

    def __len__(self) -> int:
        return 3


SHALLOW_ITEMS = _ShallowCounts()
"""The shallow selection's running totals (``_ShallowCounts``): [items decided, redone, retried]."""


def select_shallow_counted(
    q: Tensor, k: Tensor, *, config: LaunchConfig | None = None, **options
) -> tuple[Tensor, int, int]:
    """``ms_select_shallow``'s indices, the number of items (b, hs, g) the full-depth kernel redid
    and the number the retry (``shallow_retry_k``) took (one device sync, for the counts);
    ``SHALLOW_ITEMS`` adds the same counts. ``options``: region, budget, merge, pool, scope,
    select."""
    out, redone, retried = _select_shallow(q, k, config=config, **options)
    redone_n, retried_n = torch.cat([redone, retried]).tolist()
    return out, redone_n, retried_n


def _select_shallow(
    q: Tensor, k: Tensor, *, config: LaunchConfig | None = None, **options
) -> tuple[Tensor, Tensor, Tensor]:
    """``select_shallow_counted`` without a host sync: the counts as int32 [1] device tensors. The
    items a run flags are listed on the device (``_flagged``), and the next run reads how many
    from there, so the retry and the full-depth kernel are launched whether or not any item needs
    them (programs without an item return at once)."""
    budget, merge, select = options["budget"], options["merge"], options["select"]
    cfg, out, qrep, krep = _select_inputs(q, k, config=config, **options)
    none = torch.zeros(1, dtype=torch.int32, device=q.device)
    if qrep is None:
        return out, none, none
    B, Hs, G = qrep.shape[0], qrep.shape[1], out.shape[2]
    shallow = dict(budget=budget, merge=merge, select=select)
    if cfg.shallow_rescore or cfg.shallow_fault:  # the search's error bound per row, for both runs
        qnorm = qrep.norm(dim=-1).contiguous()  # [B, Hs, n]
        kmax = krep.norm(dim=-1).amax(-1).contiguous()  # [B, Hkv]
        bound = (qnorm, kmax, cfg.shallow_score_err or search_error(cfg.select_precision, qrep.shape[-1]))
    else:
        bound = (out, out, 0.0)  # not read
    flag = _select_shallow_run(
        qrep, krep, out, cfg, None, none, cfg.shallow_k, cfg.shallow_cap, bound, **shallow
    )
    redo, count = _flagged(flag, None, None)
    retried = count if cfg.shallow_retry_k else none
    if cfg.shallow_retry_k:
        flag = _select_shallow_run(
            qrep, krep, out, cfg, redo, count, cfg.shallow_retry_k, cfg.shallow_retry_cap, bound, **shallow
        )
        redo, count = _flagged(flag, redo, count)
    _select_full(qrep, krep, out, cfg, redo, count, **shallow)
    SHALLOW_ITEMS.add(B * Hs * G, count, retried)
    return out, count, retried


def _flagged(flag: Tensor, items: Tensor | None, count: Tensor | None) -> tuple[Tensor, Tensor]:
    """The items a selection run flagged, listed on the device without a host sync: (int32 [N],
    whose first ``count`` entries are the flagged items in ascending order, count int32 [1]).
    ``flag`` [N] is indexed like the run's ``items`` (the first ``count`` of them live; every item
    0 .. N-1 when ``items`` is None), and is 0 past the live entries."""
    n = flag.numel()
    hit = flag != 0
    pos = torch.cumsum(hit, 0, dtype=torch.int32) - 1
    src = torch.arange(n, dtype=torch.int32, device=flag.device) if items is None else items
    listed = torch.zeros(n + 1, dtype=torch.int32, device=flag.device)  # the last slot takes the rest
    listed.scatter_(0, torch.where(hit, pos, n).long(), src)
    return listed[:n], (pos[-1:] + 1) if n else torch.zeros(1, dtype=torch.int32, device=flag.device)


def _select_shallow_run(
    qrep: Tensor,
    krep: Tensor,
    out: Tensor,
    cfg: LaunchConfig,
    items: Tensor | None,
    count: Tensor,
    ranks: int,
    cap: int,
    bound: tuple[Tensor, Tensor, float],
    *,
    budget: int,
    merge: int,
    select: str,
) -> Tensor:
    """One launch of ``ms_select_shallow_kernel`` into ``out``, each row keeping ``ranks`` of up
    to ``cap`` candidates, for every item or for the first ``count`` (int32 [1], on the device)
    listed in ``items`` (int32); returns its flags (int32, 1 for an item it could not decide,
    indexed like ``items``). ``bound``: the re-scored search's QNORM, KMAX and error per unit
    (``_select_shallow``'s, shared by its runs)."""
    B, Hs, n, D = qrep.shape
    Hkv, G, n_sel = krep.shape[1], out.shape[2], out.shape[3]
    rm = max(triton.next_power_of_2(merge), 16, cfg.shallow_sort_rows)
    n_items = B * Hs * G if items is None else items.numel()
    dev = qrep.device
    programs = _programs(cfg, dev, n_items, listed=items is not None)
    flag = torch.zeros(n_items, dtype=torch.int32, device=dev)
    scratch_list = torch.empty((programs, rm, cap), dtype=torch.int64, device=dev)
    scratch_top = torch.empty((programs, rm, ranks), dtype=torch.int32, device=dev)
    seen = torch.zeros((programs, n), dtype=torch.int32, device=dev)
    mask_steps = cfg.shallow_mask_steps if cfg.shallow_rescore else 0  # masks carry no keys
    masks = torch.empty((programs, rm, mask_steps) if mask_steps else 1, dtype=torch.int64, device=dev)
    extra = dict(maxnreg=cfg.shallow_maxnreg) if cfg.shallow_maxnreg else {}
    qnorm, kmax, err = bound
    with launch_settings("ms_select_shallow_kernel", cfg, "shallow_", "select_precision"):
        tk.ms_select_shallow_kernel[(programs,)](
            qrep, krep, out, flag, scratch_list, scratch_top, seen, masks, qnorm, kmax,
            flag if items is None else items, count, err,
            n, G, budget, merge, n_sel, B * Hs, n_items,
            HS=Hs, HKV=Hkv, HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16),
            CAUSAL=select == "causal", HAS_ITEMS=items is not None, RM=rm, K=ranks, CAP=cap,
            BLOCK_J=cfg.shallow_block_j, SORT_ROWS=cfg.shallow_sort_rows,
            PREC=cfg.select_precision, RESCORE=cfg.shallow_rescore, RESCORE_COLS=cfg.shallow_rescore_cols,
            FAULT=cfg.shallow_fault, KV_MAJOR=cfg.select_order == "kv", MASK_STEPS=mask_steps,
            num_warps=cfg.shallow_warps, num_stages=cfg.shallow_stages, **extra,
        )  # fmt: skip
    return flag


def ms_select_shallow(q: Tensor, k: Tensor, **options) -> Tensor:
    """The shallow exact selection (``ms_select_shallow_kernel``): int32 ``[B, Hs, G, T-m]``,
    the indices of ``ms_select_triton`` (and of ``ms_select_torch`` under the exactness
    contract). Each row keeps its ``LaunchConfig.shallow_k`` best candidates, found in two
    passes over the scores (a lower bound on the k-th best from per-lane maxima, then every
    candidate above it); the blocks whose merge needs a deeper rank, or whose rows had more
    than ``shallow_cap`` candidates above the bound, are redone by the full-depth kernel.
    Arguments as ``ms_select_triton``."""
    return _select_shallow(q, k, **options)[0]


def ms_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx_sorted: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    rope: bool,
    inv_freq: Tensor,
    scale: float,
    config: LaunchConfig | None = None,
    start: int = 0,
) -> tuple[Tensor, Tensor]:
    """Forward launch: ``o [B, L, Hq, D]`` in q's dtype and ``lse [B, Hq, L]`` float32.

    ``lse`` is the natural-log log-sum-exp of each query row's scaled scores over its key set.
    ``idx_sorted`` is ``sort_selection``'s output (``[B, Hs, G, S]``, G = 0 when dense).
    Only rows ``[start, L)`` are computed: the query tiles before the one holding ``start`` are
    not launched, and the rows of o and lse before ``start`` are left unwritten.
    """
    _check_launch(q, k, v, idx_sorted)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = config or default_config(q.device)
    B, L, Hq, D = q.shape
    geo = Geometry.of(L, region, budget, merge, cfg.fwd_block_m)
    o = _empty((B, L, Hq, D), q.dtype, q.device)
    lse = _empty((B, Hq, L), torch.float32, q.device)
    first = geo.first_tile(start)
    if gluon_applies(cfg, rope, q):
        with launch_settings("ms_attn_fwd_ws_kernel", cfg, "fwd_", "gluon_"):
            _gluon()[(geo.n_tiles - first, B * Hq)](
                q, k, v, o, lse, _idx_arg(idx_sorted),
                L, geo.P, region, merge, budget - merge, geo.G, geo.n_pre_tiles, geo.tiles_per_block,
                start, first, scale * LOG2E,
                HQ=Hq, HKV=k.shape[2], HS=idx_sorted.shape[1], HEAD_DIM=D, BLOCK_N=cfg.fwd_block_n,
                STAGES=cfg.gluon_stages, LOAD_WARPS=cfg.gluon_load_warps, LOAD_REGS=GLUON_LOAD_REGS,
                CONSUMER_REGS=GLUON_CONSUMER_REGS, REGION=cfg.region_const("fwd", rope, region),
                OVERLAP=cfg.gluon_fwd_overlap, PINGPONG=cfg.gluon_fwd_pingpong, num_warps=4,
                maxnreg=GLUON_MAXNREG,
            )  # fmt: skip
        return o, lse
    cos, sin = _tables(rope, geo, D, inv_freq, q.device)
    with launch_settings("ms_attn_fwd_kernel", cfg, "fwd_", rope=rope):
        tk.ms_attn_fwd_kernel[(geo.n_tiles - first, B * Hq)](
            q, k, v, o, lse, _idx_arg(idx_sorted), cos, sin,
            L, geo.P, region, merge, budget - merge, geo.G, geo.n_pre_tiles, geo.tiles_per_block,
            start, first, scale * LOG2E,
            ROPE=rope, WHOLE=cfg.whole_qk and not rope, BLOCK_M=cfg.fwd_block_m,
            BLOCK_N=cfg.key_step("fwd", rope), REGION=cfg.region_const("fwd", rope, region),
            num_warps=cfg.fwd_warps, num_stages=cfg.stages("fwd", rope),
            **_consts(q, k, idx_sorted),
        )  # fmt: skip
    return o, lse


GLUON_MAXNREG = 168
"""Registers per thread the Gluon forward launches with: 12 warps (two consumer warpgroups and
a load warpgroup) x 32 x 168 fit the 64K registers of an SM; the partitions then move them
(``setmaxnreg``): the loads down to ``GLUON_LOAD_REGS``, the consumers up to
``GLUON_CONSUMER_REGS`` (the default partition takes what is left: 232 as well)."""
GLUON_LOAD_REGS = 40
GLUON_CONSUMER_REGS = 232
GLUON_DKV_BLOCK_M = 64
"""Query rows per step of the Gluon dk/dv kernel: its S^T and dP^T tiles (64 keys x 64 rows per
consumer) and its dk, dv accumulators (64 keys x head dim, two each) share 232 registers."""
GLUON_DKV_BLOCK_N = 128
"""Selected places per program of the Gluon dk/dv kernel: 64 per consumer warpgroup."""


def gluon_applies(config: LaunchConfig, rope: bool, q: Tensor, kernel: str = "fwd") -> bool:
    """Whether ``ms_attn_fwd`` runs the Gluon forward (``kernel="fwd"``), ``bwd_dq`` the Gluon
    dq (``kernel="dq"``) or ``bwd_dkv`` the Gluon dk/dv of the selected keys (``kernel="dkv"``):
    ``config.fwd_gluon`` (``dq_gluon``, ``dkv_gluon``), no RoPE on the fly, q bf16 or fp16
    with head dim 64 or 128 on a CUDA device of compute capability 9.x (Hopper), and Triton's CPU
    interpreter off (Gluon has none)."""
    return (
        getattr(config, f"{kernel}_gluon")
        and not rope
        and q.is_cuda
        and not interpreted()
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (64, 128)
        and torch.cuda.get_device_capability(q.device)[0] == 9
    )


def _gluon_dq_descriptor(dq32: Tensor):
    """The TMA descriptor through which the Gluon dk/dv kernel adds dq (``FUSED_DQ``): float32
    ``[B*L, Hq*D]``, tiles of ``GLUON_DKV_BLOCK_M`` rows by half the head dim (one per consumer)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    B, L, Hq, D = dq32.shape
    block = [GLUON_DKV_BLOCK_M, D // 2]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float32)
    return GluonDescriptor(dq32.view(B * L, Hq * D), [B * L, Hq * D], [Hq * D, 1], block, layout)


def _gluon(kernel: str = "fwd"):
    """The Gluon forward (dq, dk/dv) kernel, imported on first use (``triton.experimental.gluon``)."""
    from . import gluon_kernels

    return {
        "fwd": gluon_kernels.ms_attn_fwd_ws_kernel,
        "dq": gluon_kernels.ms_attn_bwd_dq_ws_kernel,
        "dkv": gluon_kernels.ms_attn_bwd_dkv_sel_ws_kernel,
        "dkv_persistent": gluon_kernels.ms_attn_bwd_dkv_sel_persistent_kernel,
    }[kernel]


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the persistent kernels' program count)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def ms_attn_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    idx_sorted: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    rope: bool,
    inv_freq: Tensor,
    scale: float,
    config: LaunchConfig | None = None,
    deterministic: bool | None = None,
    start: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward launch: dq ``[B, L, Hq, D]``, dk, dv ``[B, L, Hkv, D]``, in the inputs' dtype.

    With ``start``, the gradients of the rows ``[start, L)`` only (``ms_attn_fwd``'s rows; do,
    o and lse before ``start`` are never read): dq is 0 before ``start``, dk and dv sum those
    rows' contributions, and the query steps wholly before ``start`` are skipped.

    dk, dv of the selected keys go the way ``dkv_path`` picks, and dq comes from the dq kernel
    (deterministic) or, with ``config.fused_dq`` outside deterministic mode and without RoPE on
    the fly, from atomics inside the dk/dv kernels (``fused_dq_applies``); where that path's float32
    dq buffer does not fit in the device's memory, from the dq kernel. ``deterministic``
    None (the default) means ``config.deterministic`` or
    ``torch.are_deterministic_algorithms_enabled()``; in deterministic mode two calls return
    identical bits.
    """
    _check_launch(q, k, v, idx_sorted)
    do, q, k, v, o = (x.contiguous() for x in (do, q, k, v, o))
    cfg = config or default_config(q.device)
    path = dkv_path(region, cfg, deterministic, group=q.shape[2] // k.shape[2])
    delta = bwd_preprocess(o, do, start)
    opts = dict(region=region, budget=budget, merge=merge, rope=rope, inv_freq=inv_freq, scale=scale,
                config=cfg, start=start)  # fmt: skip
    if fused_dq_applies(cfg, rope, deterministic, block_rows=region * merge):
        try:
            return _bwd_fused(do, q, k, v, lse, delta, idx_sorted, path, opts)
        except torch.cuda.OutOfMemoryError:
            # Its float32 dq buffer (twice q's bytes in bf16) did not fit: the dq kernel needs none.
            # Nothing was written to the inputs; the buffers go with the exception, before the
            # fallback allocates (no tensor of the failed attempt is held past this clause).
            pass
    dq = bwd_dq(do, q, k, v, lse, delta, idx_sorted, **opts)
    dk, dv = bwd_dkv(do, q, k, v, lse, delta, idx_sorted, path=path, **opts)
    return dq, dk, dv


def _bwd_fused(do, q, k, v, lse, delta, idx_sorted, path: str, opts: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``ms_attn_bwd`` with dq summed inside the dk/dv kernels (``fused_dq_applies``) into a
    float32 buffer, finished by the dq kernel over the own segment (``dq_finish_applies``) or
    scaled and cast here."""
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if dq_finish_applies(opts["config"], path):  # the own segment's dq by the dq kernel
        dk, dv = bwd_dkv(do, q, k, v, lse, delta, idx_sorted, path=path, dq32=dq32, own_dq=False, **opts)
        return bwd_dq(do, q, k, v, lse, delta, idx_sorted, dq32=dq32, **opts), dk, dv
    dk, dv = bwd_dkv(do, q, k, v, lse, delta, idx_sorted, path=path, dq32=dq32, **opts)
    dq = torch.empty_like(q)
    return torch.mul(dq32, opts["scale"], out=dq), dk, dv  # the kernels add dS k: scaled once here


def _deterministic(config: LaunchConfig, deterministic: bool | None) -> bool:
    """``deterministic``, or when it is None ``config.deterministic`` or Torch's flag."""
    if deterministic is None:
        return config.deterministic or torch.are_deterministic_algorithms_enabled()
    return deterministic


def dkv_persistent_applies(config: LaunchConfig, fused: bool) -> bool:
    """Whether the Gluon dk/dv of the selected keys runs as persistent programs: ``gluon_dkv_persistent``
    with row stats and the default schedule (no dq inside, ``fused``; no split waits, no one wait).
    The persistent kernel has no other schedule, so those settings, asked for, take the one-shot
    kernel."""
    return (
        config.gluon_dkv_persistent
        and config.gluon_dkv_row_stats
        and not (fused or config.gluon_split_waits or config.gluon_dkv_one_wait)
    )


def fused_dq_applies(
    config: LaunchConfig, rope: bool, deterministic: bool | None = None, block_rows: int | None = None
) -> bool:
    """Whether ``ms_attn_bwd`` sums dq inside the dk/dv kernels: ``config.fused_dq``, outside
    deterministic mode (``_deterministic``), without RoPE on the fly and, given the query rows of a
    block (m·w, ``block_rows``), where it has at least ``config.fused_dq_min_block``."""
    return (
        config.fused_dq
        and not rope
        and not _deterministic(config, deterministic)
        and (block_rows is None or block_rows >= config.fused_dq_min_block)
    )


def dq_finish_applies(config: LaunchConfig, path: str) -> bool:
    """Whether a fused backward (``fused_dq_applies``) takes the own segment's dq from the dq
    kernel (``fused_dq_finish``): on the "atomic" path, where the dk/dv kernels of the selected keys
    add their dq into the float32 buffer and the own-segment kernel (which on "reverse" also sums
    the selected keys) need not."""
    return config.fused_dq_finish and path == "atomic"


def dkv_path(region: int, config: LaunchConfig, deterministic: bool | None = None, group: int = 1) -> str:
    """The way ``ms_attn_bwd`` sums the selected keys' dk/dv: "atomic", "partial" or "reverse".

    Deterministic mode: ``deterministic``, or when it is None ``config.deterministic`` or
    ``torch.are_deterministic_algorithms_enabled()``. ``config.dkv_path="auto"`` takes
    "reverse" when ``region`` is a multiple of ``config.dkv_block_n`` (no key tile mixes
    regions, no lane is wasted) and each kv head serves one query head (``group`` = Hq / Hkv
    = 1), else "partial" in deterministic mode and "atomic" otherwise. Measured on an H200
    (session 10, w = 64, 32 query heads, 32K-128K): with 32 kv heads the reverse index took
    11.9 / 20.9 / 41.7 ms against 10.4 / 22.1 / 46.3 for the atomics and 14.5 / 31.2 / 64.3 for
    partial sums; with 8 kv heads (its programs loop over 4 query heads each, and the popular
    tiles' programs run longest) 25.4 / 46.5 / 90.8 against 10.0 / 22.1 / 44.2 and 13.6 / 27.4 /
    57.7. At w = 16 the reverse index wastes 3/4 of its lanes (434.8 vs 107.4 ms for the atomics
    at paper-128K, H100). ValueError for "atomic" in deterministic mode (it cannot be honoured).
    """
    deterministic = _deterministic(config, deterministic)
    path = config.dkv_path
    if path == "auto":
        if region % config.dkv_block_n == 0 and group == 1:
            return "reverse"
        return "partial" if deterministic else "atomic"
    if deterministic and path == "atomic":
        raise ValueError(
            "deterministic mode (deterministic=True, LaunchConfig.deterministic or "
            "torch.use_deterministic_algorithms(True)) cannot be honoured with "
            "LaunchConfig.dkv_path='atomic': choose 'auto', 'partial' or 'reverse'"
        )
    return path


def bwd_preprocess(o: Tensor, do: Tensor, start: int = 0) -> Tensor:
    """delta = rowsum(o * do) ``[B, Hq, L]`` float32 (o, do contiguous ``[B, L, Hq, D]``), rows
    ``[start, L)`` (the others unwritten)."""
    B, L, Hq, D = o.shape
    delta = _empty((B, Hq, L), torch.float32, o.device)
    tk.ms_attn_bwd_preprocess_kernel[(triton.cdiv(L - start, 64), B * Hq)](
        o, do, delta, L, start, HQ=Hq, HEAD_DIM=D, BLOCK_M=64, BLOCK_D=max(triton.next_power_of_2(D), 16)
    )
    return delta


def _dq32_laid_out_like(dq32: Tensor, q: Tensor) -> bool:
    """Whether a fused dq buffer is as the kernels index it (and the Gluon dk/dv's TMA descriptor
    views it): float32, contiguous, q's shape."""
    return dq32.shape == q.shape and dq32.dtype == torch.float32 and dq32.is_contiguous()


def _idx_arg(idx_sorted: Tensor) -> Tensor:
    """Triton needs a real pointer even when there are no blocks (G = 0)."""
    if idx_sorted.numel():
        return idx_sorted
    return torch.full((1,), -1, dtype=torch.int32, device=idx_sorted.device)


def bwd_dq(do, q, k, v, lse, delta, idx_sorted, *, region, budget, merge, rope, inv_freq,
           scale, config: LaunchConfig, start: int = 0, dq32: Tensor | None = None) -> Tensor:  # fmt: skip
    """dq ``[B, L, Hq, D]``: the forward's schedule, one program per query tile from the one
    holding ``start``; rows before ``start`` are 0. With ``dq32`` (float32, q's shape: the selected
    keys' unscaled dS k, added by the fused dk/dv kernels: ``dq_finish_applies``) the tiles run
    their own segment's steps only and add their rows of ``dq32``."""
    B, L, Hq, D = q.shape
    geo = Geometry.of(L, region, budget, merge, config.dq_block_m)
    if dq32 is not None and not _dq32_laid_out_like(dq32, q):
        raise ValueError(
            f"dq32 must be a contiguous float32 tensor of q's shape {tuple(q.shape)}; got "
            f"{tuple(dq32.shape)} {dq32.dtype}, contiguous={dq32.is_contiguous()}"
        )
    dq = _empty(q.shape, q.dtype, q.device)
    if start:
        dq[:, :start].zero_()
    first = geo.first_tile(start)
    if gluon_applies(config, rope, q, "dq"):
        with launch_settings("ms_attn_bwd_dq_ws_kernel", config, "dq_", "gluon_"):
            _gluon("dq")[(geo.n_tiles - first, B * Hq)](
                q, k, v, do, dq, lse, delta, _idx_arg(idx_sorted),
                L, geo.P, region, merge, budget - merge, geo.G, geo.n_pre_tiles, geo.tiles_per_block,
                start, first, scale * LOG2E, scale,
                HQ=Hq, HKV=k.shape[2], HS=idx_sorted.shape[1], HEAD_DIM=D, BLOCK_N=config.gluon_dq_block_n,
                STAGES=config.gluon_dq_stages, LOAD_WARPS=config.gluon_load_warps, LOAD_REGS=GLUON_LOAD_REGS,
                CONSUMER_REGS=GLUON_CONSUMER_REGS, REGION=config.region_const("dq", rope, region),
                SPLIT_WAITS=config.gluon_split_waits, DQ32=dq32, num_warps=4, maxnreg=GLUON_MAXNREG,
            )  # fmt: skip
        return dq
    cos, sin = _tables(rope, geo, D, inv_freq, q.device)
    with launch_settings("ms_attn_bwd_dq_kernel", config, "dq_", rope=rope):
        tk.ms_attn_bwd_dq_kernel[(geo.n_tiles - first, B * Hq)](
            q, k, v, do, dq, lse, delta, _idx_arg(idx_sorted), cos, sin,
            L, geo.P, region, merge, budget - merge, geo.G, geo.n_pre_tiles, geo.tiles_per_block,
            start, first, scale * LOG2E, scale,
            ROPE=rope, WHOLE=config.whole_qk and not rope, BLOCK_M=config.dq_block_m,
            BLOCK_N=config.key_step("dq", rope), REGION=config.region_const("dq", rope, region),
            DQ32=dq32, num_warps=config.dq_warps, num_stages=config.stages("dq", rope),
            **_consts(q, k, idx_sorted),
        )  # fmt: skip
    return dq


@dataclass(frozen=True)
class PartialIndex:
    """Where the "partial" dk/dv path finds each region's partial sums, window by window.

    Blocks go ``window`` at a time (``n_windows`` windows). ``offsets`` int64
    ``[n_windows*B*Hkv*n + 1]`` (CSR over ``((win*B + b)*Hkv + hkv)*n + region``) into ``src``
    int64 ``[E]``: the partial row ``((b*Hs + hs)*window + g - win*window)*S + rank`` of each
    (selection head of the group, block of the window) that selected the region, ascending in
    (hs, g): the fixed order of the reduction.
    """

    offsets: Tensor
    src: Tensor
    window: int
    n_windows: int


def partial_index(idx_sorted: Tensor, num_kv_heads: int, n: int, window: int) -> PartialIndex:
    """Build the reduction's index from the sorted selection ``[B, Hs, G, S]`` (-1 = ignored).

    A stable sort by (window, b, kv head, region) of the entries, taken in (b, hs, g, rank)
    order: a unique result, whatever the device's sort does with equal keys."""
    B, Hs, G, S = idx_sorted.shape
    dev = idx_sorted.device
    n_windows = triton.cdiv(G, window)
    region = idx_sorted.long()
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hs = torch.arange(Hs, device=dev).view(1, Hs, 1, 1)
    g = torch.arange(G, device=dev).view(1, 1, G, 1)
    rank = torch.arange(S, device=dev).view(1, 1, 1, S)
    win, g_in = torch.div(g, window, rounding_mode="floor"), torch.remainder(g, window)
    hkv = torch.div(hs, Hs // num_kv_heads, rounding_mode="floor")
    key = ((win * B + b) * num_kv_heads + hkv) * n + region
    src = ((b * Hs + hs) * window + g_in) * S + rank
    valid = region >= 0
    key, src = key[valid], src.expand_as(region)[valid]
    order = torch.argsort(key, stable=True)
    key, src = key[order], src[order]
    bounds = torch.arange(n_windows * B * num_kv_heads * n + 1, device=dev)
    return PartialIndex(torch.searchsorted(key, bounds), src.contiguous(), window, n_windows)


def partial_window(shape: tuple[int, int, int, int], region: int, head_dim: int, config: LaunchConfig) -> int:
    """Blocks per window of the "partial" path: as many as ``config.dkv_partial_gib`` holds,
    at least one. shape is the selection's ``[B, Hs, G, S]``."""
    B, Hs, G, S = shape
    per_block = B * Hs * S * region * head_dim * 4 * 2  # float32 dk and dv
    return max(1, min(G, int(config.dkv_partial_gib * 2**30) // per_block))


def bwd_dkv(do, q, k, v, lse, delta, idx_sorted, *, region, budget, merge, rope, inv_freq,
            scale, config: LaunchConfig, path: str, start: int = 0,
            dq32: Tensor | None = None, own_dq: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """dk, dv ``[B, L, Hkv, D]``: one program per key tile (own segment, causally), plus the
    selecting blocks' queries by ``path`` ("atomic", "partial" or "reverse", see ``dkv_path``).
    Only the query rows ``[start, L)`` contribute: the blocks wholly before ``start`` are neither
    launched nor indexed, and the query steps before ``start`` are skipped. With ``dq32`` (float32,
    q's shape, zeros; not with "partial" or RoPE on the fly) the kernels also add dq into it
    with atomics (``LaunchConfig.fused_dq``), without the softmax scale: dS k, which the caller
    multiplies by ``scale`` once (32 multiplies a thread a step less in the Gluon kernel). With
    ``own_dq`` False (the "atomic" path only) the own-segment kernel adds no dq: the selected keys'
    part only, which ``bwd_dq(..., dq32=)`` then finishes (``dq_finish_applies``)."""
    if path not in DKV_PATHS[1:]:
        raise ValueError(f"path must be atomic, partial or reverse, got {path!r}")
    fused = dq32 is not None
    if fused and (path == "partial" or rope or not _dq32_laid_out_like(dq32, q)):
        raise ValueError(
            f"dq32 needs the atomic or reverse path, no RoPE on the fly, q's shape {tuple(q.shape)}, "
            f"float32 and contiguous; got path {path!r}, rope={rope}, {tuple(dq32.shape)} {dq32.dtype}, "
            f"contiguous={dq32.is_contiguous()}"
        )
    if not own_dq and (not fused or path != "atomic"):
        raise ValueError(f"own_dq=False needs dq32 and the atomic path, got dq32={fused}, path {path!r}")
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    consts = _consts(q, k, idx_sorted)
    geo = Geometry.of(L, region, budget, merge, config.dkv_block_n)
    cos, sin = _tables(rope, geo, D, inv_freq, q.device)
    q, qrot = _kernel_q(q, rope, geo, cos, sin, config)  # from here, q as the dk/dv kernels read it
    whole = config.whole_dkv and not rope
    # Without FUSED_DQ the kernels never touch their dq pointer: no fill needed.
    dq_arg = dq32 if fused else torch.empty(1, dtype=torch.float32, device=q.device)
    first_block = min(first_block_at(start, region=region, budget=budget, merge=merge), geo.G)
    if path == "reverse":
        live = idx_sorted
        if first_block:  # the blocks before start's own are left out of the index
            live = idx_sorted.clone()
            live[:, :, :first_block] = -1
        rev = reverse_index(live, geo)
        dk32 = dv32 = torch.zeros(1, dtype=torch.float32, device=q.device)
    else:
        rev = reverse_index(idx_sorted[:, :, :0], geo)  # empty: tiles in natural order
        dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        Hs, G, S = idx_sorted.shape[1:]
        if first_block < G:
            gluon = gluon_applies(config, rope, q, "dkv")
            dqd = _gluon_dq_descriptor(dq32) if gluon and fused else None
            split = config.gluon_split_waits and not fused  # FUSED_DQ and ROW_STATS: the default schedule
            row_stats = config.gluon_dkv_row_stats and not split
            n_chunks = triton.cdiv(S * region, GLUON_DKV_BLOCK_N if gluon else config.sel_block_n)

            def launch_sel(blocks: int, g0: int, window: int, dk_out: Tensor, dv_out: Tensor, partial: bool):
                """dk, dv of the selected keys of blocks g0 .. g0 + blocks - 1 into dk_out, dv_out
                (added, or stored as partial sums of a window of ``window`` blocks)."""
                grid = (blocks * n_chunks, B * Hs)
                if gluon and dkv_persistent_applies(config, fused):
                    n_items = grid[0] * grid[1]
                    programs = min(n_items, config.gluon_dkv_programs or _sm_count(q.device))
                    with launch_settings("ms_attn_bwd_dkv_sel_persistent_kernel", config, "gluon_dkv_"):
                        _gluon("dkv_persistent")[(programs,)](
                            q, k, v, do, dk_out, dv_out, lse, delta, idx_sorted, n_items, grid[0],
                            L, geo.P, region, merge, S, G, n_chunks, g0, window, start, scale * LOG2E, scale,
                            HQ=Hq, HKV=Hkv, HS=Hs, HEAD_DIM=D, BLOCK_M=GLUON_DKV_BLOCK_M,
                            STAGES=config.gluon_dkv_stages, LOAD_WARPS=config.gluon_load_warps,
                            LOAD_REGS=504 - 2 * config.gluon_dkv_consumer_regs,
                            CONSUMER_REGS=config.gluon_dkv_consumer_regs, PARTIAL=partial,
                            REGION=config.region_const("dkv", rope, region), num_warps=4,
                            maxnreg=GLUON_MAXNREG,
                        )  # fmt: skip
                    return
                if gluon:
                    regs = (fused and config.gluon_dkv_fused_regs) or config.gluon_dkv_consumer_regs
                    with launch_settings("ms_attn_bwd_dkv_sel_ws_kernel", config, "gluon_dkv_"):
                        _gluon("dkv")[grid](
                            q, k, v, do, dk_out, dv_out, lse, delta, idx_sorted, dqd,
                            L, geo.P, region, merge, S, G, n_chunks, g0, window, start, scale * LOG2E, scale,
                            HQ=Hq, HKV=Hkv, HS=Hs, HEAD_DIM=D, BLOCK_M=GLUON_DKV_BLOCK_M,
                            STAGES=config.gluon_dkv_stages, LOAD_WARPS=config.gluon_load_warps,
                            LOAD_REGS=504 - 2 * regs, CONSUMER_REGS=regs, PARTIAL=partial,
                            REGION=config.region_const("dkv", rope, region),
                            SPLIT_WAITS=split, FUSED_DQ=fused, ROW_STATS=row_stats,
                            DQ_EARLY=config.gluon_dq_early, ONE_WAIT=config.gluon_dkv_one_wait and not fused,
                            num_warps=4, maxnreg=GLUON_MAXNREG,
                        )  # fmt: skip
                    return
                with launch_settings("ms_attn_bwd_dkv_sel_kernel", config, "sel_"):
                    tk.ms_attn_bwd_dkv_sel_kernel[grid](
                        q, k, v, do, dk_out, dv_out, dq_arg, lse, delta, idx_sorted, cos, sin,
                        L, geo.P, region, merge, S, G, n_chunks, g0, window, start, scale * LOG2E, scale,
                        PARTIAL=partial, FUSED_DQ=fused, ROPE=rope, QROT=qrot, WHOLE=whole,
                        BLOCK_M=config.sel_block_m, BLOCK_N=config.sel_block_n, num_warps=config.sel_warps,
                        num_stages=config.sel_stages, **consts,
                    )  # fmt: skip

            if path == "atomic":
                launch_sel(G - first_block, first_block, G, dk32, dv32, False)
            else:
                _partial_sums(q, k, lse, idx_sorted, dk32, dv32, launch_sel, region=region,
                              config=config, first_block=first_block)  # fmt: skip
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    tma = _dkv_descriptors(q, k, v, do, start, config, ws=path != "reverse") if whole else {}
    with launch_settings("ms_attn_bwd_dkv_kernel", config, "dkv_"):
        tk.ms_attn_bwd_dkv_kernel[(geo.n_tiles, B * Hkv)](
            q, k, v, do, dk, dv, dk32, dv32, dq_arg, lse, delta, cos, sin,
            rev.order, rev.offsets, rev.block, rev.rank,
            L, geo.P, region, merge, budget - merge, rev.slots, geo.n_tiles, geo.n_pre_tiles,
            geo.tiles_per_block, start, scale * LOG2E, scale,
            ROPE=rope, SELECTED=path == "reverse", QROT=qrot, FUSED_DQ=fused and own_dq, WHOLE=whole,
            BLOCK_M=config.dkv_block_m,
            BLOCK_N=config.dkv_block_n, num_warps=config.dkv_warps, num_stages=config.dkv_stages,
            **consts, **tma,
        )  # fmt: skip
    return dk, dv


def _dkv_descriptors(q: Tensor, k: Tensor, v: Tensor, do: Tensor, start: int, config: LaunchConfig,
                     *, ws: bool) -> dict:  # fmt: skip
    """The own-segment dk/dv kernel's TMA descriptors (``LaunchConfig.dkv_tma``), as its keyword
    arguments, or {} where they do not apply (head dim not a power of two). q and do start at
    row ``start``: a query step reaching before it reads zeros there (TMA fills out-of-bounds
    rows with 0), never the rows before ``start``, which the caller need not have filled.
    ``ws``: whether the kernel may warp-specialize (``dkv_ws``); not on the reverse index's
    path, whose loop over the selecting blocks Triton's Hopper partitioning refuses."""
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    if not config.dkv_tma or D & (D - 1):
        return {}
    bm, bn = config.dkv_block_m, config.dkv_block_n
    rows = dict(QD=q.view(B, L, Hq * D)[:, start:], DOD=do.view(B, L, Hq * D)[:, start:])
    keys = dict(KD=k.view(B, L, Hkv * D), VD=v.view(B, L, Hkv * D))
    out = {name: TensorDescriptor.from_tensor(x, [1, bm, D]) for name, x in rows.items()}
    out |= {name: TensorDescriptor.from_tensor(x, [1, bn, D]) for name, x in keys.items()}
    return out | dict(WS=config.dkv_ws and ws)


def _partial_sums(q, k, lse, idx_sorted, dk32, dv32, launch_sel, *, region, config: LaunchConfig,
                  first_block: int) -> None:  # fmt: skip
    """The "partial" path: per window of blocks, every (block, chunk of selected tokens)
    program stores its dk, dv sums into float32 partial buffers (``launch_sel``, ``bwd_dkv``'s),
    then one program per (region, kv head) adds the region's partial sums into dk32, dv32 in a
    fixed order. Windows run one after the other on the stream, so every element of dk32, dv32
    gets the same additions in the same order on every run. The windows cover the blocks from
    ``first_block`` (the one holding the first query row computed) on."""
    live = idx_sorted[:, :, first_block:]
    B, Hs, G, S = live.shape
    Hkv, D = k.shape[2], k.shape[3]
    n = triton.cdiv(q.shape[1], region)
    window = partial_window((B, Hs, G, S), region, D, config)
    index = partial_index(live, Hkv, n, window)
    pdk = _empty((B * Hs, window, S * region, D), torch.float32, q.device)
    pdv = _empty((B * Hs, window, S * region, D), torch.float32, q.device)
    for win in range(index.n_windows):
        g0 = win * window
        launch_sel(min(window, G - g0), first_block + g0, window, pdk, pdv, True)
        tk.ms_attn_bwd_dkv_reduce_kernel[(n, B * Hkv)](
            pdk, pdv, dk32, dv32, index.offsets[win * B * Hkv * n :], index.src,
            q.shape[1], region, n,
            HKV=Hkv, HEAD_DIM=D, BLOCK_W=max(triton.next_power_of_2(region), 2),
            BLOCK_D=max(triton.next_power_of_2(D), 16),
        )  # fmt: skip


@torch.library.custom_op("ctxlab::ms_attn_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx_sorted: Tensor,
    region: int,
    budget: int,
    merge: int,
    rope: bool,
    inv_freq: Tensor,
    scale: float,
    start: int = 0,
) -> tuple[Tensor, Tensor]:
    return ms_attn_fwd(
        q,
        k,
        v,
        idx_sorted,
        region=region,
        budget=budget,
        merge=merge,
        rope=rope,
        inv_freq=inv_freq,
        scale=scale,
        start=start,
    )


@_fwd_op.register_fake
def _(q, k, v, idx_sorted, region, budget, merge, rope, inv_freq, scale, start=0):
    B, L, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=torch.float32)


@torch.library.custom_op("ctxlab::ms_attn_bwd", mutates_args=())
def _bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    idx_sorted: Tensor,
    region: int,
    budget: int,
    merge: int,
    rope: bool,
    inv_freq: Tensor,
    scale: float,
    start: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    return ms_attn_bwd(
        do,
        q,
        k,
        v,
        o,
        lse,
        idx_sorted,
        region=region,
        budget=budget,
        merge=merge,
        rope=rope,
        inv_freq=inv_freq,
        scale=scale,
        start=start,
    )


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, idx_sorted, region, budget, merge, rope, inv_freq, scale, start=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, idx_sorted, region, budget, merge, rope, inv_freq, scale, start = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, idx_sorted, o, lse)
    ctx.options = (region, budget, merge, rope, inv_freq, scale, start)


def _backward(ctx, do: Tensor, _dlse: Tensor | None):
    q, k, v, idx_sorted, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do.contiguous(), q, k, v, o, lse, idx_sorted, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _frequencies(pe: str, inv_freq: Tensor | None, q: Tensor) -> Tensor:
    """The op's ``inv_freq`` argument: the rotation's ``[D/2]`` float64 for ``pe="selected"``
    (plain RoPE of base 10000 when None), an unused empty tensor otherwise."""
    if pe != "selected":
        return q.new_empty(0, dtype=torch.float64)
    return selected_inv_freq(q.shape[-1], 10000.0, inv_freq, q.device)


def ms_attend_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    pe: str,
    inv_freq: Tensor | None = None,
    scale: float,
    start: int = 0,
) -> Tensor:
    """Attention given a selection ``idx [B, Hs, G, S]`` (any order, -1 = ignored entry):
    the Triton counterpart of ``ms_attend_torch``; differentiable in q, k, v. ``inv_freq``:
    ``pe="selected"``'s rotary inverse frequencies ``[D/2]`` (None: plain RoPE, base 10000).

    ``start`` as ``ms_attend_torch``'s: q, k, v are the whole histories ``[B, L, *, D]`` and only
    the query rows ``[start, L)`` are computed -> ``[B, L - start, Hq, D]``; the query tiles
    before ``start`` are not launched, and the backward sums only those rows' contributions
    (dq is 0 before ``start``). The blocks wholly before ``start`` are not read from idx."""
    _check_start(start, q.shape[1])
    o, _ = _fwd_op(
        q,
        k,
        v,
        sort_selection(idx),
        region,
        budget,
        merge,
        pe == "selected",
        _frequencies(pe, inv_freq, q),
        float(scale),
        start,
    )
    return o[:, start:]


def ms_select_configured(q: Tensor, k: Tensor, **options) -> Tensor:
    """The selection the Triton path runs: ``ms_select_shallow``, ``ms_select_triton`` or
    ``ms_select_torch``, by ``LaunchConfig.select_impl`` of q's device (the same indices; int32
    or int64)."""
    impl = resolve_select_impl(default_config(q.device), options["merge"])
    if impl == "triton":
        return ms_select_triton(q, k, **options)
    if impl == "shallow":
        return ms_select_shallow(q, k, **options)
    return ms_select_torch(q, k, **options)


def ms_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    region: int,
    budget: int,
    merge: int,
    pool: str,
    scope: str,
    select: str,
    pe: str,
    inv_freq: Tensor | None,
    scale: float | None,
) -> Tensor:
    """MS attention with Triton kernels -> ``[B, L, Hq, D]`` in q's dtype.

    Arguments as ``interface.ms_attention`` (validated there); ``scale`` None means
    ``1/sqrt(D)``. The selection (``ms_select_torch`` or the fused ``ms_select_triton``, by
    ``LaunchConfig.select_impl``; no gradient), the attention, its
    backward and RoPE for ``pe="selected"`` run in the kernels. Gradients
    reach q, k, v; the backward is bitwise deterministic when
    ``torch.use_deterministic_algorithms(True)`` is on or ``LaunchConfig.deterministic`` is
    set, or ``region`` is a multiple of the dk/dv key tile (see ``dkv_path``).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        idx = ms_select_configured(
            q, k, region=region, budget=budget, merge=merge, pool=pool, scope=scope, select=select
        )
    return ms_attend_triton(
        q,
        k,
        v,
        idx,
        region=region,
        budget=budget,
        merge=merge,
        pe=pe,
        inv_freq=inv_freq,
        scale=scale,
    )


__all__ = [
    "DKV_PATHS",
    "GPU_CONFIG",
    "gluon_applies",
    "SHALLOW_ITEMS",
    "INTERPRETER_CONFIG",
    "Geometry",
    "LaunchConfig",
    "PartialIndex",
    "ReverseIndex",
    "dkv_path",
    "ms_attend_triton",
    "ms_attention_triton",
    "ms_attn_bwd",
    "ms_attn_fwd",
    "ms_select_configured",
    "ms_select_shallow",
    "ms_select_triton",
    "partial_index",
    "resolve_select_impl",
    "reverse_index",
    "sort_selection",
]
