"""Fine-tuning memory and speed benchmark: one training step of a real model shape at long
context, per attention variant and sequence length, through the same config groups, LoRA+
recipe, loss and Lightning trainer that ``ctxlab phase=finetune`` uses.

    python -m ctxlab.bench.finetune --lengths 16384,32768 --variants dense,s2,ms \\
        --out experiments/results/bench -- model=llama2_7b

Everything after ``--`` is a Hydra override list applied to every case (default: the paper's
recipe on the Llama 2 7B shape: ``model=llama2_7b position=crd_ntk phase=finetune trainer=gpu``).
Each case composes ``cfg/config.yaml`` with its variant's overrides and ``data.seq_len=L``,
validates it (a variant that would be dense at that length is reported as skipped), builds the
model, runs ``--warmup`` untimed and ``--steps`` timed optimizer steps on random tokens
(batch 1), and records seconds per step, tokens/s, MFU and peak GPU memory. An out-of-memory
case is recorded as ``oom`` and the next case runs. Results are rewritten after every case
(JSON and Markdown, with card, versions, date and commit), so a run cut short keeps what it
measured. ``--profile`` runs one more step under ``torch.profiler`` after the timed ones and
records where its time went, kernel by kernel and by kind (attention forward and backward, MS
selection, GEMMs, the rest), beside the GPU's idle time in the step; the profiled step is not
one of the timed steps.

Under ``torchrun --nproc_per_node N`` (or a SLURM allocation) every rank runs the same cases
with ``--strategy ddp|fsdp``: tokens/s is reported per GPU and in total, memory per GPU, and
``--baseline one_gpu.json`` adds the scaling efficiency against a one-GPU run of the same lease.
``--context-parallel N`` (with ``ddp``, or ``fsdp``: the weights then sharded over every rank)
splits each row's sequence over N GPUs (``ctxlab.context_parallel``): a step is then
``world / N`` rows of L tokens, tokens/s per GPU is ``world / N * L / s / world``, and an
out-of-memory error is not caught (one rank alone cannot leave the others' collectives: the
process exits and torchrun stops every rank, so the caller records the OOM, as
``experiments/gpu/cp_bench.sh`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ctxlab.options import option_names

# Variants: every option of the attention group with its own settings (ms: the paper's, region 16,
# budget 512, merge 64), plus named settings of an option, as Hydra overrides.
VARIANTS: dict[str, list[str]] = {name: [f"attention={name}"] for name in option_names("attention")} | {
    "ms_sparse": ["attention=ms", "attention.region=64", "attention.budget=64", "attention.merge=8"],
}
DEFAULT_OVERRIDES = ["model=llama2_7b", "position=crd_ntk", "phase=finetune", "trainer=gpu"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ctxlab.config  # noqa: F401  (resolvers)
    from ctxlab.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def rank_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))), int(
        os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))
    )


def environment() -> dict:
    from ctxlab.extras import require

    require("hf", "transformers", why="the fine-tuning benchmark")
    import lightning
    import transformers
    import triton

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = None
    from ctxlab.provenance import git_state

    git = git_state()
    if not git["commit"]:  # a device machine gets a copy of the tree without .git: the caller passes it
        git = {"commit": os.environ.get("CTXLAB_COMMIT"), "dirty": None}
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "device": dev,
        "n_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "peft": peft_v,
        "lightning": lightning.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git,
    }


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, length: int, n: int, seed: int) -> None:
        self.vocab, self.length, self.n, self.seed = vocab, length, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        return {"input_ids": torch.randint(0, self.vocab, (self.length + 1,), generator=g)}


KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MS selection", ("ms_select",)),
    (
        "attention backward",
        ("ms_attn_bwd", "flash_bwd", "flash_bprop", "fmha_cutlassb", "attention_backward"),
    ),
    ("attention forward", ("ms_attn_fwd", "flash_fwd", "flash_fprop", "fmha_cutlassf", "attention_forward")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
)
"""Kinds of kernels (and, on the CPU, of ops), matched in this order against the name in lower case:
ours, PyTorch's flash and memory-efficient kernels, cuDNN's fused attention, the GEMM libraries."""


def kernel_kind(name: str) -> str:
    """The kind of a kernel (``KERNEL_KINDS``), ``other`` when none matches."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_times(prof, on_gpu: bool, wall_s: float, top: int = 20) -> dict:
    """Where a profiled step's time went: on a GPU the kernels' own device time (CUDA events,
    memory copies and sets included), on the CPU the ops' own CPU time; by kind and, largest
    first, the ``top`` kernels. ``idle_ms`` is the step's wall time the GPU spent without a
    kernel (host work, launches, synchronisations)."""
    from torch.autograd import DeviceType

    rows = []
    averages = prof.key_averages()
    # A CPU range (record_function, e.g. Lightning's "Optimizer.step#AdamW.step") is mirrored on the
    # GPU's timeline as a user annotation spanning its kernels: not a kernel, so not counted.
    ranges = {e.key for e in averages if e.device_type != DeviceType.CUDA}
    for e in averages:
        if on_gpu and (e.device_type != DeviceType.CUDA or e.key in ranges):
            continue
        t_ms = (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1000
        if t_ms > 0:
            rows.append((e.key, e.count, t_ms))
    rows.sort(key=lambda r: -r[2])
    total = sum(t for _, _, t in rows)
    kinds: Counter[str] = Counter()
    for name, _, t in rows:
        kinds[kernel_kind(name)] += t
    out = {
        "clock": "device" if on_gpu else "cpu",
        "step_s": round(wall_s, 3),
        "total_ms": round(total, 2),
        "by_kind_ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:160], "calls": c, "ms": round(t, 3)} for n, c, t in rows[:top]],
    }
    if on_gpu:
        out["idle_ms"] = round(max(0.0, wall_s * 1000 - total), 2)
    return out


def _step_timer(warmup: int, profile_step: int | None = None, on_gpu: bool = False):
    import lightning as L

    from ctxlab.kernels.ms_attention.triton_impl import SHALLOW_ITEMS

    class StepTimer(L.Callback):
        """Wall time of each optimizer step (CUDA-synchronised); peak memory of the timed steps;
        per step, the blocks the shallow MS selection decided, redid with its full-depth kernel (a
        redone block costs that kernel's time, and its compilation the first time) and retried
        deeper first (``LaunchConfig.shallow_retry_k``). Step ``profile_step`` (after the timed
        ones) runs under ``torch.profiler`` instead of being timed: ``kernel_times`` of it."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.shallow: list[tuple[int, int, int]] = []
            self.profile: dict | None = None
            self._t0 = 0.0
            self._items = (0, 0, 0)
            self._prof = None

        def _sync(self) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync()
            if batch_idx == warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if batch_idx == profile_step:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
                self._prof = profile(activities=activities)
                self._prof.__enter__()
            self._items = tuple(SHALLOW_ITEMS)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync()
            elapsed = time.perf_counter() - self._t0
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                self.profile = kernel_times(self._prof, on_gpu, elapsed)
                self._prof = None
                return
            self.times.append(elapsed)
            self.shallow.append(tuple(now - then for now, then in zip(SHALLOW_ITEMS, self._items)))

        def on_exception(self, trainer, pl_module, exception) -> None:
            # A step that fails (an OOM is a result) must not leave the profiler running into the
            # next case, whose own profile could then not start.
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                self._prof = None

    return StepTimer()


def _is_oom(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def run_case(
    cfg, *, warmup: int, steps: int, strategy: str | None, devices: int, context_parallel: int = 0,
    profile: bool = False,
) -> dict:  # fmt: skip
    """One (variant, length) case; returns its row (``status`` ok | oom); with ``profile`` one more
    step under ``torch.profiler`` (the row's ``profile``: ``kernel_times``).

    The case's model, module, trainer and strategy live only in :func:`_fit_case`'s frame; they
    are collected once it has returned. Lightning's objects refer to each other, so they go only
    at a collection, and a strategy that outlives the fit (FSDP2's keeps its sharded model) would
    otherwise count the previous case's weights in the next case's peak memory."""
    on_gpu = torch.cuda.is_available() and str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto")
    timer = _step_timer(warmup, warmup + steps if profile else None, on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    row, info = _fit_case(
        cfg, timer, on_gpu, warmup=warmup, steps=steps + int(profile), strategy=strategy, devices=devices,
        context_parallel=context_parallel,
    )  # fmt: skip
    times, shallow = timer.times, timer.shallow
    if timer.profile is not None:
        row["profile"] = timer.profile
    del timer  # the trainer's callback: it may hold the trainer, hence the model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    seq_len = int(cfg.data.seq_len)
    timed = times[warmup:]
    row["step_times_s"] = [round(t, 3) for t in times]
    if any(decided for decided, _, _ in shallow):  # MS with the shallow selection (CUDA)
        for key, counts in zip(("blocks", "redone", "retried"), zip(*shallow)):  # SHALLOW_ITEMS' order
            row[f"shallow_{key}_per_step"] = list(counts)
    if row["status"] == "ok" and timed:
        from ctxlab.train.callbacks import device_peak_flops, model_flops_per_token

        s = statistics.median(timed)
        row["s_per_step"] = round(s, 3)
        tps = seq_len / s / max(1, context_parallel)  # a split row's tokens are shared by its GPUs
        row["tokens_per_s_per_gpu"] = round(tps, 1)
        peak = device_peak_flops() if on_gpu else None
        if peak:
            row["mfu"] = round(tps * model_flops_per_token(info, seq_len) / peak, 4)
    return row


def _fit_case(
    cfg,
    timer,
    on_gpu: bool,
    *,
    warmup: int,
    steps: int,
    strategy: str | None,
    devices: int,
    context_parallel: int = 0,
) -> tuple[dict, object]:
    """Builds and fits one case; returns its row so far and the model's config (for the FLOPs)."""
    import lightning as L
    from hydra.utils import instantiate

    from ctxlab.build import build_model
    from ctxlab.train.module import LMModule

    seq_len = int(cfg.data.seq_len)
    row: dict = {"status": "ok"}
    info = None
    try:
        t_build = time.perf_counter()
        model = build_model(cfg)
        if on_gpu:
            model.cuda()
        row["build_s"] = round(time.perf_counter() - t_build, 1)
        info = model.config  # for the FLOP count after the model is freed
        row["params"] = info.n_params(include_embedding=True)
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kw: dict = {}
        module_cls = LMModule
        if strategy:
            from ctxlab.distributed import build_strategy, module_class

            split = {"context_parallel": context_parallel} if context_parallel else {}
            kw["strategy"] = build_strategy(strategy, **split)
            module_cls = module_class(LMModule, kw["strategy"])  # fsdp shards in configure_model
        module = module_cls(
            model, instantiate(cfg.phase.optimizer),
            instantiate(cfg.phase.scheduler) if cfg.phase.scheduler else None,
            seed=int(cfg.seed), loss_chunk=int(cfg.phase.get("loss_chunk", 4096)),
        )  # fmt: skip
        data = torch.utils.data.DataLoader(
            _RandomTokens(model.config.vocab_size, seq_len, warmup + steps, int(cfg.seed)), batch_size=1
        )
        trainer = L.Trainer(
            accelerator="gpu" if on_gpu else "cpu", devices=devices, precision=cfg.trainer.precision,
            max_steps=warmup + steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, callbacks=[timer], gradient_clip_val=cfg.trainer.gradient_clip_val,
            **kw,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=data)
    except Exception as e:  # noqa: BLE001  (an OOM is a result; anything else is re-raised)
        if not _is_oom(e) or context_parallel:
            raise
        row["status"] = "oom"
        row["error"] = str(e).splitlines()[0][:200]
    if on_gpu:
        row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return row, info


def fraction_computed(cfg) -> float:
    """The fraction of causal pairs the configured attention computes at ``data.seq_len``."""
    from hydra.utils import instantiate

    return instantiate(cfg.attention)().pair_fraction(int(cfg.data.seq_len))


def scaling_efficiency(row: dict, baseline: dict | None) -> float | None:
    """Tokens/s per GPU of ``row`` over the one-GPU tokens/s of the same variant and length in
    ``baseline`` (a result of this benchmark), or None where either is missing."""
    tps = row.get("tokens_per_s_per_gpu")
    for b in (baseline or {}).get("rows", []):
        if (
            (b["variant"], b["seq_len"]) == (row["variant"], row["seq_len"])
            and tps
            and b.get("tokens_per_s_per_gpu")
        ):
            return round(tps / b["tokens_per_s_per_gpu"], 3)
    return None


def markdown(result: dict, baseline: dict | None) -> str:
    env = result["environment"]
    lines = [
        f"# Fine-tuning benchmark: {result['shape']} ({env['device']} x{result['world_size']})",
        "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, lightning {env['lightning']}; "
        f"commit {(env['git'].get('commit') or '?')[:14]}{' (dirty)' if env['git'].get('dirty') else ''}.",
        f"Overrides: `{' '.join(result['overrides'])}`; strategy {result['strategy'] or 'single device'}; "
        + (
            f"each row split over {cp} GPUs (context parallel), batch 1 per {cp} GPUs; "
            if (cp := result.get("context_parallel"))
            else "batch 1 per GPU; "
        )
        + f"{result['warmup']} warm-up + {result['steps']} timed steps (median)"
        + (f", {result['long_steps']} from L={result['long_from']} on." if "long_from" in result else "."),
        "",
        "| variant | L | status | s/step | tokens/s/GPU | tokens/s total | MFU (dense-equiv.) | "
        "peak alloc GiB | peak reserved GiB | fits a 40 GB card | pairs computed | scaling eff. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        tps = r.get("tokens_per_s_per_gpu")
        eff = r.get("scaling_efficiency") or scaling_efficiency(r, baseline)
        eff = f"{eff:.2f}" if eff else "-"
        alloc, reserved = r.get("peak_alloc_gib"), r.get("peak_reserved_gib")
        # A 40 GB A100 offers 39.4 GiB to PyTorch; judged on memory reserved, not just allocated.
        fits = "-" if reserved is None or r["status"] != "ok" else ("yes" if reserved <= 39.4 else "no")
        lines.append(
            f"| {r['variant']} | {r['seq_len']} | {r['status']} | {r.get('s_per_step', '-')} | "
            f"{tps or '-'} | {round(tps * result['world_size'], 1) if tps else '-'} | "
            f"{r.get('mfu', '-')} | {alloc if alloc is not None else '-'} | "
            f"{r.get('peak_reserved_gib', '-')} | {fits} | {r.get('fraction_computed', 1.0):.3f} | {eff} |"
        )
    lines += [
        "",
        "MFU counts 6 N FLOPs per token plus dense causal attention, whatever the variant computes "
        "(the usual convention): a variant that computes fewer pairs can pass 1.",
        "",
        "Ratios at each length (s/step of the other variant / s/step of MS; in brackets the least "
        "and the most it is over every pair of their timed steps, one of each):",
        "",
    ]
    by = {(r["variant"], r["seq_len"]): r for r in result["rows"] if r.get("s_per_step")}
    for L in sorted({r["seq_len"] for r in result["rows"]}):
        for ms in sorted({v for v, n in by if n == L and v.startswith("ms")}):
            parts = [
                f"{o} {by[(o, L)]['s_per_step'] / by[(ms, L)]['s_per_step']:.3f}x "
                f"({_ratio_range(by[(o, L)], by[(ms, L)], result['warmup'])})"
                for o in ("dense", "s2")
                if (o, L) in by
            ]
            if parts:
                lines.append(f"- L={L} {ms}: " + ", ".join(parts))
    for r in result["rows"]:
        if prof := r.get("profile"):
            clock = "GPU kernel time" if prof["clock"] == "device" else "CPU time of the ops"
            idle = f", GPU idle {prof['idle_ms']} ms" if "idle_ms" in prof else ""
            kinds = ", ".join(f"{k} {v}" for k, v in prof["by_kind_ms"].items())
            head = f"Profiled step, {r['variant']} L={r['seq_len']} ({clock}, ms): step {prof['step_s']} s, "
            lines += ["", head + f"kernels {prof['total_ms']}{idle}; by kind: {kinds}.", "",
                      "| kernel | calls | ms |", "|---|---|---|"]  # fmt: skip
            lines += [f"| `{k['name'][:90]}` | {k['calls']} | {k['ms']} |" for k in prof["top"][:12]]
    skipped = [r for r in result["rows"] if r["status"] not in ("ok", "oom")]
    if skipped:
        lines += ["", "Not run:", ""]
        lines += [f"- {r['variant']} L={r['seq_len']}: {r.get('reason')}" for r in skipped]
    return "\n".join(lines) + "\n"


def _ratio_range(other: dict, ms: dict, warmup: int) -> str:
    """The least and the most s/step ratio (other / MS) over every pair of the two rows' timed steps
    (``step_times_s`` after the warm-ups): where the two ranges of steps overlap, it spans 1."""
    a, b = other["step_times_s"][warmup:], ms["step_times_s"][warmup:]
    return f"{min(a) / max(b):.3f}-{max(a) / min(b):.3f}"


def parse(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    else:
        overrides = []
    p = argparse.ArgumentParser(prog="python -m ctxlab.bench.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16384,32768,65536,131072", help="comma-separated sequence lengths")
    p.add_argument("--variants", default="dense,s2,ms", help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument(
        "--define", action="append", default=[], metavar="NAME=OVERRIDES",
        help="declare a variant: NAME=space-separated Hydra overrides (repeatable)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--long-steps", type=int, default=1, help="timed steps from --long-from on")
    p.add_argument("--long-from", type=int, default=65536)
    p.add_argument("--strategy", default=None, help="ddp | fsdp (under torchrun / SLURM)")
    p.add_argument(
        "--context-parallel", type=int, default=0, metavar="N",
        help="split each row over N GPUs (with --strategy ddp or fsdp, under torchrun)",
    )  # fmt: skip
    p.add_argument(
        "--select-impl", default=None, choices=("auto", "torch", "triton", "shallow"),
        help="the MS selection on the GPU (the kernels' LaunchConfig.select_impl; default: configured)",
    )  # fmt: skip
    p.add_argument(
        "--launch", default="",
        help="MS kernels' GPU launch settings, '+'-joined LaunchConfig fields "
        "(select_precision=tf32x3+shallow_rescore=true)",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="one more step per case under torch.profiler: its time by kernel and kind, the GPU's idle time",
    )  # fmt: skip
    p.add_argument("--baseline", default=None, help="one-GPU result JSON for scaling efficiency")
    p.add_argument("--out", default="experiments/results/bench", help="folder for the result files")
    p.add_argument("--tag", default=None, help="file name stem (default: finetune_<shape>_<card>_<n>gpu)")
    a = p.parse_args(argv)
    a.overrides = overrides
    try:
        a.lengths = [int(x) for x in str(a.lengths).split(",") if x]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {a.lengths!r}")
    if not a.lengths or min(a.lengths) < 2:
        p.error(f"--lengths must be integers >= 2, got {a.lengths}")
    a.known = dict(VARIANTS)
    for d in a.define:
        name, sep, ovs = d.partition("=")
        if not sep or not name.strip() or not ovs.split():
            p.error(f"--define takes NAME=OVERRIDES ('ms8=attention=ms attention.region=8'), got {d!r}")
        a.known[name.strip()] = ovs.split()
    a.variants = [v for v in str(a.variants).split(",") if v]
    unknown = [v for v in a.variants if v not in a.known]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {sorted(a.known)} (or --define one)")
    if a.warmup < 0 or a.steps < 1 or a.long_steps < 1:
        p.error("--warmup must be >= 0, --steps and --long-steps >= 1")
    if a.strategy not in (None, "ddp", "fsdp"):
        p.error(f"--strategy must be ddp or fsdp, got {a.strategy!r}")
    if a.context_parallel < 0 or (a.context_parallel and a.strategy is None):
        p.error(f"--context-parallel {a.context_parallel} needs --strategy ddp or fsdp and N >= 1")
    try:  # the kernels' launch settings for this run, checked before any model
        from ctxlab.kernels.bench.ops import launch_fields
        from ctxlab.kernels.ms_attention.triton_impl import GPU_CONFIG

        a.launch_fields = launch_fields(a.launch)
        if a.select_impl is not None:
            a.launch_fields["select_impl"] = a.select_impl
        a.launch_config = dataclasses.replace(GPU_CONFIG, **a.launch_fields)
    except ValueError as e:
        p.error(f"--launch: {e}")
    a.baseline_rows = None
    if a.baseline:
        if not Path(a.baseline).is_file():
            p.error(f"--baseline: no file at {a.baseline}")
        try:
            a.baseline_rows = json.loads(Path(a.baseline).read_text())
            if not isinstance(a.baseline_rows, dict) or not isinstance(a.baseline_rows.get("rows"), list):
                raise ValueError("no 'rows' list")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            p.error(f"--baseline: {a.baseline} is not a result file of this benchmark ({e})")
    return a


def use_launch(config, fields: dict) -> str:
    """Make ``config`` the MS kernels' GPU launch config for this process; returns the selection in
    force and the ``fields`` set beside it, '+'-joined (the result file's ``ms_select_impl``)."""
    from ctxlab.kernels.ms_attention import triton_impl

    triton_impl.GPU_CONFIG = config
    return "+".join([config.select_impl, *(f"{k}={v}" for k, v in fields.items() if k != "select_impl")])


def main(argv: list[str] | None = None) -> dict:
    from ctxlab.config import ConfigError, validate
    from ctxlab.context_parallel import check_length

    a = parse(sys.argv[1:] if argv is None else argv)
    select_impl = use_launch(a.launch_config, a.launch_fields)
    rank, world = rank_info()
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # a 7B init on "cuda" lands on this rank's GPU
    base_overrides = [*DEFAULT_OVERRIDES, *a.overrides]
    # Compose and validate every case before the first model is built.
    cases = []
    for L in a.lengths:
        for v in a.variants:
            cfg = compose([*base_overrides, *a.known[v], f"data.seq_len={L}"])
            try:
                validate(cfg)
                if a.context_parallel:
                    check_length(L, a.context_parallel)
                reason = None
            except ConfigError as e:
                if "exactly dense attention" not in str(e):
                    raise
                reason = f"dense at this length ({e})"
            cases.append((v, L, cfg, reason))
    shape = str(cases[0][2].model.get("source", cases[0][2].model.get("_target_", "model")))
    env = environment()
    card = env["device"].replace("NVIDIA ", "").split()[0] if torch.cuda.is_available() else "cpu"
    stem = a.tag or f"finetune_{shape}_{card}_{world}gpu"
    out = Path(a.out)
    result = {"shape": shape, "overrides": base_overrides, "strategy": a.strategy, "world_size": world,
              "context_parallel": a.context_parallel,
              "ms_select_impl": select_impl,
              "launch_config": dataclasses.asdict(a.launch_config),  # the MS kernels' GPU settings
              "baseline": a.baseline,
              "warmup": a.warmup, "steps": a.steps, "long_steps": a.long_steps, "long_from": a.long_from,
              "profile": a.profile,
              "environment": env, "rows": []}  # fmt: skip
    baseline = a.baseline_rows
    devices = world if a.strategy else 1
    for v, L, cfg, reason in cases:
        row = {"variant": v, "seq_len": L, "fraction_computed": round(fraction_computed(cfg), 4)}
        if reason:
            row |= {"status": "skipped", "reason": reason}
        else:
            steps = a.long_steps if a.long_from <= L else a.steps
            if rank == 0:
                print(f"[bench] {v} L={L}: {a.warmup} warm-up + {steps} timed steps", flush=True)
            row |= run_case(
                cfg, warmup=a.warmup, steps=steps, strategy=a.strategy, devices=devices,
                context_parallel=a.context_parallel, profile=a.profile,
            )  # fmt: skip
            if world > 1 and torch.distributed.is_initialized() and "peak_alloc_gib" in row:
                keys = ("peak_alloc_gib", "peak_reserved_gib")
                peak = torch.tensor([row[k] for k in keys], device="cuda")  # the largest of the GPUs
                torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
                row |= {k: round(float(x), 2) for k, x in zip(keys, peak.tolist())}
            if baseline and (eff := scaling_efficiency(row, baseline)):
                row["scaling_efficiency"] = eff
            if rank == 0:
                print(f"[bench] {v} L={L}: {json.dumps(row)}", flush=True)
        result["rows"].append(row)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
            (out / f"{stem}.md").write_text(markdown(result, baseline))
    if rank == 0:
        print(markdown(result, baseline), flush=True)
    return result


if __name__ == "__main__":
    main()
