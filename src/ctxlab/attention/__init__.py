"""Attention: the attention contract, its cores, and the public MS attention API."""

from ctxlab.kernels.ms_attention import ms_attention, ms_select

from .base import AttentionCore, build_cores, check_core, checkpoint_kwargs
from .modules import DenseAttention, DenseSettings, dense_attention
from .ms import MSAttention, MSSettings
from .stats import selection_stats

__all__ = [
    "AttentionCore",
    "DenseAttention",
    "DenseSettings",
    "MSAttention",
    "MSSettings",
    "build_cores",
    "check_core",
    "checkpoint_kwargs",
    "dense_attention",
    "ms_attention",
    "ms_select",
    "selection_stats",
]
