"""MS attention under gradient checkpointing: the recomputed forward reuses the saved selection
(one selection per layer and step instead of two) and values and gradients are unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_model

import ctxlab.attention.selection as selection
from ctxlab.attention import MSAttention
from ctxlab.attention.selection import ms_selection
from ctxlab.kernels.ms_attention import ms_select_torch


def _counting(monkeypatch) -> list[int]:
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return ms_select_torch(*args, **kwargs)

    monkeypatch.setattr(selection, "ms_select_torch", counted)
    return calls


def _step(model, ids) -> dict:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _hf_ms_model():
    import functools

    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxlab.model.hf import HFCausalLM
    from ctxlab.position import Rope

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    hf = LlamaForCausalLM(cfg)
    core = functools.partial(MSAttention, region=4, budget=4, merge=2, select="causal", backend="torch")
    return HFCausalLM(hf, core, Rope(8, base=10000.0))


@pytest.mark.parametrize("kind", ["ctxlab", "hf"])
def test_checkpointed_layers_select_once_with_identical_gradients(kind, monkeypatch):
    from ctxlab.model.hf import set_checkpointing

    calls = _counting(monkeypatch)
    model = (tiny_model("causal", seed=2) if kind == "ctxlab" else _hf_ms_model()).train()
    ids = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(3))
    ref = _step(model, ids)
    assert len(calls) == 2  # no checkpointing: one selection per layer
    if kind == "ctxlab":
        model.gradient_checkpointing = True
    else:
        set_checkpointing(model.hf, True)
    calls.clear()
    got = _step(model, ids)
    assert len(calls) == 2, "the recomputed forward selected again instead of reusing the saved indices"
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)


def test_selection_op_matches_ms_select_and_has_a_fake():
    q, k = torch.randn(1, 37, 4, 8), torch.randn(1, 37, 2, 8)
    opts = dict(region=4, budget=4, merge=2, pool="mean", scope="group", select="paper")
    idx = ms_selection(q, k, **opts, backend="torch")
    assert idx.dtype == torch.long and torch.equal(idx, ms_select_torch(q, k, **opts))
    torch.library.opcheck(
        torch.ops.ctxlab.ms_selection.default, (q, k, 4, 4, 2, "mean", "group", "paper", "torch")
    )
    with pytest.raises(ValueError, match="backend"):
        MSAttention(region=4, budget=4, merge=2, backend="cuda")


@pytest.mark.gpu
def test_gpu_ms_core_with_kept_selection_matches_the_torch_path():
    """On CUDA the core runs the Triton attention after the selection op; in float32 it must agree
    with the PyTorch path, and a checkpointed model's gradients with the unchecked ones."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2100, h, 64, device="cuda", requires_grad=True) for h in (8, 2, 2))
    opts = dict(region=16, budget=32, merge=4, select="causal")
    ours = MSAttention(**opts, backend="auto")(q, k, v)
    ref = MSAttention(**opts, backend="torch")(q, k, v)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    model = tiny_model("causal", seed=2, vocab=64, dim=128, layers=2, heads=4, kv_heads=2).cuda().train()
    for core in model.cores:
        core.settings = dataclasses.replace(core.settings, region=16, budget=8, merge=2, backend="auto")
    ids = torch.randint(0, 64, (1, 513), device="cuda")
    ref_grads = _step(model, ids)
    model.gradient_checkpointing = True
    for n, g in _step(model, ids).items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.gpu
def test_gpu_auto_backend_falls_back_to_torch_for_a_head_dim_the_kernels_refuse():
    """D=16 on CUDA: ``auto`` runs the PyTorch path (equal to it exactly); ``triton`` names the rule."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, h, 16, device="cuda") for h in (4, 2, 2))
    opts = dict(region=8, budget=8, merge=2, select="causal")
    assert torch.equal(
        MSAttention(**opts, backend="auto")(q, k, v), MSAttention(**opts, backend="torch")(q, k, v)
    )
    with pytest.raises(ValueError, match="D >= 32"):
        MSAttention(**opts, backend="triton")(q, k, v)
