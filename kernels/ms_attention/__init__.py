"""MS ("merge and select") attention, arXiv 2410.04211: public API, PyTorch reference, oracle.

``ms_attention`` / ``ms_select`` validate and dispatch (``interface``); ``ms_attention_torch``,
``ms_select_torch`` and ``ms_attend_torch`` are the vectorised reference (``torch_impl``);
``naive`` holds the loop-based test oracle.
"""

from .interface import ms_attention, ms_select, validate_ms_args
from .torch_impl import ms_attend_torch, ms_attention_torch, ms_select_torch

__all__ = [
    "ms_attend_torch",
    "ms_attention",
    "ms_attention_torch",
    "ms_select",
    "ms_select_torch",
    "validate_ms_args",
]
