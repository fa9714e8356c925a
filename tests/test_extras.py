"""A feature whose optional part (pyproject's extras) is missing says which extra to install:
simulated by hiding the part's module (``sys.modules[name] = None`` makes ``import name`` fail)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ctxlab.config import ConfigError
from ctxlab.extras import EXTRAS, MissingExtra, missing, require


def hide(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_every_extra_is_installed_here():
    # The dev environment (make setup) has every part: a name typo in EXTRAS would show here.
    assert {e: missing(e) for e in EXTRAS} == {e: [] for e in EXTRAS}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_a_hidden_module_names_its_extra(monkeypatch, extra):
    module = EXTRAS[extra][0]
    hide(monkeypatch, module)
    with pytest.raises(MissingExtra) as e:
        require(extra, why="the feature")
    msg = str(e.value)
    assert f"[{extra}]" in msg and module in msg and f"pip install 'ctxlab[{extra}]'" in msg
    assert msg.startswith("the feature needs")
    assert isinstance(e.value, ImportError) and isinstance(e.value, ConfigError)


def test_only_the_named_modules_are_checked(monkeypatch):
    hide(monkeypatch, "gguf")
    require("hf", "transformers", why="x")  # gguf is not needed for this
    with pytest.raises(MissingExtra, match=r"missing: gguf"):
        require("hf", why="model=smollm2")


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown optional part 'nosuch'"):
        require("nosuch", why="x")
    with pytest.raises(ValueError, match="not modules of ctxlab\\[hf\\]"):
        require("hf", "wandb", why="x")


def test_wandb_logger_without_wandb(monkeypatch, tmp_path):
    from ctxlab.loggers import Loggers

    hide(monkeypatch, "wandb")
    cfg = OmegaConf.create({"trainer": {"log_every_n_steps": 1}, "logger": {"kind": "wandb"}})
    with pytest.raises(MissingExtra, match=r"logger=wandb .*ctxlab\[wandb\]"):
        Loggers(cfg, tmp_path)


def test_hf_tokenizer_and_model_without_transformers(monkeypatch, tmp_path):
    from ctxlab.build import build_model
    from ctxlab.data.tokenizers import build_tokenizer

    hide(monkeypatch, "transformers")
    with pytest.raises(MissingExtra, match=r"tokenizer=hf:.*ctxlab\[hf\]"):
        build_tokenizer(f"hf:{tmp_path}")
    cfg = OmegaConf.create({"model": {"kind": "hf", "source": "smollm2"}, "position": {"_target_": "x"}})
    with pytest.raises(MissingExtra, match=r"model.kind=hf \(model.source=smollm2\).*ctxlab\[hf\]"):
        build_model(cfg, position=object())


def test_lm_eval_wrapper_without_lm_eval(monkeypatch):
    hide(monkeypatch, "lm_eval")
    monkeypatch.delitem(sys.modules, "ctxlab.lm_eval", raising=False)
    with pytest.raises(MissingExtra, match=r"ctxlab\[lmeval\]"):
        import ctxlab.lm_eval  # noqa: F401


def test_cli_names_the_extra_of_a_plugin_choice(monkeypatch):
    from ctxlab.cli import check_plugin_extras

    hide(monkeypatch, "optuna")
    check_plugin_extras(["launcher=local", "seed=1"])
    with pytest.raises(SystemExit, match=r"hydra/sweeper=optuna needs .*ctxlab\[tune\]"):
        check_plugin_extras(["hydra/sweeper=optuna"])


def test_ctxlab_command_without_submitit():
    # A real `ctxlab` process in which the SLURM launcher plugin cannot import.
    code = (
        "import sys; sys.modules['submitit'] = None; sys.argv = ['ctxlab', 'launcher=slurm', '-m'];"
        "from ctxlab.cli import main; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "launcher=slurm needs ctxlab's optional part [slurm] (missing: submitit" in out.stderr, out.stderr
