"""Composition-time checks: combinations the code cannot honour fail here, naming the settings,
before any data is read or any weight is built.

An option's own settings apply to the options that have them. A setting given for config group
G (by an experiment or on the command line) that the chosen option of G does not have, but
another option of G does, is dropped for this job and recorded in ``not_applied``; a setting no
option of G has is an error (:func:`scope_options`). An option "has" the settings its file
declares (``ctxlab.options.declared_keys``) and the named parameters of its ``_target_``.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ctxlab import options


class ConfigError(ValueError):
    """A composed configuration that cannot work; the message names the settings."""


def _target(node) -> str:
    return str(node.get("_target_", "")) if node is not None else ""


def choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for ``group``: the Hydra app's choice when its target is the node's (a
    study arm composed inside the app has its own), else the options with the node's target."""
    target = _target(cfg.get(group))
    try:
        from hydra.core.hydra_config import HydraConfig

        name = str(HydraConfig.get().runtime.choices[group])
        if _target(options.option_node(group, name)) == target:
            return name
    except Exception:
        pass
    try:
        names = [n for n in options.option_names(group) if _target(options.option_node(group, n)) == target]
    except ValueError:
        names = []
    return "/".join(names) or target.rsplit(".", 1)[-1] or "?"


# Hydra's own keys in a node it instantiates.
INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# Nodes built by calling their _target_ with their keys: every key must be one of its parameters.
TARGET_NODES = ("attention", "position", "model", "data", "trainer", "eval.perplexity", "eval.passkey")
# `G.key...=value` on the command line: a setting of config group G (group choices have no dot).
_SETTING = re.compile(r"(?P<group>\w+)\.(?P<key>[^.=\[\]@\s]+)[^=]*=")


@cache
def target_parameters(target: str) -> frozenset[str] | None:
    """The keyword parameters of ``target`` (a class's ``__init__`` or dataclass fields, or a
    function); None when it takes ``**kwargs``, so that any key may be meant for it."""
    from hydra.utils import get_object

    params = inspect.signature(get_object(target)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _named_parameters(target: str) -> frozenset[str]:
    """What a target's signature tells about the settings it takes: nothing for ``**kwargs``, no
    target, or one that cannot be imported here (:func:`check_targets` reports that one)."""
    if not target:
        return frozenset()
    try:
        return target_parameters(target) or frozenset()
    except Exception:
        return frozenset()


def _is_global(path) -> bool:
    """An option file whose header places it at the root (``# @package _global_``)."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return False
        if re.match(r"#\s*@package\s+_global_", line):
            return True
    return False


@cache
def _scoped_groups(root: str) -> tuple[str, ...]:
    return tuple(
        g for g in options.groups() if not any(_is_global(p) for p in (Path(root) / g).glob("*.yaml"))
    )


def scoped_groups() -> tuple[str, ...]:
    """The config groups whose option is the node of the group's name (``attention``, ...), not
    those whose options patch the whole config (``launcher``, ``experiment``)."""
    return _scoped_groups(str(options.config_dir()))


@cache
def _option_settings(root: str, group: str, name: str) -> frozenset[str]:
    return frozenset(options.declared_keys(group, name)) | _named_parameters(
        _target(options.option_node(group, name))
    )


def option_settings(group: str, name: str) -> frozenset[str]:
    """The settings option ``name`` of ``group`` has: the keys its file declares and the named
    parameters of its ``_target_``."""
    return _option_settings(str(options.config_dir()), group, name)


def _holders(group: str, key: str) -> list[str]:
    return [name for name in options.option_names(group) if key in option_settings(group, name)]


def _unknown_setting(group: str, key: str) -> str:
    declared = {
        name: sorted(k for k in options.declared_keys(group, name) if not k.startswith("_"))
        for name in options.option_names(group)
    }
    known = set().union(*(option_settings(group, name) for name in declared))
    close = difflib.get_close_matches(key, sorted(k for k in known if not k.startswith("_")), n=1)
    hint = f" (did you mean {group}.{close[0]}?)" if close else ""
    by_keys: dict[tuple[str, ...], list[str]] = {}
    for name, keys in declared.items():
        by_keys.setdefault(tuple(keys), []).append(name)
    listing = "; ".join(f"{', '.join(names)}: {', '.join(keys) or '-'}" for keys, names in by_keys.items())
    targets = sorted(
        {
            _target(options.option_node(group, name))
            for name in declared
            if option_settings(group, name) - set(options.declared_keys(group, name))
        }
    )
    also = f", and any parameter of {', '.join(targets)}" if targets else ""
    return (
        f"{group}.{key}: no option of {group} has a setting {key}{hint}; their settings are {listing}{also}"
    )


def _not_applied_line(group: str, name: str, holders: Mapping[str, list[str]]) -> str:
    by_holders: dict[tuple[str, ...], list[str]] = {}
    for key, names in holders.items():
        by_holders.setdefault(tuple(names), []).append(key)
    parts = [f"{', '.join(keys)} (settings of {', '.join(names)})" for names, keys in by_holders.items()]
    return f"{group}={name} has no setting {'; '.join(parts)}; not applied"


def scope_options(cfg: DictConfig, choices: Mapping, say: Callable[[str], None] | None = None) -> DictConfig:
    """Apply each group's settings only where the chosen option has them (the module docstring's
    rule), in place: a setting of group G that ``choices[G]`` lacks but another option of G has is
    removed and recorded in ``cfg.not_applied`` (``{"G.key": value}``; ``say`` gets one line per
    group); one that no option of G has raises ``ConfigError`` naming it and the options'
    settings. Nested settings are judged by their top-level key. Returns ``cfg``."""
    dropped: dict[str, object] = {}
    for group in scoped_groups():
        name, node = choices.get(group), cfg.get(group)
        if name is None or not isinstance(node, DictConfig):
            continue
        try:
            own = options.declared_keys(group, str(name))
        except ValueError:  # an option from another config source: nothing to compare with
            continue
        if all(key in own for key in node):
            continue
        own |= _named_parameters(_target(node))  # imports the target: only when needed
        holders = {str(key): _holders(group, str(key)) for key in node if key not in own}
        if not holders:
            continue
        unknown = [key for key, names in holders.items() if not names]
        if unknown:
            raise ConfigError(_unknown_setting(group, unknown[0]))
        raw = OmegaConf.to_container(node, resolve=False)
        assert isinstance(raw, dict)
        with read_write(node), open_dict(node):
            for key in holders:
                dropped[f"{group}.{key}"] = raw[key]
                del node[key]
        if say is not None:
            say(_not_applied_line(group, str(name), holders))
    before = cfg.get("not_applied")
    previous = OmegaConf.to_container(before, resolve=False) if isinstance(before, DictConfig) else {}
    assert isinstance(previous, dict)
    with read_write(cfg), open_dict(cfg):
        cfg.not_applied = {**previous, **dropped}
    return cfg


def swept_keys(overrides: Iterable[str]) -> set[str]:
    """The keys, as written, that the experiments named in ``overrides`` sweep (their
    ``hydra.sweeper.params``)."""
    keys: set[str] = set()
    for override in overrides:
        m = re.fullmatch(r"\+{0,2}experiment=(.+)", override)
        for name in re.split(r"[\s,()]+", m[1]) if m else []:
            path = options.config_dir() / "experiment" / f"{name}.yaml"
            if name and path.is_file():
                keys |= set(OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params") or {})
    return keys


def force_add_settings(overrides: Iterable[str], plain: Collection[str] = ()) -> list[str]:
    """``overrides`` with each plain setting ``G.key=value`` of a config group G that some option of
    G does not declare written as a force-add, ``++G.key=value``: Hydra refuses a plain override of
    a key the chosen option lacks before :func:`scope_options` can apply ctxlab's rule. Left as
    they are: ``+``, ``++`` and ``~`` overrides, group choices, other keys, settings every option
    declares, and the keys in ``plain`` (a command line passes the keys its experiment sweeps:
    Hydra's sweepers match a command-line override to ``hydra.sweeper.params`` by its key as
    written, and the command line's value must still replace the sweep's)."""
    groups = set(scoped_groups())
    out = []
    for override in overrides:
        m = _SETTING.match(override)
        if (
            m
            and m["group"] in groups
            and override.split("=", 1)[0] not in plain
            and not all(
                m["key"] in options.declared_keys(m["group"], n) for n in options.option_names(m["group"])
            )
        ):
            override = f"++{override}"
        out.append(override)
    return out


def compose_job(
    overrides: Iterable[str], say: Callable[[str], None] | None = None, *, return_hydra_config: bool = False
) -> DictConfig:
    """A job's config through Hydra's compose API (inside the app, or an ``initialize_config_dir``
    block): ``overrides`` through :func:`force_add_settings`, composed, scoped by
    :func:`scope_options` with the composition's own choices; without the ``hydra`` node unless
    ``return_hydra_config``."""
    from hydra import compose

    cfg = compose(config_name="config", overrides=force_add_settings(overrides), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    assert isinstance(choices, dict)
    if not return_hydra_config:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    return scope_options(cfg, choices, say)


def _collides(cli_key: str, arm_key: str, groups: set[str]) -> bool:
    if arm_key == cli_key or arm_key.startswith(f"{cli_key}."):
        return True  # the arm sets what the command line sets, or a part of it
    # The arm sets a whole node the command line sets a part of; an arm's group choice does not
    # collide with a command-line setting of that group (the setting applies to the arm's option).
    return cli_key.startswith(f"{arm_key}.") and arm_key not in groups


def check_study_overrides(command_line: Iterable[str], arms: Mapping[str, Iterable[str]]) -> None:
    """A command-line override applies to every arm of a study, or is refused here: raise
    ``ConfigError`` naming each command-line override that an arm also sets (a group choice
    ``G=option`` collides with an arm's ``G=...`` or any ``G.*`` setting, a setting ``G.key=value``
    with the arm's ``G.key``), the arms and their colliding overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    groups = set(options.groups())
    arm_keys = {
        name: [(o.key_or_group, str(o.input_line)) for o in parser.parse_overrides(list(ovs))]
        for name, ovs in arms.items()
    }
    problems = []
    for override in parser.parse_overrides(list(command_line)):
        hits = []
        for name, keys in arm_keys.items():
            clash = [
                line.removeprefix("++") for key, line in keys if _collides(override.key_or_group, key, groups)
            ]
            if clash:
                hits.append(f"{name} ({', '.join(clash)})")
        if hits:
            problems.append(
                f"{str(override.input_line).removeprefix('++')} collides with study arms {', '.join(hits)}"
            )
    if problems:
        raise ConfigError(
            "; ".join(problems) + ". A command-line setting applies to every arm of a study or is "
            "refused: remove it from the command line, or change the arms (study.arms)"
        )


def check_targets(cfg: DictConfig) -> None:
    """Every key of a node built from its ``_target_`` (``TARGET_NODES``) is a parameter of the
    target, unless it takes ``**kwargs``: a clear error now instead of a TypeError at build time."""
    for path in TARGET_NODES:
        node = OmegaConf.select(cfg, path)
        target = _target(node) if isinstance(node, DictConfig) else ""
        if not target:
            continue
        try:
            accepted = target_parameters(target)
        except Exception as e:
            raise ConfigError(f"{path}._target_={target} cannot be imported: {e}") from e
        if accepted is None:
            continue
        bad = [key for key in node if key not in accepted and key not in INSTANTIATE_KEYS]
        if bad:
            where = f"{path}={choice(cfg, path)}" if path in scoped_groups() else path
            raise ConfigError(
                f"{path}.{bad[0]} is not a setting of {where}: {target} takes {', '.join(sorted(accepted))}"
            )


def attention_core(cfg: DictConfig):
    """One core of ``cfg.attention`` (cheap: cores hold no weights), its settings validated;
    ``ConfigError`` naming the setting otherwise."""
    from hydra.utils import instantiate

    from ctxlab.attention.base import check_core

    try:
        return check_core(instantiate(cfg.attention)())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"attention={choice(cfg, 'attention')}: {e}") from e


def _applies_positions(name: str) -> bool:
    from hydra.utils import get_object

    return bool(
        getattr(get_object(_target(options.option_node("attention", name))), "applies_positions", False)
    )


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for any combination that cannot work."""
    from hydra.utils import get_object

    check_targets(cfg)
    core = attention_core(cfg)
    if get_object(_target(cfg.position)).applies_in_attention and not core.applies_positions:
        able = [n for n in options.option_names("attention") if _applies_positions(n)]
        raise ConfigError(
            f"position={choice(cfg, 'position')} is applied inside attention, which "
            f"attention={choice(cfg, 'attention')} cannot do; use attention={' or '.join(able)}"
        )
    seq_len = int(cfg.data.seq_len)
    if cfg.phase.fit:
        try:
            core.check_training_length(seq_len)
        except ValueError as e:
            raise ConfigError(f"attention={choice(cfg, 'attention')} at data.seq_len={seq_len}: {e}") from e
    own_model = cfg.model.get("kind") != "hf"  # an HF model brings pre-trained weights
    if own_model and not cfg.phase.fit and not cfg.phase.get("checkpoint"):
        raise ConfigError("phase=extrapolate evaluates trained weights: set phase.checkpoint=<path to .ckpt>")
    if own_model and cfg.phase.name == "finetune" and not cfg.phase.get("init_from"):
        raise ConfigError("phase=finetune starts from trained weights: set phase.init_from=<path to .ckpt>")
    if cfg.logger.kind not in ("wandb", "csv"):
        raise ConfigError(f"logger.kind must be wandb or csv, got {cfg.logger.kind!r}")
    if cfg.trainer.get("max_steps", -1) in (None, 0):
        raise ConfigError("trainer.max_steps must be > 0 (or -1 with max_epochs)")
    study = cfg.get("study")
    if study is not None:
        arms = study.get("arms")
        if not arms:
            raise ConfigError("study.arms must name at least one arm (name: [overrides])")
        for name, overrides in arms.items():
            if not OmegaConf.is_list(overrides):
                raise ConfigError(f"study.arms.{name} must be a list of overrides, got {overrides!r}")


def check_numbers(cfg: DictConfig) -> None:
    """Settings that must be whole numbers, named when they are not (``data.seq_len=abc``)
    before anything computes with them."""
    wanted = {"data.seq_len": 1, "data.batch_size": 1}
    if OmegaConf.select(cfg, "data.eval_batch_size") is not None:
        wanted["data.eval_batch_size"] = 1
    for key, minimum in wanted.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < -1:
        raise ConfigError(f"trainer.max_steps={steps!r} must be an integer > 0 (or -1 with max_epochs)")


def _smollm2_dir() -> str:
    from ctxlab.model.hf_sources import smollm2_checkpoint

    return str(smollm2_checkpoint())


def _gpus_per_node(accelerator: str, devices):
    """GPUs a SLURM task array asks for per node: the trainer's devices on a GPU trainer, none on
    a CPU one (a CPU-only cluster rejects --gpus-per-node)."""
    if str(accelerator) not in ("gpu", "cuda"):
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"launcher=slurm with a GPU trainer needs an int trainer.devices, got {devices!r}")
    return devices


def _steps_or_null(value):
    """A step interval for a callback: the whole number of ``value``, or None for none (null, 0, or
    a fraction of an epoch such as ``trainer.val_check_interval=0.5``)."""
    return int(value or 0) or None


def _times(a, b):
    return int(a) * int(b)


for _name, _fn in (("ctxlab.steps_or_null", _steps_or_null), ("ctxlab.times", _times)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)

if not OmegaConf.has_resolver("ctxlab.gpus_per_node"):
    OmegaConf.register_new_resolver("ctxlab.gpus_per_node", _gpus_per_node)

# `${ctxlab.smollm2_dir:}`: the packaged SmolLM2 converted once to a checkpoint folder (with its
# tokenizer), resolved only when a config that names it is used.
if not OmegaConf.has_resolver("ctxlab.smollm2_dir"):
    OmegaConf.register_new_resolver("ctxlab.smollm2_dir", _smollm2_dir, use_cache=True)
