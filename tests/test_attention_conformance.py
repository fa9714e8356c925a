"""Every option of the attention config group (``cfg/attention/*.yaml``) honours the contract of
``ctxlab.attention.base.AttentionCore``, on tiny shapes on the CPU:

- the causality audit finds what the core declares (``causal``);
- a causal core continued through a KV cache (prefill chunks, then one-token steps where it
  declares ``decode_exact``) gives the full forward's logits;
- the HF model (a tiny random HF Llama with the core swapped in) gives ctxlab's logits;
- recomputation under activation checkpointing (with the core's checkpoint policy) gives the same
  gradients;
- ``pair_fraction`` is a fraction and ``describe`` a line.

Every experiment composing with every option is ``tests/test_composition.py``'s matrix, which
reads the same folder. A new option is covered by adding its file; ``helpers.SMALL`` shrinks the
settings a sparse core has so that its pattern shows at 128 tokens.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL
from hydra.utils import instantiate
from test_hf import HD, V, ctxlab_twin, tiny_hf

from ctxlab.attention.base import AttentionCore
from ctxlab.attention.cache import LayerCache
from ctxlab.eval.causality import causality_audit
from ctxlab.model import Llama, LlamaConfig
from ctxlab.model.hf import HFCausalLM
from ctxlab.options import option_names, option_node
from ctxlab.position import Rope

ATTENTIONS = option_names("attention")
L = 128


def factory(name: str):
    """The option's core factory with the small settings it has (``helpers.SMALL``)."""
    node = option_node("attention", name)
    for key, value in SMALL.items():
        if key in node:
            node[key] = value
    return instantiate(node)


def llama(name: str, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return Llama(cfg, factory(name), Rope(cfg.head_dim)).eval()


def tokens(length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ATTENTIONS)
def test_is_an_attention_core_with_a_description(name):
    core = factory(name)()
    assert isinstance(core, AttentionCore)
    assert core.describe() and "\n" not in core.describe()
    for length in (1, 7, L, 1000):
        assert 0.0 < core.pair_fraction(length) <= 1.0
    assert core.audit_length(64) >= 64


@pytest.mark.parametrize("name", ATTENTIONS)
def test_causality_audit_finds_what_the_core_declares(name):
    model = llama(name)
    report = causality_audit(model, n_cuts=3)
    assert report.declared_causal == model.cores[0].causal
    assert report.causal == report.declared_causal, report


@pytest.mark.parametrize("name", ATTENTIONS)
def test_kv_cache_continues_the_full_forward(name):
    model = llama(name)
    if not model.cores[0].causal:
        pytest.skip(f"attention={name} is not causal: a cache cannot give the full forward")
    x = tokens()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        chunks = [model(x[:, :50], cache=cache), model(x[:, 50:83], cache=cache)]
        if model.cores[0].decode_exact:
            chunks += [model(x[:, t : t + 1], cache=cache) for t in range(83, L)]
        else:
            chunks.append(model(x[:, 83:], cache=cache))
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_hf_model_gives_ctxlabs_logits(name):
    hf = tiny_hf()
    ours = ctxlab_twin(hf, factory(name), Rope(HD)).eval()
    theirs = HFCausalLM(hf, factory(name), Rope(HD)).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_checkpointing_recomputes_the_same_gradients(name):
    model = llama(name).train()
    x = tokens(L + 1)  # L inputs: a multiple of S2's groups

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    for n, g in grads().items():
        torch.testing.assert_close(g, plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_a_core_outside_the_contract_is_refused():
    class Stray(torch.nn.Module):
        def forward(self, q, k, v, cache: LayerCache | None = None):
            return q

    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
    with pytest.raises(TypeError, match="does not derive from ctxlab.attention.AttentionCore"):
        Llama(cfg, Stray, Rope(cfg.head_dim))
