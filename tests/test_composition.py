"""Every experiment x every attention option x every position option, composed as its task gets it
(an option's own settings apply to the options that have them: ctxlab.config.scope_options),
validated and built, or refused with a ConfigError naming the settings; every valid combination of
an experiment on the tiny model (and every arm of a study) then runs as a Lightning fast dev run.
Measured on 2 idle CPU cores: the matrix composes, validates and builds in about 30 s, and the 64
fast dev runs take about 0.6 s each, 40 s in all (several times that on a loaded machine). Plus,
end to end: the sweep over options with different settings that used to stop on its dense job,
`--cfg job`, and a study refusing a command-line choice its arms make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml
from helpers import SMALL, SMALL_OVERRIDES
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctxlab.build import build_model
from ctxlab.config import ConfigError, check_study_overrides, compose_job, option_settings, validate
from ctxlab.options import option_names
from ctxlab.train.job import run_job

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "cfg"
EXPERIMENTS = option_names("experiment")
ATTENTIONS = option_names("attention")
POSITIONS = option_names("position")
MS_SMALL = ["attention.region=8", "attention.budget=8", "attention.merge=2"]
# A CPU fast dev run at 256 tokens with a one-length perplexity grid (the pipeline tests run passkey).
TINY = ["trainer=cpu", "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false", "logger=csv",
        "data.seq_len=256", "data.batch_size=2", "eval.perplexity.lengths=[64]",
        "eval.perplexity.max_tokens=64", "eval.passkey.enabled=false"]  # fmt: skip
# Experiments that declare a study (study.arms), read from their files.
STUDIES = [
    e for e in EXPERIMENTS if "study" in yaml.safe_load((CFG / "experiment" / f"{e}.yaml").read_text())
]


def make(overrides: list[str], run_dir: Path | str = "/tmp/ctxlab-test") -> DictConfig:
    """A job's config as its task gets it (composed, then scoped)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CFG), version_base="1.3"):
        return compose_job([f"run_dir={run_dir}", "name=t", *overrides])


def cpu_sized(experiment: str) -> list[str]:
    """The command line that runs ``experiment`` on a CPU at tiny sizes: the small sparse settings too,
    unless it is a study whose arms set their own (the command line would collide with them)."""
    cfg = make([f"experiment={experiment}"])
    tiny = TINY
    if cfg.eval.perplexity.get("protocol") == "fixed_targets":  # scores targets, not max_tokens
        tiny = [*TINY[:-2], "eval.perplexity.max_tokens=0", "eval.perplexity.targets=32",
                "eval.join_documents=3000", "eval.perplexity.chunk_size=0", "eval.passkey.enabled=false",
                "eval.scale_search.length=512", "eval.scale_search.max_tokens=512"]  # fmt: skip
    try:
        if cfg.get("study"):
            check_study_overrides(SMALL_OVERRIDES, cfg.study.arms)
        return [*tiny, *SMALL_OVERRIDES]
    except ConfigError:
        return tiny


def is_hf(cfg: DictConfig) -> bool:
    return cfg.model.get("kind") == "hf"


def check_scoped(cfg: DictConfig, chosen: dict[str, str]) -> None:
    """The chosen options got only settings they have; what they lack is recorded as not applied."""
    for group, name in chosen.items():
        assert set(cfg[group]) <= option_settings(group, name), (group, name, sorted(cfg[group]))
    for key in cfg.not_applied:
        group, setting = key.split(".", 1)
        assert group not in chosen or setting not in option_settings(group, chosen[group]), key


def build(cfg: DictConfig) -> None:
    """The tiny model whole; for an HF model (a pre-trained checkpoint to convert) its attention,
    position scheme and model spec, which take the same settings."""
    if is_hf(cfg):
        instantiate(cfg.attention)()
        instantiate(cfg.position)
        assert instantiate(cfg.model).kind == "hf"
    else:
        build_model(cfg)


def matrix(experiment: str) -> tuple[dict, dict]:
    """(attention, position) -> the validated config, and -> the ConfigError message of a refusal."""
    base = cpu_sized(experiment)
    valid, refused = {}, {}
    for attention, position in product(ATTENTIONS, POSITIONS):
        overrides = [f"experiment={experiment}", f"attention={attention}", f"position={position}", *base]
        cfg = make(overrides)
        try:
            if cfg.get("study"):
                check_study_overrides(overrides, cfg.study.arms)
            validate(cfg)
        except ConfigError as e:
            refused[attention, position] = str(e)
            continue
        check_scoped(cfg, {"attention": attention, "position": position})
        valid[attention, position] = cfg
    return valid, refused


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_attention_and_position_composes_and_builds_or_is_refused(experiment):
    valid, refused = matrix(experiment)
    study = make([f"experiment={experiment}"]).get("study")
    for (attention, position), msg in refused.items():
        if study:
            # Every arm chooses attention and position: a command-line choice of either is refused.
            assert f"attention={attention} collides with study arms" in msg, msg
            assert f"position={position} collides with study arms" in msg, msg
        else:
            assert f"position={position}" in msg and f"attention={attention}" in msg, msg
    assert not (study and valid)
    for cfg in valid.values():
        build(cfg)
    if not study:
        # Each option composes into a valid job with some option of the other group.
        assert {a for a, _ in valid} == set(ATTENTIONS) and {p for _, p in valid} == set(POSITIONS)


def test_settings_reach_only_the_options_that_have_them():
    base = ["experiment=finetune_smollm2", *cpu_sized("finetune_smollm2")]
    dense_rope = make([*base, "attention=dense", "position=rope"])
    assert set(dense_rope.attention) == {"_target_", "_partial_", "scale"}
    assert (
        set(dense_rope.position) == {"_target_", "head_dim", "base"} and dense_rope.position.base == 100000.0
    )
    assert (
        dense_rope.not_applied["attention.region"] == 8 and dense_rope.not_applied["position.cycle"] == 32768
    )
    ms_crd = make([*base, "attention=ms", "position=crd_ntk"])
    assert (ms_crd.attention.region, ms_crd.position.cycle) == (8, 32768)
    ms_lacks = {f"attention.{k}" for k in SMALL if k not in option_settings("attention", "ms")}
    assert {k for k in ms_crd.not_applied if k.startswith(("attention.", "position."))} == ms_lacks


@pytest.mark.parametrize("experiment", STUDIES)
def test_every_study_arm_composes_validates_and_builds(experiment):
    base = [f"experiment={experiment}", *cpu_sized(experiment)]
    for arm in make(base).study.arms.values():
        cfg = make([*base, *arm, "study=null"])
        validate(cfg)
        build(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_valid_combination_runs_a_fast_dev_run(experiment, tmp_path):
    """Each job as ``ctxlab`` runs it: a study's arms as run_study composes them, every other
    experiment with each of its valid attention x position combinations."""
    base = [f"experiment={experiment}", *cpu_sized(experiment)]
    if is_hf(make(base)):
        pytest.skip("an HF model (a pre-trained checkpoint): its matrix builds attention and position only")
    study = make(base).get("study")
    if study:
        jobs = {name: [*arm, "study=null", f"name={name}"] for name, arm in study.arms.items()}
    else:
        valid, _ = matrix(experiment)
        jobs = {f"{a}+{p}": [f"attention={a}", f"position={p}"] for a, p in sorted(valid)}
    for name, overrides in jobs.items():
        run_dir = tmp_path / name
        cfg = make([*base, *overrides], run_dir=run_dir)
        summary = run_job(cfg)
        assert summary["causal"] in (True, False) and summary["steps"] == 1, name
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert written["attention"] == OmegaConf.to_container(cfg.attention, resolve=True), name
        assert written["not_applied"] == OmegaConf.to_container(cfg.not_applied), name


def ctxlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ctxlab", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_sweep_over_options_with_different_settings_runs_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = ctxlab(
        "-m", "attention=dense,ms_causal", *MS_SMALL, f"hydra.sweep.dir={sweep}", *TINY, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "[ctxlab] attention=dense has no setting region, budget, merge (settings of ms, ms_causal); " \
           "not applied" in out.stdout  # fmt: skip
    dense, ms = (yaml.safe_load((sweep / n / "config.yaml").read_text()) for n in ("0", "1"))
    assert set(dense["attention"]) == {"_target_", "_partial_", "scale"}
    assert dense["not_applied"] == {"attention.region": 8, "attention.budget": 8, "attention.merge": 2}
    assert (ms["attention"]["region"], ms["attention"]["budget"], ms["not_applied"]) == (8, 8, {})
    for job in ("0", "1"):
        assert json.loads((sweep / job / "results" / "summary.json").read_text())["causal"] is True


def test_cfg_job_prints_the_scoped_config_and_refuses_an_unknown_setting(tmp_path):
    out = ctxlab("--cfg", "job", "attention=dense", *MS_SMALL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert "region" not in cfg["attention"] and cfg["not_applied"]["attention.region"] == 8
    bad = ctxlab("--cfg", "job", "attention.regoin=8", cwd=tmp_path)
    assert bad.returncode != 0
    assert "attention.regoin: no option of attention has a setting regoin" in bad.stderr, bad.stderr[-2000:]
    assert "did you mean attention.region?" in bad.stderr and "dense: scale" in bad.stderr


def test_a_study_refuses_a_command_line_choice_its_arms_make(tmp_path):
    run = tmp_path / "run"
    out = ctxlab("experiment=quickstart", "attention=s2", f"hydra.run.dir={run}", *TINY, cwd=tmp_path)
    assert out.returncode != 0
    assert (
        "attention=s2 collides with study arms dense+rope (attention=dense), ms_paper+rope" in out.stderr
    ), out.stderr[-3000:]
    assert not (run / "arms").exists()
