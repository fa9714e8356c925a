"""MoBA in the kernel benchmark (``kernels/bench``): ``--ops moba`` beside dense, gather, triton.

Shapes: q [B, L, Hq, D], k, v [B, L, Hkv, D]. A case's MS setting fixes MoBA's by the same key
budget: blocks of ``m*w`` tokens (one MS query block) and ``top_k = T/m - 1`` earlier blocks, so
a query sees at most ``T*w`` keys in both (paper: blocks of 1,024 tokens, top_k 7, 8,192 keys).
``moba:block_size=512+top_k=15`` overrides them. The op carries its own float32 reference and
its pair count (``kernels/bench/run.check_and_time``).
"""

from __future__ import annotations

from torch import Tensor

from ..bench.cases import Case
from .interface import moba_attention
from .torch_impl import moba_attention_torch, moba_pair_count


def moba(case: Case, idx: Tensor, block_size: int | None = None, top_k: int | None = None):
    """``fn(q, k, v) -> o`` by MoBA's fast path (FlexAttention on a GPU); ``idx`` (the MS
    selection) is not used."""
    block_size = block_size or case.merge * case.region
    top_k = top_k or case.budget // case.merge - 1
    scale = case.D**-0.5

    def fn(q, k, v):
        return moba_attention(q, k, v, block_size=block_size, top_k=top_k, scale=scale)

    def reference(q, k, v, start: int) -> Tensor:
        return moba_attention_torch(q[:, start:], k, v, block_size=block_size, top_k=top_k, scale=scale)

    fn.reference = reference
    fn.pairs = case.B * case.Hq * moba_pair_count(case.L, block_size, top_k)
    return fn
