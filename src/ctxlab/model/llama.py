"""A Llama-style decoder with pluggable attention and position modules.

Shapes: B batch, L tokens, H query heads, Hkv key/value heads, D head dim, E model dim,
V vocabulary. Attention cores see q ``[B, L, H, D]`` and k, v ``[B, L, Hkv, D]`` (BTHD).

The model holds architecture only: no data, no optimizer, no logging. Position ids are an
explicit input, so cyclic/random-offset training schemes, packing and KV-cache decoding all
agree on which position a token has.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxlab.attention.base import AttentionCore, build_cores, checkpoint_kwargs
from ctxlab.attention.cache import KVCache, LayerCache
from ctxlab.position.base import PositionScheme


@dataclass(kw_only=True)
class LlamaConfig:
    """Size of the decoder. All fields are required except where a default is given."""

    vocab_size: int
    """Number of token ids; must cover the tokenizer's vocabulary."""
    dim: int
    """Model (residual stream) width E."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads H; ``dim`` must be divisible by it."""
    n_kv_heads: int
    """Key/value heads Hkv (GQA); must divide ``n_heads``."""
    head_dim: int = 0
    """Per-head width D; 0 means ``dim // n_heads``."""
    ffn_dim: int = 0
    """SwiGLU hidden width; 0 picks Llama's rule (8/3 * dim rounded up to a multiple of 64)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and output projection."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    gradient_checkpointing: bool = False
    """Recompute each block in the backward pass (activation memory ~ one block)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary positions")
        if self.ffn_dim == 0:
            self.ffn_dim = 64 * math.ceil(8 * self.dim / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self, include_embedding: bool = False) -> int:
        E, F_, hd = self.dim, self.ffn_dim, self.head_dim
        attn = E * (self.n_heads * hd) * 2 + E * (self.n_kv_heads * hd) * 2  # q, o, k, v
        block = attn + 3 * E * F_ + 2 * E
        total = self.n_layers * block + E
        if include_embedding:
            total += self.vocab_size * E * (1 if self.tie_embeddings else 2)
        return total


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Projections + position + a pluggable attention core.

    ``core(q, k, v, cache=...)`` returns ``[B, L, H, D]``; it owns the attention pattern
    (an ``AttentionCore``). The position scheme rotates q/k here unless it says that the core
    applies it (``position=selected``: RoPE on the tokens a sparse core selects).
    """

    def __init__(self, cfg: LlamaConfig, core: AttentionCore, position: PositionScheme) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.core = core
        # Shared by all layers; not registered as a child here so it appears once in the model.
        self._position = [position]

    def forward(self, x: Tensor, position_ids: Tensor, cache: LayerCache | None) -> Tensor:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim)
        position = self._position[0]
        if not position.applies_in_attention:
            q, k = position.rotate(q, k, position_ids)
        o = self.core(q, k, v, cache=cache)  # [B, L, H, D]
        return self.wo(o.reshape(B, L, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, core: AttentionCore, position: PositionScheme) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, core, position)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: Tensor, position_ids: Tensor, cache: LayerCache | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids, cache)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only LM: ``forward(input_ids [B, L], position_ids [B, L]) -> logits [B, L, V]``.

    ``attention`` is a factory (a Hydra ``_partial_``) called once per layer to build that
    layer's attention core; ``position`` is one scheme shared by every layer, so a callback that
    changes it (CRD NTK growth) changes every layer at once.
    """

    def __init__(
        self,
        config: LlamaConfig,
        attention: Callable[[], AttentionCore],
        position: PositionScheme,
    ) -> None:
        super().__init__()
        self.config = config
        self.position = position
        cores = build_cores(attention, position, config.n_layers)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, core, position) for core in cores)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    @property
    def cores(self) -> list[AttentionCore]:
        return [layer.attn.core for layer in self.layers]

    def set_attention(self, attention: Callable[[], AttentionCore]) -> None:
        """Give every layer a new core from ``attention`` (an evaluation attention, say); the
        cores hold no weights, so the trained weights are untouched."""
        for layer, core in zip(self.layers, build_cores(attention, self.position, len(self.layers))):
            layer.attn.core = core

    @property
    def _ckpt_kwargs(self) -> dict:
        return checkpoint_kwargs(self.cores)  # what each core's checkpoint policy keeps

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def hidden(
        self, input_ids: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """Final normalised hidden states ``[B, L, E]``."""
        B, L = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = self.position.position_ids(B, L, start=start, device=input_ids.device)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and layer_cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, position_ids, None, **self._ckpt_kwargs)
            else:
                x = layer(x, position_ids, layer_cache)
        return self.norm(x)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        return self.lm_head(self.hidden(input_ids, position_ids, cache))
