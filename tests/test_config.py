"""Every option of every config group composes and instantiates; bad combinations fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALL_OVERRIDES
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctxlab.build import build_model, eval_configs
from ctxlab.config import (
    ConfigError,
    check_study_overrides,
    compose_job,
    force_add_settings,
    swept_keys,
    target_parameters,
    validate,
)

CFG = Path(__file__).resolve().parents[1] / "cfg"
GROUPS = [
    "attention",
    "position",
    "phase",
    "model",
    "data",
    "eval",
    "trainer",
    "callbacks",
    "logger",
    "launcher",
]
MS_SMALL = ["attention.region=8", "attention.budget=8", "attention.merge=2"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CFG / group).glob("*.yaml"))


def make(overrides: list[str]):
    """A job's config as its task gets it: composed, then scoped (ctxlab.config.compose_job)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CFG), version_base="1.3"):
        return compose_job(["run_dir=/tmp/ctxlab-test", "name=t", *overrides])


def fixups(group: str, option: str) -> list[str]:
    """The other settings an option needs to make a valid job (stated, never implied). The small
    sparse settings go with every option: each applies to the options that have it."""
    extra = list(SMALL_OVERRIDES)
    if group == "phase" and option == "finetune":
        extra.append("phase.init_from=/nonexistent.ckpt")
    if group == "phase" and option == "extrapolate":
        extra.append("phase.checkpoint=/nonexistent.ckpt")
    if group == "position" and option == "selected":
        extra.append("attention=ms")
    if group == "model" and option == "hf":
        extra += ["model.source=/nonexistent", "model.head_dim=64"]
    if group == "data" and option == "local":
        extra.append("data.paths=[/nonexistent.txt]")
    return extra


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_instantiates(group, option):
    cfg = make([f"{group}={option}", *fixups(group, option)])
    validate(cfg)
    assert OmegaConf.select(cfg, group) is not None or group == "launcher"
    # The MS settings reach the MS options only; elsewhere they are recorded as not applied.
    has_region = "region" in target_parameters(cfg.attention._target_)
    assert ("region" in cfg.attention) == has_region
    assert ("attention.region" in cfg.not_applied) == (not has_region)
    if group == "model" and cfg.model.get("kind") == "hf":
        # The spec only: building needs a checkpoint (hf), a conversion (smollm2) or 7B of
        # random weights; tests/test_hf.py builds tiny HF models through the same code.
        spec = instantiate(cfg.model)
        assert spec.kind == "hf" and spec.head_dim > 0
    elif group in ("attention", "position", "model"):
        model = build_model(cfg)
        assert model.config.vocab_size == cfg.data.vocab_size
    elif group == "eval":
        ppl, pk = eval_configs(cfg)
        assert ppl.lengths and pk.lengths
    elif group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.precision == "bf16-mixed"  # instantiating needs a GPU: covered by gpu runs
    elif group == "trainer":
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps
    elif group == "callbacks":
        from ctxlab.train.callbacks import instantiate_callbacks

        built = instantiate_callbacks(cfg.callbacks)
        assert set(built) == {k for k, v in cfg.callbacks.items() if v is not None}
    elif group == "data" and option in ("books", "books_bpe"):
        dm = instantiate(cfg.data)
        assert dm.tokenizer.vocab_size <= cfg.data.vocab_size


def test_every_experiment_composes():
    for exp in options("experiment"):
        cfg = make([f"experiment={exp}"])
        validate(cfg)
        if exp == "quickstart":
            assert len(cfg.study.arms) >= 4


def test_unknown_option_is_rejected():
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="nosuch"):
        make(["attention=nosuch"])


def test_selected_positions_need_ms_attention():
    with pytest.raises(ConfigError, match="position=selected"):
        validate(make(["attention=dense", "position=selected"]))


def test_ms_that_is_dense_at_the_training_length_is_rejected():
    with pytest.raises(ConfigError, match="data.seq_len=256"):
        validate(make(["attention=ms", "data.seq_len=256"]))


def test_ms_merge_must_be_below_budget():
    with pytest.raises(ConfigError, match="merge"):
        validate(make(["attention=ms", "attention.merge=8", "attention.budget=8", "attention.region=8"]))


def test_extrapolate_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="phase.checkpoint"):
        validate(make(["phase=extrapolate", "phase.checkpoint=null"]))


def test_study_arms_must_be_lists():
    with pytest.raises(ConfigError, match="study.arms.x"):
        validate(make(['+study.arms.x="attention=dense"']))


def test_a_setting_applies_only_to_the_options_that_have_it():
    cfg = make(["attention=dense", "position=rope", "position.scale=8.0", *MS_SMALL])
    assert set(cfg.attention) == {"_target_", "_partial_", "scale"} and "scale" not in cfg.position
    assert cfg.not_applied == {"attention.region": 8, "attention.budget": 8, "attention.merge": 2,
                               "position.scale": 8.0}  # fmt: skip
    validate(cfg)
    build_model(cfg)
    cfg = make(["attention=ms_causal", "position=ntk", "position.scale=8.0", *MS_SMALL])
    assert (cfg.attention.region, cfg.position.scale, dict(cfg.not_applied)) == (8, 8.0, {})


def test_an_experiments_settings_apply_only_to_the_options_that_have_them():
    # finetune_smollm2 sets MS and CRD NTK settings; dense + RoPE on top of it take none of them.
    cfg = make(["experiment=finetune_smollm2", "attention=dense", "position=rope"])
    assert "region" not in cfg.attention and set(cfg.position) == {"_target_", "head_dim", "base"}
    assert cfg.position.base == 100000.0  # a setting rope has is applied
    assert cfg.not_applied["attention.region"] == 16 and cfg.not_applied["position.cycle"] == 32768
    validate(cfg)
    instantiate(cfg.attention)()
    instantiate(cfg.position)


def test_only_group_settings_some_option_lacks_are_force_added():
    forced = [
        "attention.region=4,8",
        "position.frequencies._target_=x",
        "logger.group=g",
        "trainer.profiler=simple",
    ]
    kept = ["attention=dense,ms", "data.seq_len=64", "+attention.pool=mean", "~attention.scale",
            "++attention.merge=2", "trainer.max_steps=5", "seed=1", "hydra.run.dir=x"]  # fmt: skip
    assert force_add_settings([*forced, *kept]) == [*(f"++{o}" for o in forced), *kept]
    # A key that an experiment named here sweeps stays plain: it still replaces the sweep's values.
    overrides = ["experiment=sweep_ms_region", "attention.region=8", "attention.merge=2"]
    assert swept_keys(overrides) == {"attention.region", "position"}
    assert force_add_settings(overrides, plain=swept_keys(overrides))[1:] == [
        "attention.region=8",
        "++attention.merge=2",
    ]


def test_a_setting_no_option_has_is_refused_naming_it():
    with pytest.raises(
        ConfigError, match=r"attention\.regoin: no option of attention.*did you mean attention\.region"
    ):
        make(["attention=ms", "attention.regoin=8"])
    with pytest.raises(ConfigError, match=r"position\.scael.*ntk.*scale"):
        make(["position=ntk", "position.scael=2"])


def test_keys_must_be_parameters_of_the_target():
    # Composed without ctxlab's scoping: the key reaches validate, which names it and the target.
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CFG), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["run_dir=/x", "name=t", "++attention.region=8"])
    with pytest.raises(
        ConfigError, match=r"attention\.region is not a setting of attention=dense: .*takes scale$"
    ):
        validate(cfg)
    cfg = make(["+eval.perplexity.strides=2"])  # eval's own settings are declared: scoping keeps it
    with pytest.raises(ConfigError, match=r"eval\.perplexity\.strides.*PerplexityConfig takes.*stride"):
        validate(cfg)


def test_a_command_line_choice_a_study_arm_also_makes_is_refused():
    arms = make(["experiment=quickstart"]).study.arms
    with pytest.raises(ConfigError) as e:
        check_study_overrides(["experiment=quickstart", "attention=s2", "trainer.max_steps=5"], arms)
    msg = str(e.value)
    assert msg.startswith("attention=s2 collides with study arms dense+rope (attention=dense), ms_paper+rope")
    assert (
        "trainer.max_steps" not in msg
        and "ms_causal+selected (attention=ms_causal, attention.region=8" in msg
    )
    with pytest.raises(ConfigError, match=r"^attention\.region=4 collides with study arms ms_paper\+rope "):
        check_study_overrides(["++attention.region=4"], arms)
    # Untouched by every arm: applies to all of them.
    check_study_overrides(
        ["experiment=quickstart", "trainer.max_steps=5", "data.seq_len=128", "logger=csv"], arms
    )
