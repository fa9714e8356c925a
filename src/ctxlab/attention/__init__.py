"""Attention: the public MS attention API and the attention cores that models plug in."""

from ctxlab.kernels.ms_attention import ms_attention, ms_select

from .modules import DenseAttention, MSAttention, dense_attention, ms_fraction_computed
from .stats import selection_stats

__all__ = [
    "DenseAttention",
    "MSAttention",
    "dense_attention",
    "ms_attention",
    "ms_fraction_computed",
    "ms_select",
    "selection_stats",
]
