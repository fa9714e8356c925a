"""The pieces a context-extension study stands on: float32 masters for LoRA+'s trained modules,
evaluation attentions, a run's saved weights, the inference-scale search and joined streams."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hf import HD, V, ids, tiny_hf

from ctxlab.attention import DenseAttention, MSAttention
from ctxlab.evaluation import join_documents
from ctxlab.model.hf import HFCausalLM
from ctxlab.model.hf_lora import apply_lora_plus, keep_float32_masters
from ctxlab.position import CRDNTK, NTKAware, Rope
from ctxlab.weights import load_trainable, save_trainable


def bf16_lora_model(tie: bool = False) -> HFCausalLM:
    hf = tiny_hf()
    if tie:
        hf.config.tie_word_embeddings = True
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf = hf.to(torch.bfloat16)
    model = HFCausalLM(hf, DenseAttention, Rope(HD))
    model.set_peft(apply_lora_plus(model.hf))
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_float32_masters_let_bf16_norms_take_small_steps(tie):
    model = bf16_lora_model(tie)
    changed = keep_float32_masters(model.hf, ["embed_tokens", "norm"])
    norm = model.hf.model.norm.weight
    assert norm.dtype == torch.float32 and model.hf.model.embed_tokens.weight.dtype == torch.float32
    assert "model.norm" in changed and ("lm_head" in changed) == tie
    assert model.hf.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    before = norm.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    x = ids(2, 17)
    logits = model(x[:, :-1])
    assert logits.dtype == torch.bfloat16  # activations stay in the model's dtype
    torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), x[:, 1:].reshape(-1)).backward()
    opt.step()
    # A 1e-4 step on weights near 1: lost in bfloat16 (spacing 2**-7), kept in float32.
    assert (norm.detach() - before).abs().max() > 5e-5
    with torch.no_grad():  # evaluation without autocast works with the mixed dtypes
        assert model.eval()(x[:, :8]).dtype == torch.bfloat16


def test_without_masters_a_bf16_norm_does_not_move():
    model = bf16_lora_model()
    norm = model.hf.model.norm.weight
    before = norm.detach().clone()
    opt = torch.optim.AdamW([norm], lr=1e-4, weight_decay=0.0)
    x = ids(2, 17)
    torch.nn.functional.cross_entropy(
        model(x[:, :-1]).float().reshape(-1, V), x[:, 1:].reshape(-1)
    ).backward()
    opt.step()
    assert torch.equal(norm.detach(), before)  # the reason keep_float32_masters exists


def test_set_attention_swaps_cores_and_keeps_weights():
    model = HFCausalLM(tiny_hf(), DenseAttention, Rope(HD)).eval()
    x = ids(1, 40)
    dense = model(x)
    model.set_attention(lambda: MSAttention(region=4, budget=4, merge=2, select="causal", backend="torch"))
    assert all(isinstance(c, MSAttention) for c in model.cores)
    sparse = model(x)
    assert torch.allclose(sparse[:, :16], dense[:, :16], atol=1e-5)  # the dense prefix is unchanged
    assert not torch.allclose(sparse, dense, atol=1e-4)
    model.set_attention(DenseAttention)
    assert torch.allclose(model(x), dense)


def test_saved_weights_reload_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model = HFCausalLM(tiny_hf(), DenseAttention, Rope(HD))
    model.set_peft(apply_lora_plus(model.hf))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    save_trainable(model, tmp_path / "weights", {"steps": 3})
    fresh = HFCausalLM(tiny_hf(), DenseAttention, Rope(HD))
    fresh.set_peft(apply_lora_plus(fresh.hf))
    x = ids(1, 20)
    assert not torch.allclose(fresh.eval()(x), model.eval()(x))
    meta = load_trainable(fresh, tmp_path / "weights", "phase.checkpoint")
    assert meta["steps"] == 3 and set(meta["files"]) == {"small"}
    assert torch.equal(fresh(x), model(x))


def test_saved_weights_refuse_another_model(tmp_path):
    model = HFCausalLM(tiny_hf(), DenseAttention, Rope(HD))
    model.set_peft(apply_lora_plus(model.hf))
    save_trainable(model, tmp_path / "w", {})
    other = HFCausalLM(tiny_hf(), DenseAttention, Rope(HD))
    other.set_peft(apply_lora_plus(other.hf, rank=4))
    with pytest.raises(ValueError, match="phase.checkpoint.*does not match"):
        load_trainable(other, tmp_path / "w", "phase.checkpoint")
    (tmp_path / "w" / "trainable.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="trainable.safetensors is missing"):
        load_trainable(copy.deepcopy(model), tmp_path / "w", "phase.checkpoint")


@pytest.mark.parametrize(
    "make",
    [lambda: CRDNTK(head_dim=HD, scale_inf=8.0), lambda: NTKAware(HD, 10000.0, 8.0)],
    ids=["crd", "ntk"],
)
def test_eval_scale_is_settable_and_rebuilds_the_evaluation_tables(make):
    pos = make().eval()
    ids_ = torch.arange(100).view(1, -1)
    cos8, _ = pos.cos_sin(ids_)
    assert pos.eval_scale == 8.0
    pos.set_eval_scale(32.0)
    assert pos.eval_scale == 32.0
    cos32, _ = pos.cos_sin(ids_)
    assert not torch.allclose(cos8, cos32)
    assert torch.allclose(cos32, make().__class__(**_args(pos, 32.0)).eval().cos_sin(ids_)[0])
    with pytest.raises(ValueError, match="number >= 1"):
        pos.set_eval_scale(0.5)


def _args(pos, scale: float) -> dict:
    if isinstance(pos, CRDNTK):
        return {"head_dim": HD, "scale_inf": scale}
    return {"head_dim": HD, "base": 10000.0, "scale": scale}


def test_rope_has_no_eval_scale():
    pos = Rope(HD)
    assert pos.eval_scale is None
    with pytest.raises(ValueError, match="no evaluation scale"):
        pos.set_eval_scale(2.0)


def test_join_documents_puts_the_longest_last_and_keeps_a_short_split_whole():
    docs = [torch.full((n,), i) for i, n in enumerate([50, 10, 30])]
    (stream,) = join_documents(docs, eos_id=99, min_tokens=1000)
    assert len(stream) == 92 and stream[-51] == 99 and bool((stream[-50:] == 0).all())
    streams = join_documents(docs, eos_id=99, min_tokens=40)
    assert [len(s) for s in streams] == [41, 50]  # 10+1+30, then the longest on its own
    assert [len(s) for s in join_documents([*docs, torch.zeros(3)], eos_id=99, min_tokens=60)] == [96]


class _Data:
    """A datamodule stand-in that records which splits were read."""

    def __init__(self):
        self.read = []
        self.tokenizer = type("T", (), {"eos_id": 0})()

    def eval_documents(self, split):
        self.read.append(split)
        g = torch.Generator().manual_seed(0 if split == "validation" else 1)
        return [torch.randint(0, 64, (400,), generator=g)]


def test_scale_search_reads_only_validation_and_keeps_the_best_scale():
    from helpers import tiny_model
    from omegaconf import OmegaConf

    from ctxlab.evaluation import search_eval_scale

    cfg = OmegaConf.create({"eval": {"join_documents": 0, "perplexity": {"chunk_size": 0},
                                     "scale_search": {"candidates": [1, 2, 8], "length": 128,
                                                      "max_tokens": 256}}})  # fmt: skip
    model = tiny_model(position=NTKAware(8, 10000.0, 4.0))
    dm = _Data()
    found = search_eval_scale(model, dm, cfg, "cpu")
    assert dm.read == ["validation"] and found["split"] == "validation"
    best = min(found["candidates"], key=lambda r: r["val_ppl"])
    assert found["chosen"] == best["scale"] == model.position.eval_scale
    assert [r["scale"] for r in found["candidates"]] == [1.0, 2.0, 8.0]
