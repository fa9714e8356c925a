"""A ctxlab run as an lm-evaluation-harness model (``--model ctxlab``), and ctxlab's own tasks.

lm-eval 0.4 finds models only in its own registry (no plugin entry point), so the model is
registered when this module is imported. ``ctxlab-lm-eval`` (``python -m ctxlab.lm_eval``)
imports it, adds ctxlab's task folder (``ctxlab/lm_eval_tasks``: NIAH from the shipped books) to
lm-eval's task folders and runs lm-eval's own command line, with all of its flags (plain
``lm_eval --model ctxlab`` cannot find the model: lm-eval 0.4 loads no plugins)::

    ctxlab-lm-eval --model ctxlab --model_args run=outputs/pretrain/2026-11-27_12-00-00,attention=dense \\
        --tasks ctxlab_niah --metadata '{"max_seq_lengths": [1024, 2048]}' --limit 20

``--model_args`` (``CtxlabLM``'s arguments):

- ``run``: a ctxlab run directory (its ``config.yaml`` says how to build the model: ctxlab's own
  decoder or an HF model with ctxlab attention and positions), or a transformers folder
  (``ctxlab-export``'s output: its ``rope_parameters`` choose the position scheme, see
  :func:`exported_config`); required.
- ``weights``: what to load: a ``weights/`` folder or a Lightning checkpoint file (default: the
  run's ``weights/``, else its ``checkpoints/last.ckpt``; an HF run with neither evaluates the
  pre-trained model).
- ``attention``: ``trained`` (default) or an attention option by name (``dense``, ``ms_causal``):
  ``eval.attention``'s rule (``ctxlab.evaluation.attention_node``).
- ``eval_scale``: the position scheme's inference scale (CRD NTK's ``scale_inf``, NTK's
  ``scale``): a number, or ``auto`` for the one the run's scale search chose (its
  ``results/summary.json``); default: the configured one.
- ``chunk_size``: prefill through the KV cache in chunks of this many tokens (0: one pass).
- ``max_length``: the longest input given to the model: contexts are cut from the left to fit
  it, as lm-eval's HF model does. Default: no cut for ``loglikelihood`` and ``generate_until``
  (long contexts are the point), the run's training length for ``loglikelihood_rolling``'s windows.
- ``max_gen_toks``: tokens generated when a task does not say (default 256).
- ``tokenizer``: a ctxlab tokenizer spec replacing the run's ``data.tokenizer`` (a run moved to
  another machine whose ``hf:<folder>`` is elsewhere).
- ``device``: ``cuda`` or ``cpu`` (default: ``cuda`` when there is one); lm-eval's ``--device``.
- any ``group.key=value``: a setting of the run's config changed before the model is built
  (``position.scale_inf=64``, ``model.dtype=bfloat16``).

The Python entry is :func:`evaluate` (or ``CtxlabLM`` with ``lm_eval.simple_evaluate``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ctxlab.extras import require

require("lmeval", why="ctxlab's lm-eval model (ctxlab.lm_eval, ctxlab-lm-eval)")

import lm_eval.models  # noqa: E402,F401  (fills lm-eval's registry first: an empty one is refilled lazily)
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# Arguments lm-eval passes to every model (CLI flags); ctxlab scores one request at a time.
HARNESS_ARGS = ("batch_size", "max_batch_size")


# transformers' rope_type -> the ctxlab position option that rotates the same way
ROPE_OPTIONS = {"default": "rope", "linear": "pi", "yarn": "yarn", "dynamic": "dynamic_ntk"}
YARN_KEYS = {"beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
             "mscale_all_dim": "mscale_all_dim", "attention_factor": "attention_factor"}  # fmt: skip


def exported_config(folder: Path):
    """A ctxlab config for a transformers checkpoint folder (``ctxlab-export``'s output, or any
    Llama/Mistral folder with its tokenizer): ``model=hf`` from the folder, the position option
    of its ``rope_parameters``, dense attention, its tokenizer; ``data.seq_len`` is its window."""
    from hydra import initialize_config_dir

    from ctxlab.cli import config_dir
    from ctxlab.config import compose_job

    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_OPTIONS:
        raise ValueError(
            f"run={folder}: rope_type={kind!r} has no ctxlab position scheme ({', '.join(ROPE_OPTIONS)})"
        )
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    window = int(config.get("max_position_embeddings") or 2048)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    overrides = [
        "model=hf", f"model.source={folder}", f"model.head_dim={head_dim}", "model.dtype=float32",
        "model.lora_rank=0", "model.gradient_checkpointing=false", "attention=dense",
        f"position={ROPE_OPTIONS[kind]}", f"position.base={theta}", f"data.tokenizer=hf:{folder}",
        f"data.vocab_size={config['vocab_size']}", f"data.seq_len={window}", "name=export",
        f"run_dir={folder}", "logger=csv",
    ]  # fmt: skip
    if kind != "default":
        overrides.append(f"position.scale={float(rope['factor'])}")
    if kind in ("yarn", "dynamic"):
        original = rope.get("original_max_position_embeddings") or window
        overrides.append(f"position.original_max_position={int(original)}")
    if kind == "yarn":
        overrides += [
            f"position.{ours}={rope[k]}" for k, ours in YARN_KEYS.items() if rope.get(k) is not None
        ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="lm_eval"):
        return compose_job(overrides)


def run_config(run: str | Path, overrides: dict | None = None):
    """The resolved config a ctxlab run wrote (``config.yaml``), or the one
    :func:`exported_config` makes for a transformers folder, with ``group.key`` overrides."""
    from omegaconf import OmegaConf, open_dict

    import ctxlab.config  # noqa: F401  (ctxlab's resolvers, for configs with unresolved parts)

    path = Path(run) / "config.yaml"
    if path.is_file():
        cfg = OmegaConf.load(path)
    elif (Path(run) / "config.json").is_file():
        cfg = exported_config(Path(run).resolve())
    else:
        raise FileNotFoundError(
            f"run={run}: no config.yaml (a ctxlab run) nor config.json (an exported model) there"
        )
    for key, value in (overrides or {}).items():
        if OmegaConf.select(cfg, key.rsplit(".", 1)[0]) is None:
            raise ValueError(f"{key}={value!r}: the run's config has no {key.rsplit('.', 1)[0]}")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def run_tokenizer(cfg, spec: str | None = None):
    """The run's tokenizer (``data.tokenizer``, or ``spec``). An HF run of the packaged SmolLM2
    whose recorded tokenizer folder is not on this machine takes the one its model loads from."""
    from ctxlab.data.tokenizers import build_tokenizer

    spec = spec or str(cfg.data.tokenizer)
    if spec.startswith("hf:") and not Path(spec[3:].partition("::")[0]).exists():
        if cfg.model.get("kind") == "hf" and cfg.model.get("source") == "smollm2":
            from ctxlab.model.hf_sources import smollm2_checkpoint

            spec = f"hf:{smollm2_checkpoint(cfg.model.get('cache_dir'))}"
        else:
            raise FileNotFoundError(
                f"the run's data.tokenizer={spec} is not on this machine; "
                "pass tokenizer=<spec> in --model_args"
            )
    return build_tokenizer(spec)


def default_weights(run: Path, cfg) -> Path | None:
    """The run's ``weights/`` (a copy missing a file it lists fails when loaded, naming it), else
    its ``checkpoints/last.ckpt``; None (the pre-trained model) for an HF run with neither and
    for an exported folder (its weights are the model's own)."""
    if not (run / "config.yaml").is_file():
        return None
    if (run / "weights" / "meta.json").is_file():
        return run / "weights"
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    if cfg.model.get("kind") == "hf":
        log.warning("ctxlab model: %s holds no trained weights: evaluating the pre-trained model", run)
        return None
    raise FileNotFoundError(
        f"run={run}: no weights/ folder nor checkpoints/last.ckpt; a ctxlab decoder needs its trained "
        "weights (pass weights=<folder or .ckpt>)"
    )


def chosen_scale(run: Path) -> float:
    summary = run / "results" / "summary.json"
    found = json.loads(summary.read_text()).get("scale_search") if summary.is_file() else None
    if not found:
        raise ValueError(f"eval_scale=auto: {summary} records no scale search (eval.scale_search)")
    return float(found["chosen"])


def load_model(run: str | Path, *, weights=None, attention: str = "trained", eval_scale=None,
               device: str | torch.device = "cpu", overrides: dict | None = None):  # fmt: skip
    """(config, model in eval mode on ``device``) of a ctxlab run: built from its config, its
    trained weights loaded (checked against the settings they record), the evaluation attention
    and the inference scale applied."""
    from hydra.utils import instantiate

    from ctxlab.build import build_model
    from ctxlab.evaluation import TRAINED, attention_node, set_eval_scale
    from ctxlab.weights import load_any_weights

    run = Path(run)
    cfg = run_config(run, overrides)
    model = build_model(cfg)
    path = Path(weights) if weights else default_weights(run, cfg)
    if path is not None:
        load_any_weights(model, path, "weights")
    if attention != TRAINED:
        try:
            model.set_attention(instantiate(attention_node(cfg, str(attention))))
        except ValueError as e:
            raise ValueError(f"attention={attention}: {e}") from e
    if eval_scale is not None:
        if model.position.eval_scale_setting is None:
            raise ValueError(
                f"eval_scale={eval_scale}: position={model.position.name} has no inference scale"
            )
        set_eval_scale(model, chosen_scale(run) if eval_scale == "auto" else float(eval_scale))
    return cfg, model.to(device).eval()


@torch.no_grad()
def hidden_of(model, ids: torch.Tensor, keep: int, chunk_size: int = 0, cache=None) -> torch.Tensor:
    """Final hidden states of the last ``keep`` positions of ``ids`` ``[1, L]``, prefilled
    through ``cache`` in chunks of ``chunk_size`` tokens (0: one pass): ``[1, keep, E]``."""
    L = ids.shape[1]
    if not chunk_size or chunk_size >= L:
        return model.hidden(ids, cache=cache)[:, L - keep :]
    cache = cache if cache is not None else model.new_cache()
    parts = []
    for s in range(0, L, chunk_size):
        h = model.hidden(ids[:, s : s + chunk_size], cache=cache)
        wanted = (s + h.shape[1]) - (L - keep)  # positions of this chunk among the last `keep`
        if wanted > 0:
            parts.append(h[:, h.shape[1] - min(wanted, h.shape[1]) :])
    return torch.cat(parts, dim=1)


@torch.no_grad()
def greedy_stream(model, ids: torch.Tensor, chunk_size: int = 0) -> Iterator[int]:
    """Greedy tokens after ``ids`` ``[1, P]``, one at a time, through a KV cache (the prompt
    prefilled in chunks of ``chunk_size``); the caller stops when it has enough."""
    cache = model.new_cache()
    h = hidden_of(model, ids, 1, chunk_size, cache=cache)
    while True:
        nxt = model.lm_head(h[:, -1]).argmax(-1, keepdim=True)  # [1, 1]
        yield int(nxt)
        h = model.hidden(nxt, cache=cache)


class CtxlabLM(TemplateLM):
    """A ctxlab run as an lm-eval model (the module docstring lists the arguments)."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CtxlabLM:
        """``--model_args`` win over lm-eval's own flags (``--device``, ``--batch_size``)."""
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(harness | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CtxlabLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(self, run: str | None = None, weights: str | None = None, attention: str = "trained",
                 eval_scale=None, chunk_size: int = 0, max_length: int | None = None, max_gen_toks: int = 256,
                 tokenizer: str | None = None, device: str | None = None, **settings) -> None:  # fmt: skip
        super().__init__()
        if not run:
            raise ValueError(
                "the ctxlab model needs run=<ctxlab run directory or exported folder> in --model_args"
            )
        for name in HARNESS_ARGS:
            value = settings.pop(name, None)
            if name == "batch_size" and value not in (None, 1, "1", "auto"):
                log.warning("ctxlab model: batch_size=%s: requests are scored one at a time", value)
        unknown = [k for k in settings if "." not in k]
        if unknown:
            raise TypeError(
                f"--model_args {unknown}: not arguments of the ctxlab model (run, weights, attention, "
                "eval_scale, chunk_size, max_length, max_gen_toks, tokenizer, device, or group.key=value)"
            )
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line defaults to --device cuda:0
                log.warning("ctxlab model: device=%s but no CUDA device here: running on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg, self.model = load_model(
            run,
            weights=weights,
            attention=str(attention),
            eval_scale=eval_scale,
            device=device,
            overrides=settings,
        )
        self.tokenizer = run_tokenizer(self.cfg, tokenizer)
        self._device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self.max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.run = str(run)

    @classmethod
    def from_model(cls, model, tokenizer, *, cfg=None, chunk_size: int = 0, max_length: int | None = None,
                   max_gen_toks: int = 256) -> CtxlabLM:  # fmt: skip
        """An lm-eval model around an already built ctxlab model (tests, notebooks)."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self.cfg, self.model, self.tokenizer = cfg, model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.chunk_size, self.max_length, self.max_gen_toks = chunk_size, max_length, max_gen_toks
        self.run = "<in memory>"
        return self

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def rolling_window(self) -> int:
        if self.max_length:
            return self.max_length
        if self.cfg is None:
            raise ValueError("loglikelihood_rolling needs max_length (a model without a run config)")
        return int(self.cfg.data.seq_len)

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of ``continuation`` after ``context`` and whether greedy decoding
        gives it; the input is cut from the left to ``max_length`` when that is set."""
        if not continuation:
            return 0.0, True
        whole = context + continuation
        if self.max_length and len(whole) - 1 > self.max_length:
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}"
                )
            whole = whole[-(self.max_length + 1) :]
        ids = torch.tensor([whole[:-1]], device=self._device)
        n = len(continuation)
        logits = self.model.lm_head(hidden_of(self.model, ids, n, self.chunk_size)).float()[0]  # [n, V]
        target = torch.tensor(continuation, device=self._device)
        logp = -F.cross_entropy(logits, target, reduction="sum")
        return float(logp), bool((logits.argmax(-1) == target).all())

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in tqdm(requests, disable=disable_tqdm, desc="ctxlab loglikelihood"):
            res = self.score(context, continuation)
            self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        window = self.rolling_window()
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="ctxlab loglikelihood_rolling"):
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=window,
                context_len=1,
            )  # fmt: skip
            total = sum(self.score(*make_disjoint_window(w))[0] for w in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="ctxlab generate_until"):
            context, gen_kwargs = req.args
            text = self.generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def generate(self, context: str, gen_kwargs: dict) -> str:
        """Greedy continuation of ``context`` up to ``max_gen_toks`` tokens, the end-of-text
        token or the first of ``until``'s strings (not included)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        n_max = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
            raise ValueError("the ctxlab model decodes greedily: do_sample=false, temperature=0")
        if int(kwargs.pop("num_beams", 1)) != 1:
            raise ValueError("the ctxlab model decodes greedily: num_beams=1")
        if kwargs:  # sampling settings (top_p, top_k, ...) mean nothing to greedy decoding
            log.info("ctxlab model: generation settings %s do not apply to greedy decoding", sorted(kwargs))
        if n_max < 1:
            return ""
        ids = self.tok_encode(context) or [self.prefix_token_id]
        if self.max_length and len(ids) + n_max > self.max_length:
            ids = ids[-max(1, self.max_length - n_max) :]
        new: list[int] = []
        text = ""
        for tok in greedy_stream(self.model, torch.tensor([ids], device=self._device), self.chunk_size):
            if tok == self.eot_token_id:
                break
            new.append(tok)
            text = self.tok_decode(new)
            if len(new) >= n_max or any(s and s in text for s in until):
                break  # before the stream computes another token
        cut = min([text.index(s) for s in until if s and s in text], default=len(text))
        return text[:cut]

    def get_model_info(self) -> dict:
        return {
            "ctxlab_run": self.run,
            "attention": self.model.cores[0].describe(),
            "position": self.model.position.describe(),
            "eval_scale": self.model.position.eval_scale,
            "chunk_size": self.chunk_size,
            "max_length": self.max_length,
        }


# By name, not by the class: `python -m ctxlab.lm_eval` runs this file as __main__ and the
# registry (which refuses a second, different object under one name) loads ctxlab.lm_eval itself.
model_registry.register("ctxlab", target="ctxlab.lm_eval:CtxlabLM")


def task_manager(metadata: dict | None = None, *, include_defaults: bool = True):
    """lm-eval's TaskManager with ctxlab's tasks (``TASKS_DIR``) beside lm-eval's own."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=metadata or {}
    )


def evaluate(run: str | Path, tasks: list[str], *, metadata: dict | None = None, limit: float | None = None,
             log_samples: bool = False, include_defaults: bool = True, **model_args) -> dict:  # fmt: skip
    """lm-eval's ``simple_evaluate`` on a ctxlab run: ``model_args`` are ``CtxlabLM``'s, and
    reach the tasks' dataset builders too (as on lm-eval's command line); ``metadata`` adds task
    settings (``{"max_seq_lengths": [1024], "trials": 8}`` for the NIAH tasks)."""
    from lm_eval import simple_evaluate

    args = {"run": str(run), **model_args}
    lm = CtxlabLM(**args)
    manager = task_manager({**args, **(metadata or {})}, include_defaults=include_defaults)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples)


def include_ctxlab_tasks() -> None:
    """Make every lm-eval TaskManager built from now on also scan ``TASKS_DIR`` (lm-eval's
    command line takes one ``--include_path``; this keeps the user's and adds ctxlab's)."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "ctxlab_tasks", False):
        return

    class TaskManager(base):  # type: ignore[misc,valid-type]
        ctxlab_tasks = True

        def __init__(self, *args, include_path=None, **kwargs) -> None:
            paths = list(include_path) if isinstance(include_path, list | tuple) else [include_path]
            super().__init__(*args, include_path=[*[p for p in paths if p], str(TASKS_DIR)], **kwargs)

    lm_eval.tasks.TaskManager = TaskManager


def main(argv: list[str] | None = None) -> None:
    """``ctxlab-lm-eval``: lm-eval's command line (``lm_eval``'s flags and subcommands) with
    ``--model ctxlab`` registered and ctxlab's tasks beside lm-eval's."""
    from lm_eval.__main__ import cli_evaluate

    include_ctxlab_tasks()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except (FileNotFoundError, ValueError) as e:  # a run that is not one, a bad model argument: named
        sys.exit(f"ctxlab-lm-eval: error: {e}")


if __name__ == "__main__":
    main()
