"""Extraction: run the frozen backbone once over a dataset and stream its activations to the cache.

One forward pass serves every requested layer, and stops after the deepest one. Memory stays
bounded by one shard (``shard_mb``), never the whole dataset. A cache hit runs no forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._util import FeatcacheError, resolve_device
from ..backbones.registry import Backbone, BackboneCfg
from ..cache.store import CachedFeatures, FeatureCache, cache_key
from ..cache.writer import STORAGE_DTYPES
from ..data.datasets import DatasetSplits
from ..data.preprocess import AUGMENT_VERSION, PreprocessedView, make_augment
from ..data.samples import BadImageError, SampleSet
from ..layout import LAYOUT_RULES
from .config import ExtractConfig, View, Views, parse_layers
from .distributed import Ranks
from .extractor import Extractor, decode_workers, resolved_cfg, shard_rows, use_amp
from .nodes import defining_method

log = logging.getLogger(__name__)


def cache_record(
    backbone: Backbone,
    samples: SampleSet,
    layers: Sequence[str],
    config: ExtractConfig,
    split: str,
    view: View | None = None,
) -> dict[str, Any]:
    """The explicit record whose hash is the cache key (everything that changes the stored numbers).

    Example:
        >>> record = cache_record(bb, splits.train, ["layer3"], ExtractConfig(), "train")  # doctest: +SKIP
    """
    device = resolve_device(config.device)
    # View 0 keeps the keys it always had; a view's key holds its augmentation and how it is drawn.
    augmented = {"augment": view.augment, "augment_version": AUGMENT_VERSION} if view else {}
    return {
        "backbone": backbone.cfg.spec,
        "weights_id": backbone.cfg.weights_id,
        "preprocessing": resolved_cfg(backbone, config).preprocessing.key_record(),
        "layers": sorted(layers),
        "pool": config.pool,
        "dtype": config.dtype,
        "amp_bf16": use_amp(config, device),
        "dataset": samples.name,
        "dataset_fingerprint": samples.fingerprint(),
        "split": split,
        "view": view.index if view else 0,
        **augmented,
        **_reading(backbone, layers, config),
    }


def _reading(backbone: Backbone, layers: Sequence[str], config: ExtractConfig) -> dict[str, Any]:
    """How the layers are read, where that decides values: the method whose values the arrays are
    (torch.fx only for graph nodes; elsewhere FX is checked against the hooks) and the version of the
    rules that infer each layer's layout (the layout decides pooling and channel statistics; it is a
    function of the architecture, the input size and these rules, so no forward pass is needed here).
    """
    return {
        "method": defining_method(backbone.model, layers, config.method),
        "layout_rules": LAYOUT_RULES,
    }


def extract(
    backbone: Backbone,
    samples: SampleSet,
    layers: str | Sequence[str] = ("penultimate",),
    config: ExtractConfig | None = None,
    *,
    cache_dir: str | None = None,
    split: str = "train",
    progress: bool = True,
    ranks: Ranks | None = None,
    view: View | None = None,
) -> CachedFeatures:
    """Extract ``layers`` for every sample into the cache (or open the existing entry).

    Args:
        backbone: a frozen backbone from :func:`~featcache.backbones.load_backbone`.
        samples: the images (one split).
        layers: layer names (``featcache layers MODEL`` lists them), ``penultimate`` or ``logits``; a
            comma list works too. One forward pass serves them all.
        config: how to extract; defaults to pooled features in float32.
        cache_dir: cache root (else ``$FEATCACHE_HOME`` or the XDG cache folder).
        split: split name, part of the key.
        progress: show a progress bar.
        ranks: extract as one of several ``torchrun`` processes, each taking a share of the shards
            (:func:`featcache.extract.distributed.ranks_from_env`); every rank must call this alike.
        view: None for the images as they are, else one augmented view (:class:`View`).

    Returns:
        The complete entry, memory-mapped. A hit runs no forward pass.

    Example:
        >>> from featcache import load_backbone, load_dataset
        >>> bb = load_backbone("efficientnet-lite0")
        >>> data = load_dataset("mnist-5k")
        >>> cfg = ExtractConfig(input_size=(64, 64))
        >>> feats = extract(bb, data.train, ["penultimate"], cfg)  # doctest: +SKIP
        >>> feats.tensor("penultimate").shape  # doctest: +SKIP
        torch.Size([3500, 1280])
    """
    config, names = config or ExtractConfig(), parse_layers(layers)
    cache = FeatureCache(cache_dir)
    if len(samples) == 0:
        msg = (
            "nothing to extract (a --limit below the number of classes, or split fractions leaving it empty?)"
        )
        raise FeatcacheError(f"the {split} split of {samples.name!r} holds no samples: {msg}")
    record = cache_record(backbone, samples, names, config, split, view)
    job = _Job(backbone, samples, names, config, cache, cache_key(record), record, split, progress, view)
    if ranks is not None:
        return _extract_sharded(job, ranks)
    key = cache.find(record)
    if key is not None:
        cache.add_channel_stats(key, progress)  # an entry from before featcache stored them
        return _hit(cache, key, names)
    with cache.lock(job.key):
        if cache.is_complete(job.key):  # another process finished it while we waited
            return _hit(cache, job.key, names)
        _build(job, None)
    return cache.open(job.key)


@dataclass
class _Job:
    """One cache entry to build: what to extract, from what, and where."""

    backbone: Backbone
    samples: SampleSet
    layers: tuple[str, ...]
    config: ExtractConfig
    cache: FeatureCache
    key: str
    record: dict[str, Any]
    split: str
    progress: bool
    view: View | None = None


def _extract_sharded(job: _Job, ranks: Ranks) -> CachedFeatures:
    # Every decision that changes which collectives run is rank 0's, so no rank waits for another forever.
    cache, key = job.cache, job.key
    ranks.agree(key[:16], "cache key")  # else they would write shards of different entries
    found = ranks.from_main(cache.find(job.record) if ranks.is_main else None)
    if found is not None:
        return _hit(cache, found, job.layers)
    with cache.lock(key) if ranks.is_main else contextlib.nullcontext():
        if ranks.from_main(cache.is_complete(key)):
            return _hit(cache, key, job.layers)
        _build(job, ranks)
    return cache.open(key)


def _build(job: _Job, ranks: Ranks | None) -> None:
    """Extract the missing shards (this rank's share of them) and, on the main process, commit."""
    samples, config, record = job.samples, job.config, job.record
    main = ranks is None or ranks.is_main
    ex = Extractor(job.backbone, job.layers, config)
    cfg = resolved_cfg(job.backbone, config)
    if main:
        record["shard_rows"] = shard_rows(ex, len(samples))
        if ranks is not None and not config.shard_rows:  # >= 4 shards per rank: similar shares
            record["shard_rows"] = min(
                record["shard_rows"], max(1, math.ceil(len(samples) / (4 * ranks.world)))
            )
        writer = job.cache.writer(job.key, record)  # a partial run's record.json keeps its shard size
    if ranks is not None:
        record["shard_rows"] = ranks.from_main(writer.shard_rows if main else None)
        if not main:
            writer = job.cache.writer(job.key, record)
    n_shards = max(1, math.ceil(len(samples) / writer.shard_rows))
    done = set(writer.finished_shards()) if main else set()
    if ranks is not None:
        done = ranks.from_main(done)
    todo = [i for i in range(len(samples)) if i // writer.shard_rows not in done]
    mine = [i for i in todo if ranks is None or ranks.owns(i // writer.shard_rows)]
    if done and main:
        log.info("resuming cache %s: %d of %d shards already done", job.key[:12], len(done), n_shards)
    t0 = time.perf_counter()
    if mine:
        _run(ex, samples, cfg, writer, mine, job.split, job.progress and main, ranks, job.view)
    if ranks is not None:
        ranks.barrier()  # every rank's shards are on disk
    seconds = time.perf_counter() - t0
    if main:
        skipped = [s for m in writer.finished_shards().values() for s in m["skipped"]]
        if skipped:
            log.warning("skipped %d bad images (recorded in the cache manifest)", len(skipped))
        writer.commit(
            n_shards,
            samples.ids,
            samples.labels,
            {
                "classes": samples.classes,
                "backbone_cfg": cfg.to_dict(),
                "extract_config": _jsonable(config, job.layers, job.view),
                "extract_seconds": round(seconds, 3),
                "rows_extracted_this_run": len(todo),
                "processes": 1 if ranks is None else ranks.world,
                "method": ex.net.method,
                "layer_layouts": ex.layouts,
            },
            progress=job.progress,
            layouts=ex.stored_layouts(),
        )
    if ranks is not None:
        ranks.barrier()  # the manifest is committed


def _hit(cache: FeatureCache, key: str, layers: Sequence[str]) -> CachedFeatures:
    """The complete entry ``key``, holding only ``layers`` (the entry may hold more)."""
    opened = cache.open(key)
    opened.hit = True
    opened.features = {k: v for k, v in opened.features.items() if k in layers}
    opened.channel_stats = {k: v for k, v in opened.channel_stats.items() if k in layers}
    return opened


def _jsonable(config: ExtractConfig, layers: Sequence[str], view: View | None) -> dict[str, Any]:
    """What the manifest records: the augmentation only where it shaped the numbers."""
    d = asdict(config)
    d["input_size"] = list(config.input_size) if config.input_size else None
    return {"layers": list(layers), **d, "augment": view.augment if view else None}


def _run(
    ex: Extractor,
    samples: SampleSet,
    cfg: BackboneCfg,
    writer: Any,
    pending: Sequence[int],
    split: str,
    progress: bool,
    ranks: Ranks | None = None,
    view: View | None = None,
) -> None:
    augment = make_augment(view.augment, cfg.input_size) if view else None
    loader = torch.utils.data.DataLoader(
        PreprocessedView(samples, cfg.preprocessing, pending, augment, view.index if view else None),
        batch_size=ex.config.batch_size,
        num_workers=decode_workers(ex.config.workers, ex.device),
        pin_memory=ex.device.type == "cuda",
        persistent_workers=False,
    )
    rows_per = writer.shard_rows
    current: int | None = None
    # A shard's rows stay on the device until the shard closes: one host transfer per shard, not per batch.
    buf: dict[str, list[torch.Tensor]] = {}
    rows: list[int] = []
    skipped: list[tuple[int, str]] = []

    def close() -> None:
        if current is None:
            return
        arrays = {layer: ex.to_numpy(torch.cat(parts)) for layer, parts in buf.items()}
        if not rows:  # every image in this shard was bad: keep the layer shapes with zero rows
            arrays = {layer: np.zeros((0, *shape), dtype=dt) for layer, (shape, dt) in shapes.items()}
        writer.write_shard(current, arrays, list(rows), list(skipped), ranks.rank if ranks else 0)

    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    np_dtype = STORAGE_DTYPES[ex.config.dtype]
    bar = tqdm(
        total=len(pending),
        unit="img",
        desc=f"extract {split}" + (f" (rank 0 of {ranks.world})" if ranks else ""),
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for x, idx, errors in loader:
            feats = {k: ex.cast(v) for k, v in ex(x).items()}
            for layer, t in feats.items():
                shapes[layer] = (tuple(t.shape[1:]), np_dtype)
            idx_np = idx.numpy()
            shard_of = idx_np // rows_per
            for shard in dict.fromkeys(shard_of.tolist()):
                if shard != current:
                    close()
                    current, buf, rows, skipped = shard, {k: [] for k in feats}, [], []
                sel = np.flatnonzero(shard_of == shard)
                bad = [int(j) for j in sel if errors[j]]
                if bad and ex.config.on_bad_image == "error":
                    i = int(idx_np[bad[0]])
                    raise BadImageError(
                        f"cannot read image {samples.describe(i)!r}: {errors[bad[0]]}. "
                        "Fix or remove the file, "
                        "or pass --on-bad-image skip (skipped ids are recorded in the cache manifest). "
                        "Finished shards are kept; the next run resumes from them."
                    )
                skipped.extend((int(idx_np[j]), errors[j]) for j in bad)
                good = np.setdiff1d(sel, bad) if bad else sel
                if len(good) == len(idx_np):
                    for layer, t in feats.items():
                        buf[layer].append(t)
                else:
                    keep = torch.as_tensor(good, device=ex.device)
                    for layer, t in feats.items():
                        buf[layer].append(t.index_select(0, keep))
                rows.extend(int(i) for i in idx_np[good])
            bar.update(len(idx))
        close()


def extract_splits(
    backbone: Backbone,
    splits: DatasetSplits,
    layers: str | Sequence[str] = ("penultimate",),
    config: ExtractConfig | None = None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, CachedFeatures]:
    """:func:`extract` for every split that exists (``train``, ``val``, ``test``).

    Example:
        >>> splits = load_dataset("digits")
        >>> feats = extract_splits(bb, splits, ["layer3"], ExtractConfig())  # doctest: +SKIP
    """
    return {
        name: extract(
            backbone, s, layers, config, cache_dir=cache_dir, split=name, progress=progress, ranks=ranks
        )
        for name, s in splits.items()
    }


def extract_views(
    backbone: Backbone,
    samples: SampleSet,
    layers: str | Sequence[str],
    views: Views,
    config: ExtractConfig | None = None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> list[CachedFeatures]:
    """The ``views.count`` augmented views of the training split, each its own cache entry.

    Example:
        >>> views = extract_views(bb, mnist.train, ["blocks.4"], Views(4, "flip,crop"))  # doctest: +SKIP
    """
    return [
        extract(backbone, samples, layers, config, cache_dir=cache_dir, progress=progress, view=v)
        for v in views.each()
    ]
