"""ctxlab installed as a wheel works outside the source tree: the configs ship inside it, and
``config_dir()`` finds them (``$CTXLAB_CFG`` first, then the source tree, then the installed copy).
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ctxlab import cli, options

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"slurm": "hydra-submitit-launcher", "tune": "optuna", "hf": "transformers", "wandb": "wandb",
          "lmeval": "lm_eval"}  # fmt: skip


def fake_module(monkeypatch, site: Path) -> None:
    """Make ``ctxlab.options`` (which ``cli.config_dir`` asks) believe it lives in ``site/ctxlab``."""
    monkeypatch.setattr(options, "__file__", str(site / "ctxlab" / "options.py"))


def config_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("seed: 1\n")
    return path


def test_config_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("CTXLAB_CFG", raising=False)
    packaged = config_folder(tmp_path / "site" / "ctxlab" / "cfg")
    fake_module(monkeypatch, tmp_path / "site")
    assert options.config_dir() == packaged  # no source tree around: the wheel's copy
    assert cli.config_dir() == str(packaged)
    # A checkout (pyproject.toml beside cfg/) that this module runs from comes first.
    tree = tmp_path / "tree"
    source = config_folder(tree / "cfg")
    (tree / "pyproject.toml").write_text("")
    config_folder(tree / "src" / "ctxlab" / "cfg")
    fake_module(monkeypatch, tree / "src")
    assert options.config_dir() == source
    env = config_folder(tmp_path / "mine")
    monkeypatch.setenv("CTXLAB_CFG", str(env))
    assert options.config_dir() == env == Path(cli.config_dir())


def test_config_dir_missing_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXLAB_CFG", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"no config.yaml in .*nowhere \(CTXLAB_CFG\)"):
        cli.config_dir()
    monkeypatch.delenv("CTXLAB_CFG")
    fake_module(monkeypatch, tmp_path / "site")
    with pytest.raises(SystemExit, match=r"no config.yaml in .*cfg \(nor in the installed ctxlab/cfg\)"):
        cli.config_dir()


def source_copy(dest: Path) -> Path:
    """What ``pip install .`` reads, copied so the build's files stay out of the real tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "kernels"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copytree(ROOT / "cfg", dest / "cfg", symlinks=True)  # cfg/experiment -> ../experiments
    (dest / "experiments").mkdir()
    for path in (ROOT / "experiments").glob("*.yaml"):
        shutil.copy2(path, dest / "experiments" / path.name)
    return dest


def run(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CTXLAB_CFG"}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.mark.slow
def test_wheel_ships_configs_and_installs_outside_the_tree(monkeypatch, tmp_path):
    tree = source_copy(tmp_path / "tree")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-w", tmp_path / "dist", tree, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("ctxlab-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        want = {f"ctxlab/cfg/{p.relative_to(ROOT / 'cfg')}": p for p in (ROOT / "cfg").rglob("*.yaml")
                if "experiment" not in p.relative_to(ROOT / "cfg").parts}  # fmt: skip
        want |= {f"ctxlab/cfg/experiment/{p.name}": p for p in (ROOT / "experiments").glob("*.yaml")}
        assert "ctxlab/cfg/experiment/quickstart.yaml" in want
        for name, path in want.items():
            assert name in names, name
            assert z.read(name) == path.read_bytes(), name
        assert not [n for n in names if n.startswith("ctxlab/cfg/experiment/") and n.count("/") > 3]
        tasks = ROOT / "src" / "ctxlab" / "lm_eval_tasks"  # lm-eval's task files and their module
        for path in [*tasks.glob("*.yaml"), *tasks.glob("*.py")]:
            assert z.read(f"ctxlab/lm_eval_tasks/{path.name}") == path.read_bytes(), path.name
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    assert set(EXTRAS) <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    for extra, package in EXTRAS.items():
        assert any(r.startswith(package) and f'extra == "{extra}"' in r for r in requires), (extra, requires)

    # Imported from the unpacked wheel, with no source tree around it: the packaged configs.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    monkeypatch.delenv("CTXLAB_CFG", raising=False)
    fake_module(monkeypatch, site)
    assert options.config_dir() == site / "ctxlab" / "cfg"
    assert cli.config_dir() == str(site / "ctxlab" / "cfg")

    # A real install into a fresh venv whose dependencies are this interpreter's site-packages.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    (purelib,) = {Path(p) for p in venv.glob("lib/python*/site-packages")}
    (purelib / "ctxlab-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps",
        wheel, cwd=tmp_path)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(
        venv / "bin" / "python", "-c", "import ctxlab.options as o; print(o.config_dir())", cwd=elsewhere
    )
    assert Path(where.stdout.strip()) == purelib / "ctxlab" / "cfg"
    job = run(venv / "bin" / "ctxlab", "--cfg", "job", "experiment=quickstart", cwd=elsewhere)
    assert "name: quickstart" in job.stdout
    run(venv / "bin" / "ctxlab", "trainer.max_steps=2", "trainer.val_check_interval=1",
        "trainer.limit_val_batches=1", "logger=csv", "eval.perplexity.lengths=[64]",
        "eval.passkey.enabled=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=elsewhere)  # fmt: skip
    assert (tmp_path / "run" / "results").is_dir()
    assert not list(elsewhere.iterdir())  # nothing written to the working directory
