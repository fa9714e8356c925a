"""KV cache for chunked evaluation and decoding.

Shapes: per layer ``k``, ``v`` are ``[B, P, Hkv, D]`` for the P cached tokens; ``q`` ``[B, P, H, D]``
is kept only for attention cores whose key selection reads past queries (MS attention's sparse
decoding), everything else leaves it ``None``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """What one layer has seen so far. ``append`` returns the full histories after the append."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.q: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: Tensor, v: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.k is None:
            self.k, self.v, self.q = k, v, q
        else:
            self.k = torch.cat([self.k, k], dim=1)
            self.v = torch.cat([self.v, v], dim=1)
            if q is not None:
                if self.q is None:
                    raise ValueError("cache: q history was not kept from the start")
                self.q = torch.cat([self.q, q], dim=1)
        return self.k, self.v, self.q


class KVCache:
    """One ``LayerCache`` per layer; ``length`` is the number of tokens already processed."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length
