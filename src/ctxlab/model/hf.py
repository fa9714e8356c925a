"""transformers Llama/Mistral models with ctxlab's attention cores and position schemes.

Shapes: B batch, L new tokens, P cached tokens, H query heads, Hkv kv heads, D head dim,
E model dim, V vocabulary. transformers hands attention functions q ``[B, H, L, D]`` and k, v
``[B, Hkv, P+L, D]`` (BHLD) and expects ``[B, L, H, D]`` back; ctxlab cores take and return
BTHD (``[B, L, H, D]``), so the bridge transposes views, never copies.

Nothing of transformers is forked. Three hooks do the swap:

1. ``ctxlab_attention_forward`` is registered as the attention function ``"ctxlab"``
   (``transformers.AttentionInterface``) and the model's ``config._attn_implementation`` is
   set to it. Each HF attention module carries its own core as ``module.ctxlab_core`` (a
   registered child, so ``train()``/``eval()`` reach it); the function calls that core.
2. A mask function ``"ctxlab"`` (``AttentionMaskInterface``) builds no mask: every ctxlab core
   is causal by construction, and a 32K x 32K mask would cost 1 GiB. It refuses padding.
3. The model's rotary module is replaced by ``PositionRotary``, which asks the ctxlab position
   scheme for cos/sin, so training-time schemes (CRD NTK's cyclic random ids and growing
   scale, PoSE's skips) act exactly as in ctxlab's own Llama. HF's ``rope_parameters`` are set
   to the scheme's ``hf_rope_scaling()``, so an exported model reloads in plain transformers
   with the scheme's evaluation positions.

``HFCausalLM`` wraps the HF model with the interface ctxlab's trainer and evaluations use
(``forward``, ``hidden``, ``lm_head``, ``new_cache``, ``cores``, ``position``, ``config``).
Its KV cache is ctxlab's ``KVCache``, handed to the attention function as a keyword argument
(``ctxlab_cache``), so every core decodes exactly as it does inside ctxlab's Llama; HF's own
cache (``generate`` on the HF model) also works for dense and S2 cores.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ctxlab.attention.base import AttentionCore, build_cores, checkpoint_kwargs
from ctxlab.attention.cache import KVCache, LayerCache
from ctxlab.model.hf_sources import (
    RANDOM_SHAPES,
    SUPPORTED_ARCHITECTURES,
    torch_dtype,
)
from ctxlab.position.base import PositionScheme

ATTN_IMPLEMENTATION = "ctxlab"


# The attention bridge -------------------------------------------------------------------


class _PrefilledCache(LayerCache):
    """HF's cache already appended the new k, v; ``append`` hands back the full histories."""

    def __init__(self, k_all: Tensor, v_all: Tensor, n_new: int) -> None:
        super().__init__()
        self.k, self.v = k_all[:, :-n_new], v_all[:, :-n_new]
        self._k_all, self._v_all = k_all, v_all

    def append(self, k: Tensor, v: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor, None]:
        return self._k_all, self._v_all, None


def ctxlab_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ctxlab_cache: KVCache | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: q ``[B, H, L, D]``, k, v ``[B, Hkv, P+L, D]`` ->
    (``[B, L, H, D]``, None). Runs ``module.ctxlab_core``; never returns attention weights.

    With ``ctxlab_cache`` (``HFCausalLM.new_cache()``) the layer's ctxlab cache is used. Without
    it, keys longer than the queries mean HF's own cache holds the history: cores that can
    (``AttentionCore.continues_foreign_cache``) attend over it, the others refuse.
    """
    core = getattr(module, "ctxlab_core", None)
    if core is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no ctxlab "
            "core; build the model with ctxlab.model.hf.HFCausalLM or attach_ctxlab_attention"
        )
    if dropout:
        raise ValueError(f"ctxlab attention has no attention dropout; the model's config asks for {dropout}")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"ctxlab attention has no sliding window; the model's config has {kwargs['sliding_window']}"
        )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # BTHD views
    n_new = q.shape[1]
    if ctxlab_cache is not None:
        out = core(q, k, v, cache=ctxlab_cache.layers[module.layer_idx])
    elif k.shape[1] == n_new:
        out = core(q, k, v)
    else:
        if not core.continues_foreign_cache(n_new):
            raise ValueError(
                f"{core.describe()} cannot continue from transformers' own KV cache (it keeps no "
                "query history); decode through HFCausalLM with cache=model.new_cache()"
            )
        out = core(q, k[:, -n_new:], v[:, -n_new:], cache=_PrefilledCache(k, v, n_new))
    return out, None


def ctxlab_mask(*, attention_mask: Tensor | None = None, **kwargs) -> None:
    """transformers mask function: no mask (ctxlab cores are causal by construction).

    ``attention_mask`` is the 2D ``[B, P+L]`` padding mask a caller passed; ctxlab cores do not
    implement padding, so any masked-out position raises instead of being ignored.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "ctxlab attention does not support padding (attention_mask has zeros); use unpadded rows"
        )
    return None


def register_ctxlab_attention() -> None:
    """Register ``"ctxlab"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ctxlab_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ctxlab_mask)


class PositionRotary(nn.Module):
    """Stands in for the HF model's rotary module: ``forward(x, position_ids [B, L])`` returns
    the scheme's cos, sin ``[B, L, D]`` in x's dtype, what HF's ``apply_rotary_pos_emb`` takes.

    HF rotates in the activations' dtype with tables cast to it (ctxlab's Llama rotates in
    float32); in float32 the two agree to rounding. The replaced HF module is kept (not as a
    child) so that export can rebuild one from the updated config.
    """

    def __init__(self, position: PositionScheme, replaced: nn.Module) -> None:
        super().__init__()
        self._position = [position]  # the wrapper owns the scheme; no second registration
        self._replaced = [replaced]

    @property
    def replaced_class(self) -> type:
        return type(self._replaced[0])

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        position = self._position[0]
        if position_ids.shape[0] == 1 and x.shape[0] > 1:
            position_ids = position_ids.expand(x.shape[0], -1)
        cos, sin = position.cos_sin(position_ids.to(position.inv_freq.device))
        return cos.to(device=x.device, dtype=x.dtype), sin.to(device=x.device, dtype=x.dtype)


def hf_attention_modules(hf_model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of every decoder layer of a Llama/Mistral causal LM."""
    return [layer.self_attn for layer in hf_model.model.layers]


def check_architecture(hf_model: nn.Module) -> None:
    """ValueError unless ``hf_model`` is a supported causal LM whose attention ctxlab reproduces."""
    arch = type(hf_model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"the ctxlab attention swap supports {', '.join(SUPPORTED_ARCHITECTURES)}, got {arch}"
        )
    window = getattr(hf_model.config, "sliding_window", None)
    if window is not None:
        raise ValueError(
            f"{arch} has sliding_window={window}, which ctxlab attention does not implement; use "
            "a checkpoint whose config.json has sliding_window null (Mistral v0.2 and later)"
        )
    for attn in hf_attention_modules(hf_model):
        if abs(attn.scaling - attn.head_dim**-0.5) > 1e-12:
            raise ValueError(f"{arch} scales attention by {attn.scaling}, not 1/sqrt(head_dim); unsupported")


def attach_ctxlab_attention(
    hf_model: nn.Module, attention: Callable[[], nn.Module], position: PositionScheme
) -> list[nn.Module]:
    """Swap ctxlab attention and positions into ``hf_model`` in place; returns the cores.

    ``attention`` is called once per layer (a Hydra ``_partial_``). Raises ValueError for an
    unsupported architecture, a scheme whose head size differs from the model's, and
    ``position=selected``: HF applies its rotary to q and k before the attention function,
    so RoPE on the selected tokens only cannot be had without forking the model files.
    """
    check_architecture(hf_model)
    head_dim = hf_attention_modules(hf_model)[0].head_dim
    if position.applies_in_attention:
        raise ValueError(
            f"position={position.name} applies RoPE inside MS attention (pe='selected'), but "
            "transformers rotates q and k before its attention function; HF models support "
            "only schemes that rotate before attention (rope, pi, ntk, yarn, crd_ntk, ...)"
        )
    if position.head_dim != head_dim:
        raise ValueError(
            f"position.head_dim={position.head_dim} does not match the model's head_dim={head_dim}"
        )
    register_ctxlab_attention()
    modules = hf_attention_modules(hf_model)
    cores = build_cores(attention, position, len(modules))
    for attn, core in zip(modules, cores):
        attn.ctxlab_core = core
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    rope = position.hf_rope_scaling()
    if rope is not None:
        hf_model.config.rope_parameters = rope
    hf_model.model.rotary_emb = PositionRotary(position, hf_model.model.rotary_emb)
    return cores


def set_checkpointing(hf_model: nn.Module, on: bool) -> None:
    """Recompute every decoder layer in the backward pass (non-reentrant) or stop doing so.

    transformers 5.2x calls this activation checkpointing; earlier 5.x (the GPU image's 5.17)
    only has the gradient-checkpointing names.
    """
    # The cores' checkpoint policies (MS: the recomputation reuses each layer's saved selection).
    cores = [getattr(a, "ctxlab_core", None) for a in hf_attention_modules(hf_model)]
    kwargs = checkpoint_kwargs([c for c in cores if c is not None])  # none: a plain HF model
    if hasattr(hf_model, "activation_checkpointing_enable"):
        if on:
            hf_model.activation_checkpointing_enable(kwargs)
        else:
            hf_model.activation_checkpointing_disable()
    elif on:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_disable()


def _chunked_mlp_forward(self, x: Tensor) -> Tensor:
    """An HF MLP over ``self.ctxlab_mlp_chunk`` tokens at a time, each chunk recomputed in the
    backward pass: the intermediates (4 x L x ffn_dim) never exist for the whole sequence."""
    from torch.utils.checkpoint import checkpoint

    forward = type(self).forward
    chunk = self.ctxlab_mlp_chunk
    if not (self.training and torch.is_grad_enabled()) or x.shape[1] <= chunk:
        return forward(self, x)
    parts = [
        checkpoint(forward, self, x[:, i : i + chunk], use_reentrant=False)
        for i in range(0, x.shape[1], chunk)
    ]
    return torch.cat(parts, dim=1)


def check_mlp_chunk(chunk) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"model.mlp_chunk must be an int >= 0 (0: off), got {chunk!r}")


def set_mlp_chunking(hf_model: nn.Module, chunk: int) -> None:
    """Run every decoder layer's MLP ``chunk`` tokens at a time in training (0: off).

    The MLP is token-wise, so chunking changes no value; with each chunk recomputed in the
    backward pass the layer's peak memory loses its largest term (the gate/up/activation
    tensors, about 12 GiB at 128K tokens for a 7B Llama) for one more MLP forward. The forward
    is patched on the module instance, so parameter names, checkpoints and exports are as before.
    """
    check_mlp_chunk(chunk)
    for layer in hf_model.model.layers:
        mlp = layer.mlp
        if chunk:
            mlp.ctxlab_mlp_chunk = chunk
            mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)
        elif "forward" in vars(mlp):
            del mlp.forward, mlp.ctxlab_mlp_chunk


def is_checkpointing(hf_model: nn.Module) -> bool:
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in hf_model.modules())


def detach_ctxlab_attention(hf_model: nn.Module) -> None:
    """Undo ``attach_ctxlab_attention``: drop the cores, SDPA attention, HF's rotary module
    rebuilt from the (scheme-updated) config."""
    for attn in hf_attention_modules(hf_model):
        if hasattr(attn, "ctxlab_core"):
            del attn.ctxlab_core
    hf_model.set_attn_implementation("sdpa")
    set_mlp_chunking(hf_model, 0)
    rotary = hf_model.model.rotary_emb
    if isinstance(rotary, PositionRotary):
        device = next(hf_model.parameters()).device
        hf_model.model.rotary_emb = rotary.replaced_class(config=hf_model.config).to(device)


# The ctxlab-facing wrapper -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HFModelInfo:
    """The shape of an HF model under ctxlab's names (what callbacks and checkpoints read)."""

    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    tie_embeddings: bool

    @classmethod
    def of(cls, hf_model: nn.Module) -> HFModelInfo:
        c = hf_model.config
        return cls(
            architecture=type(hf_model).__name__, vocab_size=c.vocab_size, dim=c.hidden_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads, head_dim=hf_attention_modules(hf_model)[0].head_dim,
            ffn_dim=c.intermediate_size, tie_embeddings=bool(c.tie_word_embeddings),
        )  # fmt: skip

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def n_params(self, include_embedding: bool = False) -> int:
        """Parameters of the base model (LoRA adapters not counted), as ``LlamaConfig.n_params``."""
        E, F_, hd = self.dim, self.ffn_dim, self.head_dim
        attn = E * (self.n_heads * hd) * 2 + E * (self.n_kv_heads * hd) * 2
        total = self.n_layers * (attn + 3 * E * F_ + 2 * E) + E
        if include_embedding:
            total += self.vocab_size * E * (1 if self.tie_embeddings else 2)
        return total


class HFCausalLM(nn.Module):
    """An HF Llama/Mistral causal LM behind ctxlab's model interface.

    ``forward(input_ids [B, L], position_ids [B, L] | None, cache) -> logits [B, L, V]``;
    ``hidden`` gives the final normalised states ``[B, L, E]``. Position ids default to the
    scheme's (training ids in ``train()``, natural ids from ``cache.length`` in ``eval()``).

    Attributes:
        hf: the transformers model (LoRA layers injected in place when LoRA is on).
        position: the ctxlab scheme that rotates every layer.
        config: ``HFModelInfo``; the HF config is ``hf.config``.
        peft: the ``peft.PeftModel`` around ``hf`` when LoRA is on, else None.
        source_dir: the checkpoint folder the weights came from (None for random shapes).
    """

    def __init__(
        self,
        hf_model: nn.Module,
        attention: Callable[[], nn.Module],
        position: PositionScheme,
        *,
        source_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        attach_ctxlab_attention(hf_model, attention, position)
        self.hf = hf_model
        self.position = position
        self.config = HFModelInfo.of(hf_model)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self._peft: list = []  # not a child: it wraps ``hf``, which is registered once, here

    @property
    def peft(self):
        return self._peft[0] if self._peft else None

    def set_peft(self, peft_model) -> None:
        self._peft[:] = [peft_model]

    @property
    def cores(self) -> list[AttentionCore]:
        return [attn.ctxlab_core for attn in hf_attention_modules(self.hf)]

    def set_attention(self, attention: Callable[[], nn.Module]) -> None:
        """Give every layer a new core from ``attention`` (an evaluation attention, say); the
        cores hold no weights, so the trained weights and adapters are untouched."""
        modules = hf_attention_modules(self.hf)
        for attn, core in zip(modules, build_cores(attention, self.position, len(modules))):
            attn.ctxlab_core = core

    def refresh_rope_config(self) -> None:
        """Write the scheme's evaluation rotation into the HF config (after its scale changed),
        so an export describes what the model computes."""
        rope = self.position.hf_rope_scaling()
        if rope is not None:
            self.hf.config.rope_parameters = rope

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)

    def hidden(
        self, input_ids: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """Final normalised hidden states ``[B, L, E]``."""
        B, L = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = self.position.position_ids(B, L, start=start, device=input_ids.device)
        out = self.hf.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, ctxlab_cache=cache
        )
        return out.last_hidden_state

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        return self.lm_head(self.hidden(input_ids, position_ids, cache))


# Building from config --------------------------------------------------------------------


@dataclass(kw_only=True)
class HFModelSpec:
    """An HF model for ctxlab (the ``model`` group's ``_target_`` for ``kind: hf``)."""

    kind: str = "hf"
    """Tells ``ctxlab.build.build_model`` to build through ``hf_build.build_hf_model``; must be "hf"."""
    source: str
    """``smollm2`` (the packaged SmolLM2-135M), a random shape (``llama2_7b``, ``mistral_7b``)
    or a local Llama/Mistral checkpoint folder."""
    head_dim: int
    """D of the model; the position scheme is built with it and it must match the checkpoint."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    lora_rank: int = 8
    """LoRA rank r on ``lora_targets``; 0 trains every parameter (full fine-tuning)."""
    lora_alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear modules (by name) that get LoRA adapters; a name the model lacks is an error."""
    trainable: list[str] = field(default_factory=lambda: ["embed_tokens", "norm"])
    """LoRA+: modules whose name ends with one of these train fully (embeddings and norms)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in the backward pass."""
    mlp_chunk: int = 0
    """Training runs each layer's MLP this many tokens at a time, recomputed in the backward
    (0: whole sequence). Cuts the peak memory at long L for one more MLP forward."""
    trainable_dtype: str = "float32"
    """dtype of the fully trained modules (``trainable``) in a low-precision model: float32
    masters (``hf_lora.keep_float32_masters``; a bf16 norm weight cannot take a 1e-4 step) or
    ``model`` (the model's dtype, as before)."""
    overrides: dict = field(default_factory=dict)
    """Config fields changed in a random shape (e.g. ``num_hidden_layers``); random shapes only."""
    init_device: str = "cpu"
    """Device a random shape is initialised on (``cuda`` for 7B: CPU init takes minutes)."""
    cache_dir: str | None = None
    """Where ``smollm2`` is converted to (default ``$CTXLAB_CACHE`` or ``~/.cache/ctxlab``)."""

    def __post_init__(self) -> None:
        if self.kind != "hf":
            raise ValueError(f"model.kind must be 'hf' for HFModelSpec, got {self.kind!r}")
        if not self.source:
            raise ValueError("model.source must name smollm2, a random shape or a checkpoint folder")
        torch_dtype(self.dtype)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be an int >= 0, got {self.lora_rank!r}")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("model.lora_targets is empty, but model.lora_rank > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.overrides and self.source not in RANDOM_SHAPES:
            raise ValueError(
                f"model.overrides {dict(self.overrides)} change a random shape's config, but "
                f"model.source={self.source!r} is not one of {sorted(RANDOM_SHAPES)}"
            )
        check_mlp_chunk(self.mlp_chunk)  # before any weight is loaded
        if self.trainable_dtype not in ("float32", "model"):
            raise ValueError(f"model.trainable_dtype must be float32 or model, got {self.trainable_dtype!r}")
        self.lora_targets, self.trainable = list(self.lora_targets), list(self.trainable)
        self.overrides = dict(self.overrides)
