"""Several processes on CPU (gloo): DDP and FSDP2 give the loss curve of one process with the same
global batch, data-parallel evaluation gives the single-process results, the ctxlab app under
torchrun agrees on one run directory, and a multi-device config without a launcher stops early.

The multi-process parts run this file as a script under ``python -m torch.distributed.run``
(:func:`worker`); the single-process reference runs in the test's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, ROWS_PER_RANK, SEQ = 6, 2, 32
PPL = {"lengths": [16, 40], "stride": 0.5}
PASSKEY = {"lengths": [260, 300], "depths": [0.0, 1.0], "trials": 2}


def _env() -> dict:
    # One thread per process: every window then reduces in the same order in both runs.
    # Lightning's seed variables of an earlier in-process job would re-seed the workers.
    env = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}


# The script side ----------------------------------------------------------------------------


def _data(n_rows: int):
    """Learnable rows: arithmetic runs ``(a + b t) mod 259`` with a random start and step."""
    g = torch.Generator().manual_seed(7)
    start, step = (
        torch.randint(0, 259, (n_rows, 1), generator=g),
        torch.randint(1, 4, (n_rows, 1), generator=g),
    )
    return [{"input_ids": r} for r in (start + step * torch.arange(SEQ + 1)) % 259]


def _docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return [torch.randint(0, 259, (n,), generator=g) for n in (100, 50, 130, 41)]


def _model(kind: str = "ctxlab"):
    """ctxlab's Llama, or a transformers Llama with LoRA+ (``hf``); MS attention (causal selection,
    sparse at SEQ tokens) in every layer of both."""
    import functools

    from helpers import tiny_model

    if kind == "ctxlab":
        return tiny_model("causal", vocab=259, seed=3).train()
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxlab.attention import MSAttention
    from ctxlab.model.hf import HFCausalLM
    from ctxlab.model.hf_lora import apply_lora_plus
    from ctxlab.position import Rope

    torch.manual_seed(4)
    hf = LlamaForCausalLM(
        LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    )  # fmt: skip
    ms = functools.partial(MSAttention, region=4, budget=4, merge=2, select="causal", backend="torch")
    model = HFCausalLM(hf, ms, Rope(head_dim=8))
    model.set_peft(apply_lora_plus(model.hf))
    return model.train()


def _fit(
    strategy_name: str | None, world: int, kind: str = "ctxlab"
) -> tuple[torch.nn.Module, list[list[float]]]:
    """``STEPS`` steps of ``ROWS_PER_RANK`` rows per rank (one process: the whole global batch);
    returns the trained model and, per step, every rank's loss."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ctxlab import distributed
    from ctxlab.train.module import LMModule

    class Record(L.Callback):
        def __init__(self) -> None:
            self.losses: list[list[float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(distributed.all_gather(float(outputs["loss"].detach())))

    model = _model(kind)
    strategy = distributed.build_strategy(strategy_name) if strategy_name else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec := Record()],
    )  # fmt: skip
    module = distributed.module_class(LMModule, trainer.strategy)(
        model, lambda params: torch.optim.AdamW(params, lr=1e-2), seed=0
    )
    # Lightning gives every rank a DistributedSampler(shuffle=True, seed=0): the ranks deal the
    # permutation round-robin, so a step's global batch is the next block of that permutation; the
    # single process reads the same permutation in order.
    data = _data(STEPS * ROWS_PER_RANK * 2)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(data, batch_size=ROWS_PER_RANK * 2 // world, sampler=order if world == 1 else None)
    trainer.fit(module, train_dataloaders=loader)
    if distributed.is_sharded(model):
        model = distributed.unsharded_copy(model, lambda: _model(kind))
    return model.eval(), rec.losses


def _evaluate(model) -> dict:
    from ctxlab.data.tokenizers import ByteTokenizer
    from ctxlab.eval.passkey import PasskeyConfig, passkey_grid
    from ctxlab.eval.perplexity import PerplexityConfig, perplexity_grid

    ppl = [r.as_row() for r in perplexity_grid(model, _docs(), PerplexityConfig(**PPL), progress=False)]
    pk = passkey_grid(model, ByteTokenizer(), PasskeyConfig(**PASSKEY), progress=False)
    return {"perplexity": ppl, "passkey": pk}


def worker(out: Path) -> None:
    """Under torchrun: DDP then FSDP2 fits, each followed by a data-parallel evaluation."""
    from ctxlab import distributed

    world = int(os.environ["WORLD_SIZE"])
    result: dict = {}
    for name in ("ddp", "fsdp"):
        model, losses = _fit(name, world)
        result[name] = {"losses": losses, "eval": _evaluate(model), "world": distributed.world_size()}
        if distributed.is_rank_zero():
            torch.save(model.state_dict(), out / f"{name}.pt")
    result["fsdp_hf"] = {"losses": _fit("fsdp", world, "hf")[1]}
    if distributed.is_rank_zero():
        (out / "worker.json").write_text(json.dumps(result))


def reference(out: Path) -> dict:
    """One process (this one): the same fits with the whole global batch, and the single-process
    evaluation of the weights each multi-process fit ended with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        result: dict = {"losses": _fit(None, 1)[1], "losses_hf": _fit(None, 1, "hf")[1]}
        for name in ("ddp", "fsdp"):
            model = _model().eval()
            model.load_state_dict(torch.load(out / f"{name}.pt"))
            result[name] = _evaluate(model)
    finally:
        torch.set_num_threads(threads)
    return result


# The tests ----------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_and_evaluation_is_gathered(tmp_path):
    here = Path(__file__).resolve()
    _run([*TORCHRUN, str(here), str(tmp_path)], cwd=ROOT)
    got = json.loads((tmp_path / "worker.json").read_text())
    ref = json.loads(json.dumps(reference(tmp_path)))  # as the worker's, through JSON

    for name in ("ddp", "fsdp", "fsdp_hf"):
        single = torch.tensor([s[0] for s in ref["losses_hf" if name == "fsdp_hf" else "losses"]]).double()
        assert len(single) == STEPS and single[-1] < single[0] - 0.05, single  # it trains
        per_rank = torch.tensor(got[name]["losses"], dtype=torch.float64)  # [steps, ranks]
        # The ranks saw different rows (their local losses differ by ~0.1), and their mean is the
        # loss of the one-process global batch at every step. Tolerance 1e-5 relative: the sums run
        # in another float32 order (two half-batch means averaged by the all-reduce vs one mean),
        # which measured 1.3e-7 after 6 Adam steps; another data split or a missing gradient
        # average moves the loss by 1e-2 or more.
        assert (per_rank[:, 0] - per_rank[:, 1]).abs().max() > 1e-2, per_rank
        torch.testing.assert_close(per_rank.mean(1), single, rtol=1e-5, atol=0, msg=name)
        if name == "fsdp_hf":
            continue
        assert got[name]["world"] == 2
        # Data-parallel evaluation = single-process evaluation of the same weights, exactly.
        assert got[name]["eval"] == ref[name], name
    rows = ref["ddp"]["perplexity"]
    assert [r["length"] for r in rows] == PPL["lengths"] and all(r["n_tokens"] > 0 for r in rows)
    assert len(ref["ddp"]["passkey"]) == len(PASSKEY["lengths"]) * len(PASSKEY["depths"])


def _tiny_checkpoint(tmp_path: Path) -> Path:
    """A ctxlab checkpoint of the default (model=tiny) config's model, as a fit would save it."""
    from hydra import compose, initialize_config_dir

    import ctxlab.config  # noqa: F401  (resolvers)
    from ctxlab.build import build_model

    with initialize_config_dir(config_dir=str(ROOT / "cfg"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=csv"])
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path / "tiny.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "ctxlab": {"model": model.config.to_dict()}}, path)
    return path


EVAL = ["eval.perplexity.lengths=[32,96]", "eval.perplexity.max_tokens=192", "eval.passkey.lengths=[300]",
        "eval.passkey.depths=[0.0,1.0]", "eval.passkey.trials=2", "eval.causality.n_cuts=1"]  # fmt: skip


@pytest.mark.slow
def test_app_under_torchrun_agrees_on_run_dir_and_gathers_evaluation(tmp_path):
    """`ctxlab phase=extrapolate` under torchrun without hydra.run.dir: one time-stamped run
    directory (rank 0's) holds everything, and its results are the single-process evaluation."""
    from ctxlab.data.datamodule import TextDataModule
    from ctxlab.eval.passkey import PasskeyConfig, passkey_grid
    from ctxlab.eval.perplexity import PerplexityConfig, perplexity_grid
    from ctxlab.weights import load_weights

    ckpt = _tiny_checkpoint(tmp_path)
    _run([*TORCHRUN, "-m", "ctxlab", "trainer=ddp_cpu", "phase=extrapolate", f"phase.checkpoint={ckpt}",
          "logger=csv", *EVAL], cwd=tmp_path)  # fmt: skip
    run_dirs = list((tmp_path / "outputs" / "extrapolate").iterdir())
    assert len(run_dirs) == 1, run_dirs  # another rank's stamp, if any, was removed
    run = run_dirs[0]
    assert (run / "meta.json").exists() and (run / "plots" / "perplexity.png").exists()
    got_ppl = json.loads((run / "results" / "perplexity.json").read_text())
    got_pk = json.loads((run / "results" / "passkey.json").read_text())

    from hydra import compose, initialize_config_dir

    from ctxlab.build import build_model

    with initialize_config_dir(config_dir=str(ROOT / "cfg"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=csv", *EVAL])
    model = build_model(cfg)
    load_weights(model, ckpt, "phase.checkpoint")
    model.eval()
    dm = TextDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers
    try:
        ppl = perplexity_grid(
            model, dm.eval_documents("test"), PerplexityConfig(**_plain(cfg.eval.perplexity))
        )
        pk = passkey_grid(model, dm.tokenizer, PasskeyConfig(**_plain(cfg.eval.passkey)))
    finally:
        torch.set_num_threads(threads)
    assert [{k: r[k] for k in ("length", "n_docs", "n_tokens", "nll")} for r in got_ppl] == [
        {k: r.as_row()[k] for k in ("length", "n_docs", "n_tokens", "nll")} for r in ppl
    ]
    assert got_pk == pk


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return {k: v for k, v in OmegaConf.to_container(node).items() if k != "_target_"}


def test_several_devices_without_a_launcher_stop_before_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ctxlab", "trainer=ddp_cpu", "logger=csv", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "trainer.devices=2 asks for 2 processes" in proc.stderr and "torchrun" in proc.stderr, proc.stderr
    assert not (tmp_path / "r" / "meta.json").exists() and not (tmp_path / "r" / "checkpoints").exists()


LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_RANK", "RANK", "SLURM_JOB_ID", "SLURM_NTASKS",
              "SLURM_JOB_NAME", "SLURM_PROCID")  # fmt: skip


@pytest.mark.parametrize(
    "env, devices, error",
    [
        ({}, 1, None),
        ({}, 2, "not started by torchrun"),
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 2, None),
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, 2, "WORLD_SIZE=4"),
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 1, "WORLD_SIZE=2"),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "job", "SLURM_PROCID": "0"}, 2, None),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job", "SLURM_PROCID": "0"}, 2,
         "not started by torchrun"),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "job", "SLURM_PROCID": "0"}, 2,
         "SLURM_NTASKS=4"),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "job", "SLURM_PROCID": "0",
          "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 2, "inside a SLURM job step"),
    ],
    ids=["one", "two-bare", "torchrun", "torchrun-more", "torchrun-one-device", "slurm", "slurm-one-task",
         "slurm-more", "torchrun-in-slurm"],
)  # fmt: skip
def test_check_launch(monkeypatch, env, devices, error):
    from omegaconf import OmegaConf

    from ctxlab.config import ConfigError
    from ctxlab.distributed import check_launch

    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trainer = OmegaConf.create({"accelerator": "cpu", "devices": devices})
    if error is None:
        assert check_launch(trainer) == devices
    else:
        with pytest.raises(ConfigError, match=error):
            check_launch(trainer)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_strategies_never_launch_processes_themselves(name, monkeypatch):
    import lightning as L

    from ctxlab.config import ConfigError
    from ctxlab.distributed import build_strategy, module_class
    from ctxlab.train.module import LMModule

    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=build_strategy(name), logger=False)
    module = module_class(LMModule, trainer.strategy)(_model(), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="no launcher started the processes"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_data(4), batch_size=2))


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_strategies_destroy_their_process_group_at_exit(name, monkeypatch, tmp_path):
    """A strategy's process group (Lightning creates it; its teardown keeps it) is destroyed at
    the interpreter's exit, registered once however many strategies are built: a group left to
    the exit can abort a rank after its work ("terminate called without an active exception")."""
    import atexit

    import torch.distributed as dist

    from ctxlab import distributed

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(atexit, "register", lambda f: calls.append(("register", f)))
    monkeypatch.setattr(atexit, "unregister", lambda f: calls.append(("unregister", f)))
    distributed.build_strategy(name)
    distributed.build_strategy(name, context_parallel=1)
    hook = distributed._destroy_process_group
    assert calls == [("unregister", hook), ("register", hook)] * 2
    # the hook destroys a live group, and is a no-op without one
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    hook()
    assert not dist.is_initialized()
    hook()


def test_agree_run_dir_removes_only_a_stray_hydra_dir(tmp_path, monkeypatch):
    from ctxlab import distributed

    root, mine = tmp_path / "outputs" / "t0", tmp_path / "outputs" / "t1"
    (mine / ".hydra").mkdir(parents=True)
    (mine / ".hydra" / "config.yaml").write_text("a: 1")
    (mine / "cli.log").write_text("")
    monkeypatch.setattr(distributed, "broadcast", lambda obj, src=0: str(root))  # rank 0's stamp
    assert distributed.agree_run_dir(mine, str(mine)) == root and not mine.exists()
    (mine / "results").mkdir(parents=True)  # anything but Hydra's files: kept
    assert distributed.agree_run_dir(mine, str(mine)) == root and mine.exists()


def test_gather_items_reassembles_in_order_and_refuses_gaps():
    from ctxlab.distributed import gather_items, my_items

    assert list(my_items(5)) == [0, 1, 2, 3, 4]
    assert gather_items(3, {2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="no rank"):
        gather_items(3, {0: "a", 2: "c"})


def test_decoder_layers_of_ctxlab_and_hf_models():
    from ctxlab.attention import MSAttention
    from ctxlab.distributed import build_strategy, decoder_layers

    for kind in ("ctxlab", "hf"):  # the FSDP units; the MS cores sit inside them
        model = _model(kind)
        layers = decoder_layers(model)
        assert len(layers) == 2 and all(isinstance(c, MSAttention) for c in model.cores)
        assert all(any(m is c for m in layer.modules()) for layer, c in zip(layers, model.cores))
    with pytest.raises(TypeError, match="Linear"):
        decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="must be one of"):
        build_strategy("deepspeed")
    fsdp = build_strategy("fsdp", param_dtype="bfloat16")
    assert fsdp.param_dtype is torch.bfloat16 and not fsdp._save_distributed_checkpoint


def test_float32_lora_in_bf16_layers_become_their_own_fsdp_units():
    from ctxlab.distributed import decoder_layers, minority_dtype_modules

    model = _model("hf")
    model.hf.to(torch.bfloat16)
    for n, prm in model.named_parameters():
        if "lora_" in n:
            prm.data = prm.data.float()  # what peft does for adapters of a bf16 model
    layer = decoder_layers(model)[0]
    parts = minority_dtype_modules(layer)
    lora = [m for n, m in layer.named_modules() if "lora_" in n and list(m.parameters(recurse=False))]
    assert parts and {id(m) for m in parts} == {id(m) for m in lora}
    assert all(p.dtype == torch.float32 for m in parts for p in m.parameters())
    assert minority_dtype_modules(model, skip=decoder_layers(model)) == []  # embeddings, norm, head
    mixed = torch.nn.Linear(2, 2)
    mixed.bias.data = mixed.bias.data.double()
    with pytest.raises(ValueError, match="several dtypes"):
        minority_dtype_modules(torch.nn.Sequential(mixed, torch.nn.Linear(2, 2, dtype=torch.bfloat16)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(Path(sys.argv[1]))
