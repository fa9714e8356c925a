"""The extrapolation grid of a trained model: evaluation attentions, the inference scale, results.

``evaluate`` runs, for each evaluation attention of ``eval.attention`` in turn:

1. the causality audit of the model as it will be evaluated;
2. perplexity against context length on the test split, only where that evaluation is causal
   (a model whose outputs depend on later tokens has no valid language-model perplexity, so
   none is computed or reported for it);
3. passkey retrieval.

``eval.attention`` lists what the trained weights are evaluated with: ``trained`` (the attention
they were fit with) and/or attention options by name (``dense``, ``ms_causal``, ...). An option
named there takes the trained attention's settings that it also has (an MS model evaluated with
``ms_causal`` keeps its region, budget and merge), then its own file's values for the rest.
The paper fine-tunes with MS attention and evaluates with dense attention; ``[dense, ms_causal]``
measures both. The first entry writes ``results/``, each further one ``results/eval_<name>/``,
each with its own ``summary.json`` naming its ``eval_attention``.

``eval.scale_search`` chooses a scheme's inference scale (CRD NTK's ``scale_inf``, a training-free
NTK ``scale``) on the **validation** split, never the test split: validation perplexity at one
context length for each candidate, with the first causal evaluation attention; the lowest wins
and is used for every evaluation; every candidate's perplexity is recorded.

Each finished grid cell (a perplexity window, a passkey trial) is kept in the evaluation's
``cells.jsonl`` as it completes (``ctxlab.eval.cells``), under a fingerprint of the weights and
every evaluation setting, so a crashed or pre-empted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ctxlab import distributed
from ctxlab.runfiles import atomic_write

TRAINED = "trained"


def say(msg: str) -> None:
    if distributed.is_rank_zero():
        print(f"[ctxlab] {msg}", flush=True)


def eval_attention_names(cfg: DictConfig) -> list[str]:
    """``eval.attention`` as a list of names (a single name is a list of one)."""
    names = cfg.eval.get("attention", None) or [TRAINED]
    names = [str(names)] if isinstance(names, str) else [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.attention lists an attention twice: {names}")
    return names


def attention_node(cfg: DictConfig, name: str) -> DictConfig:
    """The config of evaluation attention ``name``: the option's own file, with the trained
    attention's values for the settings both have (``_target_`` and ``_partial_`` stay the
    option's). ValueError naming ``eval.attention`` for an unknown option."""
    from ctxlab.options import option_names, option_node

    if name == TRAINED:
        return cfg.attention
    if name not in option_names("attention"):
        raise ValueError(
            f"eval.attention: {name!r} is neither 'trained' nor an attention option "
            f"({', '.join(option_names('attention'))})"
        )
    node = option_node("attention", name)
    trained = OmegaConf.to_container(cfg.attention, resolve=True)
    for key in node:
        if key in trained and key not in ("_target_", "_partial_") and not key.startswith("select"):
            node[key] = trained[key]
    return node


def check_eval_attentions(cfg: DictConfig) -> None:
    """Build every evaluation attention once (cheap: cores hold no weights), so a bad entry fails
    before any training."""
    from hydra.utils import instantiate

    for name in eval_attention_names(cfg):
        try:
            instantiate(attention_node(cfg, name))()
        except (ValueError, TypeError) as e:
            raise ValueError(f"eval.attention={name}: {e}") from e


def join_documents(docs: list[torch.Tensor], eos_id: int, min_tokens: int) -> list[torch.Tensor]:
    """The documents joined, shortest first, with ``eos_id`` between them, into streams of at
    least ``min_tokens`` tokens; a last stream that stays shorter is dropped, unless it is the
    only one (a split shorter than ``min_tokens`` makes one stream of everything).

    Shortest first puts the longest document at the end of a stream, so the tokens a
    fixed-target perplexity scores (a stream's last ones) lie deep inside one real document and
    see as much of it as the context length allows before other documents come into view."""
    streams, parts, n = [], [], 0
    eos = torch.tensor([eos_id], dtype=torch.long)
    for d in sorted(docs, key=len):
        parts += [eos, d.long()] if parts else [d.long()]
        n += len(d) + (1 if n else 0)
        if n >= min_tokens:
            streams.append(torch.cat(parts))
            parts, n = [], 0
    if not streams and parts:  # the whole split is shorter than min_tokens: one stream of it all
        streams.append(torch.cat(parts))
    return streams


def test_documents(dm, cfg: DictConfig, split: str = "test") -> list[torch.Tensor]:
    docs = dm.eval_documents(split)
    join = int(cfg.eval.get("join_documents", 0) or 0)
    if join:
        docs = join_documents(docs, int(dm.tokenizer.eos_id), join)
    return docs


def search_eval_scale(model, dm, cfg: DictConfig, device) -> dict | None:
    """Choose the position scheme's inference scale on the validation split (module docstring)."""
    from ctxlab.eval.perplexity import PerplexityConfig, perplexity_grid

    search = cfg.eval.get("scale_search")
    if not search or not search.get("candidates"):
        return None
    position = model.position
    if position.eval_scale_setting is None:
        say(f"eval.scale_search: position={position.name} has no inference scale; skipped")
        return None
    pcfg = PerplexityConfig(
        lengths=[int(search.length)], stride=float(search.get("stride", 0.5)),
        max_tokens=int(search.max_tokens), chunk_size=int(cfg.eval.perplexity.chunk_size),
    )  # fmt: skip
    docs = test_documents(dm, cfg, "validation")
    if not any(len(d) > pcfg.lengths[0] for d in docs):
        raise ValueError(
            f"eval.scale_search.length={pcfg.lengths[0]}: no validation document is that long "
            f"(longest {max((len(d) for d in docs), default=0)} tokens); lower it or set eval.join_documents"
        )
    rows = []
    for c in [float(x) for x in search.candidates]:
        set_eval_scale(model, c)
        r = perplexity_grid(model, docs, pcfg, device=device, progress=False)[0]
        rows.append({"scale": c, "val_ppl": r.ppl, "n_tokens": r.n_tokens, "n_docs": r.n_docs})
        say(
            f"scale search: {position.eval_scale_setting}={c:g} -> "
            f"validation ppl@{pcfg.lengths[0]} {r.ppl:.3f}"
        )
    best = min(rows, key=lambda r: r["val_ppl"])
    set_eval_scale(model, best["scale"])
    say(f"scale search: chose {position.eval_scale_setting}={best['scale']:g} (validation split)")
    return {"setting": f"position.{position.eval_scale_setting}", "length": pcfg.lengths[0],
            "split": "validation", "candidates": rows, "chosen": best["scale"]}  # fmt: skip


def set_eval_scale(model, scale: float) -> None:
    model.position.set_eval_scale(scale)
    for core in model.cores:  # cores that apply positions themselves take the new tables
        core.configure_position(model.position)
    refresh = getattr(model, "refresh_rope_config", None)
    if refresh is not None:
        refresh()


def fingerprint(cfg: DictConfig, model, weights_id: str, eval_name: str) -> dict:
    """What an evaluation's cells depend on: the weights, the evaluated attention and positions,
    the grid and the data."""
    return {
        "weights": weights_id,
        "eval_attention": eval_name,
        "attention": model.cores[0].describe(),
        "position": model.position.describe(),
        "eval_scale": model.position.eval_scale,
        "grid": grid_settings(cfg),
        "data": {
            k: cfg.data.get(k) for k in ("source", "tokenizer", "seed", "val_fraction", "test_fraction")
        },
    }


def grid_settings(cfg: DictConfig) -> dict:
    """The evaluation settings a single cell's value depends on: not which lengths the grid
    lists (a grid extended to longer lengths keeps its finished cells), nor the scale search
    (its outcome, the scale, is fingerprinted on its own)."""
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    for part in ("perplexity", "passkey"):
        for key in ("lengths", "enabled"):
            ev.get(part, {}).pop(key, None)
    # niah: its cells' keys hold all its settings (and its grid came after cells were first kept)
    for key in ("attention", "scale_search", "causality", "niah"):
        ev.pop(key, None)
    return ev


def weights_id(path: Path | None) -> str:
    """A short identity of a weights file or folder (sizes and modification times)."""
    if path is None:
        return "pretrained"
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def results_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "results" if index == 0 else run_dir / "results" / f"eval_{name}"


def evaluate(model, dm, cfg: DictConfig, run_dir: Path, loggers, extra: dict, weights: Path | None) -> dict:
    """Every evaluation of ``eval.attention`` (module docstring); returns the first one's summary,
    with ``evaluations`` naming every summary written."""
    from hydra.utils import instantiate

    from ctxlab.build import device_of

    device = device_of(cfg)
    model = model.to(device).eval()
    names = eval_attention_names(cfg)
    trained_cores = model.cores
    factories = {n: (None if n == TRAINED else instantiate(attention_node(cfg, n))) for n in names}
    scale = None
    first_causal = next((n for n in names if _declared_causal(factories[n], trained_cores)), None)
    if first_causal is not None and cfg.eval.get("scale_search") and cfg.eval.scale_search.get("candidates"):
        _use(model, factories[first_causal], trained_cores)
        scale = search_eval_scale(model, dm, cfg, device)
    elif cfg.eval.get("scale_search") and cfg.eval.scale_search.get("candidates"):
        say("eval.scale_search: no causal evaluation attention in eval.attention; scale not searched")
    summaries = {}
    wid = weights_id(weights)
    for i, name in enumerate(names):
        _use(model, factories[name], trained_cores)
        out = results_dir(run_dir, i, name)
        ev = dict(extra)
        if scale is not None:
            ev["scale_search"] = scale
        say(f"evaluation {i + 1}/{len(names)}: eval.attention={name} ({model.cores[0].describe()})")
        summaries[name] = evaluate_one(
            model, dm, cfg, out, loggers, ev, name, fingerprint(cfg, model, wid, name)
        )
    _use(model, None, trained_cores)
    first = summaries[names[0]]
    first["evaluations"] = {
        n: str(results_dir(run_dir, i, n).relative_to(run_dir)) for i, n in enumerate(names)
    }
    if distributed.is_rank_zero():
        atomic_write(run_dir / "results" / "summary.json", json.dumps(first, indent=2))
    return first


def _declared_causal(factory, trained_cores) -> bool:
    core = factory() if factory is not None else trained_cores[0]
    return core.causal


def _use(model, factory, trained_cores) -> None:
    """Evaluate with cores from ``factory``, or (None) with the trained cores again."""
    if factory is None:
        cores = iter(trained_cores)
        factory = cores.__next__
    model.set_attention(factory)


def evaluate_one(model, dm, cfg, out: Path, loggers, extra: dict, eval_name: str, fp: dict) -> dict:
    """One evaluation: causality audit, perplexity (causal evaluations only), passkey; every
    finished cell kept in ``out/cells.jsonl`` under the fingerprint ``fp``."""
    from ctxlab.eval.cells import CellStore

    writes = distributed.is_rank_zero()
    plots = out.parent / "plots" if out.name == "results" else out / "plots"  # the run's own: <run>/plots
    tag = "" if out.name == "results" else f"/{eval_name}"
    summary = {
        "name": str(cfg.name),
        "eval_attention": eval_name,
        "attention": model.cores[0].describe(),
        "position": model.position.describe(),
        "eval_scale": model.position.eval_scale,
        "train_length": int(cfg.data.seq_len),
        **extra,
    }
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    with CellStore(out / "cells.jsonl", fp) as store:
        return _grid(model, dm, cfg, out, loggers, summary, eval_name, store, tag, plots, writes)


def _grid(model, dm, cfg, out: Path, loggers, summary: dict, eval_name: str, store, tag: str, plots: Path,
          writes: bool) -> dict:  # fmt: skip
    from ctxlab.build import device_of, eval_configs
    from ctxlab.eval.causality import causality_audit
    from ctxlab.eval.passkey import accuracy_matrix, passkey_by_length, passkey_grid
    from ctxlab.eval.perplexity import perplexity_grid
    from ctxlab.eval.plots import plot_passkey, plot_passkey_by_length, plot_perplexity
    from ctxlab.loggers import write_rows

    ppl_cfg, pk_cfg = eval_configs(cfg)
    device = device_of(cfg)
    causal = None
    if cfg.eval.causality.enabled:
        rep = causality_audit(model, n_cuts=int(cfg.eval.causality.n_cuts), device=device)
        causal = rep.causal
        summary["causality"] = rep.as_dict()
        if writes:
            atomic_write(out / "causality.json", json.dumps(rep.as_dict(), indent=2))
        if rep.causal != rep.declared_causal:
            say(f"WARNING: the causality audit found causal={rep.causal}, but the configuration declares "
                f"{rep.declared_causal}")  # fmt: skip
    declared = all(c.causal for c in model.cores)
    summary["causal"] = causal if causal is not None else declared
    if ppl_cfg.enabled and summary["causal"]:
        docs = test_documents(dm, cfg)
        results = perplexity_grid(model, docs, ppl_cfg, device=device, store=store)
        rows = [r.as_row() | {"causal": causal} for r in results]
        summary["perplexity"] = rows
        if writes:  # per-block NLLs: paired comparisons between models scored on the same tokens
            atomic_write(out / "perplexity_blocks.json", json.dumps([r.as_blocks() for r in results]))
        summary["perplexity_protocol"] = {
            "protocol": ppl_cfg.protocol, "targets": ppl_cfg.targets,
            "documents": len(docs), "tokens": [len(d) for d in docs],
        }  # fmt: skip
        if writes:
            write_rows(out / "perplexity", rows)
            loggers.table(f"eval{tag}/perplexity", rows)
            img = plot_perplexity(
                {str(cfg.name): rows}, plots / "perplexity.png", train_length=int(cfg.data.seq_len)
            )
            loggers.image(f"eval{tag}/perplexity_plot", img)
        for r in rows:
            lo, hi = r.get("ppl_lo", float("nan")), r.get("ppl_hi", float("nan"))
            say(f"ppl @ {r['length']:>7}: {r['ppl']:10.3f} [{lo:.3f}, {hi:.3f}]  "
                f"({r['n_docs']} docs, {r['n_tokens']} tokens)")  # fmt: skip
    elif ppl_cfg.enabled:
        summary["perplexity_skipped"] = "not causal: no valid language-model perplexity"
        say(f"perplexity not computed for eval.attention={eval_name}: the model is not causal")
    if pk_cfg.enabled:
        rows = passkey_grid(model, dm.tokenizer, pk_cfg, device=device, store=store)
        summary["passkey"] = rows
        summary["passkey_by_length"] = passkey_by_length(rows)
        if writes:
            write_rows(out / "passkey", rows)
            loggers.table(f"eval{tag}/passkey", rows)
            img = plot_passkey({str(cfg.name): accuracy_matrix(rows)}, plots / "passkey.png")
            loggers.image(f"eval{tag}/passkey_heatmap", img)
            plot_passkey_by_length(
                {str(cfg.name): summary["passkey_by_length"]}, plots / "passkey_by_length.png",
                train_length=int(cfg.data.seq_len),
            )  # fmt: skip
        for r in summary["passkey_by_length"]:
            say(f"passkey @ {r['length']:>7}: {r['correct']}/{r['trials']} = {r['accuracy']:.2f} "
                f"[{r['lo']:.2f}, {r['hi']:.2f}]")  # fmt: skip
    if cfg.eval.get("niah") is not None and cfg.eval.niah.enabled:
        from ctxlab.eval.niah import evaluate_niah

        evaluate_niah(model, dm.tokenizer, cfg, out, loggers, summary, store, tag, writes)
    if writes:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        loggers.summary(summary, prefix="" if not tag else f"{eval_name}/")
    return summary
