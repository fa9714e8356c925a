"""Models: ctxlab's own Llama-style decoder (``llama``) and transformers Llama/Mistral models with
ctxlab attention and positions (``hf``, built by ``hf_build``; LoRA+ and export in ``hf_lora``)."""

from .llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
