"""Sweeps on a real single-node SLURM cluster (`.ci/slurm.sh`): a multirun through
`launcher=slurm`, a cancelled job that the launcher reports instead of waiting for ever, and a
job that gets the pre-timeout signal, checkpoints, requeues and ends exactly where an
uninterrupted run with the same seed ends; an Optuna study whose trials are SLURM jobs. Plus
the cluster-free checks: a sweep with a bad job fails before anything is submitted,
checkpoints are written atomically, and the preemption callback saves a resumable checkpoint
at a step boundary."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "slurm.sh"
# A grid small enough for 2 cores (as in test_pipeline.py; passkey prompts need ~250 tokens).
TINY = [
    "data.seq_len=64",
    "data.batch_size=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "eval.perplexity.lengths=[32,96]",
    "eval.perplexity.max_tokens=96",
    "eval.passkey.lengths=[300]",
    "eval.passkey.depths=[0.5]",
    "eval.passkey.trials=1",
    "hydra.sweep.subdir=${hydra.job.num}",
]


def env_with(extra: dict | None = None) -> dict:
    return (
        os.environ
        | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
        | (extra or {})
    )


def ctxlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctxlab", *args]


def run_ctxlab(*args: str, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ctxlab_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def slurm(cmd: list[str], env: dict) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"exited (rc {proc.returncode}) while waiting for {what}:\n{out[-2000:]}\n{err[-3000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_id(name: str, env: dict) -> str:
    ids = slurm(["squeue", "-h", "-n", name, "-o", "%i"], env).split()
    assert len(ids) == 1, f"expected one job named {name}, squeue has {ids}"
    return ids[0]


@pytest.fixture(scope="module")
def cluster():
    """The local cluster's environment (SLURM_CONF); started here and stopped at the end unless
    it was already running."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (daemons run as root, munge and mysql)")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if start.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start (.ci/slurm.sh start): {start.stderr[-1500:]}")
    conf = start.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    yield env_with({"SLURM_CONF": conf})
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


@pytest.mark.slurm
def test_sweep_runs_every_job_on_slurm(cluster, tmp_path):
    sweep, name = tmp_path / "sweep", f"ctxlab-sweep-{uuid.uuid4().hex[:6]}"
    out = run_ctxlab(
        "-m",
        "launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        f"hydra.launcher.name={name}",
        "logger=csv",
        "position=rope,pi",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        *TINY,
        cwd=tmp_path,
        env=cluster,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [[o for o in j["overrides"] if o.startswith("position=")] for j in manifest["jobs"]] == [
        ["position=rope"],
        ["position=pi"],
    ]
    assert manifest["git"]["commit"] and manifest["versions"]["torch"]
    for job in manifest["jobs"]:
        run = Path(job["dir"])
        summary = json.loads((run / "results" / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["causal"] is True and summary["perplexity"], run
        meta = json.loads((run / "meta.json").read_text())
        assert meta["seed"] == job["seed"] and "dirty" in meta["git"]
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    # The jobs were SLURM jobs, recorded by accounting (slurmdbd may lag slurmctld by a moment).
    def states() -> list[str]:
        return slurm(["sacct", "-n", "-X", "--name", name, "-o", "State"], cluster).split()

    wait_until(lambda: states() == ["COMPLETED", "COMPLETED"], 60, "accounting to record both jobs")


@pytest.mark.slurm
def test_launcher_setting_slurm_rejects_fails_before_any_job_runs(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["launcher=slurm", f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=nosuch", "logger=csv"]
    out = run_ctxlab("-m", *args, "position=rope,pi", *TINY, cwd=tmp_path, env=cluster)
    assert out.returncode != 0
    assert "invalid partition" in out.stderr.lower(), out.stderr[-2000:]
    assert not (sweep / "0").exists() and not (sweep / "1").exists()


@pytest.mark.slurm
def test_cancelled_job_is_reported_not_waited_for(cluster, tmp_path):
    name = f"ctxlab-cancel-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        ctxlab_cmd(
            "-m",
            "launcher=slurm",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"hydra.launcher.name={name}",
            "logger=csv",
            "trainer.max_steps=100000",
            "trainer.val_check_interval=1000",
            *TINY,
        ),
        cwd=tmp_path,
        env=cluster,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: slurm(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], cluster).strip(),
            300,
            "the job to run",
            proc,
        )
        slurm(["scancel", job_id(name, cluster)], cluster)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "CANCELLED" in err, err[-3000:]


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes_exactly(cluster, tmp_path):
    """USR2 (SLURM's pre-timeout signal under submitit) mid-training: the job saves last.ckpt at
    a step boundary, requeues, resumes in the same run_dir with the same W&B run id, and ends
    with the weights and metrics of an uninterrupted run with the same seed."""
    steps = 30
    args = [
        "logger=wandb",
        "trainer.val_check_interval=5",
        f"trainer.max_steps={steps}",
        *TINY,
        "data.seq_len=128",
        "data.batch_size=4",
    ]
    name = f"ctxlab-preempt-{uuid.uuid4().hex[:6]}"
    sweep, ref = tmp_path / "sweep", tmp_path / "ref"
    popen = dict(cwd=tmp_path, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(ctxlab_cmd(f"hydra.run.dir={ref}", *args), **popen)
    job = subprocess.Popen(
        ctxlab_cmd("-m", "launcher=slurm", f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}", *args),
        **popen,
    )
    run = sweep / "0"
    try:
        # Signal once training is under way (the first periodic checkpoint exists).
        wait_until(lambda: any((run / "checkpoints").glob("step*.ckpt")), 400, "the first checkpoint", job)
        jid = job_id(name, cluster)
        slurm(["scancel", "--signal=USR2", jid], cluster)
        # SLURM holds a requeued batch job back for about two minutes; release it at once.
        wait_until(lambda: slurm(["squeue", "-h", "-j", jid, "-t", "PENDING", "-o", "%i"], cluster).strip(),
                   120, "the job to be requeued", job)  # fmt: skip
        slurm(["scontrol", "update", f"jobid={jid}", "StartTime=now"], cluster)
        out, err = job.communicate(timeout=500)
        assert job.returncode == 0, err[-4000:]
        ref_out, ref_err = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_err[-4000:]
    finally:
        for p in (job, reference):
            if p.poll() is None:
                p.kill()

    records = [json.loads(line) for line in (run / "preemptions.jsonl").read_text().splitlines()]
    assert len(records) == 1 and 0 < records[0]["step"] < steps and records[0]["signal"] == "SIGUSR2", records
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert "resuming from" in log and f"preempted at step {records[0]['step']}" in log
    history = ["sacct", "-n", "-X", "-D", "-j", jid, "-o", "State"]
    wait_until(lambda: slurm(history, cluster).split() == ["REQUEUED", "COMPLETED"], 60, "sacct's requeue")

    # Same W&B run id in both sessions of the job.
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2

    # Both sessions of the job computed with the reference's numeric settings (threads, denormals,
    # CPU kernels, ...): the resumed one took its thread count from the checkpoint. Checked before
    # the bits, so that a run on other settings fails naming them, not as a last-bit drift.
    from ctxlab.train.numerics import differences, read_numerics

    (ref_env,), sessions = read_numerics(ref), read_numerics(run)
    assert [s["resumed"] for s in sessions] == [False, True], sessions
    assert sessions[1]["cpu_threads_source"] == "checkpoint" and not sessions[1]["differs_from_checkpoint"]
    for s in sessions:
        assert not differences(ref_env, s), f"numeric settings (reference, job): {differences(ref_env, s)}"

    # Nothing lost: the final state and metrics equal the uninterrupted run's.
    got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    want = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] == steps
    assert got["state_dict"].keys() == want["state_dict"].keys()
    where = parting(run, ref, records[0]["step"])
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(
            got["state_dict"][k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}\n{where}"
        )
    assert logged_losses(run) == logged_losses(ref), where
    assert last_val_loss(run) == last_val_loss(ref)
    got_sum, want_sum = (json.loads((d / "results" / "summary.json").read_text()) for d in (run, ref))
    assert got_sum["val_ppl"] == want_sum["val_ppl"] and got_sum["perplexity"] == want_sum["perplexity"]


@pytest.mark.slurm
@pytest.mark.slow
def test_optuna_study_runs_its_trials_on_slurm(cluster, tmp_path):
    """hydra/sweeper=optuna with launcher=slurm: a batch of n_jobs trials is one SLURM job array,
    and each trial's value is the metric its SLURM job measured."""
    sweep, name = tmp_path / "sweep", f"ctxlab-optuna-{uuid.uuid4().hex[:6]}"
    out = run_ctxlab(
        "-m", "launcher=slurm", "hydra/sweeper=optuna", "hydra.sweeper.objective=val_ppl",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "phase.optimizer.lr=tag(log,interval(1e-4,1))",
        f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}", "logger=csv", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "phase.evaluate=false", *TINY, cwd=tmp_path, env=cluster,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    study = json.loads((sweep / "optuna_study.json").read_text())
    trials = study["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"], trials
    for t in trials:
        _, val_loss = last_val_loss(Path(t["job_dir"]))
        assert t["value"] == pytest.approx(torch.tensor(val_loss).exp().item(), rel=1e-6)
    assert study["best"] == min(trials, key=lambda t: t["value"])
    # Both trials ran as the two tasks of one SLURM array, recorded by accounting.
    wait_until(
        lambda: (
            slurm(["sacct", "-n", "-X", "--name", name, "-o", "State"], cluster).split()
            == ["COMPLETED", "COMPLETED"]
        ),
        60,
        "accounting to record both trials",
    )
    ids = slurm(["sacct", "-n", "-X", "--name", name, "-o", "JobID"], cluster).split()
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1"], (
        ids
    )


def logged_losses(run: Path) -> dict[tuple[str, int], str]:
    """``(metric, step) -> value`` of every train/loss and val/loss row of a run's metrics.csv."""
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return {(m, int(r["step"])): r[m] for r in rows for m in ("train/loss", "val/loss") if r.get(m)}


def parting(run: Path, ref: Path, preempted_at: int) -> str:
    """Where a preempted run's logged losses first differ from the reference run's, for an
    assertion message."""
    got, want = logged_losses(run), logged_losses(ref)
    keys = sorted(got.keys() | want.keys(), key=lambda k: (k[1], k[0]))
    diff = [f"{m} step {i}: {got.get((m, i), 'missing')} vs {want.get((m, i), 'missing')}"
            for m, i in keys if got.get((m, i)) != want.get((m, i))]  # fmt: skip
    head = f"preempted at step {preempted_at} (checkpoint global_step; logged steps count from 0)"
    if not diff:
        return f"{head}; every logged loss is equal ({len(keys)} values)"
    return f"{head}; logged losses (preempted run vs reference) first differ at " + "; ".join(diff[:5])


def last_val_loss(run: Path) -> tuple[int, float]:
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    return int(rows[-1]["step"]), float(rows[-1]["val/loss"])


def test_sweep_with_a_bad_job_fails_before_submission(tmp_path):
    """No cluster needed: the launcher never runs, so nothing reaches sbatch."""
    cases = {
        "unknown option": (["attention=dense,nosuch"], "nosuch"),
        "bad combination": (["attention=dense", "position=rope,selected"], "position=selected"),
    }
    for case, (grid, needle) in cases.items():
        sweep = tmp_path / case.replace(" ", "_")
        out = run_ctxlab(
            "-m",
            "launcher=slurm",
            f"hydra.sweep.dir={sweep}",
            "logger=csv",
            *grid,
            *TINY,
            cwd=tmp_path,
            env=env_with({"PATH": "/nonexistent"}),
            timeout=300,
        )
        assert out.returncode != 0, case
        assert needle in out.stderr, (case, out.stderr[-2000:])
        assert not (sweep / ".submitit").exists(), case


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path):
    from ctxlab.slurm import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, path, storage_options={"x": 1})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_preemption_callback_checkpoints_at_a_step_boundary_and_requeues(tmp_path, accumulate):
    """In-process, no SLURM: the signal lands inside step 3 (in its first batch when gradients
    accumulate over 2); the checkpoint is written after that step and the requeue hook runs at
    the next batch's start, once the step's metrics are logged. Resuming from it reproduces an
    uninterrupted fit, and the two sessions together log every step once."""
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from ctxlab.slurm import PreemptionCheckpoint, trainer_plugins

    class Tiny(L.LightningModule):
        def __init__(self, signal_at: int | None = None):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.signal_at = signal_at

        def training_step(self, batch, batch_idx):
            if self.global_step == self.signal_at:
                self.signal_at = None
                os.kill(os.getpid(), signal.SIGUSR2)
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(self.global_step))
            loss = (self.lin(x) - x.sum(1, keepdim=True)).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(range(1000), batch_size=1)

    class Steps(Logger):
        """The steps whose training loss was logged, in order."""

        def __init__(self):
            super().__init__()
            self.steps: list[int] = []

        name = "steps"
        version = 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if "loss" in metrics:
                self.steps.append(step)

    def fit(module, callbacks=(), resume=None):
        logger = Steps()
        trainer = L.Trainer(
            max_steps=6,
            accumulate_grad_batches=accumulate,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
            plugins=trainer_plugins(),
        )
        try:
            trainer.fit(module, ckpt_path=resume)
        finally:
            logged.append(logger.steps)

    class Requeued(Exception):
        pass

    def requeue(signum):
        raise Requeued(signum)

    logged: list[list[int]] = []
    torch.manual_seed(0)
    straight = Tiny()
    fit(straight)

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    torch.manual_seed(0)
    previous = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(Requeued):
        fit(Tiny(signal_at=3), [PreemptionCheckpoint(ckpt, signum=signal.SIGUSR2, requeue=requeue)])
    assert signal.getsignal(signal.SIGUSR2) is previous  # handler restored
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4  # after step 3 finished
    assert json.loads((tmp_path / "preemptions.jsonl").read_text())["step"] == 4

    second = Tiny()
    fit(second, resume=str(ckpt))
    for a, b in zip(straight.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    whole, first, rest = logged
    assert first + rest == whole, logged  # step 3's loss logged before the requeue, not again after


def test_cpu_threads_come_from_the_setting_then_the_checkpoint_then_the_process(tmp_path):
    """A resumed fit computes with the intra-op thread count its checkpoint was trained with
    unless ``cpu_threads`` says otherwise; the checkpoint records it."""
    from ctxlab.train import numerics

    assert numerics.resolve_cpu_threads(3, 2, 8) == (3, "cpu_threads")
    assert numerics.resolve_cpu_threads(None, 2, 8) == (2, "checkpoint")
    assert numerics.resolve_cpu_threads(None, None, 8) == (8, "default")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="cpu_threads"):
            numerics.resolve_cpu_threads(bad, None, 8)

    before = torch.get_num_threads()
    ckpt = tmp_path / "last.ckpt"
    recorded = numerics.for_checkpoint() | {"num_threads": 1}
    torch.save({"global_step": 3, numerics.CHECKPOINT_KEY: recorded}, ckpt)
    assert torch.load(ckpt, weights_only=True)[numerics.CHECKPOINT_KEY] == recorded  # plain types only
    try:
        note = numerics.pin_cpu_threads(None, ckpt)
        assert torch.get_num_threads() == 1 and note["cpu_threads_source"] == "checkpoint"
        assert note["differs_from_checkpoint"] == {}
        note = numerics.pin_cpu_threads(2, ckpt)  # the setting wins, and the record says what parts
        assert torch.get_num_threads() == 2 and note["differs_from_checkpoint"] == {"num_threads": [1, 2]}
    finally:
        torch.set_num_threads(before)
    record = numerics.record_numerics(tmp_path, stage="fit")
    assert numerics.read_numerics(tmp_path) == [record] and record["num_threads"] == before
