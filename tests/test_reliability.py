"""Nothing silent, nothing lost (issue #17): what happens around a run. Killed and resumed runs
keep their metrics, a SIGTERM says where the run stopped and how to resume it, a restart with
other settings and a second run in the same directory are refused, checkpoints record what they
were trained with, and bad inputs fail early with the setting named. Jobs run as subprocesses,
as a user runs them, at tiny sizes."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
TINY = ["logger=csv", "data.seq_len=64", "data.batch_size=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]  # fmt: skip
NO_EVAL = ["phase.evaluate=false"]
TINY_EVAL = ["eval.perplexity.lengths=[32,96]", "eval.perplexity.max_tokens=96", "eval.passkey.lengths=[300]",
             "eval.passkey.depths=[0.5]", "eval.passkey.trials=1"]  # fmt: skip
MS = [
    "attention=ms_causal",
    "position=selected",
    "attention.region=4",
    "attention.budget=8",
    "attention.merge=2",
]


def ctxlab(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ctxlab", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV | (env or {}), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"ctxlab {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(*args: str, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctxlab", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(
        int(m[1]) for p in (run / "checkpoints").glob("step*.ckpt") if (m := re.match(r"step(\d+)", p.name))
    )


def metric_rows(run: Path) -> list[dict]:
    with (run / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def train_losses(rows: list[dict]) -> set[tuple[str, str, str]]:
    return {(r["attempt"], r["step"], r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A dense+RoPE run of 4 steps (checkpoints, weights, fit.json; no evaluation)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    ctxlab("trainer.max_steps=4", "trainer.val_check_interval=2", f"hydra.run.dir={run}", *TINY, *NO_EVAL,
           cwd=run.parent)  # fmt: skip
    return run


# Interrupted and resumed runs -----------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_kill9_and_resume_keep_every_row_and_refuse_a_second_run(tmp_path):
    """SIGTERM, then kill -9 at a later step, then a restart: every metrics row of every attempt
    is kept, the SIGTERM says where the run stopped and how to resume, a second run into the
    directory while one holds it is refused, and the killed run's lock and temporaries do not
    outlive it."""
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "trainer.val_check_interval=4", *TINY, *NO_EVAL]

    first = start("trainer.max_steps=400", *args, cwd=tmp_path)
    wait_for(lambda: checkpoint_steps(run), first, "a first checkpoint")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM during training" in err, err[-3000:]
    stopped = step_of(run / "checkpoints" / "last.ckpt")
    assert f"step {stopped}" in err and f"hydra.run.dir={run}" in err, err[-3000:]
    assert "Resume with the same command" in err
    rows_first = train_losses(metric_rows(run))
    assert {s for _, s, _ in rows_first} >= {str(s) for s in range(stopped)}  # every step before the stop

    second = start("trainer.max_steps=400", *args, cwd=tmp_path)
    wait_for(lambda: max(checkpoint_steps(run), default=0) >= stopped + 4, second, "a later checkpoint")
    busy = ctxlab("trainer.max_steps=400", *args, cwd=tmp_path, check=False)
    assert busy.returncode != 0 and "is in use by PID" in busy.stderr, busy.stderr[-3000:]
    assert f"PID {second.pid}" in busy.stderr
    second.kill()
    second.wait(timeout=60)
    killed_at = step_of(run / "checkpoints" / "last.ckpt")
    orphan = run / "checkpoints" / f".step{killed_at + 1}.ckpt.tmp-{second.pid}"
    orphan.write_bytes(b"half a checkpoint")  # what a kill during torch.save leaves
    rows_second = train_losses(metric_rows(run))
    assert rows_first <= rows_second

    final = killed_at + 2
    third = ctxlab(f"trainer.max_steps={final}", *args, cwd=tmp_path)
    assert "resuming from" in third.stdout
    assert f"taking over the stale lock {run / '.lock'} of PID {second.pid}" in third.stdout, third.stdout[
        -2000:
    ]
    assert re.search(r"removed \d+ temporary files", third.stdout) and not orphan.exists()
    assert step_of(run / "checkpoints" / "last.ckpt") == final
    rows = metric_rows(run)
    assert rows_second <= train_losses(rows)  # Lightning's CSVLogger used to delete them
    assert {r["attempt"] for r in rows} == {"1", "2", "3"}
    assert {int(r["step"]) for r in rows if r["attempt"] == "3" and r["train/loss"]} >= {final - 1}
    assert (run / ".lock").read_text() == ""  # released


@pytest.mark.slow
def test_sigterm_during_evaluation_exits_nonzero_and_says_so(tmp_path, trained):
    run = tmp_path / "eval"
    proc = start("phase=extrapolate", f"phase.checkpoint={trained / 'checkpoints' / 'last.ckpt'}",
                 f"hydra.run.dir={run}", *TINY, "eval.perplexity.lengths=[32,64,96,128,160,192,224,256]",
                 "eval.perplexity.max_tokens=4096", "eval.passkey.enabled=false", cwd=tmp_path)  # fmt: skip
    wait_for(lambda: (run / "results" / "cells.jsonl").is_file(), proc, "a first evaluation cell")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM during evaluation" in err and "cells finished so far are kept" in err
    assert f"hydra.run.dir={run}" in err


# Restarts with other settings -----------------------------------------------------------------


@pytest.mark.slow
def test_restart_with_other_settings_is_refused_naming_them(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    recorded = (run / "config.yaml").read_text()
    out = ctxlab("trainer.max_steps=6", "trainer.val_check_interval=2", f"hydra.run.dir={run}", *TINY,
                 *NO_EVAL, *MS, cwd=tmp_path, check=False)  # fmt: skip
    assert out.returncode != 0
    for needle in (
        "trained with other settings",
        "attention._target_",
        "position._target_",
        "DenseAttention",
    ):
        assert needle in out.stderr, (needle, out.stderr[-3000:])
    assert (run / "config.yaml").read_text() == recorded  # the record is not rewritten to claim MS
    assert step_of(run / "checkpoints" / "last.ckpt") == 4

    # A longer budget (the scheduler's total_steps follows it) and other logging resume.
    out = ctxlab("trainer.max_steps=6", "trainer.val_check_interval=2", f"hydra.run.dir={run}", *TINY,
                 *NO_EVAL, "trainer.log_every_n_steps=2", cwd=tmp_path)  # fmt: skip
    assert "resuming from" in out.stdout
    assert step_of(run / "checkpoints" / "last.ckpt") == 6


def test_changed_settings_ignores_what_may_change():
    from ctxlab.rundir import changed_settings

    base = {"trainer": {"max_steps": 4, "log_every_n_steps": 1}, "phase": {"lr": 1.0, "total": 4},
            "eval": {"lengths": [1]}, "attention": {"region": 4}}  # fmt: skip
    now = OmegaConf.create({"trainer": {"max_steps": 9, "log_every_n_steps": 5},
                            "phase": {"lr": 1.0, "total": "${trainer.max_steps}"},
                            "eval": {"lengths": [1, 2]},
                            "attention": {"region": 8, "new": None}})  # fmt: skip
    assert changed_settings(now, base) == {"attention.region": (4, 8)}


@pytest.mark.slow
def test_study_arm_with_changed_training_settings_is_refused(tmp_path, trained):
    from ctxlab.config import ConfigError
    from ctxlab.study import arm_state

    arm = tmp_path / "arm"
    shutil.copytree(trained, arm)
    cfg = OmegaConf.load(arm / "config.yaml")
    cfg.eval.perplexity.lengths = [64]  # a new grid: the trained weights are evaluated again
    assert arm_state(cfg, arm) == "evaluate"
    cfg.phase.optimizer.lr = 0.5
    with pytest.raises(ConfigError, match=r"study arm .*phase\.optimizer\.lr: 0\.003 -> 0\.5"):
        arm_state(cfg, arm)


# Checkpoints and the settings they were trained with ------------------------------------------


@pytest.mark.slow
def test_checkpoint_records_settings_and_is_not_evaluated_under_others(tmp_path):
    run = tmp_path / "ms"
    ctxlab("trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={run}", *TINY, *NO_EVAL,
           *MS, cwd=tmp_path)  # fmt: skip
    meta = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["ctxlab"]
    assert meta["choices"] == {"attention": "ms_causal", "position": "selected"}
    assert meta["settings"]["attention"]["region"] == 4
    assert meta["position_scheme"]["applies_in_attention"] is True
    assert (
        json.loads((run / "weights" / "meta.json").read_text())["position_scheme"] == meta["position_scheme"]
    )

    for ckpt in (run / "checkpoints" / "last.ckpt", run / "weights"):
        out = ctxlab("phase=extrapolate", f"phase.checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'ev'}",
                     *TINY, cwd=tmp_path, check=False)  # fmt: skip
        assert out.returncode != 0
        for needle in (
            f"phase.checkpoint: {ckpt} was not trained with this job's settings",
            "attention=ms_causal",
            "attention=dense",
            "position=selected",
            "position=rope",
            "phase.allow_other_settings",
        ):
            assert needle in out.stderr, (needle, out.stderr[-3000:])
        assert not (tmp_path / "ev" / "results").exists()

    # On purpose: evaluated, and the summary says under which settings.
    cfg = tmp_path / "cfg"
    shutil.copytree(ROOT / "cfg", cfg)
    phase = cfg / "phase" / "pretrain.yaml"
    if "allow_other_settings" not in phase.read_text():  # until cfg/phase declares it
        phase.write_text(phase.read_text() + "allow_other_settings: false\n")
    ev = tmp_path / "ev2"
    ctxlab("phase=extrapolate", f"phase.checkpoint={run / 'weights'}", "phase.allow_other_settings=true",
           f"hydra.run.dir={ev}", *TINY, *TINY_EVAL, cwd=tmp_path, env={"CTXLAB_CFG": str(cfg)})  # fmt: skip
    summary = json.loads((ev / "results" / "summary.json").read_text())
    assert summary["other_settings"]["allowed_by"] == "phase.allow_other_settings"
    assert any("position=selected" in d for d in summary["other_settings"]["differences"])


@pytest.mark.slow
def test_allow_other_settings_evaluates_and_records_it(trained):
    from ctxlab.build import build_model
    from ctxlab.config import ConfigError
    from ctxlab.provenance import check_trained_settings

    cfg = OmegaConf.load(trained / "config.yaml")
    meta = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["ctxlab"]
    assert check_trained_settings(meta, cfg, build_model(cfg), trained, "phase.checkpoint") == []
    ntk = OmegaConf.merge(cfg, {"position": {"_target_": "ctxlab.position.NTKAware", "scale": 4.0}})
    assert (
        check_trained_settings(meta, ntk, build_model(ntk), trained, "phase.checkpoint") == []
    )  # a RoPE scaling
    other = OmegaConf.merge(cfg, {"position": {"base": 500000.0}, "attention": {"scale": 0.5}})
    with pytest.raises(ConfigError, match=r"base=10000.*base=500000|attention.scale=0.5"):
        check_trained_settings(meta, other, build_model(other), trained, "phase.checkpoint")
    other.phase.allow_other_settings = True
    allowed = check_trained_settings(meta, other, build_model(other), trained, "phase.checkpoint")
    assert len(allowed) == 2 and "attention.scale=0.5" in allowed[0] and "base=500000" in allowed[1]


# Bad inputs: early, and naming the setting ---------------------------------------------------


def bad_input(case: str, tmp_path: Path, trained: Path) -> tuple[list[str], str]:
    """The command-line arguments of a bad input, and what its error must say."""
    if case in ("truncated checkpoint", "text checkpoint", "text init_from"):
        bad = tmp_path / "bad.ckpt"
        data = (trained / "checkpoints" / "last.ckpt").read_bytes()
        bad.write_bytes(data[: len(data) // 2] if case.startswith("truncated") else b"not a checkpoint\n")
        if case == "text init_from":
            return [
                "phase=finetune",
                f"phase.init_from={bad}",
            ], f"phase.init_from: {bad} is not a readable checkpoint"
        return [
            "phase=extrapolate",
            f"phase.checkpoint={bad}",
        ], f"phase.checkpoint: {bad} is not a readable checkpoint"
    if case == "malformed jsonl":
        docs = tmp_path / "docs.jsonl"
        good = [json.dumps({"text": "word " * 200}) for _ in range(6)]
        docs.write_text("\n".join([*good[:3], '{"text": "unterminated', *good[3:]]) + "\n")
        return ["data=local", f"data.paths=[{docs}]"], f"{docs}' line 4 is not valid JSON"
    if case == "damaged last.ckpt":
        run = tmp_path / "damaged"
        shutil.copytree(trained, run)
        last = run / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[:1000])
        return [f"hydra.run.dir={run}", "trainer.max_steps=6"], f"{last} is damaged"
    if case == "results is a file":
        run = tmp_path / "blocked"
        run.mkdir()
        (run / "results").write_text("a file where the results folder goes")
        return [f"hydra.run.dir={run}"], f"{run / 'results'} is not writable"
    return {
        "seq_len abc": (["data.seq_len=abc"], "data.seq_len='abc'"),
        "seq_len -5": (["data.seq_len=-5"], "data.seq_len=-5 must be"),
        "seq_len -5 ms": (["data.seq_len=-5", *MS], "data.seq_len=-5 must be"),
    }[case]


BAD_INPUTS = ["seq_len abc", "seq_len -5", "seq_len -5 ms", "truncated checkpoint", "text checkpoint",
              "text init_from", "malformed jsonl", "damaged last.ckpt", "results is a file"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_early_naming_the_setting(case, tmp_path, trained):
    args, needle = bad_input(case, tmp_path, trained)
    run = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={tmp_path / 'r'}"]
    out = ctxlab(*TINY, "trainer.val_check_interval=2", *NO_EVAL, *args, *run, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr[-2500:]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoints_fail_before_training(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints").chmod(0o555)
    try:
        out = ctxlab("trainer.max_steps=6", "trainer.val_check_interval=2", f"hydra.run.dir={run}", *TINY,
                     *NO_EVAL, cwd=tmp_path, check=False)  # fmt: skip
    finally:
        (run / "checkpoints").chmod(0o755)
    assert out.returncode != 0 and f"{run / 'checkpoints'} is not writable" in out.stderr


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    from ctxlab.rundir import RunDirBusy, RunLock

    said = []
    with RunLock(tmp_path, said.append), pytest.raises(RunDirBusy, match=f"in use by PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == "" and not said
    # A holder killed without releasing: its record stays, its flock went with it.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    RunLock(tmp_path, said.append).acquire().release()
    assert len(said) == 1 and f"stale lock {tmp_path / '.lock'} of PID {int(dead.stdout)}" in said[0]


def test_ms_attention_with_batch_zero_names_the_shape():
    from ctxlab.kernels.ms_attention import ms_attention, ms_attention_torch

    q, k = torch.randn(0, 64, 4, 16), torch.randn(0, 64, 2, 16)
    for fn in (ms_attention, ms_attention_torch):
        with pytest.raises(ValueError, match=r"\[0, 64, 4, 16\]"):
            fn(q, k, k, region=4, budget=4, merge=2)


def test_compare_names_a_corrupt_summary_and_tells_same_named_runs_apart(tmp_path):
    from ctxlab.compare import compare_runs

    def write(run: Path, text: str) -> None:
        (run / "results").mkdir(parents=True)
        (run / "results" / "summary.json").write_text(text)

    summary = {"name": "dense+rope", "causal": True, "train_length": 64, "val_ppl": 9.0,
               "perplexity": [{"length": 64, "ppl": 9.5, "n_docs": 1, "n_tokens": 64}]}  # fmt: skip
    write(tmp_path / "sweep_a" / "0", json.dumps(summary))
    write(tmp_path / "sweep_b" / "0", json.dumps(summary | {"train_length": 128, "val_ppl": 8.0}))
    report = compare_runs([tmp_path / "sweep_a", tmp_path / "sweep_b"], tmp_path / "out")
    names = [r["name"] for r in report["rows"]]
    assert names == ["dense+rope (sweep_a/0)", "dense+rope (sweep_b/0)"]
    md = report["markdown"]
    assert "| name | causal | train_len |" in md
    assert "| dense+rope (sweep_a/0) | yes | 64 |" in md and "| dense+rope (sweep_b/0) | yes | 128 |" in md

    write(tmp_path / "sweep_c" / "0", '{"name": "dense+rope", "perplexity": [')
    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path / "sweep_c" / "0" / "results" / "summary.json"))
    ):
        compare_runs([tmp_path / "sweep_a", tmp_path / "sweep_c"], tmp_path / "out2")


@pytest.mark.parametrize("fault", ["malformed line", "not an object", "truncated gzip", "numbers as text"])
def test_record_file_faults_name_the_file(fault, tmp_path):
    import gzip

    from ctxlab.data.corpus import load_corpus

    good = [json.dumps({"text": f"document {i} " * 20}) for i in range(8)]
    path = tmp_path / "docs.jsonl"
    if fault == "malformed line":
        path.write_text("\n".join([*good[:2], '{"text": "cut', *good[2:]]) + "\n")
        needle = f"{str(path)!r} line 3 is not valid JSON"
    elif fault == "not an object":
        path.write_text("\n".join([*good[:4], "[1, 2]", *good[4:]]) + "\n")
        needle = f"{str(path)!r} line 5 is a JSON list, not an object"
    elif fault == "truncated gzip":
        path = tmp_path / "docs.jsonl.gz"
        data = gzip.compress(("\n".join(good) + "\n").encode())
        path.write_bytes(data[: len(data) // 2])
        needle = f"{str(path)!r} cannot be read"
    else:
        path.write_text("\n".join(json.dumps({"text": i}) for i in range(8)) + "\n")
        needle = "text_field='text' of json files"
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_corpus(source="local", paths=[str(path)], cache_dir=str(tmp_path / "cache"))


# Two runs into one directory: the second touches none of the first's files ---------------------


def hydra_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / ".hydra").iterdir())}


@pytest.mark.slow
def test_a_second_run_is_refused_before_hydra_writes_into_the_directory(tmp_path):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "trainer.max_steps=2000", "trainer.val_check_interval=1000", *TINY,
            *NO_EVAL]  # fmt: skip
    first = start(*args, cwd=tmp_path)
    try:
        wait_for(lambda: (run / "csv" / "metrics.csv").is_file(), first, "the first run's training")
        before, record = hydra_files(run), (run / "config.yaml").read_bytes()
        second = ctxlab(*args, "seed=7", cwd=tmp_path, check=False)  # another config, same directory
        assert second.returncode != 0
        assert f"is in use by PID {first.pid}" in second.stderr, second.stderr[-3000:]
        assert hydra_files(run) == before  # Hydra's .hydra/config.yaml of the second was never written
        assert (run / "config.yaml").read_bytes() == record
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


def test_hydra_of_other_ranks_writes_nothing_into_the_run_directory(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from ctxlab import rundir

    for key, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(ROOT / "cfg"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=csv", f"hydra.run.dir={tmp_path / 'r'}"],
                      return_hydra_config=True)  # fmt: skip
    assert cfg.hydra.callbacks.run_dir_lock._target_ == "ctxlab.rundir.HoldRunDir"
    assert "file" in cfg.hydra.job_logging.handlers
    rundir.HoldRunDir().on_run_start(cfg)
    assert cfg.hydra.output_subdir is None
    assert "file" not in cfg.hydra.job_logging.handlers and "file" not in cfg.hydra.job_logging.root.handlers
    assert not (tmp_path / "r").exists() and rundir.held(tmp_path / "r") is None  # rank 0 locks


def test_a_multirun_holds_its_sweep_directory_before_writing_it(tmp_path):
    from hydra import compose, initialize_config_dir

    from ctxlab import rundir

    sweep = tmp_path / "sweep"
    with initialize_config_dir(config_dir=str(ROOT / "cfg"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={sweep}"], return_hydra_config=True)
    busy = re.escape(f"{sweep} is in use by PID {os.getpid()}")
    with rundir.RunLock(sweep), pytest.raises(SystemExit, match=busy):
        rundir.HoldRunDir().on_multirun_start(cfg)
    assert sorted(os.listdir(sweep)) == [".lock"]
    hold = rundir.HoldRunDir()
    hold.on_multirun_start(cfg)
    assert rundir.held(sweep) is not None and json.loads((sweep / ".lock").read_text())["pid"] == os.getpid()
    hold.on_multirun_end(cfg)
    assert rundir.held(sweep) is None and (sweep / ".lock").read_text() == ""


# SIGTERM under several ranks ------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_ddp_saves_the_step_it_stopped_at_and_resumes_there(tmp_path):
    """SIGTERM to torchrun's process group (every rank and the launcher, as SLURM sends it): the
    ranks agree on one step, save it, exit non-zero saying how to resume, and the restart resumes
    from that very step keeping the first attempt's metrics rows."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "ctxlab", "trainer=ddp_cpu"]  # fmt: skip
    # No periodic checkpoint before the signal: the checkpoint found afterwards is the SIGTERM's.
    args = [f"hydra.run.dir={run}", "trainer.val_check_interval=1000", *TINY, *NO_EVAL]
    env = ENV | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*torchrun, "trainer.max_steps=2000", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    rows = lambda: metric_rows(run) if (run / "csv" / "metrics.csv").is_file() else []  # noqa: E731
    wait_for(lambda: len(train_losses(rows())) >= 3, first, "three training steps")
    os.killpg(first.pid, signal.SIGTERM)
    _, err = first.communicate(timeout=180)
    assert first.returncode != 0, err[-3000:]
    m = re.search(
        r"interrupted by SIGTERM during training .* saved checkpoints/last\.ckpt at step (\d+)", err
    )
    assert m, err[-4000:]
    stopped = int(m[1])
    assert stopped >= 3 and step_of(run / "checkpoints" / "last.ckpt") == stopped
    assert checkpoint_steps(run) == []
    assert "torchrun --nproc_per_node 2 -m ctxlab" in err and f"hydra.run.dir={run}" in err
    first_rows = train_losses(metric_rows(run))
    assert {int(s) for _, s, _ in first_rows} >= set(range(stopped))

    final = stopped + 2
    second = subprocess.run([*torchrun, f"trainer.max_steps={final}", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stdout
    assert step_of(run / "checkpoints" / "last.ckpt") == final
    rows_after = metric_rows(run)
    assert first_rows <= train_losses(rows_after)
    resumed = sorted(int(r["step"]) for r in rows_after if r["attempt"] == "2" and r["train/loss"])
    assert resumed == [stopped, stopped + 1]  # the first step trained again is the one after the save


# A full disk ----------------------------------------------------------------------------------

# Runs ctxlab with checkpoint temporaries that take 4096 bytes and then fail as a full disk does,
# from the FULL_AFTER+1-th checkpoint write on.
FULL_DISK = """
import errno, os, pathlib, sys
real_open, opened = pathlib.Path.open, []

class Full:
    def __init__(self, f):
        self.f, self.room = f, 4096
    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def open_(self, mode="r", *args, **kwargs):
    f = real_open(self, mode, *args, **kwargs)
    if ".ckpt.tmp-" in self.name and "w" in mode:
        opened.append(self.name)
        if len(opened) > int(os.environ["FULL_AFTER"]):
            return Full(f)
    return f

pathlib.Path.open = open_
from ctxlab.cli import main
main()
"""


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_names_the_file_and_keeps_what_was_written(tmp_path):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "trainer.max_steps=6", "trainer.val_check_interval=2", *TINY, *NO_EVAL]
    # step2.ckpt and last.ckpt are written; step4.ckpt meets a full disk.
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=ENV | {"FULL_AFTER": "2"})  # fmt: skip
    assert proc.returncode != 0
    err = next((line for line in proc.stderr.splitlines() if line.startswith("ctxlab: error:")), "")
    assert f"ctxlab: error: could not write {run / 'checkpoints' / 'step4.ckpt'}" in err, proc.stderr[-4000:]
    for needle in ("No space left on device", "free on its file system", "the disk is full",
                   "hydra.run.dir", "trainer.val_check_interval"):  # fmt: skip
        assert needle in err, (needle, err)
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["last.ckpt", "step2.ckpt"]  # the temporary file is gone
    assert step_of(run / "checkpoints" / "last.ckpt") == 2  # and the last checkpoint intact
    steps = {int(s) for _, s, _ in train_losses(metric_rows(run))}
    assert steps >= {0, 1, 2}  # every row logged before the failure (step 3 was being saved)

    out = ctxlab("trainer.max_steps=6", *args[1:], f"hydra.run.dir={run}", cwd=tmp_path)  # space again
    assert "resuming from" in out.stdout and step_of(run / "checkpoints" / "last.ckpt") == 6


def test_checkpoint_and_file_writes_on_a_full_disk_leave_the_old_file(tmp_path, monkeypatch):
    from ctxlab.runfiles import RunWriteError, atomic_write
    from ctxlab.slurm import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    real_save = torch.save

    def full(obj, f, *args, **kwargs):  # what torch.save raises when the file stops taking bytes
        real_save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")  # fmt: skip

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunWriteError, match=re.escape(f"could not write {target}")) as e:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert "free on its file system" in str(e.value) and "hydra.run.dir" in str(e.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target)["step"] == 1 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]

    # Not a write failure (an object that cannot be pickled): torch's own error, file kept.
    with pytest.raises(Exception, match="pickle|lambda") as e:
        AtomicCheckpointIO().save_checkpoint({"f": lambda: 0}, target)
    assert not isinstance(e.value, RunWriteError) and sorted(os.listdir(tmp_path)) == ["last.ckpt"]

    record = tmp_path / "summary.json"
    atomic_write(record, "old")

    def no_space(fd):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RunWriteError, match=re.escape(f"could not write {record} (No space left on device)")):
        atomic_write(record, "new")
    assert record.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["last.ckpt", "summary.json"]


def test_metrics_csv_on_a_full_disk_keeps_its_rows(tmp_path):
    from ctxlab.loggers import CSVMetrics
    from ctxlab.runfiles import RunWriteError

    logger = CSVMetrics.create(tmp_path, flush_every=100)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    path = tmp_path / "csv" / "metrics.csv"
    good = path.read_bytes()
    writer = logger.experiment
    real_open = writer._fs.open

    class Full:  # takes 5 bytes of the append, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:5])
            raise OSError(28, os.strerror(28))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    writer._fs.open = lambda p, mode="r", **kw: (
        Full(real_open(p, mode, **kw)) if "a" in mode else real_open(p, mode, **kw)
    )
    logger.log_metrics({"train/loss": 2.0}, step=1)
    with pytest.raises(RunWriteError, match=re.escape(f"could not write {path}")):
        logger.save()
    assert path.read_bytes() == good  # the half row is cut off again
    writer._fs.open = real_open
    logger.save()  # the row kept in memory is written once there is room
    assert [r["train/loss"] for r in metric_rows(tmp_path)] == ["1.0", "2.0"]


def test_free_space_is_checked_before_training(tmp_path, monkeypatch):
    import shutil as sh

    from ctxlab import runfiles
    from ctxlab.config import ConfigError

    model = torch.nn.Linear(1000, 1000)  # 1001000 float32 parameters: 4.0 MB, 12 MB with AdamW's moments
    model.bias.requires_grad_(False)
    ckpt = 4 * 1001000 + 2 * 4 * 1000000
    assert runfiles.checkpoint_bytes(model) == ckpt
    need = 3 * ckpt + 4 * 1000000 + runfiles.MARGIN_BYTES
    assert runfiles.space_needed(tmp_path, ckpt, 4 * 1000000) == need

    def free(n):
        monkeypatch.setattr(
            runfiles.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - n, n)
        )

    free(need)
    runfiles.check_free_space(tmp_path, model)
    free(need - 1)
    with pytest.raises(ConfigError, match=r"free, but this fit needs about .*hydra\.run\.dir") as e:
        runfiles.check_free_space(tmp_path, model)
    assert str(tmp_path) in str(e.value) and "checkpoints of 11.4 MiB each" in str(e.value)
    # A restart replaces its checkpoints and weights: it needs only the temporary copy's room.
    (tmp_path / "checkpoints").mkdir()
    for name in ("last.ckpt", "step4.ckpt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "meta.json").write_text("{}")
    free(ckpt + runfiles.MARGIN_BYTES)
    runfiles.check_free_space(tmp_path, model)


@pytest.mark.slow
def test_a_fit_that_would_fill_the_disk_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    patch = ("import shutil, sys; real = shutil.disk_usage; shutil.disk_usage = lambda p: "
             "real(p)._replace(free=2 << 20); from ctxlab.cli import main; main()")  # fmt: skip
    args = [f"hydra.run.dir={run}", "trainer.max_steps=4", *TINY, *NO_EVAL]
    proc = subprocess.run([sys.executable, "-c", patch, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=ENV)  # fmt: skip
    assert proc.returncode != 0
    assert f"ctxlab: error: {run} is on a file system with 2.0 MiB free" in proc.stderr, proc.stderr[-3000:]
    assert not (run / "checkpoints").exists() and not (run / "csv").exists()
