"""Small builders shared by tests."""

from __future__ import annotations

import torch

from ctxlab.attention import DenseAttention, MSAttention
from ctxlab.model import Llama, LlamaConfig
from ctxlab.position import Rope


def tiny_model(
    attention="dense", *, vocab=64, dim=32, layers=2, heads=4, kv_heads=2, position=None, seed=0, **ms
):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads)
    if attention == "dense":
        factory = DenseAttention
    else:
        kw = dict(region=4, budget=4, merge=2, select=attention, backend="torch") | ms
        factory = lambda: MSAttention(**kw)  # noqa: E731
    position = position or Rope(head_dim=cfg.head_dim, base=10000.0)
    return Llama(cfg, factory, position).eval()
