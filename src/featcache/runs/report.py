"""Reports: learning curves, confusion matrices and plain-text tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from .._format import format_table  # noqa: F401  (the plain-text tables live without matplotlib)

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(metrics: dict[str, Any], path: str | Path, title: str = "featcache training") -> Path:
    """Train loss per step and validation accuracy per epoch vs examples seen (accuracy on a second axis,
    scaled to the accuracies shown), the best epoch marked.

    Example:
        >>> plot_curves(json.load(open("run/metrics.json")), "run/curves.png")  # doctest: +SKIP
    """
    fig = curves_figure(metrics, title)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def curves_figure(metrics: dict[str, Any], title: str = "featcache training") -> Any:
    """The figure :func:`plot_curves` saves (a matplotlib ``Figure``)."""
    history = metrics["history"]
    per_epoch = int(metrics["examples_per_epoch"])
    steps = metrics["step_losses"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if steps:
        epochs_done = len(history)
        x = np.linspace(per_epoch * epochs_done / len(steps), per_epoch * epochs_done, len(steps))
        ax.plot(x, steps, color="tab:blue", alpha=0.35, lw=0.8, label="train loss (step)")
    ex = [h["epoch"] * per_epoch for h in history]
    ax.plot(
        ex, [h["train_loss"] for h in history], color="tab:blue", marker="o", ms=3, label="train loss (epoch)"
    )
    if history and "val_loss" in history[0]:
        ax.plot(ex, [h["val_loss"] for h in history], color="tab:orange", marker="o", ms=3, label="val loss")
    best = metrics.get("best_epoch")
    if best:
        ax.axvline(best * per_epoch, color="grey", ls=":", lw=1.2, label=f"best epoch ({best})")
    ax.set_xlabel("examples seen")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if history and "val_acc" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(
            ex, [h["val_acc"] for h in history], color="tab:green", marker="s", ms=3, label="val accuracy"
        )
        test = metrics.get("test", {}).get("acc")
        if test is not None:
            ax2.axhline(test, color="tab:red", ls="--", lw=1, label=f"test accuracy {test:.3f}")
        ax2.set_ylabel("accuracy")
        shown = [h["val_acc"] for h in history] + ([test] if test is not None else [])
        lo, hi = min(shown), max(shown)
        pad = max(0.02, 0.1 * (hi - lo))  # the accuracies' own range: 0.95 vs 0.97 stays visible
        ax2.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) + 0.005)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | Path,
    title: str = "test confusion matrix",
) -> Path:
    """A row-normalised confusion matrix (true class in rows), counts printed when it is small.

    Example:
        >>> plot_confusion([[5, 1], [0, 6]], ["cat", "dog"], "confusion.png")  # doctest: +SKIP
    """
    conf = np.asarray(confusion, dtype=float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(12.0, 3 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), [str(c)[:14] for c in classes], rotation=90 if n > 10 else 0, fontsize=8)
        ax.set_yticks(range(n), [str(c)[:14] for c in classes], fontsize=8)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        str(int(conf[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_sweep(
    rows: Sequence[dict[str, Any]],
    best: dict[str, Any],
    layers: Sequence[str],
    axes: Sequence[str],
    path: str | Path,
    title: str,
) -> Path:
    """Validation (solid) and test (dashed) accuracy per layer, a line per setting of the swept ``axes``;
    the ``best`` row (the one chosen on validation) circled.

    Example:
        >>> rows = json.load(open("runs/sweep/sweep.json"))["rows"]  # doctest: +SKIP
        >>> plot_sweep(rows, rows[0], ["layer3", "penultimate"], ["lr"], "sweep.png", "")  # doctest: +SKIP
    """
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = ", ".join(f"{k}={r[k]:g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in axes)
        groups.setdefault(key, {})[r["layer"]] = r
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(layers) + 3), 4.5), dpi=110)
    x = list(range(len(layers)))
    for i, (key, by_layer) in enumerate(groups.items()):
        color = f"C{i % 10}"
        label = f" ({key})" if key else ""
        ax.plot(x, [by_layer[n]["val_acc"] for n in layers], marker="o", color=color, label=f"val{label}")
        if all("test_acc" in r for r in by_layer.values()):
            test = [by_layer[n]["test_acc"] for n in layers]
            ax.plot(x, test, ls="--", marker=".", color=color, alpha=0.6, label=f"test{label}")
    ax.scatter([layers.index(best["layer"])], [best["val_acc"]], s=180, facecolors="none", edgecolors="black",
               label="chosen on val")  # fmt: skip
    ax.set_xticks(x, list(layers), rotation=30 if len(layers) > 4 else 0, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
