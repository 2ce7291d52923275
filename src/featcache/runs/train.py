"""Runs: extract (or reuse the cache), train a head, evaluate, and keep everything in a run folder.

A run folder holds ``config.json`` (all that is needed to reproduce it, cache keys included),
``metrics.json``, ``head.safetensors`` + ``head.json``, ``checkpoint.pt`` (for ``--resume``),
``curves.png`` and ``confusion.png``. :func:`load_run` rebuilds the head without pickle.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from .._util import resolve_device, write_json
from ..backbones.registry import Backbone, load_backbone
from ..cache.store import CachedFeatures, FeatureCache
from ..data.config import DataConfig
from ..data.datasets import DatasetSplits
from ..extract.build import cache_record, extract_splits, extract_views
from ..extract.config import ExtractConfig, Views
from ..extract.extractor import Extractor
from ..train.config import TrainConfig
from ..train.fit import FitResult, evaluate, fit
from ..train.heads import Head, HeadInfo, HeadSpec, build_head, fit_standardize
from ..train.sources import BatchSource, FeatureSource, ViewCycle, source_for
from .folder import Run, check_resume, prepare_run_dir, run_config, save_head, write_report


def evaluate_splits(
    model: nn.Module, result: FitResult, sources: Mapping[str, Any], num_classes: int
) -> dict[str, Any]:
    """metrics.json content: the fit's history and timings, and val/test metrics of the best model."""
    metrics: dict[str, Any] = {
        "history": result.history,
        "step_losses": result.step_losses,
        "examples_per_epoch": result.examples_per_epoch,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_seconds": result.seconds,
        "fast_paths": result.extra,
    }
    for split in ("val", "test"):
        if sources.get(split) is not None:
            metrics[split] = evaluate(
                model, sources[split], num_classes, front_once=result.extra.get("fast_paths", True)
            )
    return metrics


def train_on_cache(
    feats: dict[str, CachedFeatures],
    layer: str,
    head_spec: HeadSpec,
    config: TrainConfig,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    views: Sequence[CachedFeatures] = (),
) -> tuple[Head, HeadInfo, FitResult, dict[str, Any]]:
    """Build a head for ``layer``, fit it on the train split, evaluate on test (and val).

    With ``views`` (cached augmented views of the train split, :func:`~featcache.extract.build.extract_views`)
    epoch ``e`` trains on view ``e mod K``; standardisation statistics still come from the plain split.

    Example:
        >>> out = train_on_cache(feats, "penultimate", HeadSpec(), TrainConfig())  # doctest: +SKIP
        >>> head, info, result, metrics = out  # doctest: +SKIP
    """
    device, budget, plain = resolve_device(config.device), config.ram_budget_gb, feats["train"]
    shape = tuple(plain.features[layer].shape[1:])
    classes = plain.classes
    # With views the plain split only gives the statistics, read from the memory map by chunks.
    train: BatchSource = (
        ViewCycle([source_for(v, layer, device, budget / len(views)) for v in views])
        if views
        else source_for(plain, layer, device, budget)
    )
    std, stats = None, plain.channel_stats.get(layer)
    if config.standardize:
        # A map's cached channel statistics, else the training features in memory (maybe on the GPU),
        # else (views) the memory map by chunks.
        held = train.x if stats is None and isinstance(train, FeatureSource) else None
        rows = held if held is not None else plain.features[layer]
        mean, var = (stats.mean, stats.var) if stats is not None else (None, None)
        std = fit_standardize(head_spec.kind, rows, mean, var, dtype=plain.dtype)
    info = HeadInfo(head_spec, shape, len(classes), standardize=std is not None)
    head = build_head(head_spec, shape, len(classes), std, seed=config.seed)
    sources: dict[str, FeatureSource] = {
        k: source_for(feats[k], layer, device, budget) for k in ("val", "test") if k in feats
    }
    result = fit(head, train, sources.get("val"), len(classes), config, progress, checkpoint, resume)
    return head, info, result, evaluate_splits(head, result, sources, len(classes))


def train_run(
    model: str | Backbone,
    data: DataConfig,
    layer: str,
    head_spec: HeadSpec,
    train_config: TrainConfig,
    extract_config: ExtractConfig,
    out_dir: str | Path,
    weights: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    views_spec: Views | None = None,
) -> Run:
    """The ``featcache train`` job: cache (build or reuse), train, evaluate, write the run folder.

    Example:
        >>> run = train_run("efficientnet-lite0", DataConfig("mnist-5k"), "penultimate", HeadSpec("linear"),
        ...                 TrainConfig(epochs=10), ExtractConfig(input_size=(64, 64)),
        ...                 "runs/mnist")  # doctest: +SKIP
    """
    out = prepare_run_dir(out_dir, resume, overwrite)
    backbone = model if isinstance(model, Backbone) else load_backbone(model, weights)
    splits = data.load()
    ecfg = extract_config
    _check_head_fits(backbone, splits, layer, ecfg, head_spec, cache_dir)
    t0 = time.perf_counter()
    feats = extract_splits(backbone, splits, [layer], ecfg, cache_dir=cache_dir, progress=progress)
    views = (
        extract_views(
            backbone, splits.train, [layer], views_spec, ecfg, cache_dir=cache_dir, progress=progress
        )
        if views_spec
        else []
    )
    extract_seconds = time.perf_counter() - t0
    config = {
        **run_config(backbone, weights, data, layer, ecfg, feats, views_spec),
        **({"view_keys": [v.key for v in views]} if views else {}),
        "head": head_spec.to_dict(),
        "train": asdict(train_config),
    }
    if resume:
        check_resume(
            out, config, ("cache_keys", "split_keys", "view_keys", "train", "head"), "this command's settings"
        )
    write_json(out / "config.json", config)
    head, info, _, metrics = train_on_cache(
        feats, layer, head_spec, train_config, progress, out / "checkpoint.pt", resume, views
    )
    metrics["extract_seconds"] = extract_seconds
    named = {**feats, **{f"train@view{i}": v for i, v in enumerate(views, 1)}}
    metrics["cache_hit"] = {k: v.hit for k, v in named.items()}
    metrics["cache_rows"] = {
        k: {"rows": v.rows, "from_cache": v.from_cache, "extracted": v.extracted} for k, v in named.items()
    }
    save_head(head, info, out)
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, splits.classes, f"{backbone.cfg.spec} · {layer} · {head_spec.kind}")
    return Run(out, config, metrics, head, info)


def _check_head_fits(
    backbone: Backbone,
    splits: DatasetSplits,
    layer: str,
    ecfg: ExtractConfig,
    head: HeadSpec,
    cache_dir: str | None,
) -> None:
    """Before an extraction runs, whether ``head`` can take the layer: a wrong pairing fails in a second,
    not after the extraction. The row shape comes from a table that holds the layer, else from one
    blank image through the backbone."""
    shape = FeatureCache(cache_dir).row_shape(cache_record(backbone, [layer], ecfg), layer)
    build_head(head, shape or Extractor(backbone, [layer], ecfg).row_shapes()[layer], len(splits.classes))
