"""LoRA+ through peft (LongLoRA's recipe) and export of a merged, plain-transformers checkpoint.

LoRA+ = LoRA adapters on the attention projections (q, k, v, o; rank 8, alpha 16) with the
embeddings and every norm trained fully (LongLoRA, Chen et al. 2023: without them LoRA does
not extend the context). Everything else is frozen. The trainable embeddings and norms stay
the base model's own parameters (not peft ``modules_to_save`` copies, which would double the
embedding's memory), so merging the adapters leaves a model whose every weight is trained.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ctxlab.model.hf import detach_ctxlab_attention, is_checkpointing, set_checkpointing
from ctxlab.model.hf_sources import torch_dtype

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)  # fmt: skip


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _matches(module_name: str, patterns: Sequence[str]) -> bool:
    """True if the last component of ``module_name`` ends with one of ``patterns``."""
    return module_name.rsplit(".", 1)[-1].endswith(tuple(patterns))


def apply_lora_plus(
    hf_model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    trainable: Sequence[str] = ("embed_tokens", "norm"),
):
    """Inject LoRA adapters into ``hf_model`` in place and return the ``peft.PeftModel``.

    Trainable afterwards: the adapters' ``lora_A``/``lora_B`` and the parameters of modules
    whose name ends with one of ``trainable`` (with tied embeddings the output head is the
    embedding, so it trains too). Raises ValueError, before changing anything, for a target
    that is not a linear module of the model or a ``trainable`` pattern that matches nothing.
    """
    from peft import LoraConfig, get_peft_model

    have = _linear_names(hf_model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ValueError(
            f"model.lora_targets {missing} are not linear modules of {type(hf_model).__name__} "
            f"(it has {sorted(have)})"
        )
    names = [n for n, _ in hf_model.named_modules()]
    unmatched = [p for p in trainable if not any(_matches(n, [p]) for n in names)]
    if unmatched:
        raise ValueError(f"model.trainable {unmatched} match no module of {type(hf_model).__name__}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(hf_model, config)
    for name, module in hf_model.named_modules():
        if _matches(name, trainable):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    return peft_model


def keep_float32_masters(hf_model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Keep LoRA+'s fully trained modules (embeddings, norms) in float32 inside a low-precision
    model; returns the names of the modules changed.

    In a bfloat16 model an AdamW step of 1e-4 on a norm weight near 1 is below bfloat16's spacing
    there (2**-7) and rounds away, so without float32 masters the norms never train and the
    embeddings train coarsely. The weights become float32 (the optimizer updates those); a
    pre-hook casts each such module's floating inputs to float32 and a hook casts its floating
    outputs back to the model's dtype, so activations, memory and the residual stream stay as
    they were. A weight tied to one of these (the output head of tied embeddings) is float32 too,
    and its module gets the same hooks. peft's LoRA adapters are float32 already.
    """
    import torch

    params = [p for p in hf_model.parameters() if p.is_floating_point()]
    compute = max({p.dtype for p in params}, key=lambda d: sum(p.numel() for p in params if p.dtype == d))
    if compute == torch.float32:
        return []
    for name, module in hf_model.named_modules():
        if _matches(name, trainable) and "lora_" not in name:
            module.float()
    changed = []
    for name, module in hf_model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if "lora_" in name or not own or any(p.dtype != torch.float32 for p in own):
            continue

        def to_master(_m, args):
            return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        def to_compute(_m, _args, out, dtype=compute):
            return out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out

        module.register_forward_pre_hook(to_master)
        module.register_forward_hook(to_compute)
        changed.append(name)
    return changed


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients (shared parameters listed once)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def source_rope_parameters(model) -> dict | None:
    """The ``rope_parameters`` the source checkpoint of ``model`` (an ``HFCausalLM``) was
    pre-trained with, read from its folder's config (building the model replaced the live
    config's); None for a random shape, which has no pre-training."""
    if model.source_dir is None or not (model.source_dir / "config.json").is_file():
        return None
    from transformers import AutoConfig

    rope = AutoConfig.from_pretrained(str(model.source_dir), local_files_only=True).rope_parameters
    return dict(rope) if rope else None


def check_source_rope(model) -> None:
    """Refuse a scheme whose export would drop the source checkpoint's own RoPE scaling: a
    source pre-trained with a non-default ``rope_type`` (Llama 3's ``llama3``, a YaRN model's
    ``yarn``) exported with another type would reload computing positions it never saw."""
    source, ours = source_rope_parameters(model), model.position.hf_rope_scaling()
    kind = (source or {}).get("rope_type", "default")
    if kind != "default" and ours is not None and ours.get("rope_type") != kind:
        raise ValueError(
            f"{model.source_dir} was pre-trained with rope_type={kind!r} ({source}); position="
            f"{model.position.name} exports rope_type={ours.get('rope_type')!r}, which would drop it. "
            "Use a position scheme of that type, or a source checkpoint with default RoPE"
        )


def exported_window(model, rope: dict, trained_length: int | None) -> int:
    """``max_position_embeddings`` of the export: the context the fine-tuned model is for.

    HF's ``dynamic`` reads its original window there (beyond it the base grows), so it is the
    scheme's ``original_max_position``. Otherwise: the pre-trained window (the source config's)
    times the scheme's factor (``pi``/``yarn``'s ``factor``, from YaRN's own original window;
    the NTK evaluation scale of ``ntk``/``crd_ntk``), PoSE's ``target_length``, and at least
    the rows it was fine-tuned on (``trained_length``).
    """
    position = model.position
    frequencies = getattr(position, "frequencies", None) or position  # PoSE rotates with another scheme
    if rope.get("rope_type") == "dynamic":
        return int(frequencies.original_max_position)
    pretrained = int(model.hf.config.max_position_embeddings)
    factor = rope.get("factor") or frequencies.eval_scale or 1.0
    window = int(round(int(rope.get("original_max_position_embeddings") or pretrained) * factor))
    return max(window, pretrained, int(getattr(position, "target_length", 0)), trained_length or 0)


def export_hf(
    model,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    inplace: bool = False,
    trained_length: int | None = None,
) -> Path:
    """Save ``model`` (an ``HFCausalLM``) as a checkpoint that plain transformers loads.

    LoRA adapters are merged into the weights, ctxlab's attention and rotary are replaced by
    SDPA and HF's rotary, the config's ``rope_parameters`` are the scheme's
    ``hf_rope_scaling()`` and its ``max_position_embeddings`` the fine-tuned window
    (``exported_window``; ``trained_length``: the rows it was fine-tuned on), so
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` computes what the model computes at
    evaluation with dense attention, at any length. A source pre-trained with its own RoPE
    scaling that the scheme would drop is refused (``check_source_rope``). The source
    checkpoint's tokenizer is loaded and written with ``save_pretrained`` (its
    ``model_max_length`` set to the window). ``inplace=False`` works on a copy (the model stays
    trainable; a 7B bf16 copy needs 13.5 GB more); ``inplace=True`` merges the model itself.
    ``dtype`` (float32, bfloat16, float16) casts the saved weights.
    """
    rope = model.position.hf_rope_scaling()
    if rope is None:
        raise ValueError(
            f"position={model.position.name} has no transformers equivalent; the exported model "
            "would not reload with the positions it was trained with"
        )
    check_source_rope(model)
    window = exported_window(model, rope, trained_length)
    target = model.peft if model.peft is not None else model.hf
    if not inplace:
        target = copy.deepcopy(target)
    hf_model = target.merge_and_unload() if model.peft is not None else target
    hf_model.config.rope_parameters = rope
    hf_model.config.max_position_embeddings = window  # before HF's rotary is rebuilt from the config
    detach_ctxlab_attention(hf_model)
    if is_checkpointing(hf_model):
        set_checkpointing(hf_model, False)
    if dtype is not None:
        hf_model.to(torch_dtype(dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    src = model.source_dir
    if src is not None and any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        tokenizer.model_max_length = window
        tokenizer.save_pretrained(str(out))
    if src is not None:  # what neither save_pretrained wrote (a generation config, say)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (out / name).exists():
                shutil.copy2(src / name, out / name)
    return out
