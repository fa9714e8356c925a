"""A run's trained weights as small files: what a fit changed, nothing else.

A fine-tune of a pre-trained model changes only its trainable parameters (LoRA+: the adapters,
the norms and the embeddings); ``save_trainable`` writes exactly those, by parameter name, as
safetensors in the run's ``weights/`` folder, so an arm of a study can be kept, moved between
machines and re-evaluated without its multi-GB Lightning checkpoint. Parameters are split by
size into ``trainable.safetensors`` (each tensor under ``SMALL_NUMEL`` elements: adapters,
norms) and ``trainable_large.safetensors`` (embeddings), since the small file is what fits
where space is scarce; ``load_trainable`` needs both when both were written.

``meta.json`` beside them records the step, the parameter names and shapes and the settings
the weights were trained with (model, attention, position), which ``load_trainable`` checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ctxlab.loggers import say
from ctxlab.provenance import trained_settings

SMALL_NUMEL = 1 << 20
FILES = {"small": "trainable.safetensors", "large": "trainable_large.safetensors"}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (a tied parameter once), detached, contiguous, on the CPU."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().to("cpu").contiguous()
    return out


def save_trainable(model: nn.Module, folder: str | Path, meta: dict) -> Path:
    """Write the trainable parameters of ``model`` and ``meta`` into ``folder`` (atomically per
    file: written under a temporary name, then renamed; a failed write removes it and raises
    ``ctxlab.runfiles.RunWriteError`` naming the file)."""
    from safetensors.torch import save_file

    from ctxlab.runfiles import atomic_write, is_write_failure, write_error

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    if not state:
        raise ValueError("the model has no trainable parameters to save")
    parts = {
        "small": {k: v for k, v in state.items() if v.numel() < SMALL_NUMEL},
        "large": {k: v for k, v in state.items() if v.numel() >= SMALL_NUMEL},
    }
    written = {}
    for part, tensors in parts.items():
        if tensors:
            path = folder / FILES[part]
            tmp = path.with_name(path.name + ".tmp")
            try:
                save_file(tensors, str(tmp))
                tmp.replace(path)
            except Exception as e:
                tmp.unlink(missing_ok=True)
                if is_write_failure(e):
                    raise write_error(path, e) from e
                raise
            written[part] = FILES[part]
    info = {
        **meta,
        "files": written,
        "parameters": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in state.items()},
    }  # fmt: skip
    atomic_write(folder / "meta.json", json.dumps(info, indent=2))
    return folder


def is_weights_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "meta.json").is_file()


def read_meta(folder: str | Path) -> dict:
    meta_file = Path(folder) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} holds no meta.json: not a ctxlab weights folder")
    return json.loads(meta_file.read_text())


def load_trainable(model: nn.Module, folder: str | Path, setting: str) -> dict:
    """Load a ``save_trainable`` folder into ``model`` (built as the weights' run built it);
    returns its meta. Raises, naming ``setting``, for a missing file or a parameter whose name
    or shape differs, before changing any weight."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    state: dict[str, torch.Tensor] = {}
    for part, name in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{setting}: {path} is missing ({part} parameters: "
                f"{sum(1 for v in meta['parameters'].values() if v)} listed in meta.json); "
                "copy it from the machine that trained the run, or retrain the arm"
            )
        state.update(load_file(str(path)))
    params = dict(model.named_parameters())
    missing = sorted(k for k in state if k not in params)
    if missing:
        raise ValueError(f"{setting}: {folder} has parameters the model lacks: {missing[:5]}")
    bad = [
        f"{k} {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(params[k].shape)
    ]
    if bad:
        raise ValueError(f"{setting}: {folder} does not match the model: {bad[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(dtype=params[k].dtype))
    return meta


def read_checkpoint(path: Path, setting: str) -> dict:
    """``torch.load`` of a checkpoint file, with an error naming ``setting`` for a file that is
    not one (a truncated copy, a text file) instead of torch's unpickling error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(
            f"{setting}: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "a truncated copy or another kind of file? Give the path of a complete .ckpt file or of "
            "a run's weights/ folder"
        ) from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{setting}: {path} holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


def load_weights(model, path: str | os.PathLike, setting: str) -> dict:
    """Load a ctxlab checkpoint's model weights, refusing one made for a different model."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{setting}: no checkpoint file at {p}")
    ckpt = read_checkpoint(p, setting)
    meta = ckpt.get("ctxlab")
    if meta is None or "state_dict" not in ckpt:
        raise ValueError(f"{setting}: {p} is not a ctxlab checkpoint (no ctxlab metadata)")
    saved, current = meta["model"], model.config.to_dict()
    ignore = {"gradient_checkpointing"}
    diff = {
        k: (saved.get(k), current.get(k))
        for k in current
        if k not in ignore and saved.get(k) != current.get(k)
    }
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ValueError(f"{setting}: {p} was trained with a different model ({details})")
    # Rotary tables are derived from the position config, not learned: never load them.
    state = {
        k[len("model.") :]: v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.") and not k.startswith("model.position.")
    }
    own = {k for k in model.state_dict() if not k.startswith("position.")}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        raise ValueError(
            f"{setting}: {p} does not match the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(state, strict=False)
    return ckpt


def save_run_weights(model, folder: Path, cfg: DictConfig, extra: dict) -> None:
    """The fit's trainable parameters (``ctxlab.weights``) with what they were trained with."""
    meta = {"steps": extra.get("steps"), "name": str(cfg.name), **trained_settings(cfg, model)}
    save_trainable(model, folder, meta)
    say(f"trained weights: {folder}")


def load_any_weights(model, path: Path, setting: str) -> dict:
    """A Lightning checkpoint file (``load_weights``) or a ``weights/`` folder of a finished run
    (``ctxlab.weights``); a run directory means its ``weights/``. Returns what the weights
    record about their training (``trained_settings``; empty where they record nothing)."""
    if path.is_dir() and not is_weights_dir(path) and is_weights_dir(path / "weights"):
        path = path / "weights"
    if path.is_dir():
        if not is_weights_dir(path):
            raise FileNotFoundError(f"{setting}: {path} is neither a checkpoint file nor a weights folder")
        try:
            meta = load_trainable(model, path, setting)
        except json.JSONDecodeError as e:
            raise ValueError(f"{setting}: {path / 'meta.json'} is not valid JSON ({e})") from e
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:  # a damaged safetensors file
            why = f"{type(e).__name__}: {e}"
            raise ValueError(f"{setting}: {path} is not a readable weights folder ({why})") from e
        say(f"loaded {setting} {path} (trained {meta.get('steps')} steps)")
        return meta
    return load_weights(model, path, setting).get("ctxlab") or {}


def weights_complete(folder: Path) -> bool:
    """A ``weights/`` folder with every file its ``meta.json`` lists (a copy that left its large
    file behind on the training machine is not: that arm is trained again)."""
    if not (folder / "meta.json").exists():
        return False
    return all((folder / f).is_file() for f in read_meta(folder).get("files", {}).values())
