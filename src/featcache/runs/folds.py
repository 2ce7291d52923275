"""K-fold cross-validation on cached rows: one head per fold, no backbone pass after the first extraction.

The train and val splits are pooled and dealt into K folds stratified by class (a multi-label or
regression set: one stratum), by content digest: an image lands in the same fold whatever the
dataset's order, and copies of one image (one digest) land together, so no image is both trained on
and held out. Fold ``i`` trains a head on the other folds and is scored on fold ``i`` by the task's
metric (accuracy, mAP, R²); the report is the mean and standard deviation of those K scores (and of
each fold head's test score, when there is a test split). Every fold is a view of the feature
table: nothing is extracted again.

Each pooled image is scored by the one head that did not train on it: its out-of-fold prediction.
Ranked by loss, those are where to look for mislabelled images over the whole train+val set. The
run's own head is refitted on every train+val row, so ``export`` and ``predict`` take a folds folder.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._config import to_json
from .._util import FeatcacheError, resolve_device
from ..cache.splits import CachedFeatures, join_splits
from ..train.config import TrainConfig
from ..train.fit import TrainingInterrupted, evaluate, predict_logits
from ..train.heads import Head, HeadInfo, HeadSpec
from ..train.logistic import Part, RowBlocks
from ..train.objectives import METRIC, best_threshold, multilabel_metrics, regress_metrics
from ..train.probe import ProbeConfig, fit_logistic
from ..train.sources import FeatureSource, source_for
from ..train.target_probes import path_outputs, refit_probe
from .folder import RunFolder, RunRecord
from .job import Job
from .metrics import Metrics, scores_of
from .record import FoldsPart
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
    """Per-fold held-out scores (and test scores of each fold's head), their mean and std; the
    out-of-fold outputs of every pooled (train+val) row, in the pool's order. The score is ``metric``:
    the task's (accuracy, mAP or R²), kept under the field names ``acc`` and ``test_acc``."""

    folds: int
    acc: list[float]
    test_acc: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    oof: torch.Tensor | None = field(default=None, repr=False)
    metric: str = "acc"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.acc)

    @property
    def std(self) -> float:
        """Population standard deviation over the folds (0 for identical folds)."""
        return statistics.pstdev(self.acc)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "oof"}
        d.update(mean=self.mean, std=self.std)
        if self.test_acc:
            d.update(test_mean=statistics.fmean(self.test_acc), test_std=statistics.pstdev(self.test_acc))
        return d


def _strata(pool: CachedFeatures) -> np.ndarray:
    """What the folds are stratified by: the class of a classification set; one stratum (every row
    0) for a multi-label or regression set, whose rows have no single class."""
    return np.asarray(pool.labels) if pool.task == "classify" else np.zeros(len(pool), dtype=np.int64)


def _pool_and_folds(feats: dict[str, CachedFeatures], k: int, seed: int) -> tuple[CachedFeatures, np.ndarray]:
    pool = join_splits([feats[s] for s in ("train", "val") if s in feats], "train+val")
    return pool, assign_folds(pool.digests, _strata(pool), k, seed)


def _fold_head(
    parts: dict[str, CachedFeatures],
    layer: str,
    head_spec: HeadSpec,
    config: TrainConfig,
    progress: bool,
    child: RunFolder | None,
    record: RunRecord | None,
) -> tuple[Head, HeadInfo, Metrics]:
    """One fold's head: trained (and written to its run folder ``child``), or read back from ``child``
    when a resumed run finished it with the same settings."""
    if child is not None and record is not None:
        done = child.read_metrics()  # written after the fold's config and head: both are there
        if done is not None and done.finished and child.read_config() == record:
            head, info = child.load_head()
            return head, info, done
        child.write_config(record)
    head, info, result, metrics = train_on_cache(
        parts, layer, head_spec, config, progress, child.checkpoint if child else None
    )
    if not result.finished:
        raise TrainingInterrupted(result, child.unfinished("train") if child else "fold interrupted")
    metrics = replace(metrics, fold=metrics.test, test=None)  # the held-out fold, scored after the last epoch
    if child is not None:
        child.save_head(head, info)
        child.write_metrics(metrics)
        child.write_report(metrics, parts["train"].classes, child.path.name)
    return head, info, metrics


def folds_train(
    feats: dict[str, CachedFeatures],
    layer: str,
    head_spec: HeadSpec,
    config: TrainConfig,
    k: int,
    seed: int = 0,
    progress: bool = False,
    folder: RunFolder | None = None,
    record: RunRecord | None = None,
) -> FoldsResult:
    """Train a head per fold for ``config.epochs`` (no epoch is chosen on the held-out fold) and score it;
    every pooled row's out-of-fold logits land in ``result.oof``. With ``folder`` (and the run's
    ``record``), fold ``i`` is the run folder ``fold-i`` in it (config, metrics, curves, head), and a
    resumed run reuses the folds it finished.

    Example:
        >>> res = folds_train(feats, "penultimate", HeadSpec(), TrainConfig(epochs=9), k=5)  # doctest: +SKIP
        >>> f"{res.mean:.3f} +- {res.std:.3f}"  # doctest: +SKIP
    """
    pool, fold = _pool_and_folds(feats, k, seed)
    key = METRIC[pool.task]
    out = FoldsResult(k, [], metric=key)
    dev = resolve_device(config.device)
    oof = torch.zeros((len(pool), len(pool.classes)))
    for i in range(k):
        rows = np.flatnonzero(fold == i)
        train, held = pool.subset(np.flatnonzero(fold != i), f"fold{i}-train"), pool.subset(rows, f"fold{i}")
        child = folder.child(f"fold-{i}") if folder is not None else None
        mine = replace(record, part=FoldsPart(k, fold=i)) if record is not None else None
        head, info, metrics = _fold_head(
            {"train": train, "test": held}, layer, head_spec, config, progress, child, mine
        )
        held_src = source_for(held, layer, dev, config.ram_budget_gb)
        oof[torch.as_tensor(rows)] = predict_logits(head.to(dev), held_src)
        out.acc.append(_held_out(metrics, key))
        out.rows.append(len(held))
        if "test" in feats:
            test = _score(head.to(dev), source_for(feats["test"], layer, dev), info)
            out.test_acc.append(float(test[key]))
    out.oof = oof
    return out


def folds_probe(
    feats: dict[str, CachedFeatures],
    layer: str,
    config: ProbeConfig,
    k: int,
    seed: int = 0,
    device: str = "auto",
    ram_budget_gb: float = 8.0,
) -> FoldsResult:
    """The linear probe with K-fold cross-validation choosing the L2 strength (best mean held-out
    accuracy); the fold accuracies reported, and the out-of-fold logits in ``result.oof``, are those at
    that strength. The refit on every pooled row is scored once on test (``result.extra["head"]``). A
    fold's training rows are read from the pooled rows by index (no copy); pooled rows over
    ``ram_budget_gb`` (as float32) are streamed from the memory maps.

    Example:
        >>> res = folds_probe(feats, "penultimate", ProbeConfig(), k=5)  # doctest: +SKIP
    """
    pool, fold = _pool_and_folds(feats, k, seed)
    dev = resolve_device(device)
    src = source_for(pool, layer, dev, ram_budget_gb)
    if pool.task != "classify":
        return _folds_probe_task(feats, pool, fold, layer, config, src, dev)
    # each fold's training rows are a view of the pooled rows (in memory, or streamed over the budget)
    part = Part(src.x, "float32") if src.x is not None else Part(src.raw, src.dtype)
    n = len(pool.classes)
    by_strength: dict[float, list[float]] = {}
    oof: dict[float, torch.Tensor] = {}
    for s in config.strengths:
        oof[s] = torch.zeros((len(pool), n))
        for i in range(k):
            tr, ho = np.flatnonzero(fold != i), np.flatnonzero(fold == i)
            rows = torch.as_tensor(tr, device=dev)
            blocks = RowBlocks([Part(part.data, part.dtype, rows)], dev)
            head = fit_logistic(
                blocks, src.y[rows], n, s, config.max_iter, config.standardize, ram_budget_gb=ram_budget_gb
            )
            held = source_for(pool.subset(ho, f"fold{i}"), layer, dev, ram_budget_gb)
            by_strength.setdefault(s, []).append(float(evaluate(head, held, n)["acc"]))
            oof[s][torch.as_tensor(ho)] = predict_logits(head, held)
    best = max(config.strengths, key=lambda s: statistics.fmean(by_strength[s]))
    out = FoldsResult(k, by_strength[best], rows=[int((fold == i).sum()) for i in range(k)], oof=oof[best])
    out.extra = {"strength": best, "cv_by_strength": {str(s): v for s, v in by_strength.items()}}
    head = fit_logistic(
        RowBlocks([part], dev),
        src.y,
        n,
        best,
        config.max_iter,
        config.standardize,
        ram_budget_gb=ram_budget_gb,
    )
    shape = tuple(pool.features[layer].shape[1:])
    out.extra["head"] = (head, HeadInfo(HeadSpec("linear"), shape, n, standardize=config.standardize))
    if "test" in feats:
        out.test_acc = [float(evaluate(head, source_for(feats["test"], layer, dev), n)["acc"])]
    return out


def _held_out(metrics: Metrics, key: str) -> float:
    """A fold's held-out score ``key`` (NaN where it is not defined, as the mean over folds takes it)."""
    value = metrics.fold.score(key) if metrics.fold is not None else None
    return float("nan") if value is None else value


def _score(head: Head, data: FeatureSource, info: HeadInfo, names: list[str] | None = None) -> dict[str, Any]:
    """The metrics of ``head`` on ``data`` for its task (at its multi-label threshold)."""
    threshold = info.threshold if info.threshold is not None else 0.5
    return evaluate(head, data, info.num_classes, task=info.task, threshold=threshold, names=names)


def _task_score(task: str, key: str, out: torch.Tensor, y: torch.Tensor) -> float:
    """One fold's held-out ``key`` (map, map_micro, f1 at 0.5; r2, pearson) from its outputs."""
    if task == "multilabel":
        return float(multilabel_metrics(out.numpy(), y.numpy())[key])
    return float(regress_metrics(out.numpy(), y.numpy())[key])


def _folds_probe_task(
    feats: dict[str, CachedFeatures],
    pool: CachedFeatures,
    fold: np.ndarray,
    layer: str,
    config: ProbeConfig,
    src: FeatureSource,
    dev: torch.device,
) -> FoldsResult:
    """:func:`folds_probe` of a multi-label or regression set: the per-label logistic (or ridge) path
    fitted on each fold's training rows and scored on the fold by the task's metric; the strength with
    the best mean is refitted on every pooled row. A multi-label head's threshold is the best one on
    the out-of-fold probabilities (nothing else is held out)."""
    task, names = pool.task, pool.classes
    key = config.score_for(task)
    if src.x is None or src.y is None:
        raise FeatcacheError(
            f"the {task} probe needs the features in memory; raise --ram-budget-gb, or use `featcache "
            "train --folds` for caches larger than it"
        )
    x, y = src.x.double().flatten(1).cpu(), src.y.float().cpu()
    strengths = sorted(config.strengths, reverse=True)
    oof = {s: torch.zeros((len(pool), len(names)), dtype=torch.float64) for s in strengths}
    k = int(fold.max()) + 1
    for i in tqdm(range(k), desc="folds", unit="fold", delay=1):
        tr, ho = torch.as_tensor(fold != i), torch.as_tensor(fold == i)
        for lam, held in path_outputs(task, x[tr], y[tr], x[ho], strengths, config).items():
            oof[lam][ho] = held
    by_strength = {
        s: [_task_score(task, key, oof[s][torch.as_tensor(fold == i)], y[fold == i]) for i in range(k)]
        for s in strengths
    }
    best = max(strengths, key=lambda s: statistics.fmean(by_strength[s]))
    rows = [int((fold == i).sum()) for i in range(k)]
    out = FoldsResult(k, by_strength[best], rows=rows, oof=oof[best].float(), metric=key)
    out.extra = {"strength": best, "cv_by_strength": {str(s): v for s, v in by_strength.items()}}
    threshold = best_threshold(torch.sigmoid(oof[best]).numpy(), y.numpy()) if task == "multilabel" else None
    head = refit_probe(task, x, y, best, config).to(dev)
    shape = tuple(pool.features[layer].shape[1:])
    info = HeadInfo(HeadSpec("linear"), shape, len(names), config.standardize, task=task, threshold=threshold)
    out.extra["head"] = (head, info)
    if "test" in feats:
        out.test_acc = [float(_score(head, source_for(feats["test"], layer, dev), info)[key])]
    return out


def _refit(
    spec: RunSpec, feats: dict[str, CachedFeatures], pool: CachedFeatures, layer: str, head: HeadSpec
) -> tuple[Head, HeadInfo, Metrics]:
    """The final head of ``train --folds``: trained on every train+val row for ``spec.train.epochs``
    (nothing held out to choose an epoch on), scored on test."""
    parts = {"train": pool, **({"test": feats["test"]} if "test" in feats else {})}
    trained, info, result, metrics = train_on_cache(parts, layer, head, spec.train, spec.progress)
    if not result.finished:
        raise TrainingInterrupted(result, f"`featcache train --resume --out {spec.out}` refits it")
    return trained, info, metrics


def folds_run(
    spec: RunSpec, layer: str, k: int, head: HeadSpec | ProbeConfig
) -> tuple[FoldsResult, dict[str, CachedFeatures]]:
    """``featcache train|probe --folds K``: extract (or read the cache), then K folds, then a final head
    refitted on all of train+val. With ``spec.out`` the folder is a run that ``export``, ``predict`` and
    ``load_run`` take (its head is the refitted one): ``config.json`` (``train --resume`` continues it),
    ``metrics.json`` (folds and the refit's test), ``folds.json``, ``oof.csv`` (every train+val image's
    out-of-fold prediction), ``misclassified.csv`` (the out-of-fold mistakes, highest loss first),
    ``splits.csv``, and for ``train`` a run folder per fold (``fold-0`` ...: metrics, curves, head).

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), out="runs/folds")
        >>> res, feats = folds_run(spec, "penultimate", 5, HeadSpec())  # doctest: +SKIP
    """
    if spec.logger != "none":  # a head per fold, no run folder each: nothing would be logged
        raise FeatcacheError(
            f"--logger {spec.logger} logs the epochs of a train, finetune or sweep run; --folds trains a "
            "head per fold without one: leave out --logger, or train without --folds"
        )
    verb = "train" if isinstance(head, HeadSpec) else "probe"
    if verb == "probe":
        spec.no_resume("probe --folds")
    job = Job.open(spec, verb, layer, folder=None, one_layer=True)
    folder, backbone, layer = job.folder, job.backbone, job.layer
    feats, _ = job.extract_all()
    job.note_data(feats)
    shared: dict[str, Any] = (
        {"head": head, "train": spec.train, "part": FoldsPart(k)}
        if isinstance(head, HeadSpec)
        else {"head": HeadSpec("linear"), "part": FoldsPart(k, probe=head)}
    )
    record = job.record(verb, backbone, feats, [layer], layer=layer, **shared)
    if folder is not None:
        if spec.resume:
            folder.check_resume(
                record, ("cache_keys", "split_keys", "train", "head", "folds"), "these settings"
            )
        folder.write_config(record)
    t0 = time.perf_counter()
    pool = join_splits([feats[s] for s in ("train", "val") if s in feats], "train+val")
    if isinstance(head, HeadSpec):
        res = folds_train(feats, layer, head, spec.train, k, spec.data.seed, spec.progress, folder, record)
        final, info, metrics = _refit(spec, feats, pool, layer, head)
        if pool.task == "multilabel" and res.oof is not None:
            # nothing of train+val is held out from the refit: its threshold is the best one on the
            # out-of-fold probabilities, and its test metrics are taken at that threshold
            y = np.asarray(pool.labels)
            info = replace(info, threshold=best_threshold(torch.sigmoid(res.oof).numpy(), y))
            if "test" in feats:
                test = source_for(feats["test"], layer, resolve_device(spec.train.device))
                metrics = replace(metrics, test=scores_of(pool.task, _score(final, test, info, pool.classes)))
        refit_test = metrics.test.score(res.metric) if metrics.test is not None else None
        if refit_test is not None:
            res.extra[f"refit_test_{res.metric}"] = refit_test
    else:
        res = folds_probe(feats, layer, head, k, spec.data.seed, spec.train.device, spec.train.ram_budget_gb)
        final, info = res.extra.pop("head")
        dev = resolve_device(spec.train.device)
        names = pool.classes if pool.task != "classify" else None
        metrics = Metrics(pool.task)
        if "test" in feats:
            test_scores = _score(final, source_for(feats["test"], layer, dev), info, names)
            metrics = replace(metrics, test=scores_of(pool.task, test_scores))
    res.extra["seconds"] = round(time.perf_counter() - t0, 3)
    res.extra["cache_rows"] = {
        s: {"rows": f.rows, "from_cache": f.from_cache, "extracted": f.extracted} for s, f in feats.items()
    }
    if folder is not None:
        _write_folds(folder, spec, res, pool, (final, info, metrics), layer, f"{backbone.cfg.spec} · {layer}")
    return res, feats


def _write_folds(
    folder: RunFolder,
    spec: RunSpec,
    res: FoldsResult,
    pool: CachedFeatures,
    refit: tuple[Head, HeadInfo, Metrics],
    layer: str,
    title: str,
) -> None:
    """The folds folder's files (see :func:`folds_run`); the refitted head is the run's head."""
    final, info, metrics = refit
    summary = {"layer": layer, "data": to_json(spec.data), **res.to_dict()}
    folder.save_head(final, info)
    folder.write_metrics(replace(metrics, folds=summary, refit_on="train+val", finished=True))
    folder.write_report(metrics, pool.classes, f"{title} · refitted on train+val")
    folder.write_json("folds.json", summary)
    if res.oof is not None and pool.task != "classify":
        fold = assign_folds(pool.digests, _strata(pool), res.folds, spec.data.seed)
        oof, worst = task_oof_rows(pool, fold, res.oof, info.threshold)
        folder.write_csv("oof.csv", oof)
        folder.write_csv("misclassified.csv", worst)
    elif res.oof is not None:
        fold = assign_folds(pool.digests, pool.labels, res.folds, spec.data.seed)
        folds, labels = torch.as_tensor(fold), torch.as_tensor(pool.labels)
        folder.write_oof(pool.ids, pool.digests, folds, labels, res.oof, pool.classes)
        folder.write_misclassified(
            "out-of-fold", pool.ids, torch.as_tensor(pool.labels), res.oof, pool.classes
        )


def task_oof_rows(
    pool: CachedFeatures, fold: np.ndarray, oof: torch.Tensor, threshold: float | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``oof.csv`` and ``misclassified.csv`` rows of a multi-label or regression set, in that order.

    Multilabel: the given label set, the predicted one (probability >= ``threshold``), each label's
    out-of-fold probability (``p_<label>``), and the mean binary cross-entropy over them as ``loss``;
    the misclassified rows are those whose predicted set is not the given one. Regress: each target's
    true and predicted value, and the squared error (mean over targets) as ``loss``; every row is a
    misfit, ranked. Both rankings put the highest loss first.

    Example:
        >>> oof_rows, worst = task_oof_rows(pool, fold, res.oof, 0.5)  # doctest: +SKIP
    """
    names, y, out = pool.classes, torch.as_tensor(np.asarray(pool.labels)).double(), oof.double()
    base = [
        {"id": i, "digest": d, "fold": int(f)} for i, d, f in zip(pool.ids, pool.digests, fold, strict=True)
    ]
    if pool.task == "multilabel":
        probs = torch.sigmoid(out)
        loss = F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1)
        given, pred = y > 0.5, probs >= (0.5 if threshold is None else threshold)
        wrong = (given != pred).any(1)
        rows = [
            {**b, "labels": _set(names, given[i]), "predicted": _set(names, pred[i]),
             **{f"p_{c}": round(float(probs[i, j]), 6) for j, c in enumerate(names)},
             "loss": round(float(loss[i]), 6)}
            for i, b in enumerate(base)
        ]  # fmt: skip
    else:
        loss = ((out - y) ** 2).mean(1)
        wrong = torch.ones(len(out), dtype=torch.bool)
        rows = [
            {**b, **{f"true_{c}": float(y[i, j]) for j, c in enumerate(names)},
             **{f"predicted_{c}": round(float(out[i, j]), 6) for j, c in enumerate(names)},
             "loss": round(float(loss[i]), 6)}
            for i, b in enumerate(base)
        ]  # fmt: skip
    order = sorted(torch.nonzero(wrong)[:, 0].tolist(), key=lambda i: -float(loss[i]))
    worst = [{"rank": r, "split": "out-of-fold", **rows[i]} for r, i in enumerate(order, 1)]
    return rows, worst


def _set(names: list[str], on: torch.Tensor) -> str:
    return ";".join(c for c, v in zip(names, on.tolist(), strict=True) if v)
