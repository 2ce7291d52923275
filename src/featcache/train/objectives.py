"""What a head learns for each task: its loss, its metrics, and the metric that chooses on val.

* ``classify``: softmax cross-entropy; accuracy (:func:`featcache.train.fit.evaluate`).
* ``multilabel``: a sigmoid per class with binary cross-entropy (``pos_weight balanced``: each class's
  positives weigh as much as its negatives); mean average precision over the classes (macro, the
  classes with a positive in the split) and over all decisions (micro), each class's AP, and F1 at a
  probability threshold chosen on val.
* ``regress``: mean squared error or Huber loss on targets standardised with the training split's
  mean and deviation (the head's :class:`~featcache.train.heads.TargetScale` undoes it on output);
  MAE, RMSE, R² (scikit-learn's ``r2_score``, averaged over targets) and Pearson's r.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._util import FeatcacheError, unknown

LOSSES = {"classify": ("cross-entropy",), "multilabel": ("bce",), "regress": ("mse", "huber")}
#: the metric each task chooses on (higher is better), as ``val_<metric>`` in a history row
METRIC = {"classify": "acc", "multilabel": "map", "regress": "r2"}
#: the metrics a ``--metric`` may name per task (higher is better for all of them)
METRICS = {
    "classify": ("acc", "balanced-acc"),
    "multilabel": ("map", "map-micro", "f1"),
    "regress": ("r2", "pearson"),
}


def loss_name(task: str, loss: str | None) -> str:
    """The loss a task trains with: ``loss`` when it suits the task, else the task's first.

    Example:
        >>> loss_name("regress", None), loss_name("regress", "huber")
        ('mse', 'huber')
    """
    if loss is None:
        return LOSSES[task][0]
    if loss not in LOSSES[task]:
        raise unknown(
            f"loss for task {task}", loss, LOSSES[task], f"Use --loss {'|'.join(LOSSES[task])} (or auto)."
        )
    return loss


def metric_key(task: str, metric: str | None) -> str:
    """The metrics key a ``--metric`` names for ``task`` (None: the task's own), checked.

    Example:
        >>> metric_key("multilabel", None), metric_key("classify", "balanced-acc")
        ('map', 'balanced_acc')
    """
    if metric is None or metric == "auto":
        return METRIC[task]
    if metric not in METRICS[task]:
        raise unknown(
            f"metric for task {task}", metric, METRICS[task], f"Use --metric {'|'.join(METRICS[task])}."
        )
    return metric.replace("-", "_")


def pos_weights(y: torch.Tensor, mode: str | None) -> torch.Tensor | None:
    """``balanced``: negatives / positives per class on the training split (1 for a class without
    positives); None for none.

    Example:
        >>> pos_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), "balanced").tolist()
        [3.0, 1.0]
    """
    if mode is None or mode == "none":
        return None
    pos = y.float().sum(0)
    return torch.where(pos > 0, (len(y) - pos) / pos.clamp_min(1), torch.ones_like(pos))


def make_loss(
    task: str, loss: str | None, pos_weight: torch.Tensor | None = None
) -> Callable[..., torch.Tensor]:
    """``fn(outputs, y)``: the batch's mean loss for a multi-label or regression head (outputs float32).

    Example:
        >>> make_loss("regress", "mse")(torch.zeros(2, 1), torch.ones(2, 1)).item()
        1.0
    """
    name = loss_name(task, loss)
    if name == "bce":
        return lambda out, y: F.binary_cross_entropy_with_logits(out, y, pos_weight=pos_weight)
    if name == "huber":
        return lambda out, y: F.huber_loss(out, y)
    if name == "mse":
        return lambda out, y: F.mse_loss(out, y)
    raise FeatcacheError(f"no loss function {name!r} for task {task}")  # cross-entropy lives in fit


def best_threshold(probs: np.ndarray, y: np.ndarray) -> float:
    """The probability threshold with the best micro F1 on these rows (val), from 0.05 to 0.95.

    Example:
        >>> best_threshold(np.array([[0.9, 0.2], [0.6, 0.7]]), np.array([[1, 0], [1, 1]]))
        0.55
    """
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    scores = [_f1(probs >= t, y > 0.5) for t in grid]
    return float(grid[int(np.argmax(scores))])


def _f1(pred: np.ndarray, true: np.ndarray) -> float:
    tp = float((pred & true).sum())
    return 2 * tp / max(1.0, float(pred.sum() + true.sum()))


def multilabel_metrics(logits: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """mAP (macro over the classes with a positive, and micro), each class's AP (None without a
    positive), F1 (micro and macro) and exact-set accuracy at ``threshold`` on the probabilities.

    Example:
        >>> m = multilabel_metrics(np.array([[2.0, -1.0], [-2.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
        >>> m["map"], m["f1"]
        (1.0, 1.0)
    """
    from sklearn.metrics import average_precision_score, f1_score

    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    true = np.asarray(y > 0.5)
    present = np.asarray(true.any(0))
    per = [
        float(average_precision_score(true[:, k], probs[:, k])) if present[k] else None
        for k in range(y.shape[1])
    ]
    pred = probs >= threshold
    out: dict[str, Any] = {
        "map": float(np.mean([a for a in per if a is not None])) if present.any() else float("nan"),
        "map_micro": float(average_precision_score(true.ravel(), probs.ravel()))
        if present.any()
        else float("nan"),
        "per_label_ap": per,
        "threshold": threshold,
        "f1": float(f1_score(true, pred, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(true, pred, average="macro", zero_division=0)),
        "exact_acc": float((pred == true).all(1).mean()) if len(y) else 0.0,
        "n": len(y),
    }
    return out


def regress_metrics(pred: np.ndarray, y: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
    """MAE, RMSE, R² (scikit-learn's, averaged over targets), Pearson's r (mean over targets), and each
    target's.

    Example:
        >>> m = regress_metrics(np.array([[1.0], [2.0], [3.5]]), np.array([[1.0], [2.0], [3.0]]))
        >>> round(m["mae"], 4), round(m["r2"], 4)
        (0.1667, 0.875)
    """
    from sklearn.metrics import r2_score

    pred, y = pred.astype(np.float64), y.astype(np.float64)
    err = pred - y
    per_r = [_pearson(pred[:, k], y[:, k]) for k in range(y.shape[1])]
    per_r2 = [float(r2_score(y[:, k], pred[:, k])) if len(y) > 1 else float("nan") for k in range(y.shape[1])]
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": float(np.mean(per_r2)),
        "pearson": float(np.mean(per_r)),
        "per_target": {
            name: {"mae": float(np.abs(err[:, k]).mean()), "r2": per_r2[k], "pearson": per_r[k]}
            for k, name in enumerate(names or [str(k) for k in range(y.shape[1])])
        },
        "n": len(y),
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
