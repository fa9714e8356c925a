"""The training module: the chunked loss equals the full-logits loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from ctxlab.train.module import LMModule, chunked_cross_entropy, warmup_cosine


def _full_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_full_logits_loss_and_gradients(chunk):
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_model().train()
        ids = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(1))
        ref = _full_loss(model, ids)
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        got = chunked_cross_entropy(model.hidden(ids[:, :-1]), model.lm_head, ids[:, 1:], chunk)
        got.backward()
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-10, atol=1e-12, msg=n)


def test_module_loss_uses_chunks_and_agrees_with_unchunked():
    model = tiny_model().train()
    ids = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(2))
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    chunked = LMModule(model, opt, loss_chunk=16)._loss(ids, None)
    full = LMModule(model, opt, loss_chunk=0)._loss(ids, None)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4096"])
def test_bad_loss_chunk_is_refused(bad):
    with pytest.raises(ValueError, match="phase.loss_chunk"):
        LMModule(tiny_model(), torch.optim.AdamW, loss_chunk=bad)


def test_zero_chunk_in_function_is_refused():
    with pytest.raises(ValueError, match="loss chunk"):
        h, y = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)
        chunked_cross_entropy(h, torch.nn.Linear(4, 5), y, 0)


def test_warmup_then_constant_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=0)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_random_positions_are_drawn_per_global_row_under_data_parallel():
    """CRD NTK's offsets are drawn for the step's global batch: data-parallel rank r (the sampler
    deals rows round-robin) gets global rows r, r + dp, ...; so the ranks' rows get different
    offsets, and together the ones one process gives the global batch."""
    from types import SimpleNamespace

    from ctxlab.position import CRDNTK

    crd = CRDNTK(head_dim=8, cycle=24, max_offset=1000, scale_init=2.0, scale_max=2.0, scale_inf=2.0)
    module = LMModule(tiny_model("dense", position=crd).train(), lambda p: torch.optim.AdamW(p), seed=3)
    seen: list[torch.Tensor] = []
    module._loss = lambda ids, pos: seen.append(pos) or torch.zeros(())
    module.log = lambda *args, **kwargs: None

    def step(rows: int, dp: int, rank: int) -> torch.Tensor:
        sampler = {"num_replicas": dp, "rank": rank} if dp > 1 else None
        strategy = SimpleNamespace(distributed_sampler_kwargs=sampler)
        module._trainer = SimpleNamespace(strategy=strategy, global_step=5)
        module.training_step({"input_ids": torch.zeros(rows, 17, dtype=torch.long)}, 0)
        return seen[-1]

    whole = step(4, 1, 0)  # one process, the global batch of 4 rows
    ranks = [step(2, 2, r) for r in range(2)]
    assert whole.shape == (4, 16) and len(set(whole[:, 0].tolist())) == 4  # four distinct offsets
    for r in range(2):
        assert torch.equal(ranks[r], whole[r::2])
    assert not torch.equal(ranks[0], ranks[1])
