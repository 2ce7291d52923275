"""Reports: learning curves, confusion matrices, the most confused classes, the top losses and plain-text
tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from .._format import format_table  # noqa: F401  (the plain-text tables live without matplotlib)
from .metrics import Metrics

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(metrics: Metrics, path: str | Path, title: str = "featcache training") -> Path:
    """Train loss per step and validation accuracy per epoch vs examples seen (accuracy on a second axis,
    scaled to the accuracies shown), the best epoch marked.

    Example:
        >>> plot_curves(load_run("run").metrics, "run/curves.png")  # doctest: +SKIP
    """
    fig = curves_figure(metrics, title)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def curves_figure(metrics: Metrics, title: str = "featcache training") -> Any:
    """The figure :func:`plot_curves` saves (a matplotlib ``Figure``) of a run that trained by epochs."""
    if metrics.history is None or metrics.examples_per_epoch is None:
        raise ValueError("curves need a run that trained by epochs: these metrics hold no history")
    # a loss or score that was not finite is None in the metrics: a gap in the curve, as NaN draws it
    history = [{k: np.nan if v is None else v for k, v in h.items()} for h in metrics.history]
    per_epoch = metrics.examples_per_epoch
    steps = [np.nan if s is None else s for s in metrics.step_losses or ()]
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
    best = metrics.best_epoch
    if best:
        ax.axvline(best * per_epoch, color="grey", ls=":", lw=1.2, label=f"best epoch ({best})")
    ax.set_xlabel("examples seen")
    task = metrics.task
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
        test = metrics.test.score(key) if metrics.test is not None else None
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


def most_confused(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], min_count: int = 1
) -> list[dict[str, Any]]:
    """The (true, predicted) class pairs the model confuses, most often first, as fastai's
    ``ClassificationInterpretation.most_confused(min_val)``: every off-diagonal cell of the confusion
    matrix (true class in rows) with at least ``min_count`` images; ties in class order.

    Example:
        >>> pairs = most_confused([[5, 2, 0], [0, 6, 1], [3, 0, 4]], ["cat", "dog", "fox"])
        >>> [(p["true"], p["predicted"], p["count"]) for p in pairs]
        [('fox', 'cat', 3), ('cat', 'dog', 2), ('dog', 'fox', 1)]
    """
    cells = [
        (-int(n), i, j)
        for i, row in enumerate(confusion)
        for j, n in enumerate(row)
        if i != j and int(n) >= min_count
    ]
    return [{"true": classes[i], "predicted": classes[j], "count": -n} for n, i, j in sorted(cells)]


def _shown(name: str, width: int = 16) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _tail(name: str, width: int) -> str:
    """The end of an id (a path's file name matters most)."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def plot_top_losses(
    rows: Sequence[dict[str, Any]],
    load: Any,
    path: str | Path,
    total: int | None = None,
    k: int = 16,
) -> Path:
    """fastai's ``plot_top_losses``: the ``k`` misclassified images with the highest loss in a grid, each
    titled with its true class, the predicted class with its probability, and the probability the model
    gave the true class.

    Args:
        rows: ``misclassified.csv``'s rows, highest loss first (``id``, ``true``, ``predicted``,
            ``p_predicted``, ``p_true``, ``loss``, ``split``).
        load: ``load(id)`` -> a PIL image, read through the dataset's own loader.
        path: the PNG to write.
        total: how many images of the split were misclassified (default: ``len(rows)``).
        k: at most this many images.

    Example:
        >>> plot_top_losses(rows, lambda i: samples.load(index[i]), "top_losses.png")  # doctest: +SKIP
    """
    shown = list(rows[:k])
    cols = min(4, max(1, len(shown)))
    lines = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(lines, cols, figsize=(2.6 * cols, 3.3 * lines + 0.6), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        try:
            img = load(r["id"])
            grey = img.mode in ("L", "I", "I;16", "F", "1")
            pixels = np.asarray(img.convert("L" if grey else "RGB"))
            small = max(pixels.shape[:2]) < 64  # digits at 8 px: blocks, not a blur
            smooth = "nearest" if small else "antialiased"
            ax.imshow(pixels, cmap="gray" if grey else None, interpolation=smooth)
        except (OSError, ValueError, KeyError) as exc:  # gone or changed since: the others still show
            ax.text(0.5, 0.5, f"cannot read\n{type(exc).__name__}", ha="center", va="center", fontsize=8)
        title = (
            f"true {_shown(str(r['true']), 24)}\n"
            f"pred {_shown(str(r['predicted']), 24)} ({float(r['p_predicted']):.2f})\n"
            f"p(true) {float(r['p_true']):.2f}, loss {float(r['loss']):.2f}\n"
            f"{_tail(str(r['id']), 34)}"
        )
        ax.set_title(title, fontsize=8, loc="left")
    split = shown[0]["split"] if shown else "test"
    n = total if total is not None else len(rows)
    height = fig.get_size_inches()[1]
    fig.suptitle(
        f"top losses: {len(shown)} of {n} misclassified {split} images, highest loss first\n"
        "each: true class, predicted class (its probability), probability of the true class and loss, id",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / height))  # room for the two-line title above the grid
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
