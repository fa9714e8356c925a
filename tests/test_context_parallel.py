"""Context parallelism on CPU processes (gloo): a fit whose sequences are split over 2 or 4 ranks
gives the losses and gradients of one process with the same global batch, for dense, S2 and MS
attention (causal and paper selection), with CRD NTK's random offsets and with data parallel over
the remaining ranks; the layout and the refusals are checked in this process.

The multi-process parts run this file as a script under ``python -m torch.distributed.run``
(:func:`worker`), as ``test_distributed.py`` does; the one-process reference runs in the test's own
process."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxlab import context_parallel as cpl
from ctxlab.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STEPS, ROWS, SEQ = 3, 4, 32  # ROWS: the global batch
# name -> (world, context_parallel, arms, strategy): each arm is fitted once per run
RUNS = {
    "w2_cp2": (2, 2, ["dense_crd", "s2", "ms_causal", "ms_paper", "ms_paper_selected", "hf_s2"], "ddp"),
    "w4_cp2_dp2": (4, 2, ["dense_crd", "ms_causal"], "ddp"),  # CRD: each row its own offset
    "w4_cp4": (4, 4, ["s2_causal", "ms_paper", "ms_causal_selected"], "ddp"),
    # FSDP2 with the split: weights sharded over all ranks, sequences over the cp ranks.
    "w4_cp2_dp2_fsdp": (4, 2, ["dense_crd", "ms_paper", "hf_s2"], "fsdp"),
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# The script side ----------------------------------------------------------------------------


def _data(n_rows: int):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": r} for r in torch.randint(0, 64, (n_rows, SEQ + 1), generator=g)]


def _model(arm: str):
    """A tiny ctxlab Llama (4 query, 2 kv heads: GQA) with the arm's attention and positions."""
    from helpers import tiny_model

    from ctxlab.attention.s2 import S2Attention
    from ctxlab.position import CRDNTK
    from ctxlab.position.rope import Selected

    if arm == "dense_crd":  # cyclic ids (cycle < SEQ) with a random offset per row
        crd = CRDNTK(head_dim=8, cycle=24, max_offset=1000, scale_init=2.0, scale_max=2.0, scale_inf=2.0)
        return tiny_model("dense", position=crd, seed=3).train()
    if arm in ("s2", "s2_causal"):
        model = tiny_model("dense", seed=3)
        model.set_attention(functools.partial(S2Attention, wrap=arm == "s2"))
        return model.train()
    if arm == "hf_s2":  # a transformers Llama with LoRA+ (the 7B recipe's path), S2 attention
        from transformers import LlamaConfig, LlamaForCausalLM

        from ctxlab.model.hf import HFCausalLM
        from ctxlab.model.hf_lora import apply_lora_plus
        from ctxlab.position import Rope

        torch.manual_seed(4)
        hf = LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
        )  # fmt: skip
        model = HFCausalLM(hf, S2Attention, Rope(head_dim=8))
        model.set_peft(apply_lora_plus(model.hf))
        return model.train()
    if arm.startswith("ms_"):  # 11 regions of 3 tokens (the last of 2), budget 3, merge 2: a dense
        # prefix of 9 tokens, then blocks of 6 that the chunks of 8 (cp=2) or 4 (cp=4) tokens cut
        select, _, pe = arm[3:].partition("_")
        position = Selected(head_dim=8) if pe == "selected" else None
        model = tiny_model(select, region=3, budget=3, merge=2, position=position, seed=3)
        # Recomputed layers gather again in the backward pass (the 7B recipe checkpoints).
        model.gradient_checkpointing = arm == "ms_paper"
        return model.train()
    return tiny_model("dense", seed=3).train()


def _fit(
    arm: str, world: int, cp: int | None, strategy_name: str = "ddp"
) -> tuple[list[list[float]], dict[str, torch.Tensor], dict[str, float]]:
    """``STEPS`` steps on ``ROWS`` rows per step; returns every rank's loss per step, the
    gradients of the first step (after the all-reduce; FSDP2's shards gathered whole) and, for MS
    arms, the last step's selection statistics (``SelectionStats`` every step)."""
    import lightning as L
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    from ctxlab import distributed
    from ctxlab.train.callbacks import SelectionStats
    from ctxlab.train.module import LMModule

    class Record(L.Callback):
        def __init__(self) -> None:
            self.losses: list[list[float]] = []
            self.grads: dict[str, torch.Tensor] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not self.grads:
                self.grads = {
                    n: None if p.grad is None else _whole(p.grad.detach()).clone()
                    for n, p in pl_module.model.named_parameters()
                }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(distributed.all_gather(float(outputs["loss"].detach())))

    def _whole(g: torch.Tensor) -> torch.Tensor:  # collective for a DTensor: every rank calls it
        return g.full_tensor() if isinstance(g, DTensor) else g

    model = _model(arm)
    strategy = distributed.build_strategy(strategy_name, context_parallel=cp) if cp else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[rec := Record()] + ([SelectionStats(every=1)] if arm.startswith("ms_") else []),
    )  # fmt: skip
    module = distributed.module_class(LMModule, trainer.strategy)(
        model, lambda params: torch.optim.AdamW(params, lr=1e-2), seed=0
    )
    # The samplers deal a permutation over the dp ranks (DistributedSampler(shuffle=True, seed=0));
    # the single process reads the same permutation in order.
    dp = world // (cp or 1)
    data = _data(STEPS * ROWS)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(data, batch_size=ROWS // dp, sampler=order if world == 1 else None)
    trainer.fit(module, train_dataloaders=loader)
    assert all(not isinstance(c, cpl.ContextParallelCore) for c in model.cores)  # detached after fit
    stats = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("selection/")}
    return rec.losses, rec.grads, stats


def _check_reduce_scatter_backward(split: cpl.ContextParallel) -> None:
    """The all-gather's NCCL backward (reduce-scatter of every rank's shard of the gradient), run
    on gloo through an emulated ``reduce_scatter_tensor``, equals the gloo backward (all-reduce,
    then this rank's shard)."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(11 + split.cp_rank)
    x = torch.randn(2, 8, 3, generator=g, requires_grad=True)
    weight = torch.randn(2, 8 * split.cp, 3, generator=torch.Generator().manual_seed(12 + split.cp_rank))
    (split.gather(x) * weight).sum().backward()
    want, x.grad = x.grad, None

    def emulated(out, stacked, group):  # sum over the group, then this rank's slice of dim 0
        dist.all_reduce(stacked, group=group)
        out.copy_(stacked[dist.get_rank(group)])

    real = (dist.get_backend, dist.reduce_scatter_tensor)
    dist.get_backend, dist.reduce_scatter_tensor = (lambda group=None: "nccl"), emulated
    try:
        (split.gather(x) * weight).sum().backward()
    finally:
        dist.get_backend, dist.reduce_scatter_tensor = real
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-6)
    assert want.abs().min() > 0


def worker(out: Path, run: str) -> None:
    from ctxlab import distributed

    world, cp, arms, strategy_name = RUNS[run]
    assert distributed.world_size() in (1, world)
    result = {}
    for arm in arms:
        losses, grads, stats = _fit(arm, world, cp, strategy_name)
        result[arm] = {"losses": losses, "stats": stats}
        if distributed.is_rank_zero():
            torch.save(grads, out / f"{run}_{arm}_grads.pt")
    if run == "w2_cp2":  # the fits initialised the process group
        _check_reduce_scatter_backward(cpl.ContextParallel(cp))
    if distributed.is_rank_zero():
        (out / f"{run}.json").write_text(json.dumps(result))


# The tests ----------------------------------------------------------------------------------


def _torchrun(run: str, out: Path) -> None:
    world = RUNS[run][0]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    args += [str(Path(__file__).resolve()), str(out), run]
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.mark.parametrize("run", list(RUNS))
def test_split_fit_matches_one_process(run, tmp_path):
    _torchrun(run, tmp_path)
    got = json.loads((tmp_path / f"{run}.json").read_text())
    world, cp, arms, _ = RUNS[run]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1)
    try:
        for arm in arms:
            ref_losses, ref_grads, ref_stats = _fit(arm, 1, None)
            single = torch.tensor([s[0] for s in ref_losses], dtype=torch.float64)
            per_rank = torch.tensor(got[arm]["losses"], dtype=torch.float64)  # [steps, ranks]
            # The selection statistics of a split fit: the whole sequence's selection (each rank
            # selects on the gathered queries), as one process logs them (with data parallel too
            # the ranks' mean is logged, of their own rows: counts then differ, as under DDP).
            assert got[arm]["stats"].keys() == ref_stats.keys() and bool(ref_stats) == arm.startswith("ms_")
            for key, value in ref_stats.items() if world == cp else ():
                assert got[arm]["stats"][key] == pytest.approx(value, rel=1e-6), (run, arm, key)
            # Each rank's loss is the mean over its own tokens: they differ (other tokens), and
            # their mean is the one-process loss of the global batch at every step (after two
            # optimizer steps on the split gradients).
            assert (per_rank.max(1).values - per_rank.min(1).values).min() > 1e-3, (arm, per_rank)
            torch.testing.assert_close(per_rank.mean(1), single, rtol=1e-5, atol=0, msg=f"{run} {arm}")
            grads = torch.load(tmp_path / f"{run}_{arm}_grads.pt")
            assert grads.keys() == ref_grads.keys()
            trained = [g for g in ref_grads.values() if g is not None]
            assert sum(bool(g.abs().max() > 0) for g in trained) > len(trained) // 2  # LoRA A: 0 at first
            for name, g in grads.items():
                if ref_grads[name] is None:  # frozen (LoRA+)
                    assert g is None, name
                    continue
                msg = f"{run} {arm} {name}"
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=msg)
    finally:
        torch.set_num_threads(threads)


def test_load_balanced_layout_and_global_position_ids():
    ids = torch.arange(16).expand(2, 16)
    parts = [cpl.shard(ids, 4, r) for r in range(4)]
    # Rank r holds chunks r and 2n-1-r of 2n = 8 chunks of 2 tokens: the same causal work each.
    assert parts[0][0].tolist() == [0, 1, 14, 15] and parts[3][0].tolist() == [6, 7, 8, 9]
    assert torch.equal(cpl.unshard(parts), ids)
    assert cpl.chunk_order(4) == [0, 7, 1, 6, 2, 5, 3, 4]

    from ctxlab.position import CRDNTK

    crd = CRDNTK(head_dim=8, cycle=24, max_offset=1000, scale_init=2.0, scale_max=2.0, scale_inf=2.0).train()
    full = crd.position_ids(3, 16, generator=torch.Generator().manual_seed(5))

    class Split(cpl.ContextParallel):  # the layout without a process group
        def __init__(self, rank: int) -> None:
            self.cp, self.cp_rank = 4, rank

    class Model:
        position = crd

    x = torch.arange(48).view(3, 16)
    shards = [Split(r).shard_batch(Model, x, x + 1, full) for r in range(4)]
    assert torch.equal(cpl.unshard([s[2] for s in shards]), full)  # ids are the global ones
    assert torch.equal(cpl.unshard([s[0] for s in shards]), x)


def _query_rows(q: torch.Tensor, n: int, rank: int):
    """Rank ``rank``'s ``QueryRows`` of the whole queries ``q`` without a process group: its
    ``gather`` puts the given rows in the rank's place among the other ranks' shards of ``q``."""
    from ctxlab.attention.base import QueryRows

    def gather(x: torch.Tensor) -> torch.Tensor:
        return cpl.unshard([x if r == rank else cpl.shard(q, n, r) for r in range(n)]).detach()

    return QueryRows(spans=cpl.own_spans(q.shape[1], n, rank), gather=gather)


def _check_rows_equal_whole(core, q, k, v, n: int, msg: str) -> None:
    """Every rank's ``attend_rows`` of its own query chunks, put together, equals the core on the
    whole sequence: outputs, and gradients to q, k, v of a random weighting of the outputs."""
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=q.dtype)
    want = core(q, k, v)
    grads_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    got = cpl.unshard([core.attend_rows(cpl.shard(q, n, r), k, v, _query_rows(q, n, r)) for r in range(n)])
    torch.testing.assert_close(got, want, msg=msg)
    for name, a, b in zip("qkv", torch.autograd.grad((got * w).sum(), (q, k, v)), grads_want):
        torch.testing.assert_close(a, b, msg=f"{msg} d{name}")


def _qkv(length: int, heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, length, h, dim, generator=g, dtype=torch.float64, requires_grad=True)
        for h in (heads, kv_heads, kv_heads)
    ]


@pytest.mark.parametrize(
    ("length", "n", "heads", "kv_heads", "group_size", "wrap"),
    [(48, 2, 4, 2, 0, True), (48, 3, 6, 2, 0, False), (40, 2, 6, 3, 6, False), (96, 4, 4, 4, 8, True),
     (32, 2, 2, 1, 16, True), (24, 3, 3, 1, 7, False)],
    ids=["quarter-wrap", "n3-gqa3", "G6-partial", "n4-G8-wrap", "G16-wrap", "odd-heads-G7"],
)  # fmt: skip
def test_dense_and_s2_rows_equal_the_whole_sequence_core(length, n, heads, kv_heads, group_size, wrap):
    """Each rank's own query chunks through dense and S2's ``attend_rows`` give exactly the rows
    of the one-process core on the whole sequence (S2's groups sized from the whole length, a
    partial last group, the wrapped group, GQA with a split kv group), outputs and gradients."""
    from ctxlab.attention import DenseAttention
    from ctxlab.attention.s2 import S2Attention

    q, k, v = _qkv(length, heads, kv_heads, seed=length + n)
    for core in (DenseAttention(), S2Attention(group_size=group_size, wrap=wrap).train()):
        _check_rows_equal_whole(core, q, k, v, n, type(core).__name__)


@pytest.mark.parametrize(
    ("length", "n", "heads", "kv_heads", "ms"),
    [(40, 2, 4, 2, dict(region=3, budget=3, merge=2, select="paper")),
     (40, 2, 4, 2, dict(region=3, budget=3, merge=2, select="causal")),
     (56, 4, 4, 2, dict(region=5, budget=3, merge=2, select="paper", scope="group")),
     (56, 4, 2, 1, dict(region=5, budget=3, merge=2, select="causal", pool="attn")),
     (42, 3, 6, 2, dict(region=4, budget=3, merge=1, select="paper", pool="attn", scope="group")),
     (40, 2, 4, 2, dict(region=3, budget=3, merge=2, select="paper", pe="selected")),
     (56, 4, 4, 2, dict(region=5, budget=3, merge=2, select="causal", pe="selected")),
     (24, 2, 4, 2, dict(region=4, budget=8, merge=2, select="causal", pe="selected"))],
    ids=["paper-w3", "causal-w3", "n4-paper-w5-group", "n4-causal-attn-pool", "n3-paper-m1",
         "paper-selected", "n4-causal-selected", "dense-at-this-length"],
)  # fmt: skip
def test_ms_rows_equal_the_whole_sequence_core(length, n, heads, kv_heads, ms):
    """MS attention's ``attend_rows`` (selection on the gathered queries, attention of the rank's
    rows only) gives exactly the whole-sequence core's rows and gradients, for both selection
    rules and both positions, at chunk boundaries that cut regions and blocks, a partial last
    region and block, and a length at which MS is dense."""
    from ctxlab.attention import MSAttention
    from ctxlab.position.rope import Selected

    pe = ms.pop("pe", "pre")
    core = MSAttention(**ms, backend="torch")
    if pe == "selected":
        core.configure_position(Selected(8, 500.0))
    q, k, v = _qkv(length, heads, kv_heads, seed=length + n)
    _check_rows_equal_whole(core, q, k, v, n, core.describe())


def test_a_core_without_rows_runs_whole():
    """The contract's default: a core that does not implement ``attend_rows`` answers None, and
    the split then runs its ``forward`` on the whole sequence."""
    from ctxlab.attention.base import AttentionCore

    class Whole(AttentionCore):
        def forward(self, q, k, v, cache=None):
            return q

    q, k, v = _qkv(8, 2, 2)
    assert Whole().attend_rows(cpl.shard(q, 2, 0), k, v, _query_rows(q, 2, 0)) is None


def test_the_loss_stays_chunked_next_to_the_split_hook():
    """``LMModule._loss`` (which the split hooks into) still runs the output head in chunks, never
    over the whole ``[B, L, V]`` logits."""
    from helpers import tiny_model

    from ctxlab.train.module import LMModule

    model = tiny_model("dense")

    def whole_logits(*args, **kwargs):
        raise AssertionError("the loss asked for the whole logits")

    model.forward = whole_logits
    module = LMModule(model, lambda params: torch.optim.AdamW(params), loss_chunk=8)
    assert module.context_parallel is None
    loss = module._loss(torch.randint(0, 64, (2, 33)), None)
    assert loss.isfinite() and loss > 0


def test_bad_settings_are_refused_naming_them():
    from ctxlab import distributed

    with pytest.raises(ConfigError, match=r"context_parallel=3 must divide the number of processes \(4"):
        cpl.check_sizes(3, 4)
    with pytest.raises(ConfigError, match="context_parallel must be an int >= 1"):
        cpl.check_sizes(0, 4)
    with pytest.raises(ConfigError, match=r"context_parallel=2 .* data.seq_len=30 is not divisible by 4"):
        cpl.shard(torch.zeros(1, 30), 2, 0)
    fsdp = distributed.build_strategy("fsdp", context_parallel=2, param_dtype="bfloat16")
    assert type(fsdp).__name__ == "ContextParallelFSDP2" and fsdp.param_dtype is torch.bfloat16
    assert isinstance(fsdp, distributed.strategy_class("fsdp")) and fsdp.context_parallel == 2


def test_gpu_benchmark_script_runs_its_cases_and_records_failures(tmp_path):
    """experiments/gpu/cp_bench.sh on CPU processes with a tiny model: a split case and a
    one-process case are measured, a length the split refuses is recorded as an error naming the
    setting, a case needing more processes than there are is not run, and one table is written."""
    bin_dir = tmp_path / "bin"  # the script calls python3, as on the GPU machine
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    shrink = (
        "trainer=cpu model.init_device=cpu model.dtype=float32 model.head_dim=16 "
        "+model.overrides.num_hidden_layers=1 +model.overrides.hidden_size=32 "
        "+model.overrides.intermediate_size=64 +model.overrides.num_attention_heads=2 "
        "+model.overrides.num_key_value_heads=1 +model.overrides.head_dim=16 +model.overrides.vocab_size=97"
    )
    # A stale rank of an earlier, killed case still on the "GPUs" (nvidia-smi lists it until it
    # is gone): the script kills it before its first case.
    stale = subprocess.Popen(["sleep", "600"])
    holders = tmp_path / "holders"
    holders.write_text(f"{stale.pid}\n")
    (bin_dir / "nvidia-smi").write_text(
        f"#!/bin/sh\nfor p in $(cat {holders}); do\n"  # a live process (not a zombie) holds a GPU
        f'  grep -qs "^State:[[:space:]]*[A-Y]" /proc/$p/status && echo "$p"\ndone\nexit 0\n'
    )
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = _env() | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "CTXLAB_CP_NGPU": "2", "CTXLAB_CP_MIN_CASE_S": "5",
        "CTXLAB_CP_TIME_LIMIT": "240", "CTXLAB_CP_OVERRIDES": shrink, "CTXLAB_CP_FREE_WAIT_S": "5",
    }  # fmt: skip

    def bench(name: str, *cases: str, timeout: int = 400, rc: int = 0, **extra: str):
        """Runs the script into tmp_path/name; its rows (none where it must exit with rc != 0)."""
        cmd = ["bash", str(ROOT / "experiments/gpu/cp_bench.sh"), str(tmp_path / name), *cases]
        proc = subprocess.run(cmd, cwd=ROOT, env=env | extra, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((tmp_path / name / "cp_bench.json").read_text())["rows"] if rc == 0 else proc.stderr

    rows = bench("out", "s2@64x2", "dense@32x1", "dense@66x2", "dense@64x4")
    assert stale.wait(timeout=10) == -9  # killed by the script
    assert [(r["variant"], r["seq_len"], r["gpus"]) for r in rows] == [
        ("s2", 64, 2),
        ("dense", 32, 1),
        ("dense", 66, 2),
        ("dense", 64, 4),
    ]
    split, one, refused, missing = rows
    assert split["status"] == one["status"] == "ok" and split["tokens_per_s_per_gpu"] > 0
    assert split["tokens_per_s_total"] == pytest.approx(2 * split["tokens_per_s_per_gpu"], abs=0.2)
    assert refused["status"] == "error" and "data.seq_len=66 is not divisible by 4" in refused["note"]
    assert missing["status"] == "not run"
    assert "| s2 | 64 | 2 | ok |" in (tmp_path / "out" / "cp_bench.md").read_text()
    # GPUs held by a process the script cannot end: the case is not run, and says by whom.
    holders.write_text("999999999\n")  # above any pid_max: kill -9 fails, and it stays listed
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat {holders}\n")
    (row,) = bench("out2", "dense@32x1", timeout=120, CTXLAB_CP_FREE_WAIT_S="2")
    assert row["status"] == "not run" and "GPUs held by processes 999999999" in row["note"]
    # FSDP2 beside the split (CTXLAB_CP_STRATEGY): the weights sharded over both ranks.
    holders.write_text("")  # the GPUs free again
    (row,) = bench("out3", "dense@64x2", timeout=300, CTXLAB_CP_STRATEGY="fsdp")
    assert (row["status"], row.get("strategy"), row.get("context_parallel")) == ("ok", "fsdp", 2), row
    assert "| dense | 64 | 2 | ok |" in (tmp_path / "out3" / "cp_bench.md").read_text()
    err = bench("out4", timeout=60, rc=2, CTXLAB_CP_STRATEGY="deepspeed")
    assert "CTXLAB_CP_STRATEGY must be ddp or fsdp, got deepspeed" in err


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(Path(sys.argv[1]), sys.argv[2])
