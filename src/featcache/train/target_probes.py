"""The probe for multi-label and regression sets: the same protocol as the softmax probe.

The L2 strength is chosen on val from a path fitted on train, the chosen model is refitted on
train + val and tested once.

* ``regress``: ridge regression in closed form. One eigendecomposition of the centred Gram matrix
  (features x features, or rows x rows when there are fewer rows) serves every strength of the path:
  ``W(lambda) = V diag(1 / (s + n lambda)) V^T X^T Y``. The strength is lambda on the mean squared error,
  i.e. scikit-learn's ``Ridge(alpha=n * lambda)``. Targets are standardised on train; the head's
  :class:`~featcache.train.heads.TargetScale` puts its outputs back in their units.
* ``multilabel``: a logistic regression per label (sigmoid, mean binary cross-entropy + lambda/2
  |w|^2), every label's problem in one L-BFGS run (the objective is their sum, which separates, so the
  minimiser is each label's own); warm starts along the path. Per label, one L-BFGS run each, is the
  alternative (``joint=False``); ``tests/test_tasks.py`` checks both give the same weights, and
  the README gives the timing of each.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._util import FeatcacheError
from .fit import evaluate
from .heads import Head, HeadInfo, HeadSpec, Standardize, TargetScale, build_head
from .objectives import best_threshold, multilabel_metrics, regress_metrics
from .probe import ProbeResult
from .sources import FeatureSource


def ridge_path(
    x: torch.Tensor, y: torch.Tensor, strengths: list[float]
) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """``{strength: (W (K, F), b (K,))}`` of ridge regression of ``y`` (N, K) on ``x`` (N, F) for each L2
    strength on the mean squared error, from one eigendecomposition (float64).

    Example:
        >>> x, y = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
        >>> w, b = ridge_path(x, y, [0.1])[0.1]
        >>> w.shape, b.shape
        (torch.Size([1, 4]), torch.Size([1]))
    """
    x, y = x.double().flatten(1), y.double()
    n = len(x)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    primal = x.shape[1] <= n  # decompose the smaller Gram matrix
    gram = xc.T @ xc if primal else xc @ xc.T
    s, v = torch.linalg.eigh(gram)
    s = s.clamp_min(0)
    proj = v.T @ (xc.T @ yc if primal else yc)  # (r, K): reused by every strength
    out = {}
    for lam in strengths:
        scaled = proj / (s + n * lam).clamp_min(1e-12)[:, None]
        w = v @ scaled if primal else xc.T @ (v @ scaled)  # (F, K)
        out[lam] = (w.T.contiguous(), ym - xm @ w)
    return out


def sigmoid_path(
    x: torch.Tensor,
    y: torch.Tensor,
    strengths: list[float],
    max_iter: int = 200,
    tol: float = 1e-4,
    joint: bool = True,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[float, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{strength: (W (K, F), b (K,), iterations)}``: L2-regularised logistic regression of each label
    of ``y`` (N, K, 0/1) on ``x``, strongest first, each fit warm-started from the previous; every label
    in one L-BFGS run (``joint``), or one run per label.

    Example:
        >>> x = torch.randn(60, 3, dtype=torch.float64)
        >>> y = torch.stack([(x[:, 0] > 0), (x[:, 1] > 0)], 1).double()
        >>> w, b, _ = sigmoid_path(x, y, [1e-2])[1e-2]
        >>> w.shape
        torch.Size([2, 3])
    """
    x, y = x.double().flatten(1), y.double()
    k, f = y.shape[1], x.shape[1]
    w0 = start[0].double().clone() if start is not None else torch.zeros(k, f, dtype=torch.float64)
    b0 = start[1].double().clone() if start is not None else torch.zeros(k, dtype=torch.float64)
    out: dict[float, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for lam in tqdm(sorted(strengths, reverse=True), desc="probe path", disable=not progress):
        if joint:
            w0, b0, iters = _lbfgs(x, y, lam, w0, b0, max_iter, tol)
        else:
            parts = [
                _lbfgs(x, y[:, j : j + 1], lam, w0[j : j + 1], b0[j : j + 1], max_iter, tol) for j in range(k)
            ]
            w0, b0 = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            iters = sum(p[2] for p in parts)
        out[lam] = (w0.clone(), b0.clone(), iters)
    return out


def _lbfgs(
    x: torch.Tensor, y: torch.Tensor, lam: float, w: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise sum over labels of (mean BCE + lam/2 |w|^2) from (w, b) with L-BFGS (strong Wolfe)."""
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = torch.addmm(b, x, w.T)
        loss = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(x) + lam / 2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    return w.detach(), b.detach(), iters


def _features(train: FeatureSource, val: FeatureSource) -> tuple[torch.Tensor, torch.Tensor]:
    if train.x is None or val.x is None:
        raise FeatcacheError(
            "the probe needs the features in memory; use `featcache train` for caches larger than "
            "--ram-budget-gb"
        )
    return train.x.double().flatten(1), val.x.double().flatten(1)


def _linear_head(
    w: torch.Tensor, b: torch.Tensor, std: Standardize | None, in_shape: tuple[int, ...], k: int
) -> Head:
    """A ``linear`` head holding (w, b), the features' standardisation folded in front."""
    head = build_head(HeadSpec("linear"), in_shape, k, std, seed=0)
    linear = next(m for m in head.body.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight.copy_(w.float())
        linear.bias.copy_(b.float())
    return head.eval()


def _standardizer(x: torch.Tensor, on: bool) -> tuple[Standardize | None, torch.Tensor]:
    std = Standardize.fit(x.float()) if on else None
    return std, (std(x.float()).double() if std is not None else x)


def probe_task(
    task: str,
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    names: list[str],
    config: Any,
    progress: bool = True,
) -> Any:
    """The probe of a ``regress`` or ``multilabel`` set: the path on train, the strength chosen on val
    by ``config``'s metric, refit on train + val, test once; a ProbeResult (:mod:`featcache.train.probe`).

    Example:
        >>> res = probe_task("regress", tr, va, te, ["age"], ProbeConfig())  # doctest: +SKIP
        >>> res.strength, res.test["r2"]  # doctest: +SKIP
    """

    if not len(val):
        raise FeatcacheError("the probe needs a validation split to choose the strength (--val-fraction > 0)")
    x, xv = _features(train, val)
    in_shape, k = tuple(train.row_shape), len(names)
    key = config.score_for(task)
    std, z = _standardizer(x, config.standardize)
    zv = std(xv.float()).double() if std is not None else xv
    t0 = time.perf_counter()
    strengths = sorted(config.strengths, reverse=True)
    sweep, fits = [], {}
    if task == "regress":
        scale = TargetScale.fit(train.y.cpu())
        ys = (train.y.cpu().double() - scale.mean.double()) / scale.std.double()
        for lam, (w, b) in ridge_path(z, ys, strengths).items():
            pred = (zv @ w.T + b) * scale.std.double() + scale.mean.double()
            m = regress_metrics(pred.numpy(), val.y.cpu().numpy())
            fits[lam] = (w, b)
            sweep.append(
                {"strength": lam, "val_loss": m["rmse"] ** 2, "val_r2": m["r2"], "val_pearson": m["pearson"]}
            )
    else:
        path = sigmoid_path(z, train.y.cpu(), strengths, config.max_iter, config.tol, progress=progress)
        for lam in strengths:
            w, b, iters = path[lam]
            logits = (zv @ w.T + b).numpy()
            m = multilabel_metrics(logits, val.y.cpu().numpy())
            fits[lam] = (w, b)
            row = {"strength": lam, "val_loss": _bce(logits, val.y), "val_map": m["map"]}
            sweep.append({**row, "val_map_micro": m["map_micro"], "iterations": iters})
    sweep.sort(key=lambda r: r["strength"])
    best = max(sweep, key=lambda r: (r[f"val_{key}"], -r["val_loss"]))
    lam = best["strength"]
    threshold = None
    if task == "multilabel":  # chosen on val with the train-only model, as the trainer's heads are
        w, b = fits[lam]
        threshold = best_threshold(torch.sigmoid(zv @ w.T + b).numpy(), val.y.cpu().numpy())
    head = refit_probe(
        task, torch.cat([x, xv]), torch.cat([train.y.cpu(), val.y.cpu()]), lam, config, fits[lam]
    )
    info = HeadInfo(HeadSpec("linear"), in_shape, k, config.standardize, task=task, threshold=threshold)
    test_metrics = _test(head, test, info, names) if test is not None else None
    extra = {
        "chosen_on": f"val_{key}",
        "refit_on": "train+val",
        "path_seconds": round(time.perf_counter() - t0, 4),
        "solver": "ridge, one eigendecomposition" if task == "regress" else "L-BFGS, every label jointly",
    }
    return ProbeResult(lam, sweep, test_metrics, head, info, extra)


def _bce(logits: np.ndarray, y: torch.Tensor) -> float:
    return float(F.binary_cross_entropy_with_logits(torch.as_tensor(logits), y.cpu().double()))


def refit_probe(
    task: str,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    config: Any,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Head:
    """The chosen strength refitted on these rows (standardisation refitted too) as a linear head (a
    regression head with its :class:`~featcache.train.heads.TargetScale`).

    Example:
        >>> head = refit_probe("regress", x, y, 1e-3, ProbeConfig())  # doctest: +SKIP
    """
    std, z = _standardizer(x, config.standardize)
    in_shape, k = tuple(x.shape[1:]), y.shape[1]
    if task == "regress":
        scale = TargetScale.fit(y)
        w, b = ridge_path(z, (y.double() - scale.mean.double()) / scale.std.double(), [lam])[lam]
        head = _linear_head(w, b, std, in_shape, k)
        head.target = scale
        return head
    w, b, _ = sigmoid_path(z, y, [lam], config.max_iter, config.tol, start=start)[lam]
    return _linear_head(w, b, std, in_shape, k)


def path_outputs(
    task: str, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, strengths: list[float], config: Any
) -> dict[float, torch.Tensor]:
    """``{strength: outputs on xq}`` of the probe's path fitted on (``x``, ``y``), its standardisation
    fitted on ``x``: a regression's values in the targets' units, a multi-label set's logits (float64).
    :func:`probe_task` chooses on val this way; ``--folds`` on each held-out fold.

    Example:
        >>> out = path_outputs("regress", x, y, x_fold, [1e-3, 1e-1], ProbeConfig())  # doctest: +SKIP
    """
    std, z = _standardizer(x.double().flatten(1), config.standardize)
    xq = xq.double().flatten(1)
    zq = std(xq.float()).double() if std is not None else xq
    if task == "regress":
        scale = TargetScale.fit(y.float())
        mean, sd = scale.mean.double(), scale.std.double()
        path = ridge_path(z, (y.double() - mean) / sd, strengths)
        return {lam: (zq @ w.T + b) * sd + mean for lam, (w, b) in path.items()}
    fits = sigmoid_path(z, y, strengths, config.max_iter, config.tol)
    return {lam: zq @ w.T + b for lam, (w, b, _) in fits.items()}


def _test(head: Head, test: FeatureSource, info: HeadInfo, names: list[str]) -> dict[str, Any]:
    threshold = info.threshold if info.threshold is not None else 0.5
    return evaluate(head, test, info.num_classes, task=info.task, threshold=threshold, names=names)
