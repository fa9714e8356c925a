"""Greedy generation with a KV cache (chunked prefill, then one token at a time).

Shapes: ``prompt`` is ``[B, P]`` token ids; returns ``[B, n_new]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def greedy_generate(model, prompt: Tensor, n_new: int, *, chunk_size: int = 0) -> Tensor:
    """Prefill ``prompt`` (in chunks of ``chunk_size`` tokens when > 0) and decode greedily.

    The prefill goes through the model's attention cores with a cache, so an MS core runs its
    sparse schedule over the prompt and decodes as its ``decode`` setting says.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    cache = model.new_cache()
    P = prompt.shape[1]
    step = chunk_size if chunk_size > 0 else P
    h = None
    for s in range(0, P, step):
        h = model.hidden(prompt[:, s : s + step], cache=cache)
    out = []
    nxt = model.lm_head(h[:, -1]).argmax(-1, keepdim=True)  # [B, 1]
    out.append(nxt)
    for _ in range(n_new - 1):
        h = model.hidden(nxt, cache=cache)
        nxt = model.lm_head(h[:, -1]).argmax(-1, keepdim=True)
        out.append(nxt)
    return torch.cat(out, dim=1)
