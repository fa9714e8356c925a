"""Building an HF model for ctxlab from its spec: load the source, swap in ctxlab attention and
positions (``hf``), add LoRA+ (``hf_lora``) and checkpointing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ctxlab.attention.base import AttentionCore
from ctxlab.model.hf import (
    HFCausalLM,
    HFModelSpec,
    hf_attention_modules,
    set_checkpointing,
    set_mlp_chunking,
)
from ctxlab.model.hf_lora import apply_lora_plus, check_source_rope, keep_float32_masters
from ctxlab.model.hf_sources import RANDOM_SHAPES, load_checkpoint, random_model, smollm2_checkpoint
from ctxlab.position.base import PositionScheme


def load_hf_source(spec: HFModelSpec) -> tuple[nn.Module, Path | None, bool]:
    """(HF model, checkpoint folder or None, pre-trained?) for ``spec.source``."""
    if spec.source in RANDOM_SHAPES:
        return (
            random_model(spec.source, overrides=spec.overrides, dtype=spec.dtype, device=spec.init_device),
            None,
            False,
        )
    folder = smollm2_checkpoint(spec.cache_dir) if spec.source == "smollm2" else Path(spec.source)
    return load_checkpoint(folder, dtype=spec.dtype), folder, True


def build_hf_model(
    spec: HFModelSpec, attention: Callable[[], AttentionCore], position: PositionScheme
) -> HFCausalLM:
    """Load ``spec.source``, swap in ``attention`` and ``position``, add LoRA+ and checkpointing.

    A pre-trained checkpoint must have been trained with the scheme's RoPE base
    (``position.base == rope_theta``), else its positions would silently change; a random
    shape takes the scheme's base.
    """
    hf_model, folder, pretrained = load_hf_source(spec)
    head_dim = hf_attention_modules(hf_model)[0].head_dim
    if spec.head_dim != head_dim:
        raise ValueError(f"model.head_dim={spec.head_dim} but {spec.source} has head_dim={head_dim}")
    theta = float(hf_model.config.rope_parameters["rope_theta"])
    if pretrained and abs(position.base - theta) > 1e-6 * theta:
        raise ValueError(
            f"position.base={position.base:g} but {spec.source} was pre-trained with rope_theta="
            f"{theta:g}; set position.base={theta:g}"
        )
    model = HFCausalLM(hf_model, attention, position, source_dir=folder)
    if pretrained:  # before any training: a scheme that would drop the source's own RoPE scaling
        check_source_rope(model)
    if spec.lora_rank:
        model.set_peft(
            apply_lora_plus(
                model.hf, rank=spec.lora_rank, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                targets=spec.lora_targets, trainable=spec.trainable,
            )
        )  # fmt: skip
        if spec.trainable_dtype == "float32":
            keep_float32_masters(model.hf, spec.trainable)
    if spec.gradient_checkpointing:
        set_checkpointing(model.hf, True)
    if spec.mlp_chunk:
        set_mlp_chunking(model.hf, spec.mlp_chunk)
    return model
