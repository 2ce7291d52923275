"""K-fold cross-validation on cached rows: one head per fold, no backbone pass after the first extraction.

The train and val splits are pooled and dealt into K folds stratified by class, by content digest: an
image lands in the same fold whatever the dataset's order, and copies of one image (one digest) land
together, so no image is both trained on and held out. Fold ``i`` trains a head on the other folds
and is scored on fold ``i``; the report is the mean and standard deviation of those K accuracies (and
of each fold head's test accuracy, when there is a test split). Every fold is a view of the feature
table: nothing is extracted again.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .._config import to_json
from .._util import FeatcacheError, resolve_device
from ..cache.store import CachedFeatures, join_splits
from ..train.config import TrainConfig
from ..train.fit import evaluate
from ..train.heads import HeadSpec
from ..train.sources import source_for
from .folder import RunFolder
from .probe import ProbeConfig, fit_logistic
from .spec import RunSpec
from .train import train_on_cache


def assign_folds(digests: Sequence[str], labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The fold (0..k-1) of each row: per class (of an image's first row), images in the order of
    SHA-256(seed, digest) are dealt round-robin, continuing across classes so folds stay even.

    Example:
        >>> assign_folds(["a" * 64, "b" * 64, "a" * 64, "c" * 64], np.array([0, 1, 0, 1]), 2).tolist()
        [0, 1, 0, 0]
    """
    if k < 2:
        raise FeatcacheError(f"--folds {k}: cross-validation needs at least 2 folds")
    first: dict[str, int] = {}
    for d, y in zip(digests, np.asarray(labels).tolist()):
        first.setdefault(d, int(y))
    if k > len(first):
        raise FeatcacheError(f"--folds {k}: only {len(first)} distinct images to deal into folds")
    fold_of: dict[str, int] = {}
    dealt = 0
    for c in sorted(set(first.values())):
        mine = sorted(
            (d for d, y in first.items() if y == c),
            key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).digest(),
        )
        for d in mine:
            fold_of[d] = dealt % k
            dealt += 1
    return np.array([fold_of[d] for d in digests], dtype=np.int64)


@dataclass
class FoldsResult:
    """Per-fold held-out accuracies (and test accuracies of each fold's head), their mean and std."""

    folds: int
    acc: list[float]
    test_acc: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.acc)

    @property
    def std(self) -> float:
        """Population standard deviation over the folds (0 for identical folds)."""
        return statistics.pstdev(self.acc)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(mean=self.mean, std=self.std)
        if self.test_acc:
            d.update(test_mean=statistics.fmean(self.test_acc), test_std=statistics.pstdev(self.test_acc))
        return d


def _pool_and_folds(feats: dict[str, CachedFeatures], k: int, seed: int) -> tuple[CachedFeatures, np.ndarray]:
    pool = join_splits([feats[s] for s in ("train", "val") if s in feats], "train+val")
    return pool, assign_folds(pool.digests, pool.labels, k, seed)


def folds_train(
    feats: dict[str, CachedFeatures],
    layer: str,
    head_spec: HeadSpec,
    config: TrainConfig,
    k: int,
    seed: int = 0,
    progress: bool = False,
) -> FoldsResult:
    """Train a head per fold for ``config.epochs`` (no epoch is chosen on the held-out fold) and score it.

    Example:
        >>> res = folds_train(feats, "penultimate", HeadSpec(), TrainConfig(epochs=9), k=5)  # doctest: +SKIP
        >>> f"{res.mean:.3f} +- {res.std:.3f}"  # doctest: +SKIP
    """
    pool, fold = _pool_and_folds(feats, k, seed)
    out = FoldsResult(k, [])
    for i in range(k):
        train, held = (
            pool.subset(np.flatnonzero(fold != i), f"fold{i}-train"),
            pool.subset(np.flatnonzero(fold == i), f"fold{i}"),
        )
        head, info, _, metrics = train_on_cache(
            {"train": train, "test": held}, layer, head_spec, config, progress
        )
        out.acc.append(float(metrics["test"]["acc"]))
        out.rows.append(len(held))
        if "test" in feats:
            dev = resolve_device(config.device)
            test = evaluate(head.to(dev), source_for(feats["test"], layer, dev), info.num_classes)
            out.test_acc.append(float(test["acc"]))
    return out


def folds_probe(
    feats: dict[str, CachedFeatures],
    layer: str,
    config: ProbeConfig,
    k: int,
    seed: int = 0,
    device: str = "auto",
) -> FoldsResult:
    """The linear probe with K-fold cross-validation choosing the L2 strength (best mean held-out
    accuracy); the fold accuracies reported are those at that strength. The refit on every pooled row
    is scored once on test.

    Example:
        >>> res = folds_probe(feats, "penultimate", ProbeConfig(), k=5)  # doctest: +SKIP
    """
    pool, fold = _pool_and_folds(feats, k, seed)
    dev = resolve_device(device)
    src = source_for(pool, layer, dev)
    if src.x is None:
        raise FeatcacheError("the L-BFGS probe needs the features in memory; use `featcache train --folds`")
    n = len(pool.classes)
    by_strength: dict[float, list[float]] = {}
    for s in config.strengths:
        for i in range(k):
            tr, ho = np.flatnonzero(fold != i), np.flatnonzero(fold == i)
            rows = torch.as_tensor(tr, device=dev)
            head = fit_logistic(src.x[rows], src.y[rows], n, s, config.max_iter, config.standardize)
            held = source_for(pool.subset(ho, f"fold{i}"), layer, dev)
            by_strength.setdefault(s, []).append(float(evaluate(head, held, n)["acc"]))
    best = max(config.strengths, key=lambda s: statistics.fmean(by_strength[s]))
    out = FoldsResult(k, by_strength[best], rows=[int((fold == i).sum()) for i in range(k)])
    out.extra = {"strength": best, "cv_by_strength": {str(s): v for s, v in by_strength.items()}}
    if "test" in feats:
        head = fit_logistic(src.x, src.y, n, best, config.max_iter, config.standardize)
        out.test_acc = [float(evaluate(head, source_for(feats["test"], layer, dev), n)["acc"])]
    return out


def folds_run(
    spec: RunSpec, layer: str, k: int, head: HeadSpec | ProbeConfig
) -> tuple[FoldsResult, dict[str, CachedFeatures]]:
    """``featcache train|probe --folds K``: extract (or read the cache), then K folds; writes
    ``folds.json`` in ``spec.out`` when given. Returns the result and the splits read.

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), extract=ExtractConfig())
        >>> res, feats = folds_run(spec, "penultimate", 5, HeadSpec())  # doctest: +SKIP
    """
    backbone = spec.backbone()
    splits = spec.data.load(spec.cache_dir)
    if splits.task != "classify":  # the folds are dealt per class, and score accuracy
        raise FeatcacheError(
            f"--folds cross-validates classifiers; this dataset's task is {splits.task}: run `train` or "
            "`probe` "
            "without --folds (they choose on the validation split)"
        )
    feats, _ = spec.extract_all(backbone, splits, [layer])
    t0 = time.perf_counter()
    if isinstance(head, HeadSpec):
        res = folds_train(feats, layer, head, spec.train, k, spec.data.seed, spec.progress)
    else:
        res = folds_probe(feats, layer, head, k, spec.data.seed, spec.train.device)
    res.extra["seconds"] = round(time.perf_counter() - t0, 3)
    res.extra["cache_rows"] = {
        s: {"rows": f.rows, "from_cache": f.from_cache, "extracted": f.extracted} for s, f in feats.items()
    }
    if spec.out is not None:
        folder = RunFolder(spec.out)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.write_json("folds.json", {"layer": layer, "data": to_json(spec.data), **res.to_dict()})
    return res, feats
