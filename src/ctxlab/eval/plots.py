"""Result figures (PNG): perplexity against context length, passkey accuracy heat maps and passkey
accuracy against length."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


def _axes(n_series: int):
    """A figure whose lines stay distinguishable: past 10 series, 20 colours and a second
    marker/line-style cycle (a study compares a dozen evaluations)."""
    from cycler import cycler

    fig, ax = plt.subplots(figsize=(7, 4.5) if n_series <= 10 else (9, 5.5))
    n = max(1, n_series)
    colors = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
    markers = ["o"] if n <= 10 else ["o", "s", "^", "D", "v", "P", "X"]
    ax.set_prop_cycle(cycler(color=[colors[i % len(colors)] for i in range(n)])
                      + cycler(marker=[markers[i % len(markers)] for i in range(n)]))  # fmt: skip
    return fig, ax


def _finish(fig, ax, path: Path, train_length: int | None, title: str, xlabel: str, ylabel: str) -> Path:
    """A curve against length: the training length marked, log2 x axis, labels, grid, legend; saved."""
    if train_length:
        ax.axvline(train_length, color="grey", linestyle=":", label=f"train length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_perplexity(
    series: Mapping[str, Sequence[dict]],
    path: Path,
    *,
    train_length: int | None = None,
    title: str = "Perplexity against context length",
) -> Path:
    """``series``: name -> rows with ``length`` and ``ppl`` (and optional ``causal``); rows that all
    carry ``ppl_lo``/``ppl_hi`` draw their interval as a shaded band."""
    fig, ax = _axes(len(series))
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["length"])
        noncausal = any(r.get("causal") is False for r in rows)
        label = f"{name} (NOT causal)" if noncausal else name
        lengths = [r["length"] for r in rows]
        (line,) = ax.plot(lengths, [r["ppl"] for r in rows],
                          linestyle="--" if noncausal else "-", label=label)  # fmt: skip
        if rows and all("ppl_lo" in r and "ppl_hi" in r for r in rows):
            lo, hi = [r["ppl_lo"] for r in rows], [r["ppl_hi"] for r in rows]
            ax.fill_between(lengths, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    return _finish(fig, ax, path, train_length, title, "context length (tokens)", "perplexity")


def plot_passkey(panels: Mapping[str, tuple[list[int], list[float], list[list[float]]]], path: Path) -> Path:
    """``panels``: name -> (lengths, depths, accuracy[depth][length]); heat maps side by side."""
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    im = None
    for ax, (name, (lengths, depths, acc)) in zip(axes.flat, panels.items(), strict=False):
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("prompt length")
        ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=9)
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.1f}", ha="center", va="center", fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_passkey_by_length(
    series: Mapping[str, Sequence[dict]],
    path: Path,
    *,
    train_length: int | None = None,
    title: str = "Passkey accuracy against prompt length",
) -> Path:
    """``series``: name -> rows of :func:`ctxlab.eval.passkey.passkey_by_length` (``length``,
    ``accuracy``, Wilson ``lo``/``hi``); one line per model with the intervals as error bars."""
    fig, ax = _axes(len(series))
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["length"])
        acc = [r["accuracy"] for r in rows]
        yerr = [[a - r["lo"] for a, r in zip(acc, rows)], [r["hi"] - a for a, r in zip(acc, rows)]]
        ax.errorbar([r["length"] for r in rows], acc, yerr=yerr, capsize=3, label=name)
    ax.set_ylim(-0.05, 1.05)
    return _finish(
        fig, ax, path, train_length, title, "prompt length (tokens)", "accuracy (95% Wilson interval)"
    )
