"""The linear-probe protocol: L2-regularised logistic regression on cached features.

As in the CLIP paper's linear probes: the regularisation strength is chosen on the validation
split (models fitted on train only), then the model is refitted on train + val with that strength
and evaluated once on test. The test split never influences a choice, and no validation score is
reported for a model that saw the validation split (the leak in CLIP_benchmark issue #125).

The solver is :mod:`featcache.train.logistic`; the ``featcache probe`` job that builds the cache and
writes the run folder is :func:`featcache.runs.probe.probe_run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._util import FeatcacheError
from ..cache.rows import to_torch
from .config import ProbeConfig
from .fit import class_weights, evaluate
from .heads import Head, HeadInfo, HeadSpec, Standardize, build_head
from .logistic import (
    Part,
    RowBlocks,
    SoftmaxRegression,
    Solution,
    StreamedSoftmaxRegression,
    chunk_rows,
    fit_standardize_rows,
    fold,
    small_problem_threads,
)
from .sources import FeatureSource


@dataclass
class ProbeResult:
    """Chosen strength, the path's validation scores, and the refitted head's test metrics."""

    strength: float
    sweep: list[dict[str, float]]
    test: dict[str, Any] | None
    head: Head
    info: HeadInfo
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        key = next((k for k in ("acc", "map", "r2") if k in (self.test or {})), None)
        test = f", test_{key}={self.test[key]:.4g}" if self.test and key else ""
        return f"ProbeResult(strength={self.strength:g}, strengths tried={len(self.sweep)}{test})"


def _problem(
    z: torch.Tensor | RowBlocks,
    y: torch.Tensor,
    num_classes: int,
    config: ProbeConfig,
    ram_budget_gb: float = 8.0,
) -> SoftmaxRegression | StreamedSoftmaxRegression:
    """The rows of one fit or path, prepared once: in memory, full-batch L-BFGS
    (:class:`~featcache.train.logistic.SoftmaxRegression`); read from memory maps (a split over the RAM
    budget), L-BFGS on blocks of half the budget
    (:class:`~featcache.train.logistic.StreamedSoftmaxRegression`)."""
    weights = class_weights(y, num_classes, config.class_weight)
    if isinstance(z, RowBlocks) and not z.in_memory:
        return StreamedSoftmaxRegression(z, y, num_classes, weights, ram_budget_gb)
    return SoftmaxRegression(z, y, num_classes, weights)


def _lbfgs(
    problem: SoftmaxRegression | StreamedSoftmaxRegression,
    strength: float,
    config: ProbeConfig,
    start: Solution | None = None,
    monitor: Callable[[Solution], float] | None = None,
    epochs: int | None = None,
) -> Solution:
    """L-BFGS for mean cross-entropy + ``strength``/2 |W|^2 on the problem's rows.

    It stops when the largest gradient entry is below ``config.tol`` or the loss stops changing, as
    scikit-learn's ``lbfgs`` solver does, from ``start`` (a warm start along the path) or from zero; a
    streamed problem also when ``monitor``'s val loss stops falling, or after ``epochs``.

    Example:
        >>> rows = _problem(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, ProbeConfig())
        >>> fit = _lbfgs(rows, 1e-3, ProbeConfig())
    """
    return problem.fit(strength, config.max_iter, config.tol, start, monitor, epochs)


def fit_logistic(
    x: torch.Tensor | RowBlocks,
    y: torch.Tensor,
    num_classes: int,
    strength: float,
    max_iter: int = 200,
    standardize: bool = True,
    tol: float = 1e-6,
    ram_budget_gb: float = 8.0,
) -> Head:
    """One L2-regularised logistic regression as a ``linear`` head (standardisation folded in front).

    Solved tighter (``tol``) than the probe's path, whose strengths only need ranking on val. ``x`` may
    be :class:`~featcache.train.logistic.RowBlocks` (some rows of a split, or a split streamed from its
    memory maps): the rows are read by chunks and never copied; rows read from memory maps are solved
    by blocks of ``ram_budget_gb`` / 2 (no val split to stop on: :data:`~featcache.train.logistic.MAX_EPOCHS`
    epochs at most).

    Example:
        >>> head = fit_logistic(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, 1e-3)
    """
    blocks = x if isinstance(x, RowBlocks) else RowBlocks([Part(x)])
    std = fit_standardize_rows(blocks) if standardize else None
    config = ProbeConfig(max_iter=max_iter, tol=tol)
    with small_problem_threads(blocks, num_classes):
        problem = _problem(blocks.standardized(std), y, num_classes, config, ram_budget_gb)
        fit = _lbfgs(problem, strength, config)
    return _head(fit, std, blocks.row_shape, num_classes)


def _scores(
    fit: Solution, z: torch.Tensor | RowBlocks, y: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Validation loss, accuracy and balanced accuracy of one solution (no head built), by chunks."""
    blocks = z if isinstance(z, RowBlocks) else RowBlocks([Part(z)])
    loss = torch.zeros((), dtype=torch.float64, device=blocks.device)
    hit = torch.zeros(len(blocks), device=blocks.device)
    weight, bias = fold(fit.weight, fit.bias, blocks.stats())  # the raw rows, read as views
    with torch.no_grad():
        for start, xc in blocks.raw_chunks(chunk_rows(blocks.features, num_classes)):
            t = y[start : start + len(xc)]
            logits = F.linear(xc, weight, bias)
            loss += F.cross_entropy(logits, t, reduction="sum").double()
            hit[start : start + len(xc)] = (logits.argmax(1) == t).float()
        seen = torch.bincount(y, minlength=num_classes)
        recall = torch.bincount(y, hit, minlength=num_classes)[seen > 0] / seen[seen > 0]
        # one transfer for the three numbers: on a small problem each sync costs more than the maths
        mean = torch.stack([loss / max(1, len(y)), hit.mean().double(), recall.mean().double()])
        val_loss, acc, balanced = mean.tolist()
        return {"val_loss": val_loss, "val_acc": acc, "val_balanced_acc": balanced}


def _rows_of(source: FeatureSource) -> RowBlocks:
    """A source's rows for the solver: its tensor in memory, or its memory map streamed (over the RAM
    budget)."""
    if source.x is not None:
        return RowBlocks([Part(source.x)])
    return RowBlocks([Part(source.raw, source.dtype)], source.device)


def _head(fit: Solution, std: Standardize | None, in_shape: tuple[int, ...], num_classes: int) -> Head:
    """A ``linear`` head holding the solution (the standardisation folded in front of it)."""
    head = build_head(HeadSpec("linear"), in_shape, num_classes, std, seed=0)
    linear = next(m for m in head.body.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight.copy_(fit.weight)
        linear.bias.copy_(fit.bias)
    return head.eval()


def linear_probe(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig | None = None,
    progress: bool = True,
    refit: bool = True,
) -> ProbeResult:
    """Fit the regularisation path on train, choose the strength on ``val``, refit on train + val, test.

    Without ``refit`` the chosen train-only solution is the head (no validation row is trained on).

    Example:
        >>> res = linear_probe(source_for(f["train"], "penultimate"), source_for(f["val"], "penultimate"),
        ...                    source_for(f["test"], "penultimate"), 10)  # doctest: +SKIP
        >>> res.strength, res.test["acc"]  # doctest: +SKIP
    """
    config = config or ProbeConfig()
    if not len(val):
        raise FeatcacheError(
            "the linear probe needs a validation split to choose the strength (--val-fraction > 0)"
        )
    with small_problem_threads(_rows_of(train), num_classes):
        return _probe(train, val, test, num_classes, config, progress, refit)


def _probe(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig,
    progress: bool,
    refit: bool,
) -> ProbeResult:
    """:func:`linear_probe` once its inputs are checked.

    The rows are read through :class:`~featcache.train.logistic.RowBlocks` (the standardisation folded
    into the weights, the refit's train + val rows as two parts of one problem). A training split over
    the RAM budget is solved from its memory maps by L-BFGS on blocks of half the budget, each strength
    stopped early on the val loss; its refit runs the epochs kept for the chosen strength.
    """
    x, xv = _rows_of(train), _rows_of(val)
    budget = train.ram_budget_gb
    std = fit_standardize_rows(x) if config.standardize else None
    z, zv = x.standardized(std), xv.standardized(std)
    sweep, fits, start = [], {}, None
    path = _problem(z, train.y, num_classes, config, budget)
    streamed = isinstance(path, StreamedSoftmaxRegression)
    solver = (
        f"block L-BFGS, blocks of {path.block_rows} rows"
        if isinstance(path, StreamedSoftmaxRegression)
        else None
    )
    monitor = (lambda fit: _scores(fit, zv, val.y, num_classes)["val_loss"]) if streamed else None
    for s in tqdm(sorted(config.strengths, reverse=True), desc="probe path", disable=not progress):
        start = fits[s] = _lbfgs(path, s, config, start, monitor)
        sweep.append(
            {"strength": s, **_scores(start, zv, val.y, num_classes), "iterations": start.iterations}
            | ({"epochs": start.epochs} if streamed else {})
        )
    del path  # its float64 copy of a small problem's rows
    sweep.sort(key=lambda r: r["strength"])
    key = "val_" + config.score
    best = max(sweep, key=lambda r: (r[key], -r["val_loss"]))
    final, final_std = fits[best["strength"]], std
    if refit:
        both_x = RowBlocks(x.parts + xv.parts, x.device)
        both_y = torch.cat([train.y, val.y])
        final_std = fit_standardize_rows(both_x) if config.standardize else None
        problem = _problem(both_x.standardized(final_std), both_y, num_classes, config, budget)
        # a streamed refit runs the epochs the path kept for this strength (val is in its rows now)
        final = _lbfgs(problem, best["strength"], config, final, epochs=final.epochs or None)
    head = _head(final, final_std, x.row_shape, num_classes)
    info = HeadInfo(HeadSpec("linear"), x.row_shape, num_classes, standardize=config.standardize)
    test_metrics = evaluate(head, test, num_classes) if test is not None else None
    iterations = sum(r["iterations"] for r in sweep) + (final.iterations if refit else 0)
    extra = {"iterations": iterations, "chosen_on": key, "refit_on": "train+val" if refit else "train"}
    if solver is not None:  # how the rows over the RAM budget were solved
        extra["solver"] = solver
    return ProbeResult(best["strength"], sweep, test_metrics, head, info, extra)


def few_shot(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig,
    progress: bool = True,
) -> tuple[ProbeResult, dict[str, Any]]:
    """``config.shot_seeds`` probes, each on ``config.shots`` training rows per class drawn by its seed.

    Only the training split is subsampled and only its rows are trained on: the strength is chosen on
    the whole validation split (no refit on it), and the test split is only evaluated. Returns the
    first draw's result and the summary (mean, std).

    Example:
        >>> first, summary = few_shot(tr, va, te, 10, ProbeConfig(shots=5))  # doctest: +SKIP
        >>> summary["test_mean"], summary["test_std"]  # doctest: +SKIP
    """
    if config.shots is None:
        raise FeatcacheError("a few-shot probe needs --shots K")
    y = train.y.cpu().numpy()
    short = [c for c in range(num_classes) if (y == c).sum() < config.shots]
    if short:
        raise FeatcacheError(
            f"--shots {config.shots}: classes {short} have fewer training images; lower --shots"
        )
    results = []
    for seed in tqdm(range(config.shot_seeds), desc=f"{config.shots}-shot", disable=not progress):
        rng = np.random.default_rng(seed)
        rows = np.sort(
            np.concatenate(
                [rng.choice(np.flatnonzero(y == c), config.shots, replace=False) for c in range(num_classes)]
            )
        )
        picked = torch.as_tensor(rows, device=train.device)
        # K rows per class: gathered, from memory or (a streamed split) from the memory map
        xs = (
            train.x.index_select(0, picked)
            if train.x is not None
            else to_torch(np.asarray(train.raw[rows]), train.dtype).to(train.device, torch.float32)
        )
        subset = FeatureSource(xs, train.y.index_select(0, picked))
        results.append(linear_probe(subset, val, test, num_classes, config, progress=False, refit=False))
    key = config.score
    scores = [r.test[key] for r in results if r.test] or [
        max(row["val_" + key] for row in r.sweep) for r in results
    ]
    summary = {
        "shots": config.shots,
        "seeds": config.shot_seeds,
        "metric": key.replace("_", "-"),
        "on": "test" if results[0].test else "val",
        "per_seed": scores,
        "test_mean": float(np.mean(scores)),
        "test_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
    }
    return results[0], summary
