"""``featcache train``: extract (or reuse the cache), train a head, evaluate, write the run folder.

:func:`train_on_cache` is the part every head-training verb shares (train, sweep): a head for one
cached layer, fitted on the train split (or its cached augmented views), evaluated on val and test.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._util import resolve_device
from ..cache.splits import CachedFeatures
from ..data.datasets import DatasetSplits
from ..extraction.config import DEFAULT_LAYER
from ..train.config import TrainConfig
from ..train.fit import FitResult, TrainingDiverged, TrainingInterrupted, evaluate, fit, predict_logits
from ..train.grid import fit_grid, grid_not_covered
from ..train.heads import Head, HeadInfo, HeadSpec, Standardize, TargetScale, build_head, fit_standardize
from ..train.objectives import best_threshold
from ..train.sources import BatchSource, FeatureSource, ViewCycle, source_for
from .contents import check_same_data, split_contents
from .folder import Run, RunFolder
from .job import Job
from .logger import EpochHook, epoch_log
from .metrics import CacheRows, Metrics
from .record import TrainPart
from .report import most_confused
from .spec import RunSpec


def evaluate_splits(
    model: nn.Module,
    result: FitResult,
    sources: Mapping[str, Any],
    num_classes: int,
    info: HeadInfo | None = None,
    names: Sequence[str] | None = None,
    task: str | None = None,
    threshold: float | None = None,
) -> Metrics:
    """metrics.json content: the fit's history and timings, and val/test metrics of the best model (for
    the task of ``info``, at its multi-label threshold; ``names``: the classes or targets, and with them
    each classification split's ``most_confused`` class pairs). A network without a HeadInfo (finetune)
    gives its ``task`` and ``threshold`` instead."""
    if info is not None:
        task, threshold = info.task, info.threshold
    task = task or "classify"
    threshold = threshold if threshold is not None else 0.5
    metrics: dict[str, Any] = {
        "task": task,
        "history": result.history,
        "step_losses": result.step_losses,
        "examples_per_epoch": result.examples_per_epoch,
        "batch_size": result.batch_size,
        "steps_per_epoch": math.ceil(result.examples_per_epoch / max(1, result.batch_size)),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_seconds": result.seconds,
        "fast_paths": result.extra,
        "finished": result.finished,
    }
    for split in ("val", "test"):
        if sources.get(split) is not None:
            metrics[split] = evaluate(
                model,
                sources[split],
                num_classes,
                front_once=result.extra.get("fast_paths", True),
                task=task,
                threshold=threshold,
                names=None if names is None else list(names),
            )
            if task == "classify" and names is not None and "confusion" in metrics[split]:
                metrics[split]["most_confused"] = most_confused(metrics[split]["confusion"], names)
    return Metrics.from_json(metrics)


def cache_rows(feats: Mapping[str, CachedFeatures]) -> dict[str, CacheRows]:
    """Each split's rows as the run read them: how many, from the cache, extracted now."""
    return {k: CacheRows(v.rows, v.from_cache, v.extracted) for k, v in feats.items()}


def write_mistakes(
    folder: RunFolder,
    head: nn.Module,
    feats: Mapping[str, CachedFeatures],
    layer: str,
    config: TrainConfig,
    splits: DatasetSplits | None = None,
) -> None:
    """``misclassified.csv`` of the test split (else val), from the cached rows and their ids (with the
    dataset's ``splits``, ``top_losses.png`` of its images too); for the other tasks, the per-label AP
    chart or the predicted-vs-true scatter of the test split."""
    split = next((s for s in ("test", "val") if s in feats), None)
    if split is not None and feats[split].task != "classify":
        cached = feats[split]
        data = source_for(cached, layer, resolve_device(config.device), config.ram_budget_gb)
        folder.write_task_report(
            cached.task, split, cached.ids, data.y, predict_logits(head, data), cached.classes
        )
    elif split is not None:
        cached = feats[split]
        data = source_for(cached, layer, resolve_device(config.device), config.ram_budget_gb)
        samples = dict(splits.items()).get(split) if splits is not None else None
        logits = predict_logits(head, data)
        folder.write_misclassified(split, cached.ids, data.y, logits, cached.classes, samples)


def train_on_cache(
    feats: dict[str, CachedFeatures],
    layer: str,
    head_spec: HeadSpec,
    config: TrainConfig,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    views: Sequence[CachedFeatures] = (),
    on_epoch: EpochHook | None = None,
) -> tuple[Head, HeadInfo, FitResult, Metrics]:
    """Build a head for ``layer``, fit it on the train split, evaluate on test (and val).

    With ``views`` (cached augmented views of the train split,
    :func:`~featcache.extraction.build.extract_views`)
    epoch ``e`` trains on view ``e mod K``; standardisation statistics still come from the plain split.
    ``on_epoch`` gets the history after each epoch, and once more at the end (``--logger``).

    Example:
        >>> out = train_on_cache(feats, "penultimate", HeadSpec(), TrainConfig())  # doctest: +SKIP
        >>> head, info, result, metrics = out  # doctest: +SKIP
    """
    device, budget, plain = resolve_device(config.device), config.ram_budget_gb, feats["train"]
    shape, layout = tuple(plain.features[layer].shape[1:]), plain.layout(layer)
    classes, task = plain.classes, plain.task
    # With views the plain split only gives the statistics, read from the memory map by chunks.
    train: BatchSource = (
        ViewCycle([source_for(v, layer, device, budget / len(views)) for v in views])
        if views
        else source_for(plain, layer, device, budget)
    )
    std = _standardizer(plain, layer, head_spec, config, train) if config.standardize else None
    head = build_head(head_spec, shape, len(classes), std, seed=config.seed, layout=layout)
    sources: dict[str, FeatureSource] = {
        k: source_for(feats[k], layer, device, budget) for k in ("val", "test") if k in feats
    }
    scale = TargetScale.fit(torch.as_tensor(plain.labels)) if task == "regress" else None
    val = sources.get("val")
    try:
        # A regression head learns standardised targets (train and val alike); its TargetScale puts
        # the outputs back in the targets' units once it has trained.
        with standardised_targets(scale, train, val):
            args = (len(classes), config, progress, checkpoint, resume)
            result = fit(head, train, val, *args, task=task, on_epoch=on_epoch)
    except TrainingInterrupted as stop:  # Ctrl-C: the finished epochs still make a (unfinished) run
        result = stop.result
    if on_epoch is not None:  # a resumed run that had finished trains no epoch: its log is written here
        on_epoch(result.history)
    if scale is not None:
        head.target = scale.to(device)
    return head, *_evaluated(head, result, head_spec, plain, layer, sources, val, std is not None)


def _evaluated(
    head: Head,
    result: FitResult,
    head_spec: HeadSpec,
    plain: CachedFeatures,
    layer: str,
    sources: Mapping[str, FeatureSource],
    val: FeatureSource | None,
    standardize: bool,
) -> tuple[HeadInfo, FitResult, Metrics]:
    """A trained head's :class:`HeadInfo` (with its multi-label threshold, chosen on val), the fit's
    result and the metrics of every split (what :func:`train_on_cache` returns after the head)."""
    shape, layout = tuple(plain.features[layer].shape[1:]), plain.layout(layer)
    classes, task = plain.classes, plain.task
    threshold = None
    if task == "multilabel":  # the probability that best separates labels on val (0.5 without val)
        threshold = (
            best_threshold(sigmoid_probs(head, val), val.y.cpu().numpy())
            if val is not None and len(val)
            else 0.5
        )
    info = HeadInfo(
        head_spec,
        shape,
        len(classes),
        standardize=standardize,
        layout=layout,
        task=task,
        threshold=threshold,
    )
    return info, result, evaluate_splits(head, result, sources, len(classes), info, classes)


def _standardizer(
    plain: CachedFeatures, layer: str, head_spec: HeadSpec, config: TrainConfig, train: BatchSource
) -> Standardize:
    """The head's frozen standardisation, from the train split's statistics."""
    stats, layout = plain.channel_stats.get(layer), plain.layout(layer)
    # A map's cached channel statistics, else the training features in memory (maybe on the GPU),
    # else (views) the memory map by chunks.
    # (Rows not loaded on the CPU are read from the map by chunks: the trainer may never load them
    # whole, running the head's standardisation once over the stored rows instead.)
    loaded = isinstance(train, FeatureSource) and (train.loaded or train.device.type != "cpu")
    held = train.x if stats is None and loaded and isinstance(train, FeatureSource) else None
    rows = held if held is not None else plain.features[layer]
    mean, var = (stats.mean, stats.var) if stats is not None else (None, None)
    return fit_standardize(head_spec.kind, rows, mean, var, dtype=plain.dtype, layout=layout)


def train_grid_on_cache(
    feats: dict[str, CachedFeatures],
    layer: str,
    head_spec: HeadSpec,
    configs: list[TrainConfig],
    progress: bool = True,
    on_epochs: list[EpochHook | None] | None = None,
) -> list[tuple[Head, HeadInfo, FitResult, Metrics] | TrainingDiverged] | None:
    """:func:`train_on_cache` of one head per config, trained as one grid (:mod:`featcache.train.grid`):
    per config what ``train_on_cache`` returns, to float rounding, or the :class:`TrainingDiverged` it
    raises; None (nothing trained) where the grid does not cover them (:func:`grid_not_covered`).

    Example:
        >>> cfgs = [TrainConfig(lr=lr, weight_decay=wd) for lr in (1e-3, 1e-2) for wd in (0, 1e-4)]
        >>> outs = train_grid_on_cache(feats, "penultimate", HeadSpec(), cfgs)  # doctest: +SKIP
    """
    plain, config = feats["train"], configs[0]
    if grid_not_covered(head_spec, configs, plain.task) is not None:
        return None
    device, budget = resolve_device(config.device), config.ram_budget_gb
    shape, layout = tuple(plain.features[layer].shape[1:]), plain.layout(layer)
    train = source_for(plain, layer, device, budget)
    std = _standardizer(plain, layer, head_spec, config, train) if config.standardize else None
    heads = [
        build_head(head_spec, shape, len(plain.classes), std, seed=config.seed, layout=layout)
        for _ in configs
    ]
    sources: dict[str, FeatureSource] = {
        k: source_for(feats[k], layer, device, budget) for k in ("val", "test") if k in feats
    }
    val = sources.get("val")
    results = fit_grid(heads, train, val, len(plain.classes), configs, progress, on_epochs)
    if results is None:
        return None
    out: list[tuple[Head, HeadInfo, FitResult, Metrics] | TrainingDiverged] = []
    for head, result, hook in zip(heads, results, on_epochs or [None] * len(heads), strict=True):
        if isinstance(result, TrainingDiverged):
            out.append(result)
            continue
        if hook is not None:
            hook(result.history)
        out.append((head, *_evaluated(head, result, head_spec, plain, layer, sources, val, std is not None)))
    return out


def sigmoid_probs(head: nn.Module, data: BatchSource) -> np.ndarray:
    """A multi-label head's (or network's) probabilities on every row of ``data``.

    Example:
        >>> threshold = best_threshold(sigmoid_probs(head, val), val.y.numpy())  # doctest: +SKIP
    """
    return torch.sigmoid(predict_logits(head, data)).numpy()


@contextlib.contextmanager
def standardised_targets(scale: TargetScale | None, *sources: BatchSource | None) -> Iterator[None]:
    """Inside, the sources' targets are standardised with ``scale`` (their own afterwards); with
    ``scale`` None, nothing changes.

    Example:
        >>> with standardised_targets(TargetScale.fit(train.y), train, val):  # doctest: +SKIP
        ...     fit(head, train, val, 1, TrainConfig(), task="regress")
    """
    if scale is None:
        yield
        return
    held = [(s, s.y) for s in sources if s is not None and s.y is not None]
    try:
        for s, y in held:
            _set_y(s, (y - scale.mean.to(y.device)) / scale.std.to(y.device))
        yield
    finally:
        for s, y in held:
            _set_y(s, y)


def _set_y(source: BatchSource, y: torch.Tensor) -> None:
    """Give a source (and the views of a cycle) the targets ``y``; the next epoch draws with them."""
    for s in (source, *getattr(source, "views", ())):
        s.y = y  # type: ignore[misc]
        if getattr(s, "_shuffled", None) is not None:
            s._shuffled = None  # type: ignore[attr-defined]


def train_run(spec: RunSpec, layer: str = DEFAULT_LAYER, head: HeadSpec | None = None) -> Run:
    """The ``featcache train`` job: cache (build or reuse), train, evaluate, write the run folder.

    Args:
        spec: model, data, extraction and training settings, and the run folder (``spec.out``).
        layer: the layer the head trains on (``featcache layers MODEL`` lists them).
        head: the head to train (default: linear).

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), out="runs/mnist",
        ...                extract=ExtractConfig(input_size=(64, 64)), train=TrainConfig(epochs=10))
        >>> run = train_run(spec, "penultimate", HeadSpec("linear"))  # doctest: +SKIP
    """
    head = head or HeadSpec()
    job = Job.open(spec, "train", layer, one_layer=True)
    folder, backbone, layer, splits = job.run_folder, job.backbone, job.layer, job.splits
    train = spec.train.resolved(len(splits.train))
    job.announce(f"layer {layer}, {head.kind} head", spec.train)
    _check_head_fits(job, head)
    t0 = time.perf_counter()
    feats, views = job.extract_all()
    extract_seconds = time.perf_counter() - t0
    contents = split_contents(splits, spec.cache_dir)  # the digests extraction computed: no re-hashing
    record = job.record(
        "train", backbone, feats, [layer], views, layer=layer, head=head, train=train,
        part=TrainPart(contents),
    )  # fmt: skip
    if spec.resume:
        check_same_data(folder.path, contents)  # names what changed, before split_keys
        keys = ("cache_keys", "split_keys", "view_keys", "train", "head")
        folder.check_resume(record, keys, "this command's settings")
    folder.write_config(record)
    job.note_data(feats)
    with epoch_log(spec.logger, folder.path) as on_epoch:
        trained, info, result, metrics = train_on_cache(
            feats, layer, head, train, spec.progress, folder.checkpoint, spec.resume, views, on_epoch
        )
    named = {**feats, **{f"train@view{i}": v for i, v in enumerate(views, 1)}}
    metrics = replace(
        metrics,
        extract_seconds=extract_seconds,
        cache_hit={k: v.hit for k, v in named.items()},
        cache_rows=cache_rows(named),
    )
    folder.save_head(trained, info)
    folder.write_metrics(metrics)
    folder.write_report(metrics, splits.classes, f"{backbone.cfg.spec} · {layer} · {head.kind}")
    write_mistakes(folder, trained, feats, layer, train, splits)
    run = Run(folder.path, record, metrics, trained, info)
    if not result.finished:
        raise TrainingInterrupted(result, folder.unfinished("train"))
    return run


def _check_head_fits(job: Job, head: HeadSpec) -> None:
    """Before an extraction runs, whether ``head`` can take the layer: a wrong pairing fails in a second,
    not after the extraction. The row shape comes from a table that holds the layer, else from one
    blank image through the backbone (:meth:`Job.row_shape`)."""
    shape, layout = job.row_shape(job.layer)
    build_head(head, shape, len(job.splits.classes), layout=layout)
