"""A ctxlab run as an lm-eval model: lm-eval's own evaluator on ctxlab's NIAH tasks, each
request type checked against ctxlab's own scoring and decoding of the same tokens."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from ctxlab.data.tokenizers import ByteTokenizer, HFTokenizer  # noqa: E402
from ctxlab.eval import niah  # noqa: E402
from ctxlab.eval.generate import greedy_generate  # noqa: E402
from ctxlab.eval.perplexity import token_nll  # noqa: E402
from ctxlab.lm_eval import CtxlabLM, evaluate, task_manager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 512  # a length with a per-length metric of its own (niah@512)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A ctxlab run of the tiny byte-level model: two training steps, weights/ saved."""
    where = tmp_path_factory.mktemp("lm_eval")
    proc = subprocess.run(
        [sys.executable, "-m", "ctxlab", "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=1", "data.seq_len=64", "data.batch_size=2", "logger=csv",
         "phase.evaluate=false", f"hydra.run.dir={where / 'run'}"],
        cwd=where, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return where / "run"


@pytest.fixture(scope="module")
def lm(run) -> CtxlabLM:
    return CtxlabLM(run=str(run), device="cpu")


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """ctxlab's NLL of the continuation's tokens, split as lm-eval splits a causal pair."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    nll = token_nll(model, torch.tensor(whole), n_scored=len(whole) - n_ctx)
    return -float(nll.double().sum())


def test_loglikelihood_through_the_evaluator_equals_ctxlab_nll(lm):
    metadata = {"max_seq_lengths": [LENGTH], "trials": 3, "run": lm.run}
    out = evaluate(lm.run, ["ctxlab_niah_single_ll"], metadata=metadata, log_samples=True,
                   include_defaults=False, device="cpu")  # fmt: skip
    acc = out["results"]["ctxlab_niah_single_ll"]["acc,none"]
    samples = out["samples"]["ctxlab_niah_single_ll"]
    assert len(samples) == 3 and 0.0 <= acc <= 1.0
    for s in samples:
        doc = s["doc"]
        assert doc["n_tokens"] <= LENGTH and doc["length"] == LENGTH
        ll, greedy = s["resps"][0][0]
        mine = own_loglikelihood(lm.model, lm.tokenizer, doc["prompt"], " " + doc["answer"])
        assert ll < 0 and math.isclose(ll, mine, rel_tol=1e-4), (ll, mine)
        assert s["acc"] == float(greedy)


def test_niah_tasks_through_the_evaluator_score_ctxlab_greedy_answers(lm):
    manager = task_manager({"max_seq_lengths": [LENGTH], "trials": 2, "run": lm.run}, include_defaults=False)
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=["ctxlab_niah"], task_manager=manager, log_samples=True)
    results = out["results"]
    for variant in niah.VARIANTS:
        task = f"ctxlab_niah_{variant}"
        samples = out["samples"][task]
        assert len(samples) == 2
        scores = []
        for s in samples:
            doc, (answer,) = s["doc"], s["filtered_resps"]
            ids = torch.tensor([lm.tokenizer.encode(doc["prompt"])])
            mine = lm.tokenizer.decode(greedy_generate(lm.model, ids, 64)[0].tolist()).split("\n")[0]
            assert answer == mine  # greedy, 64 tokens (the task's max_gen_toks), cut at "\n"
            scores.append(niah.score(answer, doc["outputs"]))
            assert len(doc["outputs"]) == niah.VARIANTS[variant][1]
        assert results[task]["score,none"] == pytest.approx(sum(scores) / 2)
        assert results[task][f"niah@{LENGTH},none"] == pytest.approx(sum(scores) / 2)
        assert results[task]["niah@1024,none"] == -1  # no sample of that length
    assert 0.0 <= results["ctxlab_niah"]["score,none"] <= 1.0


def test_loglikelihood_rolling_scores_every_token_once_in_windows(lm):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 2
    ids = lm.tokenizer.encode(text)
    assert len(ids) > 2 * 64  # three windows of the run's training length (64)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    seq = [lm.tokenizer.eos_id, *ids]  # seq[i + 1] is token i
    want = 0.0
    for a in range(0, len(ids), 64):
        b = min(a + 64, len(ids))  # predictions a..b-1 of the window that ends at token b-1
        window = torch.tensor(seq[max(0, b - 64) : b + 1])
        want -= float(token_nll(lm.model, window, n_scored=b - a).double().sum())
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_stops_and_chunked_prefill_agrees(run, lm):
    prompt = "The sky is blue. The grass is"
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    ten = lm.tokenizer.decode(greedy_generate(lm.model, ids, 10)[0].tolist())
    assert lm.generate(prompt, {"until": [], "max_gen_toks": 10}) == ten
    assert lm.generate(prompt, {"until": [ten[3:5]], "max_gen_toks": 10}) == ten[: ten.index(ten[3:5])]
    assert (
        lm.generate(prompt, {"until": "\n", "max_gen_toks": 3})
        == lm.tokenizer.decode(greedy_generate(lm.model, ids, 3)[0].tolist()).split("\n")[0]
    )
    with pytest.raises(ValueError, match="greedily"):
        lm.generate(prompt, {"do_sample": True})
    chunked = CtxlabLM(run=str(run), device="cpu", chunk_size=16)
    context = "A long context that spans several chunks of sixteen bytes, and then"
    assert chunked.score(lm.tok_encode(context), lm.tok_encode(" more")) == pytest.approx(
        lm.score(lm.tok_encode(context), lm.tok_encode(" more")), rel=1e-5
    )
    assert chunked.generate(context, {"max_gen_toks": 12}) == lm.generate(context, {"max_gen_toks": 12})
    cut = CtxlabLM(run=str(run), device="cpu", max_length=16)
    ctx, cont = lm.tok_encode(context), lm.tok_encode(" more")
    whole = ctx + cont
    assert cut.score(ctx, cont)[0] == pytest.approx(lm.score(whole[-17 : -len(cont)], cont)[0], rel=1e-5)


def test_model_args_choose_attention_and_refuse_what_does_not_apply(run):
    ms = CtxlabLM(run=str(run), device="cpu", attention="ms_causal")
    assert ms.model.cores[0].describe() != CtxlabLM(run=str(run), device="cpu").model.cores[0].describe()
    assert ms.get_model_info()["attention"] == ms.model.cores[0].describe()
    with pytest.raises(ValueError, match="eval_scale=4: position=rope has no inference scale"):
        CtxlabLM(run=str(run), device="cpu", eval_scale=4)
    with pytest.raises(ValueError, match="attention=nosuch"):
        CtxlabLM(run=str(run), device="cpu", attention="nosuch")
    with pytest.raises(TypeError, match=r"\['pretrained'\]: not arguments of the ctxlab model"):
        CtxlabLM(run=str(run), device="cpu", pretrained="gpt2")
    with pytest.raises(FileNotFoundError, match="no config.yaml .* nor config.json"):
        CtxlabLM(run=str(run / "weights"), device="cpu")
    # A setting of the run's config, changed before the model is built: another RoPE base.
    other = CtxlabLM(run=str(run), device="cpu", **{"position.base": 500000.0})
    assert other.model.position.base == 500000.0


def test_hf_tokenizer_model_through_the_evaluator(tmp_path):
    from test_data import _train_tiny_bpe

    path = _train_tiny_bpe(tmp_path / "tokenizer.json")
    tok = HFTokenizer(path, eos_token="<eos>")
    model = tiny_model(vocab=tok.vocab_size)
    lm = CtxlabLM.from_model(model, tok)
    manager = task_manager(
        {"max_seq_lengths": [LENGTH], "trials": 2, "tokenizer": tok.name}, include_defaults=False
    )
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=["ctxlab_niah_single_ll"], task_manager=manager, log_samples=True)
    for s in out["samples"]["ctxlab_niah_single_ll"]:
        doc = s["doc"]
        assert len(tok.encode(doc["prompt"])) == doc["n_tokens"] <= LENGTH
        mine = own_loglikelihood(model, tok, doc["prompt"], " " + doc["answer"])
        assert s["resps"][0][0][0] == pytest.approx(mine, rel=1e-4)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "default"}])
def test_an_exported_folder_scores_as_transformers_does(tmp_path, rope):
    from test_data import _train_tiny_bpe
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ctxlab.model.hf_sources import random_model

    shape = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
             "max_position_embeddings": 64}  # fmt: skip
    hf = random_model("llama2_7b", overrides=shape)
    hf.config.rope_parameters = {**rope, "rope_theta": 10000.0}
    folder = tmp_path / "exported"
    hf.save_pretrained(str(folder))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(_train_tiny_bpe(tmp_path / "tokenizer.json")), eos_token="<eos>"
    )
    tok.save_pretrained(str(folder))
    lm = CtxlabLM(run=str(folder), device="cpu")
    assert lm.model.position.name == {"linear": "pi", "default": "rope"}[rope["rope_type"]]
    assert int(lm.cfg.data.seq_len) == 64 and lm.tokenizer.name == f"hf:{folder.resolve()}"
    ctx, cont = lm.tok_encode("the cat sat on the mat; the dog"), lm.tok_encode(" sat on the log")
    reference = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].float()
    want = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())
    assert lm.score(ctx, cont)[0] == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_niah_samples_need_a_tokenizer():
    from ctxlab.lm_eval_tasks import ctxlab_niah

    with pytest.raises(ValueError, match="run=<ctxlab run dir>"):
        ctxlab_niah.single(max_seq_lengths=[LENGTH])
    data = ctxlab_niah.multivalue(max_seq_lengths=[LENGTH], trials=2, tokenizer="byte")["test"]
    assert len(data) == 2 and all(len(o) == 4 for o in data["outputs"])
    assert len(ByteTokenizer().encode(data[0]["prompt"])) == data[0]["n_tokens"]


@pytest.mark.slow
def test_ctxlab_lm_eval_command_line(run, tmp_path):
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ctxlab.lm_eval", "--model", "ctxlab", "--model_args", f"run={run},device=cpu",
         "--tasks", "ctxlab_niah_multikey", "--metadata", json.dumps({"max_seq_lengths": [LENGTH], "trials": 1}),  # noqa: E501
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "out").rglob("results_*.json")
    res = json.loads(result.read_text())
    assert 0.0 <= res["results"]["ctxlab_niah_multikey"]["score,none"] <= 1.0
    assert res["config"]["ctxlab_run"] == str(run)
