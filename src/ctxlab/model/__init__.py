"""Models: ctxlab's own Llama-style decoder (HF models arrive with the fine-tuning issue)."""

from .llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
