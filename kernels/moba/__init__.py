"""MoBA, mixture of block attention (Lu et al. 2025, arXiv 2502.13189): public API, PyTorch
reference, FlexAttention path, oracle.

``moba_attention`` validates and dispatches (``interface``); ``moba_attention_torch``,
``moba_select`` and ``moba_attend_torch`` are the vectorised reference (``torch_impl``);
``moba_attention_flex`` the GPU path (``flex``); ``naive`` holds the loop-based test oracle.
"""

from .interface import moba_attention, validate_moba_args
from .naive import moba_attention_naive
from .torch_impl import moba_attend_torch, moba_attention_torch, moba_pair_count, moba_select

__all__ = [
    "moba_attend_torch",
    "moba_attention",
    "moba_attention_naive",
    "moba_attention_torch",
    "moba_pair_count",
    "moba_select",
    "validate_moba_args",
]
