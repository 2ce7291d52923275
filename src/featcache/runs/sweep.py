"""Layer and hyper-parameter sweeps: every layer from one backbone pass, a head per combination.

Choosing the layer to transfer from is the first question of transfer learning, and the cache makes
asking it cheap: the backbone runs once over the data for all the layers (one cache entry), then a
head is trained on each layer for each hyper-parameter setting — seconds each, from the cache. The
choice is made on the validation split; the test accuracy is reported, never used to choose.

    featcache sweep efficientnet-lite0 mnist-5k --layers blocks.3,blocks.4,blocks.5,penultimate \\
        --lrs 1e-3,3e-3 --input-size 64 64 --out runs/sweep

Every combination is a run folder (``load_run``, ``export`` and ``predict`` take it); ``sweep.json``
holds the table and the chosen one, ``sweep.png`` plots validation accuracy per layer.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._util import FeatcacheError, best_on_val, write_json
from ..backbones.registry import Backbone, load_backbone
from ..data.config import DataConfig
from ..extract.build import extract_splits, extract_views
from ..extract.config import ExtractConfig, Views
from ..train.config import TrainConfig
from ..train.fit import TrainingDiverged
from ..train.freeze import block_names
from ..train.heads import HeadSpec, build_head
from .folder import run_config, save_head, write_report
from .report import plot_sweep
from .train import train_on_cache

log = logging.getLogger(__name__)


def block_layers(backbone: Backbone) -> list[str]:
    """Every block of the backbone (ResNet ``layerK.i``, timm/EfficientNet ``blocks.N``, ViT blocks) and
    the classifier's input: what ``--layers blocks`` sweeps.

    Example:
        >>> block_layers(load_backbone("efficientnet-lite0"))[-2:]  # doctest: +SKIP
        ['blocks.6', 'penultimate']
    """

    return block_names(backbone.model) + (["penultimate"] if backbone.cfg.classifier else [])


def grid(base: TrainConfig, **values: Sequence[Any]) -> list[TrainConfig]:
    """Every combination of the given :class:`TrainConfig` fields, the others as in ``base``.

    Example:
        >>> [c.lr for c in grid(TrainConfig(), lr=[1e-3, 1e-2], weight_decay=[0.0])]
        [0.001, 0.01]
    """
    keys = [k for k, v in values.items() if v]
    return [
        replace(base, **dict(zip(keys, combo, strict=True)))
        for combo in itertools.product(*(values[k] for k in keys))
    ]


@dataclass
class SweepResult:
    """One row per (layer, settings): validation and test metrics, seconds, run folder; the chosen row."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    extract_seconds: float
    out: Path


def _varied(configs: Sequence[TrainConfig]) -> list[str]:
    """The TrainConfig fields that differ between the configs (the sweep's axes)."""
    dicts = [asdict(c) for c in configs]
    return [k for k in dicts[0] if len({repr(d[k]) for d in dicts}) > 1]


def sweep_run(
    model: str | Backbone,
    data: DataConfig,
    layers: Sequence[str],
    head_spec: HeadSpec,
    configs: Sequence[TrainConfig],
    extract_config: ExtractConfig,
    out_dir: str | Path,
    weights: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    views_spec: Views | None = None,
) -> SweepResult:
    """Extract ``layers`` in one pass, train ``head_spec`` on each for each config, choose on val.

    ``layers=["blocks"]`` sweeps every block and the classifier's input (:func:`block_layers`).

    Example:
        >>> res = sweep_run("efficientnet-lite0", DataConfig("mnist-5k"), ["blocks.5", "penultimate"],
        ...                 HeadSpec("linear"), grid(TrainConfig(epochs=10), lr=[1e-3, 3e-3]),
        ...                 ExtractConfig(input_size=(64, 64)), "runs/sweep")  # doctest: +SKIP
        >>> res.best["layer"], res.best["val_acc"]  # doctest: +SKIP
    """
    if not layers or not configs:
        raise FeatcacheError("a sweep needs at least one layer (--layers) and one setting")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = (
        model
        if isinstance(model, Backbone)
        else load_backbone(model, weights, input_size=extract_config.input_size)
    )
    if list(layers) == ["blocks"]:
        layers = block_layers(backbone)
    splits = data.load()
    if splits.val is None or not len(splits.val):
        raise FeatcacheError(
            "a sweep chooses on the validation split: use --val-fraction > 0 or a val/ folder"
        )
    ecfg = extract_config
    t0 = time.perf_counter()
    # one pass for every layer
    feats = extract_splits(backbone, splits, layers, ecfg, cache_dir=cache_dir, progress=progress)
    views = (
        extract_views(
            backbone, splits.train, layers, views_spec, ecfg, cache_dir=cache_dir, progress=progress
        )
        if views_spec
        else []
    )
    extract_seconds = time.perf_counter() - t0
    for layer in layers:  # a head that cannot take some layer fails now, not after hours of others
        shape = tuple(feats["train"].features[layer].shape[1:])
        try:
            build_head(head_spec, shape, len(splits.classes), layout=feats["train"].layout(layer))
        except FeatcacheError as exc:
            raise FeatcacheError(f"layer {layer!r}: {exc}") from exc
    axes = _varied(configs)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(layers) * len(configs), desc="sweep", unit="run", disable=not progress)
    for layer in layers:
        for cfg in configs:
            settings = {k: getattr(cfg, k) for k in axes}
            name = "-".join(
                [f"{len(rows):02d}", layer.replace(":", "_").replace("/", "_")]
                + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in settings.items()]
            )
            run_dir = out / name
            run_dir.mkdir(exist_ok=True)
            config = {
                **run_config(backbone, weights, data, layer, ecfg, feats, views_spec),
                "head": head_spec.to_dict(),
                "train": asdict(cfg),
                **({"view_keys": [v.key for v in views]} if views else {}),
                "sweep": str(out),
            }
            write_json(run_dir / "config.json", config)
            try:
                head, info, result, metrics = train_on_cache(feats, layer, head_spec, cfg, False, views=views)
            except TrainingDiverged as exc:  # one bad setting (say, a too high lr) must not end the sweep
                log.warning("%s: %s", name, exc)
                rows.append({"layer": layer, **settings, "diverged": str(exc), "run": name})
                bar.update()
                continue
            save_head(head, info, run_dir)
            write_json(run_dir / "metrics.json", metrics)
            write_report(
                run_dir, metrics, splits.classes, f"{backbone.cfg.spec} · {layer} · {head_spec.kind}"
            )
            rows.append(
                {
                    "layer": layer,
                    "shape": list(info.in_shape),
                    **settings,
                    "val_acc": metrics["val"]["acc"],
                    "val_loss": metrics["val"]["loss"],
                    **({"test_acc": metrics["test"]["acc"]} if "test" in metrics else {}),
                    "best_epoch": result.best_epoch,
                    "train_seconds": round(result.seconds, 3),
                    "run": name,
                }
            )
            best = best_on_val(_trained(rows))
            bar.set_postfix(best=f"{best['layer']} {best['val_acc']:.3f}")
            bar.update()
    bar.close()
    if not _trained(rows):
        raise FeatcacheError(f"every combination of the sweep diverged; see {out}/*/ and lower --lrs")
    best = best_on_val(_trained(rows))
    write_json(
        out / "sweep.json",
        {
            "model": backbone.cfg.spec,
            "layers": list(layers),
            "axes": axes,
            "head": head_spec.to_dict(),
            "cache_keys": {k: v.key for k, v in feats.items()},
            **({"view_keys": [v.key for v in views]} if views else {}),
            "extract_seconds": extract_seconds,
            "chosen_on": "val_acc (ties: val_loss)",
            "best": best,
            "rows": rows,
        },
    )
    plot_sweep(
        _trained(rows),
        best,
        list(layers),
        axes,
        out / "sweep.png",
        f"{backbone.cfg.spec}: {head_spec.kind} head per layer",
    )
    return SweepResult(rows, best, extract_seconds, out)


def _trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose training finished (not the diverged ones)."""
    return [r for r in rows if "diverged" not in r]
