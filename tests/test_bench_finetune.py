"""The fine-tuning benchmark (``python -m ctxlab.bench.finetune``) on the CPU.

The real code path of the GPU runs (composition, the HF Llama shape with LoRA+, the Lightning
trainer, timing, result files) on the ``llama2_7b`` config shrunk through ``model.overrides`` to
one small layer in float32. Timings here mean nothing; what is checked is that the rows are
consistent with their own step times, that variants which would be dense are reported as skipped,
that each case's model is freed before the next is built, and that bad arguments stop the run
before any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import weakref

import pytest
import torch

import ctxlab.build
from ctxlab.bench import finetune as bench

SHRINK = [
    "trainer=cpu",
    "model.init_device=cpu",
    "model.dtype=float32",
    "model.head_dim=16",
    "+model.overrides.num_hidden_layers=1", "+model.overrides.hidden_size=32",
    "+model.overrides.intermediate_size=64", "+model.overrides.num_attention_heads=2",
    "+model.overrides.num_key_value_heads=1", "+model.overrides.head_dim=16",
    "+model.overrides.vocab_size=97",
]  # fmt: skip
MS_TINY = "ms_tiny=attention=ms attention.region=4 attention.budget=6 attention.merge=2"


@pytest.fixture
def builds(monkeypatch):
    """Weak references to every model the benchmark builds, and, at each build, which of the
    earlier models were still alive."""
    refs: list = []
    alive_at_build: list[list[bool]] = []
    real = ctxlab.build.build_model

    def build(cfg):
        alive_at_build.append([r() is not None for r in refs])
        model = real(cfg)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(ctxlab.build, "build_model", build)
    return refs, alive_at_build


@pytest.mark.slow
def test_cpu_run_writes_consistent_rows_and_frees_each_model(tmp_path, builds):
    refs, alive_at_build = builds
    args = ["--lengths", "48,64", "--variants", "dense,s2,ms_tiny,ms", "--define", MS_TINY,
            "--warmup", "1", "--steps", "2", "--long-from", "64", "--long-steps", "1",
            "--out", str(tmp_path), "--tag", "one", "--", *SHRINK]  # fmt: skip
    result = bench.main(args)
    rows = {(r["variant"], r["seq_len"]): r for r in result["rows"]}
    assert len(rows) == 8
    # paper MS settings (region 16, budget 512) are exactly dense at 48 and 64 tokens
    for L in (48, 64):
        assert rows[("ms", L)]["status"] == "skipped" and "dense" in rows[("ms", L)]["reason"]
    ran = [r for r in result["rows"] if r["status"] == "ok"]
    assert len(ran) == 6 and len(refs) == 6
    for r in ran:
        steps = 2 if r["seq_len"] < 64 else 1
        assert len(r["step_times_s"]) == 1 + steps
        assert r["s_per_step"] == pytest.approx(statistics.median(r["step_times_s"][1:]), abs=1e-3)
        # tokens/s comes from the unrounded median, rounded to 0.1; s/step is rounded to the
        # millisecond: both roundings bound the gap (a slow step has few tokens/s, where 0.05 weighs)
        tps = r["tokens_per_s_per_gpu"]
        slack = 5.1e-4 + r["seq_len"] * 0.051 / (tps * (tps - 0.05))
        assert r["seq_len"] / tps == pytest.approx(r["s_per_step"], abs=slack)
        assert 0 < r["trainable_params"] < r["params"]  # LoRA+: adapters, embeddings, norms
        assert "peak_alloc_gib" not in r  # no GPU, no GPU memory figure
    assert rows[("dense", 64)]["fraction_computed"] == 1.0
    assert rows[("ms_tiny", 64)]["fraction_computed"] < 1.0
    assert rows[("s2", 64)]["fraction_computed"] == pytest.approx(0.2615, abs=1e-3)  # 4 groups of 16
    # each case's model is gone before the next one is built
    assert all(not any(alive) for alive in alive_at_build)
    assert all(r() is None for r in refs)
    saved = json.loads((tmp_path / "one.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["environment"]["torch"] and saved["world_size"] == 1 and saved["strategy"] is None
    from ctxlab.kernels.ms_attention.triton_impl import GPU_CONFIG

    assert saved["launch_config"] == dataclasses.asdict(GPU_CONFIG)  # the MS kernels' settings in force
    md = (tmp_path / "one.md").read_text()
    assert "| ms_tiny | 64 | ok |" in md and "- ms L=48: dense at this length" in md
    # each ratio with its least and most over the pairs of timed steps (after the warm-up)
    dense, tiny = rows[("dense", 48)]["step_times_s"][1:], rows[("ms_tiny", 48)]["step_times_s"][1:]
    ratio = rows[("dense", 48)]["s_per_step"] / rows[("ms_tiny", 48)]["s_per_step"]
    spread = f"{min(dense) / max(tiny):.3f}-{max(dense) / min(tiny):.3f}"
    assert f"- L=48 ms_tiny: dense {ratio:.3f}x ({spread})" in md, md

    # a second run against the first as its baseline: the efficiency is the ratio of the files' rows
    again = bench.main([*args[:-len(SHRINK) - 1], "--baseline", str(tmp_path / "one.json"),
                        "--variants", "dense", "--tag", "two", "--", *SHRINK])  # fmt: skip
    for r in again["rows"]:
        want = r["tokens_per_s_per_gpu"] / rows[(r["variant"], r["seq_len"])]["tokens_per_s_per_gpu"]
        assert r["scaling_efficiency"] == pytest.approx(want, abs=1e-3)
        assert f"| {r['scaling_efficiency']:.2f} |" in (tmp_path / "two.md").read_text()


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--variants", "dense,nope"], "--variants: unknown ['nope']"),
        (["--lengths", "32k"], "--lengths must be comma-separated integers"),
        (["--lengths", "1"], "--lengths must be integers >= 2"),
        (["--define", "ms8"], "--define takes NAME=OVERRIDES"),
        (["--steps", "0"], "--steps and --long-steps >= 1"),
        (["--strategy", "deepspeed"], "--strategy must be ddp or fsdp"),
        (["--context-parallel", "2"], "--context-parallel 2 needs --strategy ddp or fsdp"),
        (["--context-parallel", "-1", "--strategy", "fsdp"], "--context-parallel -1 needs"),
        (["--baseline", "/nonexistent/one.json"], "--baseline: no file at"),
        (["--launch", "shallow_rescor=true"], "'shallow_rescor' is not a LaunchConfig field"),
        (["--launch", "shallow_rescore=2"], "--launch: shallow_rescore must be a bool"),
        (["--launch", "select_precision"], "is not KEY=VALUE"),
    ],
)
def test_bad_arguments_stop_before_any_model(args, culprit, builds, capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.main([*args, "--out", str(tmp_path), "--", *SHRINK])
    assert culprit in capsys.readouterr().err
    assert builds[0] == [] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["{not json", '{"rows": 3}', "[]"])
def test_a_baseline_that_is_not_a_result_file_is_refused(text, builds, capsys, tmp_path):
    (tmp_path / "base.json").write_text(text)
    with pytest.raises(SystemExit):
        bench.main(["--baseline", str(tmp_path / "base.json"), "--out", str(tmp_path / "o"), "--", *SHRINK])
    assert "is not a result file of this benchmark" in capsys.readouterr().err
    assert builds[0] == []


def test_a_bad_override_fails_at_composition_before_any_model(builds, tmp_path):
    from ctxlab.config import ConfigError

    with pytest.raises(ConfigError, match="merge"):
        bench.main(["--lengths", "64", "--variants", "ms", "--out", str(tmp_path), "--",
                    *SHRINK, "attention.merge=600"])  # fmt: skip
    assert builds[0] == []


def test_step_timer_counts_the_shallow_selections_blocks_per_step():
    """Per step, the blocks the shallow MS selection decided, those it sent to the full-depth
    kernel and those it retried deeper (``triton_impl.SHALLOW_ITEMS``'s difference over the step)."""
    from ctxlab.kernels.ms_attention import triton_impl

    timer = bench._step_timer(warmup=0)
    for decided, redone, retried in ((64, 0, 0), (64, 3, 5), (0, 0, 0)):
        timer.on_train_batch_start(None, None, None, 0)
        # the selection counts redone and retried blocks on the device: no sync per launch
        triton_impl.SHALLOW_ITEMS.add(decided, torch.tensor([redone]), torch.tensor([retried]))
        timer.on_train_batch_end(None, None, None, None, 0)
    assert timer.shallow == [(64, 0, 0), (64, 3, 5), (0, 0, 0)] and len(timer.times) == 3


def test_profile_runs_one_more_step_and_records_where_its_time_went(tmp_path):
    """``--profile``: one step after the timed ones runs under torch.profiler and is not timed; the
    row's ``profile`` gives the step's time by kind and its largest ops (on the CPU, the ops' own CPU
    time: the matrix products of the tiny model's layers are there, as GEMMs), and the Markdown shows
    them."""
    result = bench.main(["--lengths", "48", "--variants", "ms_tiny", "--define", MS_TINY, "--warmup", "1",
                         "--steps", "2", "--profile", "--out", str(tmp_path), "--tag", "p",
                         "--", *SHRINK])  # fmt: skip
    (row,) = result["rows"]
    assert row["status"] == "ok" and len(row["step_times_s"]) == 3  # the profiled step is not timed
    prof = row["profile"]
    assert prof["clock"] == "cpu" and "idle_ms" not in prof and prof["step_s"] > 0
    assert prof["total_ms"] > 0 and prof["top"] and all(k["calls"] >= 1 and k["ms"] > 0 for k in prof["top"])
    assert [k["ms"] for k in prof["top"]] == sorted((k["ms"] for k in prof["top"]), reverse=True)
    assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["total_ms"], abs=0.05)
    assert prof["by_kind_ms"].get("GEMM", 0) > 0  # aten::mm / addmm of the projections
    md = (tmp_path / "p.md").read_text()
    assert "Profiled step, ms_tiny L=48 (CPU time of the ops, ms)" in md and "| kernel | calls | ms |" in md


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ms_attn_fwd_ws_kernel", "attention forward"),
        ("ms_attn_bwd_dkv_sel_ws_kernel", "attention backward"),
        ("ms_select_shallow_kernel", "MS selection"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention backward"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention forward"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention forward"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7", "attention backward"),
        ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention backward"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NNT", "GEMM"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("aten::mm", "GEMM"),
        ("aten::softmax", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert bench.kernel_kind(name) == kind


def test_kernel_times_on_a_gpu_count_kernels_not_the_ranges_mirrored_as_annotations():
    """On a GPU only kernels count: a CPU range (Lightning's optimizer step) appears on the GPU's
    timeline as an annotation spanning the step's kernels, and would double the total (it did in
    session 19's first profile). The GPU's idle time is the step's wall time not covered."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device, count, cpu_us, gpu_us):
        return SimpleNamespace(key=key, device_type=device, count=count, self_cpu_time_total=cpu_us,
                               self_device_time_total=gpu_us)  # fmt: skip

    step = "Optimizer.step#AdamW.step"
    prof = SimpleNamespace(key_averages=lambda: [
        event(step, DeviceType.CPU, 1, 5_000.0, 0.0), event(step, DeviceType.CUDA, 1, 0.0, 9_000_000.0),
        event("aten::mm", DeviceType.CPU, 4, 300.0, 0.0),
        event("ms_attn_fwd_ws_kernel", DeviceType.CUDA, 64, 0.0, 948_000.0),
        event("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", DeviceType.CUDA, 416, 0.0, 1_900_000.0),
    ])  # fmt: skip
    out = bench.kernel_times(prof, on_gpu=True, wall_s=3.0)
    assert out["total_ms"] == 2848.0 and out["idle_ms"] == 152.0
    assert out["by_kind_ms"] == {"GEMM": 1900.0, "attention forward": 948.0}
    assert [k["name"] for k in out["top"]] == [
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN",
        "ms_attn_fwd_ws_kernel",
    ]


def test_a_failed_profiled_step_leaves_no_profiler_running():
    """A profiled step that raises (an out-of-memory step is recorded, and the next case runs)
    stops its profiler, so the next case's profile can start."""
    running = torch._C._autograd._profiler_enabled

    timer = bench._step_timer(warmup=0, profile_step=0)
    timer.on_train_batch_start(None, None, None, 0)
    assert running()
    timer.on_exception(None, None, RuntimeError("CUDA out of memory"))
    assert not running() and timer.profile is None
    again = bench._step_timer(warmup=0, profile_step=0)
    again.on_train_batch_start(None, None, None, 0)
    again.on_train_batch_end(None, None, None, None, 0)
    assert not running() and again.profile is not None and again.times == []
