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
    task = metrics.get("task", "classify")
    ax.set_ylabel({"multilabel": "binary cross-entropy", "regress": "loss (standardised targets)"}.get(
        task, "cross-entropy loss"))  # fmt: skip
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    key, name = next(
        (
            (k, n)
            for k, n in (("acc", "accuracy"), ("map", "mAP"), ("r2", "R²"))
            if history and f"val_{k}" in history[0]
        ),
        (None, ""),
    )
    if key is not None:
        ax2 = ax.twinx()
        values = [h[f"val_{key}"] for h in history]
        ax2.plot(ex, values, color="tab:green", marker="s", ms=3, label=f"val {name}")
        test = metrics.get("test", {}).get(key)
        if test is not None:
            ax2.axhline(test, color="tab:red", ls="--", lw=1, label=f"test {name} {test:.3f}")
        ax2.set_ylabel(name)
        shown = values + ([test] if test is not None else [])
        lo, hi = min(shown), max(shown)
        pad = max(0.02, 0.1 * (hi - lo))  # the scores' own range: 0.95 vs 0.97 stays visible
        ax2.set_ylim(lo - pad if key == "r2" else max(0.0, lo - pad), min(1.0, hi + pad) + 0.005)
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
    metric: str = "acc",
) -> Path:
    """Validation (solid) and test (dashed) ``metric`` (accuracy; mAP, R², ...) per layer, a line per
    setting of the swept ``axes``; the ``best`` row (the one chosen on validation) circled.

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
        val = [by_layer[n][f"val_{metric}"] for n in layers]
        ax.plot(x, val, marker="o", color=color, label=f"val{label}")
        if all(f"test_{metric}" in r for r in by_layer.values()):
            test = [by_layer[n][f"test_{metric}"] for n in layers]
            ax.plot(x, test, ls="--", marker=".", color=color, alpha=0.6, label=f"test{label}")
    ax.scatter([layers.index(best["layer"])], [best[f"val_{metric}"]], s=180, facecolors="none",
               edgecolors="black", label="chosen on val")  # fmt: skip
    ax.set_xticks(x, list(layers), rotation=30 if len(layers) > 4 else 0, fontsize=8)
    ax.set_ylabel({"acc": "accuracy", "map": "mAP", "r2": "R²"}.get(metric, metric))
    if metric != "r2":
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_label_ap(
    per_label_ap: Sequence[float | None], classes: Sequence[str], path: str | Path, title: str
) -> Path:
    """A bar per label: its average precision on the split (labels without a positive left blank), the
    mean (mAP) as a line.

    Example:
        >>> plot_label_ap([0.9, None, 0.7], ["odd", "big", "round"], "label_ap.png", "test")  # doctest: +SKIP
    """
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(14.0, 3 + 0.4 * n), 4.0), dpi=110)
    values = [a if a is not None else 0.0 for a in per_label_ap]
    ax.bar(range(n), values, color=["tab:blue" if a is not None else "lightgrey" for a in per_label_ap])
    known = [a for a in per_label_ap if a is not None]
    if known:
        ax.axhline(float(np.mean(known)), color="black", ls="--", lw=1, label=f"mAP {np.mean(known):.3f}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(n), [str(c)[:14] for c in classes], rotation=90 if n > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("average precision")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_scatter(
    pred: np.ndarray, true: np.ndarray, names: Sequence[str], path: str | Path, title: str
) -> Path:
    """Predicted against true values, a panel per target, with the identity line and R².

    Example:
        >>> pred, true = np.array([[1.0], [2.1]]), np.array([[1.0], [2.0]])
        >>> plot_scatter(pred, true, ["age"], "scatter.png", "")  # doctest: +SKIP
    """
    k = len(names)
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 4.2), dpi=110, squeeze=False)
    for j, ax in enumerate(axes[0]):
        t, p = true[:, j], pred[:, j]
        ax.scatter(t, p, s=8, alpha=0.5)
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--")
        ss = float(((t - t.mean()) ** 2).sum())
        r2 = 1 - float(((t - p) ** 2).sum()) / ss if ss > 0 else float("nan")
        ax.set_title(f"{names[j]}  (R² {r2:.3f})", fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
