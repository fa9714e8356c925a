"""The evaluation protocols on hand-computable cases, and the causality audit."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model
from torch import nn

from ctxlab.attention.cache import KVCache
from ctxlab.eval.causality import causality_audit
from ctxlab.eval.generate import greedy_generate
from ctxlab.eval.passkey import NEEDLE, PasskeyConfig, extract_key, make_prompt, passkey_grid
from ctxlab.eval.perplexity import PerplexityConfig, perplexity_grid, window_nll, windows


class ByteTok:
    """UTF-8 bytes, enough for the passkey prompt tests."""

    vocab_size = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class BigramModel(nn.Module):
    """logits(next | current) = log P[current]: the NLL of any text is computable by hand."""

    def __init__(self, P: torch.Tensor) -> None:
        super().__init__()
        self.logP = P.log()
        self.calls = []

    def new_cache(self):
        return KVCache(1)

    def hidden(self, ids, position_ids=None, cache=None):
        self.calls.append(ids.shape[1])
        return nn.functional.one_hot(ids, self.logP.shape[0]).float()

    def lm_head(self, h):
        return h @ self.logP


def test_windows_score_every_target_once():
    assert windows(10, 4, 2) == [(0, 4), (2, 2), (4, 2)]
    for n, L, s in [(100, 16, 8), (97, 10, 3), (50, 7, 7), (33, 32, 1)]:
        targets = []
        for b, k in windows(n, L, s):
            targets += list(range(b + L + 1 - k, b + L + 1))
        assert len(targets) == len(set(targets)), (n, L, s)
        assert targets == sorted(targets) and targets[0] == 1
    assert windows(5, 5, 1) == []  # a document needs L + 1 tokens


def test_perplexity_of_a_bigram_model_matches_hand_computation():
    P = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    model = BigramModel(P)
    doc = torch.tensor([0, 1, 1, 2, 0, 0, 1, 2, 2, 1, 0])  # 11 tokens
    short = torch.tensor([0, 1, 2])  # too short for L=4: left out
    cfg = PerplexityConfig(lengths=[4], stride=2)
    (res,) = perplexity_grid(model, [doc, short], cfg, progress=False)
    # windows(11, 4, 2) -> begins 0, 2, 4, 6: scored targets 1..4, 5..6, 7..8, 9..10 = all of 1..10
    nll = -sum(math.log(P[doc[t - 1], doc[t]]) for t in range(1, 11))
    assert res.n_tokens == 10 and res.n_docs == 1
    assert res.ppl == pytest.approx(math.exp(nll / 10), rel=1e-6)
    row = res.as_row()
    assert row["stride"] == 2 and row["n_docs"] == 1 and row["n_tokens"] == 10
    assert row["ppl_lo"] == row["ppl_hi"] == pytest.approx(res.ppl)  # 10 tokens: one bootstrap block


def test_perplexity_token_cap_and_fraction_stride():
    P = torch.full((4, 4), 0.25)
    docs = [torch.randint(0, 4, (200,)) for _ in range(3)]
    cfg = PerplexityConfig(lengths=[16, 64], stride=0.5, max_tokens=40)
    res = perplexity_grid(BigramModel(P), docs, cfg, progress=False)
    assert [r.stride for r in res] == [8, 32]
    assert all(r.ppl == pytest.approx(4.0) for r in res)  # uniform model: ppl = V
    assert res[0].n_tokens == 16 + 8 * 3  # first window 16, then 8 per window until >= 40


def test_perplexity_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lengths"):
        PerplexityConfig(lengths=[])
    with pytest.raises(ValueError, match="stride"):
        PerplexityConfig(lengths=[8], stride=0)
    with pytest.raises(ValueError, match="stride"):
        PerplexityConfig(lengths=[8], stride=16).stride_for(8)


def test_chunked_window_equals_full_forward_dense():
    model = tiny_model("dense")
    ids = torch.randint(0, 64, (41,))
    full = window_nll(model, ids, 25)
    chunked = window_nll(model, ids, 25, chunk_size=7)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("lq", "lk"), [(23, 23), (9, 23), (1, 23)], ids=["causal", "cached-chunk", "decode"])
def test_dense_attention_with_repeated_kv_heads_equals_grouped(monkeypatch, lq, lk):
    """Where SDPA's fused kernels cannot take grouped K/V (CUDA float32, or a mask) the heads are
    repeated instead; both give the same attention."""
    import ctxlab.attention.modules as modules

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, lq, 6, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, lk, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    grouped = modules.dense_attention(q, k, v)
    monkeypatch.setattr(modules, "sdpa_keeps_gqa", lambda q, mask: False)
    torch.testing.assert_close(modules.dense_attention(q, k, v), grouped, rtol=1e-12, atol=1e-12)
    # and the repeated path is plain per-head attention over the matching kv head
    ref = modules.dense_attention(
        q[:, :, :3], k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)
    )
    torch.testing.assert_close(grouped[:, :, :3], ref, rtol=1e-12, atol=1e-12)


def test_sdpa_keeps_gqa_only_where_the_flash_kernel_runs():
    from ctxlab.attention.modules import sdpa_keeps_gqa

    class Cuda:  # what sdpa_keeps_gqa reads
        is_cuda = True

        def __init__(self, dtype):
            self.dtype = dtype

    mask = torch.ones(2, 2, dtype=torch.bool)
    assert sdpa_keeps_gqa(Cuda(torch.bfloat16), None) and sdpa_keeps_gqa(Cuda(torch.float16), None)
    assert not sdpa_keeps_gqa(Cuda(torch.float32), None)  # float32 evaluation: no flash
    assert not sdpa_keeps_gqa(Cuda(torch.bfloat16), mask)  # a chunk with a cache: no flash
    assert sdpa_keeps_gqa(torch.zeros(1, dtype=torch.float32), mask)  # CPU: every SDPA path takes GQA


@pytest.mark.gpu
def test_gpu_float32_gqa_dense_attention_at_32k_stays_in_linear_memory():
    """The evaluation of a GQA model in float32 at 32K: the math fallback would need 64 GiB for
    the scores of 8 heads; the memory-efficient kernel needs the inputs and output only."""
    from ctxlab.attention.modules import dense_attention

    q = torch.randn(1, 32768, 8, 64, device="cuda")
    k, v = (torch.randn(1, 32768, 2, 64, device="cuda") for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o = dense_attention(q, k, v)
    assert o.shape == q.shape and torch.isfinite(o).all()
    assert torch.cuda.max_memory_allocated() - before < 2**30  # < 1 GiB: no [H, L, L] scores


def test_kv_cache_decoding_equals_full_forward_dense():
    model = tiny_model("dense")
    ids = torch.randint(0, 64, (1, 30))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :11], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_is_the_argmax_chain():
    model = tiny_model("dense")
    prompt = torch.randint(0, 64, (1, 9))
    out = greedy_generate(model, prompt, 4, chunk_size=4)
    seq = prompt
    for _ in range(4):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq[:, 9:])


@pytest.mark.parametrize("length", [260, 301, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_has_exact_length_and_depth(length, depth):
    tok = ByteTok()
    p = make_prompt(tok, length, depth, "12345")
    assert len(p.ids) == length
    text = tok.decode(p.ids)
    needle = NEEDLE.format(key="12345")
    assert text.count(needle) == 1
    assert len(tok.encode(text[: text.index(needle)])) == p.needle_start
    # the needle sits at the stated depth of the filler, to within one filler sentence run
    sentence = len(
        tok.encode(
            "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
        )
    )
    assert abs(p.filler_before - depth * p.filler_tokens) <= sentence / 2 + 1
    assert text.endswith("The pass key is")


def test_passkey_too_short_is_rejected():
    with pytest.raises(ValueError, match="shorter than the prompt"):
        make_prompt(ByteTok(), 50, 0.5, "12345")
    with pytest.raises(ValueError, match="depths"):
        PasskeyConfig(lengths=[100], depths=[1.5])


def test_passkey_grid_scores_an_oracle_and_a_wrong_model():
    tok = ByteTok()

    class Oracle(nn.Module):
        """Answers with the key found in its prompt: accuracy 1."""

        def __init__(self, answer_from_prompt=True):
            super().__init__()
            self.right = answer_from_prompt

        def new_cache(self):
            return KVCache(1)

    cfg = PasskeyConfig(lengths=[260, 400], depths=[0.0, 1.0], trials=2)

    def fake_generate(model, ids, n_new, chunk_size=0):
        text = tok.decode(ids[0].tolist())
        key = extract_key(text[text.index("The pass key is ") :]) if model.right else "00000"
        return torch.tensor([tok.encode(" " + key + ".")[:n_new]])

    import ctxlab.eval.passkey as pk

    orig = pk.greedy_generate
    pk.greedy_generate = fake_generate
    try:
        rows = passkey_grid(Oracle(True), tok, cfg, progress=False)
        assert [(r["accuracy"], r["correct"]) for r in rows] == [(1.0, 2)] * 4
        rows = passkey_grid(Oracle(False), tok, cfg, progress=False)
        assert [(r["accuracy"], r["correct"]) for r in rows] == [(0.0, 0)] * 4
    finally:
        pk.greedy_generate = orig


def test_causality_audit_dense_is_causal():
    rep = causality_audit(tiny_model("dense"), length=64)
    assert rep.causal and rep.declared_causal and rep.max_abs_diff <= rep.tolerance


def test_causality_audit_catches_a_non_causal_core():
    from ctxlab.attention import DenseAttention

    class Bidirectional(DenseAttention):
        causal = True  # claims causality; the audit must not believe it

        def forward(self, q, k, v, cache=None):
            o = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2).repeat_interleave(2, 1),
                v.transpose(1, 2).repeat_interleave(2, 1),
            )
            return o.transpose(1, 2)

    model = tiny_model("dense")
    for layer in model.layers:
        layer.attn.core = Bidirectional()
    rep = causality_audit(model, length=64)
    assert not rep.causal and rep.declared_causal


@pytest.mark.parametrize("scheme", ["rope", "pi", "ntk", "dynamic_ntk", "yarn", "pose", "crd_ntk"])
def test_saved_and_reloaded_model_gives_identical_logits(scheme, tmp_path):
    """A ctxlab checkpoint reloads into a model built from the same config with identical logits
    (rotary tables come from the config, weights from the file)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxlab.build import build_model
    from ctxlab.weights import load_weights

    GlobalHydra.instance().clear()
    cfg_dir = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "cfg")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose("config", overrides=[f"position={scheme}", "run_dir=/tmp/x", "name=t"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = tmp_path / "m.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "ctxlab": {"model": model.config.to_dict()}}, ckpt)
    torch.manual_seed(1)
    fresh = build_model(cfg).eval()
    ids = torch.randint(0, cfg.data.vocab_size, (1, 300))
    assert not torch.equal(fresh(ids), model(ids))
    load_weights(fresh, ckpt, "phase.checkpoint")
    assert torch.equal(fresh(ids), model(ids))
